"""The owner's state, read: the proxy's route, `vsup status` and the STATUS= line.

Pure reads of the Supervisor (daemon.py), which calls them from `_publish` and its `status`
handlers; nothing here writes state. Kept apart so daemon.py stays the lifecycle (issue 14)."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

from . import overlapped
from .gate import Route
from .states import Snapshot, State

if TYPE_CHECKING:
    from .daemon import Supervisor


def route(o: Supervisor) -> Route:
    """Where the proxy sends a request now, or whether it holds or refuses it."""
    s, v = o.snap, o.cfg.vllm
    if o._exiting:
        # Shutting down (issue 18): the proxy refuses what it has not forwarded yet, held or
        # new, at once; requests in flight finish during the shutdown drain.
        return Route(state=str(s.state), reason=s.reason or "shutting down", closing=True, model=s.model)
    if s.state == State.RELOADING and o.overlap is not None:
        # Issue 23: the old server serves until the new one is proven, then the new one;
        # while neither can (the old one went down), requests are held.
        up = overlapped.upstream(o)
        return Route(
            state=str(s.state),
            reason=s.reason,
            upstream=up[0] if up else None,
            gen=up[1] if up else 0,
            hold=True,
            model=s.model,
        )
    ready = s.state == State.READY and o.tree is not None
    # Off-loaded (issue 16): stopped, but a request loads the model again: hold it.
    idle = s.state == State.STOPPED and o._unloaded is not None
    if s.state in (State.FAILED, State.STOPPED):
        hold = idle  # otherwise nothing is coming until an operator acts
    elif s.state == State.STOPPING:
        hold = o._stopping_for in ("restart", "unload")
    else:
        hold = not ready  # starting, reloading, unhealthy: a server is (again) coming
    return Route(
        state=str(s.state),
        reason=s.reason,
        upstream=(v.host, o._port()) if ready else None,
        gen=o.gen if ready else 0,
        hold=hold,
        model=s.model,
        idle=idle,
    )


def status_line(s: Snapshot) -> str:
    """systemd's STATUS= line (and the pod's): state, phase, model, workers, restarts."""
    head = f"{s.state}" + (f" ({s.phase})" if s.phase else "")
    bits = [b for b in (s.model, f"{s.workers} workers" if s.workers else None) if b]
    bits.append(f"{s.restarts} restarts")
    line = f"{head}: {', '.join(bits)}"
    if s.reason and s.state in (State.FAILED, State.UNHEALTHY, State.STOPPING):
        line += f" - {s.reason}"
    return line[:200]


def status(o: Supervisor) -> dict[str, Any]:
    """What `vsup status` answers: the snapshot, the tree, GPUs, traffic, on-demand, overlap."""
    out = o.snap.to_json()
    out["vllm_version"] = o.vllm_version
    out["tree"] = None
    if o.tree is not None:
        pids = sorted({p.pid for p in o.tree.procs})
        out["tree"] = {"id": o.tree.id, "sid": o.tree.sid, "pids": pids}
    if o.gpus is not None:
        from . import gpu

        pids_set = {p.pid for p in o.tree.procs} if o.tree else set()
        with contextlib.suppress(Exception):
            # Other vsup instances on this host, named where they hold a GPU (issue 18).
            instances, wanted = gpu.neighbours(o.gpus, o.cfg)
            out["gpus"] = gpu.status_summary(o.gpus, pids_set, instances=instances, wanted=wanted)
    if o.traffic is not None:
        with contextlib.suppress(Exception):  # the proxy's failure must not break status
            out["traffic"] = o.traffic.stats()
    if o.cfg.proxy is not None or o.od.counts["last"] is not None:
        out["on_demand"] = o.od.status(o._unloaded)
    if o.overlap is not None:  # issue 23: both trees, and which one serves
        out["overlap"] = o.overlap.to_json(o)
    return out
