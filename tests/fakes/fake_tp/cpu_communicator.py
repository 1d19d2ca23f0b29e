"""The fake TP tree's all-reduce (named as vLLM's CPU build names its own, so the stack
signature `cpu_shm_all_reduce` matches): each rank sends its part to its peer and waits, asleep
in a pipe read (state S), for the peer's."""

from __future__ import annotations

import os


def all_reduce(send_fd: int, recv_fd: int) -> None:
    os.write(send_fd, b"x")
    if not os.read(recv_fd, 1):
        raise SystemExit(0)  # the peer is gone: the tree is being torn down
