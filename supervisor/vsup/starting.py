"""Start a tree: pre-start cleanup, the checks that what is in the way is not ours, the spawn,
and the wait for proven readiness; and the refresher that looks at the tree while it lives.

`start_tree` runs inside one of the owner's phases (start, reload, rollback) and takes the owner
as an explicit collaborator: state and phases change through its `_set_state`/`_set_phase`/
`_publish`, a new tree and generation through `_begin_generation`/`_hold_tree`/`_mark_ready`.
It returns what happened; the phase decides what follows.
"""

from __future__ import annotations

import contextlib
import copy
import functools
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from . import cleanup as cleanup_mod
from . import detection, launch, proctree, teardown, watchers
from .config import ModelConfig
from .observations import Cmd, Exited, LogSignal, NotReady, ReadyProven, Shutdown, TreeSeen
from .states import State
from .watchers import FATAL_KINDS, STRIKE_KINDS

if TYPE_CHECKING:
    from .daemon import Supervisor
    from .gpu import Gpus
    from .metrics import Metrics

# Tree record refresh (new members, held shm): often while the tree forms (engine core, workers
# and segments all exist before the first completion), then rarely: a refresh costs ~6 ms of
# /proc reading plus a 3 ms scan for the live workers, most of an idle daemon's CPU at 2 s, and
# 0.067 % of a core at 15 s (measured, issue 17: more than the 4 s canary). A teardown refreshes
# the record once more before it kills, so a slower settled pace loses nothing it cleans; the
# tree's GPU memory gauges follow this pace.
REFRESH_S = 2.0
REFRESH_SETTLED_S = 60.0
REFRESH_AFTER_READY_S = 20.0


class Started(NamedTuple):
    """How a start ended: ready, or why not (the failure kind the restart policy reads), or the
    command or shutdown that interrupted it."""

    ok: bool
    detail: str
    kind: str | None
    interrupt: Cmd | Shutdown | None


async def start_tree(
    o: Supervisor, spec: ModelConfig, reason: str, *, in_reload: bool, port: int | None = None
) -> Started:
    """Pre-clean, spawn, prove ready. `port`: an overlapped reload's new tree (issue 23), on
    that port and with a TMPDIR of its own, beside the old tree, which serves meanwhile: no GPU
    pre-check (the old tree holds GPU memory; overlap.py showed both fit) and no log rotation
    (the old tree still appends to the log)."""
    t = o.cfg.timeouts
    beside = port is not None
    port = port if port is not None else o.cfg.vllm.port
    served = spec.served_model_name or spec.name
    if not in_reload:
        o._set_state(
            State.STARTING, reason=reason, phase="cleanup", model=served, model_path=spec.model, pid=None
        )
    else:
        o._set_phase("cleanup")
    # Beside a serving tree (issue 23) the ledger's other record is that live tree, not debris:
    # the dead trees' cleanup ran before it started and runs again after the overlap.
    report = cleanup_mod.Report() if beside else await teardown.cleanup_dead(o)
    if not report.clean:
        return Started(False, f"pre-start cleanup left debris: {teardown.remaining(report)}", "cleanup", None)
    if (interrupt := o._poll_interrupt()) is not None:
        return Started(False, "interrupted", None, interrupt)
    holder = cleanup_mod.port_holder(port, o.host)
    if holder is not None:
        detail = (
            f"port {port} is held by pid {holder.get('pid')} "
            f"({holder.get('name')}, user {holder.get('user')}): not ours, not touched"
        )
        return Started(False, detail, "port_busy", None)
    baseline = None
    if o.gpus is not None and not beside:
        # Every process of ours is gone by now: whoever still holds GPU memory is someone
        # else's, and starting beside it would fail (or OOM) later, in a worse place.
        # Only the GPUs this instance wants; a holder that is another vsup instance's tree is
        # named by that instance (issue 18).
        from . import gpu

        instances, wanted = await o.offload(gpu.neighbours, o.gpus, o.cfg)
        pre = await o.offload(functools.partial(o.gpus.precheck, set(), indices=wanted, instances=instances))
        if not pre.ok:
            o.events.emit("gpu_precheck", ok=False, reason=pre.reason)
            return Started(False, f"GPU pre-start check: {pre.reason}", "gpu_busy", None)
        baseline = o.gpus.baseline()
    argv, env = launch.command(o.cfg, spec, o.policy.remedies(), port=port if beside else None)
    log_path = Path(o.cfg.vllm.log_file)
    if not beside and launch.rotate_log(log_path):
        o.events.emit("log_rotated", path=str(log_path))
    o._begin_generation(baseline)
    try:
        own_tmp = {"private_tmp": True} if beside else {}
        spawned = o.spawner.spawn(argv, env, log_path, model=spec.model, port=port, **own_tmp)
    except OSError as e:
        return Started(False, f"cannot start {argv[0]}: {e.strerror or e}", "spawn", None)
    o._hold_tree(spawned)
    if not teardown.ledger_write(o, "upsert", spawned.tree):
        # Never leave a tree running that the ledger does not know: kill it now.
        report = await teardown.cleanup(o, [spawned.tree], grace=0.0)
        teardown.cleanup_event(o, "unrecorded", report)
        o._hold_tree(None)
        return Started(False, "cannot record the tree in the ledger: killed it at once", "ledger", None)
    o._publish(pid=spawned.pid, workers=0)
    nice: int | None = tree_nice(o)
    if nice:  # before vLLM forks its engine and workers (seconds of imports from now)
        ok = o.host.set_nice(spawned.pid, nice) is not None
        ok = o.host.autogroup_nice(spawned.pid, nice) is not None or ok
        nice = nice if ok else None  # None: it could not be set (gone, or below 0 unprivileged)
    o.events.emit(
        "spawned",
        argv=launch.redact_argv(argv),
        log_file=o.cfg.vllm.log_file,
        sid=spawned.tree.sid,
        tree=spawned.tree.id,
        files=list(spawned.tree.files),
        remedies=[r.name for r in o.policy.remedies()],
        nice=nice,
    )
    if o.overlap is not None:  # loading beside a serving tree: its CPU cap, before vLLM forks
        from . import overlapped  # overlapped imports this module

        overlapped.spawned(o, spawned)
    gen = o.gen
    o._spawn_task(refresher(o, gen))
    deadline_mono = o.clock.monotonic() + t.start_s
    if in_reload:
        o._set_phase("ready", deadline=o.clock.time() + t.start_s)
    else:
        o._set_state(
            State.STARTING,
            reason=reason,
            phase="readiness",
            deadline=o.clock.time() + t.start_s,
            model=served,
            model_path=spec.model,
            pid=spawned.pid,
        )
    if o.notifier is not None:
        o.notifier.extend_timeout(int(teardown.start_extend_s(t) * 1e6))
    prober = o.make_prober(o._tree_cfg(), o.spec)
    ready_task = o._spawn_task(watchers.readiness(gen, spec, o.cfg, prober, o.post, o.events.emit))
    try:
        while True:
            obs = await o._next(deadline_mono - o.clock.monotonic())
            if obs is None:
                return Started(
                    False,
                    detection.root_cause(o.log.since_spawn(), f"not ready within {t.start_s:g}s"),
                    "start_timeout",
                    None,
                )
            if isinstance(obs, ReadyProven):
                o._mark_ready()
                return Started(True, "ready", None, None)
            if isinstance(obs, NotReady):
                await o.log.settle()  # a 500 answers before the traceback is logged
                return Started(
                    False, detection.root_cause(o.log.since_spawn(), obs.detail), "engine_dead", None
                )
            if isinstance(obs, Exited):
                await o.log.catch_up()
                detail = detection.root_cause(
                    o.log.since_spawn(), f"server exited with status {obs.status} before ready"
                )
                return Started(False, detail, "exited", None)
            if isinstance(obs, LogSignal):
                if obs.kind in FATAL_KINDS:
                    detection.detected(o, obs)
                    kind = "engine_dead" if obs.kind in ("worker_died", "engine_dead") else obs.kind
                    await o.log.settle()  # the traceback with the real cause follows
                    return Started(False, detection.root_cause(o.log.since_spawn(), obs.message), kind, None)
                if obs.kind in STRIKE_KINDS:
                    # Long compilation/weight loading logs the same stall line: before
                    # ready it is a warning, never a failure (gpustack#3888).
                    o.events.emit(
                        "stall_during_startup",
                        message=obs.message,
                        note="start-up work; not acted on before ready",
                    )
                continue
            if isinstance(obs, (Cmd, Shutdown)):
                return Started(False, "interrupted", None, obs)
            # probes of a server not yet ready, proxy reports: nothing to act on yet
    finally:
        ready_task.cancel()


def _tree_of(o: Supervisor, gen: int) -> tuple[proctree.TreeRecord | None, float | None]:
    """The tree of generation `gen` and when it became ready: the live one, or the old one an
    overlapped reload set aside (issue 23: it is refreshed on, so a rollback that makes it the
    live tree again finds its refresher still running); None once it is neither."""
    if gen == o.gen:
        return o.tree, o._ready_at
    ov = o.overlap
    if ov is not None and ov.old.gen == gen:
        return ov.old.tree, ov.old.ready_at
    return None, None


async def refresher(o: Supervisor, gen: int) -> None:
    """Look at the tree (members, held shm, files) while it lives; post what was found."""
    while True:
        tree, ready_at = _tree_of(o, gen)
        if tree is None:
            return
        try:
            rec = await o.offload(proctree.refresh, copy.deepcopy(tree), o.host)
            live = await o.offload(proctree.live_members, rec, o.host)
        except Exception as e:  # noqa: BLE001 - a failed refresh is said; the next one may work
            o.events.emit("refresh_error", error=f"{type(e).__name__}: {e}")
        else:
            workers = sum(1 for p in live if "Worker" in " ".join(p.cmdline))
            o.post(TreeSeen(gen, rec, workers))
        forming = ready_at is None or o.clock.monotonic() - ready_at < REFRESH_AFTER_READY_S
        await o.clock.sleep(REFRESH_S if forming else REFRESH_SETTLED_S)


def gpu_metrics(metrics: Metrics, gpus: Gpus, rec: proctree.TreeRecord) -> None:
    """The tree's GPU memory for the metrics endpoint, from the refresher's look at it."""
    from . import gpu

    with contextlib.suppress(Exception):  # NVML hiccups must not stop supervision
        for g in gpu.status_summary(gpus, {p.pid for p in rec.procs}) or []:
            mib = 1 << 20
            metrics.gpu(g["index"], g["used_mib"] * mib, g["total_mib"] * mib, g["model_mib"] * mib)


def tree_nice(o: Supervisor) -> int:
    """[vllm] nice, or its default: 10 without NVML GPUs (vLLM's CPU workers spin on every
    core they have; the host, vsup and its proxy come first), 0 (untouched) with them."""
    if o.cfg.vllm.nice is not None:
        return o.cfg.vllm.nice
    return 10 if o.gpus is None else 0
