"""The overlapped reload (issue 23) in the owner, in-process: FakeHost, the fake spawner and the
fake prober of tests/fakes/owner_world.py (each fake server answers probes on its own port), the
fit check against FakeHost's meminfo and fake weights files.
"""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path
from typing import Any

import pytest

from fakes.owner_world import Owner, Server
from vsup import overlapped, proctree
from vsup.control import CommandError
from vsup.gate import UpstreamRefused, UpstreamStalled
from vsup.observations import Shutdown
from vsup.states import TRANSITIONS, State

pytestmark = pytest.mark.timeout(60)
PORT = 8999  # owner_world's [vllm].port


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def overlap_owner(tmp: Path, **over: Any) -> Owner:
    """An owner whose reloads overlap: [proxy] overlap = auto, a KV cache size, known weights."""
    px = over.setdefault("proxy", {})
    px.setdefault("listen", "127.0.0.1:18997")
    px.setdefault("overlap", "auto")
    over.setdefault("vllm", {}).setdefault("env", {"VLLM_CPU_KVCACHE_SPACE": "1"})
    o = Owner(tmp, **over)
    for m in ("model-a", "model-b"):
        o.world.host.add_file(f"{m}/model.safetensors", 300 << 20)
    return o


def assert_sound(o: Owner, alive: list[Server]) -> None:
    """Legal transitions only, no internal error, at most two trees at once, every command
    answered; exactly `alive` left running, the ledger holding just their trees."""
    for old, new in o.transitions():
        assert State(new) in TRANSITIONS[State(old)], f"illegal {old} -> {new}"
    assert o.evs("internal_error") == []
    assert o.world.max_alive <= 2
    assert o.world.alive_trees() == alive
    gone = [s for s in o.world.servers if s not in alive]
    assert [s.segment for s in gone if s.segment in o.world.host.shm_names()] == []
    assert sorted(r.id for r in proctree.Ledger(o.cfg.state_dir).load()) == sorted(f"t{s.pid}" for s in alive)
    assert all(t.done() and not t.cancelled() for t in o.replies), "a command without a reply"
    assert o.sup.overlap is not None or o.world.host.caps == {}, "a CPU cap left after the overlap"


async def overlapping(o: Owner) -> tuple[Server, Server, asyncio.Task[Any]]:
    """From ready on a: `reload b` with b loading for ever, until both trees run."""
    await o.state("ready")
    a = o.world.current()
    assert a is not None
    o.world.modes["model-b"] = "loading"
    t = o.command("reload", model="b")
    await o.until(lambda: len(o.world.alive_trees()) == 2, what="the new tree beside the old one")
    await o.state("reloading", "ready")
    b = o.world.current()
    assert b is not None and b is not a
    return a, b, t


def kill(o: Owner, s: Server) -> None:
    h = o.world.host
    h.signal(s.pid, h.procs[s.pid].create_time, signal.SIGKILL)


@pytest.mark.parametrize("capped", [True, False], ids=["cpu-cap", "no-cgroup-yield"])
def test_overlapped_reload_switches_then_retires_the_old_tree(tmp_path: Path, capped: bool) -> None:
    """reload b: b starts beside a on a port and TMPDIR of its own, both in the ledger; requests
    go to a until b is proven, then to b; a is stopped and cleaned; ready on b. On CPU the new
    tree is capped at spawn (a cpu cgroup) until a is retired; where no cgroup can be made, a's
    session yields its CPU share while b loads, and b's while a drains."""

    async def scenario() -> None:
        async with overlap_owner(tmp_path) as o:
            if not capped:
                o.world.host.cap_refused = "no cgroup v1 cpu controller"
            a, b, t = await overlapping(o)
            assert a.port == PORT and b.port != PORT and b.private_tmp and not a.private_tmp
            assert sorted(r.id for r in proctree.Ledger(o.cfg.state_dir).load()) == [f"t{a.pid}", f"t{b.pid}"]
            route = o.sup.gate.route
            assert route.upstream == ("127.0.0.1", PORT) and route.hold  # a serves, held only if it fails
            st = o.sup.status()["overlap"]
            assert st["serving"] == "old" and st["old"]["pid"] == a.pid and st["new"]["pid"] == b.pid
            # CPU: every tree runs at nice 10 ([vllm] nice's default without GPUs), its session's
            # autogroup too; the new tree's CPU is capped at all cores but one from its spawn, or
            # (no cgroup) the serving tree yields the cores to the new one's load (19)
            assert [e["nice"] for e in o.evs("spawned")] == [10, 10]
            assert o.world.host.nices == {a.pid: 10, b.pid: 10}
            cap = proctree.cap_cgroup(f"t{b.pid}")
            if capped:
                assert o.world.host.caps == {cap: (b.pid, overlapped._cap_cores())}
                assert o.world.host.autogroups == {a.pid: 10, b.pid: 10} and o.evs("overlap_yield") == []
                assert o.evs("overlap_cap")[0]["cores"] == overlapped._cap_cores()
            else:
                assert o.world.host.caps == {} and o.evs("overlap_cap")[0]["cgroup"] is None
                assert "cpu controller" in o.evs("overlap_cap")[0]["reason"]
                assert o.world.host.autogroups == {a.pid: 19, b.pid: 10}
                assert o.evs("overlap_yield")[0]["was"] == 10
            assert st["new"]["port"] == b.port and st["fit"]["ok"]
            b.mode = "ready"
            await o.state("reloading", "retire")
            # the old one drains at its full share, the new one still capped or yielding meanwhile
            if capped:
                assert o.world.host.autogroups == {a.pid: 10, b.pid: 10} and cap in o.world.host.caps
            else:
                assert o.world.host.autogroups == {a.pid: 10, b.pid: 19}
            ok, r = await o.reply(t, 15)
            assert ok and r["overlapped"] and r["model"] == "b", r
            assert o.world.host.autogroups[b.pid] == 10  # serving alone: its own share back
            assert o.world.host.caps == {}  # ... and no cap
            if capped:
                assert o.world.host.caps_made == [cap] and len(o.evs("overlap_uncap")) == 1
            else:
                assert [e["tree"] for e in o.evs("overlap_yield")] == [f"t{a.pid}", f"t{b.pid}"]
            assert o.sup.snap.state == State.READY and o.sup.snap.model == "b"
            assert o.sup.gate.route.upstream == ("127.0.0.1", b.port) and o.sup.gate.route.gen == o.sup.gen
            assert "overlap" not in o.sup.status()
            names = [e["event"] for e in o.evs()]
            order = ["overlap_begin", "spawned", "overlap_switch", "teardown", "overlap_end"]
            assert [n for n in names if n in order][-5:] == order
            assert o.evs("cleanup")[-1]["why"] == "overlap-old"
            assert o.transitions()[-2:] == [("ready", "reloading"), ("reloading", "ready")]
            assert (a.pid, signal.SIGTERM) in o.world.host.signals
            assert_sound(o, [b])
            # the serving tree is on its own port now: a later sequential reload works as before
            o.world.host.mem["MemAvailable"] = 1 << 30  # no room for two: sequential
            ok, r = await o.reply(o.command("reload", model="a"), 15)
            assert ok and "overlapped" not in r, r
            cur = o.world.current()
            assert cur is not None
            assert_sound(o, [cur])

    run(scenario())


def test_overlapped_reload_of_a_broken_model_never_stops_the_old_one(tmp_path: Path) -> None:
    """b fails its canary: b is torn down and cleaned; a was never signalled and serves on, with
    its own generation; the reload's reply says so; one incident."""

    async def scenario() -> None:
        async with overlap_owner(tmp_path) as o:
            await o.state("ready")
            a, gen = o.world.current(), o.sup.gen
            assert a is not None
            o.world.modes["model-b"] = "broken"
            ok, err = await o.reply(o.command("reload", model="b"), 15)
            assert not ok and isinstance(err, CommandError) and "a kept serving" in err.message, err
            assert o.sup.snap.state == State.READY and o.sup.snap.model == "a"
            assert o.sup.gen == gen and o.sup.gate.route.upstream == ("127.0.0.1", PORT)
            assert not [s for p, s in o.world.host.signals if p == a.pid]
            assert o.world.host.autogroups[a.pid] == 10  # its own CPU share back (the default on CPU)
            assert len(o.world.host.caps_made) == 1 and o.world.host.caps == {}  # the cap went with b
            assert o.evs("overlap_end")[-1]["outcome"] == "rolled_back"
            assert len(o.evs("incident")) == 1
            assert o.transitions()[-2:] == [("ready", "reloading"), ("reloading", "ready")]
            assert_sound(o, [a])

    run(scenario())


def test_new_tree_dying_during_the_overlap_rolls_back_to_the_old_one(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with overlap_owner(tmp_path) as o:
            a, b, t = await overlapping(o)
            kill(o, b)
            ok, err = await o.reply(t, 15)
            assert not ok and "exited" in err.message and "kept serving" in err.message, err
            assert o.sup.snap.state == State.READY and o.sup.snap.model == "a"
            assert_sound(o, [a])

    run(scenario())


def test_old_tree_is_refreshed_through_the_overlap_and_after_a_rollback(tmp_path: Path) -> None:
    """The old tree's refresher runs on while the new one loads: a member it gains meanwhile is
    recorded (in the overlap's record, and the live record after the rollback), so the
    teardown that finally stops it knows it. (Its refresher used to end at the new
    generation, and a rolled-back tree was never looked at again.)"""

    async def scenario() -> None:
        async with overlap_owner(tmp_path) as o:
            a, b, t = await overlapping(o)
            h = o.world.host
            h.add_proc(a.pid + 1, a.pid, a.pid, ("VLLM::Worker_TP0",), ct=h.t)
            ov = o.sup.overlap
            assert ov is not None
            await o.until(
                lambda: a.pid + 1 in {p.pid for p in ov.old.tree.procs},
                timeout=10,
                what="the old tree refreshed",
            )
            kill(o, b)
            ok, err = await o.reply(t, 15)
            assert not ok and "kept serving" in err.message, err
            assert o.sup.tree is not None and a.pid + 1 in {p.pid for p in o.sup.tree.procs}
            ledger = {r.id: r for r in proctree.Ledger(o.cfg.state_dir).load()}
            assert a.pid + 1 in {p.pid for p in ledger[f"t{a.pid}"].procs}
            await o.shutdown()
            assert a.pid + 1 not in h.procs  # the shutdown's teardown knew it
            assert_sound(o, [])

    run(scenario())


def test_old_tree_dying_during_the_overlap_holds_requests_until_the_new_one_serves(tmp_path: Path) -> None:
    """a dies while b loads: the route stops sending to a (hold); b proven: ready on b, a's debris
    cleaned."""

    async def scenario() -> None:
        async with overlap_owner(tmp_path) as o:
            a, b, t = await overlapping(o)
            kill(o, a)
            await o.until(lambda: o.evs("overlap_old_down"), what="the old tree's death noticed")
            assert o.sup.gate.route.upstream is None and o.sup.gate.route.hold
            assert o.sup.status()["overlap"]["serving"] is None
            assert o.sup.snap.state == State.RELOADING  # the new one is still coming
            b.mode = "ready"
            ok, r = await o.reply(t, 15)
            assert ok and r["overlapped"], r
            assert o.sup.snap.model == "b"
            assert_sound(o, [b])

    run(scenario())


def test_old_tree_refusing_connections_during_the_overlap_is_taken_out_of_the_route(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with overlap_owner(tmp_path) as o:
            a, b, t = await overlapping(o)
            assert o.sup.overlap is not None
            o.sup.post(UpstreamRefused(o.sup.overlap.old.gen, "connect: refused"))
            await o.until(lambda: o.sup.gate.route.upstream is None, what="the old server withdrawn")
            b.mode = "ready"
            ok, r = await o.reply(t, 15)
            assert ok, r
            assert_sound(o, [b])

    run(scenario())


def test_old_tree_stalling_during_the_overlap_is_slow_not_down(tmp_path: Path) -> None:
    """The proxy's stall report for the old tree (its CPU yielded to the loading one): it keeps
    serving and is drained, not taken for down (the retire would skip the drain and cut its
    streams)."""

    async def scenario() -> None:
        async with overlap_owner(tmp_path) as o:
            a, b, t = await overlapping(o)
            ov = o.sup.overlap
            assert ov is not None
            o.sup.post(UpstreamStalled(ov.old.gen, "1 stream(s) in flight, no byte for 4s"))
            await o.until(lambda: o.evs("overlap_old_slow"), what="the stall noticed")
            assert ov.old.down is None and not o.evs("overlap_old_down")
            assert o.sup.gate.route.upstream == ("127.0.0.1", ov.old.tree.port)
            b.mode = "ready"
            ok, r = await o.reply(t, 15)
            assert ok, r
            names = [e["event"] for e in o.evs()]
            # drained first; its API server's exit during the retire is the only "down" after
            assert "drained" in names and "overlap_old_down" not in names[: names.index("drained")], names
            assert_sound(o, [b])

    run(scenario())


def test_both_dying_during_the_overlap_recovers_the_old_model(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with overlap_owner(tmp_path) as o:
            a, b, t = await overlapping(o)
            kill(o, a)
            await o.until(lambda: o.evs("overlap_old_down"), what="the old tree's death noticed")
            kill(o, b)
            ok, err = await o.reply(t, 15)
            assert not ok and "went down meanwhile" in err.message, err
            await o.state("ready", timeout=15)
            assert o.sup.snap.model == "a" and o.sup.snap.restarts == 1
            cur = o.world.current()
            assert cur is not None
            assert_sound(o, [cur])

    run(scenario())


@pytest.mark.parametrize("cmd", ["reload", "restart", "unload", "start", "cleanup"])
def test_commands_during_the_overlap_are_busy_and_change_nothing(tmp_path: Path, cmd: str) -> None:
    """A second reload, a restart, ... while both trees run: busy (one operation at a time);
    the overlap then completes as if nothing was asked."""

    async def scenario() -> None:
        async with overlap_owner(tmp_path) as o:
            a, b, t = await overlapping(o)
            ok, err = await o.reply(o.command(cmd, **({"model": "a"} if cmd == "reload" else {})), 5)
            assert not ok and isinstance(err, CommandError) and err.code == "busy", err
            assert len(o.world.alive_trees()) == 2 and o.sup.overlap is not None
            b.mode = "ready"
            ok, r = await o.reply(t, 15)
            assert ok and r["overlapped"], r
            assert_sound(o, [b])

    run(scenario())


@pytest.mark.parametrize("how", ["stop", "shutdown"])
def test_stop_or_shutdown_during_the_overlap_ends_both_trees(tmp_path: Path, how: str) -> None:
    async def scenario() -> None:
        async with overlap_owner(tmp_path) as o:
            a, b, t = await overlapping(o)
            if how == "stop":
                ok, r = await o.reply(o.command("stop"), 15)
                assert ok and r["stopped"], r
                assert o.sup.snap.state == State.STOPPED
            else:
                o.sup.post(Shutdown("SIGTERM"))
                assert o.task is not None
                await asyncio.wait_for(o.task, 15)
            ok, err = await o.reply(t, 5)
            assert not ok and "cancelled" in err.message, err
            assert o.sup.overlap is None
            assert_sound(o, [])

    run(scenario())


def test_stop_while_the_old_tree_drains_after_the_switch(tmp_path: Path) -> None:
    """The switch happened (b serves); a stop during a's drain: a is retired at once, the reload
    answered as done, then b stopped."""

    async def scenario() -> None:
        async with overlap_owner(tmp_path, timeouts={"drain_s": 5.0}) as o:
            a, b, t = await overlapping(o)
            a.mode = "stubborn"  # keeps answering /metrics; its drain reads running 0 but needs 1 s idle
            b.mode = "ready"
            await o.state("reloading", "retire")
            ok, r = await o.reply(o.command("stop"), 15)
            assert ok and r["stopped"], r
            ok, r = await o.reply(t, 5)
            assert ok and r["overlapped"], r
            assert_sound(o, [])

    run(scenario())


def test_a_vsup_killed_mid_overlap_leaves_two_recorded_trees_the_next_start_cleans(tmp_path: Path) -> None:
    """The ledger holds both trees while they run; a successor's start-up cleanup removes both."""

    async def scenario() -> None:
        o = overlap_owner(tmp_path)
        async with o:
            a, b, _t = await overlapping(o)
            assert o.task is not None
            while not o.task.done():  # vsup SIGKILLed: nothing of it runs on, no teardown
                o.task.cancel()  # (again: asyncio.wait_for may swallow one whose inner get completed)
                await asyncio.sleep(0.001)
            recs = proctree.Ledger(o.cfg.state_dir).load()
            assert sorted(r.id for r in recs) == sorted([f"t{a.pid}", f"t{b.pid}"])
            assert o.world.alive_trees() == [a, b]
        async with Owner(tmp_path, world=o.world, autostart=False) as o2:
            await o2.until(
                lambda: [e for e in o2.evs("cleanup") if e["why"] == "leftovers"], what="leftovers"
            )
            found = o2.evs("leftovers_found")
            assert found and sorted(found[0]["trees"]) == sorted([f"t{a.pid}", f"t{b.pid}"])
            assert o2.world.alive_trees() == []
            assert proctree.Ledger(o2.cfg.state_dir).load() == []
            assert {a.segment, b.segment} & o2.world.host.shm_names() == set()

    run(scenario())


def test_no_room_for_both_falls_back_to_the_sequential_reload_and_says_why(tmp_path: Path) -> None:
    """MemAvailable too small for b's KV cache + weights + margin: the reload is sequential
    (drain, stop, start: never two trees) and its events say why."""

    async def scenario() -> None:
        async with overlap_owner(tmp_path) as o:
            await o.state("ready")
            o.world.host.mem["MemAvailable"] = 2 << 30
            ok, r = await o.reply(o.command("reload", model="b"), 15)
            assert ok and "overlapped" not in r, r
            fb = o.evs("overlap_fallback")
            assert len(fb) == 1 and "does not fit" in fb[0]["reason"] and fb[0]["available_mib"] == 2048, fb
            assert o.world.max_alive == 1 and not o.evs("overlap_begin")
            assert [e["phase"] for e in o.evs("reload_phase")][:2] == ["drain", "stop"]
            cur = o.world.current()
            assert cur is not None
            assert_sound(o, [cur])

    run(scenario())


def test_overlap_never_is_the_sequential_reload_without_a_word(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with overlap_owner(tmp_path, proxy={"overlap": "never"}) as o:
            await o.state("ready")
            ok, r = await o.reply(o.command("reload", model="b"), 15)
            assert ok, r
            assert not o.evs("overlap_fallback") and not o.evs("overlap_begin") and o.world.max_alive == 1

    run(scenario())


def test_sigchld_posts_the_exit_of_either_trees_leader_during_an_overlap() -> None:
    """runtime's SIGCHLD reaper: the owner's leader and, during an overlapped reload, the old
    tree's leader each give an Exited with their own generation (the old one's went unposted:
    its retire then waited its whole stop grace for it); other children give nothing."""
    from types import SimpleNamespace

    from vsup.observations import Exited
    from vsup.runtime import Runtime

    posted: list[Any] = []
    reaped = [(200, 9), (100, 0), (300, 0)]  # waitpid statuses: SIGKILLed, exit 0, exit 0
    sup: Any = SimpleNamespace(
        host=SimpleNamespace(reap_children=lambda: reaped),
        leader=SimpleNamespace(pid=100),
        gen=5,
        overlap=SimpleNamespace(old=SimpleNamespace(leader=SimpleNamespace(pid=200), gen=3)),
        post=posted.append,
    )
    Runtime(sup)._reap()
    assert posted == [Exited(3, 200, -9), Exited(5, 100, 0)]
    sup.overlap, posted[:] = None, []
    Runtime(sup)._reap()
    assert posted == [Exited(5, 100, 0)]
