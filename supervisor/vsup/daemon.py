"""The daemon: one asyncio task owns the lifecycle of one vLLM server.

Data flows one way: observations (child exits, log signatures, probe results, operator
commands) go into one queue; the owner task (`Supervisor._main`) reads them, decides, and acts;
`status` readers see an immutable `Snapshot` that only `_set_state` replaces. There are no
locks around state: only the owner writes it, and the loop is single-threaded.

The owner's work is a sequence of *intents* (start, serve, recover, stop, reload, idle, exit);
each phase is a coroutine that returns the next intent. Phases that wait read the queue through
`_next()`, so a command or a death is noticed while waiting, never after.

Invariants worth keeping:
- vsup is the child subreaper of everything it spawns and the only child-waiter in this
  process (`_reap` uses waitpid(-1)); the daemon therefore never starts other subprocesses.
- Every observation from a server carries the generation (`gen`) of the tree that produced
  it; a phase ignores stale ones, so a death line of the old tree cannot fail the new start.
- Any exit of the API server is a failure unless vsup asked for the stop: vLLM exits 0 after
  a worker dies (vllm-facts.md), which restart-on-failure supervisors never restart.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import shutil
import signal
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from . import cleanup as cleanup_mod
from . import config as config_mod
from . import incidents, proctree
from .config import Config, ModelConfig, Remedy
from .events import EventLog
from .probes import Prober, ProbeResult
from .states import Snapshot, State, check

# Signature kinds that end a server at once (engine death is acted on whether or not the API
# server exits), kinds that are one strike against a ready server, and start-up failures.
FATAL_KINDS = frozenset({"engine_dead", "worker_died", "oom", "nccl_error", "startup_failed"})
STRIKE_KINDS = frozenset({"shm_stall"})
# A failure of these kinds within the first requests of a TP>1 server is what the remedy
# ladder (the seed's --disable-custom-all-reduce) addresses.
LADDER_KINDS = frozenset({"engine_dead", "worker_died", "hang", "exited"})
EARLY_REQUESTS = 3  # "at the first requests": this many completions served, or fewer
# Stopping a failed server (hung, engine dead, failed reload): its clients' requests will never
# complete, and vLLM 0.32 blocks in "Waiting for connections to close" while they are open, so
# a long grace only delays the restart. stop_grace_s is for operators' stops and reloads.
FAILED_STOP_GRACE_S = 3
DRAIN_IDLE_S = 1.0  # reload's drain: no running or waiting request for this long
ORPHAN_GRACE_S = 1.0  # SIGTERM-to-SIGKILL for what is left when the API server died by itself
LOG_ROTATE_BYTES = 256 << 20
LOG_KEEP = 3
LINE_RING = 4000
# Tree record refresh (new members, held shm): often while the tree forms (engine core, workers
# and segments all exist before the first completion), then rarely: a refresh costs ~6 ms of
# /proc reading, most of an idle daemon's CPU at 2 s.
REFRESH_S = 2.0
REFRESH_SETTLED_S = 15.0
REFRESH_AFTER_READY_S = 20.0
HEARTBEAT_S = 1.0  # the owner wakes at least this often (watchdog pings depend on it)


# ---- observations ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Exited:
    gen: int
    pid: int
    status: int  # waitpid-style exit code (negative: killed by that signal)


@dataclass(frozen=True)
class LogSignal:
    gen: int
    kind: str
    sig_id: str
    message: str  # redacted
    process: str | None
    pid: int | None
    at: float  # monotonic time the line was read


@dataclass(frozen=True)
class Probe:
    gen: int
    result: ProbeResult


@dataclass(frozen=True)
class ReadyProven:
    gen: int


@dataclass(frozen=True)
class NotReady:
    gen: int
    detail: str


@dataclass
class Cmd:
    name: str
    args: dict[str, Any]
    request: Any | None  # control.Request (progress) or None (internal)
    future: asyncio.Future[Any] = field(repr=False, default=None)  # type: ignore[assignment]


@dataclass(frozen=True)
class Shutdown:
    signame: str


@dataclass(frozen=True)
class Intent:
    kind: str  # start | serve | recover | stop | idle | reload | exit
    spec: ModelConfig | None = None
    reason: str | None = None
    failure_kind: str | None = None
    cmd: Cmd | None = None


class OperationFailed(Exception):
    """An operator operation ran and failed; the message carries the root cause."""


# ---- the supervisor -----------------------------------------------------------------------


class Supervisor:
    def __init__(
        self, cfg: Config, *, events: EventLog | None = None, autostart: bool = True, notifier: Any = None
    ) -> None:
        self.cfg = cfg
        self.autostart = autostart
        self.events = events or EventLog(cfg.state_dir)
        self.snap = Snapshot()
        self.ledger = proctree.Ledger(cfg.state_dir)
        self.spec: ModelConfig = cfg.model_spec()
        self.q: asyncio.Queue[Any] = asyncio.Queue()
        self.gen = 0
        self.tree: proctree.TreeRecord | None = None
        self.popen: Any = None
        self.leader_status: int | None = None
        self._leader_gone = asyncio.Event()
        self._op: str | None = None  # operator operation reserved (busy otherwise)
        self._failures: collections.deque[float] = collections.deque()
        self._kind_failures: collections.Counter[str] = collections.Counter()
        self.remedy_level = 0
        self._lines: collections.deque[str] = collections.deque(maxlen=LINE_RING)
        self._lines_at_spawn = 0  # total lines seen when the current tree started
        self._lines_total = 0
        self._served_since_ready = 0
        self._heartbeat = time.monotonic()
        self._bounded_until = 0.0  # monotonic deadline of a bounded phase in progress
        self._last_status: str | None = None
        self._exiting = False
        self._signals_seen = 0
        self._tasks: set[asyncio.Task[Any]] = set()
        self._tailer: Any = None
        self._gpu_baseline: dict[int, int] | None = None
        self._ready_at: float | None = None  # monotonic time the current tree became ready
        self._catalog: Any = None
        self._parse: Any = None
        self.notifier = notifier
        self.metrics: Any = None
        self.gpus: Any = None
        self.vllm_version = incidents.vllm_version(cfg.vllm.python)

    # -- state ----------------------------------------------------------------------------

    def _set_state(
        self,
        state: State,
        *,
        reason: str | None = None,
        phase: str | None = None,
        deadline: float | None = None,
        **changes: Any,
    ) -> None:
        """The one place the state changes. Checks the table, emits one event."""
        old = self.snap.state
        if state != old:
            check(old, state)
        self.snap = replace(
            self.snap,
            state=state,
            reason=reason,
            phase=phase,
            deadline=deadline,
            since=time.time() if state != old else self.snap.since,
            **changes,
        )
        self.events.bind(state=str(state), model=self.snap.model, pid=self.snap.pid)
        self.events.emit("state", old=str(old), phase=phase, reason=reason)
        self._notify_status()
        if self.metrics is not None:
            self.metrics.set_state(str(state))

    def _set_phase(self, phase: str, deadline: float | None = None, **fields: Any) -> None:
        self.snap = replace(self.snap, phase=phase, deadline=deadline)
        self.events.emit("phase", phase=phase, **fields)
        self._notify_status()

    def _notify_status(self) -> None:
        """STATUS= only when the line changed: the notify socket's queue is short (10 here)."""
        line = self.status_line()
        if self.notifier is not None and line != self._last_status:
            self._last_status = line
            self.notifier.status(line)

    def status_line(self) -> str:
        s = self.snap
        bits = [f"{s.state}"]
        if s.phase:
            bits[0] += f" ({s.phase})"
        if s.model:
            bits.append(s.model)
        if s.workers:
            bits.append(f"{s.workers} workers")
        bits.append(f"{s.restarts} restarts")
        line = ": ".join([bits[0], ", ".join(bits[1:])])
        if s.reason and s.state in (State.FAILED, State.UNHEALTHY, State.STOPPING):
            line += f" - {s.reason}"
        return line[:200]

    def status(self) -> dict[str, Any]:
        out = self.snap.to_json()
        out["vllm_version"] = self.vllm_version
        out["tree"] = None
        if self.tree is not None:
            out["tree"] = {
                "id": self.tree.id,
                "sid": self.tree.sid,
                "pids": sorted({p.pid for p in self.tree.procs}),
            }
        if self.gpus is not None:
            from . import gpu

            pids = {p.pid for p in self.tree.procs} if self.tree else set()
            with contextlib.suppress(Exception):
                out["gpus"] = gpu.status_summary(self.gpus, pids)
        return out

    # -- observation plumbing --------------------------------------------------------------

    async def _next(self, timeout: float | None = None) -> Any:
        """Next observation relevant to the current tree, or None when `timeout` passes."""
        end = None if timeout is None else time.monotonic() + timeout
        while True:
            self._heartbeat = time.monotonic()
            wait = HEARTBEAT_S if end is None else min(HEARTBEAT_S, end - time.monotonic())
            if wait <= 0:
                return None
            try:
                obs = await asyncio.wait_for(self.q.get(), wait)
            except TimeoutError:
                continue
            if getattr(obs, "gen", self.gen) != self.gen:
                continue  # from a tree that is already gone
            if isinstance(obs, Cmd) and obs.name == "cleanup":
                await self._cmd_cleanup(obs)  # safe at any wait point: never touches the live tree
                continue
            return obs

    def _spawn_task(self, coro: Any) -> asyncio.Task[Any]:
        t = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)
        return t

    def _reap(self) -> None:
        """SIGCHLD: reap every child (the leader, and orphans reparented to us as subreaper)."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            code = os.waitstatus_to_exitcode(status)
            if self.popen is not None and pid == self.popen.pid:
                self.popen.returncode = code
                self.leader_status = code
                self._leader_gone.set()
                self.q.put_nowait(Exited(self.gen, pid, code))

    def _on_lines(self, lines: list[str]) -> None:
        """Tailer lines, on the loop thread: parse, match, keep a ring, post what matters."""
        now = time.monotonic()
        for raw in lines:
            self._lines.append(raw)
            self._lines_total += 1
            if self._parse is None:
                continue
            m = self._catalog.match(self._parse(raw))
            if m is None:
                continue
            kind = m.sig.kind
            if kind == "serving":
                g = m.groups
                if (
                    g.get("method") == "POST"
                    and str(g.get("path", "")).startswith("/v1/")
                    and g.get("status") == 200
                ):
                    self._served_since_ready += 1  # completions served: "the first requests"
                continue
            if kind in FATAL_KINDS or kind in STRIKE_KINDS or kind == "ready":
                self.q.put_nowait(
                    LogSignal(
                        self.gen, kind, m.sig.id, _redact(m.line.message), m.line.process, m.line.pid, now
                    )
                )

    async def _catch_up_log(self, timeout: float = 1.5) -> None:
        """Let the tailer reach the end of the log before explaining a failure: the exit
        (SIGCHLD) usually arrives before the tailer thread has read the dying words."""
        if self._tailer is None:
            return
        try:
            size = os.stat(self.cfg.vllm.log_file).st_size
        except OSError:
            return
        end = time.monotonic() + timeout
        while getattr(self._tailer, "position", size) < size and time.monotonic() < end:
            await asyncio.sleep(0.02)
        await asyncio.sleep(0)  # let call_soon_threadsafe'd line batches run

    async def _settle_log(self, quiet_s: float = 0.5, max_s: float = 3.0) -> None:
        """Wait until the log has been quiet for `quiet_s` (at most `max_s`): a fatal line is
        followed by the traceback that names the cause, often from another process."""
        end = time.monotonic() + max_s
        seen = self._lines_total
        while time.monotonic() < end:
            await asyncio.sleep(quiet_s)
            if self._lines_total == seen:
                return
            seen = self._lines_total

    def lines_since_spawn(self) -> list[str]:
        n = min(self._lines_total - self._lines_at_spawn, len(self._lines))
        return list(self._lines)[-n:] if n > 0 else []

    # -- running ------------------------------------------------------------------------------

    async def run(self) -> int:
        """Run until SIGTERM/SIGINT; returns the process exit code."""
        loop = asyncio.get_running_loop()
        self._setup_optional()
        from .host import Host

        Host().set_child_subreaper()
        loop.add_signal_handler(signal.SIGCHLD, self._reap)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)
        loop.add_signal_handler(signal.SIGHUP, self._on_sighup)
        tailer = self._tailer = self._start_tailer(loop)
        server = await self._start_control()
        try:
            self.events.emit(
                "daemon_started",
                version=_version(),
                config=str(self.cfg.path),
                vllm_version=self.vllm_version,
                socket=str(self.cfg.socket),
            )
            # READY=1 as soon as commands are accepted, not when the model is: a model load can
            # take longer than any sane TimeoutStartSec, and `vsup status` must work meanwhile.
            if self.notifier is not None:
                self.notifier.ready(self.status_line())
                if self.notifier.watchdog_interval_s:
                    self._spawn_task(self._watchdog_pinger(self.notifier.watchdog_interval_s))
            await self._main()
        finally:
            await server.close()
            if tailer is not None:
                tailer.stop()
            for t in list(self._tasks):
                t.cancel()
            self.events.emit("daemon_stopped")
            self.events.close()
        return 0

    def _setup_optional(self) -> None:
        try:
            from . import logparse, signatures

            self._catalog = signatures.Catalog.load()
            self._parse = logparse.parse_line
        except Exception as e:  # the catalog is data: a broken one must not stop supervision
            self.events.emit("catalog_unavailable", error=f"{type(e).__name__}: {e}")
        with contextlib.suppress(ImportError):
            from . import gpu

            self.gpus = gpu.Gpus.open()
        if self.cfg.daemon.metrics_port:
            from . import metrics

            self.metrics = metrics.Metrics()
            self.metrics.start(self.cfg.daemon.metrics_host, self.cfg.daemon.metrics_port)

    def _start_tailer(self, loop: asyncio.AbstractEventLoop) -> Any:
        try:
            from .logtail import LogTailer
        except ImportError:
            return None
        t = LogTailer(
            Path(self.cfg.vllm.log_file),
            lambda lines: loop.call_soon_threadsafe(self._on_lines, lines),
            start_at_end=True,
        )
        t.start()
        return t

    async def _start_control(self) -> Any:
        from . import control

        d = self.cfg.daemon  # names were checked by config.load; a user deleted since is an error here
        acl = control.Acl.from_names(
            read_users=d.read_users,
            read_groups=d.read_groups,
            admin_users=d.admin_users,
            admin_groups=d.admin_groups,
        )
        group = control.Acl.from_names(admin_groups=[d.socket_group]).admin_gids if d.socket_group else None
        handlers = {
            name: getattr(self, f"_h_{name}")
            for name in ("status", "start", "stop", "restart", "reload", "cleanup", "events", "diagnose")
        }
        server = control.ControlServer(
            self.cfg.socket,
            handlers,
            acl=acl,
            socket_group=next(iter(group)) if group else None,
            on_event=lambda name, fields: self.events.emit(name, **fields),
        )
        await server.start()
        return server

    async def _watchdog_pinger(self, interval: float) -> None:
        # Ping only while the owner is alive: it wakes at least every HEARTBEAT_S in _next(), or
        # it is inside a bounded phase (teardown, drain, cleanup) that has its own deadline. A
        # wedged owner stops both, so systemd's watchdog fires even though this task could run.
        while True:
            await asyncio.sleep(interval)
            now = time.monotonic()
            if now - self._heartbeat < max(interval, 2 * HEARTBEAT_S) or now < self._bounded_until:
                self.notifier.watchdog()

    @contextlib.contextmanager
    def _bounded(self, seconds: float) -> Any:
        """Mark a phase that waits without reading the queue, with the bound it cannot outlast."""
        prev = self._bounded_until
        self._bounded_until = max(prev, time.monotonic() + seconds)
        try:
            yield
        finally:
            self._bounded_until = prev
            self._heartbeat = time.monotonic()

    def _on_signal(self, sig: signal.Signals) -> None:
        self._signals_seen += 1
        if self._signals_seen == 1:
            self._exiting = True
            if self.notifier is not None:
                self.notifier.stopping()  # systemd: shutdown begins now (teardown may take a while)
            self.events.emit("shutdown_requested", signal=sig.name)
            self.q.put_nowait(Shutdown(sig.name))
            return
        # Second signal: the operator wants out now. Kill the tree hard; the ledger stays, so
        # the next start (or `vsup cleanup`) removes whatever this leaves.
        self.events.emit("shutdown_forced", signal=sig.name)
        if self.tree is not None:
            with contextlib.suppress(OSError):
                os.killpg(self.tree.sid, signal.SIGKILL)
        os._exit(1)

    def _on_sighup(self) -> None:
        self.events.emit("sighup_ignored", reason="use `vsup reload --current` to re-read the model config")

    # -- the owner ------------------------------------------------------------------------

    async def _main(self) -> None:
        await self._adopt_leftovers()
        intent = Intent("start", self.spec, reason="launch") if self.autostart else Intent("idle")
        if not self.autostart:
            self._set_state(State.STOPPED, reason="autostart disabled")
        while intent.kind != "exit":
            handler = getattr(self, f"_do_{intent.kind}")
            intent = await handler(intent)
        if self.tree is not None:
            await self._teardown("daemon shutdown", grace=self.cfg.timeouts.stop_grace_s)
            self._set_state(State.STOPPED, reason="daemon shutdown")

    async def _adopt_leftovers(self) -> None:
        """A predecessor killed with SIGKILL left its tree running: remove it before anything."""
        recs = self.ledger.load()
        if not recs:
            return
        self.events.emit(
            "leftovers_found", trees=[r.id for r in recs], pids=sorted({p.pid for r in recs for p in r.procs})
        )
        with self._bounded(self.cfg.timeouts.cleanup_grace_s + self.cfg.timeouts.kill_wait_s + 15):
            report = await asyncio.to_thread(
                cleanup_mod.cleanup, recs, grace_s=self.cfg.timeouts.cleanup_grace_s
            )
        self._cleanup_event("leftovers", report)
        if report.clean:
            for r in recs:
                self.ledger.remove(r.id)

    def _reply(self, cmd: Cmd | None, result: Any = None, error: Exception | None = None) -> None:
        if cmd is None:
            return
        if cmd.future is not None and not cmd.future.done():
            if error is not None:
                cmd.future.set_exception(error)
            else:
                cmd.future.set_result(result)
        if self._op == cmd.name:
            self._op = None
            self.snap = replace(self.snap, operation=None)

    def _intent_for(self, obs: Cmd | Shutdown, spec: ModelConfig | None = None) -> Intent:
        if isinstance(obs, Shutdown):
            return Intent("stop", reason=f"daemon shutdown ({obs.signame})")
        if obs.name == "stop":
            return Intent("stop", reason="operator stop", cmd=obs)
        if obs.name in ("reload", "restart"):
            return Intent("reload", spec=obs.args["spec"], reason=f"operator {obs.name}", cmd=obs)
        if obs.name == "start":
            return Intent("start", spec=spec or self.spec, reason="operator start", cmd=obs)
        raise AssertionError(obs.name)

    # start --------------------------------------------------------------------------------

    async def _do_start(self, it: Intent) -> Intent:
        spec = it.spec or self.spec
        if spec.model != self.spec.model:
            self.remedy_level = 0
        self.spec = spec
        ok, detail, kind, obs = await self._start_tree(spec, it.reason or "start", in_reload=False)
        if ok:
            self._set_state(State.READY, reason="canary completion served", phase=None)
            self._reply(it.cmd, self.status())
            return Intent("serve")
        if obs is not None:  # a command interrupted the start
            self._reply(
                it.cmd, error=OperationFailed(f"start interrupted by {getattr(obs, 'name', 'shutdown')}")
            )
            return self._intent_for(obs)
        if it.cmd is not None:
            # an operator start that fails goes through the same recovery (backoff, ladder,
            # crash-loop limit); the operator gets the root cause now.
            self._reply(it.cmd, error=OperationFailed(detail))
        return Intent("recover", reason=detail, failure_kind=kind)

    async def _start_tree(
        self, spec: ModelConfig, reason: str, *, in_reload: bool
    ) -> tuple[bool, str, str | None, Any]:
        """Pre-clean, spawn, prove ready. Returns (ok, detail, failure kind, interrupting obs)."""
        t = self.cfg.timeouts
        if not in_reload:
            self._set_state(
                State.STARTING,
                reason=reason,
                phase="cleanup",
                model=spec.served_model_name or spec.name,
                model_path=spec.model,
                pid=None,
            )
        else:
            self._set_phase("cleanup")
        report = await self._cleanup_dead()
        if not report.clean:
            return False, f"pre-start cleanup left debris: {_remaining(report)}", "cleanup", None
        holder = cleanup_mod.port_holder(self.cfg.vllm.port)
        if holder is not None:
            return (
                False,
                f"port {self.cfg.vllm.port} is held by pid {holder.get('pid')} "
                f"({holder.get('name')}, user {holder.get('user')}): not ours, not touched",
                "port_busy",
                None,
            )
        if self.gpus is not None:
            # Every process of ours is gone by now: whoever still holds GPU memory is someone
            # else's, and starting beside it would fail (or OOM) later, in a worse place.
            pre = await asyncio.to_thread(self.gpus.precheck, set())
            if not pre.ok:
                self.events.emit("gpu_precheck", ok=False, reason=pre.reason)
                return False, f"GPU pre-start check: {pre.reason}", "gpu_busy", None
            self._gpu_baseline = self.gpus.baseline()
        argv, env = self._command(spec)
        tree_tmp = None
        if "TMPDIR" not in env or env.get("TMPDIR") == os.environ.get("TMPDIR"):
            tree_tmp = proctree.make_tree_tmpdir()
            proctree.share_torch_caches(tree_tmp, env)
            env["TMPDIR"] = tree_tmp
        self._rotate_log()
        self.gen += 1
        self._leader_gone.clear()
        self.leader_status = None
        self._ready_at = None
        self._lines_at_spawn = self._lines_total
        self._served_since_ready = 0
        try:
            self.popen, self.tree = proctree.spawn(
                argv, env, Path(self.cfg.vllm.log_file), model=spec.model, port=self.cfg.vllm.port
            )
        except OSError as e:
            if tree_tmp:
                shutil.rmtree(tree_tmp, ignore_errors=True)  # never follows the cache link
            return False, f"cannot start {argv[0]}: {e.strerror or e}", "spawn", None
        if tree_tmp:
            self.tree.files.append(tree_tmp)
        self.ledger.upsert(self.tree)
        gen = self.gen
        self.snap = replace(self.snap, pid=self.popen.pid, workers=0)
        self.events.bind(pid=self.popen.pid)
        self.events.emit(
            "spawned",
            argv=argv,
            log_file=self.cfg.vllm.log_file,
            sid=self.tree.sid,
            remedies=[r.name for r in self._remedies()],
        )
        self._spawn_task(self._refresher(gen))
        deadline_mono = time.monotonic() + t.start_s
        if in_reload:
            self._set_phase("ready", deadline=time.time() + t.start_s)
        else:
            self._set_state(
                State.STARTING,
                reason=reason,
                phase="readiness",
                deadline=time.time() + t.start_s,
                model=spec.served_model_name or spec.name,
                model_path=spec.model,
                pid=self.popen.pid,
            )
        if self.notifier is not None:
            self.notifier.extend_timeout(int((t.start_s + 30) * 1e6))
        ready_task = self._spawn_task(self._readiness(gen, spec))
        try:
            while True:
                obs = await self._next(deadline_mono - time.monotonic())
                if obs is None:
                    return False, self._root_cause(f"not ready within {t.start_s:g}s"), "start_timeout", None
                if isinstance(obs, ReadyProven):
                    self._ready_at = time.monotonic()
                    return True, "ready", None, None
                if isinstance(obs, NotReady):
                    await self._settle_log()  # a 500 answers before the traceback is logged
                    return False, self._root_cause(obs.detail), "engine_dead", None
                if isinstance(obs, Exited):
                    await self._catch_up_log()
                    return (
                        False,
                        self._root_cause(f"server exited with status {obs.status} before ready"),
                        "exited",
                        None,
                    )
                if isinstance(obs, LogSignal):
                    if obs.kind in FATAL_KINDS:
                        self._detected(obs)
                        kind = "engine_dead" if obs.kind in ("worker_died", "engine_dead") else obs.kind
                        await self._settle_log()  # the traceback with the real cause follows
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
                    if isinstance(obs, Cmd) and obs.name == "start":
                        self._reply(obs, {"note": "already starting"})
                        continue
                    return False, "interrupted", None, obs
        finally:
            ready_task.cancel()

    async def _readiness(self, gen: int, spec: ModelConfig) -> None:
        """health 200, model listed, then one real canary completion: only then ready."""
        t, p = self.cfg.timeouts, self.cfg.probes
        name = spec.served_model_name or spec.model  # vLLM serves the model path unless renamed
        prober = Prober(self.cfg.vllm.host, self.cfg.vllm.port, timeout_s=t.probe_s)
        try:
            step = "health"
            while True:
                if step == "health":
                    r = await prober.health()
                    if r.ok:
                        self.events.emit("probe", probe="health", ok=True)
                        step = "models"
                        continue
                elif step == "models":
                    r = await prober.models(name)
                    if r.ok:
                        self.events.emit("probe", probe="models", ok=True, detail=r.detail)
                        step = "canary"
                        continue
                else:
                    r = await prober.canary(name, p.canary_prompt, p.canary_max_tokens, t.first_canary_s)
                    self.events.emit(
                        "probe", probe="canary", ok=r.ok, detail=r.detail, seconds=round(r.seconds, 3)
                    )
                    if r.ok:
                        self.q.put_nowait(ReadyProven(gen))
                    else:
                        # the server answered health and listed the model but cannot complete:
                        # the engine is dead or hung at its first request.
                        self.q.put_nowait(NotReady(gen, f"canary failed: {r.detail}"))
                    return
                await asyncio.sleep(0.5)  # the server is loading; poll politely
        finally:
            await prober.aclose()

    def _command(self, spec: ModelConfig) -> tuple[list[str], dict[str, str]]:
        v = self.cfg.vllm
        args = [*v.args, *spec.args]
        env = {**os.environ, **v.env, **spec.env}
        for r in self._remedies():
            args += [a for a in r.args if a not in args]
            env.update(r.env)
        for k in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID"):
            env.pop(k, None)  # systemd's contract is with vsup, not with vLLM
        argv = [v.python, "-m", v.module, "--model", spec.model, "--host", v.host, "--port", str(v.port)]
        if spec.served_model_name and "--served-model-name" not in args:
            argv += ["--served-model-name", spec.served_model_name]
        return argv + args, env

    def _remedies(self) -> list[Remedy]:
        return list(self.cfg.remedies.ladder[: self.remedy_level])

    def _rotate_log(self) -> None:
        """Rotate between starts only (never under a running writer): vLLM appends, vsup tails."""
        path = Path(self.cfg.vllm.log_file)
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            if path.stat().st_size < LOG_ROTATE_BYTES:
                return
        except FileNotFoundError:
            return
        for i in range(LOG_KEEP - 1, 0, -1):
            src = path.with_name(f"{path.name}.{i}")
            if src.exists():
                src.replace(path.with_name(f"{path.name}.{i + 1}"))
        path.replace(path.with_name(f"{path.name}.1"))
        self.events.emit("log_rotated", path=str(path))

    async def _refresher(self, gen: int) -> None:
        """Keep the ledger's view of the tree current (members, held shm, files) while it lives."""
        while gen == self.gen and self.tree is not None:
            # refresh() updates the record in place: remember its size to know if it grew
            before = (len(self.tree.procs), len(self.tree.ipc), len(self.tree.files))
            try:
                rec = await asyncio.to_thread(proctree.refresh, self.tree)
            except Exception as e:  # a vanished /proc entry mid-scan must not end supervision
                self.events.emit("refresh_error", error=f"{type(e).__name__}: {e}")
            else:
                if gen != self.gen:
                    return
                changed = (len(rec.procs), len(rec.ipc), len(rec.files)) != before
                self.tree = rec
                workers = sum(1 for p in proctree.live_members(rec) if "Worker" in " ".join(p.cmdline))
                if workers != self.snap.workers:
                    self.snap = replace(self.snap, workers=workers)
                if changed:
                    self.ledger.upsert(rec)
                if self.metrics is not None and self.gpus is not None:
                    self._export_gpu_metrics(rec)
            forming = self._ready_at is None or time.monotonic() - self._ready_at < REFRESH_AFTER_READY_S
            await asyncio.sleep(REFRESH_S if forming else REFRESH_SETTLED_S)

    def _export_gpu_metrics(self, rec: proctree.TreeRecord) -> None:
        from . import gpu

        with contextlib.suppress(Exception):  # NVML hiccups must not stop the refresher
            for g in gpu.status_summary(self.gpus, {p.pid for p in rec.procs}) or []:
                self.metrics.gpu(g["index"], g["used_mib"] << 20, g["total_mib"] << 20, g["model_mib"] << 20)

    # serve --------------------------------------------------------------------------------

    async def _do_serve(self, it: Intent) -> Intent:
        if self.snap.state != State.READY:
            self._set_state(State.READY, reason="canary completion served", phase=None)
        self.events.emit("ready", model=self.snap.model, remedies=[r.name for r in self._remedies()])
        gen = self.gen
        probe_task = self._spawn_task(self._probe_loop(gen))
        strikes: list[str] = []
        progressed = False
        stable_at = time.monotonic() + self.cfg.restart.stable_s
        try:
            while True:
                obs = await self._next(HEARTBEAT_S)
                if stable_at and time.monotonic() >= stable_at and self.snap.state == State.READY:
                    # Served long enough: the next failure is a new story, not part of a crash loop.
                    stable_at = 0
                    if self._failures:
                        self.events.emit("stable", failures_forgotten=len(self._failures))
                        self._failures.clear()
                if obs is None:
                    continue
                if isinstance(obs, Exited):
                    await self._catch_up_log()
                    return Intent(
                        "recover",
                        reason=self._root_cause(f"server exited with status {obs.status}"),
                        failure_kind="exited",
                    )
                if isinstance(obs, LogSignal):
                    if obs.kind in FATAL_KINDS:
                        self._detected(obs)
                        kind = "engine_dead" if obs.kind in ("worker_died", "engine_dead") else obs.kind
                        return Intent("recover", reason=self._root_cause(obs.message), failure_kind=kind)
                    if obs.kind in STRIKE_KINDS:
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
                    if not r.ok:
                        self._detected(r)
                        strikes.append(f"{r.probe}: {r.detail}")
                elif isinstance(obs, (Cmd, Shutdown)):
                    if isinstance(obs, Cmd) and obs.name == "start":
                        self._reply(obs, {"note": "already running"})
                        continue
                    return self._intent_for(obs)
                else:
                    continue
                if strikes and self.snap.state == State.READY:
                    self._set_state(State.UNHEALTHY, reason=strikes[-1])
                    # Only tokens generated from now on say "slow, not stuck" (earlier ones,
                    # our own canaries' included, say nothing about the engine now).
                    progressed = False
                    probe_task.cancel()
                    probe_task = self._spawn_task(self._probe_loop(gen, confirm=True))
                # Confirmed by independent signals. Generated tokens still increasing means
                # the engine is slow, not stuck: canary timeouts alone do not tear it down.
                if len(strikes) >= self.cfg.probes.confirm and not (progressed and _only_canary(strikes)):
                    return Intent(
                        "recover", reason="hang confirmed: " + "; ".join(strikes[-3:]), failure_kind="hang"
                    )
        finally:
            probe_task.cancel()

    async def _probe_loop(self, gen: int, confirm: bool = False) -> None:
        """Canary + progress probes while ready. In confirm mode, probe again at once."""
        t, p = self.cfg.timeouts, self.cfg.probes
        spec = self.spec
        name = spec.served_model_name or spec.model
        prober = Prober(self.cfg.vllm.host, self.cfg.vllm.port, timeout_s=t.probe_s)
        last_tokens: float | None = None
        canary_tokens = 0
        last_change = time.monotonic()
        next_canary = time.monotonic() + (0 if confirm else p.canary_interval_s or float("inf"))
        try:
            while gen == self.gen:
                m = await prober.metrics()
                busy = True  # no metrics: keep the short period
                if m.ok:
                    tokens, running = m.data["generation_tokens"], m.data["running"]
                    progressed = last_tokens is not None and tokens > last_tokens + canary_tokens
                    canary_tokens = 0
                    busy = progressed or running > 0 or m.data["waiting"] > 0
                    if last_tokens is None or progressed or running == 0:
                        last_change = time.monotonic()
                    last_tokens = tokens
                    stuck_for = time.monotonic() - last_change
                    if running > 0 and stuck_for >= p.stall_s:
                        self.q.put_nowait(
                            Probe(
                                gen,
                                ProbeResult(
                                    "progress",
                                    False,
                                    f"{running:g} running, no token generated for {stuck_for:.0f}s",
                                ),
                            )
                        )
                        last_change = time.monotonic()
                    elif progressed:
                        self.q.put_nowait(Probe(gen, replace(m, data={**m.data, "progressed": True})))
                else:
                    h = await prober.health()
                    if not h.ok:
                        self.q.put_nowait(Probe(gen, h))
                if time.monotonic() >= next_canary:
                    r = await prober.canary(name, p.canary_prompt, p.canary_max_tokens, t.canary_s)
                    self.q.put_nowait(Probe(gen, r))
                    canary_tokens = p.canary_max_tokens  # its own tokens are not the engine's progress
                    next_canary = time.monotonic() + (p.canary_interval_s or float("inf"))
                    if confirm and not r.ok:
                        next_canary = time.monotonic()  # keep confirming until torn down or healed
                        continue
                # An idle engine (nothing running or waiting, no new tokens) has no progress to
                # watch: the canary is what proves it serves, so look again just before the next
                # one instead of every interval_s (idle CPU 0.4 % -> 0.28 % of a core in the benchmark).
                until_canary = next_canary - time.monotonic()
                period = p.interval_s if busy or until_canary == float("inf") else until_canary
                await asyncio.sleep(max(0.05, min(period, until_canary)))
        finally:
            await prober.aclose()

    def _detected(self, what: LogSignal | ProbeResult) -> None:
        if isinstance(what, LogSignal):
            info = {
                "source": "log",
                "kind": what.kind,
                "signature": what.sig_id,
                "message": what.message,
                "process": what.process,
                "log_pid": what.pid,
                "latency_s": round(time.monotonic() - what.at, 3),
            }
        else:
            info = {"source": "probe", "kind": what.probe, "message": what.detail}
        self.snap = replace(self.snap, last_detection={**info, "at": _iso(time.time())})
        self.events.emit("detection", **info)
        if self.metrics is not None:
            self.metrics.detection(info["kind"], info.get("latency_s", 0.0))

    # recover ------------------------------------------------------------------------------

    async def _do_recover(self, it: Intent) -> Intent:
        reason, kind = it.reason or "failure", it.failure_kind or "failure"
        early = self._served_since_ready <= EARLY_REQUESTS
        lines = self.lines_since_spawn()
        tree = self.tree
        self._set_state(State.STOPPING, reason=reason, phase="teardown")
        report = await self._teardown(reason, grace=min(FAILED_STOP_GRACE_S, self.cfg.timeouts.stop_grace_s))
        self._incident(reason, kind, lines, tree, report)
        now = time.monotonic()
        self._failures.append(now)
        while self._failures and now - self._failures[0] > self.cfg.restart.window_s:
            self._failures.popleft()
        self._maybe_remedy(kind, early)
        n = len(self._failures)
        if n >= self.cfg.restart.max_failures:
            self._set_state(
                State.FAILED,
                reason=f"{n} failures within {self.cfg.restart.window_s:g}s; last: {reason}",
                phase=None,
                pid=None,
            )
            return Intent("idle")
        r = self.cfg.restart
        delay = min(r.backoff_max_s, r.backoff_initial_s * r.backoff_factor ** (n - 1))
        self._set_state(
            State.STARTING,
            reason=f"restart after: {reason}",
            phase="backoff",
            deadline=time.time() + delay,
            pid=None,
        )
        self.events.emit("backoff", delay_s=delay, failures=n)
        end = time.monotonic() + delay
        while True:
            obs = await self._next(end - time.monotonic())
            if obs is None:
                break
            if isinstance(obs, (Cmd, Shutdown)):
                return self._intent_for(obs)
        self.snap = replace(self.snap, restarts=self.snap.restarts + 1)
        if self.metrics is not None:
            self.metrics.restart(kind)
        return Intent("start", self.spec, reason=f"automatic restart {self.snap.restarts} after {kind}")

    def _incident(self, reason: str, kind: str | None, lines: list[str], tree: Any, report: Any) -> None:
        """Write the incident bundle of a failed tree and announce it as an event."""
        bundle = incidents.write_bundle(
            self.cfg,
            reason=reason,
            kind=kind or "reload_failed",
            lines=lines,
            tree=tree,
            events=list(self.events.recent),
            cleanup=report.to_json(),
            vllm_version=self.vllm_version,
        )
        self.events.emit("incident", path=str(bundle), kind=kind)

    def _maybe_remedy(self, kind: str, early: bool) -> None:
        rc = self.cfg.remedies
        if not rc.enabled or kind not in LADDER_KINDS or not early:
            return
        tp = config_mod.tensor_parallel_size([*self.cfg.vllm.args, *self.spec.args])
        if rc.only_tp and tp <= 1:
            return
        self._kind_failures[kind] += 1
        if self._kind_failures[kind] >= rc.after and self.remedy_level < len(rc.ladder):
            self.remedy_level += 1
            self._kind_failures.clear()
            applied = self.cfg.remedies.ladder[self.remedy_level - 1]
            self.snap = replace(self.snap, remedies=tuple(r.name for r in self._remedies()))
            self.events.emit(
                "remedy_applied",
                remedy=applied.name,
                args=applied.args,
                env=applied.env,
                failure_kind=kind,
                level=self.remedy_level,
            )

    # stop ---------------------------------------------------------------------------------

    async def _do_stop(self, it: Intent) -> Intent:
        self._set_state(State.STOPPING, reason=it.reason, phase="teardown")
        report = await self._teardown(it.reason or "stop", grace=self.cfg.timeouts.stop_grace_s)
        self._set_state(State.STOPPED, reason=it.reason, phase=None, pid=None, workers=0)
        if it.cmd is not None:
            if report.clean:
                self._reply(it.cmd, {"stopped": True, "cleanup": report.to_json()})
            else:
                self._reply(
                    it.cmd, error=OperationFailed(f"stopped, but debris remains: {_remaining(report)}")
                )
        if self._exiting:
            return Intent("exit")
        return Intent("idle")

    async def _do_idle(self, it: Intent) -> Intent:
        if self._exiting:
            return Intent("exit")
        while True:
            obs = await self._next()
            if isinstance(obs, Shutdown):
                return Intent("exit")
            if isinstance(obs, Cmd):
                if obs.name == "stop":
                    report = await self._cleanup_dead()
                    if self.snap.state == State.FAILED:
                        self._set_state(State.STOPPING, reason="operator stop", phase="cleanup")
                        self._set_state(State.STOPPED, reason="operator stop")
                    self._reply(
                        obs, {"stopped": True, "note": "was not running", "cleanup": report.to_json()}
                    )
                    continue
                self._failures.clear()  # an operator action resets the crash-loop count
                if obs.name == "start":
                    self._kind_failures.clear()
                return self._intent_for(obs)

    async def _teardown(self, reason: str, *, grace: float) -> Any:
        t = self.cfg.timeouts
        # the cleanup engine's own bounds: grace, kill wait, tracker grace (5 s each at most)
        with self._bounded(grace + t.cleanup_grace_s + t.kill_wait_s + t.gpu_release_s + 15):
            return await self._teardown_bounded(reason, grace=grace)

    async def _teardown_bounded(self, reason: str, *, grace: float) -> Any:
        """Bounded stop: SIGTERM the API server, wait `grace`, then the cleanup engine kills
        whatever of the tree remains (engine core and workers before the resource_tracker, so
        the tracker unlinks what it registered) and unlinks what is left. Returns its report."""
        tree, t0 = self.tree, time.monotonic()
        if tree is None:
            return await self._cleanup_dead()
        self.events.emit("teardown", reason=reason, grace_s=grace, pids=sorted({p.pid for p in tree.procs}))
        gpu_before = await asyncio.to_thread(self.gpus.snapshot) if self.gpus is not None else None
        with contextlib.suppress(Exception):
            tree = await asyncio.to_thread(proctree.refresh, tree)  # last look at what it holds
        self.ledger.upsert(replace(tree, ended=True))
        if self.popen is not None and self.leader_status is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.popen.pid, signal.SIGTERM)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._leader_gone.wait(), grace)
            # The API server shuts its engine core and workers down on SIGTERM: give them what
            # is left of the grace to follow it.
            end = t0 + grace
            while time.monotonic() < end and await asyncio.to_thread(proctree.live_members, tree):
                await asyncio.sleep(0.1)
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
        report = await asyncio.to_thread(cleanup_mod.cleanup, [tree], grace_s=cleanup_grace)
        self._cleanup_event("teardown", report, seconds=round(time.monotonic() - t0, 3))
        if self.gpus is not None:
            rel = await asyncio.to_thread(
                self.gpus.wait_released,
                {p.pid for p in tree.procs},
                self._gpu_baseline,
                timeout_s=self.cfg.timeouts.gpu_release_s,
                before=gpu_before,
            )
            self.events.emit("gpu_release", **_as_dict(rel))
        if report.clean:
            self.ledger.remove(tree.id)
        self.tree, self.popen = None, None
        self.snap = replace(self.snap, pid=None, workers=0)
        self.events.bind(pid=None)
        return report

    async def _cleanup_dead(self) -> Any:
        """Clean every tree the ledger knows except the live one (if any)."""
        with self._bounded(self.cfg.timeouts.cleanup_grace_s + self.cfg.timeouts.kill_wait_s + 15):
            return await self._cleanup_dead_bounded()

    async def _cleanup_dead_bounded(self) -> Any:
        recs = [r for r in self.ledger.load() if self.tree is None or r.id != self.tree.id]
        live = [self.tree] if self.tree is not None else []
        report = await asyncio.to_thread(
            cleanup_mod.cleanup, recs, live=live, grace_s=self.cfg.timeouts.cleanup_grace_s
        )
        if recs or report.killed or report.unlinked:
            self._cleanup_event("pre-start" if not live else "dead-trees", report)
        if report.clean:
            for r in recs:
                self.ledger.remove(r.id)
        return report

    def _cleanup_event(self, why: str, report: Any, **extra: Any) -> None:
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

    # reload -------------------------------------------------------------------------------

    async def _do_reload(self, it: Intent) -> Intent:
        new = it.spec or self.spec
        old = self.spec
        cmd = it.cmd
        t0 = time.monotonic()
        phases: dict[str, float] = {}
        if self.notifier is not None:
            self.notifier.reloading()
        self._set_state(
            State.RELOADING,
            reason=f"{it.reason}: {old.name} -> {new.name}",
            phase="drain",
            operation=cmd.name if cmd else None,
        )

        async def phase(name: str) -> None:
            phases[name] = time.monotonic()
            self._set_phase(name)
            if self.metrics is not None:
                self.metrics.reload_phase(name)
            if cmd is not None and cmd.request is not None:
                await cmd.request.progress(phase=name, elapsed_s=round(time.monotonic() - t0, 2))

        def done(name: str) -> None:
            dur = round(time.monotonic() - phases[name], 3)
            self.events.emit("reload_phase", phase=name, seconds=dur)
            if self.metrics is not None:
                self.metrics.reload_phase_done(name, dur)

        if self.tree is not None and self.snap.state != State.FAILED:
            await phase("drain")
            with self._bounded(self.cfg.timeouts.drain_s + 2 * self.cfg.timeouts.probe_s + 5):
                drained, busiest = await self._drain()
            done("drain")
            self.events.emit("drained", ok=drained, max_running=busiest)
        await phase("stop")
        report = await self._teardown(it.reason or "reload", grace=self.cfg.timeouts.stop_grace_s)
        done("stop")
        await phase("cleanup")
        verify = await self._verify_clean()
        done("cleanup")
        if not (report.clean and verify is None):
            msg = verify or f"debris remains: {_remaining(report)}"
            self._set_state(State.FAILED, reason=f"reload aborted: {msg}", phase=None)
            self._reply(cmd, error=OperationFailed(msg))
            return Intent("idle")
        if new.model != old.model:
            self.remedy_level = 0
        self.spec = new
        await phase("start")
        ok, detail, kind, obs = await self._start_tree(new, it.reason or "reload", in_reload=True)
        done("start")
        if ok:
            self._set_state(
                State.READY,
                reason=f"{it.reason}: serving {new.name}",
                phase=None,
                operation=None,
                model=new.served_model_name or new.name,
                model_path=new.model,
            )
            if self.notifier is not None:
                self.notifier.ready(self.status_line())
            self._reply(
                cmd,
                {
                    "model": new.name,
                    "seconds": round(time.monotonic() - t0, 3),
                    "phases": {k: round(v - t0, 3) for k, v in phases.items()},
                },
            )
            self._failures.clear()
            return Intent("serve")
        # Roll back: clean what the new model left, start the previous model again.
        lines = self.lines_since_spawn()
        tree = self.tree
        await phase("rollback")
        report = await self._teardown(f"reload of {new.name} failed", grace=FAILED_STOP_GRACE_S)
        self._incident(detail, kind, lines, tree, report)
        if obs is not None:
            self._reply(cmd, error=OperationFailed(f"reload interrupted: {detail}"))
            return self._intent_for(obs)
        self.spec = old
        self.remedy_level = 0 if new.model != old.model else self.remedy_level
        ok2, detail2, _, obs2 = await self._start_tree(old, "rollback", in_reload=True)
        done("rollback")
        msg = f"reload to {new.name} failed: {detail}"
        if ok2:
            self._set_state(
                State.READY,
                reason=f"rolled back to {old.name} after: {detail}",
                phase=None,
                operation=None,
                model=old.served_model_name or old.name,
                model_path=old.model,
            )
            if self.notifier is not None:
                self.notifier.ready(self.status_line())
            self._reply(cmd, error=OperationFailed(msg + f"; rolled back, {old.name} serves again"))
            return Intent("serve")
        self._reply(cmd, error=OperationFailed(msg + f"; rollback to {old.name} failed too: {detail2}"))
        if obs2 is not None:
            return self._intent_for(obs2)
        self._set_state(
            State.STOPPING, reason=f"rollback failed: {detail2}", phase="teardown", operation=None
        )
        await self._teardown("rollback failed", grace=FAILED_STOP_GRACE_S)
        self._set_state(State.FAILED, reason=f"{msg}; rollback failed: {detail2}", phase=None)
        return Intent("idle")

    async def _drain(self) -> tuple[bool, float]:
        """Wait until /metrics shows no running or waiting requests, up to drain_s.
        Returns (drained, the most requests seen in flight)."""
        prober = Prober(self.cfg.vllm.host, self.cfg.vllm.port, timeout_s=self.cfg.timeouts.probe_s)
        end = time.monotonic() + self.cfg.timeouts.drain_s
        busiest = 0.0
        idle_since: float | None = None
        try:
            while time.monotonic() < end:
                m = await prober.metrics()
                if m.ok:
                    busiest = max(busiest, m.data["running"] + m.data["waiting"])
                if m.ok and m.data["running"] == 0 and m.data["waiting"] == 0:
                    # A request the API server is still tokenizing is not in the engine's
                    # counts yet (measured: one sent just before the drain slipped through a
                    # single idle reading): idle means idle for DRAIN_IDLE_S.
                    idle_since = idle_since or time.monotonic()
                    if time.monotonic() - idle_since >= DRAIN_IDLE_S:
                        return True, busiest
                else:
                    idle_since = None
                if not m.ok and not (await prober.health()).ok:
                    return True, busiest  # nothing to drain from a server that does not answer
                await asyncio.sleep(0.25)
            return False, busiest
        finally:
            await prober.aclose()

    async def _verify_clean(self) -> str | None:
        """Prove the machine is clean before a new model: port free, no tree process left."""
        holder = cleanup_mod.port_holder(self.cfg.vllm.port)
        if holder is not None:
            return f"port {self.cfg.vllm.port} still held by pid {holder.get('pid')} ({holder.get('name')})"
        leftovers = self.ledger.load()
        if leftovers:
            return f"ledger still lists trees {[r.id for r in leftovers]}"
        return None

    def _root_cause(self, fallback: str) -> str:
        try:
            from . import diagnose

            d = diagnose.analyze(self.lines_since_spawn())
            if d.root_cause and d.root_cause.strip() != fallback.strip():
                return f"{fallback}; root cause: {d.root_cause}"
        except Exception:  # diagnosis is best effort; the fallback is still true
            pass
        return fallback

    # -- control handlers (run on the loop, never block) -----------------------------------

    async def _h_status(self, req: Any) -> Any:
        return self.status()

    async def _submit(self, req: Any, name: str, args: dict[str, Any]) -> Any:
        from .control import CommandError

        if self._op is not None:
            raise CommandError("busy", f"{self._op} is running; try again when it has finished")
        if self._exiting:
            raise CommandError("busy", "the daemon is shutting down")
        self._op = name
        self.snap = replace(self.snap, operation=name)
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.q.put_nowait(Cmd(name, args, req, fut))
        try:
            return await fut
        except OperationFailed as e:
            raise CommandError("failed", str(e)) from None

    async def _h_start(self, req: Any) -> Any:
        if self.snap.state in (State.READY, State.UNHEALTHY):
            return {"note": f"already {self.snap.state}", **self.status()}
        return await self._submit(req, "start", {})

    async def _h_stop(self, req: Any) -> Any:
        return await self._submit(req, "stop", {})

    async def _h_restart(self, req: Any) -> Any:
        return await self._submit(req, "restart", {"spec": self.spec})

    async def _h_reload(self, req: Any) -> Any:
        from .control import CommandError

        args = req.args
        target = args.get("model")
        if args.get("current"):
            try:  # re-read the config file: systemctl reload means "apply what is on disk"
                self.cfg = config_mod.load(self.cfg.path)
            except config_mod.ConfigError as e:
                raise CommandError("failed", f"config not reloaded: {e}") from None
            spec = self.cfg.model_spec(self.spec.name if self.spec.name in self.cfg.models else None)
        elif isinstance(target, str) and target.strip():
            spec = self.cfg.model_spec(target)
        else:
            raise CommandError(
                "bad_request",
                "reload needs args.model (a configured name or a model path) or args.current=true",
            )
        return await self._submit(req, "reload", {"spec": spec})

    async def _h_cleanup(self, req: Any) -> Any:
        from .control import CommandError

        a = req.args
        for k in ("dry_run", "foreign", "all_users"):
            if k in a and not isinstance(a[k], bool):
                raise CommandError("bad_request", f"args.{k} must be a boolean")
        if self._op is not None:
            raise CommandError("busy", f"{self._op} is running; try again when it has finished")
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.q.put_nowait(Cmd("cleanup", dict(a), req, fut))
        return await fut

    async def _cmd_cleanup(self, cmd: Cmd) -> None:
        t = self.cfg.timeouts
        with self._bounded(t.cleanup_grace_s + t.kill_wait_s + t.gpu_release_s + 15):
            await self._cmd_cleanup_bounded(cmd)

    async def _cmd_cleanup_bounded(self, cmd: Cmd) -> None:
        a = cmd.args
        recs = [r for r in self.ledger.load() if self.tree is None or r.id != self.tree.id]
        live = [self.tree] if self.tree is not None else []
        try:
            before = await asyncio.to_thread(self.gpus.snapshot) if self.gpus is not None else None
            report = await asyncio.to_thread(
                cleanup_mod.cleanup,
                recs,
                live=live,
                foreign=bool(a.get("foreign")),
                all_users=bool(a.get("all_users")),
                dry_run=bool(a.get("dry_run")),
                grace_s=self.cfg.timeouts.cleanup_grace_s,
            )
            gpu_freed = None
            if self.gpus is not None and not a.get("dry_run"):
                from . import gpu

                gpu_freed = await asyncio.to_thread(
                    gpu.cleanup_summary,
                    self.gpus,
                    {k["pid"] for k in report.killed},
                    before,
                    timeout_s=self.cfg.timeouts.gpu_release_s,
                )
        except Exception as e:
            cmd.future.set_exception(e)
            return
        if not a.get("dry_run"):
            self._cleanup_event("operator", report)
            if report.clean:
                for r in recs:
                    self.ledger.remove(r.id)
        if not cmd.future.done():
            cmd.future.set_result({**report.to_json(), **({"gpu": gpu_freed} if gpu_freed else {})})

    async def _h_events(self, req: Any) -> Any:
        n = req.args.get("n", 50)
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            from .control import CommandError

            raise CommandError("bad_request", "args.n must be a non-negative integer")
        recent = list(self.events.recent)[-n:] if n else []
        if not req.args.get("follow"):
            return {"events": recent}
        q: asyncio.Queue[dict[str, Any]] = asyncio.Queue(maxsize=1000)
        unsubscribe = self.events.subscribe(lambda ev: q.put_nowait(ev) if not q.full() else None)
        try:
            for ev in recent:
                if not await req.event(ev):
                    return {"followed": False}
            while await req.event(await q.get()):
                pass
            return {"followed": True}
        finally:
            unsubscribe()

    async def _h_diagnose(self, req: Any) -> Any:
        from . import diagnose

        lines = list(self._lines)
        return (await asyncio.to_thread(diagnose.analyze, lines)).to_json()


# ---- helpers -------------------------------------------------------------------------------


def _only_canary(strikes: list[str]) -> bool:
    return all(s.startswith("canary:") for s in strikes)


def _remaining(report: Any) -> str:
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


def _as_dict(obj: Any) -> dict[str, Any]:
    if hasattr(obj, "to_json"):
        return obj.to_json()
    if hasattr(obj, "__dataclass_fields__"):
        import dataclasses

        return dataclasses.asdict(obj)
    return {"result": repr(obj)}


def _version() -> str:
    from . import __version__

    return __version__


def main(cfg: Config, *, autostart: bool = True) -> int:
    from .sdnotify import Notifier

    sup = Supervisor(cfg, autostart=autostart, notifier=Notifier.from_env())
    return asyncio.run(sup.run())
