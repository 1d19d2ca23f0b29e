"""Structured events: every state change and every action is one JSON object.

Rendered by structlog at the edge (stderr and ``state_dir/events.jsonl``); kept in a small ring
in memory so ``vsup status``/``events`` and incident bundles can show recent history; fanned out
to subscribers (``vsup events --follow``). Fixed keys appear in every event, null when unknown:
``ts, event, state, model, pid, reason`` — a consumer never has to guess whether a key exists.

Callers pass only facts; anything that quotes vLLM's log must go through ``redact`` first
(the seed log contains a user's whole prompt).
"""

from __future__ import annotations

import collections
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable, TextIO

import structlog

FIXED_KEYS = ("ts", "event", "state", "model", "pid", "reason")


class _Sink:
    """structlog "logger": writes the rendered line to stderr and the events file."""

    def __init__(self, stream: TextIO | None, path: Path | None) -> None:
        self._stream = stream
        self._file = None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            # Line-buffered append: each event is durable as soon as the OS has it, and a
            # second writer (a restarted daemon) never interleaves within a line.
            self._file = open(path, "a", buffering=1, encoding="utf-8")

    def msg(self, line: str) -> None:
        for out in (self._stream, self._file):
            if out is None:
                continue
            try:
                out.write(line + "\n")
                out.flush()
            except (OSError, ValueError):
                pass  # a closed stderr (daemonised, journald gone) must never stop the daemon

    info = msg  # structlog's BoundLogger proxies msg() to the logger's info()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class EventLog:
    """The daemon's event stream. ``emit`` is synchronous and cheap; call it from the loop thread."""

    def __init__(
        self, state_dir: Path | None, *, stream: TextIO | None = sys.stderr, ring: int = 500
    ) -> None:
        self._context: dict[str, Any] = {"state": None, "model": None, "pid": None}
        self.recent: collections.deque[dict[str, Any]] = collections.deque(maxlen=ring)
        self._subscribers: list[Callable[[dict[str, Any]], None]] = []
        path = state_dir / "events.jsonl" if state_dir is not None else None
        self._sink = _Sink(stream, path)
        self._log = structlog.wrap_logger(
            self._sink,
            processors=[
                structlog.processors.TimeStamper(fmt="iso", utc=True, key="ts"),
                self._complete,
                structlog.processors.JSONRenderer(serializer=_dumps),
            ],
        )

    def bind(self, **context: Any) -> None:
        """Update the defaults of the fixed keys (state, model, pid) for later events."""
        self._context.update(context)

    def _complete(self, _logger: Any, _name: str, ev: dict[str, Any]) -> dict[str, Any]:
        ordered = {k: ev.pop(k, self._context.get(k)) for k in FIXED_KEYS}
        ordered.update(ev)
        self.recent.append(ordered)
        for fn in list(self._subscribers):
            try:
                fn(ordered)
            except Exception:  # a broken follower must not break the daemon
                self._subscribers.remove(fn)
        return ordered

    def emit(self, event: str, **fields: Any) -> None:
        self._log.msg(event, **fields)

    def subscribe(self, fn: Callable[[dict[str, Any]], None]) -> Callable[[], None]:
        self._subscribers.append(fn)
        return lambda: self._subscribers.remove(fn) if fn in self._subscribers else None

    def close(self) -> None:
        self._sink.close()


def _dumps(obj: Any, **kw: Any) -> str:
    return json.dumps(obj, default=_default, ensure_ascii=False, separators=(",", ":"))


def _default(o: Any) -> Any:
    if isinstance(o, (set, frozenset, tuple)):
        return list(o)
    if isinstance(o, os.PathLike):
        return os.fspath(o)
    return repr(o)


def read_events(state_dir: Path, limit: int = 100) -> list[dict[str, Any]]:
    """The last ``limit`` events from disk (for `vsup events` when the daemon is down)."""
    path = state_dir / "events.jsonl"
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 512 * 1024))
            data = f.read().decode("utf-8", "replace").splitlines()
    except FileNotFoundError:
        return []
    out = []
    for line in data[-limit:]:
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out
