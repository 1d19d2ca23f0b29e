"""The recover phase of the owner (daemon.py): a failed tree is torn down and cleaned, the
incident recorded, and after the restart policy's backoff (policy.py) it starts again, or the
server ends `failed` when the failures come too fast. State changes go through the owner's
setters, as in the other phase modules."""

from __future__ import annotations

from typing import TYPE_CHECKING

from . import detection, teardown
from .observations import Cmd, Intent, Shutdown
from .states import State
from .teardown import FAILED_STOP_GRACE_S

if TYPE_CHECKING:
    from .daemon import Supervisor


async def recover(o: Supervisor, it: Intent) -> Intent:
    """The recover phase: stacks first for a hang, teardown, incident, the policy's verdict
    (remedy, give up, delay), then the backoff, during which a command or shutdown wins."""
    reason, kind = it.reason or "failure", it.failure_kind or "failure"
    served, lines, tree = o.log.served, o.log.since_spawn(), o.tree
    o._stopping_for = "restart"
    dump = None
    if kind == "hang" and tree is not None and o.cfg.daemon.stacks != "off":
        # Issue 17: where every rank waited dies with the tree: record it first, bounded.
        o._set_state(State.STOPPING, reason=reason, phase="stacks")
        dump = await detection.record_stacks(o, tree, it.stacks)
        o._set_phase("teardown")
    else:
        o._set_state(State.STOPPING, reason=reason, phase="teardown")
    report = await teardown.teardown(o, reason, grace=min(FAILED_STOP_GRACE_S, o.cfg.timeouts.stop_grace_s))
    detection.record_incident(o, reason, kind, lines, tree, report, stacks=dump)
    tp_args = [*o.cfg.vllm.args, *o.spec.args]
    v = o.policy.failed(o.clock.monotonic(), kind, served=served, tp_args=tp_args)
    if v.remedy is not None:
        o._publish(remedies=tuple(r.name for r in o.policy.remedies()))
        o.events.emit(
            "remedy_applied",
            remedy=v.remedy.name,
            args=v.remedy.args,
            env=v.remedy.env,
            failure_kind=kind,
            level=o.policy.remedy_level,
        )
    if v.give_up:
        window = o.cfg.restart.window_s
        why = f"{v.failures} failures within {window:g}s; last: {reason}"
        o._set_state(State.FAILED, reason=why, phase=None, pid=None)
        return Intent("idle")
    if (interrupt := o._poll_interrupt()) is not None:
        o._set_state(State.STARTING, reason=f"restart after: {reason}", phase="backoff", pid=None)
        return o._intent_for(interrupt)
    o._set_state(
        State.STARTING,
        reason=f"restart after: {reason}",
        phase="backoff",
        deadline=o.clock.time() + v.delay_s,
        pid=None,
    )
    o.events.emit("backoff", delay_s=v.delay_s, failures=v.failures)
    end = o.clock.monotonic() + v.delay_s
    while (obs := await o._next(end - o.clock.monotonic())) is not None:
        if isinstance(obs, (Cmd, Shutdown)):
            return o._intent_for(obs)
    o._publish(restarts=o.snap.restarts + 1)
    if o.metrics is not None:
        o.metrics.restart(kind)
    return Intent("start", o.spec, reason=f"automatic restart {o.snap.restarts} after {kind}")
