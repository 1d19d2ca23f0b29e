"""Overlapped reload (issue 23), the owner's side: the new server starts beside the serving one.

reload.py calls `reload` here when `[proxy] overlap = "auto"`, the state is `ready` and
overlap.py showed that both fit. The steps, all inside the owner's `reloading` state:

1. The serving tree is set aside in `o.overlap` (its record, leader, generation, port); the
   route keeps sending requests to it (`upstream_route`). The owner's tree slot is free.
2. The new tree starts through the ordinary `start_tree`, on a free loopback port of its own and
   with its own TMPDIR, recorded in the ledger from its spawn (a vsup killed now leaves two
   recorded trees; the next start cleans both). Readiness and the canary prove it as always.
   On CPU its CPU time is capped from its spawn (a cpu cgroup, `spawned`) until the old tree is
   retired, so the serving tree keeps a core; where no cgroup can be made, the old one yields.
3. Proven: the route switches (new requests go to the new server; `serving` = "new"); the old
   one's requests in flight finish, bounded by `timeouts.drain_s` (the proxy counts them per
   generation); then the old tree is stopped (SIGTERM, stop_grace_s, the cleanup engine, with the
   new tree as the live one it must not touch) and its ledger record removed. `ready`.
4. The new one fails (exits, a fatal log line, the canary, the start timeout): it is torn down
   and cleaned like any failed reload's tree, the old tree goes back into the owner's slot with
   its own generation, and it never stopped serving: `ready` again, the reload's reply an error.

While both run, what the old tree says arrives with its own generation, which the owner's filter
would drop as stale: `absorb` (called first by the owner's `_absorb`) takes those observations.
Its API server's exit, a fatal log line from one of its processes (matched by pid: both trees
append to the one log file), or the proxy finding it refusing or stalled mean it stopped serving:
the route then holds requests until the new one is proven (or, if that fails too, the owner
recovers the old model as after any death). A stop or a shutdown cancels the overlap: the new
tree is torn down first, and the old one goes back to the owner, which stops it as it stops any
tree. Generations are never reused (`Supervisor._next_gen`), so nothing the torn-down new tree
still says can pass for the restored old one's.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import os
import signal
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from . import cleanup as cleanup_mod
from . import detection, launch, overlap, proctree, starting, teardown, watchers
from .config import ModelConfig
from .gate import UpstreamRefused, UpstreamStalled
from .observations import Cmd, Exited, Intent, LogSignal, OperationFailed, TreeSeen
from .states import State
from .teardown import FAILED_STOP_GRACE_S, ORPHAN_GRACE_S, SCAN_BOUND_S
from .watchers import FATAL_KINDS

if TYPE_CHECKING:
    from .daemon import Supervisor

# How far the yielding tree's autogroup nice goes above the trees' own ([vllm] nice, 10 on CPU)
# while the other loads or drains beside it on the same CPU cores (at most 19).
YIELD_BY = 10


@dataclass
class Old:
    """The serving tree, set aside while the new one loads beside it."""

    tree: proctree.TreeRecord
    leader: launch.Spawned | None
    gen: int
    spec: ModelConfig
    ready_at: float | None
    status: int | None  # its API server's exit status once reaped
    gone: asyncio.Event = field(default_factory=asyncio.Event)
    nice: int | None = None  # its session's autogroup nice before it yielded the CPU (CPU only)
    down: str | None = None  # why it stopped serving by itself during the overlap

    def pids(self) -> set[int]:
        return {p.pid for p in self.tree.procs}


@dataclass
class Overlap:
    """What `status` shows of an overlapped reload, and what the owner's route reads."""

    old: Old
    port: int  # the new tree's
    model: str  # the new tree's served name
    fit: dict[str, Any]
    since: float  # epoch
    serving: str = "old"  # "old" until the new tree is proven, then "new"
    cap: str | None = None  # the cpu cgroup capping the new tree while the old one serves or drains

    def roles(self, new_tree: bool) -> dict[str, int]:
        """For the metrics: how many trees hold each role now."""
        if self.serving == "old":
            return {"serving": int(self.old.down is None), "loading": int(new_tree)}
        return {"serving": int(new_tree), "retiring": 1}

    def to_json(self, o: Supervisor) -> dict[str, Any]:
        old, new = self.old, o.tree
        return {
            "serving": self.serving if (self.serving == "new" or old.down is None) else None,
            "since": _iso(self.since),
            "old": {
                "tree": old.tree.id,
                "pid": old.tree.leader.pid,
                "port": old.tree.port,
                "model": old.spec.served_model_name or old.spec.name,
                "gen": old.gen,
                "down": old.down,
            },
            "new": {
                "tree": new.id if new is not None else None,
                "pid": new.leader.pid if new is not None else None,
                "port": self.port,
                "model": self.model,
                "gen": o.gen,
            },
            "fit": self.fit,
        }


def _iso(t: float) -> str:
    import time

    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + "Z"


# ---- the owner's hooks ----------------------------------------------------------------------------


def upstream(o: Supervisor) -> tuple[tuple[str, int], int] | None:
    """Where the route sends requests during an overlap: ((host, port), generation), or None
    (hold) while neither tree can take them."""
    ov, host = o.overlap, o.cfg.vllm.host
    if ov is None:
        return None
    if ov.serving == "new":
        return ((host, o.tree.port), o.gen) if o.tree is not None else None
    if ov.old.down is None:
        return (host, ov.old.tree.port), ov.old.gen
    return None


def absorb(o: Supervisor, obs: Any) -> bool:
    """The old tree's observations during an overlap (its generation is not the owner's):
    True when `obs` was the old tree's and is done with."""
    ov = o.overlap
    if ov is None:
        return False
    old = ov.old
    if isinstance(obs, Exited) and old.leader is not None and obs.pid == old.leader.pid:
        old.status = obs.status
        old.leader.reaped(obs.status)
        old.gone.set()
        _down(o, f"its API server exited with status {obs.status}")
        return True
    if isinstance(obs, LogSignal) and obs.pid is not None and obs.pid in old.pids():
        if obs.kind in FATAL_KINDS:
            _down(o, obs.message)
        return True
    if isinstance(obs, UpstreamRefused) and obs.gen == old.gen:
        _down(o, obs.detail)
        return True
    if isinstance(obs, UpstreamStalled) and obs.gen == old.gen:
        # Slow, not down: its CPU went to the loading tree (_yield), and after the switch it
        # only drains. Taken for down, the route held instead and, worse, the retire skipped the
        # drain and killed the streams still coming: a CI run's clients got "EngineCore
        # encountered an issue" mid-stream. Its streams finish within timeouts.drain_s.
        o.events.emit("overlap_old_slow", tree=old.tree.id, serving=ov.serving, detail=obs.detail[:300])
        return True
    if isinstance(obs, TreeSeen) and obs.gen == old.gen:
        if obs.record.id == old.tree.id:  # its refresher runs on (starting.refresher): kept current
            before, old.tree = old.tree, obs.record
            teardown.ledger_refresh(o, before, obs.record)
        return True
    return getattr(obs, "gen", None) == old.gen  # its probes: nothing to act on


def _down(o: Supervisor, why: str) -> None:
    ov = o.overlap
    if ov is None or ov.old.down is not None:
        return
    ov.old.down = why
    o.events.emit("overlap_old_down", tree=ov.old.tree.id, serving=ov.serving, detail=why[:300])
    o._publish()  # the route: hold instead of the old server (if it still served)
    _roles(o)


def _roles(o: Supervisor) -> None:
    if o.metrics is not None:
        o.metrics.overlap_roles(o.overlap.roles(o.tree is not None) if o.overlap is not None else {})


# ---- the decision ---------------------------------------------------------------------------------


async def fits(o: Supervisor, new: ModelConfig) -> overlap.Fit | None:
    """overlap.py's answer for `new` beside the serving tree; None when overlap is not asked
    for. A no is said in the reload's events (`overlap_fallback`)."""
    px = o.cfg.proxy
    if px is None or px.overlap != "auto":
        return None
    try:
        fit = await o.offload(overlap.decide, o.cfg, new, o.policy.remedies(), o.gpus, o.host)
    except Exception as e:  # noqa: BLE001 - a check that fails cannot show a fit: sequential
        fit = overlap.Fit(False, f"fit check failed: {type(e).__name__}: {e}")
    if not fit.ok:
        o.events.emit("overlap_fallback", model=new.name, reason=fit.reason, **_plain(fit.detail))
        if o.metrics is not None:
            o.metrics.overlap_outcome("fallback")
    return fit


def _plain(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if k not in ("ok", "reason", "model")}


# ---- the overlapped reload ------------------------------------------------------------------------


async def reload(o: Supervisor, it: Intent, new: ModelConfig, old: ModelConfig, fit: overlap.Fit) -> Intent:
    cmd, t = it.cmd, o.cfg.timeouts
    t0 = o.clock.monotonic()
    if o.tree is None:
        raise RuntimeError("overlapped reload without a serving tree")  # reload.py checks: a bug
    port = await o.offload(overlap.free_port, o.cfg.vllm.host)
    prev = Old(o.tree, o.leader, o.gen, old, o._ready_at, o.leader_status)
    if prev.status is not None:
        prev.gone.set()
    if o.notifier is not None:
        o.notifier.reloading()
    served = new.served_model_name or new.name
    o.overlap = Overlap(prev, port, served, fit.to_json(), o.clock.time())
    o._hold_tree(None)  # the new tree takes the owner's slot; the old one lives in o.overlap
    o._set_state(
        State.RELOADING,
        reason=f"{it.reason}: {old.name} -> {new.name} (overlapped)",
        phase="overlap",
        operation=cmd.name if cmd else None,
    )
    o.events.emit(
        "overlap_begin",
        model=old.name,
        to=new.name,
        old_tree=prev.tree.id,
        old_port=prev.tree.port,
        port=port,
        fit=fit.reason,
    )
    _roles(o)
    if new.model != old.model:
        o.policy.new_model()
    o._use(spec=new)
    # CPU only: the new tree is capped (or the old one yields) at its spawn, see `spawned`.
    started = await o._start_tree(new, it.reason or "reload", in_reload=True, port=port)
    _roles(o)
    if started.interrupt is not None:
        what = started.interrupt.name if isinstance(started.interrupt, Cmd) else "daemon shutdown"
        await _end_new(o, f"reload cancelled by {what}")
        _restore(o, "cancelled")
        o._reply(cmd, error=OperationFailed(f"reload cancelled by {what}"))
        return o._intent_for(started.interrupt)
    if not started.ok:
        return await _rolled_back(o, it, new, old, started.detail, started.kind)

    # Proven: new requests go to the new server from this publish on.
    ov = o.overlap
    if ov is None or o.tree is None:
        raise RuntimeError("overlap state lost before the switch")  # a bug: internal_error
    ov.serving = "new"
    _unyield(o, prev)  # its requests in flight finish at its full share (at nice 10 beside the
    # new tree serving, its streams stalled: measured, 2 cut when the drain ran out)
    new_nice: int | None = None
    if o.gpus is None and ov.cap is None:
        # ... and the new tree yields while the old one drains: at equal shares the serving tree's
        # spinning workers starved the draining one (4 requests running, 0 tokens for 18 s after
        # the switch, cut when drain_s ran out: a CI run). New requests are served meanwhile, slower.
        # (Capped, the new tree stays capped until the old one is retired: the same, bounded.)
        new_nice = _yield(o, o.tree)
    switched_s = round(o.clock.monotonic() - t0, 3)
    o._publish(model=served, model_path=new.model)
    o.events.emit("overlap_switch", model=served, tree=o.tree.id, port=port, gen=o.gen, seconds=switched_s)
    _roles(o)
    o._set_phase("retire", deadline=o.clock.time() + t.drain_s)
    interrupt, result = await o._watch(_drain_old(o, prev))
    if result is not None:
        o.events.emit("drained", ok=result[0], max_running=result[1], tree=prev.tree.id)
    grace = t.stop_grace_s if interrupt is None else min(t.stop_grace_s, FAILED_STOP_GRACE_S)
    try:
        report = await retire(o, prev, grace=grace)
    finally:
        if new_nice is not None and o.tree is not None:  # the new tree alone: its full share
            o.host.autogroup_nice(o.tree.leader.pid, new_nice)
        _uncap(o)  # likewise
    o.overlap = None
    _roles(o)
    secs = round(o.clock.monotonic() - t0, 3)
    outcome = {"model": new.name, "seconds": secs, "overlapped": True, "switched_at_s": switched_s}
    if o.metrics is not None:
        o.metrics.overlap_outcome("switched")
    if not report.clean:
        outcome["debris"] = teardown.remaining(report)  # the ledger keeps the record: cleaned later
    o.events.emit("overlap_end", outcome="switched", **outcome)
    o._serving(new, f"{it.reason}: serving {new.name} (overlapped)")
    o.od.done("swapped", o.metrics)
    o._reply(cmd, outcome)
    o.policy.operator_acted()
    if interrupt is not None:
        return o._intent_for(interrupt)
    if o.leader_status is not None:  # the new one died while the old one drained
        return Intent("recover", reason=f"server exited with status {o.leader_status}", failure_kind="exited")
    return Intent("serve")


async def _rolled_back(
    o: Supervisor, it: Intent, new: ModelConfig, old: ModelConfig, detail: str, kind: str | None
) -> Intent:
    """The new tree failed: tear it down and clean it; the old one serves on (it never stopped)."""
    cmd = it.cmd
    if it.failure_kind == "swap":  # not tried again while its held requests could still wait
        o.od.swap_failed_for(new.served_model_name or new.name, detail)
    lines, tree = o.log.since_spawn(), o.tree
    o._set_phase("rollback")
    report = await _end_new(o, f"reload of {new.name} failed")
    detection.record_incident(o, detail, kind, lines, tree, report)
    prev = _restore(o, "rolled_back")
    if new.model != old.model:
        o.policy.new_model()
    msg = f"reload to {new.name} failed: {detail}"
    if prev.down is None and o.leader_status is None:
        o._serving(old, f"{old.name} kept serving (overlapped reload rolled back) after: {detail}")
        o._reply(cmd, error=OperationFailed(msg + f"; {old.name} kept serving throughout"))
        return Intent("serve")
    # The old one went down during the overlap too: as after any death of the serving tree.
    o._reply(cmd, error=OperationFailed(msg + f"; {old.name} went down meanwhile ({prev.down})"))
    return Intent(
        "recover", reason=f"server down during an overlapped reload: {prev.down}", failure_kind="exited"
    )


async def _end_new(o: Supervisor, reason: str) -> cleanup_mod.Report:
    """Tear the new tree down and clean it. Only with a new tree: with none (its spawn failed),
    the teardown would clean the ledger's other trees, and that is the old one, serving."""
    if o.tree is None:
        return cleanup_mod.Report()
    return await teardown.teardown(o, reason, grace=FAILED_STOP_GRACE_S)


def _restore(o: Supervisor, outcome: str) -> Old:
    """The new tree is gone: the old one goes back into the owner's slot with its generation."""
    ov = o.overlap
    if ov is None:
        raise RuntimeError("overlap state lost before the rollback")  # a bug: internal_error
    prev = ov.old
    _uncap(o)  # the new tree is gone: its cgroup is empty
    o.overlap = None
    _unyield(o, prev)  # it serves alone again: its full share
    o._restore_tree(prev.leader, prev.tree, prev.gen, prev.status, prev.ready_at)
    o._use(spec=prev.spec)
    served = prev.spec.served_model_name or prev.spec.name
    o._publish(model=served, model_path=prev.spec.model, pid=prev.tree.leader.pid)
    o.events.emit("overlap_end", outcome=outcome, model=served, tree=prev.tree.id, down=prev.down)
    if o.metrics is not None:
        o.metrics.overlap_outcome(outcome)
    _roles(o)
    return prev


def spawned(o: Supervisor, leader: launch.Spawned) -> None:
    """starting.py, right after it spawned a tree, before vLLM forks its engine and workers:
    if this is the tree loading beside a serving one on CPU, cap its CPU so the serving one
    keeps a core. Without a cap (no cgroup v1 cpu controller writable here), the serving tree's
    session yields instead (`_yield`), which bounds nothing.

    Both trees share the cores, and the scheduler's shares do not protect either: vLLM's CPU
    workers spin on their cores while they serve and the loader's profile and KV-cache set-up
    keep both cores busy, in the kernel for seconds. Measured here (2 cores, two TP=2 trees,
    1 + 1 requests/s to the serving one): at equal autogroup nice the new tree's workers got 0
    ticks in 5 s for minutes, the load never finishing; with the serving tree's autogroup at
    nice 19 (weight 15 against 110) it got 12 % of the CPU while the new one loaded, and 0 ticks
    for 9 s while the new one set its KV cache up: requests waited 11 s. With the new tree's
    CFS bandwidth capped at all cores but one and no yield: the slowest request 0.79 s, the
    load 77 s instead of 62 s. The cap is CPU time, not a share: it holds whatever the
    scheduler's weights and lags do."""
    ov = o.overlap
    if ov is None or ov.serving != "old" or o.gpus is not None or o.tree is None:
        return
    name, cores = proctree.cap_cgroup(o.tree.id), _cap_cores()
    try:
        path = o.host.cpu_cap(name, leader.pid, cores)
    except OSError as e:
        o.events.emit("overlap_cap", tree=o.tree.id, cgroup=None, reason=str(e)[:300])
        ov.old.nice = _yield(o, ov.old.tree)
        return
    ov.cap = name
    o.events.emit("overlap_cap", tree=o.tree.id, cgroup=path, cores=cores)


def _cap_cores() -> float:
    """The new tree's CPU cap: every core this process may use but one (half of one alone)."""
    n = len(os.sched_getaffinity(0))
    return float(n - 1) if n > 1 else 0.5


def _uncap(o: Supervisor) -> None:
    """The new tree's CPU cap lifted (its processes back in vsup's own cgroup) and its cgroup
    removed. A cgroup that cannot be removed is said; the cleanup of the tree's record tries
    again (cleanup.py, step 5)."""
    ov = o.overlap
    if ov is None or ov.cap is None:
        return
    name, ov.cap = ov.cap, None
    try:
        path = o.host.cpu_uncap(name)
    except OSError as e:
        o.events.emit("overlap_uncap", cgroup=name, error=str(e)[:300])
        return
    if path is not None:  # None: a failed new tree's cleanup removed it with the tree
        o.events.emit("overlap_uncap", cgroup=path)


def _yield(o: Supervisor, tree: proctree.TreeRecord) -> int | None:
    """`tree`'s session to autogroup nice YIELD_BY above the trees' own (CPU only); its nice
    before, to restore. At 0 and 10 the loading tree got 65 % of a core; at 10 (the CPU default
    since) and 19 the weights are 110 and 15, about the same ratio. One write to /proc, done in
    the owner as `_unyield` and starting.py's nice are."""
    nice = min(19, starting.tree_nice(o) + YIELD_BY)
    was = o.host.autogroup_nice(tree.leader.pid, nice)
    o.events.emit("overlap_yield", tree=tree.id, autogroup_nice=nice, was=was)
    return was


def _unyield(o: Supervisor, old: Old) -> None:
    """The old tree's CPU share back (its session's autogroup nice before the overlap)."""
    if old.nice is not None and old.status is None:
        o.host.autogroup_nice(old.tree.leader.pid, old.nice)
        old.nice = None


async def _drain_old(o: Supervisor, old: Old) -> tuple[bool, float]:
    """The old server's requests in flight finish (new ones already go to the new server)."""
    if old.down is not None:
        return True, 0.0
    if o.traffic is not None:
        return await watchers.drain_traffic(o.cfg, o.traffic, old.gen, o.clock)
    cfg = replace(o.cfg, vllm=replace(o.cfg.vllm, port=old.tree.port))
    return await watchers.drain(cfg, o.make_prober(cfg, old.spec), o.clock)


async def retire(o: Supervisor, old: Old, *, grace: float) -> cleanup_mod.Report:
    """Stop the old tree and clean what it left, never touching the new (live) one."""
    t = o.cfg.timeouts
    bound = grace + teardown.cleanup_bound(t, ORPHAN_GRACE_S) + SCAN_BOUND_S
    return await o._run(_retire_work(o, old, grace), bound)


async def _retire_work(o: Supervisor, old: Old, grace: float) -> cleanup_mod.Report:
    tree, t0 = old.tree, o.clock.monotonic()
    o.events.emit(
        "teardown",
        reason="overlapped reload: the old tree",
        tree=tree.id,
        grace_s=grace,
        pids=sorted(old.pids()),
    )
    with contextlib.suppress(Exception):  # last look at what it holds
        tree = await o.offload(proctree.refresh, copy.deepcopy(tree), o.host)
    ledger_ok = teardown.ledger_write(o, "upsert", replace(tree, ended=True))
    cleanup_grace = min(o.cfg.timeouts.cleanup_grace_s, ORPHAN_GRACE_S)
    if old.status is None and old.leader is not None:
        o.host.signal(tree.leader.pid, tree.leader.create_time, signal.SIGTERM)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(old.gone.wait(), grace)
        end = t0 + grace
        while o.clock.monotonic() < end:
            if not await o.offload(proctree.live_members, tree, o.host):
                break
            await o.clock.sleep(0.1)
        cleanup_grace = 0.0  # the grace is spent, as in teardown.py
    live = [o.tree] if o.tree is not None else []
    report = await teardown.cleanup(o, [tree], grace=cleanup_grace, live=live)
    extra = {} if ledger_ok else {"ledger": "not written: the next start or `vsup cleanup` may repeat this"}
    teardown.cleanup_event(
        o, "overlap-old", report, tree=tree.id, seconds=round(o.clock.monotonic() - t0, 3), **extra
    )
    if report.clean:
        teardown.ledger_write(o, "remove", tree.id)
    return report


def excluded(o: Supervisor) -> list[proctree.TreeRecord]:
    """Trees a dead-tree cleanup must leave alone now: the old tree of an overlap in progress."""
    return [o.overlap.old.tree] if o.overlap is not None else []
