"""What reaches the owner's queue, and the intents its phases hand each other.

Every source (the SIGCHLD reaper, the log watcher, the probes, the tree refresher, the control
socket, signal handlers, the proxy) only builds one of these and posts it; the owner task in
daemon.py is the only reader. Observations from a server carry the generation (`gen`) of the
tree that produced them, so the owner drops what an already-gone tree still says.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .config import ModelConfig
from .gate import Demand, UpstreamRefused, UpstreamStalled
from .probes import ProbeResult
from .proctree import TreeRecord

if TYPE_CHECKING:
    from .control import Request

__all__ = [
    "Cmd",
    "Demand",
    "Exited",
    "HangEvidence",
    "Intent",
    "LogSignal",
    "NotReady",
    "Observation",
    "OperationFailed",
    "Probe",
    "ReadyProven",
    "Shutdown",
    "TreeSeen",
    "UpstreamRefused",
    "UpstreamStalled",
]


@dataclass(frozen=True)
class Exited:
    """The API server (the tree's leader) was reaped."""

    gen: int
    pid: int
    status: int  # waitpid-style exit code (negative: killed by that signal)


@dataclass(frozen=True)
class LogSignal:
    """A log line matched a signature the owner acts on (fatal, strike, ready)."""

    gen: int
    kind: str
    sig_id: str
    message: str  # redacted
    process: str | None
    pid: int | None
    at: float  # monotonic time the line was read


@dataclass(frozen=True)
class Probe:
    gen: int
    result: ProbeResult


@dataclass(frozen=True)
class ReadyProven:
    """health, model list and a canary completion all succeeded."""

    gen: int


@dataclass(frozen=True)
class NotReady:
    """The server answered health and listed the model but could not complete."""

    gen: int
    detail: str


@dataclass(frozen=True)
class TreeSeen:
    """The refresher's look at the tree: a new copy of its record (the owner decides what to keep)."""

    gen: int
    record: TreeRecord
    workers: int


@dataclass(frozen=True)
class Shutdown:
    signame: str


@dataclass
class Cmd:
    """An operator command from the control socket (or a test). Exactly one reply, through
    `future`, set only by the owner."""

    name: str
    args: dict[str, Any]
    request: Request | None = None  # where progress lines go, for a command from the socket
    future: asyncio.Future[Any] | None = field(repr=False, default=None)

    def reply(self, result: Any = None, error: BaseException | None = None) -> bool:
        """Answer once; later answers are ignored. Returns whether this one was delivered."""
        if self.future is None or self.future.done():
            return False
        if error is not None:
            self.future.set_exception(error)
        else:
            self.future.set_result(result)
        return True

    @property
    def answered(self) -> bool:
        return self.future is None or self.future.done()


@dataclass(frozen=True)
class HangEvidence:
    """What a stack check saw after a strike (watchers.hang_check), for the owner to judge
    (policy.judge_hang): two stack samples (StacksReport JSON) and the generated-token counter
    read before the first and after the second (None: /metrics did not answer)."""

    gen: int
    strike: str
    first: dict[str, Any] | None
    second: dict[str, Any] | None
    tokens_before: float | None
    tokens_after: float | None
    gap_s: float  # between the two samples' starts
    seconds: float  # the whole check


@dataclass(frozen=True)
class Intent:
    """What the owner does next; each phase coroutine returns the following one."""

    kind: str  # start | serve | recover | stop | idle | reload | exit
    spec: ModelConfig | None = None
    reason: str | None = None
    failure_kind: str | None = None
    cmd: Cmd | None = None
    # recover from a hang confirmed by a stack check: its second sample, kept as the incident's
    # stacks (taken seconds before, while the tree was as hung as it is now: no second dump)
    stacks: dict[str, Any] | None = None


# Everything that reaches the owner's queue.
Observation = (
    Exited
    | LogSignal
    | Probe
    | ReadyProven
    | NotReady
    | TreeSeen
    | Shutdown
    | Cmd
    | Demand
    | UpstreamRefused
    | UpstreamStalled
    | HangEvidence
)


class OperationFailed(Exception):
    """An operator operation ran and failed; the message carries the root cause."""
