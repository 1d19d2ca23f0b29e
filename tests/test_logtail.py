"""Tests for vsup.logtail: following a log across rotations, partial, huge and invalid lines.

The tailers here poll only once an hour, so every delivery the tests wait for comes from an
inotify event: a broken watch fails the test instead of passing slowly on the 2 s safety net.
"""

from __future__ import annotations

import os
import shutil
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from support import wait_for
from vsup.logtail import LogTailer

WAIT_S = 10.0
NO_POLL = 3600.0


class Collector:
    """Receives on_lines batches; tests wait on its condition with a deadline."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.batches = 0
        self.threads: set[str] = set()
        self.cond = threading.Condition()

    def __call__(self, lines: list[str]) -> None:
        with self.cond:
            self.lines.extend(lines)
            self.batches += 1
            self.threads.add(threading.current_thread().name)
            self.cond.notify_all()

    def wait_for(self, pred: Callable[[list[str]], bool], timeout: float = WAIT_S) -> list[str]:
        with self.cond:
            ok = self.cond.wait_for(lambda: pred(self.lines), timeout)
            assert ok, f"timed out; got {self.lines[-5:]!r} ({len(self.lines)} lines)"
            return list(self.lines)

    def wait_count(self, n: int, timeout: float = WAIT_S) -> list[str]:
        return self.wait_for(lambda ls: len(ls) >= n, timeout)


@pytest.fixture
def tail(tmp_path: Path) -> Iterator[Callable[..., tuple[LogTailer, Collector]]]:
    started: list[LogTailer] = []

    def make(path: Path, **kw) -> tuple[LogTailer, Collector]:
        c = Collector()
        kw.setdefault("poll_interval", NO_POLL)
        t = LogTailer(path, c, **kw)
        started.append(t)
        t.start()
        return t, c

    try:
        yield make
    finally:
        for t in started:
            t.stop()


def wait_until(pred: Callable[[], bool], timeout: float = WAIT_S) -> None:
    """Poll-with-deadline for reader state that has no event of its own (position, buffer)."""
    wait_for(pred, timeout, "the tailer's state", interval=0.01)


def append(path: Path, data: str | bytes) -> None:
    with open(path, "ab") as f:
        f.write(data.encode() if isinstance(data, str) else data)


def test_start_at_end_skips_existing_content(tmp_path, tail):
    """By default only lines written after start() are delivered."""
    p = tmp_path / "v.log"
    p.write_text("old 1\nold 2\n")
    t, c = tail(p)
    append(p, "new 1\nnew 2\n")
    assert c.wait_count(2) == ["new 1", "new 2"]


def test_start_at_beginning_reads_existing_content(tmp_path, tail):
    """start_at_end=False delivers what is already there, then what follows."""
    p = tmp_path / "v.log"
    p.write_text("old 1\nold 2\n")
    t, c = tail(p, start_at_end=False)
    c.wait_count(2)
    append(p, "new\n")
    assert c.wait_count(3) == ["old 1", "old 2", "new"]


def test_start_at_end_mid_line_drops_the_fragment(tmp_path, tail):
    """Starting at the end of an unterminated line does not deliver its tail as a line."""
    p = tmp_path / "v.log"
    p.write_text("complete\nhalf a li")
    t, c = tail(p)
    append(p, "ne\nnext\n")
    assert c.wait_count(1) == ["next"]


def test_lines_come_from_the_tailer_thread(tmp_path, tail):
    """on_lines runs in the tailer's own thread, not the caller's."""
    p = tmp_path / "v.log"
    p.write_text("a\n")
    t, c = tail(p, start_at_end=False)
    c.wait_count(1)
    assert threading.current_thread().name not in c.threads


def test_partial_line_is_buffered_until_newline(tmp_path, tail):
    """A line written in pieces is delivered once, whole, after its newline."""
    p = tmp_path / "v.log"
    p.touch()
    t, c = tail(p)
    append(p, "(EngineCore pid=1) INFO 11-24 03:50:13 [core.py:1] par")
    append(p, "tial")
    append(p, " line\nsecond\n")
    assert c.wait_count(2) == ["(EngineCore pid=1) INFO 11-24 03:50:13 [core.py:1] partial line", "second"]


def test_crlf_and_invalid_utf8(tmp_path, tail):
    """'\\r\\n' is stripped and invalid UTF-8 becomes U+FFFD."""
    p = tmp_path / "v.log"
    p.touch()
    t, c = tail(p)
    append(p, b"traceback line\r\nbad \xff\xfe bytes\nok \xc3\xa9\n")
    assert c.wait_count(3) == ["traceback line", "bad \ufffd\ufffd bytes", "ok \u00e9"]


def test_rename_rotation(tmp_path, tail):
    """After mv log log.1 and a new log, lines of both files arrive in order."""
    p = tmp_path / "v.log"
    p.write_text("")
    t, c = tail(p)
    append(p, "before 1\n")
    c.wait_count(1)
    append(p, "before 2\n")  # may still be unread when the rename happens
    os.rename(p, tmp_path / "v.log.1")
    append(p, "after 1\n")
    append(p, "after 2\n")
    assert c.wait_count(4) == ["before 1", "before 2", "after 1", "after 2"]
    assert t.position == len("after 1\nafter 2\n")


def test_copytruncate(tmp_path, tail):
    """After copy + truncate in place, reading restarts at offset 0."""
    p = tmp_path / "v.log"
    p.write_text("")
    t, c = tail(p)
    append(p, "one\ntwo\n")
    c.wait_count(2)
    shutil.copy(p, tmp_path / "v.log.1")
    with open(p, "r+b") as f:
        f.truncate(0)
    append(p, "three\n")
    assert c.wait_count(3) == ["one", "two", "three"]
    assert t.position == len("three\n")


def test_copytruncate_with_non_append_writer_skips_nul_hole(tmp_path, tail):
    """A '>'-style writer keeps its offset after truncation; the NUL hole is not delivered."""
    p = tmp_path / "v.log"
    p.write_text("")
    t, c = tail(p)
    fd = os.open(p, os.O_WRONLY)  # like `cmd > LOGFILE`: no O_APPEND
    try:
        os.write(fd, b"first line\n")
        c.wait_count(1)
        os.truncate(p, 0)
        wait_until(lambda: t.position == 0)
        os.write(fd, b"after truncate\n")  # lands at offset 11: bytes 0..10 read as NUL
    finally:
        os.close(fd)
    assert c.wait_count(2) == ["first line", "after truncate"]


def test_delete_and_recreate(tmp_path, tail):
    """A deleted log that is created again is followed from its start."""
    p = tmp_path / "v.log"
    p.write_text("")
    t, c = tail(p)
    append(p, "a\n")
    c.wait_count(1)
    p.unlink()
    append(p, "b\nc\n")
    assert c.wait_count(3) == ["a", "b", "c"]


def test_file_created_after_start(tmp_path, tail):
    """A log that does not exist at start is read from offset 0 once created."""
    p = tmp_path / "later.log"
    t, c = tail(p)
    append(p, "first\nsecond\n")
    assert c.wait_count(2) == ["first", "second"]


def test_unterminated_last_line_of_rotated_file_is_delivered(tmp_path, tail):
    """A rotated-away file's last line without newline is emitted as is when the new file appears."""
    p = tmp_path / "v.log"
    p.write_text("")
    t, c = tail(p)
    append(p, "whole\ncut off")
    c.wait_count(1)
    os.rename(p, tmp_path / "v.log.1")
    append(p, "new\n")
    assert c.wait_count(3) == ["whole", "cut off", "new"]


def test_huge_line_is_capped_and_marked_without_being_held(tmp_path, tail):
    """A 10 MB line without newline keeps max_line_bytes in memory, then is delivered capped."""
    p = tmp_path / "v.log"
    p.touch()
    cap = 64 * 1024
    t, c = tail(p, max_line_bytes=cap)
    size = 10 * 1024 * 1024
    with open(p, "ab") as f:
        for _ in range(size // (1024 * 1024)):
            f.write(b"x" * (1024 * 1024))
    wait_until(lambda: t.position == size)  # all read; nothing delivered yet
    assert c.lines == [] and t.buffered <= cap
    append(p, "\nnext\n")
    lines = c.wait_count(2)
    assert lines[0] == "x" * cap + f" …[truncated {size - cap} bytes]"
    assert lines[1] == "next"


def test_capped_line_is_cut_at_a_character_boundary(tmp_path, tail):
    """The cap never splits a multi-byte UTF-8 character."""
    p = tmp_path / "v.log"
    p.touch()
    t, c = tail(p, max_line_bytes=17)
    append(p, ("é" * 20 + "\n").encode())  # 40 bytes; 17 would split the 9th é
    line = c.wait_count(1)[0]
    assert line == "é" * 8 + " …[truncated 24 bytes]"


def test_many_writers_interleaving_whole_lines(tmp_path, tail):
    """Lines appended by several writers at once all arrive intact."""
    p = tmp_path / "v.log"
    p.touch()
    t, c = tail(p)
    writers, per = 8, 500

    def write(w: int) -> None:
        fd = os.open(p, os.O_WRONLY | os.O_APPEND)
        try:
            for i in range(per):
                os.write(
                    fd,
                    f"(Worker_TP{w} pid={1000 + w}) INFO 11-24 03:50:13 [x.py:1] line {i:05d} {'y' * 100}\n".encode(),
                )
        finally:
            os.close(fd)

    threads = [threading.Thread(target=write, args=(w,)) for w in range(writers)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    lines = c.wait_count(writers * per)
    assert len(lines) == writers * per
    expected = {
        f"(Worker_TP{w} pid={1000 + w}) INFO 11-24 03:50:13 [x.py:1] line {i:05d} {'y' * 100}"
        for w in range(writers)
        for i in range(per)
    }
    assert set(lines) == expected


def test_callback_error_does_not_stop_tailing(tmp_path):
    """An exception in on_lines is logged; later lines are still delivered."""
    p = tmp_path / "v.log"
    p.touch()
    got: list[str] = []
    cond = threading.Condition()

    def on_lines(lines: list[str]) -> None:
        with cond:
            got.extend(lines)
            cond.notify_all()
        if "boom" in lines:
            raise RuntimeError("consumer bug")

    t = LogTailer(p, on_lines, poll_interval=NO_POLL)
    t.start()
    try:
        append(p, "boom\n")
        with cond:
            assert cond.wait_for(lambda: "boom" in got, WAIT_S)
        append(p, "after\n")
        with cond:
            assert cond.wait_for(lambda: "after" in got, WAIT_S)
    finally:
        t.stop()


def test_stop_is_idempotent_and_joins(tmp_path):
    """stop() joins the reader thread, can be called twice, and before start()."""
    p = tmp_path / "v.log"
    LogTailer(p, lambda lines: None).stop()  # never started
    t = LogTailer(p, lambda lines: None, poll_interval=NO_POLL)
    t.start()
    thread = t._thread
    assert thread is not None and thread.is_alive()
    t.stop()
    t.stop()
    assert not thread.is_alive()


def test_no_lines_after_stop(tmp_path):
    """Lines written after stop() are never delivered."""
    p = tmp_path / "v.log"
    p.touch()
    c = Collector()
    t = LogTailer(p, c, poll_interval=NO_POLL)
    t.start()
    append(p, "before\n")
    c.wait_count(1)
    t.stop()
    append(p, "after\n")
    with open(p, "rb") as f:
        assert f.read().endswith(b"after\n")
    assert c.lines == ["before"]


def test_injected_observer_factory_is_used(tmp_path):
    """observer_factory replaces the inotify observer (here watchdog's polling observer)."""
    from watchdog.observers.polling import PollingObserver

    made: list[PollingObserver] = []

    def factory() -> PollingObserver:
        o = PollingObserver(timeout=0.05)
        made.append(o)
        return o

    p = tmp_path / "v.log"
    p.touch()
    c = Collector()
    t = LogTailer(p, c, observer_factory=factory, poll_interval=NO_POLL)
    t.start()
    try:
        append(p, "via polling observer\n")
        assert c.wait_count(1) == ["via polling observer"]
        assert len(made) == 1
    finally:
        t.stop()


def test_safety_net_poll_finds_lines_without_events(tmp_path):
    """With an observer that never reports, the periodic stat still delivers new lines."""

    class DeafObserver:
        def schedule(self, *a, **kw):
            return None

        def start(self):
            pass

        def stop(self):
            pass

        def join(self, timeout=None):
            pass

    p = tmp_path / "v.log"
    p.touch()
    c = Collector()
    t = LogTailer(p, c, observer_factory=DeafObserver, poll_interval=0.05)
    t.start()
    try:
        append(p, "found by polling\n")
        assert c.wait_count(1) == ["found by polling"]
    finally:
        t.stop()


def test_invalid_arguments():
    """A tiny line cap or a non-positive poll interval is refused."""
    with pytest.raises(ValueError):
        LogTailer("/tmp/x", lambda lines: None, max_line_bytes=1)
    with pytest.raises(ValueError):
        LogTailer("/tmp/x", lambda lines: None, poll_interval=0)
