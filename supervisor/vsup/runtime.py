"""The daemon process around the owner: signals, the child reaper, the log tailer, the control
socket, the watchdog, and the forced exit.

Everything here only posts to the owner (`Supervisor.post` / `submit`) or reads what it
published; the one exception is the forced exit on a second signal, which runs when the owner
is being abandoned.

Signals:
- SIGTERM, SIGINT, SIGQUIT: shutdown (teardown of the tree, cleanup, exit 0).
- A second one: stop waiting. The tree is SIGKILLed at once and the part of the cleanup that
  cannot block (unlinking its segments, semaphores and files) runs, bounded by
  FORCED_CLEANUP_S; the last event says what was skipped (graces, GPU wait) and what is left
  for the ledger. A third one, or a cleanup past the bound, ends the process at once.
- SIGHUP: logged and ignored (`vsup reload --current` re-reads the config).
- SIGUSR1, SIGUSR2, SIGALRM, SIGVTALRM, SIGPROF, SIGIO, SIGPWR: logged and ignored (logrotate
  scripts send SIGUSR1; their default action would end vsup without a teardown). SIGPIPE is
  ignored by Python itself (a write to a closed socket is an EPIPE error).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import cleanup as cleanup_mod
from . import commands, proctree, stacks
from .config import Config
from .daemon import HEARTBEAT_S, Supervisor
from .observations import Shutdown

if TYPE_CHECKING:
    from .control import ControlServer
    from .logtail import LogTailer
    from .proxy import Proxy

SHUTDOWN_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT)
IGNORED_SIGNALS = tuple(
    getattr(signal, n)
    for n in ("SIGUSR1", "SIGUSR2", "SIGALRM", "SIGVTALRM", "SIGPROF", "SIGIO", "SIGPWR")
    if hasattr(signal, n)
)
# The forced exit's cleanup: SIGKILL and unlinks take milliseconds; waiting for the killed
# processes to be gone (their mappings keep a segment "held") is bounded by FORCED_KILL_WAIT_S.
# Past FORCED_CLEANUP_S the process leaves anyway: the ledger keeps what is left.
FORCED_KILL_WAIT_S = 2.0
FORCED_CLEANUP_S = 4.0


class _EventLogHandler(logging.Handler):
    """The stdlib `log.*` calls of vsup's modules (a corrupt ledger, a failed NVML call) as
    events, so they reach journald and events.jsonl like everything else."""

    def __init__(self, sup: Supervisor) -> None:
        super().__init__(logging.INFO)
        self.sup = sup

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.sup.events.emit(
                "log", level=record.levelname.lower(), logger=record.name, message=record.getMessage()
            )
        except Exception:  # noqa: BLE001 - logging must never break the daemon
            self.handleError(record)


class Runtime:
    def __init__(self, sup: Supervisor) -> None:
        self.sup = sup
        self.signals_seen = 0
        self._log_handler = _EventLogHandler(sup)
        self._server: ControlServer | None = None
        self.proxy: Proxy | None = None

    async def run(self) -> int:
        """Run until SIGTERM/SIGINT; returns the process exit code."""
        sup = self.sup
        loop = asyncio.get_running_loop()
        self._setup_optional()
        sup.host.set_child_subreaper()
        loop.add_signal_handler(signal.SIGCHLD, self._reap)
        for sig in SHUTDOWN_SIGNALS:
            loop.add_signal_handler(sig, self._on_signal, sig)
        loop.add_signal_handler(signal.SIGHUP, self._on_ignored, signal.SIGHUP)
        for sig in IGNORED_SIGNALS:
            loop.add_signal_handler(sig, self._on_ignored, sig)
        vsup_log = logging.getLogger("vsup")
        vsup_log.addHandler(self._log_handler)
        vsup_log.setLevel(logging.INFO)
        tailer = self._start_tailer(loop)
        # The control socket first, then the proxy's port: whoever sees /livez answer (a kubelet,
        # a test, an operator) can ask `vsup status` at once. In the other order a slow machine
        # answered /livez 200 while `vsup status` still found no socket (CI, issue 18).
        server = self._server = await self._start_control()
        pinger = None
        try:
            if self.proxy is not None:
                await self.proxy.start()  # never raises for a busy port: it retries and says so
            sup.events.emit(
                "daemon_started",
                version=_version(),
                config=str(sup.cfg.path),
                vllm_version=sup.vllm_version,
                socket=str(sup.cfg.socket),
            )
            # READY=1 as soon as commands are accepted, not when the model is: a model load can
            # take longer than any sane TimeoutStartSec, and `vsup status` must work meanwhile.
            if sup.notifier is not None:
                sup.notifier.ready(sup.status_line())
                if sup.notifier.watchdog_interval_s:
                    pinger = loop.create_task(self._watchdog_pinger(sup.notifier.watchdog_interval_s))
            await self._pod_shm()
            await sup._main()
        finally:
            await server.close()
            if self.proxy is not None:
                await self.proxy.stop()
            if tailer is not None:
                tailer.stop()
            if pinger is not None:
                pinger.cancel()
            for t in list(sup._tasks):
                t.cancel()
            sup.events.emit("daemon_stopped")
            vsup_log.removeHandler(self._log_handler)
            sup.events.close()
        return sup.exit_code

    async def _pod_shm(self) -> None:
        """A container's own /dev/shm ([daemon] shm_private): before any start, unlink what a dead
        container left there that no live process holds (podshm.py says how vsup knows)."""
        sup = self.sup
        if not sup.cfg.daemon.shm_private:
            return
        from . import podshm

        with sup._bounded(30.0):
            rep = await asyncio.to_thread(podshm.prepare, True)
        sup.events.emit("pod_shm", **rep.to_json())

    # -- setup --------------------------------------------------------------------------------

    def _setup_optional(self) -> None:
        sup = self.sup
        try:
            from . import logparse, signatures

            sup.log.catalog = signatures.Catalog.load()
            sup.log.parse = logparse.parse_line
        except Exception as e:  # noqa: BLE001 - the catalog is data: a broken one must not stop supervision
            sup.events.emit("catalog_unavailable", error=f"{type(e).__name__}: {e}")
        with contextlib.suppress(ImportError):
            from . import gpu

            sup.gpus = gpu.Gpus.open()
        if sup.cfg.daemon.metrics_port:
            from . import metrics

            sup.metrics = metrics.Metrics()
            sup.metrics.start(sup.cfg.daemon.metrics_host, sup.cfg.daemon.metrics_port)
        # The proxy (issue 15), when the config has a [proxy] section: it follows sup.gate, posts
        # to sup.post and becomes sup.traffic. Started before the control socket, closed after
        # the owner.
        from . import proxy

        self.proxy = proxy.for_supervisor(sup)
        if self.proxy is not None:
            self._add_probes(self.proxy)

    def _add_probes(self, proxy: Proxy) -> None:
        """/livez, /readyz and /startupz on the proxy's port, for the kubelet (issue 18; pod.py
        says what each means). They read the owner's heartbeat and route, never vLLM."""
        from . import pod

        sup = self.sup

        def view() -> pod.View:
            r = sup.gate.route
            return pod.View(
                now=time.monotonic(),
                heartbeat=sup._heartbeat,
                bounded_until=sup._bounded_until,
                state=r.state,
                routed=r.upstream is not None and not r.closing,
                holding=r.hold and not r.closing,
                loaded=False,  # pod.Probes remembers the first `ready` from the events
                shutting_down=r.closing or self.signals_seen > 0,
                idle=r.idle and not r.closing,
            )

        probes = pod.Probes(view, sup.cfg.daemon.readiness)
        sup.events.subscribe(probes.on_event)
        for path, handler in probes.aiohttp_handlers().items():
            proxy.add_local(path, handler)

    def _start_tailer(self, loop: asyncio.AbstractEventLoop) -> LogTailer | None:
        try:
            from .logtail import LogTailer
        except ImportError:
            return None
        sup = self.sup
        path = Path(sup.cfg.vllm.log_file)

        def on_lines(lines: list[str]) -> None:  # in the tailer's thread: hand them to the loop
            loop.call_soon_threadsafe(sup.log.on_lines, lines)

        t = LogTailer(path, on_lines, start_at_end=True)
        t.start()
        sup.log.tailer, sup.log.path = t, str(path)
        return t

    def handlers(self) -> dict[str, Any]:
        """The control socket's handlers: reads answer from what the owner published; every
        lifecycle command is posted to the owner, which answers it (commands.TABLE)."""
        sup = self.sup

        def lifecycle(name: str) -> Any:
            async def handle(req: Any) -> Any:
                return await sup.submit(name, dict(req.args), req)

            return handle

        out: dict[str, Any] = {name: lifecycle(name) for name in commands.LIFECYCLE}
        out.update(status=self._h_status, events=self._h_events, diagnose=self._h_diagnose)
        # Read permission; never kills (py-spy or the reason why not). Issue 17.
        out["stacks"] = stacks.make_handler(
            lambda: sup.tree,
            budget_s=lambda: sup.cfg.timeouts.stacks_s,
            preference=lambda: sup.cfg.daemon.stacks,
            py_spy=lambda: sup.cfg.daemon.py_spy,
            host_factory=lambda: sup.host,
        )
        return out

    async def _start_control(self) -> Any:
        from . import control

        d = self.sup.cfg.daemon  # names were checked by config.load; a user deleted since is an error here
        acl = control.Acl.from_names(
            read_users=d.read_users,
            read_groups=d.read_groups,
            admin_users=d.admin_users,
            admin_groups=d.admin_groups,
        )
        group = control.Acl.from_names(admin_groups=[d.socket_group]).admin_gids if d.socket_group else None
        server = control.ControlServer(
            self.sup.cfg.socket,
            self.handlers(),
            acl=acl,
            socket_group=next(iter(group)) if group else None,
            on_event=lambda name, fields: self.sup.events.emit(name, **fields),
        )
        await server.start()
        return server

    # -- reads --------------------------------------------------------------------------------

    async def _h_status(self, req: Any) -> Any:
        return self.sup.status()

    async def _h_events(self, req: Any) -> Any:
        from .control import CommandError

        n = req.args.get("n", 50)
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise CommandError("bad_request", "args.n must be a non-negative integer")
        events = self.sup.events
        recent = list(events.recent)[-n:] if n else []
        if not req.args.get("follow"):
            return {"events": recent}
        q: asyncio.Queue[dict[str, Any]] = asyncio.Queue(maxsize=1000)
        unsubscribe = events.subscribe(lambda ev: q.put_nowait(ev) if not q.full() else None)
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

        lines = list(self.sup.log.lines)
        return (await asyncio.to_thread(diagnose.analyze, lines)).to_json()

    # -- signals, children, watchdog -----------------------------------------------------------

    def _reap(self) -> None:
        """SIGCHLD: reap every child (the leader, and orphans reparented to us as subreaper).
        Host.reap_children keeps the statuses of vsup's own helpers (the stack dumper) for them."""
        sup = self.sup
        for pid, status in sup.host.reap_children():
            code = os.waitstatus_to_exitcode(status)
            if sup.leader is not None and pid == sup.leader.pid:
                sup.post(_exited(sup.gen, pid, code))
                continue
            # An overlapped reload's other tree (issue 23): its leader is ours too. Unposted, a
            # death of the serving old tree went unseen from here, and its retire waited its
            # whole stop grace (20 s every time) for an exit that had happened at once.
            old = sup.overlap.old if sup.overlap is not None else None
            if old is not None and old.leader is not None and pid == old.leader.pid:
                sup.post(_exited(old.gen, pid, code))

    def _on_ignored(self, sig: signal.Signals) -> None:
        note = (
            "use `vsup reload --current` to re-read the model config"
            if sig == signal.SIGHUP
            else "no action is defined for this signal; vsup keeps running"
        )
        self.sup.events.emit("signal_ignored", signal=sig.name, note=note)
        if sig == signal.SIGHUP:
            self.sup.events.emit("sighup_ignored", reason=note)  # the name earlier releases used

    def _on_signal(self, sig: signal.Signals) -> None:
        self.signals_seen += 1
        sup = self.sup
        if self.signals_seen == 1:
            if sup.notifier is not None:
                sup.notifier.stopping()  # systemd: shutdown begins now (teardown may take a while)
            sup.events.emit("shutdown_requested", signal=sig.name)
            sup.post(Shutdown(sig.name))
            return
        self.forced_exit(sig)

    def forced_exit(self, sig: signal.Signals) -> None:
        """Second signal: the operator wants out now, not debris. SIGKILL the tree at once,
        unlink what it leaves (no graces, no GPU wait), say what could not be done, exit 1."""
        sup = self.sup
        for s in SHUTDOWN_SIGNALS:  # a third signal ends the process at once (default action)
            signal.signal(s, signal.SIG_DFL)
        sup.events.emit("shutdown_forced", signal=sig.name)
        recs = {r.id: r for r in _load(sup)}
        if sup.tree is not None:
            recs[sup.tree.id] = sup.tree
        result: dict[str, Any] = {}

        def work() -> None:
            try:
                result["report"] = cleanup_mod.cleanup(
                    list(recs.values()),
                    grace_s=0.0,
                    tracker_grace_s=0.0,
                    kill_wait_s=FORCED_KILL_WAIT_S,
                    exit_wait_s=FORCED_KILL_WAIT_S,  # out now: an exit still under way is the ledger's
                    host=sup.host,
                )
            except Exception as e:  # noqa: BLE001 - the forced exit reports what failed, then exits
                result["error"] = f"{type(e).__name__}: {e}"

        t0 = time.monotonic()
        th = threading.Thread(target=work, name="forced-cleanup", daemon=True)
        th.start()
        th.join(FORCED_CLEANUP_S)
        skipped = ["stop grace", "resource tracker grace", "GPU release wait"]
        fields: dict[str, Any] = {"seconds": round(time.monotonic() - t0, 3), "skipped": skipped}
        rep = result.get("report")
        if th.is_alive():
            fields["not_done"] = f"cleanup still running after {FORCED_CLEANUP_S:g} s: left for the ledger"
        elif rep is None:
            fields["not_done"] = f"cleanup failed: {result.get('error')}; left for the ledger"
        else:
            j = rep.to_json()
            fields.update(killed=len(j["killed"]), unlinked=len(j["unlinked"]), remaining=j["remaining"])
            if rep.clean:
                for rid in recs:
                    with contextlib.suppress(Exception):
                        sup.ledger.remove(rid)
            else:
                fields["not_done"] = "debris remains (see remaining): left for the ledger"
        if self._server is not None:
            with contextlib.suppress(OSError):
                self._server.abandon()  # no stale socket left for the next start to clear
        sup.events.emit("forced_exit", **fields)
        sup.events.close()
        os._exit(1)

    async def _watchdog_pinger(self, interval: float) -> None:
        # Ping only while the owner is alive: it wakes at least every HEARTBEAT_S in _next(), or
        # it is inside a bounded step (teardown, cleanup) that has its own deadline. A wedged
        # owner stops both, so systemd's watchdog fires even though this task could run.
        sup = self.sup
        notifier = sup.notifier
        assert notifier is not None  # noqa: S101 - narrows: started only with a notifier
        while True:
            await asyncio.sleep(interval)
            now = time.monotonic()
            if now - sup._heartbeat < max(interval, 2 * HEARTBEAT_S) or now < sup._bounded_until:
                notifier.watchdog()


def _load(sup: Supervisor) -> list[proctree.TreeRecord]:
    try:
        return sup.ledger.load()
    except Exception:  # noqa: BLE001 - on the way out: a bad ledger must not stop the kill
        return []


def _exited(gen: int, pid: int, code: int) -> Any:
    from .observations import Exited

    return Exited(gen, pid, code)


def _version() -> str:
    from . import __version__

    return __version__


def main(cfg: Config, *, autostart: bool = True) -> int:
    from .sdnotify import Notifier

    sup = Supervisor(cfg, autostart=autostart, notifier=Notifier.from_env())
    return asyncio.run(Runtime(sup).run())
