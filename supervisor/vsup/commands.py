"""What each operator command does in each state: the table the owner answers from.

Every (state, lifecycle command) pair has exactly one entry; the matrix test walks them all and
fails when a state or a command is added without its row. Reads (`status`, `events`,
`diagnose`, `stacks`) are answered in every state from what the owner published (its snapshot,
its tree record) and never queue.

    ACCEPT  the owner runs the command: it ends the current phase where the phase waits
            (readiness, backoff, drain, serving, idle), or right after the step that cannot
            be interrupted (a teardown, a cleanup) finishes
    NOTE    answered at once (`ok`, with a note and the status); nothing changes
    BUSY    refused with `busy`, naming what runs; nothing changes
    RUN     `cleanup` of dead trees' debris, run now; the live tree is never touched
"""

from __future__ import annotations

import enum
from typing import Any

from .states import Snapshot, State


class Answer(enum.Enum):
    ACCEPT = "accept"
    NOTE = "note"
    BUSY = "busy"
    RUN = "run"


A, N, B, R = Answer.ACCEPT, Answer.NOTE, Answer.BUSY, Answer.RUN

LIFECYCLE = ("start", "stop", "restart", "reload", "cleanup", "unload")
READS = ("status", "events", "diagnose", "stacks")  # every socket command is one or the other

# state -> command -> answer. Why each non-obvious cell is what it is:
# - start while starting/ready/unhealthy: already running (or coming); a second start would
#   only restart the load. `restart` is the command that starts over.
# - reload/restart while starting: the operator sees the wrong model loading; the start is
#   cancelled, its tree torn down and cleaned, and the asked model starts (issue 14).
# - anything but stop while reloading, anything while stopping: one operation at a time.
# - stop while reloading cancels the reload (its reply: failed, cancelled by stop).
# - cleanup while stopping/reloading: the teardown's own cleanup runs; asking again races it.
# - unload (issue 16): off-load now (drain, stop, clean, GPU memory freed), then `stopped` with
#   the proxy holding: the next request loads the model again. Nothing loaded (stopped): a note.
#   While starting it cancels the start, as stop does. While reloading: busy (a swap, operator's
#   or a request's, finishes first; stop is the command that cancels it). In failed: the dead
#   trees' debris is cleaned, and the next request may start the model again.
# - an overlapped reload (issue 23) is `reloading`, and its row is the reload's: a second reload,
#   a restart, an unload, a start: busy (the old model keeps serving meanwhile, the reload
#   finishes or rolls back by itself); stop cancels it and stops both trees (the new one first);
#   cleanup: busy, as the teardown's own cleanup may run (it never touches either live tree).
#   Death of either tree is an observation, not a command (states.py says what follows).
TABLE: dict[State, dict[str, Answer]] = {
    State.STOPPED: {"start": A, "stop": A, "restart": A, "reload": A, "cleanup": R, "unload": N},
    State.STARTING: {"start": N, "stop": A, "restart": A, "reload": A, "cleanup": R, "unload": A},
    State.READY: {"start": N, "stop": A, "restart": A, "reload": A, "cleanup": R, "unload": A},
    State.UNHEALTHY: {"start": N, "stop": A, "restart": A, "reload": A, "cleanup": R, "unload": A},
    State.STOPPING: {"start": B, "stop": B, "restart": B, "reload": B, "cleanup": B, "unload": B},
    State.FAILED: {"start": A, "stop": A, "restart": A, "reload": A, "cleanup": R, "unload": A},
    State.RELOADING: {"start": B, "stop": A, "restart": B, "reload": B, "cleanup": B, "unload": B},
}

# Where an accepted command takes the state first (the oracle's expectation; the owner's
# transitions are checked against states.TRANSITIONS as well).
FIRST_STATE: dict[str, State | None] = {
    "start": State.STARTING,
    "stop": State.STOPPING,
    "restart": State.RELOADING,
    "reload": State.RELOADING,
    "cleanup": None,
    "unload": State.STOPPING,
}


def answer(snap: Snapshot, name: str) -> tuple[Answer, str | None]:
    """The table's answer for command `name` now, and the message of a NOTE or BUSY."""
    how = TABLE[snap.state][name]
    if how is Answer.NOTE:
        return how, f"already {snap.state}"
    if how is Answer.BUSY:
        if snap.state == State.STOPPING:
            why = f" ({snap.reason})" if snap.reason else ""
            return how, f"stopping: the tree is being torn down{why}; try again when it has finished"
        op = snap.operation or "reload"
        return how, f"{op} is running (state {snap.state}); try again when it has finished"
    return how, None


def validate(name: str, args: dict[str, Any]) -> str | None:
    """A request's arguments checked before it is posted: the problem, or None."""
    if name == "reload":
        target = args.get("model")
        if args.get("current"):
            return None
        if isinstance(target, str) and target.strip():
            return None
        return "reload needs args.model (a configured name or a model path) or args.current=true"
    if name == "cleanup":
        for k in ("dry_run", "foreign", "all_users"):
            if k in args and not isinstance(args[k], bool):
                return f"args.{k} must be a boolean"
    return None
