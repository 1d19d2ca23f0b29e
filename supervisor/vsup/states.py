"""The daemon's states and the only transitions allowed between them.

The table is data: the daemon checks every transition against it (an illegal one is a bug and
raises), and the tests use it as an oracle for the sequences they observe in events.

    stopped ──start──▶ starting ──ready──▶ ready ◀──recovered── unhealthy
       ▲                 │  ▲                │ ▲                    │
       │                 │  └──backoff──┐    │ └──── bad signal ────┘
       └─── stopping ◀───┴──────────────┴────┴── exit / death / confirmed / stop
                 │
                 └──▶ failed (crash loop)           reloading: drain → stop → cleanup → start → ready
                                                    (from ready, unhealthy, starting, stopped, failed)

Off-load (issue 16: `vsup unload`, [proxy] idle_unload_s) uses the stop's edges: ready, unhealthy,
starting or failed -> stopping (drain, teardown, cleanup, proven clean) -> stopped, reason `idle`
or `unloaded`, the route holding; a request then takes stopped -> starting (load on demand). A swap
on request is a reload (ready -> reloading -> ready). A model whose off-load leaves debris ends
stopping -> failed, as a reload that cannot prove the machine clean.

Overlapped reload (issue 23, `[proxy] overlap = "auto"` and both fit) is `reloading` too, with
no new edge: ready -> reloading (the old tree serves, the route upstream is still its server,
while the new one loads beside it on its own port) -> ready (switched: the old one drained,
stopped and cleaned; or rolled back: the new one torn down, the old one never stopped). A death
of the old tree during it holds requests until the new one is proven; if both die: reloading ->
stopping (recover the old model, as after any death). A stop or shutdown: reloading -> stopping
(the new tree torn down first, then the old one as any stop does).
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any


class State(enum.StrEnum):
    STARTING = "starting"  # pre-start cleanup, spawn, backoff wait, readiness checks
    READY = "ready"  # health + model listed + canary proven; probes running
    UNHEALTHY = "unhealthy"  # a bad signal seen, not yet confirmed
    STOPPING = "stopping"  # bounded teardown and verified cleanup
    STOPPED = "stopped"  # nothing running, by operator request (or before the first start)
    FAILED = "failed"  # crash loop: automatic restarts given up until an operator acts
    RELOADING = "reloading"  # an operator's model swap (or restart), phase in the snapshot


TRANSITIONS: dict[State, frozenset[State]] = {
    State.STOPPED: frozenset({State.STARTING, State.RELOADING, State.STOPPING}),
    # starting -> reloading: an operator's reload/restart cancels a start (issue 14)
    State.STARTING: frozenset({State.STARTING, State.READY, State.STOPPING, State.FAILED, State.RELOADING}),
    State.READY: frozenset({State.UNHEALTHY, State.STOPPING, State.RELOADING}),
    State.UNHEALTHY: frozenset({State.READY, State.STOPPING, State.RELOADING}),
    State.STOPPING: frozenset({State.STOPPED, State.STARTING, State.FAILED}),
    State.FAILED: frozenset({State.STARTING, State.RELOADING, State.STOPPING}),
    State.RELOADING: frozenset({State.READY, State.FAILED, State.STOPPING}),
}


class IllegalTransition(RuntimeError):
    pass


def check(old: State, new: State) -> None:
    if new not in TRANSITIONS[old]:
        raise IllegalTransition(f"{old} -> {new} is not an allowed transition")


@dataclass(frozen=True)
class Snapshot:
    """What `vsup status` shows: an immutable copy that only the state owner replaces."""

    state: State = State.STOPPED
    phase: str | None = None  # sub-step: spawn, readiness, backoff, drain, cleanup, ...
    model: str | None = None  # served model name
    model_path: str | None = None
    pid: int | None = None  # API server pid
    restarts: int = 0  # automatic restarts after failures (operator commands do not count)
    since: float = field(default_factory=time.time)
    reason: str | None = None  # why we are in this state (root cause for failed)
    operation: str | None = None  # operator operation in progress (start/stop/restart/reload)
    remedies: tuple[str, ...] = ()  # remedies applied to the current model
    deadline: float | None = None  # epoch seconds by which the current phase must end
    last_detection: dict[str, Any] | None = None
    workers: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "state": str(self.state),
            "phase": self.phase,
            "model": self.model,
            "model_path": self.model_path,
            "pid": self.pid,
            "restarts": self.restarts,
            "since": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(self.since)) + "Z",
            "reason": self.reason,
            "operation": self.operation,
            "remedies": list(self.remedies),
            "deadline": (
                time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(self.deadline)) + "Z"
                if self.deadline
                else None
            ),
            "last_detection": self.last_detection,
            "workers": self.workers,
        }
