"""Issue 16 in-process: the owner (FakeHost, fake spawner and prober: tests/fakes/owner_world.py)
reading a scripted proxy view (owner_world's `FakeTraffic`) for idle off-loads, loads on demand, `unload`
and swaps on request; and the swap policy (policy.swap_target) on its own, fairness included.
No process is started.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from fakes.owner_world import FakeTraffic, Owner
from test_daemon_owner import assert_sound
from vsup import policy
from vsup.control import CommandError
from vsup.gate import Demand

pytestmark = pytest.mark.timeout(60)
PROXY = {"listen": "127.0.0.1:18999"}


def owner(tmp: Path, sections: dict[str, Any] | None = None, **proxy: Any) -> tuple[Owner, FakeTraffic]:
    """An owner with a [proxy] section (keys `proxy`), other sections in `sections`."""
    o = Owner(tmp, proxy={**PROXY, **proxy}, **(sections or {}))
    tr = FakeTraffic()
    o.sup.traffic = tr
    return o, tr


def run(coro: Any) -> Any:
    return asyncio.run(coro)


# ---- idle off-load and load on demand ------------------------------------------------------------


def test_idle_unload_then_the_next_request_loads_the_last_model(tmp_path: Path) -> None:
    """No request for idle_unload_s: off-loaded (tree gone, segment unlinked), `stopped` with
    reason `idle`, the route holding (idle). A held request then starts the last loaded model;
    status and events say both, with durations and cause."""

    async def scenario() -> None:
        o, tr = owner(tmp_path, idle_unload_s=1.0)
        async with o:
            await o.state("ready")
            ok, _ = await o.reply(o.command("reload", model="b"), 10)  # the last loaded: b
            assert ok
            first = o.world.current()
            assert first is not None
            await o.state("stopped", timeout=10)
            assert o.sup.snap.reason == "idle"
            r = o.sup.gate.route
            assert r.idle and r.hold and r.upstream is None
            assert first.pid not in o.world.host.procs
            assert first.segment not in o.world.host.shm_names()
            ev = o.evs("unloaded")[-1]
            assert ev["cause"] == "idle" and ev["model"] == "b" and ev["seconds"] >= 0
            st = o.sup.status()["on_demand"]
            assert st["unloaded_for"] == "idle" and st["unloaded"] == 1
            tr.request(held=True)
            o.sup.post(Demand(None))
            await o.state("ready")
            tr.wait.clear()
            assert o.sup.snap.model == "b"
            ev = o.evs("loaded")[-1]
            assert ev["cause"] == "idle" and ev["to"] == "b" and ev["seconds"] >= 0
            assert o.sup.status()["on_demand"]["last"]["kind"] == "loaded"
            assert [s for _, s in o.transitions()][-4:] == ["stopping", "stopped", "starting", "ready"]
        assert_sound(o)

    run(scenario())


def test_a_held_request_loads_even_when_its_demand_was_dropped(tmp_path: Path) -> None:
    """The proxy posts one Demand per route; one that arrives while the off-load's teardown runs
    is dropped by that phase. The owner also looks at the held requests each heartbeat."""

    async def scenario() -> None:
        o, tr = owner(tmp_path)
        async with o:
            await o.state("ready")
            ok, _ = await o.reply(o.command("unload"), 10)
            assert ok
            tr.request(held=True)  # no Demand posted
            await o.state("ready", timeout=5)
            tr.wait.clear()
        assert_sound(o)

    run(scenario())


def test_requests_in_flight_held_or_recent_keep_the_model_loaded(tmp_path: Path) -> None:
    """Activity is a request arriving, ending, in flight or held: none of them lets the idle
    timer fire; the canary (not through the proxy) never counts."""

    async def scenario() -> None:
        o, tr = owner(tmp_path, idle_unload_s=1.0)
        async with o:
            await o.state("ready")
            for _ in range(8):  # arrivals every 0.25 s for 2 s
                tr.request("a")
                await asyncio.sleep(0.25)
            tr.flight = 1  # one long stream, in flight for 2 s
            await asyncio.sleep(2.0)
            tr.flight = 0
            tr.wait[None] = (
                time.monotonic() - 100
            )  # a held request (cannot happen while ready; still activity)
            await asyncio.sleep(1.5)
            assert str(o.sup.snap.state) == "ready" and not o.evs("unloaded")
            tr.wait.clear()
            await o.state("stopped", timeout=5)
            assert o.sup.snap.reason == "idle"
        assert_sound(o)

    run(scenario())


def test_without_proxy_a_demand_is_ignored_and_unload_just_stops(tmp_path: Path) -> None:
    """No [proxy]: nothing can wake an off-loaded model, so unload leaves it stopped and a
    Demand is only noted."""

    async def scenario() -> None:
        async with Owner(tmp_path) as o:
            await o.state("ready")
            ok, r = await o.reply(o.command("unload"), 10)
            assert ok and r["unloaded"] and r["model"] == "a"
            o.sup.post(Demand("a"))
            await o.until(lambda: o.evs("demand_ignored"), 2, "demand_ignored")
            assert str(o.sup.snap.state) == "stopped"
        assert_sound(o)

    run(scenario())


# ---- vsup unload ---------------------------------------------------------------------------------


def test_unload_drains_the_requests_in_flight_then_off_loads(tmp_path: Path) -> None:
    """`vsup unload` while a request is in flight: phase drain until it ends (bounded by
    drain_s), then teardown; the reply says the model, the time and a clean cleanup; the route
    holds (off-loaded); an operator's stop afterwards makes the proxy refuse again."""

    async def scenario() -> None:
        o, tr = owner(tmp_path, {"timeouts": {"drain_s": 10.0}})
        async with o:
            await o.state("ready")
            tr.flight = 1
            t = o.command("unload")
            await o.state("stopping", "drain")
            await asyncio.sleep(0.1)
            assert o.sup.snap.phase == "drain" and o.sup.gate.route.hold
            tr.flight = 0
            ok, r = await o.reply(t, 10)
            assert ok and r["unloaded"] and r["model"] == "a" and r["cleanup"]["remaining"] == []
            assert str(o.sup.snap.state) == "stopped" and o.sup.snap.reason == "unloaded"
            assert o.sup.gate.route.idle and o.sup.gate.route.hold
            assert o.evs("unloaded")[-1]["cause"] == "operator"
            ok, _ = await o.reply(o.command("stop"), 10)
            assert ok and not o.sup.gate.route.hold and not o.sup.gate.route.idle
        assert_sound(o)

    run(scenario())


def test_unload_during_a_reload_is_busy(tmp_path: Path) -> None:
    """Acceptance: `vsup unload` while a reload runs is refused with busy; the reload goes on."""

    async def scenario() -> None:
        async with Owner(tmp_path) as o:
            await o.state("ready")
            o.world.modes["model-b"] = "loading"
            reload_t = o.command("reload", model="b")
            await o.state("reloading", "ready")
            ok, err = await o.reply(o.command("unload"), 5)
            assert not ok and isinstance(err, CommandError) and err.code == "busy", err
            assert str(o.sup.snap.state) == "reloading"
            o.world.modes["model-b"] = "ready"
            ok, _ = await o.reply(o.command("stop"), 10)  # stop cancels the reload
            await o.reply(reload_t, 5)
        assert_sound(o)

    run(scenario())


# ---- swap on request -----------------------------------------------------------------------------


def test_a_request_for_another_model_swaps_to_it(tmp_path: Path) -> None:
    """swap_on_request: requests held for b (a is not in use) make the owner reload to b; the
    `swapped` event has the cause, the models and the time; b is then the loaded model."""

    async def scenario() -> None:
        o, tr = owner(tmp_path, swap_on_request=True, min_resident_s=30.0)
        async with o:
            await o.state("ready")
            tr.request("b", held=True)
            o.sup.post(Demand("b"))
            await o.until(lambda: o.sup.snap.model == "b" and str(o.sup.snap.state) == "ready", 10, "b")
            tr.wait.clear()
            ev = o.evs("swapped")[-1]
            assert ev["cause"] == "request" and ev["from"] == "a" and ev["to"] == "b" and ev["seconds"] > 0
            assert o.evs("swap")[-1]["to"] == "b"
            assert o.sup.status()["on_demand"]["swapped"] == 1
        assert_sound(o)

    run(scenario())


def test_min_resident_keeps_a_model_in_use_then_the_other_gets_its_turn(tmp_path: Path) -> None:
    """While requests for a keep arriving, b's held requests wait until a has been ready
    min_resident_s; then the swap happens although a is still asked for."""

    async def scenario() -> None:
        o, tr = owner(tmp_path, swap_on_request=True, min_resident_s=1.5)
        async with o:
            await o.state("ready")
            ready_at = o.sup._ready_at
            assert ready_at is not None
            tr.request("b", held=True)
            o.sup.post(Demand("b"))
            while time.monotonic() - ready_at < 1.2:
                tr.request("a")
                await asyncio.sleep(0.1)
                assert o.sup.snap.model == "a" and str(o.sup.snap.state) == "ready"
            for _ in range(30):  # a still asked for; min_resident_s passes
                tr.request("a")
                if o.evs("swap"):
                    break
                await asyncio.sleep(0.1)
            swap = o.evs("swap")
            assert swap and swap[-1]["to"] == "b"
            assert time.monotonic() - ready_at >= 1.5
            await o.until(lambda: o.sup.snap.model == "b" and str(o.sup.snap.state) == "ready", 10, "b")
            tr.wait.clear()
        assert_sound(o)

    run(scenario())


def test_a_model_nobody_asks_for_is_swapped_away_at_once(tmp_path: Path) -> None:
    """min_resident_s protects a model only while requests for it keep arriving."""

    async def scenario() -> None:
        o, tr = owner(tmp_path, swap_on_request=True, min_resident_s=60.0)
        async with o:
            await o.state("ready")
            tr.request("b", held=True)
            o.sup.post(Demand("b"))
            await o.until(lambda: o.evs("swap"), 3, "the swap, long before min_resident_s")
            await o.state("ready")
            tr.wait.clear()
        assert_sound(o)

    run(scenario())


def test_fairness_oldest_waiting_model_first_none_starved(tmp_path: Path) -> None:
    """Three models, a loaded and kept busy: b asked first, c after. Once a's residence is over
    b goes first (older); while b serves, requests for a arrive again, but c's are older, so c
    is next, then a: every waiting model gets its turn in the order its requests came."""

    async def scenario() -> None:
        o, tr = owner(
            tmp_path,
            swap_on_request=True,
            min_resident_s=0.5,
            sections={"models.c": {"model": "model-c", "served_model_name": "c"}},
        )
        async with o:
            await o.state("ready")
            order: list[str] = []
            tr.request("b", held=True)
            await asyncio.sleep(0.01)
            tr.request("c", held=True)
            for _ in range(400):
                loaded = o.sup.snap.model if str(o.sup.snap.state) == "ready" else None
                if loaded is not None and (not order or order[-1] != loaded):
                    order.append(loaded)
                    tr.wait.pop(loaded, None)  # its held requests are served
                    if loaded != "a":
                        tr.request("a", held=True)  # a is asked for again, later than the others
                if loaded is not None:
                    tr.request(loaded)  # the loaded model stays in use
                if len(order) >= 4:
                    break
                await asyncio.sleep(0.02)
            assert order == ["a", "b", "c", "a"], order
            tr.wait.clear()
        assert_sound(o)

    run(scenario())


def test_a_failed_swap_rolls_back_and_is_not_retried_at_once(tmp_path: Path) -> None:
    """b cannot complete: the swap rolls back to a (serving again), `swap_failed` is said, and b's
    still-held requests do not trigger another swap within hold_timeout_s."""

    async def scenario() -> None:
        o, tr = owner(tmp_path, swap_on_request=True, min_resident_s=0.0, hold_timeout_s=60.0)
        async with o:
            await o.state("ready")
            o.world.modes["model-b"] = "broken"
            tr.request("b", held=True)
            o.sup.post(Demand("b"))
            await o.until(lambda: o.evs("swap_failed"), 10, "swap_failed")
            await o.state("ready")
            assert o.sup.snap.model == "a"
            n = len(o.evs("swap"))
            await asyncio.sleep(1.5)
            assert len(o.evs("swap")) == n
            tr.wait.clear()
        assert_sound(o)

    run(scenario())


def test_an_off_loaded_server_loads_the_model_the_request_asks_for(tmp_path: Path) -> None:
    """swap_on_request and off-loaded: a request for b loads b, not the last loaded a."""

    async def scenario() -> None:
        o, tr = owner(tmp_path, swap_on_request=True)
        async with o:
            await o.state("ready")
            ok, _ = await o.reply(o.command("unload"), 10)
            assert ok
            tr.request("b", held=True)
            o.sup.post(Demand("b"))
            await o.state("ready")
            tr.wait.clear()
            assert o.sup.snap.model == "b"
        assert_sound(o)

    run(scenario())


def test_a_swap_waits_for_the_loaded_models_requests_in_flight(tmp_path: Path) -> None:
    """The swap begins (new requests held) but the old server keeps serving what it has: phase
    drain until the proxy's in-flight count for it is 0, bounded by drain_s."""

    async def scenario() -> None:
        o, tr = owner(tmp_path, {"timeouts": {"drain_s": 10.0}}, swap_on_request=True, min_resident_s=0.0)
        async with o:
            await o.state("ready")
            tr.flight = 1
            tr.request("b", held=True)
            o.sup.post(Demand("b"))
            await o.state("reloading", "drain")
            await asyncio.sleep(0.3)
            assert o.sup.snap.phase == "drain" and o.world.current() is not None
            tr.flight = 0
            await o.until(lambda: o.sup.snap.model == "b" and str(o.sup.snap.state) == "ready", 10, "b")
            tr.wait.clear()
            assert o.evs("drained")[-1]["ok"] is True
        assert_sound(o)

    run(scenario())


def test_metrics_count_off_loads_loads_and_swaps_with_their_durations(tmp_path: Path) -> None:
    """vsup_on_demand_total{kind,cause} and vsup_on_demand_seconds{kind} follow the events."""
    from vsup.metrics import Metrics

    m = Metrics()
    if not m.available:
        pytest.skip("prometheus-client not installed")

    async def scenario() -> None:
        o, tr = owner(tmp_path, swap_on_request=True, min_resident_s=0.0)
        o.sup.metrics = m
        async with o:
            await o.state("ready")
            ok, _ = await o.reply(o.command("unload"), 10)
            assert ok
            tr.request("a", held=True)
            await o.state("ready")
            tr.wait.clear()
            tr.request("b", held=True)
            await o.until(lambda: o.sup.snap.model == "b" and str(o.sup.snap.state) == "ready", 10, "b")
            tr.wait.clear()

    run(scenario())
    val = m.registry.get_sample_value
    assert val("vsup_on_demand_total", {"kind": "unloaded", "cause": "operator"}) == 1
    assert val("vsup_on_demand_total", {"kind": "loaded", "cause": "operator"}) == 1
    assert val("vsup_on_demand_total", {"kind": "swapped", "cause": "request"}) == 1
    assert (val("vsup_on_demand_seconds_count", {"kind": "swapped"}) or 0) == 1
    assert (val("vsup_on_demand_seconds_sum", {"kind": "swapped"}) or 0) > 0


# ---- the policy alone ----------------------------------------------------------------------------


def test_swap_target_policy() -> None:
    """min_resident_s while in use; the oldest waiting model first; unknown, loaded and blocked
    models never chosen."""
    models = {"a", "b", "c"}
    base: dict[str, Any] = {"loaded": "a", "ready_at": 100.0, "models": models, "min_resident_s": 60.0}
    st = policy.swap_target
    # nothing waits for another configured model
    assert (
        st(now=200, waiting={"a": 1.0, None: 1.0, "zz": 1.0}, last_use=None, in_flight=0, **base).model
        is None
    )
    # a in use (in flight, or asked 1 s ago) and resident 10 s: wait
    assert st(now=110, waiting={"b": 105.0}, last_use=109.0, in_flight=0, **base).model is None
    assert st(now=110, waiting={"b": 105.0}, last_use=None, in_flight=1, **base).model is None
    # a not asked for IN_USE_S: swap now
    assert st(now=110, waiting={"b": 105.0}, last_use=100.0, in_flight=0, **base).model == "b"
    # resident long enough: the oldest waiting model, even though a is busy
    assert st(now=170, waiting={"b": 150.0, "c": 120.0}, last_use=169.0, in_flight=3, **base).model == "c"
    assert (
        st(
            now=170, waiting={"b": 150.0, "c": 120.0}, last_use=169.0, in_flight=3, blocked={"c"}, **base
        ).model
        == "b"
    )


# ---- random interleavings with off-loads and swaps -------------------------------------------

from hypothesis import HealthCheck, given, settings  # noqa: E402 - with the section using it
from hypothesis import strategies as st  # noqa: E402 - as above

STEPS = st.one_of(
    st.tuples(st.just("cmd"), st.sampled_from(["start", "stop", "restart", "reload-b", "unload", "cleanup"])),
    st.tuples(st.just("ask"), st.sampled_from(["a", "b", None])),  # a request held for a model
    st.tuples(st.just("serve"), st.just(None)),  # the held requests are answered
    st.tuples(st.just("flight"), st.sampled_from([0, 1])),
    st.tuples(st.just("mode"), st.sampled_from(["ready", "loading", "broken", "exit"])),
    st.tuples(st.just("wait"), st.sampled_from([0.0, 0.05, 0.3, 1.2])),
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=st.lists(STEPS, min_size=1, max_size=12))
def test_random_interleavings_with_off_loads_and_swaps_keep_the_invariants(
    tmp_path_factory: Any, steps: list[tuple[str, Any]]
) -> None:
    """Commands (unload included), requests held for a, b or no model (with their Demand), the
    held ones answered, requests in flight, server behaviours and pauses, with idle_unload_s and
    swap_on_request on: no exception escapes the owner, every transition is in the table, at
    most one tree is alive, every torn-down tree is cleaned, every command gets one reply."""
    tmp = tmp_path_factory.mktemp("ondemand")

    async def scenario() -> None:
        o, tr = owner(
            tmp, {"restart": {"max_failures": 2}}, idle_unload_s=1.0, swap_on_request=True, min_resident_s=0.2
        )
        async with o:
            for kind, arg in steps:
                if kind == "cmd":
                    o.command("reload", model="b") if arg == "reload-b" else o.command(arg)
                elif kind == "ask":
                    tr.request(arg, held=True)
                    o.sup.post(Demand(arg))
                elif kind == "serve":
                    tr.wait.clear()
                elif kind == "flight":
                    tr.flight = arg
                elif kind == "mode":
                    o.world.modes.update({"model-a": arg, "model-b": arg})
                else:
                    await asyncio.sleep(arg)
                assert o.world.max_alive <= 1
                assert o.task is not None and not o.task.done(), o.task
            tr.flight = 0
        assert_sound(o)

    asyncio.run(scenario())
