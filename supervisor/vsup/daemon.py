"""The owner: one asyncio task owns the lifecycle of one vLLM server.

Data flows one way. Observations (observations.py: child exits, log signatures, probe results,
the refresher's look at the tree, the proxy's reports, operator commands, signals) go into one
queue; the owner task (`Supervisor._main`) reads them, decides, and acts through the host seam,
the spawner and the cleanup engine. The `Snapshot` that `status` shows and the `Route` the proxy
follows are replaced in one place, `_publish`. There are no locks: only the owner writes state.

The owner's work is a sequence of *intents* (start, serve, recover, stop, idle, reload, exit);
each phase is a coroutine that returns the next intent. Phases that wait read the queue through
`_next()`, so a command or a death is noticed while waiting. Steps that cannot stop half-way (a
teardown, a cleanup) run under `_run()`, which keeps answering commands meanwhile (status,
busy) and keeps what must wait for the phase (an accepted stop) in a backlog.

Commands are answered from the table in commands.py; the answer depends only on the state.
No exception leaves the owner: one escaping a phase (a bug, an illegal transition) becomes an
`internal_error` event, an incident and a torn-down, cleaned tree in state `failed`.

Invariants worth keeping:
- Every observation from a server carries the generation (`gen`) of its tree; the owner drops
  stale ones, so a death line of the old tree cannot fail the new start.
- Any exit of the API server is a failure unless vsup asked for the stop: vLLM exits 0 after a
  worker dies (vllm-facts.md), which restart-on-failure supervisors never restart.
- A tree runs only while the ledger records it: a failed ledger write after a spawn kills the
  tree at once (issue 20: ENOSPC left an unrecorded, unsupervised tree).
- vsup is the subreaper of everything it spawns and reaps with waitpid(-1) (runtime._reap). It
  starts vLLM, and through the host seam (Host.spawn_helper) the stack dumper (py-spy), nothing
  else: the reaper hands every status it collects to Host.deliver_child, so a dumper's exit
  status is never lost (issue 17).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import copy
import functools
import signal
import time
import traceback
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, ParamSpec, Protocol, TypeVar

from . import cleanup as cleanup_mod
from . import commands, incidents, launch, probes, proctree, stacks, watchers
from . import config as config_mod
from .commands import Answer
from .config import Config, ModelConfig
from .events import EventLog
from .gate import Demand, Gate, Route, Traffic, UpstreamRefused, UpstreamStalled
from .host import Host
from .observations import (
    Cmd,
    Exited,
    Intent,
    LogSignal,
    NotReady,
    OperationFailed,
    Probe,
    ReadyProven,
    Shutdown,
    TreeSeen,
)
from .policy import RestartPolicy, swap_target
from .probes import Prober, ProbeResult
from .states import Snapshot, State, check
from .watchers import FATAL_KINDS, STRIKE_KINDS, Clock

if TYPE_CHECKING:  # gpu and metrics are imported where used: both optional (NVML, prometheus-client)
    from .control import Request
    from .gpu import Gpus
    from .metrics import Metrics
    from .sdnotify import Notifier

P = ParamSpec("P")
R = TypeVar("R")


class Offload(Protocol):
    """How the owner runs blocking host work off the loop: asyncio.to_thread's signature."""

    def __call__(self, func: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs) -> Awaitable[R]: ...


# Stopping a failed server (hung, engine dead, failed reload): its clients' requests will never
# complete, and vLLM 0.32 blocks in "Waiting for connections to close" while they are open, so
# a long grace only delays the restart. stop_grace_s is for operators' stops and reloads.
FAILED_STOP_GRACE_S = 3.0
ORPHAN_GRACE_S = 1.0  # SIGTERM-to-SIGKILL for what is left when the API server died by itself
# The cleanup engine's time beyond its graces: /proc, /dev/shm and /tmp scans and the unlinks
# (0.1 s measured for 1000 segments, bench_cleanup.py); 5 s leaves room for a loaded machine.
SCAN_BOUND_S = 5.0
# Tree record refresh (new members, held shm): often while the tree forms (engine core, workers
# and segments all exist before the first completion), then rarely: a refresh costs ~6 ms of
# /proc reading, most of an idle daemon's CPU at 2 s.
REFRESH_S = 2.0
REFRESH_SETTLED_S = 15.0
REFRESH_AFTER_READY_S = 20.0
HEARTBEAT_S = 1.0  # the owner wakes at least this often (watchdog pings depend on it)
WATCH_POLL_S = 0.1  # how soon a watch (the drain) notices that it has finished

ProberFactory = Callable[[Config, ModelConfig], watchers.ProberLike]


def _default_prober(cfg: Config, spec: ModelConfig) -> watchers.ProberLike:
    """Probes of the server `spec` runs as, with the API key it demands (issue 15)."""
    key = probes.api_key([*cfg.vllm.args, *spec.args], {**cfg.vllm.env, **spec.env})
    return Prober(cfg.vllm.host, cfg.vllm.port, timeout_s=cfg.timeouts.probe_s, api_key=key)


class Supervisor:
    def __init__(
        self,
        cfg: Config,
        *,
        events: EventLog | None = None,
        autostart: bool = True,
        notifier: Notifier | None = None,
        host: Host | None = None,
        clock: Clock | None = None,
        prober: ProberFactory | None = None,
        spawner: launch.Spawner | None = None,
        offload: Offload | None = None,
        gate: Gate | None = None,
        traffic: Traffic | None = None,
    ) -> None:
        self.cfg = cfg
        self.autostart = autostart
        self.events = events or EventLog(cfg.state_dir)
        self.notifier = notifier
        self.host = host or Host()
        self.clock = clock or Clock()
        self.make_prober: ProberFactory = prober or _default_prober
        self.spawner: launch.Spawner = spawner or launch.RealSpawner(self.host)
        self.offload: Offload = offload or asyncio.to_thread  # blocking host work, off the loop
        self.gate = gate or Gate()
        self.traffic = traffic  # the proxy's read-only view, when there is one
        self.snap = Snapshot()
        self.ledger = proctree.Ledger(cfg.state_dir)
        self.spec: ModelConfig = cfg.model_spec()
        self.policy = RestartPolicy(cfg)
        self.q: asyncio.Queue[Any] = asyncio.Queue()
        self._backlog: collections.deque[Any] = collections.deque()
        self.gen = 0
        self.tree: proctree.TreeRecord | None = None
        self.leader: launch.Spawned | None = None
        self.leader_status: int | None = None
        self._leader_gone = asyncio.Event()
        self.log = watchers.LogWatch(self.post, lambda: self.gen, self.clock, _redact)
        self._heartbeat = time.monotonic()
        self._bounded_until = 0.0  # monotonic deadline of a bounded step in progress
        self._last_status: str | None = None
        self._exiting = False
        self.exit_code = 0  # what `vsup run` exits with (1: the server ended failed, exit_on_failed)
        self._stopping_for = "stop"  # what a `stopping` leads to: stop | restart | failed
        self._tasks: set[asyncio.Task[Any]] = set()
        self._gpu_baseline: dict[int, int] | None = None
        self._ready_at: float | None = None  # monotonic time the current tree became ready
        # Issue 16. Off-loaded (cause: idle | operator): `stopped`, the route holding, and a
        # request loads the model again. The on-demand numbers status shows; a load or swap in
        # progress (what asked for it, since when); models whose swap failed (monotonic time).
        self._unloaded: str | None = None
        self._od: dict[str, Any] = {"unloaded": 0, "loaded": 0, "swapped": 0, "last": None}
        self._od_pending: dict[str, Any] | None = None
        self._swap_failed: dict[str, float] = {}
        self._last_release: Any = None  # the GPU release report of the last teardown (NVML)
        self.metrics: Metrics | None = None
        self.gpus: Gpus | None = None
        self.vllm_version = incidents.vllm_version(cfg.vllm.python)

    # -- the one place state changes ---------------------------------------------------------

    def _publish(self, **changes: Any) -> None:
        """Replace the snapshot, and with it the proxy's route and systemd's status line."""
        self.snap = replace(self.snap, **changes)
        self.events.bind(state=str(self.snap.state), model=self.snap.model, pid=self.snap.pid)
        self.gate.publish(self._route())
        self._notify_status()

    def _route(self) -> Route:
        s, v = self.snap, self.cfg.vllm
        if self._exiting:
            # Shutting down (issue 18): the proxy refuses what it has not forwarded yet, held or
            # new, at once; requests in flight finish during the shutdown drain.
            return Route(state=str(s.state), reason=s.reason or "shutting down", closing=True, model=s.model)
        ready = s.state == State.READY and self.tree is not None
        # Off-loaded (issue 16): stopped, but a request loads the model again: hold it.
        idle = s.state == State.STOPPED and self._unloaded is not None
        if s.state in (State.FAILED, State.STOPPED):
            hold = idle  # otherwise nothing is coming until an operator acts
        elif s.state == State.STOPPING:
            hold = self._stopping_for in ("restart", "unload")
        else:
            hold = not ready  # starting, reloading, unhealthy: a server is (again) coming
        return Route(
            state=str(s.state),
            reason=s.reason,
            upstream=(v.host, v.port) if ready else None,
            gen=self.gen if ready else 0,
            hold=hold,
            model=s.model,
            idle=idle,
        )

    def _set_state(
        self,
        state: State,
        *,
        reason: str | None = None,
        phase: str | None = None,
        deadline: float | None = None,
        **changes: Any,
    ) -> None:
        """Checks the table, emits one event."""
        old = self.snap.state
        if state != old:
            check(old, state)
        if state == State.FAILED and self.cfg.daemon.exit_on_failed and not self._exiting:
            self._exit_failed(reason)
        if state != State.STOPPED:
            self._unloaded = None  # off-loaded only while stopped
        since = self.clock.time() if state != old else self.snap.since
        self._publish(state=state, reason=reason, phase=phase, deadline=deadline, since=since, **changes)
        self.events.emit("state", old=str(old), phase=phase, reason=reason)
        if self.metrics is not None:
            self.metrics.set_state(str(state))

    def _exit_failed(self, reason: str | None) -> None:
        """[daemon] exit_on_failed (a pod): the server ended `failed`, so vsup ends too, non-zero,
        with the reason in the termination log, and the kubelet restarts the container. Every
        phase that reaches `failed` has torn its tree down already; the idle phase then exits."""
        from . import pod

        self.exit_code = 1
        self._exiting = True
        msg = pod.failure_message("failed", reason, self.snap.restarts, self.snap.model)
        written = pod.write_termination_message(msg, self.cfg.daemon.termination_log)
        self.events.emit(
            "exit_on_failed",
            exit_code=self.exit_code,
            termination_log=self.cfg.daemon.termination_log if written else None,
            reason=reason,
        )

    def _set_phase(self, phase: str, deadline: float | None = None, **fields: Any) -> None:
        self._publish(phase=phase, deadline=deadline)
        self.events.emit("phase", phase=phase, **fields)

    def _notify_status(self) -> None:
        """STATUS= only when the line changed: the notify socket's queue is short (10 here)."""
        line = self.status_line()
        if self.notifier is not None and line != self._last_status:
            self._last_status = line
            self.notifier.status(line)

    def status_line(self) -> str:
        s = self.snap
        head = f"{s.state}" + (f" ({s.phase})" if s.phase else "")
        bits = [b for b in (s.model, f"{s.workers} workers" if s.workers else None) if b]
        bits.append(f"{s.restarts} restarts")
        line = f"{head}: {', '.join(bits)}"
        if s.reason and s.state in (State.FAILED, State.UNHEALTHY, State.STOPPING):
            line += f" - {s.reason}"
        return line[:200]

    def status(self) -> dict[str, Any]:
        out = self.snap.to_json()
        out["vllm_version"] = self.vllm_version
        out["tree"] = None
        if self.tree is not None:
            pids = sorted({p.pid for p in self.tree.procs})
            out["tree"] = {"id": self.tree.id, "sid": self.tree.sid, "pids": pids}
        if self.gpus is not None:
            from . import gpu

            pids_set = {p.pid for p in self.tree.procs} if self.tree else set()
            with contextlib.suppress(Exception):
                # Other vsup instances on this host, named where they hold a GPU (issue 18).
                instances, wanted = gpu.neighbours(self.gpus, self.cfg)
                out["gpus"] = gpu.status_summary(self.gpus, pids_set, instances=instances, wanted=wanted)
        if self.traffic is not None:
            with contextlib.suppress(Exception):  # the proxy's failure must not break status
                out["traffic"] = self.traffic.stats()
        if self.cfg.proxy is not None or self._od["last"] is not None:
            out["on_demand"] = {**self._od, "unloaded_for": self._unloaded, "pending": self._od_pending}
        return out

    # -- the queue ---------------------------------------------------------------------------

    def post(self, obs: Any) -> None:
        """Any source, any time (on the loop thread): hand the owner an observation."""
        self.q.put_nowait(obs)

    async def submit(self, name: str, args: dict[str, Any], request: Request | None = None) -> Any:
        """A lifecycle command from a socket handler (or a test): post it, await the one reply."""
        from .control import CommandError

        problem = commands.validate(name, args)
        if problem:
            raise CommandError("bad_request", problem)
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.post(Cmd(name, dict(args), request, fut))
        try:
            # shielded: a client that goes away does not cancel the operation's reply slot
            return await asyncio.shield(fut)
        except OperationFailed as e:
            raise CommandError("failed", str(e)) from None

    def _absorb(self, obs: Any) -> Any:
        """What the owner handles the same way in every phase. Returns what the phase must see
        (None when the observation is done with)."""
        if isinstance(obs, Exited) and self.leader is not None and obs.pid == self.leader.pid:
            self.leader_status = obs.status
            self._leader_gone.set()
            self.leader.reaped(obs.status)
        if getattr(obs, "gen", self.gen) != self.gen:
            return None  # from a tree that is already gone
        if isinstance(obs, TreeSeen):
            self._apply_tree(obs)
            return None
        if isinstance(obs, Demand):
            if self.cfg.proxy is None or self.traffic is None:
                self.events.emit("demand_ignored", model=obs.model, note="no [proxy]")
                return None
            return obs  # serve (a swap) and idle (a load) act on it; other phases drop it
        if isinstance(obs, Shutdown):
            self._exiting = True
            self._publish()  # the closing route: stop admitting now, whatever the phase
            return obs
        if isinstance(obs, Cmd):
            return self._answer(obs)
        return obs

    def _answer(self, cmd: Cmd) -> Cmd | None:
        """Answer from the table at once, or return the command for the phase to run."""
        from .control import CommandError

        if self._exiting:
            cmd.reply(error=CommandError("busy", "the daemon is shutting down"))
            return None
        how, msg = commands.answer(self.snap, cmd.name)
        if how is Answer.BUSY:
            cmd.reply(error=CommandError("busy", msg or "busy"))
            return None
        if how is Answer.NOTE:
            cmd.reply({"note": msg, **self.status()})
            return None
        if cmd.name == "reload" and "spec" not in cmd.args:
            try:
                cmd.args["spec"], cmd.args["cfg"] = self._reload_target(cmd.args)
            except config_mod.ConfigError as e:
                cmd.reply(error=OperationFailed(f"config not reloaded: {e}"))
                return None
        return cmd

    def _reload_target(self, args: dict[str, Any]) -> tuple[ModelConfig, Config]:
        if args.get("current"):  # systemctl reload: apply what is on disk (taken when it begins)
            cfg = config_mod.load(self.cfg.path)
            return cfg.model_spec(self.spec.name if self.spec.name in cfg.models else None), cfg
        return self.cfg.model_spec(str(args["model"])), self.cfg

    async def _next(self, timeout: float | None = None) -> Any:
        """Next observation the current phase must see, or None when `timeout` passes."""
        end = None if timeout is None else self.clock.monotonic() + timeout
        while True:
            self._heartbeat = time.monotonic()
            if self._backlog:
                obs = self._backlog.popleft()
            else:
                wait = HEARTBEAT_S if end is None else min(HEARTBEAT_S, end - self.clock.monotonic())
                if wait <= 0:
                    return None
                try:
                    obs = await asyncio.wait_for(self.q.get(), wait)
                except TimeoutError:
                    continue
            obs = self._absorb(obs)
            if obs is None:
                continue
            if isinstance(obs, Cmd) and obs.name == "cleanup":
                await self._cmd_cleanup(obs)  # safe at any wait point: never touches the live tree
                continue
            return obs

    async def _run(self, work: Coroutine[Any, Any, R], bound_s: float) -> R:
        """Await `work`, a step that must not stop half-way and lasts at most `bound_s`, while
        answering commands (busy, notes); what the next phase must see waits in the backlog."""
        task = asyncio.get_running_loop().create_task(work)
        getter: asyncio.Task[Any] | None = None
        with self._bounded(bound_s):
            try:
                while not task.done():
                    if getter is None:
                        getter = asyncio.get_running_loop().create_task(self.q.get())
                    await asyncio.wait({task, getter}, return_when=asyncio.FIRST_COMPLETED)
                    if getter.done():
                        obs, getter = self._absorb(getter.result()), None
                        if obs is not None:
                            self._backlog.append(obs)
            finally:
                if getter is not None:
                    getter.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        obs = self._absorb(await getter)
                        if obs is not None:
                            self._backlog.append(obs)
        return task.result()

    def _poll_interrupt(self) -> Cmd | Shutdown | None:
        """After a step that could not be interrupted: an accepted command or a shutdown that
        arrived meanwhile. Operator cleanups stay queued for the next wait; other observations
        of the finished step are dropped."""
        keep: list[Cmd] = []
        found: Cmd | Shutdown | None = None
        while found is None:
            if self._backlog:
                obs = self._backlog.popleft()
            else:
                try:
                    obs = self.q.get_nowait()
                except asyncio.QueueEmpty:
                    break
            obs = self._absorb(obs)
            if isinstance(obs, Cmd) and obs.name == "cleanup":
                keep.append(obs)
            elif isinstance(obs, (Cmd, Shutdown)):
                found = obs
        self._backlog.extendleft(reversed(keep))
        return found

    def _spawn_task(self, coro: Coroutine[Any, Any, R]) -> asyncio.Task[R]:
        t = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)
        return t

    @contextlib.contextmanager
    def _bounded(self, seconds: float) -> Iterator[None]:
        """Mark a step that waits without reading the queue, with the bound it cannot outlast."""
        prev = self._bounded_until
        self._bounded_until = max(prev, time.monotonic() + seconds)
        try:
            yield
        finally:
            self._bounded_until = prev
            self._heartbeat = time.monotonic()

    def _reply(self, cmd: Cmd | None, result: Any = None, error: BaseException | None = None) -> None:
        if cmd is None:
            return
        cmd.reply(result, error)
        if self.snap.operation == cmd.name:
            self._publish(operation=None)

    def _intent_for(self, obs: Cmd | Shutdown) -> Intent:
        if isinstance(obs, Shutdown):
            return Intent("stop", reason=f"daemon shutdown ({obs.signame})")
        self._publish(operation=obs.name)
        if obs.name == "stop":
            return Intent("stop", reason="operator stop", cmd=obs)
        if obs.name == "unload":
            return Intent("unload", reason="operator unload", failure_kind="operator", cmd=obs)
        self.policy.operator_acted(start=obs.name == "start")  # resets the crash-loop count
        if obs.name == "reload":
            return Intent("reload", spec=obs.args["spec"], reason="operator reload", cmd=obs)
        if obs.name == "restart":
            return Intent("reload", spec=self.spec, reason="operator restart", cmd=obs)
        if obs.name == "start":
            return Intent("start", spec=self.spec, reason="operator start", cmd=obs)
        raise AssertionError(f"no intent for command {obs.name!r}")

    # -- the owner ---------------------------------------------------------------------------

    async def _main(self) -> None:
        await self._run(self._adopt_leftovers(), self._cleanup_bound(self.cfg.timeouts.cleanup_grace_s))
        intent = Intent("start", self.spec, reason="launch") if self.autostart else Intent("idle")
        if not self.autostart:
            self._set_state(State.STOPPED, reason="autostart disabled")
        phases = {
            "start": self._do_start,
            "serve": self._do_serve,
            "recover": self._do_recover,
            "stop": self._do_stop,
            "idle": self._do_idle,
            "reload": self._do_reload,
            "unload": self._do_unload,
        }
        while intent.kind != "exit":
            try:
                intent = await phases[intent.kind](intent)
            except Exception as e:  # noqa: BLE001 - a bug in a phase ends in failed and a clean machine, not a dead owner
                intent = await self._internal_error(e, intent)
        if self.tree is not None:
            await self._teardown("daemon shutdown", grace=self.cfg.timeouts.stop_grace_s)
        from .control import CommandError

        for obs in [*self._backlog, *_drain_queue(self.q)]:
            if isinstance(obs, Cmd):
                obs.reply(error=CommandError("busy", "the daemon is shutting down"))

    async def _internal_error(self, e: Exception, intent: Intent) -> Intent:
        """A bug surfaced in a phase: say so, tear down and clean what runs, end in `failed`."""
        reason = f"internal error in {intent.kind}: {type(e).__name__}: {e}"
        self.events.emit(
            "internal_error", error=f"{type(e).__name__}: {e}", intent=intent.kind, traceback=_tb(e)
        )
        self._reply(intent.cmd, error=OperationFailed(reason))
        try:
            lines, tree = self.log.since_spawn(), self.tree
            self._stopping_for = "failed"
            if self.snap.state != State.STOPPING:
                self._set_state(State.STOPPING, reason=reason, phase="teardown")
            report = await self._teardown(reason, grace=FAILED_STOP_GRACE_S)
            self._incident(reason, "internal_error", lines, tree, report)
            self._set_state(State.FAILED, reason=reason, phase=None, operation=None, pid=None, workers=0)
        except Exception as e2:  # noqa: BLE001 - the teardown after a bug may fail too: said, then failed
            self.events.emit("internal_error", error=f"{type(e2).__name__}: {e2}", intent="teardown")
            self._publish(state=State.FAILED, reason=f"{reason}; teardown failed: {e2}", phase=None)
        return Intent("exit") if self._exiting else Intent("idle")

    async def _adopt_leftovers(self) -> None:
        """A predecessor killed with SIGKILL left its tree running: remove it before anything."""
        recs = self.ledger.load()
        if not recs:
            return
        pids = sorted({p.pid for r in recs for p in r.procs})
        self.events.emit("leftovers_found", trees=[r.id for r in recs], pids=pids)
        report = await self._cleanup(recs, grace=self.cfg.timeouts.cleanup_grace_s)
        self._cleanup_event("leftovers", report)
        if report.clean:
            for r in recs:
                self._ledger("remove", r.id)

    # start ---------------------------------------------------------------------------------

    async def _do_start(self, it: Intent) -> Intent:
        spec = it.spec or self.spec
        if spec.model != self.spec.model:
            self.policy.new_model()
        self.spec = spec
        ok, detail, kind, obs = await self._start_tree(spec, it.reason or "start", in_reload=False)
        if ok:
            self._set_state(State.READY, reason="canary completion served", phase=None)
            self._reply(it.cmd, self.status())
            if self._od_pending is not None and self._od_pending["kind"] == "loaded":
                self._on_demand_done()
            return Intent("serve")
        if obs is not None:  # a command interrupted the start
            what = obs.name if isinstance(obs, Cmd) else "shutdown"
            self._reply(it.cmd, error=OperationFailed(f"start interrupted by {what}"))
            return self._intent_for(obs)
        # an operator start that fails goes through the same recovery (backoff, ladder,
        # crash-loop limit); the operator gets the root cause now.
        self._reply(it.cmd, error=OperationFailed(detail))
        return Intent("recover", reason=detail, failure_kind=kind)

    async def _start_tree(
        self, spec: ModelConfig, reason: str, *, in_reload: bool
    ) -> tuple[bool, str, str | None, Any]:
        """Pre-clean, spawn, prove ready. Returns (ok, detail, failure kind, interrupting obs)."""
        t = self.cfg.timeouts
        served = spec.served_model_name or spec.name
        if not in_reload:
            self._set_state(
                State.STARTING, reason=reason, phase="cleanup", model=served, model_path=spec.model, pid=None
            )
        else:
            self._set_phase("cleanup")
        report = await self._cleanup_dead()
        if not report.clean:
            return False, f"pre-start cleanup left debris: {_remaining(report)}", "cleanup", None
        if (obs := self._poll_interrupt()) is not None:
            return False, "interrupted", None, obs
        holder = cleanup_mod.port_holder(self.cfg.vllm.port, self.host)
        if holder is not None:
            detail = (
                f"port {self.cfg.vllm.port} is held by pid {holder.get('pid')} "
                f"({holder.get('name')}, user {holder.get('user')}): not ours, not touched"
            )
            return False, detail, "port_busy", None
        if self.gpus is not None:
            # Every process of ours is gone by now: whoever still holds GPU memory is someone
            # else's, and starting beside it would fail (or OOM) later, in a worse place.
            # Only the GPUs this instance wants; a holder that is another vsup instance's tree is
            # named by that instance (issue 18).
            from . import gpu

            instances, wanted = await self.offload(gpu.neighbours, self.gpus, self.cfg)
            pre = await self.offload(
                functools.partial(self.gpus.precheck, set(), indices=wanted, instances=instances)
            )
            if not pre.ok:
                self.events.emit("gpu_precheck", ok=False, reason=pre.reason)
                return False, f"GPU pre-start check: {pre.reason}", "gpu_busy", None
            self._gpu_baseline = self.gpus.baseline()
        argv, env = launch.command(self.cfg, spec, self.policy.remedies())
        log_path = Path(self.cfg.vllm.log_file)
        if launch.rotate_log(log_path):
            self.events.emit("log_rotated", path=str(log_path))
        self.gen += 1
        self._leader_gone.clear()
        self.leader_status = None
        self._ready_at = None
        self.log.new_tree()
        try:
            spawned = self.spawner.spawn(argv, env, log_path, model=spec.model, port=self.cfg.vllm.port)
        except OSError as e:
            return False, f"cannot start {argv[0]}: {e.strerror or e}", "spawn", None
        self.leader, self.tree = spawned, spawned.tree
        if not self._ledger("upsert", spawned.tree):
            # Never leave a tree running that the ledger does not know: kill it now.
            report = await self._cleanup([spawned.tree], grace=0.0)
            self._cleanup_event("unrecorded", report)
            self.tree, self.leader = None, None
            return False, "cannot record the tree in the ledger: killed it at once", "ledger", None
        self._publish(pid=spawned.pid, workers=0)
        self.events.emit(
            "spawned",
            argv=launch.redact_argv(argv),
            log_file=self.cfg.vllm.log_file,
            sid=spawned.tree.sid,
            tree=spawned.tree.id,
            files=list(spawned.tree.files),
            remedies=[r.name for r in self.policy.remedies()],
        )
        gen = self.gen
        self._spawn_task(self._refresher(gen))
        deadline_mono = self.clock.monotonic() + t.start_s
        if in_reload:
            self._set_phase("ready", deadline=self.clock.time() + t.start_s)
        else:
            self._set_state(
                State.STARTING,
                reason=reason,
                phase="readiness",
                deadline=self.clock.time() + t.start_s,
                model=served,
                model_path=spec.model,
                pid=spawned.pid,
            )
        if self.notifier is not None:
            self.notifier.extend_timeout(int(self.start_extend_s() * 1e6))
        prober = self.make_prober(self.cfg, self.spec)
        ready_task = self._spawn_task(
            watchers.readiness(gen, spec, self.cfg, prober, self.post, self.events.emit)
        )
        try:
            while True:
                obs = await self._next(deadline_mono - self.clock.monotonic())
                if obs is None:
                    return False, self._root_cause(f"not ready within {t.start_s:g}s"), "start_timeout", None
                if isinstance(obs, ReadyProven):
                    self._ready_at = self.clock.monotonic()
                    return True, "ready", None, None
                if isinstance(obs, NotReady):
                    await self.log.settle()  # a 500 answers before the traceback is logged
                    return False, self._root_cause(obs.detail), "engine_dead", None
                if isinstance(obs, Exited):
                    await self.log.catch_up()
                    detail = self._root_cause(f"server exited with status {obs.status} before ready")
                    return False, detail, "exited", None
                if isinstance(obs, LogSignal):
                    if obs.kind in FATAL_KINDS:
                        self._detected(obs)
                        kind = "engine_dead" if obs.kind in ("worker_died", "engine_dead") else obs.kind
                        await self.log.settle()  # the traceback with the real cause follows
                        return False, self._root_cause(obs.message), kind, None
                    if obs.kind in STRIKE_KINDS:
                        # Long compilation/weight loading logs the same stall line: before
                        # ready it is a warning, never a failure (gpustack#3888).
                        self.events.emit(
                            "stall_during_startup",
                            message=obs.message,
                            note="start-up work; not acted on before ready",
                        )
                    continue
                if isinstance(obs, (Cmd, Shutdown)):
                    return False, "interrupted", None, obs
                # probes of a server not yet ready, proxy reports: nothing to act on yet
        finally:
            ready_task.cancel()

    async def _refresher(self, gen: int) -> None:
        """Look at the tree (members, held shm, files) while it lives; post what was found."""
        while gen == self.gen and self.tree is not None:
            try:
                rec = await self.offload(proctree.refresh, copy.deepcopy(self.tree), self.host)
                live = await self.offload(proctree.live_members, rec, self.host)
            except Exception as e:  # noqa: BLE001 - a failed refresh is said; the next one may work
                self.events.emit("refresh_error", error=f"{type(e).__name__}: {e}")
            else:
                workers = sum(1 for p in live if "Worker" in " ".join(p.cmdline))
                self.post(TreeSeen(gen, rec, workers))
            forming = (
                self._ready_at is None or self.clock.monotonic() - self._ready_at < REFRESH_AFTER_READY_S
            )
            await self.clock.sleep(REFRESH_S if forming else REFRESH_SETTLED_S)

    def _apply_tree(self, seen: TreeSeen) -> None:
        old, rec = self.tree, seen.record
        if old is None or rec.id != old.id:
            return
        grew = (len(rec.procs), len(rec.ipc), len(rec.files)) != (
            len(old.procs),
            len(old.ipc),
            len(old.files),
        )
        self.tree = rec
        if seen.workers != self.snap.workers:
            self._publish(workers=seen.workers)
        if grew:
            self._ledger("upsert", rec)
        if self.metrics is not None and self.gpus is not None:
            from . import gpu

            with contextlib.suppress(Exception):  # NVML hiccups must not stop supervision
                for g in gpu.status_summary(self.gpus, {p.pid for p in rec.procs}) or []:
                    mib = 1 << 20
                    self.metrics.gpu(
                        g["index"], g["used_mib"] * mib, g["total_mib"] * mib, g["model_mib"] * mib
                    )

    # serve ---------------------------------------------------------------------------------

    async def _do_serve(self, it: Intent) -> Intent:
        if self.snap.state != State.READY:
            self._set_state(State.READY, reason="canary completion served", phase=None)
        self.events.emit("ready", model=self.snap.model, remedies=[r.name for r in self.policy.remedies()])
        gen, p = self.gen, self.cfg.probes
        probe_task = self._probe(gen, confirm=False)
        strikes: list[str] = []
        progressed = False
        stable_at = self.clock.monotonic() + self.cfg.restart.stable_s
        od_check = 0.0  # the next look at the proxy's view for an off-load or a swap (issue 16)
        try:
            while True:
                obs = await self._next(HEARTBEAT_S)
                now = self.clock.monotonic()
                if stable_at and now >= stable_at and self.snap.state == State.READY:
                    # Served long enough: the next failure is a new story, not part of a crash loop.
                    stable_at = 0
                    if forgotten := self.policy.stable():
                        self.events.emit("stable", failures_forgotten=forgotten)
                if isinstance(obs, Demand) or now >= od_check:  # issue 16: once a heartbeat
                    od_check = now + HEARTBEAT_S
                    if (nxt := self._offload_due()) is not None:
                        return nxt
                if obs is None:
                    continue
                if isinstance(obs, Exited):
                    await self.log.catch_up()
                    reason = self._root_cause(f"server exited with status {obs.status}")
                    return Intent("recover", reason=reason, failure_kind="exited")
                if isinstance(obs, (Cmd, Shutdown)):
                    return self._intent_for(obs)
                if isinstance(obs, LogSignal):
                    if obs.kind in FATAL_KINDS:
                        self._detected(obs)
                        kind = "engine_dead" if obs.kind in ("worker_died", "engine_dead") else obs.kind
                        return Intent("recover", reason=self._root_cause(obs.message), failure_kind=kind)
                    if obs.kind not in STRIKE_KINDS:
                        continue
                    if self._ready_at is not None and now - self._ready_at < p.startup_grace_s:
                        self.events.emit("stall_during_startup", message=obs.message, note="startup_grace_s")
                        continue
                    self._detected(obs)
                    strikes.append(f"log: {obs.message[:120]}")
                elif isinstance(obs, Probe):
                    r = obs.result
                    if r.probe == "metrics" and r.ok and r.data.get("progressed"):
                        progressed = True
                    if r.ok and r.probe == "canary" and self.snap.state == State.UNHEALTHY:
                        self._set_state(State.READY, reason=f"recovered: {r.detail}")
                        strikes, progressed = [], False
                        continue
                    if r.ok:
                        continue
                    self._detected(r)
                    strikes.append(f"{r.probe}: {r.detail}")
                elif isinstance(obs, UpstreamStalled):
                    # every stream in flight waited without a byte: one strike, like a canary
                    self._detected(ProbeResult("proxy_stall", False, obs.detail))
                    strikes.append(f"proxy: {obs.detail}")
                elif isinstance(obs, UpstreamRefused):
                    # the route said ready but the upstream refused: look at health now
                    self.events.emit("upstream_refused", detail=obs.detail)
                    self._spawn_task(
                        watchers.health_once(gen, self.make_prober(self.cfg, self.spec), self.post)
                    )
                    continue
                else:
                    continue
                if strikes and self.snap.state == State.READY:
                    self._set_state(State.UNHEALTHY, reason=strikes[-1])
                    # Only tokens generated from now on say "slow, not stuck" (earlier ones,
                    # our own canaries' included, say nothing about the engine now).
                    progressed = False
                    probe_task.cancel()
                    probe_task = self._probe(gen, confirm=True)
                # Confirmed by independent signals. Generated tokens still increasing means
                # the engine is slow, not stuck: canary timeouts alone do not tear it down.
                if len(strikes) >= p.confirm and not (progressed and _only_canary(strikes)):
                    return Intent(
                        "recover", reason="hang confirmed: " + "; ".join(strikes[-3:]), failure_kind="hang"
                    )
        finally:
            probe_task.cancel()

    def _probe(self, gen: int, *, confirm: bool) -> asyncio.Task[Any]:
        prober = self.make_prober(self.cfg, self.spec)
        return self._spawn_task(
            watchers.probe_loop(gen, self.spec, self.cfg, prober, self.post, self.clock, confirm)
        )

    def _detected(self, what: LogSignal | ProbeResult) -> None:
        info: dict[str, Any]
        if isinstance(what, LogSignal):
            info = {
                "source": "log",
                "kind": what.kind,
                "signature": what.sig_id,
                "message": what.message,
                "process": what.process,
                "log_pid": what.pid,
                "latency_s": round(self.clock.monotonic() - what.at, 3),
            }
        else:
            info = {"source": "probe", "kind": what.probe, "message": what.detail}
        self._publish(last_detection={**info, "at": _iso(self.clock.time())})
        self.events.emit("detection", **info)
        if self.metrics is not None:
            self.metrics.detection(info["kind"], info.get("latency_s", 0.0))

    # recover -------------------------------------------------------------------------------

    async def _do_recover(self, it: Intent) -> Intent:
        reason, kind = it.reason or "failure", it.failure_kind or "failure"
        served, lines, tree = self.log.served, self.log.since_spawn(), self.tree
        self._stopping_for = "restart"
        dump = None
        if kind == "hang" and tree is not None and self.cfg.daemon.stacks != "off":
            # Issue 17: where every rank waited dies with the tree: record it first, bounded.
            self._set_state(State.STOPPING, reason=reason, phase="stacks")
            dump = await self._stacks(tree)
            self._set_phase("teardown")
        else:
            self._set_state(State.STOPPING, reason=reason, phase="teardown")
        report = await self._teardown(reason, grace=min(FAILED_STOP_GRACE_S, self.cfg.timeouts.stop_grace_s))
        self._incident(reason, kind, lines, tree, report, stacks=dump)
        tp_args = [*self.cfg.vllm.args, *self.spec.args]
        v = self.policy.failed(self.clock.monotonic(), kind, served=served, tp_args=tp_args)
        if v.remedy is not None:
            self._publish(remedies=tuple(r.name for r in self.policy.remedies()))
            self.events.emit(
                "remedy_applied",
                remedy=v.remedy.name,
                args=v.remedy.args,
                env=v.remedy.env,
                failure_kind=kind,
                level=self.policy.remedy_level,
            )
        if v.give_up:
            window = self.cfg.restart.window_s
            why = f"{v.failures} failures within {window:g}s; last: {reason}"
            self._set_state(State.FAILED, reason=why, phase=None, pid=None)
            return Intent("idle")
        if (obs := self._poll_interrupt()) is not None:
            self._set_state(State.STARTING, reason=f"restart after: {reason}", phase="backoff", pid=None)
            return self._intent_for(obs)
        self._set_state(
            State.STARTING,
            reason=f"restart after: {reason}",
            phase="backoff",
            deadline=self.clock.time() + v.delay_s,
            pid=None,
        )
        self.events.emit("backoff", delay_s=v.delay_s, failures=v.failures)
        end = self.clock.monotonic() + v.delay_s
        while (obs := await self._next(end - self.clock.monotonic())) is not None:
            if isinstance(obs, (Cmd, Shutdown)):
                return self._intent_for(obs)
        self._publish(restarts=self.snap.restarts + 1)
        if self.metrics is not None:
            self.metrics.restart(kind)
        return Intent("start", self.spec, reason=f"automatic restart {self.snap.restarts} after {kind}")

    async def _stacks(self, tree: proctree.TreeRecord) -> dict[str, Any] | None:
        """Stacks and facts of every process of a hung tree (stacks.py), within timeouts.stacks_s:
        py-spy where ptrace is allowed, else faulthandler (SIGABRT: the tree dies anyway)."""
        budget = self.cfg.timeouts.stacks_s
        d = self.cfg.daemon
        work = stacks.collect(
            tree,
            self.host,
            budget_s=budget,
            mechanism=d.stacks,
            may_kill=True,
            faulthandler_env=launch.faulthandler_env(self.cfg),
            log_path=self.cfg.vllm.log_file,
            py_spy=d.py_spy,
        )
        try:
            r = await self._run(work, budget + 1.0)
        except Exception as e:  # noqa: BLE001 - forensics must never stop the recovery
            self.events.emit("stacks_failed", error=f"{type(e).__name__}: {e}")
            return None
        out = r.to_json()
        self.events.emit(
            "stacks",
            mechanism=r.mechanism,
            reason=r.reason,
            seconds=round(r.elapsed_s, 3),
            complete=r.complete,
            processes={p.label: p.state for p in r.processes},
        )
        return out

    def _incident(
        self,
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
                self.cfg,
                reason=reason,
                kind=kind or "reload_failed",
                lines=lines,
                tree=tree,
                events=list(self.events.recent),
                cleanup=report.to_json(),
                vllm_version=self.vllm_version,
                stacks=stacks,
            )
        except OSError as e:  # a full disk must not turn a recovery into a crash
            self.events.emit("incident_not_written", kind=kind, error=f"{type(e).__name__}: {e}")
            return
        if bundle is None:  # refused to write into a directory it cannot trust
            self.events.emit("incident_not_written", kind=kind, error="incidents directory refused")
            return
        self.events.emit("incident", path=str(bundle), kind=kind)

    # stop, idle ----------------------------------------------------------------------------

    async def _do_stop(self, it: Intent) -> Intent:
        self._stopping_for = "stop"
        if self._exiting and self.traffic is not None and self.tree is not None:
            limit = self.cfg.timeouts.shutdown_drain_s
            deadline = self.clock.time() + limit
            self._set_state(State.STOPPING, reason=it.reason, phase="drain", deadline=deadline)
            drained, left = await self._run(self._shutdown_drain(self.traffic, limit), limit + 1.0)
            self.events.emit("shutdown_drain", drained=drained, still_in_flight=left, limit_s=limit)
        self._set_state(State.STOPPING, reason=it.reason, phase="teardown")
        report = await self._teardown(it.reason or "stop", grace=self.cfg.timeouts.stop_grace_s)
        self._set_state(State.STOPPED, reason=it.reason, phase=None, pid=None, workers=0)
        if report.clean:
            self._reply(it.cmd, {"stopped": True, "cleanup": report.to_json()})
        else:
            self._reply(it.cmd, error=OperationFailed(f"stopped, but debris remains: {_remaining(report)}"))
        return Intent("exit") if self._exiting else Intent("idle")

    async def _shutdown_drain(self, traffic: Traffic, limit: float) -> tuple[bool, int]:
        """SIGTERM: the proxy already refuses what it has not forwarded; wait up to `limit` for
        the requests in flight to finish. Returns (all finished, how many were left)."""
        end = self.clock.monotonic() + limit
        while (n := traffic.in_flight()) > 0 and self.clock.monotonic() < end:
            await self.clock.sleep(0.05)
        return n == 0, n

    async def _do_idle(self, it: Intent) -> Intent:
        while not self._exiting:
            # Off-loaded: look at the proxy's held requests every heartbeat too (a Demand posted
            # while a teardown ran was dropped by that phase).
            obs = await self._next(HEARTBEAT_S if self._unloaded is not None else None)
            if self._unloaded is not None and (
                isinstance(obs, Demand) or (obs is None and self.traffic is not None and self.traffic.held())
            ):
                return self._load_on_demand(obs)
            if isinstance(obs, Shutdown):
                break
            if isinstance(obs, Cmd) and obs.name == "stop":
                self._publish(operation="stop")
                self._stopping_for = "stop"
                if self.snap.state == State.FAILED:
                    self._set_state(State.STOPPING, reason="operator stop", phase="cleanup")
                report = await self._cleanup_dead()
                if self.snap.state != State.STOPPED or self._unloaded is not None:
                    self._unloaded = None  # an operator's stop: requests are refused again
                    self._set_state(State.STOPPED, reason="operator stop")
                self._reply(obs, {"stopped": True, "note": "was not running", "cleanup": report.to_json()})
                continue
            if isinstance(obs, Cmd):
                return self._intent_for(obs)
        return Intent("exit")

    # off-load, load on demand, swap on request (issue 16) --------------------------------

    def _offload_due(self) -> Intent | None:
        """While serving, each heartbeat and on a Demand, from the proxy's view (never posted per
        request): a swap that held requests ask for, or an idle off-load."""
        px, tr = self.cfg.proxy, self.traffic
        if px is None or tr is None or self.snap.state != State.READY or self._ready_at is None:
            return None
        now = self.clock.monotonic()
        if px.swap_on_request:
            served = config_mod.served_models(self.cfg)
            hold_s = px.hold_timeout_s
            blocked = {m for m, t in self._swap_failed.items() if now - t < hold_s}
            loaded = self.snap.model
            choice = swap_target(
                now=now,
                loaded=loaded,
                ready_at=self._ready_at,
                waiting=tr.waiting(),
                models=set(served),
                last_use=tr.last_activity_at(loaded),
                in_flight=tr.in_flight(self.gen),
                min_resident_s=px.min_resident_s,
                blocked=blocked,
            )
            if choice.model is not None:
                self._od_pending = {
                    "kind": "swapped",
                    "cause": "request",
                    "from": loaded,
                    "to": choice.model,
                    "since": _iso(self.clock.time()),
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
            last = max(self._ready_at, tr.last_activity_at() or 0.0)
            if now - last >= idle_s:
                return Intent("unload", reason=f"no request for {now - last:.0f}s", failure_kind="idle")
        return None

    def _load_on_demand(self, obs: Demand | None) -> Intent:
        """Off-loaded, and a request waits: start the last loaded model, or, with swap_on_request,
        the configured model the oldest held request asks for. The proxy holds it until ready."""
        spec, cause = self.spec, self._unloaded or "idle"
        px = self.cfg.proxy
        if px is not None and px.swap_on_request and self.traffic is not None:
            served = config_mod.served_models(self.cfg)
            asked = {m: t for m, t in self.traffic.waiting().items() if m in served}
            if isinstance(obs, Demand) and obs.model in served and not asked:
                asked = {obs.model: 0.0}
            if asked:
                spec = served[str(min(asked, key=lambda m: (asked[m], str(m))))]
        served_name = spec.served_model_name or spec.name
        now = self.clock.monotonic()
        self._od_pending = {
            "kind": "loaded",
            "cause": cause,
            "to": served_name,
            "since": _iso(self.clock.time()),
            "t0": now,
        }
        held = self.traffic.held() if self.traffic is not None else 0
        self.events.emit("load_on_demand", model=served_name, cause=cause, held=held)
        return Intent("start", spec=spec, reason=f"on demand: a request after the {cause} off-load")

    def _on_demand_done(self) -> None:
        """A load on demand or a swap reached ready: its event, status and metrics."""
        p, self._od_pending = self._od_pending, None
        if p is None:
            return
        secs = round(self.clock.monotonic() - p.pop("t0"), 3)
        self._od_record(p.pop("kind"), seconds=secs, **p)

    def _od_record(self, kind: str, *, seconds: float, cause: str, **fields: Any) -> None:
        self._od[kind] += 1
        self._od["last"] = {
            "kind": kind,
            "cause": cause,
            "seconds": seconds,
            "at": _iso(self.clock.time()),
            **fields,
        }
        self.events.emit(kind, cause=cause, seconds=seconds, **fields)
        if self.metrics is not None:
            self.metrics.on_demand(kind, cause, seconds)

    async def _do_unload(self, it: Intent) -> Intent:
        """Off-load (`vsup unload`, or idle_unload_s): drain the requests in flight (bounded by
        timeouts.drain_s; new ones are held), tear down, clean, prove the machine clean (port,
        ledger, GPU memory where NVML sees it), then `stopped` with reason `idle` or `unloaded`
        and the route holding: the next request loads the model again. Debris left: `failed`."""
        cause = it.failure_kind or "operator"
        t0 = self.clock.monotonic()
        model = self.snap.model
        serving = self.snap.state in (State.READY, State.UNHEALTHY) and self.tree is not None
        phases: dict[str, float] = {}
        self._stopping_for = "unload"
        self._last_release = None
        reason = f"unload ({cause}): {it.reason}" if it.reason else f"unload ({cause})"
        if serving and self.traffic is not None:
            drain_s = self.cfg.timeouts.drain_s
            self._set_state(
                State.STOPPING, reason=reason, phase="drain", deadline=self.clock.time() + drain_s
            )
            interrupt, result = await self._watch(self._drain())
            if interrupt is not None:  # a shutdown: every command is busy while stopping
                what = interrupt.name if isinstance(interrupt, Cmd) else "daemon shutdown"
                self._reply(it.cmd, error=OperationFailed(f"unload cancelled by {what}"))
                return self._intent_for(interrupt)
            drained, busiest = result
            self.events.emit("drained", ok=drained, max_running=busiest)
            phases["drain"] = round(self.clock.monotonic() - t0, 3)
            self._set_phase("teardown")
        else:
            self._set_state(State.STOPPING, reason=reason, phase="teardown")
        t1 = self.clock.monotonic()
        report = await self._teardown(reason, grace=self.cfg.timeouts.stop_grace_s)
        phases["stop"] = round(self.clock.monotonic() - t1, 3)
        verify = await self._verify_clean()
        rel = self._last_release
        problem = (
            verify
            or (None if report.clean else f"debris remains: {_remaining(report)}")
            or (None if rel is None or rel.released else f"GPU memory not released: {rel.reason}")
        )
        if problem:
            self._set_state(
                State.FAILED, reason=f"unload: {problem}", phase=None, pid=None, workers=0, operation=None
            )
            self._reply(it.cmd, error=OperationFailed(f"unloaded, but {problem}"))
            return Intent("exit") if self._exiting else Intent("idle")
        secs = round(self.clock.monotonic() - t0, 3)
        if not self._exiting:
            self._unloaded = cause  # the route holds and posts Demand from here on
        self._set_state(
            State.STOPPED,
            reason="idle" if cause == "idle" else "unloaded",
            phase=None,
            pid=None,
            workers=0,
            operation=None,
        )
        gpu = None if rel is None else _as_dict(rel)
        self._od_record("unloaded", seconds=secs, cause=cause, model=model, phases=phases)
        self._reply(
            it.cmd,
            {"unloaded": True, "model": model, "seconds": secs, "cleanup": report.to_json(), "gpu": gpu},
        )
        return Intent("exit") if self._exiting else Intent("idle")

    # teardown and cleanup ------------------------------------------------------------------

    def start_extend_s(self) -> float:
        """systemd's start/reload timeout from a spawn: the readiness deadline, then, if the
        start fails, the bounded teardown of what it left."""
        return self.cfg.timeouts.start_s + FAILED_STOP_GRACE_S + self._cleanup_bound(ORPHAN_GRACE_S)

    def _cleanup_bound(self, grace: float) -> float:
        """How long one cleanup-engine run can take: its grace, SIGKILL's wait for the tree,
        the resource tracker's grace and SIGKILL wait, and the scans."""
        t = self.cfg.timeouts
        return grace + 2 * t.kill_wait_s + cleanup_mod.TRACKER_GRACE_S + SCAN_BOUND_S

    async def _cleanup(
        self, recs: list[proctree.TreeRecord], *, grace: float, **kw: Any
    ) -> cleanup_mod.Report:
        """The cleanup engine on `recs`, off the loop, with the configured kill wait."""
        return await self.offload(
            cleanup_mod.cleanup,
            recs,
            grace_s=grace,
            kill_wait_s=self.cfg.timeouts.kill_wait_s,
            host=self.host,
            **kw,
        )

    async def _teardown(self, reason: str, *, grace: float) -> cleanup_mod.Report:
        t = self.cfg.timeouts
        bound = grace + self._cleanup_bound(ORPHAN_GRACE_S) + t.gpu_release_s + SCAN_BOUND_S
        return await self._run(self._teardown_work(reason, grace=grace), bound)

    async def _teardown_work(self, reason: str, *, grace: float) -> cleanup_mod.Report:
        """Bounded stop: SIGTERM the API server, wait `grace`, then the cleanup engine kills
        whatever of the tree remains (engine core and workers before the resource_tracker, so
        the tracker unlinks what it registered) and unlinks what is left. Returns its report."""
        tree, t0 = self.tree, self.clock.monotonic()
        if tree is None:
            return await self._cleanup_dead_work()
        self.events.emit("teardown", reason=reason, grace_s=grace, pids=sorted({p.pid for p in tree.procs}))
        gpu_before = await self.offload(self.gpus.snapshot) if self.gpus is not None else None
        with contextlib.suppress(Exception):  # last look at what it holds
            tree = await self.offload(proctree.refresh, copy.deepcopy(tree), self.host)
        ledger_ok = self._ledger("upsert", replace(tree, ended=True))
        if self.leader is not None and self.leader_status is None:
            self.host.signal(tree.leader.pid, tree.leader.create_time, signal.SIGTERM)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._leader_gone.wait(), grace)
            # The API server shuts its engine core and workers down on SIGTERM: give them what
            # is left of the grace to follow it.
            end = t0 + grace
            while self.clock.monotonic() < end:
                if not await self.offload(proctree.live_members, tree, self.host):
                    break
                await self.clock.sleep(0.1)
            # The grace is spent: what is left (a server waiting on a hung request, a stopped
            # worker) is SIGKILLed now, as stop_grace_s promises, not given a second grace.
            cleanup_grace = 0.0
        else:
            # The API server died on its own (SIGKILL, crash): nobody will shut the rest down
            # gracefully; an orphaned engine core does not even act on SIGTERM (measured: 5 s
            # and no exit), so waiting only delays the restart.
            cleanup_grace = min(self.cfg.timeouts.cleanup_grace_s, ORPHAN_GRACE_S)
        self.gen += 1  # everything the old tree still says from here on is stale
        self._set_phase("cleanup")
        report = await self._cleanup([tree], grace=cleanup_grace)
        extra = (
            {} if ledger_ok else {"ledger": "not written: the next start or `vsup cleanup` may repeat this"}
        )
        self._cleanup_event("teardown", report, seconds=round(self.clock.monotonic() - t0, 3), **extra)
        if self.gpus is not None:
            rel = await self.offload(
                self.gpus.wait_released,
                {p.pid for p in tree.procs},
                self._gpu_baseline,
                timeout_s=self.cfg.timeouts.gpu_release_s,
                before=gpu_before,
            )
            self.events.emit("gpu_release", **_as_dict(rel))
            self._last_release = rel
        if report.clean:
            self._ledger("remove", tree.id)
        self.tree, self.leader = None, None
        self._publish(pid=None, workers=0)
        return report

    async def _cleanup_dead(self) -> cleanup_mod.Report:
        """Clean every tree the ledger knows except the live one (if any)."""
        bound = self._cleanup_bound(self.cfg.timeouts.cleanup_grace_s)
        return await self._run(self._cleanup_dead_work(), bound)

    async def _cleanup_dead_work(self) -> cleanup_mod.Report:
        recs = [r for r in self.ledger.load() if self.tree is None or r.id != self.tree.id]
        live = [self.tree] if self.tree is not None else []
        report = await self._cleanup(recs, grace=self.cfg.timeouts.cleanup_grace_s, live=live)
        if recs or report.killed or report.unlinked:
            self._cleanup_event("pre-start" if not live else "dead-trees", report)
        if report.clean:
            for r in recs:
                self._ledger("remove", r.id)
        return report

    async def _cmd_cleanup(self, cmd: Cmd) -> None:
        """`vsup cleanup`: dead trees' debris (and, asked, orphans); never the live tree."""
        a = cmd.args
        t = self.cfg.timeouts
        bound = self._cleanup_bound(t.cleanup_grace_s) + t.gpu_release_s
        try:
            result = await self._run(self._cmd_cleanup_work(a), bound)
        except Exception as e:  # noqa: BLE001 - the operator gets the error as the reply
            cmd.reply(error=OperationFailed(f"cleanup failed: {type(e).__name__}: {e}"))
            return
        cmd.reply(result)

    async def _cmd_cleanup_work(self, a: dict[str, Any]) -> dict[str, Any]:
        recs = [r for r in self.ledger.load() if self.tree is None or r.id != self.tree.id]
        live = [self.tree] if self.tree is not None else []
        dry = bool(a.get("dry_run"))
        before = await self.offload(self.gpus.snapshot) if self.gpus is not None else None
        report = await self._cleanup(
            recs,
            grace=self.cfg.timeouts.cleanup_grace_s,
            live=live,
            foreign=bool(a.get("foreign")),
            all_users=bool(a.get("all_users")),
            dry_run=dry,
        )
        gpu_freed = None
        if self.gpus is not None and not dry:
            from . import gpu

            killed = {k["pid"] for k in report.killed}
            timeout = self.cfg.timeouts.gpu_release_s
            gpu_freed = await self.offload(gpu.cleanup_summary, self.gpus, killed, before, timeout_s=timeout)
        if not dry:
            self._cleanup_event("operator", report)
            if report.clean:
                for r in recs:
                    self._ledger("remove", r.id)
        return {**report.to_json(), **({"gpu": gpu_freed} if gpu_freed else {})}

    def _cleanup_event(self, why: str, report: cleanup_mod.Report, **extra: Any) -> None:
        j = report.to_json()
        self.events.emit(
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
        if self.metrics is not None:
            self.metrics.cleanup(len(j["killed"]), len(j["unlinked"]), j["bytes_freed"])

    def _ledger(self, op: str, arg: Any) -> bool:
        """A ledger write that fails (a full disk) is said, never raised: the caller decides."""
        try:
            self.ledger.upsert(arg) if op == "upsert" else self.ledger.remove(arg)
        except (OSError, ValueError) as e:
            tree = arg.id if op == "upsert" else arg
            self.events.emit("ledger_write_failed", op=op, tree=tree, error=f"{type(e).__name__}: {e}")
            return False
        return True

    # reload --------------------------------------------------------------------------------

    async def _do_reload(self, it: Intent) -> Intent:
        cmd = it.cmd
        if cmd is not None and isinstance(cmd.args.get("cfg"), Config):
            self.cfg = cmd.args["cfg"]  # reload --current: the config read when it was accepted
            self.policy.cfg = self.cfg
        new, old = it.spec or self.spec, self.spec
        serving = self.snap.state in (State.READY, State.UNHEALTHY) and self.tree is not None
        t0 = self.clock.monotonic()
        phases: dict[str, float] = {}
        if self.notifier is not None:
            self.notifier.reloading()
        self._set_state(
            State.RELOADING,
            reason=f"{it.reason}: {old.name} -> {new.name}",
            phase="drain" if serving else "stop",
            operation=cmd.name if cmd else None,
        )

        async def phase(name: str) -> None:
            phases[name] = self.clock.monotonic()
            self._set_phase(name)
            if self.metrics is not None:
                self.metrics.reload_phase(name)
            if cmd is not None and cmd.request is not None:
                with contextlib.suppress(Exception):  # a client gone away does not stop the reload
                    await cmd.request.progress(phase=name, elapsed_s=round(self.clock.monotonic() - t0, 2))

        def done(name: str) -> None:
            dur = round(self.clock.monotonic() - phases[name], 3)
            self.events.emit("reload_phase", phase=name, seconds=dur)
            if self.metrics is not None:
                self.metrics.reload_phase_done(name, dur)

        def cancelled(obs: Cmd | Shutdown) -> Intent:
            what = obs.name if isinstance(obs, Cmd) else "daemon shutdown"
            self._reply(cmd, error=OperationFailed(f"reload cancelled by {what}"))
            return self._intent_for(obs)

        if serving:
            await phase("drain")
            interrupt, result = await self._watch(self._drain())
            if interrupt is not None:
                return cancelled(interrupt)
            done("drain")
            drained, busiest = result
            self.events.emit("drained", ok=drained, max_running=busiest)
        await phase("stop")
        report = await self._teardown(it.reason or "reload", grace=self.cfg.timeouts.stop_grace_s)
        done("stop")
        if (obs := self._poll_interrupt()) is not None:
            return cancelled(obs)
        await phase("cleanup")
        verify = await self._verify_clean()
        done("cleanup")
        if not (report.clean and verify is None):
            msg = verify or f"debris remains: {_remaining(report)}"
            self._set_state(State.FAILED, reason=f"reload aborted: {msg}", phase=None)
            self._reply(cmd, error=OperationFailed(msg))
            return Intent("idle")
        if new.model != old.model:
            self.policy.new_model()
        self.spec = new
        await phase("start")
        ok, detail, kind, obs = await self._start_tree(new, it.reason or "reload", in_reload=True)
        done("start")
        if obs is not None:
            return cancelled(obs)
        if ok:
            self._serving(new, f"{it.reason}: serving {new.name}")
            if self._od_pending is not None and self._od_pending["kind"] == "swapped":
                self._on_demand_done()
            phase_at = {k: round(v - t0, 3) for k, v in phases.items()}
            self._reply(
                cmd, {"model": new.name, "seconds": round(self.clock.monotonic() - t0, 3), "phases": phase_at}
            )
            self.policy.operator_acted()
            return Intent("serve")
        # Clean what the new model left; roll back to the previous model if it was serving.
        if it.failure_kind == "swap":  # not tried again while its held requests could still wait
            self._swap_failed[new.served_model_name or new.name] = self.clock.monotonic()
            self._od_pending = None
            self.events.emit("swap_failed", model=new.served_model_name or new.name, reason=detail)
        lines, tree = self.log.since_spawn(), self.tree
        await phase("rollback" if serving else "teardown")
        report = await self._teardown(f"reload of {new.name} failed", grace=FAILED_STOP_GRACE_S)
        self._incident(detail, kind, lines, tree, report)
        msg = f"reload to {new.name} failed: {detail}"
        if not serving:
            self._set_state(State.FAILED, reason=msg, phase=None, operation=None)
            self._reply(cmd, error=OperationFailed(msg))
            return Intent("idle")
        self.spec = old
        if new.model != old.model:
            self.policy.new_model()
        ok2, detail2, _, obs2 = await self._start_tree(old, "rollback", in_reload=True)
        done("rollback")
        if ok2:
            self._serving(old, f"rolled back to {old.name} after: {detail}")
            self._reply(cmd, error=OperationFailed(msg + f"; rolled back, {old.name} serves again"))
            return Intent("serve")
        self._reply(cmd, error=OperationFailed(msg + f"; rollback to {old.name} failed too: {detail2}"))
        if obs2 is not None:
            return self._intent_for(obs2)
        self._stopping_for = "failed"
        self._set_state(
            State.STOPPING, reason=f"rollback failed: {detail2}", phase="teardown", operation=None
        )
        await self._teardown("rollback failed", grace=FAILED_STOP_GRACE_S)
        self._set_state(State.FAILED, reason=f"{msg}; rollback failed: {detail2}", phase=None)
        return Intent("idle")

    def _serving(self, spec: ModelConfig, reason: str) -> None:
        served = spec.served_model_name or spec.name
        self._set_state(
            State.READY, reason=reason, phase=None, operation=None, model=served, model_path=spec.model
        )
        if self.notifier is not None:
            self.notifier.ready(self.status_line())

    async def _watch(self, work: Any) -> tuple[Cmd | Shutdown | None, Any]:
        """Run `work` (a watch that may be abandoned) until it ends or a command/shutdown the
        current state accepts arrives: (interrupt, None) or (None, its result). Polls the
        queue: cancelling `_next()` could cut an operator's cleanup in half."""
        task = self._spawn_task(work)
        try:
            while not task.done():
                obs = await self._next(WATCH_POLL_S)
                if isinstance(obs, (Cmd, Shutdown)):
                    return obs, None
            return None, task.result()
        finally:
            task.cancel()

    async def _drain(self) -> tuple[bool, float]:
        if self.traffic is not None:
            return await watchers.drain_traffic(self.cfg, self.traffic, self.gen, self.clock)
        return await watchers.drain(self.cfg, self.make_prober(self.cfg, self.spec), self.clock)

    async def _verify_clean(self) -> str | None:
        """Prove the machine is clean before a new model: port free, no tree process left."""
        holder = cleanup_mod.port_holder(self.cfg.vllm.port, self.host)
        if holder is not None:
            return f"port {self.cfg.vllm.port} still held by pid {holder.get('pid')} ({holder.get('name')})"
        leftovers = self.ledger.load()
        if leftovers:
            return f"ledger still lists trees {[r.id for r in leftovers]}"
        return None

    def _root_cause(self, fallback: str) -> str:
        try:
            from . import diagnose

            d = diagnose.analyze(self.log.since_spawn())
            if d.root_cause and d.root_cause.strip() != fallback.strip():
                return f"{fallback}; root cause: {d.root_cause}"
        except Exception:  # noqa: BLE001 - the root cause is a bonus; the reason stands without it
            return fallback
        return fallback


# ---- helpers -------------------------------------------------------------------------------


def _drain_queue(q: asyncio.Queue[Any]) -> list[Any]:
    out = []
    while True:
        try:
            out.append(q.get_nowait())
        except asyncio.QueueEmpty:
            return out


def _only_canary(strikes: list[str]) -> bool:
    return all(s.startswith("canary:") for s in strikes)


def _remaining(report: cleanup_mod.Report) -> str:
    items = report.to_json().get("remaining", [])
    return ", ".join(str(i.get("name") or i.get("pid")) + f" ({i.get('reason')})" for i in items[:5]) or "?"


def _redact(text: str) -> str:
    try:
        from .redact import redact
    except ImportError:
        return text
    return redact(text)


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + "Z"


def _tb(e: BaseException) -> list[str]:
    return [ln.rstrip() for ln in traceback.format_exception(e)[-6:]]


def _as_dict(obj: Any) -> dict[str, Any]:
    if hasattr(obj, "to_json"):
        return dict(obj.to_json())
    if hasattr(obj, "__dataclass_fields__"):
        import dataclasses

        return dataclasses.asdict(obj)
    return {"result": repr(obj)}


def main(cfg: Config, *, autostart: bool = True) -> int:
    from . import runtime

    return runtime.main(cfg, autostart=autostart)
