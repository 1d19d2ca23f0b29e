#!/usr/bin/env python3
"""A vLLM-like process tree that holds GPU memory, for the GPU tests (tests/gpu/).

Shape (vLLM 0.32, TP=2, without the engine-core layer in between):

    tree      python gpu_tree.py tree ...        own session, title unchanged (like the API server)
    ├─ worker VLLM::Worker_TP0                   allocates --mib MiB of CUDA memory, then waits
    └─ worker VLLM::Worker_TP1                   likewise

SIGKILL the tree parent and the workers live on with ppid 1 (or a subreaper), still holding their
memory: the orphan case of issue 8. ``holder`` is a lone process (a "foreign" job) that allocates
and waits, under its own unchanged command line so a report can name it.

Readiness is a JSON file written atomically (temporary file, rename) once every process holds its
memory: ``{"parent": pid, "workers": [pid, ...], "mib": M}`` (tree) or ``{"pid": pid, "mib": M}``
(holder). Tests wait for it instead of sleeping.

Titles come from setproctitle when installed; otherwise ``prctl(PR_SET_NAME)`` sets comm and the
argv area is overwritten in place (what setproctitle does, minus moving environ), so that
/proc/PID/cmdline reads ``VLLM::Worker_TP0`` either way. ``--device cpu`` allocates host memory
instead, to try the tree's shape on a machine without a GPU.

The environment is inherited unchanged, so NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1
and NVSHMEM_DISABLE_NVLS=1, set on the GPU machine, reach every process.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import signal
import subprocess
import sys
import time

MIB = 1 << 20
PR_SET_NAME = 15
# A worker that cannot get its memory within this long is broken: fail rather than hang the test.
WORKER_READY_TIMEOUT_S = 120.0


def set_title(title: str) -> str:
    """Set the process title; returns the method used ("setproctitle" or "prctl+argv")."""
    try:
        import setproctitle
    except ImportError:
        pass
    else:
        setproctitle.setproctitle(title)
        return "setproctitle"
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_NAME, title.encode()[:15], 0, 0, 0)
    with open("/proc/self/stat", "rb") as f:
        stat = f.read()
    # Fields after "(comm) ": state is field 3; arg_start and arg_end are fields 48 and 49.
    fields = stat[stat.rfind(b")") + 2 :].split()
    arg_start, arg_end = int(fields[48 - 3]), int(fields[49 - 3])
    size = arg_end - arg_start
    raw = title.encode()[: size - 1]
    # Fill the whole area, NUL-terminated, so the kernel does not read on into environ.
    ctypes.memmove(arg_start, raw + b"\0" * (size - len(raw)), size)
    return "prctl+argv"


def write_ready(path: str, doc: dict) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(doc, f)
    os.rename(tmp, path)


def allocate(mib: int, device: str) -> object:
    """Hold ``mib`` MiB on ``device``, touched so the memory is really committed."""
    if device == "cpu":
        buf = bytearray(mib * MIB)
        buf[::4096] = b"\1" * len(buf[::4096])
        return buf
    import torch

    x = torch.empty(mib * MIB, dtype=torch.uint8, device=device)
    x.fill_(1)
    torch.cuda.synchronize()
    return x


def wait_forever() -> None:
    while True:
        signal.pause()


def run_worker(args: argparse.Namespace) -> None:
    method = set_title(f"VLLM::Worker_TP{args.rank}")
    held = allocate(args.mib, args.device)  # noqa: F841 (kept alive by the name)
    print(f"READY {os.getpid()} {method}", flush=True)
    wait_forever()


def run_holder(args: argparse.Namespace) -> None:
    held = allocate(args.mib, args.device)  # noqa: F841 - kept alive by the name
    write_ready(args.ready, {"pid": os.getpid(), "mib": args.mib})
    wait_forever()


def run_tree(args: argparse.Namespace) -> None:
    try:
        os.setsid()  # a vLLM server started by vsup has its own session; be one standalone too
    except PermissionError:
        pass  # already a process-group (and, under vsup's spawn, session) leader
    workers = []
    for rank in range(args.workers):
        workers.append(
            subprocess.Popen(
                [
                    sys.executable,
                    os.path.abspath(__file__),
                    "worker",
                    "--rank",
                    str(rank),
                    "--mib",
                    str(args.mib),
                    "--device",
                    args.device,
                ],
                stdout=subprocess.PIPE,
                text=True,
            )
        )
    deadline = time.monotonic() + WORKER_READY_TIMEOUT_S
    methods = []
    for w in workers:
        line = w.stdout.readline() if w.stdout else ""
        if not line.startswith("READY") or time.monotonic() > deadline:
            for v in workers:
                v.kill()
            sys.exit(f"gpu_tree: worker {w.pid} did not get ready: {line!r}")
        methods.append(line.split()[2])
    write_ready(
        args.ready,
        {
            "parent": os.getpid(),
            "sid": os.getsid(0),
            "workers": [w.pid for w in workers],
            "mib": args.mib,
            "title_method": methods[0],
        },
    )
    wait_forever()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("role", choices=["tree", "worker", "holder"])
    ap.add_argument("--mib", type=int, default=1024)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--rank", type=int, default=0)
    ap.add_argument("--ready", default="")
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args(argv)
    {"tree": run_tree, "worker": run_worker, "holder": run_holder}[args.role](args)


if __name__ == "__main__":
    main()
