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
import errno
import json
import os
import stat
import sys
from collections.abc import Callable, MutableMapping
from pathlib import Path
from typing import Any, TextIO

import structlog

FIXED_KEYS = ("ts", "event", "state", "model", "pid", "reason")


# events.jsonl is rotated to events.jsonl.1 (one generation kept) when a line would take it
# past this size, so the file is bounded at twice this whatever floods it (15,000 refused
# requests once grew it 2.7 MB in 3.5 s, and nothing ever shrank it). ~8 MiB holds tens of
# thousands of ordinary events: weeks of a busy daemon.
MAX_BYTES = 8 * 1024 * 1024


class _Sink:
    """structlog "logger": writes the rendered line to stderr and the events file.

    The file holds argv (an `--api-key` included) and whatever events carry: 0600 like the
    ledger, whatever the umask, never opened through a symlink, only a regular file of ours.
    """

    def __init__(self, stream: TextIO | None, path: Path | None, max_bytes: int = MAX_BYTES) -> None:
        self._stream = stream
        self._path = path
        self._max_bytes = max_bytes
        self._fd: int | None = None
        self._size = 0
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o750)
            self._open()

    def _open(self) -> None:
        path = self._path
        if path is None:
            return
        from .host import open_append  # here: `vsup events` reads the file without the OS seam's imports

        self._fd, self._size = open_append(path, 0o600, "events file", narrow=True)

    def _write(self, data: bytes) -> None:
        path = self._path
        if (
            self._fd is not None
            and path is not None
            and self._size
            and self._size + len(data) > self._max_bytes
        ):
            os.close(self._fd)
            self._fd = None
            try:
                os.replace(path, path.with_name(path.name + ".1"))
            finally:
                self._open()  # the same file again if the rename failed: never stop writing
        if self._fd is not None:
            # One write() of the whole line in O_APPEND: a second writer (a restarted daemon)
            # never interleaves within a line.
            self._size += os.write(self._fd, data)

    def msg(self, line: str) -> None:
        if self._stream is not None:
            try:
                self._stream.write(line + "\n")
                self._stream.flush()
            except (OSError, ValueError):
                pass  # a closed stderr (daemonised, journald gone) must never stop the daemon
        try:
            self._write((line + "\n").encode("utf-8", "replace"))
        except OSError:
            pass  # a full disk must not stop the daemon; the stream still has the event

    info = msg  # structlog's BoundLogger proxies msg() to the logger's info()

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
            self._path = None


class EventLog:
    """The daemon's event stream. ``emit`` is synchronous and cheap; call it from the loop thread."""

    def __init__(
        self,
        state_dir: Path | None,
        *,
        stream: TextIO | None = sys.stderr,
        ring: int = 500,
        max_bytes: int = MAX_BYTES,
    ) -> None:
        self._context: dict[str, Any] = {"state": None, "model": None, "pid": None}
        self.recent: collections.deque[dict[str, Any]] = collections.deque(maxlen=ring)
        self._subscribers: list[Callable[[dict[str, Any]], None]] = []
        path = state_dir / "events.jsonl" if state_dir is not None else None
        if state_dir is not None:
            # The daemon's first write into state_dir: if it had to create it, or someone else
            # did between the config check and now, the directory is judged again here.
            from .proctree import untrusted_dir

            Path(state_dir).mkdir(parents=True, exist_ok=True, mode=0o750)
            why = untrusted_dir(state_dir)
            if why is not None:
                raise PermissionError(errno.EPERM, f"daemon.state_dir {state_dir} is not safe to use: {why}")
        self._sink = _Sink(stream, path, max_bytes)
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

    def _complete(self, _logger: Any, _name: str, ev: MutableMapping[str, Any]) -> dict[str, Any]:
        ordered = {k: ev.pop(k, self._context.get(k)) for k in FIXED_KEYS}
        ordered.update(ev)
        self.recent.append(ordered)
        for fn in list(self._subscribers):
            try:
                fn(ordered)
            except Exception:  # noqa: BLE001 - a broken follower must not break the daemon
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
    """The last ``limit`` events from disk (for `vsup events` when the daemon is down), from
    events.jsonl and, when it holds too few since a rotation, events.jsonl.1 before it."""
    data: list[str] = []
    for name in ("events.jsonl", "events.jsonl.1"):
        try:
            fd = os.open(state_dir / name, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError:
            break
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                break
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 512 * 1024))
            data = f.read().decode("utf-8", "replace").splitlines() + data
        if len(data) >= limit:
            break
    out = []
    for line in data[-limit:]:
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out
