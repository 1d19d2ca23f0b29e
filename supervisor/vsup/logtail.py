"""Follow a growing log file like `tail -F`, woken by inotify (watchdog), and hand over whole lines.

`LogTailer(path, on_lines)` calls `on_lines(list[str])` from its own thread with complete lines,
decoded as UTF-8 with errors="replace" and without their trailing "\\r\\n"/"\\n".

Design:
* One reader thread owns the file handle, the position and the partial-line buffer; watchdog's
  observer thread only sets a `threading.Event`. No lock is needed, and a burst of inotify events
  collapses into one read to EOF (the event is cleared *before* reading, so a write racing with
  the read sets it again and is never lost).
* Watchdog needs a directory: we watch the parent directory (non-recursively) and react to events
  whose source or destination is our path. That is also how a file that does not exist yet, or
  that is deleted and re-created, or renamed away and replaced, is noticed.
* Safety net, not the mechanism: the reader also wakes every `poll_interval` seconds (default
  2 s) and stats the path, for events inotify can drop (queue overflow, NFS, a parent directory
  that was replaced or did not exist when we started). Idle cost: one stat every 2 s.

Rotation handling, decided on each wake by comparing the path's (st_dev, st_ino) and size with the
open file:
* rename rotation / deletion: the path names another inode (or nothing). The old file is read to
  its end first (lines written just before the rename are not lost), its unterminated last line
  is emitted as is (its writer has moved on), then the new file is read from offset 0.
* copytruncate: same inode, size below our position: restart at 0. A writer that opened the log
  with `>` (no O_APPEND; vLLM started as `... > LOGFILE 2>&1`) keeps writing at its old offset,
  so the truncated file starts with a hole of NUL bytes: those are skipped (the bug that taught
  us: after logrotate's copytruncate the next "line" was megabytes of NULs). Limitation shared
  with tail -F: a truncate followed by a regrowth past our position before we look is not seen.
* not there yet at start: read from 0 once it appears.

Only the first open honours `start_at_end`; it also drops the tail of a line cut by starting
mid-line. Lines longer than `max_line_bytes` keep their first `max_line_bytes` bytes (cut at a
UTF-8 character boundary) plus " …[truncated N bytes]"; the rest is counted and discarded as it
is read, so a 10 MB line without a newline never sits in memory.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from typing import Any, Protocol

from watchdog.events import FileSystemEvent, FileSystemEventHandler

__all__ = ["LogTailer", "DEFAULT_POLL_INTERVAL_S", "DEFAULT_MAX_LINE_BYTES"]

log = logging.getLogger(__name__)

# Safety-net stat period. Events normally wake the reader within milliseconds; this bounds how
# late a missed event is noticed, at the cost of one stat() per period while idle.
DEFAULT_POLL_INTERVAL_S = 2.0
DEFAULT_MAX_LINE_BYTES = 64 * 1024
# Bytes per read(): bounds the memory and the size of one on_lines batch.
_READ_CHUNK = 256 * 1024
# How long stop() waits for the reader and observer threads (a stuck on_lines callback is the only
# thing that can hold the reader).
_JOIN_TIMEOUT_S = 10.0
_IGNORED_EVENTS = frozenset({"opened", "closed_no_write"})  # our own open()/close() of the log


class _Observer(Protocol):
    def schedule(self, event_handler: Any, path: str, *, recursive: bool = ...) -> Any: ...
    def start(self) -> None: ...
    def stop(self) -> None: ...
    def join(self, timeout: float | None = ...) -> None: ...


class _Handler(FileSystemEventHandler):
    def __init__(self, target: str, wake: threading.Event) -> None:
        super().__init__()
        self._target = target
        self._wake = wake

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.is_directory or event.event_type in _IGNORED_EVENTS:
            return
        if (
            os.fsdecode(event.src_path) == self._target
            or os.fsdecode(getattr(event, "dest_path", b"") or "") == self._target
        ):
            self._wake.set()


class LogTailer:
    """Tail `path`, calling `on_lines` with complete decoded lines from a background thread."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        on_lines: Callable[[list[str]], None],
        *,
        start_at_end: bool = True,
        max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
        observer_factory: Callable[[], _Observer] | None = None,
        poll_interval: float = DEFAULT_POLL_INTERVAL_S,
    ) -> None:
        if max_line_bytes < 16:
            raise ValueError("max_line_bytes must be at least 16")
        if poll_interval <= 0:
            raise ValueError("poll_interval must be positive")
        self._path = os.path.abspath(os.fspath(path))
        self._dir = os.path.dirname(self._path)
        self._on_lines = on_lines
        self._start_at_end = start_at_end
        self._max = max_line_bytes
        self._observer_factory = observer_factory
        self._poll_interval = poll_interval

        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._observer: _Observer | None = None
        self._watching = False
        self._state_lock = threading.Lock()  # guards start/stop only; the reader state is thread-owned

        # Reader-thread state.
        self._fd: int | None = None
        self._ident: tuple[int, int] | None = None
        self._pos = 0
        self._partial = bytearray()
        self._dropped = 0  # bytes of the current line discarded beyond max_line_bytes
        self._skip_to_newline = False  # started mid-line at the end of an existing file
        self._strip_nuls = False  # after a truncation: skip the NUL hole of a non-append writer
        self._first_open = True

    # ------------------------------------------------------------------ public

    @property
    def path(self) -> str:
        return self._path

    @property
    def position(self) -> int:
        """Byte offset read so far in the current file (a pending partial line included)."""
        return self._pos

    @property
    def buffered(self) -> int:
        """Bytes of the pending partial line held in memory (at most max_line_bytes)."""
        return len(self._partial)

    def start(self) -> None:
        """Open the file if it exists, start watching its directory and the reader thread."""
        with self._state_lock:
            if self._thread is not None:
                raise RuntimeError("LogTailer already started")
            # Open now, so start_at_end means "the end as of start()"; reading (and every call of
            # on_lines) happens in the reader thread, which the pre-set wake sends straight to it.
            if os.path.exists(self._path):
                self._open()
            # start_at_end is about the file as it is now: one that appears later is read from 0.
            self._first_open = False
            self._wake.set()
            self._observer = self._observer_factory() if self._observer_factory else _default_observer()
            self._try_watch()
            self._observer.start()
            self._thread = threading.Thread(
                target=self._run, name=f"logtail:{os.path.basename(self._path)}", daemon=True
            )
            self._thread.start()

    def stop(self) -> None:
        """Stop the observer and the reader thread and close the file. Idempotent; after it returns,
        on_lines is not called again (unless the reader is stuck in on_lines past the join timeout)."""
        with self._state_lock:
            self._stopping.set()
            self._wake.set()
            thread, self._thread = self._thread, None
            observer, self._observer = self._observer, None
        if observer is not None:
            observer.stop()
        if thread is not None and thread is not threading.current_thread():
            thread.join(_JOIN_TIMEOUT_S)
            if thread.is_alive():
                log.warning(
                    "log tailer thread for %s did not stop within %.0f s", self._path, _JOIN_TIMEOUT_S
                )
        if observer is not None:
            observer.join(_JOIN_TIMEOUT_S)
        if thread is None or not thread.is_alive():
            self._close()

    def __enter__(self) -> LogTailer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ reader thread

    def _run(self) -> None:
        while not self._stopping.is_set():
            self._wake.wait(self._poll_interval)
            self._wake.clear()
            if self._stopping.is_set():
                break
            if not self._watching:
                self._try_watch()
            try:
                self._check()
            except OSError as e:  # permissions changed, I/O error: keep trying, the next wake may work
                log.warning("log tailer: cannot read %s: %s", self._path, e)

    def _try_watch(self) -> None:
        assert self._observer is not None  # noqa: S101 - narrows: start() sets it first
        try:
            self._observer.schedule(_Handler(self._path, self._wake), self._dir, recursive=False)
            self._watching = True
        except OSError as e:  # the directory does not exist (yet): the periodic stat covers it
            log.warning(
                "log tailer: cannot watch %s (%s); polling every %.1f s", self._dir, e, self._poll_interval
            )

    def _check(self) -> None:
        try:
            st: os.stat_result | None = os.stat(self._path)
        except FileNotFoundError:
            st = None
        if self._fd is not None:
            if st is None or (st.st_dev, st.st_ino) != self._ident:
                # Renamed away or deleted: finish the old file, then follow the name.
                self._read_available()
                if self._partial or self._dropped:
                    self._emit([self._finish_line()])
                self._close()
            elif st.st_size < self._pos:
                # Truncated in place (copytruncate): start over.
                os.lseek(self._fd, 0, os.SEEK_SET)
                self._pos = 0
                self._partial.clear()
                self._dropped = 0
                self._skip_to_newline = False
                self._strip_nuls = True
        if self._fd is None and st is not None:
            self._open()
        if self._fd is not None:
            self._read_available()

    def _open(self) -> None:
        try:
            fd = os.open(self._path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return  # gone again between stat and open; the next event or poll retries
        st = os.fstat(fd)
        self._fd, self._ident, self._pos = fd, (st.st_dev, st.st_ino), 0
        self._partial.clear()
        self._dropped = 0
        self._strip_nuls = False
        if self._first_open and self._start_at_end and st.st_size > 0:
            self._pos = os.lseek(fd, st.st_size, os.SEEK_SET)
            self._skip_to_newline = os.pread(fd, 1, st.st_size - 1) != b"\n"

    def _close(self) -> None:
        if self._fd is not None:
            fd, self._fd, self._ident = self._fd, None, None
            os.close(fd)

    def _read_available(self) -> None:
        assert self._fd is not None  # noqa: S101 - narrows; callers hold an open fd
        while not self._stopping.is_set():
            chunk = os.read(self._fd, _READ_CHUNK)
            if not chunk:
                return
            self._pos += len(chunk)
            if self._strip_nuls:
                chunk = chunk.lstrip(b"\x00")
                if not chunk:
                    continue
                self._strip_nuls = False
            if self._skip_to_newline:
                nl = chunk.find(b"\n")
                if nl < 0:
                    continue
                chunk = chunk[nl + 1 :]
                self._skip_to_newline = False
            lines = self._split(chunk)
            if lines:
                self._emit(lines)

    # ------------------------------------------------------------------ line assembly

    def _append(self, data: bytes) -> None:
        room = self._max - len(self._partial)
        if len(data) <= room:
            self._partial += data
        else:
            if room > 0:
                self._partial += data[:room]
            self._dropped += len(data) - max(room, 0)

    def _finish_line(self) -> str:
        data = bytes(self._partial)
        dropped = self._dropped
        self._partial.clear()
        self._dropped = 0
        if dropped:
            cut = _utf8_boundary(data)
            dropped += len(data) - cut
            return data[:cut].decode("utf-8", "replace") + f" …[truncated {dropped} bytes]"
        if data.endswith(b"\r"):
            data = data[:-1]
        return data.decode("utf-8", "replace")

    def _split(self, chunk: bytes) -> list[str]:
        parts = chunk.split(b"\n")
        self._append(parts[0])
        if len(parts) == 1:
            return []
        out = [self._finish_line()]
        limit = self._max
        for p in parts[1:-1]:
            if len(p) <= limit:
                out.append((p[:-1] if p.endswith(b"\r") else p).decode("utf-8", "replace"))
            else:
                self._append(p)
                out.append(self._finish_line())
        self._append(parts[-1])
        return out

    def _emit(self, lines: list[str]) -> None:
        try:
            self._on_lines(lines)
        except Exception:  # a faulty consumer must not end the tailing (the daemon would go blind)
            log.exception("log tailer: on_lines callback failed for %d lines", len(lines))


def _utf8_boundary(data: bytes) -> int:
    """Length of `data` without a trailing incomplete UTF-8 sequence (at most 3 bytes cut)."""
    n = len(data)
    i = n
    while i > 0 and n - i < 4 and (data[i - 1] & 0xC0) == 0x80:
        i -= 1
    if i > 0 and data[i - 1] >= 0xC0:  # a lead byte: is its sequence complete?
        lead = data[i - 1]
        need = 2 if lead < 0xE0 else 3 if lead < 0xF0 else 4
        if n - (i - 1) < need:
            return i - 1
        return n
    return n


def _default_observer() -> _Observer:
    from watchdog.observers import Observer

    return Observer()
