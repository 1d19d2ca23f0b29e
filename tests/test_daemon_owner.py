"""The owner in-process (issue 14): every (state, command) pair and every observation driven
through the queue against FakeHost, a fake spawner and a fake prober, with states.TRANSITIONS
and commands.TABLE as the oracles. No process is started; a case takes milliseconds to ~1 s.
"""

from __future__ import annotations

import asyncio
import errno
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from fakes.owner_world import FakeTraffic, Owner
from vsup import commands, proctree
from vsup.commands import Answer
from vsup.control import CommandError
from vsup.gate import Demand, UpstreamRefused, UpstreamStalled
from vsup.observations import Exited, LogSignal, Probe
from vsup.probes import ProbeResult
from vsup.states import TRANSITIONS, State

pytestmark = pytest.mark.timeout(60)


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def assert_sound(o: Owner) -> None:
    """The invariants every scenario ends with: legal transitions only, no internal error, at
    most one tree alive at any spawn (two with an overlapped reload, issue 23), every tree gone
    and its segment unlinked, ledger empty, every command answered exactly once."""
    for old, new in o.transitions():
        assert State(new) in TRANSITIONS[State(old)], f"illegal {old} -> {new}"
    assert o.evs("internal_error") == []
    assert o.world.max_alive <= (2 if o.cfg.proxy is not None and o.cfg.proxy.overlap == "auto" else 1)
    assert o.world.alive_trees() == []
    assert [s.segment for s in o.world.servers if s.segment in o.world.host.shm_names()] == []
    assert proctree.Ledger(o.cfg.state_dir).load() == []
    assert all(t.done() and not t.cancelled() for t in o.replies), "a command without a reply"
    for t in o.replies:
        t.exception()  # retrieved: an error reply is a reply


# ---- bringing the owner into each state ---------------------------------------------------------


async def into(o: Owner, where: str) -> None:
    """Drive a running owner into the state (and sub-step) named `where`."""
    w = o.world
    if where == "stopped":
        await o.state("stopped")
    elif where == "stopped-unloaded":  # issue 16: off-loaded by `vsup unload`, the route holding
        await o.state("ready")
        ok, r = await o.reply(o.command("unload"), 15)
        assert ok and r["unloaded"], r
        assert o.sup.snap.reason == "unloaded" and o.sup.gate.route.idle and o.sup.gate.route.hold
    elif where == "starting":  # readiness of a server that loads for ever
        await o.state("starting", "readiness")
    elif where == "starting-backoff":
        await o.state("starting", "backoff")
    elif where == "ready":
        await o.state("ready")
    elif where == "unhealthy":  # a canary failed; the confirming one never returns
        await o.state("ready")
        cur = o.world.current()
        assert cur is not None
        cur.mode = "hung"
        o.sup.post(Probe(o.sup.gen, ProbeResult("canary", False, "timed out")))
        await o.state("unhealthy")
    elif where == "stopping":  # the operator's stop of a server that ignores SIGTERM
        await o.state("ready")
        o.command("stop")
        await o.state("stopping")
    elif where == "failed":
        await o.state("failed")
    elif where == "reloading":  # the new model loads for ever
        await o.state("ready")
        w.modes["model-b"] = "loading"
        o.command("reload", model="b")
        await o.state("reloading", "ready")
    elif where == "reloading-overlap":  # issue 23: b loads for ever beside a, which serves
        await o.state("ready")
        w.modes["model-b"] = "loading"
        o.command("reload", model="b")
        await o.until(lambda: len(w.alive_trees()) == 2, what="both trees of the overlap")
        await o.state("reloading", "ready")
        assert o.sup.overlap is not None and o.sup.gate.route.upstream is not None
    else:
        raise AssertionError(where)


# How each position is set up: owner options and the first server's mode.
SETUP: dict[str, dict[str, Any]] = {
    "stopped": {"autostart": False},
    "stopped-unloaded": {},
    "starting": {"mode_a": "loading"},
    "starting-backoff": {"mode_a": "exit", "restart": {"backoff_initial_s": 30.0, "backoff_max_s": 30.0}},
    "ready": {},
    "unhealthy": {"probes": {"confirm": 5, "canary_interval_s": 0.0}},
    "stopping": {"mode_a": "stubborn", "timeouts": {"stop_grace_s": 1.5}},
    "failed": {"mode_a": "exit", "restart": {"max_failures": 1}},
    "reloading": {},
    # [proxy] overlap = auto, a KV cache size and (below) weights files: the reload overlaps
    "reloading-overlap": {
        "proxy": {"listen": "127.0.0.1:18996", "overlap": "auto"},
        "vllm": {"env": {"VLLM_CPU_KVCACHE_SPACE": "1"}},
    },
}
POSITIONS = list(SETUP)


def owner(tmp: Path, where: str) -> Owner:
    opts = dict(SETUP[where])
    autostart = opts.pop("autostart", True)
    mode_a = opts.pop("mode_a", "ready")
    o = Owner(tmp, autostart=autostart, **opts)
    o.world.modes["model-a"] = mode_a
    for m in ("model-a", "model-b"):  # overlap.py's CPU fit reads the weights' size
        o.world.host.add_file(f"{m}/model.safetensors", 300 << 20)
    return o


def test_every_state_has_a_position_and_every_pair_an_answer(tmp_path: Path) -> None:
    """The matrix below covers every state, and the table answers every (state, command) pair:
    a state or a command added without its row fails here."""
    assert {State(p.split("-")[0]) for p in POSITIONS} == set(State)
    # every command of the control socket is a lifecycle command (a row of the table) or a read
    from vsup.runtime import Runtime

    sup = Owner(tmp_path).sup
    assert set(Runtime(sup).handlers()) == set(commands.LIFECYCLE) | set(commands.READS)
    for s in State:
        assert set(commands.TABLE[s]) == set(commands.LIFECYCLE), s
    for s, row in commands.TABLE.items():
        for c, how in row.items():
            first = commands.FIRST_STATE[c]
            if how is Answer.ACCEPT and first is not None and first != s:
                assert first in TRANSITIONS[s], f"{c} accepted in {s} but {s} -> {first} is not allowed"


@pytest.mark.parametrize("cmd", commands.LIFECYCLE)
@pytest.mark.parametrize("where", POSITIONS)
def test_command_in_state(tmp_path: Path, where: str, cmd: str) -> None:
    """Each lifecycle command in each state gets the table's answer and only allowed transitions;
    afterwards the owner still works and leaves nothing behind."""

    async def scenario() -> None:
        async with owner(tmp_path, where) as o:
            await into(o, where)
            state = o.sup.snap.state
            how = commands.TABLE[state][cmd]
            o.world.modes.update({"model-a": "ready", "model-b": "ready"})  # later starts succeed
            mark = len(o.evs())
            t = o.command(cmd, **({"model": "b"} if cmd == "reload" else {}))
            if how is Answer.BUSY:
                ok, r = await o.reply(t, 2)
                assert not ok and isinstance(r, CommandError) and r.code == "busy", r
                assert str(state) in r.message or "reload" in r.message
            elif how is Answer.NOTE:
                ok, r = await o.reply(t, 2)
                assert ok and r["note"] == f"already {state}", r
                assert [e for e in o.evs()[mark:] if e["event"] == "state" and e["old"] != e["state"]] == []
            elif how is Answer.RUN:
                ok, r = await o.reply(t, 5)
                assert ok and "killed" in r, r
            else:
                first = commands.FIRST_STATE[cmd]
                if not (cmd == "stop" and state == State.STOPPED):  # stopped + stop: nothing to stop
                    await o.until(
                        lambda: any(
                            e["event"] == "state" and e["state"] == str(first) for e in o.evs()[mark:]
                        ),
                        10,
                        f"{cmd} taking {state} to {first}",
                    )
                ok, r = await o.reply(t, 15)
                if cmd == "stop":
                    assert ok and r["stopped"], r
                    assert str(o.sup.snap.state) == "stopped"
                    assert not o.sup.gate.route.hold  # an operator's stop: requests refused again
                elif cmd == "unload":  # issue 16: off-loaded, `stopped` with reason `unloaded`
                    assert ok and r["unloaded"], r
                    assert str(o.sup.snap.state) == "stopped" and o.sup.snap.reason == "unloaded"
                else:
                    assert ok, r
                    assert str(o.sup.snap.state) == "ready"
                    assert o.sup.snap.model == ("b" if cmd == "reload" else o.sup.snap.model)
        assert_sound(o)

    run(scenario())


# ---- the acceptance cases of issue 14, in-process ---------------------------------------------


@pytest.mark.parametrize("cmd", ["reload", "restart"])
@pytest.mark.parametrize("where", ["starting", "starting-backoff"])
def test_reload_or_restart_while_starting_cancels_the_start(tmp_path: Path, where: str, cmd: str) -> None:
    """The operator sees the wrong model loading (or a backoff wait): reload b / restart cancels
    the start, tears down and cleans what exists, and the asked model serves."""

    async def scenario() -> None:
        async with owner(tmp_path, where) as o:
            await into(o, where)
            first = o.world.current()
            o.world.modes.update({"model-a": "ready", "model-b": "ready"})
            ok, r = await o.reply(o.command(cmd, **({"model": "b"} if cmd == "reload" else {})), 10)
            assert ok, r
            assert str(o.sup.snap.state) == "ready"
            assert o.sup.snap.model == ("b" if cmd == "reload" else "a")
            if first is not None:
                assert first.pid not in o.world.host.procs
                assert first.segment not in o.world.host.shm_names()
            seq = [s for _, s in o.transitions()]
            assert seq[-2:] == ["reloading", "ready"], seq
        assert_sound(o)

    run(scenario())


def test_stop_during_reload_cancels_it(tmp_path: Path) -> None:
    """stop while reloading: the reload's reply is failed, cancelled by stop; the tree is torn
    down and cleaned; the state becomes stopped."""

    async def scenario() -> None:
        async with owner(tmp_path, "reloading") as o:
            await into(o, "reloading")
            reload_t = o.replies[-1]
            ok, r = await o.reply(o.command("stop"), 10)
            assert ok and r["stopped"], r
            ok, err = await o.reply(reload_t, 5)
            assert not ok and isinstance(err, CommandError) and err.code == "failed"
            assert "cancelled by stop" in err.message
            assert str(o.sup.snap.state) == "stopped"
            assert o.transitions()[-2:] == [("reloading", "stopping"), ("stopping", "stopped")]
        assert_sound(o)

    run(scenario())


def test_failed_reload_from_ready_rolls_back(tmp_path: Path) -> None:
    """A reload whose model cannot complete rolls back to the serving model."""

    async def scenario() -> None:
        async with Owner(tmp_path) as o:
            await o.state("ready")
            o.world.modes["model-b"] = "broken"
            ok, err = await o.reply(o.command("reload", model="b"), 10)
            assert not ok and "rolled back" in err.message, err
            assert str(o.sup.snap.state) == "ready" and o.sup.snap.model == "a"
            assert len(o.evs("incident")) == 1
        assert_sound(o)

    run(scenario())


# ---- observations in each state -----------------------------------------------------------------


def _fatal(gen: int) -> LogSignal:
    return LogSignal(
        gen, "engine_dead", "engine-dead", "EngineCore encountered a fatal error", "EngineCore", 1, 0.0
    )


# observation -> expected next state from ready (None: stays ready)
OBSERVATIONS = {
    "exit": ("stopping", lambda o: Exited(o.sup.gen, o.world.current().pid, 0)),
    "fatal_log": ("stopping", lambda o: _fatal(o.sup.gen)),
    "stall_log": (
        "unhealthy",
        lambda o: LogSignal(
            o.sup.gen,
            "shm_stall",
            "shm-stall",
            "No available shared memory broadcast block found in 60 seconds",
            None,
            None,
            0.0,
        ),
    ),
    "probe_failed": ("unhealthy", lambda o: Probe(o.sup.gen, ProbeResult("canary", False, "timed out"))),
    "probe_ok": (None, lambda o: Probe(o.sup.gen, ProbeResult("canary", True, "ok"))),
    "upstream_stalled": ("unhealthy", lambda o: UpstreamStalled(o.sup.gen, "3 streams waited 30 s")),
    "upstream_refused": (None, lambda o: UpstreamRefused(o.sup.gen, "connection refused")),
    "demand": (None, lambda o: Demand("b")),
    "stale_exit": (None, lambda o: Exited(o.sup.gen - 1, 1, 0)),
}


@pytest.mark.parametrize("obs", list(OBSERVATIONS))
def test_observation_while_ready(tmp_path: Path, obs: str) -> None:
    """Each observation acts as documented on a ready server; recovery ends serving again."""

    async def scenario() -> None:
        async with Owner(tmp_path, probes={"canary_interval_s": 0.0, "confirm": 5}) as o:
            await o.state("ready")
            expect, make = OBSERVATIONS[obs]
            build: Callable[[Owner], Any] = make  # each builds one observation class
            mark = len(o.evs())
            o.sup.post(build(o))
            if expect is None:
                await asyncio.sleep(0.2)
                assert [e["state"] for e in o.evs()[mark:] if e["event"] == "state"] == []
                if obs == "demand":
                    assert o.evs("demand_ignored")
                if obs == "upstream_refused":
                    await o.until(lambda: o.evs("upstream_refused"), 2, "the refusal event")
            else:
                await o.until(
                    lambda: any(e["event"] == "state" and e["state"] == expect for e in o.evs()[mark:]),
                    5,
                    expect,
                )
                if expect == "stopping":
                    await o.state("ready", timeout=10)  # restarted
                    assert o.sup.snap.restarts == 1
        assert_sound(o)

    run(scenario())


@pytest.mark.parametrize("where", ["starting", "stopped", "failed", "stopped-unloaded"])
def test_observations_outside_serving_change_nothing_unexpected(tmp_path: Path, where: str) -> None:
    """Probe results, proxy reports and stale exits while not serving are dropped or noted."""

    async def scenario() -> None:
        async with owner(tmp_path, where) as o:
            await into(o, where)
            before = o.sup.snap.state
            for make in (
                lambda: Probe(o.sup.gen, ProbeResult("canary", False, "x")),
                lambda: UpstreamStalled(o.sup.gen, "x"),
                lambda: UpstreamRefused(o.sup.gen, "x"),
                lambda: Demand(None),
                lambda: Exited(o.sup.gen + 7, 1, 0),
            ):
                o.sup.post(make())
            await asyncio.sleep(0.2)
            assert o.sup.snap.state == before
        assert_sound(o)

    run(scenario())


# ---- the owner's boundary ------------------------------------------------------------------------


def test_exception_in_a_phase_ends_in_failed_not_in_a_dead_daemon(tmp_path: Path) -> None:
    """A bug in a phase (here: an illegal transition forced in serve) becomes internal_error, an
    incident and a torn-down, cleaned tree in `failed`; the owner keeps answering and an
    operator start serves again."""

    async def scenario() -> None:
        o = Owner(tmp_path)
        real = o.sup._do_serve
        calls = {"n": 0}

        async def buggy(it: Any) -> Any:
            calls["n"] += 1
            if calls["n"] == 1:
                await asyncio.sleep(0.05)
                o.sup._set_state(State.STARTING, reason="bug")  # ready -> starting: illegal
            return await real(it)

        o.sup._do_serve = buggy  # type: ignore[method-assign]  # the planted bug
        async with o:
            await o.state("failed")
            assert len(o.evs("internal_error")) == 1
            assert "IllegalTransition" in (o.sup.snap.reason or "")
            assert o.evs("incident")[-1]["kind"] == "internal_error"
            assert o.world.alive_trees() == []
            ok, r = await o.reply(o.command("start"), 10)
            assert ok and r["state"] == "ready", r
        o.events.recent = type(o.events.recent)(e for e in o.events.recent if e["event"] != "internal_error")
        assert_sound(o)

    run(scenario())


def test_finding6_ledger_full_after_spawn_kills_the_unrecorded_tree(tmp_path: Path, monkeypatch: Any) -> None:
    """Issue 20, finding 6: the ledger cannot be written (ENOSPC) after vLLM started: the tree is
    killed at once (never left running unrecorded), the start fails into the normal recovery,
    and the daemon keeps running."""

    async def scenario() -> None:
        o = Owner(tmp_path, restart={"max_failures": 2})

        def full(self: Any, recs: Any) -> None:
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(proctree.Ledger, "save", full)
        async with o:
            await o.state("failed", timeout=10)
            assert o.world.alive_trees() == []
            assert [s.segment for s in o.world.servers if s.segment in o.world.host.shm_names()] == []
            assert o.evs("ledger_write_failed")
            assert "ledger" in (o.sup.snap.reason or "")
        assert o.evs("internal_error") == []

    run(scenario())


def test_finding6_ledger_full_during_teardown_finishes_the_teardown_and_says_so(
    tmp_path: Path, monkeypatch: Any
) -> None:
    """Issue 20, finding 6: the teardown's ledger writes fail: the tree is still torn down and
    cleaned, the cleanup event says the ledger was not written, the state is stopped."""

    async def scenario() -> None:
        async with Owner(tmp_path) as o:
            await o.state("ready")

            def full(self: Any, recs: Any) -> None:
                raise OSError(errno.ENOSPC, "No space left on device")

            monkeypatch.setattr(proctree.Ledger, "save", full)
            ok, r = await o.reply(o.command("stop"), 10)
            assert ok and r["stopped"], r
            assert o.world.alive_trees() == []
            ev = [e for e in o.evs("cleanup") if e["why"] == "teardown"][-1]
            assert "not written" in ev["ledger"]
            monkeypatch.undo()

    run(scenario())


def test_spawned_event_redacts_the_api_key(tmp_path: Path) -> None:
    """Issue 15: the `spawned` event's argv never carries the value of --api-key."""

    async def scenario() -> None:
        async with Owner(tmp_path, vllm={"args": ["--api-key", "sekrit-1", "--api-key=sekrit-2"]}) as o:
            await o.state("ready")
            argv = o.evs("spawned")[-1]["argv"]
            assert "sekrit" not in " ".join(argv) and "--api-key" in argv

    run(scenario())


def test_gate_routes_follow_the_state(tmp_path: Path) -> None:
    """The route the proxy follows: an upstream only while ready; hold while a server is coming
    (starting, unhealthy, a reload, a recovery's stopping); refuse in failed and after a stop."""

    async def scenario() -> None:
        o = Owner(tmp_path, probes={"canary_interval_s": 0.0, "confirm": 5})
        routes: list[Any] = []
        real = o.sup.gate.publish

        def spy(route: Any) -> None:
            routes.append(route)
            real(route)

        o.sup.gate.publish = spy  # type: ignore[method-assign]  # a recording spy
        async with o:
            await o.state("ready")
            r = o.sup.gate.route
            assert r.upstream == ("127.0.0.1", 8999) and r.gen == o.sup.gen and r.model == "a"
            o.sup.post(Probe(o.sup.gen, ProbeResult("canary", False, "x")))
            await o.state("unhealthy")
            assert o.sup.gate.route.upstream is None and o.sup.gate.route.hold
            cur = o.world.current()
            assert cur is not None
            o.sup.post(Exited(o.sup.gen, cur.pid, 0))
            await o.state("ready")
            ok, _ = await o.reply(o.command("stop"), 10)
            assert ok and not o.sup.gate.route.hold and o.sup.gate.route.state == "stopped"
        for route in routes:
            assert (route.upstream is not None) == (route.state == "ready"), route
            if route.state in ("starting", "reloading", "unhealthy"):
                assert route.hold, route
            if route.state in ("failed", "stopped"):
                assert not route.hold, route
        recovering = [r for r in routes if r.state == "stopping" and r.reason and "exited" in r.reason]
        assert recovering and all(r.hold for r in recovering)

    run(scenario())


def test_drain_waits_for_the_proxys_requests_in_flight(tmp_path: Path) -> None:
    """With a proxy, reload's drain waits until its requests in flight to the old tree are done
    (bounded by drain_s), and status shows the proxy's numbers."""

    async def scenario() -> None:
        traffic = FakeTraffic()
        traffic.flight = 2
        o = Owner(tmp_path, timeouts={"drain_s": 5.0})
        o.sup.traffic = traffic
        async with o:
            await o.state("ready")
            assert o.sup.status()["traffic"] == {"in_flight": 2, "held": 0}
            t = o.command("reload", model="b")
            await o.state("reloading", "drain")
            await asyncio.sleep(0.3)
            assert o.sup.snap.phase == "drain"  # still waiting for the 2 requests
            traffic.flight = 0
            ok, r = await o.reply(t, 10)
            assert ok, r
            assert o.evs("drained")[-1]["ok"] is True

    run(scenario())


def test_unload_drain_busy_for_commands_and_cancelled_by_a_shutdown(tmp_path: Path) -> None:
    """Issue 16's unload while it drains the proxy's requests in flight: `stopping` (phase
    drain), every lifecycle command busy, status answered, the route holding; a shutdown
    cancels it (its reply: failed, unload cancelled by daemon shutdown), and the owner still
    tears the tree down and cleans it."""

    async def scenario() -> None:
        o = Owner(tmp_path, timeouts={"drain_s": 30.0, "shutdown_drain_s": 0.2})
        o.sup.traffic = traffic = FakeTraffic()
        traffic.flight = 1  # a request that never finishes
        async with o:
            await o.state("ready")
            t = o.command("unload")
            await o.state("stopping", "drain")
            assert o.sup.gate.route.hold and o.sup.gate.route.upstream is None
            for cmd in commands.LIFECYCLE:
                assert commands.TABLE[State.STOPPING][cmd] is Answer.BUSY
                ok, r = await o.reply(o.command(cmd, **({"model": "b"} if cmd == "reload" else {})), 2)
                assert not ok and isinstance(r, CommandError) and r.code == "busy", (cmd, r)
            assert o.sup.status()["phase"] == "drain"
            await o.shutdown()
            ok, r = await o.reply(t, 2)
            assert not ok and "unload cancelled by daemon shutdown" in str(r), r
        assert o.world.alive_trees() == []
        assert_sound(o)

    run(scenario())


@pytest.mark.parametrize("where", POSITIONS)
def test_stacks_is_a_read_in_every_state(tmp_path: Path, where: str, monkeypatch: Any) -> None:
    """`vsup stacks` (issue 17) is answered in every state, like status: from the tree the owner
    published, never posted to the owner; it changes no state, kills nothing (may_kill=False),
    and with no tree says there is nothing to dump. The dump itself is stacks.collect's
    (test_stacks.py); here it is a stand-in that records what it was asked."""
    from types import SimpleNamespace

    from vsup import stacks
    from vsup.runtime import Runtime

    asked: list[dict[str, Any]] = []

    async def collect(tree: Any, host: Any, **kw: Any) -> Any:
        asked.append({"tree": tree, **kw})
        return SimpleNamespace(to_json=lambda: {"processes": [], "mechanism": "stand-in"})

    monkeypatch.setattr(stacks, "collect", collect)

    async def scenario() -> None:
        async with owner(tmp_path, where) as o:
            await into(o, where)
            before, tree = o.sup.snap.state, o.sup.tree
            alive = o.world.alive_trees()
            assert "stacks" in commands.READS
            handler = Runtime(o.sup).handlers()["stacks"]
            try:
                r = await asyncio.wait_for(handler(SimpleNamespace(args={})), 15)
            except CommandError as e:
                assert tree is None and e.code == "failed" and "no vLLM server" in e.message, e
            else:
                assert tree is not None and r["mechanism"] == "stand-in", r
                assert asked[-1]["tree"].id == tree.id and asked[-1]["may_kill"] is False
            assert o.sup.snap.state == before and o.world.alive_trees() == alive
            assert o.evs("internal_error") == []
        assert_sound(o)

    run(scenario())


# ---- random interleavings ------------------------------------------------------------------------

from hypothesis import HealthCheck, given, settings  # noqa: E402 - with the section using it
from hypothesis import strategies as st  # noqa: E402 - as above

STEPS = st.one_of(
    st.tuples(
        st.just("cmd"),
        st.sampled_from(["start", "stop", "restart", "reload-a", "reload-b", "cleanup", "unload"]),
    ),
    st.tuples(
        st.just("obs"),
        st.sampled_from(["exit", "fatal", "canary_bad", "canary_ok", "stalled", "refused", "demand"]),
    ),
    st.tuples(st.just("mode"), st.sampled_from(["ready", "loading", "broken", "exit"])),
    st.tuples(st.just("wait"), st.sampled_from([0.0, 0.02, 0.1, 0.3])),
)


def _observation(o: Owner, what: str) -> Any:
    g, cur = o.sup.gen, o.world.current()
    return {
        "exit": lambda: Exited(g, cur.pid, 0) if cur else None,
        "fatal": lambda: _fatal(g),
        "canary_bad": lambda: Probe(g, ProbeResult("canary", False, "timed out")),
        "canary_ok": lambda: Probe(g, ProbeResult("canary", True, "ok")),
        "stalled": lambda: UpstreamStalled(g, "x"),
        "refused": lambda: UpstreamRefused(g, "x"),
        "demand": lambda: Demand("b"),
    }[what]()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=st.lists(STEPS, min_size=1, max_size=12), autostart=st.booleans())
def test_random_interleavings_keep_the_invariants(
    tmp_path_factory: Any, steps: list[tuple[str, Any]], autostart: bool
) -> None:
    """Random commands, observations, server behaviours and pauses: no exception escapes the
    owner, every transition is in the table, at most one tree is alive, every torn-down tree is
    cleaned, and every command gets exactly one reply (all of them by the shutdown)."""
    tmp = tmp_path_factory.mktemp("owner")

    async def scenario() -> None:
        o = Owner(tmp, autostart=autostart, restart={"max_failures": 2})
        async with o:
            for kind, arg in steps:
                if kind == "cmd":
                    if arg.startswith("reload-"):
                        o.command("reload", model=arg[-1])
                    else:
                        o.command(arg)
                elif kind == "obs":
                    obs = _observation(o, arg)
                    if obs is not None:
                        o.sup.post(obs)
                elif kind == "mode":
                    o.world.modes.update({"model-a": arg, "model-b": arg})
                else:
                    await asyncio.sleep(arg)
                assert o.world.max_alive <= 1
                assert o.task is not None and not o.task.done(), o.task
        assert_sound(o)
        for t in o.replies:  # exactly one reply: a result or an error, never cancelled
            assert not t.cancelled()
            t.exception() if t.exception() else t.result()

    asyncio.run(scenario())
