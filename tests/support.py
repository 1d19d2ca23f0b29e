"""Shared test support: a daemon under test (fake or real vLLM), debris snapshots, real-vLLM paths.

Real-vLLM tests fail (never skip) when vLLM or the tiny models are missing: `make test` sets
them up first. Every daemon a test starts is stopped in a finalizer, and whatever its tree left
is removed through the ledger it wrote, even when the test failed.
"""

from __future__ import annotations

import contextlib
import grp
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, Self

import pytest

from toml_writer import toml_value, write_config  # noqa: F401 - the suite's one TOML writer

if TYPE_CHECKING:
    import asyncio

    from vsup.control import Acl, Request

ROOT = Path(__file__).resolve().parent.parent
FAKES = ROOT / "tests" / "fakes"
VSUP = [sys.executable, "-m", "vsup"]
CACHE = Path(os.environ.get("VSUP_CACHE", Path.home() / ".cache" / "vsup"))
VLLM_PY = CACHE / "vllm-0.32.0" / "bin" / "python"
MODELS = CACHE / "models"
REAL_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "0|1"}
REAL_ARGS = ["--dtype", "bfloat16", "--max-model-len", "256", "-tp", "2", "--enforce-eager"]


def wait_for(
    pred: Callable[[], Any],
    timeout: float,
    what: str,
    interval: float = 0.05,
    detail: Callable[[], Any] | None = None,
) -> Any:
    """Poll `pred` until it returns a truthy value; fail with `what` after `timeout` seconds
    (and with what `detail` returns then, when given: the state that kept `pred` false).
    The one wait helper of the suite (for states with no event of their own to await)."""
    end = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < end:
        last = pred()
        if last:
            return last
        time.sleep(interval)
    more = f"; {detail()!r}" if detail is not None else ""
    raise AssertionError(f"timed out after {timeout:g}s waiting for {what} (last: {last!r}){more}")


@contextlib.contextmanager
def readable_copy(*modules: ModuleType) -> Iterator[str]:
    """A sys.path entry another user can read, holding copies of these top-level modules (a
    package directory or a single file, extension modules included); removed afterwards. The
    checkout, and the test venv inside it, may sit in a directory only its owner can enter, as
    after `git clone . "$(mktemp -d)"`."""
    root = tempfile.mkdtemp(prefix="vsup-readable-")
    try:
        os.chmod(root, 0o755)
        for mod in modules:
            src = Path(mod.__file__ or "")
            if src.name == "__init__.py":
                shutil.copytree(
                    src.parent, Path(root, src.parent.name), ignore=shutil.ignore_patterns("__pycache__")
                )
            else:
                shutil.copy2(src, root)
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def free_port(lo: int = 8000, hi: int = 8099) -> int:
    for port in range(lo, hi):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port")


def fake_sections(
    port: int, mode: str = "ok", env: dict[str, str] | None = None, **over: dict[str, Any]
) -> dict[str, dict[str, Any]]:
    """Config sections for a daemon supervising the fake OpenAI server (fast, no vLLM) as a TP=2
    tree in FAKE_VLLM_MODE `mode`, `env` added to its environment; then each of `over`'s sections
    updates the one of its name."""
    s: dict[str, dict[str, Any]] = {
        "vllm": {
            "python": sys.executable,
            "module": "fake_api_server",
            "model": "fake-model",
            "port": port,
            "args": ["-tp", "2"],
            "env": {"PYTHONPATH": str(FAKES), "FAKE_VLLM_MODE": mode, **(env or {})},
        },
        "timeouts": {
            "start_s": 30.0,
            "stop_grace_s": 5.0,
            "canary_s": 2.0,
            "first_canary_s": 5.0,
            "probe_s": 2.0,
            "cleanup_grace_s": 1.0,
            "drain_s": 5.0,
        },
        "restart": {"backoff_initial_s": 0.1, "backoff_max_s": 0.5, "max_failures": 3, "window_s": 60.0},
        "probes": {"interval_s": 0.2, "canary_interval_s": 1.0, "stall_s": 3.0},
    }
    for k, v in over.items():
        s.setdefault(k, {}).update(v)
    return s


class Daemon:
    """One `vsup run` process under test, with its config, state dir and log."""

    def __init__(self, tmp: Path, sections: dict[str, dict[str, Any]]) -> None:
        self.tmp = tmp
        tmp.mkdir(parents=True, exist_ok=True)
        self.state_dir = tmp / "state"
        self.socket = tmp / "run" / "vsup.sock"
        self.log_file = tmp / "vllm.log"
        base = {
            "daemon": {"state_dir": str(self.state_dir), "socket": str(self.socket)},
        }
        for k, v in sections.items():
            base.setdefault(k, {}).update(v)
        base["vllm"].setdefault("log_file", str(self.log_file))
        self.port = base["vllm"]["port"]
        self.config = write_config(tmp / "vsup.toml", base)
        self.proc: subprocess.Popen[bytes] | None = None
        self.stderr_path = tmp / "daemon.stderr"

    # process
    def start(self, *extra: str) -> Self:
        self._stderr = open(self.stderr_path, "ab")  # noqa: SIM115 - the daemon's for its lifetime; close() closes it
        self.proc = proc = subprocess.Popen(
            [*self.command(), "run", "--config", str(self.config), *extra],
            stdout=self._stderr,
            stderr=self._stderr,
            env=self.launch_env(),
            start_new_session=True,
        )
        wait_for(lambda: self._answers() or proc.poll() is not None, 30, "the control socket")
        assert proc.poll() is None, f"daemon exited: {self.stderr_path.read_text()[-2000:]}"
        return self

    def command(self) -> list[str]:
        """What runs vsup (`run --config ...` follows); a subclass may wrap it."""
        return list(VSUP)

    def launch_env(self) -> dict[str, str]:
        """The daemon's environment: ours, with the checkout's vsup and no systemd notify socket."""
        env = {**os.environ, "PYTHONPATH": str(ROOT / "supervisor")}
        env.pop("NOTIFY_SOCKET", None)
        return env

    def _answers(self) -> bool:
        from vsup.control import DaemonUnreachable

        try:
            return bool(self.call("status", timeout=5).get("ok"))
        except DaemonUnreachable:
            return False

    def cli(
        self, *args: str, timeout: float = 600, user: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "PYTHONPATH": str(ROOT / "supervisor"), "VSUP_CONFIG": str(self.config)}
        cmd = [*VSUP, *args]
        if user:
            cmd = ["runuser", "-u", user, "--", *cmd]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)

    def call(
        self, cmd: str, args: dict[str, Any] | None = None, timeout: float | None = 30.0
    ) -> dict[str, Any]:
        from vsup.control import ControlClient

        return ControlClient(self.socket, timeout_s=timeout).call(cmd, args or {})

    def status(self) -> dict[str, Any]:
        r = self.call("status")
        assert r["ok"], r
        return r["result"]

    def wait_state(self, *states: str, timeout: float = 180) -> dict[str, Any]:
        return wait_for(
            lambda: (s := self.status())["state"] in states and s, timeout, f"state in {states}", interval=0.2
        )

    def events(self) -> list[dict[str, Any]]:
        path = self.state_dir / "events.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def wait_event(
        self, pred: Callable[[dict[str, Any]], bool], timeout: float, what: str, after: int = 0
    ) -> dict[str, Any]:
        return wait_for(lambda: next((e for e in self.events()[after:] if pred(e)), None), timeout, what, 0.2)

    def stop(self, timeout: float = 90) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
            return None

    def close(self) -> None:
        """Stop the daemon and remove whatever its trees left, whatever happened in the test."""
        try:
            self.stop()
        finally:
            if self.proc is not None and self.proc.poll() is None:
                self.proc.kill()
            from vsup import cleanup, proctree

            recs = proctree.Ledger(self.state_dir).load()
            if recs:
                cleanup.cleanup(recs, grace_s=2.0)
            if hasattr(self, "_stderr"):
                self._stderr.close()


# ---- real vLLM ------------------------------------------------------------------------------


def require_real_vllm() -> None:
    missing = [str(p) for p in (VLLM_PY, MODELS / "tiny-a" / "config.json") if not p.exists()]
    if missing:
        pytest.fail(f"real vLLM not set up ({', '.join(missing)} missing): run `make vllm` first")


def real_sections(port: int, model: str = "tiny-a", **over: dict[str, Any]) -> dict[str, dict[str, Any]]:
    s: dict[str, dict[str, Any]] = {
        "vllm": {
            "python": str(VLLM_PY),
            "model": str(MODELS / model),
            "served_model_name": model,
            "port": port,
            "args": list(REAL_ARGS),
            "env": dict(REAL_ENV),
        },
        "timeouts": {
            "start_s": 240.0,
            "stop_grace_s": 20.0,
            "canary_s": 8.0,
            "first_canary_s": 60.0,
            "probe_s": 3.0,
            "cleanup_grace_s": 3.0,
            "drain_s": 30.0,
        },
        # the module injects a fault every minute or so: not a crash loop
        "restart": {
            "backoff_initial_s": 0.5,
            "backoff_max_s": 2.0,
            "max_failures": 4,
            "window_s": 900.0,
            "stable_s": 10.0,
        },
        "probes": {"interval_s": 2.0, "canary_interval_s": 8.0, "stall_s": 10.0},
    }
    for k, v in over.items():
        s.setdefault(k, {}).update(v)
    return s


def debris() -> dict[str, set]:
    """vLLM-shaped things on this machine now: processes, /dev/shm objects, /tmp dist files."""
    procs = set()
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            st = (d / "stat").read_text()
        except OSError:
            continue
        if st.rsplit(")", 1)[1].split()[0] == "Z":
            continue  # zombies are already dead
        if "VLLM::" in cmd or "vllm.entrypoints" in cmd or "VllmWorkerProcess" in cmd:
            procs.add((int(d.name), cmd.strip()[:80]))
    shm = {n for n in os.listdir("/dev/shm") if n.startswith(("psm_", "sem.mp-", "nccl-", "torch_"))}
    dist = {n for n in os.listdir("/tmp") if n.startswith("vllm_dist_")}
    return {"procs": procs, "shm": shm, "dist": dist}


def tree_pids(rec: Any) -> set[int]:
    return {p.pid for p in rec.procs}


def proc_stat(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (state first), None when gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    return data[data.rfind(b")") + 2 :].decode().split()


def alive(pid: int) -> bool:
    """Exists and is no zombie (an orphan's zombie may wait a moment for its reaper)."""
    st = proc_stat(pid)
    return st is not None and st[0] not in ("Z", "X")


def session_pids(sid: int) -> list[int]:
    """Live (non-zombie) processes of session `sid`."""
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            st = proc_stat(int(name))
            if st is not None and int(st[3]) == sid and st[0] not in ("Z", "X"):
                out.append(int(name))
    return out


class LedgerWatch(threading.Thread):
    """Everything a daemon's ledger records while a test runs (pids with create times, /dev/shm
    names, /tmp paths), polled: what a tree was, after vsup has removed its record."""

    def __init__(self, state_dir: Path, interval: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.state_dir, self.interval = Path(state_dir), interval
        self.procs: dict[tuple[int, float], str] = {}
        self.shm: set[str] = set()
        self.files: set[str] = set()
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.wait(self.interval):
            self.poll()

    def poll(self) -> None:
        try:
            data = json.loads((self.state_dir / "ledger.json").read_text())
        except (OSError, ValueError):
            return
        for t in data.get("trees", []) if isinstance(data, dict) else []:
            for p in t.get("procs", []):
                self.procs[(p["pid"], p["create_time"])] = p.get("name", "?")
            self.shm |= {i["name"] for i in t.get("ipc", [])}
            self.files |= set(t.get("files", []))

    def close(self) -> None:
        self._done.set()
        if self.is_alive():
            self.join(2)
        self.poll()

    def left(self) -> dict[str, list[Any]]:
        """What of the recorded trees still exists now."""
        import psutil

        procs = []
        for (pid, ct), name in self.procs.items():
            with contextlib.suppress(psutil.Error):
                p = psutil.Process(pid)
                if abs(p.create_time() - ct) < 1.0 and p.status() != psutil.STATUS_ZOMBIE:
                    procs.append((pid, name))
        return {
            "procs": procs,
            "shm": sorted(n for n in self.shm if os.path.lexists(f"/dev/shm/{n}")),
            "files": sorted(f for f in self.files if os.path.lexists(f)),
        }


class ControlServerThread:
    """A vsup ControlServer on its own event loop in a thread, so blocking clients can talk to
    it; records its events and the loop's unhandled errors (which fail the `with` block)."""

    def __init__(self, path: Path, handlers: dict[str, Any], **kwargs: Any) -> None:
        import asyncio

        from vsup.control import Acl, ControlServer

        self.events: list[tuple[str, dict[str, Any]]] = []
        self.loop_errors: list[dict[str, Any]] = []
        self.loop = asyncio.new_event_loop()
        self.loop.set_exception_handler(lambda loop, ctx: self.loop_errors.append(ctx))
        kwargs.setdefault("acl", Acl())
        self.server = ControlServer(
            path, handlers, on_event=lambda name, fields: self.events.append((name, fields)), **kwargs
        )
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import asyncio

        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()
        self.loop.run_until_complete(self.loop.shutdown_default_executor())
        self.loop.close()

    def run(self, coro: Any, timeout: float = 10.0) -> Any:
        """Run a coroutine on the server's loop and return its result."""
        import asyncio

        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def set(self, event: Any) -> None:
        """Set an asyncio.Event of the server loop from the test thread."""
        self.loop.call_soon_threadsafe(event.set)

    def wait(self, event: Any, timeout: float = 10.0) -> None:
        """Block until an asyncio.Event of the server loop is set."""
        import asyncio

        self.run(asyncio.wait_for(event.wait(), timeout), timeout + 1)

    def event_names(self) -> list[str]:
        return [name for name, _ in list(self.events)]

    def __enter__(self) -> ControlServerThread:
        self.thread.start()
        try:
            self.run(self.server.start())
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        try:
            self.run(self.server.close(), timeout=30)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(30)

    def __exit__(self, *exc: Any) -> None:
        self.stop()
        assert not self.loop_errors, f"unhandled errors on the server loop: {self.loop_errors[:3]}"


class Gates:
    """asyncio.Events shared between a test and its handlers (created lazily on the server loop)."""

    def __init__(self) -> None:
        self._events: dict[str, asyncio.Event] = {}

    def __getitem__(self, name: str) -> asyncio.Event:
        import asyncio

        return self._events.setdefault(name, asyncio.Event())


def make_handlers(gates: Gates) -> dict[str, Any]:
    """The control tests' commands: one of each way a handler can answer, fail or follow."""
    import asyncio

    from vsup.control import CommandError

    async def status(req: Request) -> Any:
        return {"state": "ready", "uid": req.peer.uid}

    async def echo(req: Request) -> Any:
        return req.args

    async def phases(req: Request) -> Any:
        for phase in ("drain", "stop", "start"):
            await req.progress(phase=phase, elapsed_s=0.5)
        return {"phases": 3}

    async def fail(req: Request) -> Any:
        raise CommandError("failed", "engine core died: CUDA out of memory")

    async def busy(req: Request) -> Any:
        raise CommandError("busy", "reload of 'b' is running")

    async def crash(req: Request) -> Any:
        raise RuntimeError("boom")

    async def not_json(req: Request) -> Any:
        return {"value": object()}

    async def bad_code(req: Request) -> Any:
        raise CommandError("nope", "made up")

    async def needs_model(req: Request) -> Any:
        return {"model": req.arg("model", str), "wait_s": req.arg("wait_s", float, 1.0)}

    async def reload(req: Request) -> Any:
        gates["reload_started"].set()
        await gates["reload_go"].wait()
        await req.progress(phase="stop", elapsed_s=1.0)
        gates["reload_done"].set()
        return {"model": "b"}

    async def events(req: Request) -> Any:
        try:
            gates["events_started"].set()
            await req.event({"event": "state_changed", "state": "ready"})
            await asyncio.Event().wait()  # follow until cancelled
        except asyncio.CancelledError:
            gates["events_cancelled"].set()
            raise

    async def flood(req: Request) -> Any:
        blob = "x" * 65536
        sent = 0
        while await req.event({"n": sent, "blob": blob}):
            sent += 1
            await asyncio.sleep(0)  # yield so the loop can flush and serve others
        gates["flood_dropped"].set()
        return {"sent": sent}

    return {
        "status": status,
        "echo": echo,
        "phases": phases,
        "fail": fail,
        "busy": busy,
        "crash": crash,
        "not_json": not_json,
        "bad_code": bad_code,
        "needs_model": needs_model,
        "reload": reload,
        "events": events,
        "flood": flood,
    }


# ---- another user, for real --------------------------------------------------------------------

OTHER_USER = "vsuptest"
OTHER_GROUP = "vsuptestgrp"

CLIENT_SCRIPT = """
import json
from pathlib import Path
from vsup.control import ControlClient, DaemonUnreachable
try:
    reply = ControlClient(Path(sys.argv[2]), timeout_s=10).call(sys.argv[3])
except DaemonUnreachable as exc:
    print(json.dumps({"unreachable": str(exc)}))
else:
    print(json.dumps({"reply": reply}))
"""


class OtherUser:
    """A real second user (member of OTHER_GROUP), an interpreter it may execute and a copy of
    the vsup package it may import."""

    def __init__(self, python: str, vsup_path: str) -> None:
        entry = pwd.getpwnam(OTHER_USER)
        self.uid = entry.pw_uid
        self.primary_gid = entry.pw_gid
        self.group_gid = grp.getgrnam(OTHER_GROUP).gr_gid
        self.python = python
        self.vsup_path = vsup_path

    def argv(self, script: str, *args: str) -> list[str]:
        """The command that runs Python `script` as this user, with `sys` imported and the vsup
        copy (sys.argv[1]) on its path; `args` follow as sys.argv[2:]."""
        prelude = "import sys; sys.path.insert(0, sys.argv[1])\n"
        return ["runuser", "-u", OTHER_USER, "--", self.python, "-c", prelude + script, self.vsup_path, *args]

    def popen(self, script: str, *args: str) -> subprocess.Popen[str]:
        """`script` running as this user (see `argv`), its stdout and stderr piped."""
        return subprocess.Popen(
            self.argv(script, *args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd="/"
        )

    def call(self, path: Path, cmd: str) -> dict[str, Any]:
        """Run ControlClient(path).call(cmd) as this user in a fresh process."""
        done = subprocess.run(
            self.argv(CLIENT_SCRIPT, str(path), cmd), capture_output=True, text=True, timeout=60, cwd="/"
        )
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    def server(self, directory: Path, gates: Gates, acl: Acl, **kwargs: Any) -> ControlServerThread:
        """A control server (`make_handlers`) at directory/s.sock whose socket is in this user's
        group, so that it may connect; `acl` says what it may do there."""
        return ControlServerThread(
            directory / "s.sock", make_handlers(gates), acl=acl, socket_group=self.group_gid, **kwargs
        )


def ensure_other_user() -> None:
    """OTHER_USER in OTHER_GROUP, created if missing (left in place: other sessions share it)."""
    subprocess.run(["groupadd", "-f", OTHER_GROUP], check=True, capture_output=True)
    try:
        entry = pwd.getpwnam(OTHER_USER)
    except KeyError:
        made = subprocess.run(
            [
                "useradd",
                "--system",
                "--no-create-home",
                "--shell",
                "/usr/sbin/nologin",
                "-G",
                OTHER_GROUP,
                OTHER_USER,
            ],
            capture_output=True,
            text=True,
        )
        if made.returncode != 0:
            pwd.getpwnam(OTHER_USER)  # created by a concurrent session: fine; else let it raise
        return
    if OTHER_GROUP not in [g.gr_name for g in grp.getgrall() if entry.pw_name in g.gr_mem]:
        subprocess.run(["usermod", "-aG", OTHER_GROUP, OTHER_USER], check=True, capture_output=True)


def other_user_python() -> str | None:
    """An interpreter (Python >= 3.11) that OTHER_USER may execute, None if there is none."""
    for python in (sys.executable, "/usr/bin/python3"):
        probe = subprocess.run(
            [
                "runuser",
                "-u",
                OTHER_USER,
                "--",
                python,
                "-c",
                "import sys; assert sys.version_info >= (3, 11)",
            ],
            capture_output=True,
            cwd="/",
        )
        if probe.returncode == 0:
            return python
    return None
