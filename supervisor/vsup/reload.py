"""Reload: swap the served model (an operator's reload or restart, a swap on request).

Drain (bounded), stop, clean and prove the machine clean, start the new model; if it fails,
clean what it left and roll back to the model that was serving. A command or shutdown that the
state accepts cancels the reload between steps. `reload` is one of the owner's phases and takes
the owner as an explicit collaborator: config, model, state and phases change through its
`_use`, `_set_state`, `_set_phase` and `_publish`; it returns the owner's next intent.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

from . import detection, overlapped, teardown
from .config import Config
from .observations import Cmd, Intent, OperationFailed, Shutdown
from .states import State
from .teardown import FAILED_STOP_GRACE_S

if TYPE_CHECKING:
    from .daemon import Supervisor


async def reload(o: Supervisor, it: Intent) -> Intent:
    cmd = it.cmd
    if cmd is not None and isinstance(cmd.args.get("cfg"), Config):
        o._use(cfg=cmd.args["cfg"])  # reload --current: the config read when it was accepted
    new, old = it.spec or o.spec, o.spec
    serving = o.snap.state in (State.READY, State.UNHEALTHY) and o.tree is not None
    if o.snap.state == State.READY and o.tree is not None and o.leader_status is None:
        # Issue 23: start the new server beside the serving one when both fit; otherwise (and
        # the events say why) the sequential reload below.
        fit = await overlapped.fits(o, new)
        if fit is not None and fit.ok:
            return await overlapped.reload(o, it, new, old, fit)
    t0 = o.clock.monotonic()
    phases: dict[str, float] = {}
    if o.notifier is not None:
        o.notifier.reloading()
    o._set_state(
        State.RELOADING,
        reason=f"{it.reason}: {old.name} -> {new.name}",
        phase="drain" if serving else "stop",
        operation=cmd.name if cmd else None,
    )

    async def phase(name: str) -> None:
        phases[name] = o.clock.monotonic()
        o._set_phase(name)
        if o.metrics is not None:
            o.metrics.reload_phase(name)
        if cmd is not None and cmd.request is not None:
            with contextlib.suppress(Exception):  # a client gone away does not stop the reload
                await cmd.request.progress(phase=name, elapsed_s=round(o.clock.monotonic() - t0, 2))

    def done(name: str) -> None:
        dur = round(o.clock.monotonic() - phases[name], 3)
        o.events.emit("reload_phase", phase=name, seconds=dur)
        if o.metrics is not None:
            o.metrics.reload_phase_done(name, dur)

    def cancelled(obs: Cmd | Shutdown) -> Intent:
        what = obs.name if isinstance(obs, Cmd) else "daemon shutdown"
        o._reply(cmd, error=OperationFailed(f"reload cancelled by {what}"))
        return o._intent_for(obs)

    if serving:
        await phase("drain")
        interrupt, result = await o._watch(o._drain())
        if interrupt is not None:
            return cancelled(interrupt)
        done("drain")
        drained, busiest = result
        o.events.emit("drained", ok=drained, max_running=busiest)
    await phase("stop")
    report = await teardown.teardown(o, it.reason or "reload", grace=o.cfg.timeouts.stop_grace_s)
    done("stop")
    if (obs := o._poll_interrupt()) is not None:
        return cancelled(obs)
    await phase("cleanup")
    verify = await teardown.verify_clean(o)
    done("cleanup")
    if not (report.clean and verify is None):
        msg = verify or f"debris remains: {teardown.remaining(report)}"
        o._set_state(State.FAILED, reason=f"reload aborted: {msg}", phase=None)
        o._reply(cmd, error=OperationFailed(msg))
        return Intent("idle")
    if new.model != old.model:
        o.policy.new_model()
    o._use(spec=new)
    await phase("start")
    ok, detail, kind, obs = await o._start_tree(new, it.reason or "reload", in_reload=True)
    done("start")
    if obs is not None:
        return cancelled(obs)
    if ok:
        o._serving(new, f"{it.reason}: serving {new.name}")
        o.od.done("swapped", o.metrics)
        phase_at = {k: round(v - t0, 3) for k, v in phases.items()}
        o._reply(cmd, {"model": new.name, "seconds": round(o.clock.monotonic() - t0, 3), "phases": phase_at})
        o.policy.operator_acted()
        return Intent("serve")
    # Clean what the new model left; roll back to the previous model if it was serving.
    if it.failure_kind == "swap":  # not tried again while its held requests could still wait
        o.od.swap_failed_for(new.served_model_name or new.name, detail)
    lines, tree = o.log.since_spawn(), o.tree
    await phase("rollback" if serving else "teardown")
    report = await teardown.teardown(o, f"reload of {new.name} failed", grace=FAILED_STOP_GRACE_S)
    detection.record_incident(o, detail, kind, lines, tree, report)
    msg = f"reload to {new.name} failed: {detail}"
    if not serving:
        o._set_state(State.FAILED, reason=msg, phase=None, operation=None)
        o._reply(cmd, error=OperationFailed(msg))
        return Intent("idle")
    o._use(spec=old)
    if new.model != old.model:
        o.policy.new_model()
    ok2, detail2, _, obs2 = await o._start_tree(old, "rollback", in_reload=True)
    done("rollback")
    if ok2:
        o._serving(old, f"rolled back to {old.name} after: {detail}")
        o._reply(cmd, error=OperationFailed(msg + f"; rolled back, {old.name} serves again"))
        return Intent("serve")
    o._reply(cmd, error=OperationFailed(msg + f"; rollback to {old.name} failed too: {detail2}"))
    if obs2 is not None:
        return o._intent_for(obs2)
    o._begin_stop("failed")
    o._set_state(State.STOPPING, reason=f"rollback failed: {detail2}", phase="teardown", operation=None)
    await teardown.teardown(o, "rollback failed", grace=FAILED_STOP_GRACE_S)
    o._set_state(State.FAILED, reason=f"{msg}; rollback failed: {detail2}", phase=None)
    return Intent("idle")
