"""A vLLM-shaped TP=2 tree for the daemon's hang tests (issue 17): started by
fake_api_server.py when FAKE_VLLM_TP=1, with vLLM's process titles (argv[0]) and file and function
names, so py-spy stacks match the catalog's signatures as the real tree's do:

    API server  one step per generated token: a byte to the engine core, waits for its reply
    VLLM::EngineCore  engine_main: gets a step, hands it to both workers, waits for both
                      replies in `get_response` (as MultiprocExecutor.collective_rpc)
    VLLM::Worker_TP0/1  worker_busy_loop: gets a step, all-reduces with its peer
                      (cpu_communicator.all_reduce), replies

FAKE_TP_STEP_S makes every step after the first four (the readiness canary's) take that long
(a slow, progressing engine).
SIGUSR1 to a worker makes it block at once outside the collective, asleep (state S, not T: the
hang a real rank shows on a futex), in `blocked_outside_the_collective`; its peer then waits in
the all-reduce and the engine core in get_response, for ever. Every process exits when the pipe
from its parent closes. Stdlib only.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def blocked_outside_the_collective(_sig: int, _frame: object) -> None:
    threading.Event().wait()  # asleep for ever on a futex (S), as a wedged rank


def worker_busy_loop(rank: int, step_fd: int, reply_fd: int, send_fd: int, recv_fd: int) -> None:
    from cpu_communicator import all_reduce  # type: ignore[import-not-found]  # a script: its directory is on sys.path

    signal.signal(signal.SIGUSR1, blocked_outside_the_collective)
    while os.read(step_fd, 1):
        all_reduce(send_fd, recv_fd)
        os.write(reply_fd, b"k")


def get_response(fd: int) -> bytes:
    return os.read(fd, 1)


def collective_rpc(to_workers: list[int], from_workers: list[int]) -> bool:
    for fd in to_workers:
        os.write(fd, b"s")
    return all(get_response(fd) for fd in from_workers)


def engine_main(step_fd: int, reply_fd: int) -> None:
    """Start both workers, then serve steps until the API server goes away."""
    e2w = [os.pipe() for _ in range(2)]
    w2e = [os.pipe() for _ in range(2)]
    p01, p10 = os.pipe(), os.pipe()  # TP0 -> TP1, TP1 -> TP0
    ends = {0: (e2w[0][0], w2e[0][1], p01[1], p10[0]), 1: (e2w[1][0], w2e[1][1], p10[1], p01[0])}
    workers = []
    for rank in (0, 1):
        fds = ends[rank]
        workers.append(
            subprocess.Popen(
                [f"VLLM::Worker_TP{rank}", os.path.join(HERE, "multiproc_executor.py"), "worker", str(rank)]
                + [str(f) for f in fds],
                executable=os.environ["FAKE_TP_PYTHON"],  # sys.executable is '' under a title
                pass_fds=fds,
            )
        )
    for fds in ends.values():
        for f in fds:
            os.close(f)
    to_workers, from_workers = [w[1] for w in e2w], [w[0] for w in w2e]
    step_s = float(os.environ.get("FAKE_TP_STEP_S", "0"))  # a slow engine: each step takes this
    steps = 0
    while os.read(step_fd, 1):
        if not collective_rpc(to_workers, from_workers):
            break
        steps += 1
        if steps > 4:  # after the readiness canary's 4 tokens
            time.sleep(step_s)
        os.write(reply_fd, b"k")


def start_engine() -> tuple[subprocess.Popen[bytes], int, int]:
    """From the API server: the engine core (which starts the workers); returns it with the fd
    to write steps to and the fd its replies come from."""
    a2e, e2a = os.pipe(), os.pipe()
    p = subprocess.Popen(
        ["VLLM::EngineCore", os.path.join(HERE, "multiproc_executor.py"), "engine", str(a2e[0]), str(e2a[1])],
        executable=sys.executable,
        pass_fds=(a2e[0], e2a[1]),
        env={**os.environ, "FAKE_TP_PYTHON": sys.executable},
    )
    os.close(a2e[0])
    os.close(e2a[1])
    return p, a2e[1], e2a[0]


if __name__ == "__main__":
    role, *fds = sys.argv[1:]
    if role == "engine":
        engine_main(int(fds[0]), int(fds[1]))
    else:
        worker_busy_loop(*(int(x) for x in fds))
