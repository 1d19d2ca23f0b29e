"""Off-load, load on demand, swap on request (issue 16): what the owner decides from the proxy's
view, and the off-load phase.

`OnDemand` is the owner's book of it: the numbers `status` shows, a load or swap in progress,
the models whose swap failed. Only the owner calls it, from its phases; its decisions come back
as intents the owner follows. `unload` is the off-load phase; it takes the owner as an explicit
collaborator, and every state change goes through the owner's `_set_state`/`_publish`.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from . import config as config_mod
from . import teardown
from .config import Config, ModelConfig
from .events import EventLog
from .gate import Demand, Traffic
from .observations import Cmd, Intent, OperationFailed
from .policy import swap_target
from .states import State
from .watchers import Clock

if TYPE_CHECKING:
    from .daemon import Supervisor
    from .metrics import Metrics


def iso(t: float) -> str:
    """A wall-clock time as status and events show it (UTC, seconds)."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + "Z"


class OnDemand:
    """The on-demand numbers, a load or swap in progress (what asked for it, since when), and
    models whose swap failed (monotonic time)."""

    def __init__(self, clock: Clock, events: EventLog) -> None:
        self.clock = clock
        self.events = events
        self.counts: dict[str, Any] = {"unloaded": 0, "loaded": 0, "swapped": 0, "last": None}
        self.pending: dict[str, Any] | None = None
        self.swap_failed: dict[str, float] = {}

    def status(self, unloaded: str | None) -> dict[str, Any]:
        return {**self.counts, "unloaded_for": unloaded, "pending": self.pending}

    def due(
        self,
        cfg: Config,
        traffic: Traffic | None,
        *,
        state: State,
        loaded: str | None,
        ready_at: float | None,
        gen: int,
    ) -> Intent | None:
        """While serving, each heartbeat and on a Demand, from the proxy's view (never posted per
        request): a swap that held requests ask for, or an idle off-load."""
        px, tr = cfg.proxy, traffic
        if px is None or tr is None or state != State.READY or ready_at is None:
            return None
        now = self.clock.monotonic()
        if px.swap_on_request:
            served = config_mod.served_models(cfg)
            hold_s = px.hold_timeout_s
            blocked = {m for m, t in self.swap_failed.items() if now - t < hold_s}
            choice = swap_target(
                now=now,
                loaded=loaded,
                ready_at=ready_at,
                waiting=tr.waiting(),
                models=set(served),
                last_use=tr.last_activity_at(loaded),
                in_flight=tr.in_flight(gen),
                min_resident_s=px.min_resident_s,
                blocked=blocked,
            )
            if choice.model is not None:
                self.pending = {
                    "kind": "swapped",
                    "cause": "request",
                    "from": loaded,
                    "to": choice.model,
                    "since": iso(self.clock.time()),
                    "t0": now,
                    "waited_s": round(now - tr.waiting().get(choice.model, now), 3),
                }
                self.events.emit("swap", model=loaded, to=choice.model, why=choice.why, cause="request")
                return Intent(
                    "reload",
                    spec=served[choice.model],
                    reason=f"swap on request ({choice.model} asked)",
                    failure_kind="swap",
                )
        idle_s = px.idle_unload_s
        if idle_s is not None and tr.in_flight() == 0 and tr.held() == 0:
            last = max(ready_at, tr.last_activity_at() or 0.0)
            if now - last >= idle_s:
                return Intent("unload", reason=f"no request for {now - last:.0f}s", failure_kind="idle")
        return None

    def load(
        self,
        cfg: Config,
        traffic: Traffic | None,
        spec: ModelConfig,
        unloaded: str | None,
        obs: Demand | None,
    ) -> Intent:
        """Off-loaded, and a request waits: start the last loaded model (`spec`), or, with
        swap_on_request, the configured model the oldest held request asks for. The proxy holds
        it until ready."""
        cause = unloaded or "idle"
        px = cfg.proxy
        if px is not None and px.swap_on_request and traffic is not None:
            served = config_mod.served_models(cfg)
            asked = {m: t for m, t in traffic.waiting().items() if m in served}
            if isinstance(obs, Demand) and obs.model in served and not asked:
                asked = {obs.model: 0.0}
            if asked:
                spec = served[str(min(asked, key=lambda m: (asked[m], str(m))))]
        served_name = spec.served_model_name or spec.name
        now = self.clock.monotonic()
        self.pending = {
            "kind": "loaded",
            "cause": cause,
            "to": served_name,
            "since": iso(self.clock.time()),
            "t0": now,
        }
        held = traffic.held() if traffic is not None else 0
        self.events.emit("load_on_demand", model=served_name, cause=cause, held=held)
        return Intent("start", spec=spec, reason=f"on demand: a request after the {cause} off-load")

    def done(self, kind: str, metrics: Metrics | None) -> None:
        """A load on demand (`loaded`) or a swap (`swapped`) reached ready: its event, status and
        metrics. Nothing when none of that kind is pending."""
        p = self.pending
        if p is None or p["kind"] != kind:
            return
        self.pending = None
        secs = round(self.clock.monotonic() - p.pop("t0"), 3)
        self.record(p.pop("kind"), metrics, seconds=secs, **p)

    def swap_failed_for(self, model: str, reason: str) -> None:
        """Not tried again while its held requests could still wait."""
        self.swap_failed[model] = self.clock.monotonic()
        self.pending = None
        self.events.emit("swap_failed", model=model, reason=reason)

    def record(
        self, kind: str, metrics: Metrics | None, *, seconds: float, cause: str, **fields: Any
    ) -> None:
        self.counts[kind] += 1
        self.counts["last"] = {
            "kind": kind,
            "cause": cause,
            "seconds": seconds,
            "at": iso(self.clock.time()),
            **fields,
        }
        self.events.emit(kind, cause=cause, seconds=seconds, **fields)
        if metrics is not None:
            metrics.on_demand(kind, cause, seconds)


async def unload(o: Supervisor, it: Intent) -> Intent:
    """Off-load (`vsup unload`, or idle_unload_s): drain the requests in flight (bounded by
    timeouts.drain_s; new ones are held), tear down, clean, prove the machine clean (port,
    ledger, GPU memory where NVML sees it), then `stopped` with reason `idle` or `unloaded`
    and the route holding: the next request loads the model again. Debris left: `failed`."""
    cause = it.failure_kind or "operator"
    t0 = o.clock.monotonic()
    model = o.snap.model
    serving = o.snap.state in (State.READY, State.UNHEALTHY) and o.tree is not None
    phases: dict[str, float] = {}
    o._begin_stop("unload")
    reason = f"unload ({cause}): {it.reason}" if it.reason else f"unload ({cause})"
    if serving and o.traffic is not None:
        drain_s = o.cfg.timeouts.drain_s
        o._set_state(State.STOPPING, reason=reason, phase="drain", deadline=o.clock.time() + drain_s)
        interrupt, result = await o._watch(o._drain())
        if interrupt is not None:  # a shutdown: every command is busy while stopping
            what = interrupt.name if isinstance(interrupt, Cmd) else "daemon shutdown"
            o._reply(it.cmd, error=OperationFailed(f"unload cancelled by {what}"))
            return o._intent_for(interrupt)
        drained, busiest = result
        o.events.emit("drained", ok=drained, max_running=busiest)
        phases["drain"] = round(o.clock.monotonic() - t0, 3)
        o._set_phase("teardown")
    else:
        o._set_state(State.STOPPING, reason=reason, phase="teardown")
    t1 = o.clock.monotonic()
    report = await teardown.teardown(o, reason, grace=o.cfg.timeouts.stop_grace_s)
    phases["stop"] = round(o.clock.monotonic() - t1, 3)
    verify = await teardown.verify_clean(o)
    rel = o._last_release
    problem = (
        verify
        or (None if report.clean else f"debris remains: {teardown.remaining(report)}")
        or (None if rel is None or rel.released else f"GPU memory not released: {rel.reason}")
    )
    if problem:
        o._set_state(
            State.FAILED, reason=f"unload: {problem}", phase=None, pid=None, workers=0, operation=None
        )
        o._reply(it.cmd, error=OperationFailed(f"unloaded, but {problem}"))
        return Intent("exit") if o._exiting else Intent("idle")
    secs = round(o.clock.monotonic() - t0, 3)
    o._set_state(
        State.STOPPED,
        reason="idle" if cause == "idle" else "unloaded",
        phase=None,
        pid=None,
        workers=0,
        operation=None,
        unloaded=None if o._exiting else cause,  # the route holds and posts Demand from here on
    )
    gpu = None if rel is None else teardown.as_dict(rel)
    o.od.record("unloaded", o.metrics, seconds=secs, cause=cause, model=model, phases=phases)
    o._reply(
        it.cmd,
        {"unloaded": True, "model": model, "seconds": secs, "cleanup": report.to_json(), "gpu": gpu},
    )
    return Intent("exit") if o._exiting else Intent("idle")
