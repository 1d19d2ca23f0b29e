"""Helpers for real-OS tests: start fake vLLM trees and decoys, remove all of it afterwards,
and a Host that sees only what a test started.

`ScopedHost` is the real Host (real /proc, real signals, real unlinks) that lists only the
processes of the sessions a test started and only the /dev/shm and /tmp names it allows, so a
test run beside other people's vLLM servers can neither touch nor be confused by them.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

from support import OTHER_USER, alive, ensure_other_user, session_pids, wait_for  # noqa: F401 - re-exported: the suite's one copy
from vsup.host import Host, ProcInfo
from vsup.proctree import TreeRecord, spawn

FAKE = str(Path(__file__).with_name("fake_vllm.py"))
READY_TIMEOUT_S = 60.0  # a fake tree is up in 1-3 s on 2 idle cores; a busy machine is slower


def read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def kill_session(sid: int) -> None:
    for pid in session_pids(sid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def unlink_quiet(path: str | Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


class FakeTree:
    """One fake vLLM tree; `stop()` removes every process and file it made, whatever happened."""

    def __init__(self, workdir: Path, *args: str, via_vsup: bool = True, port: int = 0) -> None:
        self.dir = Path(workdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.ready_path = self.dir / "ready.json"
        self.log = self.dir / "tree.log"
        argv = [
            sys.executable,
            FAKE,
            "--work",
            str(self.dir / "work"),
            "--ready",
            str(self.ready_path),
            *args,
        ]
        if port:
            argv += ["--port", str(port)]
        self.rec: TreeRecord | None = None
        if via_vsup:
            self.popen, self.rec = spawn(argv, dict(os.environ), self.log, model="fake", port=port)
        else:
            with open(self.log, "ab") as log:
                self.popen = subprocess.Popen(
                    argv,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    start_new_session=True,
                )
        self.sid = self.popen.pid
        self.info: dict = {}

    def wait_ready(self) -> dict:
        def ready():
            if self.popen.poll() is not None:
                raise AssertionError(
                    f"fake tree exited {self.popen.returncode}: {self.log.read_text()[-2000:]}"
                )
            return read_json(self.ready_path)

        self.info = wait_for(ready, READY_TIMEOUT_S, f"fake tree {self.sid} ready")
        return self.info

    @property
    def pids(self) -> list[int]:
        i = self.info
        return [i["api"], i["tracker"], i["engine"], *i["workers"]]

    @property
    def shm_names(self) -> list[str]:
        return [*self.info.get("segments", []), *self.info.get("semaphores", [])]

    @property
    def tmp_names(self) -> list[str]:
        return [Path(p).name for p in [*self.info.get("sockets", []), self.info.get("dist", "/x")]]

    def kill_api(self) -> None:
        os.kill(self.info["api"], signal.SIGKILL)
        self.popen.wait(timeout=10)

    def stop(self) -> None:
        kill_session(self.sid)
        try:
            self.popen.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        for n in self.shm_names:
            unlink_quiet(f"/dev/shm/{n}")
        for p in [*self.info.get("sockets", []), self.info.get("dist")]:
            if p:
                unlink_quiet(p)


class Decoy:
    """A lone decoy process (fake_vllm.py holder|titled ...) and the segment it made."""

    def __init__(self, workdir: Path, mode: str, *args: str, shm: str | None = None) -> None:
        self.dir = Path(workdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.ready_path = self.dir / f"{mode}-{secrets.token_hex(3)}.json"
        self.shm = shm
        argv = [sys.executable, FAKE, mode, "--ready", str(self.ready_path), *args]
        if shm:
            argv += ["--shm", shm]
        self.popen = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, start_new_session=True
        )
        self.info = wait_for(lambda: read_json(self.ready_path), READY_TIMEOUT_S, f"decoy {mode}")
        self.pid = self.info["pid"]
        self.sid = self.pid if "--orphan" in args else self.popen.pid

    def stop(self) -> None:
        for pid in {self.pid, self.popen.pid}:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            self.popen.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        if self.shm:
            unlink_quiet(f"/dev/shm/{self.shm}")


def rand_name(prefix: str) -> str:
    return f"{prefix}{secrets.token_hex(4)}"


class ScopedHost(Host):
    """The real Host, seeing only the given sessions' processes (plus PID 1 and this test
    process's ancestors) and only the allowed names in the shm and tmp roots."""

    def __init__(
        self,
        sids: Iterable[int],
        shm_allow: Callable[[str], bool] | None = None,
        tmp_allow: Callable[[str], bool] | None = None,
        **kw,
    ) -> None:
        super().__init__(**kw)
        self.sids = set(sids)
        self.shm_allow = shm_allow or (lambda _n: False)
        self.tmp_allow = tmp_allow or (lambda _n: False)
        self.keep = {1}
        pid = os.getpid()
        while pid > 1 and pid not in self.keep:
            self.keep.add(pid)
            info = super().process(pid, cmdline=False)
            pid = info.ppid if info else 1

    def processes(self, cmdline: bool = False) -> dict[int, ProcInfo]:
        return {
            pid: p for pid, p in super().processes(cmdline).items() if p.sid in self.sids or pid in self.keep
        }

    def list_names(self, root: Path) -> list[str]:
        names = super().list_names(root)
        if Path(root) == self.shm_root:
            return [n for n in names if self.shm_allow(n)]
        if Path(root) == self.tmp_root:
            return [n for n in names if self.tmp_allow(n)]
        return names

    def unix_sockets(self) -> dict[int, str]:
        return {i: p for i, p in super().unix_sockets().items() if self.tmp_allow(Path(p).name)}


def other_user_fixture():
    """A module fixture: the name of the suite's second user (support.ensure_other_user: created
    if missing and left in place, since other tests and sessions share it; removing it here once
    could pull it from under them)."""
    import pytest

    @pytest.fixture(scope="module")
    def other_user() -> str:
        ensure_other_user()
        return OTHER_USER

    return other_user


class OtherUserOrphan:
    """A `VLLM::Worker_TP0`-titled orphan and an unheld psm_* segment, both of another user."""

    def __init__(self, user: str) -> None:
        self.shm = rand_name("psm_vsupother")
        script = (
            "(exec -a VLLM::Worker_TP0 sleep 600 </dev/null >/dev/null 2>&1) & echo $!; "
            f"head -c 8192 /dev/zero > /dev/shm/{self.shm}"
        )
        out = subprocess.run(
            [
                "setpriv",
                f"--reuid={user}",
                f"--regid={user}",
                "--clear-groups",
                "setsid",
                "bash",
                "-c",
                script,
            ],
            check=True,
            capture_output=True,
            text=True,
            timeout=30,
        )
        self.pid = int(out.stdout.strip())
        wait_for(lambda: os.path.exists(f"/dev/shm/{self.shm}"), 30, "other-user segment")
        info = Host().process(self.pid)
        assert info is not None, f"other-user holder {self.pid} is gone"
        self.sid = info.sid

    def stop(self) -> None:
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        unlink_quiet(f"/dev/shm/{self.shm}")
