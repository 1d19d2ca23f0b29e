#!/usr/bin/env python3
"""How long cleanup takes: 10, 100, 1000 orphaned /dev/shm segments and 2, 20, 200 orphaned
processes, on the real OS (real segments, real processes, real signals and unlinks).

    .venv/bin/python bench/bench_cleanup.py [--reps 3]

Prints a Markdown table. Everything it creates is named psm_vsupbench* or lives in sessions it
started, and is removed at the end even if a run fails.

Segments: N unheld 4 KiB POSIX segments (pages touched), recorded in a dead tree's ledger
entry, so cleanup unlinks them by device + inode after scanning every process on the host for
holders. Processes: N `VLLM::Worker_TP<i>`-titled `sleep`s orphaned in one session (their
parent shell exited); "dead tree" finds them by the recorded session, "foreign" by title (the
Host sees only the bench's session, so the bench can never kill anyone else's orphans).
"""

from __future__ import annotations

import argparse
import mmap
import os
import secrets
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import posix_ipc

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "supervisor"))

from vsup.cleanup import cleanup
from vsup.host import Host, ProcInfo
from vsup.proctree import IpcRef, ProcRef, TreeRecord

PREFIX = "psm_vsupbench"


class BenchHost(Host):
    """The real Host; /dev/shm and /tmp listings show only the bench's names, and with `sids`
    set only those sessions' processes (plus PID 1) are visible."""

    def __init__(self, sids: set[int] | None = None) -> None:
        super().__init__()
        self.sids = sids

    def list_names(self, root: Path) -> list[str]:
        return [n for n in super().list_names(root) if n.startswith(PREFIX)]

    def processes(self, cmdline: bool = False) -> dict[int, ProcInfo]:
        procs = super().processes(cmdline)
        if self.sids is None:
            return procs
        return {pid: p for pid, p in procs.items() if p.sid in self.sids or pid == 1}


def dead_record(sid: int, ipc: list[IpcRef]) -> TreeRecord:
    leader = ProcRef(sid, time.time() - 3600, "python", ["python"])
    return TreeRecord(secrets.token_hex(6), "bench", 0, time.time() - 3600, leader, sid, sid, [leader], ipc)


def make_segments(n: int) -> list[IpcRef]:
    refs = []
    tag = secrets.token_hex(3)
    for i in range(n):
        name = f"{PREFIX}{tag}_{i}"
        shm = posix_ipc.SharedMemory("/" + name, posix_ipc.O_CREX, size=4096)
        with mmap.mmap(shm.fd, 4096) as m:
            m[0:1] = b"x"
        shm.close_fd()
        st = os.stat(f"/dev/shm/{name}")
        refs.append(IpcRef(name, "shm", st.st_dev, st.st_ino, 4096))
    return refs


def make_orphans(n: int) -> tuple[int, list[int]]:
    script = (
        f"for i in $(seq 1 {n}); do (exec -a VLLM::Worker_TP$i sleep 600 </dev/null >/dev/null 2>&1) & "
        "echo $!; done"
    )
    out = subprocess.run(["setsid", "bash", "-c", script], capture_output=True, text=True, check=True)
    pids = [int(x) for x in out.stdout.split()]
    sid = os.getsid(pids[0])
    deadline = time.monotonic() + 30
    while any(os.path.exists(f"/proc/{p}") and _ppid(p) != 1 and _ppid(p) != os.getpid() for p in pids):
        if time.monotonic() > deadline:
            break
        time.sleep(0.01)
    return sid, pids


def _ppid(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
        return int(data[data.rfind(b")") + 2 :].split()[1])
    except (OSError, ValueError, IndexError):
        return -1


def remove_leftovers(pids: list[int]) -> None:
    for p in pids:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for name in os.listdir("/dev/shm"):
        if name.startswith(PREFIX):
            try:
                os.unlink(f"/dev/shm/{name}")
            except FileNotFoundError:
                pass


T = TypeVar("T")


def timed(fn: Callable[[], T]) -> tuple[float, T]:
    t0 = time.perf_counter()
    r = fn()
    return time.perf_counter() - t0, r


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=3)
    a = ap.parse_args()
    rows = []
    started: list[int] = []
    nproc = len([d for d in os.listdir("/proc") if d.isdigit()])
    try:
        for n in (10, 100, 1000):
            times, freed, done = [], 0, 0
            for _ in range(a.reps):
                refs = make_segments(n)
                t, rep = timed(lambda: cleanup([dead_record(2**22 - 1, refs)], host=BenchHost()))  # noqa: B023 - called at once
                assert rep.clean and len(rep.unlinked) == n, rep.remaining
                times.append(t)
                freed, done = rep.bytes_freed, len(rep.unlinked)
            rows.append(("segments", n, "dead tree", times, f"{done} unlinked, {freed // 1024} KiB"))
        for n in (2, 20, 200):
            for mode in ("dead tree", "foreign"):
                times, killed = [], 0
                for _ in range(a.reps):
                    sid, pids = make_orphans(n)
                    started += pids
                    if mode == "dead tree":
                        t, rep = timed(lambda: cleanup([dead_record(sid, [])], host=BenchHost()))  # noqa: B023 - called at once
                    else:
                        t, rep = timed(lambda: cleanup([], foreign=True, host=BenchHost({sid})))  # noqa: B023 - called at once
                    assert rep.clean and len(rep.killed) == n, (len(rep.killed), rep.remaining)
                    times.append(t)
                    killed = len(rep.killed)
                rows.append(("processes", n, mode, times, f"{killed} killed (SIGTERM)"))
    finally:
        remove_leftovers(started)
    print(
        f"cleanup() wall time, median of {a.reps} (min-max); host: {os.cpu_count()} CPUs, {nproc} processes before the run\n"
    )
    print("| what | N | mode | median | min - max | result |")
    print("| --- | ---: | --- | ---: | ---: | --- |")
    for what, n, mode, times, result in rows:
        print(
            f"| {what} | {n} | {mode} | {statistics.median(times) * 1000:.0f} ms | "
            f"{min(times) * 1000:.0f} - {max(times) * 1000:.0f} ms | {result} |"
        )


if __name__ == "__main__":
    main()
