"""Teardown and cleanup: the owner's bounded steps that end a tree and clean what it left.

Every function takes the owner (daemon.Supervisor) as an explicit collaborator and runs inside
one of its phases. They act through the host seam and the cleanup engine; what they change of
the owner's state goes through the owner (`_set_phase`, `_retire_generation`, `_tree_gone`):
nothing here writes the snapshot, the tree record or the generation itself. Ledger writes and
cleanup events are said here, never raised (the caller decides what a failure means).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import signal
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from . import cleanup as cleanup_mod
from . import proctree
from .config import TimeoutsConfig
from .gate import Traffic
from .observations import Cmd, OperationFailed
from .watchers import Clock

if TYPE_CHECKING:
    from .daemon import Supervisor

# Stopping a failed server (hung, engine dead, failed reload): its clients' requests will never
# complete, and vLLM 0.32 blocks in "Waiting for connections to close" while they are open, so
# a long grace only delays the restart. stop_grace_s is for operators' stops and reloads.
FAILED_STOP_GRACE_S = 3.0
ORPHAN_GRACE_S = 1.0  # SIGTERM-to-SIGKILL for what is left when the API server died by itself
# The cleanup engine's time beyond its graces: /proc, /dev/shm and /tmp scans and the unlinks
# (0.1 s measured for 1000 segments, bench_cleanup.py); 5 s leaves room for a loaded machine.
SCAN_BOUND_S = 5.0


def cleanup_bound(t: TimeoutsConfig, grace: float) -> float:
    """How long one cleanup-engine run can take: its grace, SIGKILL's wait for the tree,
    the resource tracker's grace and SIGKILL wait, and the scans. A SIGKILL's wait lasts
    kill_wait_s without progress, longer while the killed processes are still exiting
    (cleanup.EXIT_WAIT_S: slow exits on a loaded machine, issue 18)."""
    kill = cleanup_mod.kill_bound(t.kill_wait_s)
    return grace + 2 * kill + cleanup_mod.TRACKER_GRACE_S + SCAN_BOUND_S


def start_extend_s(t: TimeoutsConfig) -> float:
    """systemd's start/reload timeout from a spawn: the readiness deadline, then, if the
    start fails, the bounded teardown of what it left."""
    return t.start_s + FAILED_STOP_GRACE_S + cleanup_bound(t, ORPHAN_GRACE_S)


def as_dict(obj: Any) -> dict[str, Any]:
    """A report (to_json, a dataclass, else its repr) as an event's fields."""
    if hasattr(obj, "to_json"):
        return dict(obj.to_json())
    if hasattr(obj, "__dataclass_fields__"):
        import dataclasses

        return dataclasses.asdict(obj)
    return {"result": repr(obj)}


def remaining(report: cleanup_mod.Report) -> str:
    """What a cleanup left, for a reason line (the first five)."""
    items = report.to_json().get("remaining", [])
    return ", ".join(str(i.get("name") or i.get("pid")) + f" ({i.get('reason')})" for i in items[:5]) or "?"


async def adopt_leftovers(o: Supervisor) -> None:
    """A predecessor killed with SIGKILL left its tree running: remove it before anything."""
    recs = o.ledger.load()
    if not recs:
        return
    pids = sorted({p.pid for r in recs for p in r.procs})
    o.events.emit("leftovers_found", trees=[r.id for r in recs], pids=pids)
    report = await cleanup(o, recs, grace=o.cfg.timeouts.cleanup_grace_s)
    cleanup_event(o, "leftovers", report)
    if report.clean:
        for r in recs:
            ledger_write(o, "remove", r.id)


async def cleanup(
    o: Supervisor, recs: list[proctree.TreeRecord], *, grace: float, **kw: Any
) -> cleanup_mod.Report:
    """The cleanup engine on `recs`, off the loop, with the configured kill wait."""
    return await o.offload(
        cleanup_mod.cleanup,
        recs,
        grace_s=grace,
        kill_wait_s=o.cfg.timeouts.kill_wait_s,
        host=o.host,
        **kw,
    )


async def teardown(o: Supervisor, reason: str, *, grace: float) -> cleanup_mod.Report:
    """The live tree's bounded stop (or, with none, the dead trees' cleanup), under `o._run`."""
    t = o.cfg.timeouts
    bound = grace + cleanup_bound(t, ORPHAN_GRACE_S) + t.gpu_release_s + SCAN_BOUND_S
    return await o._run(_teardown_work(o, reason, grace=grace), bound)


async def _teardown_work(o: Supervisor, reason: str, *, grace: float) -> cleanup_mod.Report:
    """Bounded stop: SIGTERM the API server, wait `grace`, then the cleanup engine kills
    whatever of the tree remains (engine core and workers before the resource_tracker, so
    the tracker unlinks what it registered) and unlinks what is left. Returns its report."""
    tree, t0 = o.tree, o.clock.monotonic()
    if tree is None:
        return await _cleanup_dead_work(o)
    o.events.emit("teardown", reason=reason, grace_s=grace, pids=sorted({p.pid for p in tree.procs}))
    gpu_before = await o.offload(o.gpus.snapshot) if o.gpus is not None else None
    with contextlib.suppress(Exception):  # last look at what it holds
        tree = await o.offload(proctree.refresh, copy.deepcopy(tree), o.host)
    ledger_ok = ledger_write(o, "upsert", replace(tree, ended=True))
    if o.leader is not None and o.leader_status is None:
        o.host.signal(tree.leader.pid, tree.leader.create_time, signal.SIGTERM)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(o._leader_gone.wait(), grace)
        # The API server shuts its engine core and workers down on SIGTERM: give them what
        # is left of the grace to follow it.
        end = t0 + grace
        while o.clock.monotonic() < end:
            if not await o.offload(proctree.live_members, tree, o.host):
                break
            await o.clock.sleep(0.1)
        # The grace is spent: what is left (a server waiting on a hung request, a stopped
        # worker) is SIGKILLed now, as stop_grace_s promises, not given a second grace.
        cleanup_grace = 0.0
    else:
        # The API server died on its own (SIGKILL, crash): nobody will shut the rest down
        # gracefully; an orphaned engine core does not even act on SIGTERM (measured: 5 s
        # and no exit), so waiting only delays the restart.
        cleanup_grace = min(o.cfg.timeouts.cleanup_grace_s, ORPHAN_GRACE_S)
    o._retire_generation()  # everything the old tree still says from here on is stale
    o._set_phase("cleanup")
    report = await cleanup(o, [tree], grace=cleanup_grace)
    extra = {} if ledger_ok else {"ledger": "not written: the next start or `vsup cleanup` may repeat this"}
    cleanup_event(o, "teardown", report, seconds=round(o.clock.monotonic() - t0, 3), **extra)
    rel = None
    if o.gpus is not None:
        rel = await o.offload(
            o.gpus.wait_released,
            {p.pid for p in tree.procs},
            o._gpu_baseline,
            timeout_s=o.cfg.timeouts.gpu_release_s,
            before=gpu_before,
        )
        o.events.emit("gpu_release", **as_dict(rel))
    if report.clean:
        ledger_write(o, "remove", tree.id)
    o._tree_gone(rel)
    return report


async def shutdown_drain(clock: Clock, traffic: Traffic, limit: float) -> tuple[bool, int]:
    """SIGTERM: the proxy already refuses what it has not forwarded; wait up to `limit` for
    the requests in flight to finish. Returns (all finished, how many were left)."""
    end = clock.monotonic() + limit
    while (n := traffic.in_flight()) > 0 and clock.monotonic() < end:
        await clock.sleep(0.05)
    return n == 0, n


async def cleanup_dead(o: Supervisor) -> cleanup_mod.Report:
    """Clean every tree the ledger knows except the live one (if any)."""
    bound = cleanup_bound(o.cfg.timeouts, o.cfg.timeouts.cleanup_grace_s)
    return await o._run(_cleanup_dead_work(o), bound)


async def _cleanup_dead_work(o: Supervisor) -> cleanup_mod.Report:
    recs = [r for r in o.ledger.load() if o.tree is None or r.id != o.tree.id]
    live = [o.tree] if o.tree is not None else []
    report = await cleanup(o, recs, grace=o.cfg.timeouts.cleanup_grace_s, live=live)
    if recs or report.killed or report.unlinked:
        cleanup_event(o, "pre-start" if not live else "dead-trees", report)
    if report.clean:
        for r in recs:
            ledger_write(o, "remove", r.id)
    return report


async def cmd_cleanup(o: Supervisor, cmd: Cmd) -> None:
    """`vsup cleanup`: dead trees' debris (and, asked, orphans); never the live tree."""
    a = cmd.args
    t = o.cfg.timeouts
    bound = cleanup_bound(t, t.cleanup_grace_s) + t.gpu_release_s
    try:
        result = await o._run(_cmd_cleanup_work(o, a), bound)
    except Exception as e:  # noqa: BLE001 - the operator gets the error as the reply
        cmd.reply(error=OperationFailed(f"cleanup failed: {type(e).__name__}: {e}"))
        return
    cmd.reply(result)


async def _cmd_cleanup_work(o: Supervisor, a: dict[str, Any]) -> dict[str, Any]:
    recs = [r for r in o.ledger.load() if o.tree is None or r.id != o.tree.id]
    live = [o.tree] if o.tree is not None else []
    dry = bool(a.get("dry_run"))
    before = await o.offload(o.gpus.snapshot) if o.gpus is not None else None
    report = await cleanup(
        o,
        recs,
        grace=o.cfg.timeouts.cleanup_grace_s,
        live=live,
        foreign=bool(a.get("foreign")),
        all_users=bool(a.get("all_users")),
        dry_run=dry,
    )
    gpu_freed = None
    if o.gpus is not None and not dry:
        from . import gpu

        killed = {k["pid"] for k in report.killed}
        timeout = o.cfg.timeouts.gpu_release_s
        gpu_freed = await o.offload(gpu.cleanup_summary, o.gpus, killed, before, timeout_s=timeout)
    if not dry:
        cleanup_event(o, "operator", report)
        if report.clean:
            for r in recs:
                ledger_write(o, "remove", r.id)
    return {**report.to_json(), **({"gpu": gpu_freed} if gpu_freed else {})}


async def verify_clean(o: Supervisor) -> str | None:
    """Prove the machine is clean before a new model: port free, no tree process left."""
    holder = cleanup_mod.port_holder(o.cfg.vllm.port, o.host)
    if holder is not None:
        return f"port {o.cfg.vllm.port} still held by pid {holder.get('pid')} ({holder.get('name')})"
    leftovers = o.ledger.load()
    if leftovers:
        return f"ledger still lists trees {[r.id for r in leftovers]}"
    return None


def cleanup_event(o: Supervisor, why: str, report: cleanup_mod.Report, **extra: Any) -> None:
    j = report.to_json()
    o.events.emit(
        "cleanup",
        why=why,
        killed=j["killed"],
        unlinked=len(j["unlinked"]),
        removed_files=len(j["removed_files"]),
        bytes_freed=j["bytes_freed"],
        remaining=j["remaining"],
        skipped=len(j["skipped"]),
        **extra,
    )
    if o.metrics is not None:
        o.metrics.cleanup(len(j["killed"]), len(j["unlinked"]), j["bytes_freed"])


def ledger_refresh(o: Supervisor, before: proctree.TreeRecord, rec: proctree.TreeRecord) -> None:
    """A refresher's new look at a recorded tree goes to the ledger when the tree grew (members,
    shm objects, files): what a later cleanup must find."""
    counts = (len(rec.procs), len(rec.ipc), len(rec.files))
    if counts != (len(before.procs), len(before.ipc), len(before.files)):
        ledger_write(o, "upsert", rec)


def ledger_write(o: Supervisor, op: str, arg: proctree.TreeRecord | str) -> bool:
    """A ledger write (`upsert` a record, `remove` a tree id) that fails (a full disk) is said,
    never raised: the caller decides."""
    try:
        if isinstance(arg, proctree.TreeRecord):
            o.ledger.upsert(arg)
        else:
            o.ledger.remove(arg)
    except (OSError, ValueError) as e:
        tree = arg.id if isinstance(arg, proctree.TreeRecord) else arg
        o.events.emit("ledger_write_failed", op=op, tree=tree, error=f"{type(e).__name__}: {e}")
        return False
    return True
