#!/usr/bin/env python3
"""A vLLM-like tensor-parallel tree that forms a real torch.distributed group (issue 9).

Shape (vLLM 0.32, TP=2; the parent plays the API server and the engine core in one process):

    tree      python tp_tree.py tree ...            session leader when started by proctree.spawn;
    |                                               title unchanged, logs as (EngineCore pid=N)
    +- resource_tracker                              multiprocessing's, started by the spawn context
    +- VLLM::Worker_TP0   (spawn child, setproctitle) psm_* segment, all-reduce loop
    +- VLLM::Worker_TP1   likewise

What it leaves in /dev/shm and /tmp, like vLLM: one ``psm_*`` segment per worker
(multiprocessing.shared_memory, registered with the resource_tracker), two ``sem.mp-*``
semaphores created by the parent (a log lock and the ready count, spawn context: not unlinked at
creation), the FileStore ``/tmp/vllm_dist_<uuid hex>`` the group is initialised through (vLLM's
``get_file_store_init_method``), and with NCCL whatever NCCL puts in /dev/shm (``nccl-*``).

Backends: ``--device cpu`` uses gloo, ``--device cuda`` uses nccl with rank r on GPU r, each
worker holding ``--mib`` MiB of device memory. Every worker all-reduces a small tensor in a loop,
checks the sum, and counts completed rounds in its psm segment (see ``Progress``), so a test can
tell a worker that progresses from one blocked inside the collective without attaching to it.

On a worker's death the parent logs vLLM's line (``Worker proc VllmWorker-1 died unexpectedly
(exit code: -9), shutting down executor.``) and then does nothing: the survivors stay as they
are, the worst case a supervisor meets (vLLM 0.32's executor would shut down; a worker wedged in
NCCL, or vLLM 0.6's workers, would not).

Readiness: once every worker has completed one all-reduce, the parent writes ``--ready`` as JSON
(atomically): parent, sid, workers (pids by rank), tracker, psm names, sem names, dist path,
backend, and each worker's view of the NVLink-multicast switches. Tests wait for that file.

The NVLink-multicast switches (NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1,
NVSHMEM_DISABLE_NVLS=1) are forced in the parent's environment before anything is spawned, so
every process of the tree has them whatever the caller passed.

The bottom of this file is the driver side (start, read progress, tear down), imported by the
tests; it does not import torch.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import struct
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

NVLS_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
MIB = 1 << 20
# A worker that has not joined the group within this long is broken: fail rather than hang.
WORKER_READY_TIMEOUT_S = 240.0
# torch's collective timeout. A blocked all-reduce must stay blocked while a test looks at it
# (and cleans it up); gloo would otherwise raise after its default 30 min, NCCL's watchdog after
# 10 min, which is also fine, but a test must not depend on which.
COLLECTIVE_TIMEOUT_S = 900.0


# ---- progress record: 32 bytes at the start of each worker's psm segment -------------------
@dataclass(frozen=True)
class Progress:
    """What a worker last wrote: rounds completed, and where it is now."""

    rounds: int
    phase: int  # one of the PHASE_* values
    rank: int
    pid: int

    FMT = "<QQqq"
    SIZE = struct.calcsize(FMT)

    def pack(self) -> bytes:
        return struct.pack(self.FMT, self.rounds, self.phase, self.rank, self.pid)

    @classmethod
    def unpack(cls, raw: bytes) -> Progress:
        return cls(*struct.unpack(cls.FMT, raw[: cls.SIZE]))


PHASE_STARTING, PHASE_IN_COLLECTIVE, PHASE_BETWEEN, PHASE_FAILED = 0, 1, 2, 3
PHASES = {
    PHASE_STARTING: "starting",
    PHASE_IN_COLLECTIVE: "in-collective",
    PHASE_BETWEEN: "between",
    PHASE_FAILED: "failed",
}
SHM_SIZE = 4096


# ---- the program ---------------------------------------------------------------------------
def log(proc: str, level: str, msg: str, lock: Any = None) -> None:
    """One vLLM 0.32-format line: ``(Worker_TP0 pid=N) INFO 11-25 12:45:16 [tp_tree.py:L] msg``."""
    line = sys._getframe(1).f_lineno
    text = f"({proc} pid={os.getpid()}) {level} {time.strftime('%m-%d %H:%M:%S')} [tp_tree.py:{line}] {msg}\n"
    if lock is not None:
        with lock:
            sys.stdout.write(text)
            sys.stdout.flush()
    else:
        sys.stdout.write(text)
        sys.stdout.flush()


def set_title(title: str) -> str:
    try:
        import setproctitle
    except ImportError:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from gpu_tree import set_title as fallback  # type: ignore[import-not-found]  # prctl + argv overwrite; found at run time

        return fallback(title)
    setproctitle.setproctitle(title)
    return "setproctitle"


def worker_main(
    rank: int,
    world: int,
    device: str,
    store: str,
    mib: int,
    interval_s: float,
    conn: Any,
    log_lock: Any,
    ready: Any,
) -> None:
    """One TP rank: title, psm segment, group, device memory, then all-reduce forever."""
    from multiprocessing import shared_memory

    method = set_title(f"VLLM::Worker_TP{rank}")
    me = f"Worker_TP{rank}"
    shm = shared_memory.SharedMemory(create=True, size=SHM_SIZE)
    buf = shm.buf
    assert buf is not None  # open until the worker exits

    def mark(rounds: int, phase: int) -> None:
        buf[: Progress.SIZE] = Progress(rounds, phase, rank, os.getpid()).pack()

    mark(0, PHASE_STARTING)
    import datetime

    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    backend = "nccl" if device == "cuda" else "gloo"
    log(
        me,
        "INFO",
        f"world_size={world} rank={rank} local_rank={rank} "
        f"distributed_init_method=file://{store} backend={backend}",
        log_lock,
    )
    dist.init_process_group(
        backend,
        init_method=f"file://{store}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S),
    )
    held = None
    if device == "cuda":
        torch.cuda.set_device(rank)
        dev = torch.device("cuda", rank)
        held = torch.empty(mib * MIB, dtype=torch.uint8, device=dev)
        held.fill_(1)
        v = torch.cuda.nccl.version()
        log(
            me,
            "INFO",
            f"vLLM is using nccl=={'.'.join(map(str, v)) if isinstance(v, tuple) else v}",
            log_lock,
        )
    else:
        dev = torch.device("cpu")
    ones = torch.ones(256, dtype=torch.float32, device=dev)

    def all_reduce_once() -> None:
        x = ones.clone()
        dist.all_reduce(x)
        got = float(x[0].item())  # .item() waits for the NCCL kernel: where a dead peer hangs us
        if got != float(world):
            raise RuntimeError(f"all_reduce gave {got}, expected {world}")

    rounds = 0
    mark(rounds, PHASE_IN_COLLECTIVE)
    all_reduce_once()  # the group is really formed (NCCL initialises lazily, here)
    rounds += 1
    mark(rounds, PHASE_BETWEEN)
    conn.send(
        {
            "rank": rank,
            "pid": os.getpid(),
            "psm": shm.name,
            "title_method": method,
            "device": str(dev),
            "env": {k: os.environ.get(k) for k in NVLS_OFF},
        }
    )
    conn.close()
    ready.release()
    log(
        me,
        "INFO",
        f"rank {rank} in world size {world} is assigned as TP rank {rank}; all_reduce loop started",
        log_lock,
    )
    last_log = time.monotonic()
    try:
        while True:
            mark(rounds, PHASE_IN_COLLECTIVE)
            all_reduce_once()
            rounds += 1
            mark(rounds, PHASE_BETWEEN)
            if time.monotonic() - last_log >= 10.0:
                log(me, "INFO", f"all_reduce rounds: {rounds}", log_lock)
                last_log = time.monotonic()
            time.sleep(interval_s)  # pacing, so idle trees leave the 2 shared cores alone
    except Exception as e:  # noqa: BLE001 - a vLLM worker logs the failure and waits for RPCs
        mark(rounds, PHASE_FAILED)
        log(
            me,
            "ERROR",
            f"all_reduce failed after {rounds} rounds: {type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}",
            log_lock,
        )
        del held
        while True:
            signal.pause()


def run_tree(args: argparse.Namespace) -> None:
    import multiprocessing as mp
    import multiprocessing.connection
    from multiprocessing import resource_tracker

    os.environ.update(NVLS_OFF)
    if args.device == "cpu":
        os.environ.setdefault("OMP_NUM_THREADS", "1")
    ctx = mp.get_context("spawn")
    log_lock = ctx.Lock()
    ready = ctx.Semaphore(0)
    store = args.store or os.path.join(tempfile.gettempdir(), f"vllm_dist_{uuid.uuid4().hex}")
    me = "EngineCore"
    log(
        me,
        "INFO",
        f"starting {args.world} workers (backend {'nccl' if args.device == 'cuda' else 'gloo'})",
        log_lock,
    )
    procs, conns = [], []
    for rank in range(args.world):
        parent_end, child_end = ctx.Pipe(duplex=False)
        p = ctx.Process(
            target=worker_main,
            name=f"VllmWorker-{rank}",
            daemon=True,
            args=(rank, args.world, args.device, store, args.mib, args.interval, child_end, log_lock, ready),
        )
        p.start()
        child_end.close()
        procs.append(p)
        conns.append(parent_end)
    infos: list[dict] = []
    deadline = time.monotonic() + WORKER_READY_TIMEOUT_S
    for p, c in zip(procs, conns, strict=True):
        if not c.poll(max(0.0, deadline - time.monotonic())):
            log(
                me,
                "ERROR",
                f"worker {p.name} did not join the group in {WORKER_READY_TIMEOUT_S:g} s",
                log_lock,
            )
            for q in procs:
                q.kill()
            sys.exit(1)
        try:
            infos.append(c.recv())
        except EOFError:
            log(me, "ERROR", f"worker {p.name} exited during start-up (exit code: {p.exitcode})", log_lock)
            for q in procs:
                q.kill()
            sys.exit(1)
    for _ in procs:
        ready.acquire()
    tracker = getattr(resource_tracker._resource_tracker, "_pid", None)
    doc = {
        "parent": os.getpid(),
        "sid": os.getsid(0),
        "pgid": os.getpgid(0),
        "workers": [i["pid"] for i in infos],
        "tracker": tracker,
        "psm": [i["psm"] for i in infos],
        "sem": ["sem." + s._semlock.name.lstrip("/") for s in (log_lock, ready)],  # type: ignore[union-attr]  # CPython's private handle holds the name
        "dist": store,
        "backend": "nccl" if args.device == "cuda" else "gloo",
        "world": args.world,
        "devices": [i["device"] for i in infos],
        "title_method": infos[0]["title_method"],
        "worker_env": [i["env"] for i in infos],
    }
    tmp = f"{args.ready}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(doc, f)
    os.rename(tmp, args.ready)
    log(me, "INFO", f"{args.world} workers ready: {doc['workers']}", log_lock)
    live = {p.sentinel: p for p in procs}
    while live:
        for s in multiprocessing.connection.wait(list(live)):
            assert isinstance(s, int)  # sentinels are fds
            p = live.pop(s)
            p.join()
            log(
                me,
                "ERROR",
                f"Worker proc {p.name} died unexpectedly (exit code: {p.exitcode}), shutting down executor.",
                log_lock,
            )
    while True:
        signal.pause()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("role", choices=["tree"])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--mib", type=int, default=1024, help="device memory per worker (cuda)")
    ap.add_argument("--interval", type=float, default=0.02, help="pause between all-reduces, s")
    ap.add_argument("--ready", required=True)
    ap.add_argument("--store", default="", help="FileStore path (default /tmp/vllm_dist_<uuid hex>)")
    args = ap.parse_args(argv)
    run_tree(args)


# ---- driver side (imported by the tests; no torch) -----------------------------------------
FAKE = Path(__file__).resolve()
SHM_ROOT = Path("/dev/shm")


def wait_until(pred: Callable[[], Any], timeout_s: float, what: str, poll_s: float = 0.02) -> Any:
    """Poll ``pred`` until truthy; AssertionError naming ``what`` (and the last value) at the deadline."""
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while True:
        last = pred()
        if last:
            return last
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what} (last: {last!r})")
        time.sleep(poll_s)


def read_progress(psm: str) -> Progress | None:
    """A worker's progress record, read with pread (no mapping, nothing registered or held)."""
    try:
        fd = os.open(SHM_ROOT / psm, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        raw = os.pread(fd, Progress.SIZE, 0)
    finally:
        os.close(fd)
    return Progress.unpack(raw) if len(raw) == Progress.SIZE else None


def proc_state(pid: int) -> str | None:
    """The state letter of /proc/PID/stat (R S D T Z ...), None when gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    return stat[stat.rfind(b")") + 2 :].split()[0].decode()


def proc_ppid(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    return int(stat[stat.rfind(b")") + 2 :].split()[1])


def alive(pid: int) -> bool:
    """Exists and is no zombie (an orphan's zombie may wait seconds for a reaper here)."""
    return proc_state(pid) not in (None, "Z", "X")


def session_pids(sid: int) -> list[int]:
    """Live (non-zombie) processes of session ``sid``."""
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rfind(b")") + 2 :].split()
        if int(fields[3]) == sid and fields[0] not in (b"Z", b"X"):
            out.append(int(name))
    return out


@dataclass
class TpJob:
    """One started tree as the tests see it: the ready document, the log, the Popen."""

    popen: Any
    ready: dict
    log_path: Path
    record: Any = None  # vsup.proctree.TreeRecord when started through proctree.spawn
    extra: dict = field(default_factory=dict)

    @property
    def workers(self) -> list[int]:
        return list(self.ready["workers"])

    @property
    def sid(self) -> int:
        return int(self.ready["sid"])

    def progress(self) -> list[Progress | None]:
        return [read_progress(n) for n in self.ready["psm"]]

    def rounds(self) -> list[int]:
        return [p.rounds if p is not None else -1 for p in self.progress()]

    def objects(self) -> dict[str, bool]:
        """Each /dev/shm and /tmp object of the tree -> does it exist now?"""
        names = {str(SHM_ROOT / n): (SHM_ROOT / n).exists() for n in [*self.ready["psm"], *self.ready["sem"]]}
        names[self.ready["dist"]] = os.path.exists(self.ready["dist"])
        return names

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_progress(self, ranks: list[int], rounds: int, timeout_s: float, what: str) -> list[int]:
        """Wait until each rank in ``ranks`` has completed ``rounds`` more all-reduces."""
        start = self.rounds()

        def moved() -> list[int] | None:
            now = self.rounds()
            return now if all(now[r] >= start[r] + rounds for r in ranks) else None

        return wait_until(moved, timeout_s, what)

    def teardown(self) -> None:
        """Kill whatever is left of this tree (its own session only) and remove its objects."""
        for _ in range(3):
            pids = session_pids(self.sid)
            if not pids:
                break
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            try:
                wait_until(lambda: not session_pids(self.sid), 10.0, f"session {self.sid} to die")
            except AssertionError:
                continue
        if self.popen.poll() is None:
            self.popen.kill()
        self.popen.wait()
        for path in self.objects():
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass


def start_job(
    python: str,
    tmp: Path,
    *,
    device: str = "cpu",
    world: int = 2,
    mib: int = 256,
    env: dict[str, str] | None = None,
    spawn: Callable[..., Any] | None = None,
    ready_timeout_s: float = WORKER_READY_TIMEOUT_S,
    name: str = "tp",
) -> TpJob:
    """Start a tree and wait for its ready file.

    ``spawn`` is ``vsup.proctree.spawn`` for a tree vsup supervises (the record is kept); None
    starts a foreign job: its own session through a plain Popen, in no ledger.
    """
    import subprocess

    tmp.mkdir(parents=True, exist_ok=True)
    ready_path = tmp / f"{name}-{uuid.uuid4().hex[:8]}.json"
    log_path = tmp / f"{ready_path.stem}.log"
    argv = [
        python,
        str(FAKE),
        "tree",
        "--device",
        device,
        "--world",
        str(world),
        "--mib",
        str(mib),
        "--ready",
        str(ready_path),
    ]
    full_env = {**(env if env is not None else os.environ), **NVLS_OFF}
    record = None
    if spawn is not None:
        popen, record = spawn(argv, full_env, log_path, model=f"fake-{name}", port=0)
    else:
        with open(log_path, "ab") as out:
            popen = subprocess.Popen(
                argv,
                env=full_env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
    job = TpJob(
        popen=popen,
        ready={"sid": popen.pid, "workers": [], "psm": [], "sem": [], "dist": ""},
        log_path=log_path,
        record=record,
    )

    def ready_doc() -> dict | None:
        if popen.poll() is not None:
            raise AssertionError(
                f"{name} tree exited ({popen.returncode}) before it was ready:\n{job.log_text()[-3000:]}"
            )
        try:
            return json.loads(ready_path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    try:
        job.ready = wait_until(ready_doc, ready_timeout_s, f"the {name} tree to form its group", poll_s=0.05)
    except BaseException:
        job.teardown()
        raise
    return job


if __name__ == "__main__":
    main()
