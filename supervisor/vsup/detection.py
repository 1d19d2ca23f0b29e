"""Detection: what the owner makes of what it observes while a server serves.

`serve` is the serve phase: log signatures, probe results and the proxy's reports become
strikes; enough independent strikes (not canary timeouts alone while tokens are still being
generated) confirm a hang and hand the owner a `recover` intent. A fatal log line or an exit
recovers at once. `detected` records one detection (event, status, metrics); `root_cause` adds
the log's diagnosis to a reason; `record_stacks` and `record_incident` keep the forensics of a
failed tree. Each takes the owner as an explicit collaborator: state changes go through its
`_set_state`/`_publish`, decisions come back as intents.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from . import cleanup as cleanup_mod
from . import incidents, launch, policy, proctree, stacks, watchers
from .gate import Demand, UpstreamRefused, UpstreamStalled
from .inbox import HEARTBEAT_S
from .observations import Cmd, Exited, HangEvidence, Intent, LogSignal, Probe, Shutdown
from .ondemand import iso
from .probes import ProbeResult
from .states import State
from .watchers import FATAL_KINDS, STRIKE_KINDS

if TYPE_CHECKING:
    from .daemon import Supervisor


async def serve(o: Supervisor, it: Intent) -> Intent:
    if o.snap.state != State.READY:
        o._set_state(State.READY, reason="canary completion served", phase=None)
    o.events.emit("ready", model=o.snap.model, remedies=[r.name for r in o.policy.remedies()])
    gen, p = o.gen, o.cfg.probes
    probe_task = probe(o, gen, confirm=False)
    sample = sampler(o)
    strikes = policy.Strikes(p.confirm, can_sample=sample is not None)
    check_task: asyncio.Task[Any] | None = None
    stable_at = o.clock.monotonic() + o.cfg.restart.stable_s
    od_check = 0.0  # the next look at the proxy's view for an off-load or a swap (issue 16)
    try:
        while True:
            obs = await o._next(HEARTBEAT_S)
            now = o.clock.monotonic()
            if stable_at and now >= stable_at and o.snap.state == State.READY:
                # Served long enough: the next failure is a new story, not part of a crash loop.
                stable_at = 0
                if forgotten := o.policy.stable():
                    o.events.emit("stable", failures_forgotten=forgotten)
            if isinstance(obs, Demand) or now >= od_check:  # issue 16: once a heartbeat
                od_check = now + HEARTBEAT_S
                if (nxt := _offload_due(o)) is not None:
                    return nxt
            if obs is None:
                continue
            if isinstance(obs, Exited):
                await o.log.catch_up()
                reason = root_cause(o.log.since_spawn(), f"server exited with status {obs.status}")
                return Intent("recover", reason=reason, failure_kind="exited")
            if isinstance(obs, (Cmd, Shutdown)):
                return o._intent_for(obs)
            if isinstance(obs, LogSignal):
                if obs.kind in FATAL_KINDS:
                    detected(o, obs)
                    kind = "engine_dead" if obs.kind in ("worker_died", "engine_dead") else obs.kind
                    return Intent(
                        "recover", reason=root_cause(o.log.since_spawn(), obs.message), failure_kind=kind
                    )
                if obs.kind not in STRIKE_KINDS:
                    continue
                if o._ready_at is not None and now - o._ready_at < p.startup_grace_s:
                    o.events.emit("stall_during_startup", message=obs.message, note="startup_grace_s")
                    continue
                detected(o, obs)
                what = f"log: {obs.message[:120]}"
            elif isinstance(obs, Probe):
                r = obs.result
                healed = None
                if r.probe == "metrics" and r.ok and r.data.get("progressed"):
                    if (step := strikes.progress()).action == "clear":
                        healed = step.why
                elif r.ok and r.probe == "canary" and o.snap.state == State.UNHEALTHY:
                    strikes.clear()
                    healed = r.detail
                if healed is not None:
                    if check_task is not None:
                        check_task.cancel()
                    if o.snap.state == State.UNHEALTHY:
                        o._set_state(State.READY, reason=f"recovered: {healed}")
                        probe_task.cancel()  # back to the periodic probes, their canary skipped under traffic
                        probe_task = probe(o, gen, confirm=False)
                    continue
                if r.ok:
                    continue
                detected(o, r)
                what = f"{r.probe}: {r.detail}"
            elif isinstance(obs, UpstreamStalled):
                # every stream in flight waited without a byte: one strike, like a canary
                detected(o, ProbeResult("proxy_stall", False, obs.detail))
                what = f"proxy: {obs.detail}"
            elif isinstance(obs, HangEvidence):
                if obs.gen != gen or not strikes.checking:
                    continue  # another tree's, or a check the server's recovery made moot
                check_task = None
                j = policy.judge_hang(obs.first, obs.second, obs.tokens_before, obs.tokens_after, obs.gap_s)
                o.events.emit(
                    "hang_check",
                    verdict=j.verdict,
                    why=j.why,
                    strike=obs.strike,
                    seconds=round(obs.seconds, 2),
                )
                step = strikes.judged(now, j)
                if step.action == "clear" and o.snap.state == State.UNHEALTHY:
                    o._set_state(State.READY, reason=f"recovered: {j.why}")
                    probe_task.cancel()
                    probe_task = probe(o, gen, confirm=False)
                elif step.action == "confirm":
                    # the proof's second sample is the incident's stacks: no second dump
                    proof = obs.second if j.verdict == "hang" else None
                    return Intent("recover", reason=strikes.reason(), failure_kind="hang", stacks=proof)
                continue
            elif isinstance(obs, UpstreamRefused):
                # the route said ready but the upstream refused: look at health now
                o.events.emit("upstream_refused", detail=obs.detail)
                o._spawn_task(watchers.health_once(gen, o.make_prober(o._tree_cfg(), o.spec), o.post))
                continue
            else:
                continue
            step = strikes.strike(now, what)
            if o.snap.state == State.READY:
                o._set_state(State.UNHEALTHY, reason=what)
                probe_task.cancel()
                probe_task = probe(o, gen, confirm=True)
            if step.action == "check" and sample is not None:
                # Issue 17: proof before a teardown (policy.judge_hang), not a second strike
                prober = o.make_prober(o._tree_cfg(), o.spec)
                check_task = o._spawn_task(watchers.hang_check(gen, what, prober, sample, o.post, o.clock))
            elif step.action == "confirm":
                return Intent("recover", reason=strikes.reason(), failure_kind="hang")
    finally:
        probe_task.cancel()
        if check_task is not None:
            check_task.cancel()


def _offload_due(o: Supervisor) -> Intent | None:
    return o.od.due(
        o.cfg, o.traffic, state=o.snap.state, loaded=o.snap.model, ready_at=o._ready_at, gen=o.gen
    )


def probe(o: Supervisor, gen: int, *, confirm: bool) -> asyncio.Task[Any]:
    prober = o.make_prober(o._tree_cfg(), o.spec)
    tr = o.traffic
    if tr is None:
        return o._spawn_task(watchers.probe_loop(gen, o.spec, o.cfg, prober, o.post, o.clock, confirm))

    def quiet() -> bool:
        """No request in flight through the proxy, none arrived or ended for a canary interval
        (back-to-back requests leave gaps of milliseconds with none in flight)."""
        last = tr.last_activity_at()
        lull = o.cfg.probes.canary_interval_s or o.cfg.probes.interval_s
        return tr.in_flight(gen) == 0 and (last is None or o.clock.monotonic() - last > lull)

    return o._spawn_task(
        watchers.probe_loop(
            gen,
            o.spec,
            o.cfg,
            prober,
            o.post,
            o.clock,
            confirm,
            tr.last_success_at,
            quiet,
            lambda: tr.in_flight(gen),
        )
    )


def sampler(o: Supervisor) -> watchers.Sampler | None:
    """The stack sampler a hang check uses: py-spy, which reads without changing anything, where
    ptrace is allowed (stacks.choose); None otherwise (faulthandler kills what it dumps), and
    strikes then confirm by their count."""
    d = o.cfg.daemon
    try:
        choice = stacks.choose(o.host, preference=d.stacks, may_kill=False, py_spy=d.py_spy)
    except Exception as e:  # noqa: BLE001 - a host that cannot say must not stop supervision: no checks
        o.events.emit("stacks_failed", error=f"choosing the hang check's sampler: {type(e).__name__}: {e}")
        return None
    if choice.mechanism != stacks.PY_SPY:
        return None

    async def sample(cpu_window_s: float) -> dict[str, Any] | None:
        tree = o.tree
        if tree is None:
            return None
        budget = o.cfg.timeouts.stacks_s
        r = await stacks.collect(tree, o.host, budget_s=budget, mechanism=choice, cpu_window_s=cpu_window_s)
        return r.to_json()

    return sample


def detected(o: Supervisor, what: LogSignal | ProbeResult) -> None:
    """One detection: status's last_detection, an event, the metrics."""
    info: dict[str, Any]
    if isinstance(what, LogSignal):
        info = {
            "source": "log",
            "kind": what.kind,
            "signature": what.sig_id,
            "message": what.message,
            "process": what.process,
            "log_pid": what.pid,
            "latency_s": round(o.clock.monotonic() - what.at, 3),
        }
    else:
        info = {"source": "probe", "kind": what.probe, "message": what.detail}
    o._publish(last_detection={**info, "at": iso(o.clock.time())})
    o.events.emit("detection", **info)
    if o.metrics is not None:
        o.metrics.detection(info["kind"], info.get("latency_s", 0.0))


def root_cause(lines: list[str], fallback: str) -> str:
    """`fallback`, with the root cause the tree's log lines name (diagnose.py) when there is one."""
    try:
        from . import diagnose

        d = diagnose.analyze(lines)
        if d.root_cause and d.root_cause.strip() != fallback.strip():
            return f"{fallback}; root cause: {d.root_cause}"
    except Exception:  # noqa: BLE001 - the root cause is a bonus; the reason stands without it
        return fallback
    return fallback


async def record_stacks(
    o: Supervisor, tree: proctree.TreeRecord, proof: dict[str, Any] | None = None
) -> dict[str, Any] | None:
    """Stacks and facts of every process of a hung tree (stacks.py), within timeouts.stacks_s:
    py-spy where ptrace is allowed, else faulthandler (SIGABRT: the tree dies anyway). `proof`:
    the stack check's second sample that confirmed the hang, taken seconds ago of the same hung
    tree; it is the record, and the teardown does not wait for another dump."""
    if proof is not None:
        o.events.emit(
            "stacks",
            mechanism=proof.get("mechanism"),
            reason="the hang check's second sample",
            seconds=0.0,
            complete=bool(proof.get("complete")),
            processes={p.get("label"): p.get("state") for p in proof.get("processes") or []},
        )
        return proof
    budget = o.cfg.timeouts.stacks_s
    d = o.cfg.daemon
    work = stacks.collect(
        tree,
        o.host,
        budget_s=budget,
        mechanism=d.stacks,
        may_kill=True,
        faulthandler_env=launch.faulthandler_env(o.cfg),
        log_path=o.cfg.vllm.log_file,
        py_spy=d.py_spy,
    )
    try:
        r = await o._run(work, budget + 1.0)
    except Exception as e:  # noqa: BLE001 - forensics must never stop the recovery
        o.events.emit("stacks_failed", error=f"{type(e).__name__}: {e}")
        return None
    out = r.to_json()
    o.events.emit(
        "stacks",
        mechanism=r.mechanism,
        reason=r.reason,
        seconds=round(r.elapsed_s, 3),
        complete=r.complete,
        processes={p.label: p.state for p in r.processes},
    )
    return out


def record_incident(
    o: Supervisor,
    reason: str,
    kind: str | None,
    lines: list[str],
    tree: proctree.TreeRecord | None,
    report: cleanup_mod.Report,
    stacks: dict[str, Any] | None = None,
) -> None:
    """Write the incident bundle of a failed tree and announce it as an event."""
    try:
        bundle = incidents.write_bundle(
            o.cfg,
            reason=reason,
            kind=kind or "reload_failed",
            lines=lines,
            tree=tree,
            events=list(o.events.recent),
            cleanup=report.to_json(),
            vllm_version=o.vllm_version,
            stacks=stacks,
        )
    except OSError as e:  # a full disk must not turn a recovery into a crash
        o.events.emit("incident_not_written", kind=kind, error=f"{type(e).__name__}: {e}")
        return
    if bundle is None:  # refused to write into a directory it cannot trust
        o.events.emit("incident_not_written", kind=kind, error="incidents directory refused")
        return
    o.events.emit("incident", path=str(bundle), kind=kind)
