"""The owner's queue, and how its phases wait on it.

Every source posts an `Observation` here; only the owner reads. A phase waits with `next()`
(a command or a death is noticed while waiting), runs a step that cannot stop half-way with
`run()` (commands are still answered meanwhile; what the next phase must see waits in the
backlog), and after such a step asks `poll_interrupt()` for an accepted command or a shutdown.
What an observation means is the owner's decision: `absorb` (the owner's `_absorb`) answers
what is answered the same way in every phase and returns what the phase must see. `heartbeat`
and `bounded_until` are what the watchdog and the liveness probe read (runtime.py).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from typing import Any, TypeVar

from .observations import Cmd, Observation, Shutdown
from .watchers import Clock

R = TypeVar("R")

HEARTBEAT_S = 1.0  # the owner wakes at least this often (watchdog pings depend on it)


class Inbox:
    def __init__(
        self,
        clock: Clock,
        absorb: Callable[[Observation], Observation | None],
        cleanup: Callable[[Cmd], Awaitable[None]],
    ) -> None:
        self.clock = clock
        self.absorb = absorb
        self.cleanup = cleanup  # an operator's `vsup cleanup`, run at any wait point
        self.q: asyncio.Queue[Observation] = asyncio.Queue()
        self.backlog: collections.deque[Observation] = collections.deque()
        self.heartbeat = time.monotonic()
        self.bounded_until = 0.0  # monotonic deadline of a bounded step in progress

    def post(self, obs: Observation) -> None:
        self.q.put_nowait(obs)

    async def next(self, timeout: float | None = None) -> Observation | None:
        """Next observation the current phase must see, or None when `timeout` passes."""
        end = None if timeout is None else self.clock.monotonic() + timeout
        obs: Observation | None
        while True:
            self.heartbeat = time.monotonic()
            if self.backlog:
                obs = self.backlog.popleft()
            else:
                wait = HEARTBEAT_S if end is None else min(HEARTBEAT_S, end - self.clock.monotonic())
                if wait <= 0:
                    return None
                try:
                    obs = await asyncio.wait_for(self.q.get(), wait)
                except TimeoutError:
                    continue
            obs = self.absorb(obs)
            if obs is None:
                continue
            if isinstance(obs, Cmd) and obs.name == "cleanup":
                await self.cleanup(obs)  # safe at any wait point: never touches the live tree
                continue
            return obs

    async def run(self, work: Coroutine[Any, Any, R], bound_s: float) -> R:
        """Await `work`, a step that must not stop half-way and lasts at most `bound_s`, while
        answering commands (busy, notes); what the next phase must see waits in the backlog."""
        task = asyncio.get_running_loop().create_task(work)
        getter: asyncio.Task[Observation] | None = None
        with self.bounded(bound_s):
            try:
                while not task.done():
                    if getter is None:
                        getter = asyncio.get_running_loop().create_task(self.q.get())
                    await asyncio.wait({task, getter}, return_when=asyncio.FIRST_COMPLETED)
                    if getter.done():
                        obs, getter = self.absorb(getter.result()), None
                        if obs is not None:
                            self.backlog.append(obs)
            finally:
                if getter is not None:
                    getter.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        obs = self.absorb(await getter)
                        if obs is not None:
                            self.backlog.append(obs)
        return task.result()

    def poll_interrupt(self) -> Cmd | Shutdown | None:
        """After a step that could not be interrupted: an accepted command or a shutdown that
        arrived meanwhile. Operator cleanups stay queued for the next wait; other observations
        of the finished step are dropped."""
        keep: list[Cmd] = []
        found: Cmd | Shutdown | None = None
        obs: Observation | None
        while found is None:
            if self.backlog:
                obs = self.backlog.popleft()
            else:
                try:
                    obs = self.q.get_nowait()
                except asyncio.QueueEmpty:
                    break
            obs = self.absorb(obs)
            if isinstance(obs, Cmd) and obs.name == "cleanup":
                keep.append(obs)
            elif isinstance(obs, (Cmd, Shutdown)):
                found = obs
        self.backlog.extendleft(reversed(keep))
        return found

    @contextlib.contextmanager
    def bounded(self, seconds: float) -> Iterator[None]:
        """Mark a step that waits without reading the queue, with the bound it cannot outlast."""
        prev = self.bounded_until
        self.bounded_until = max(prev, time.monotonic() + seconds)
        try:
            yield
        finally:
            self.bounded_until = prev
            self.heartbeat = time.monotonic()

    def leftovers(self) -> list[Observation]:
        """Everything not yet read (the owner's exit answers the commands among it)."""
        out = list(self.backlog)
        self.backlog.clear()
        while True:
            try:
                out.append(self.q.get_nowait())
            except asyncio.QueueEmpty:
                return out
