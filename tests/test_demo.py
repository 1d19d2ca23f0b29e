"""`make demo` (scripts/demo.py) in a pseudo-terminal, stopped with Ctrl-C as a person would
(issue 22): the terminal's ^C goes to the foreground process group, which is the demo only;
the daemon hears exactly one SIGINT per Ctrl-C. Real vLLM."""

from __future__ import annotations

import os
import pty
import signal
import threading
import time

import pytest

from support import ROOT, LedgerWatch, require_real_vllm, wait_for

pytestmark = pytest.mark.vllm

DEMO_STATE = ROOT / ".demo" / "state"
SERVE_S = 420  # two real starts and a reload on 2 cores, with room


class Terminal:
    """scripts/demo.py as the session leader of a new pty: its controlling terminal."""

    def __init__(self, env: dict[str, str]) -> None:
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: becomes the demo
            os.chdir(ROOT)
            py = str(ROOT / ".venv" / "bin" / "python")
            os.execve(py, [py, "scripts/demo.py"], env)  # noqa: S606 - an argv list, no shell
        self.out: list[str] = []
        self.status: int | None = None
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        while True:
            try:
                data = os.read(self.fd, 4096)
            except OSError:
                return
            if not data:
                return
            self.out.append(data.decode(errors="replace"))

    def text(self) -> str:
        return "".join(self.out)

    def ctrl_c(self) -> None:
        os.write(self.fd, b"\x03")  # the line discipline sends SIGINT to the foreground group

    def exited(self) -> bool:
        if self.status is None:
            pid, st = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.status = os.waitstatus_to_exitcode(st)
        return self.status is not None

    def close(self) -> None:
        if not self.exited():
            os.killpg(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
        os.close(self.fd)


def _run(ctrl_cs: int, env_extra: dict[str, str]) -> tuple[Terminal, LedgerWatch, float]:
    require_real_vllm()
    env = {**os.environ, **env_extra, "TERM": "xterm"}
    env.pop("VSUP_CONFIG", None)
    watch = LedgerWatch(DEMO_STATE)
    watch.start()
    term = Terminal(env)
    try:
        wait_for(lambda: "serving; try" in term.text() or term.exited(), SERVE_S, "the demo serving", 1.0)
        assert not term.exited(), term.text()[-3000:]
        for i in range(ctrl_cs):
            if i:
                time.sleep(0.2)  # "0.2 s apart" is the scenario itself
            term.ctrl_c()
        last = time.monotonic()
        return term, watch, last
    except BaseException:
        term.close()
        watch.close()
        raise


def _cleanup_after(watch: LedgerWatch) -> None:
    """Whatever the demo left (when a test fails) goes, by the ledger."""
    from vsup import cleanup, proctree

    recs = proctree.Ledger(DEMO_STATE).load()
    if recs:
        cleanup.cleanup(recs, grace_s=1.0)


def test_one_ctrl_c_stops_the_demo_clean() -> None:
    """One Ctrl-C: the demo exits within 60 s, says it is clean, and nothing of its trees is left
    in /dev/shm or /tmp (nor any process)."""
    term, watch, at = _run(1, {})
    try:
        wait_for(term.exited, 60, "the demo to exit after one Ctrl-C", 0.2)
        watch.close()
        assert term.status == 0, term.text()[-3000:]
        assert "clean: no process of the demo's trees is left" in term.text(), term.text()[-3000:]
        assert "shutdown_forced" not in term.text()  # one Ctrl-C is one signal
        assert watch.shm and watch.left() == {"procs": [], "shm": [], "files": []}
    finally:
        term.close()
        watch.close()
        _cleanup_after(watch)


def test_two_ctrl_c_still_leave_nothing() -> None:
    """Two Ctrl-C 0.2 s apart: the tree's processes, segments and semaphores are gone within 5 s
    of the second; the demo then says it is clean."""
    term, watch, second = _run(2, {"VSUP_DEMO_RELOAD": "0"})
    try:
        wait_for(
            lambda: not (watch.left()["procs"] or watch.left()["shm"]),
            5,
            "the tree's processes and segments gone",
            0.1,
        )
        assert time.monotonic() - second < 5.5, watch.left()
        wait_for(term.exited, 30, "the demo to exit", 0.2)
        watch.close()
        assert "shutdown_forced" in term.text() or "forced_exit" in term.text(), term.text()[-3000:]
        assert "clean: no process of the demo's trees is left" in term.text(), term.text()[-3000:]
        assert watch.left() == {"procs": [], "shm": [], "files": []}
    finally:
        term.close()
        watch.close()
        _cleanup_after(watch)
