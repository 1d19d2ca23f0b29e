"""The owner: one asyncio task owns the lifecycle of one vLLM server.

Data flows one way. Observations (observations.py: child exits, log signatures, probe results,
the refresher's look at the tree, the proxy's reports, operator commands, signals) go into one
queue; the owner task (`Supervisor._main`) reads them, decides, and acts through the host seam,
the spawner and the cleanup engine. The `Snapshot` that `status` shows and the `Route` the proxy
follows are replaced in one place, `_publish`. There are no locks: only the owner writes state.

The owner's work is a sequence of *intents* (start, serve, recover, stop, idle, reload, unload,
exit); each phase is a coroutine that returns the next intent. Phases that wait read the queue
(inbox.py) through `_next()`, so a command or a death is noticed while waiting. Steps that
cannot stop half-way (a teardown, a cleanup) run under `_run()`, which keeps answering commands
meanwhile (status, busy) and keeps what must wait for the phase (an accepted stop) in a backlog.

This file is the lifecycle: state, publishing, the queue's decisions (`_absorb`, `_answer`),
`_intent_for`, and the phases start, stop and idle. The longer steps live beside it and
take the owner as an explicit collaborator; they change state only through `_set_state`,
`_set_phase`, `_publish` and the few tree/model setters below (`_begin_generation`,
`_hold_tree`, `_mark_ready`, `_retire_generation`, `_tree_gone`, `_begin_stop`, `_use`):
starting.py (pre-clean, spawn, readiness; the refresher), detection.py (the serve phase:
strikes, confirmation; incidents and stacks), reload.py (reload, swap, rollback), ondemand.py
(off-load, load on demand, swap on request; the unload phase), recovery.py (the recover phase:
teardown, incident, backoff), overlapped.py (a reload with both trees up), teardown.py
(teardown, cleanup, the ledger, proof of a clean machine). views.py reads the state for the
proxy's route, `vsup status` and systemd's STATUS= line, and writes nothing.

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
import contextlib
import functools
import traceback
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import replace
from typing import TYPE_CHECKING, Any, ParamSpec, Protocol, TypeVar

from . import (
    commands,
    detection,
    incidents,
    launch,
    ondemand,
    overlapped,
    probes,
    proctree,
    recovery,
    starting,
    teardown,
    views,
    watchers,
)
from . import config as config_mod
from . import reload as reload_mod
from .commands import Answer
from .config import Config, ModelConfig
from .events import EventLog
from .gate import Demand, Gate, Route, Traffic
from .host import Host
from .inbox import HEARTBEAT_S, Inbox
from .observations import Cmd, Exited, Intent, Observation, OperationFailed, Shutdown, TreeSeen
from .policy import RestartPolicy
from .probes import Prober
from .redact import redact
from .states import Snapshot, State, check
from .teardown import FAILED_STOP_GRACE_S
from .watchers import Clock

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


__all__ = ["HEARTBEAT_S", "Supervisor", "main"]

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
        factory = prober or _default_prober
        # The owner's own config means the live tree, whose port is an overlapped reload's own
        # after one (issue 23); a config made for another tree (the old one's drain) is kept.
        self.make_prober: ProberFactory = lambda cfg, spec: factory(
            self._tree_cfg() if cfg is self.cfg else cfg, spec
        )
        self.spawner: launch.Spawner = spawner or launch.RealSpawner(self.host)
        self.offload: Offload = offload or asyncio.to_thread  # blocking host work, off the loop
        self.gate = gate or Gate()
        self.traffic = traffic  # the proxy's read-only view, when there is one
        self.snap = Snapshot()
        self.ledger = proctree.Ledger(cfg.state_dir)
        self.spec: ModelConfig = cfg.model_spec()
        self.policy = RestartPolicy(cfg)
        self.inbox = Inbox(self.clock, self._absorb, functools.partial(teardown.cmd_cleanup, self))
        self.gen = 0
        self._gen_hi = 0  # the highest generation handed out: never reused (overlapped.py)
        self.tree: proctree.TreeRecord | None = None
        # Issue 23: an overlapped reload in progress (the old tree set aside while the new loads)
        self.overlap: overlapped.Overlap | None = None
        self.leader: launch.Spawned | None = None
        self.leader_status: int | None = None
        self._leader_gone = asyncio.Event()
        self.log = watchers.LogWatch(self.post, lambda: self.gen, self.clock, redact)
        self._last_status: str | None = None
        self._exiting = False
        self.exit_code = 0  # what `vsup run` exits with (1: the server ended failed, exit_on_failed)
        self._stopping_for = "stop"  # what a `stopping` leads to: stop | restart | failed
        self._tasks: set[asyncio.Task[Any]] = set()
        self._gpu_baseline: dict[int, int] | None = None
        self._ready_at: float | None = None  # monotonic time the current tree became ready
        # Issue 16. Off-loaded (cause: idle | operator): `stopped`, the route holding, and a
        # request loads the model again. The on-demand book: ondemand.OnDemand.
        self._unloaded: str | None = None
        self.od = ondemand.OnDemand(self.clock, self.events)
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
        return views.route(self)

    def _set_state(
        self,
        state: State,
        *,
        reason: str | None = None,
        phase: str | None = None,
        deadline: float | None = None,
        unloaded: str | None = None,
        **changes: Any,
    ) -> None:
        """Checks the table, emits one event. `unloaded` (with `stopped`): off-loaded for that
        cause, so the route holds requests and a request loads the model again."""
        old = self.snap.state
        if state != old:
            check(old, state)
        if state == State.FAILED and self.cfg.daemon.exit_on_failed and not self._exiting:
            self._exit_failed(reason)
        if state != State.STOPPED:
            self._unloaded = None  # off-loaded only while stopped
        elif unloaded is not None:
            self._unloaded = unloaded
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
        return views.status_line(self.snap)

    def status(self) -> dict[str, Any]:
        """What `vsup status` shows (views.py: the owner's state, read, never written)."""
        return views.status(self)

    # -- the queue ---------------------------------------------------------------------------

    def post(self, obs: Observation) -> None:
        """Any source, any time (on the loop thread): hand the owner an observation."""
        self.inbox.post(obs)

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

    def _absorb(self, obs: Observation) -> Observation | None:
        """What the owner handles the same way in every phase. Returns what the phase must see
        (None when the observation is done with)."""
        if self.overlap is not None and overlapped.absorb(self, obs):
            return None  # the old tree's, during an overlapped reload (issue 23)
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

    # the phases wait through the inbox (inbox.py); these name its calls in the owner's terms
    async def _next(self, timeout: float | None = None) -> Observation | None:
        return await self.inbox.next(timeout)

    async def _run(self, work: Coroutine[Any, Any, R], bound_s: float) -> R:
        return await self.inbox.run(work, bound_s)

    def _poll_interrupt(self) -> Cmd | Shutdown | None:
        return self.inbox.poll_interrupt()

    def _bounded(self, seconds: float) -> contextlib.AbstractContextManager[None]:
        return self.inbox.bounded(seconds)

    @property
    def _heartbeat(self) -> float:
        return self.inbox.heartbeat

    @property
    def _bounded_until(self) -> float:
        return self.inbox.bounded_until

    def _spawn_task(self, coro: Coroutine[Any, Any, R]) -> asyncio.Task[R]:
        t = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)
        return t

    def _reply(self, cmd: Cmd | None, result: Any = None, error: BaseException | None = None) -> None:
        if cmd is None:
            return
        cmd.reply(result, error)
        if self.snap.operation == cmd.name:
            self._publish(operation=None)

    # -- the tree, the generation, the model: written here, asked for by the phases' helpers --

    def _next_gen(self) -> int:
        """A generation never handed out before (an overlap's rollback restores an older one)."""
        self._gen_hi = max(self._gen_hi, self.gen) + 1
        return self._gen_hi

    def _port(self) -> int:
        """The live tree's port: [vllm].port, or an overlapped reload's own port (issue 23)."""
        return self.tree.port if self.tree is not None and self.tree.port else self.cfg.vllm.port

    def _tree_cfg(self) -> Config:
        """The config as the live tree's probes see it (its port)."""
        port = self._port()
        if port == self.cfg.vllm.port:
            return self.cfg
        return replace(self.cfg, vllm=replace(self.cfg.vllm, port=port))

    def _restore_tree(
        self,
        leader: launch.Spawned | None,
        tree: proctree.TreeRecord,
        gen: int,
        status: int | None,
        ready_at: float | None,
    ) -> None:
        """An overlapped reload rolled back: the old tree, never stopped, is the live one again
        with its own generation (what the torn-down new tree still says is stale)."""
        self.leader, self.tree, self.gen = leader, tree, gen
        self.leader_status, self._ready_at = status, ready_at
        self._leader_gone = asyncio.Event()
        if status is not None:
            self._leader_gone.set()

    def _begin_generation(self, gpu_baseline: dict[int, int] | None) -> None:
        """A new tree is about to be spawned: what the old one still says is stale from now."""
        if gpu_baseline is not None:
            self._gpu_baseline = gpu_baseline
        self.gen = self._next_gen()
        self._leader_gone.clear()
        self.leader_status = None
        self._ready_at = None
        self.log.new_tree()

    def _hold_tree(self, spawned: launch.Spawned | None) -> None:
        """The tree just spawned (or None: it was killed before it was recorded)."""
        self.leader, self.tree = spawned, (spawned.tree if spawned is not None else None)

    def _mark_ready(self) -> None:
        self._ready_at = self.clock.monotonic()

    def _retire_generation(self) -> None:
        """A teardown is cleaning the tree: everything it still says from here on is stale."""
        self.gen = self._next_gen()

    def _tree_gone(self, release: Any = None) -> None:
        """A teardown ended: no tree, and the GPU release report (NVML) when there is one."""
        if release is not None:
            self._last_release = release
        self.tree, self.leader = None, None
        self._publish(pid=None, workers=0)

    def _begin_stop(self, stopping_for: str) -> None:
        """What the coming `stopping` leads to (the route holds for restart and unload)."""
        self._stopping_for = stopping_for
        self._last_release = None

    def _use(self, *, spec: ModelConfig | None = None, cfg: Config | None = None) -> None:
        """The model (and, reload --current, the config) the next start uses."""
        if cfg is not None:
            self.cfg = cfg
            self.policy.cfg = cfg
        if spec is not None:
            self.spec = spec

    async def _start_tree(
        self, spec: ModelConfig, reason: str, *, in_reload: bool, port: int | None = None
    ) -> starting.Started:
        """Pre-clean, spawn, prove ready: starting.py. `port`: an overlapped reload's own."""
        return await starting.start_tree(self, spec, reason, in_reload=in_reload, port=port)

    def start_extend_s(self) -> float:
        """systemd's start/reload timeout from a spawn (teardown.start_extend_s)."""
        return teardown.start_extend_s(self.cfg.timeouts)

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
        bound = teardown.cleanup_bound(self.cfg.timeouts, self.cfg.timeouts.cleanup_grace_s)
        await self._run(teardown.adopt_leftovers(self), bound)
        intent = Intent("start", self.spec, reason="launch") if self.autostart else Intent("idle")
        if not self.autostart:
            self._set_state(State.STOPPED, reason="autostart disabled")
        phases: dict[str, Callable[[Intent], Awaitable[Intent]]] = {
            "start": self._do_start,
            "serve": self._do_serve,
            "recover": self._do_recover,
            "stop": self._do_stop,
            "idle": self._do_idle,
            "reload": self._do_reload,
            "unload": functools.partial(ondemand.unload, self),
        }
        while intent.kind != "exit":
            try:
                intent = await phases[intent.kind](intent)
            except Exception as e:  # noqa: BLE001 - a bug in a phase ends in failed and a clean machine, not a dead owner
                intent = await self._internal_error(e, intent)
        if self.tree is not None:
            await teardown.teardown(self, "daemon shutdown", grace=self.cfg.timeouts.stop_grace_s)
        from .control import CommandError

        for obs in self.inbox.leftovers():
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
            report = await teardown.teardown(self, reason, grace=FAILED_STOP_GRACE_S)
            detection.record_incident(self, reason, "internal_error", lines, tree, report)
            self._set_state(State.FAILED, reason=reason, phase=None, operation=None, pid=None, workers=0)
        except Exception as e2:  # noqa: BLE001 - the teardown after a bug may fail too: said, then failed
            self.events.emit("internal_error", error=f"{type(e2).__name__}: {e2}", intent="teardown")
            self._publish(state=State.FAILED, reason=f"{reason}; teardown failed: {e2}", phase=None)
        return Intent("exit") if self._exiting else Intent("idle")

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
            self.od.done("loaded", self.metrics)
            return Intent("serve")
        if obs is not None:  # a command interrupted the start
            what = obs.name if isinstance(obs, Cmd) else "shutdown"
            self._reply(it.cmd, error=OperationFailed(f"start interrupted by {what}"))
            return self._intent_for(obs)
        # an operator start that fails goes through the same recovery (backoff, ladder,
        # crash-loop limit); the operator gets the root cause now.
        self._reply(it.cmd, error=OperationFailed(detail))
        return Intent("recover", reason=detail, failure_kind=kind)

    def _apply_tree(self, seen: TreeSeen) -> None:
        old, rec = self.tree, seen.record
        if old is None or rec.id != old.id:
            return
        self.tree = rec
        if seen.workers != self.snap.workers:
            self._publish(workers=seen.workers)
        teardown.ledger_refresh(self, old, rec)
        if self.metrics is not None and self.gpus is not None:
            starting.gpu_metrics(self.metrics, self.gpus, rec)

    # serve ---------------------------------------------------------------------------------

    async def _do_serve(self, it: Intent) -> Intent:
        """Serve, watch, confirm a hang or a death: detection.py."""
        return await detection.serve(self, it)

    # recover -------------------------------------------------------------------------------

    async def _do_recover(self, it: Intent) -> Intent:
        """Tear the failed tree down, record the incident, back off, start again: recovery.py."""
        return await recovery.recover(self, it)

    # stop, idle ----------------------------------------------------------------------------

    async def _do_stop(self, it: Intent) -> Intent:
        self._stopping_for = "stop"
        if self._exiting and self.traffic is not None and self.tree is not None:
            limit = self.cfg.timeouts.shutdown_drain_s
            deadline = self.clock.time() + limit
            self._set_state(State.STOPPING, reason=it.reason, phase="drain", deadline=deadline)
            drained, left = await self._run(
                teardown.shutdown_drain(self.clock, self.traffic, limit), limit + 1.0
            )
            self.events.emit("shutdown_drain", drained=drained, still_in_flight=left, limit_s=limit)
        self._set_state(State.STOPPING, reason=it.reason, phase="teardown")
        report = await teardown.teardown(self, it.reason or "stop", grace=self.cfg.timeouts.stop_grace_s)
        self._set_state(State.STOPPED, reason=it.reason, phase=None, pid=None, workers=0)
        if report.clean:
            self._reply(it.cmd, {"stopped": True, "cleanup": report.to_json()})
        else:
            self._reply(
                it.cmd, error=OperationFailed(f"stopped, but debris remains: {teardown.remaining(report)}")
            )
        return Intent("exit") if self._exiting else Intent("idle")

    async def _do_idle(self, it: Intent) -> Intent:
        while not self._exiting:
            # Off-loaded: look at the proxy's held requests every heartbeat too (a Demand posted
            # while a teardown ran was dropped by that phase).
            obs = await self._next(HEARTBEAT_S if self._unloaded is not None else None)
            if self._unloaded is not None and (
                isinstance(obs, Demand) or (obs is None and self.traffic is not None and self.traffic.held())
            ):
                demand = obs if isinstance(obs, Demand) else None
                return self.od.load(self.cfg, self.traffic, self.spec, self._unloaded, demand)
            if isinstance(obs, Shutdown):
                break
            if isinstance(obs, Cmd) and obs.name == "stop":
                self._publish(operation="stop")
                self._stopping_for = "stop"
                if self.snap.state == State.FAILED:
                    self._set_state(State.STOPPING, reason="operator stop", phase="cleanup")
                report = await teardown.cleanup_dead(self)
                if self.snap.state != State.STOPPED or self._unloaded is not None:
                    self._unloaded = None  # an operator's stop: requests are refused again
                    self._set_state(State.STOPPED, reason="operator stop")
                self._reply(obs, {"stopped": True, "note": "was not running", "cleanup": report.to_json()})
                continue
            if isinstance(obs, Cmd):
                return self._intent_for(obs)
        return Intent("exit")

    # reload --------------------------------------------------------------------------------

    async def _do_reload(self, it: Intent) -> Intent:
        """Drain, stop, clean, start the new model, roll back if it fails: reload.py."""
        return await reload_mod.reload(self, it)

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
        return await watchers.drain(self.cfg, self.make_prober(self._tree_cfg(), self.spec), self.clock)


# ---- helpers -------------------------------------------------------------------------------


def _tb(e: BaseException) -> list[str]:
    return [ln.rstrip() for ln in traceback.format_exception(e)[-6:]]


def main(cfg: Config, *, autostart: bool = True) -> int:
    from . import runtime

    return runtime.main(cfg, autostart=autostart)
