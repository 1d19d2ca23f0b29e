"""Parse one line of vLLM server output into a `LogLine`.

One function, `parse_line`, for every shape a vLLM server writes to its log file, from 0.6.3 to 0.33:

* vLLM logger lines. 0.6.3-0.7.x: ``INFO 03-12 06:00:56 metrics.py:349] msg``; 0.8+ adds brackets
  around the source: ``INFO 05-11 18:07:24 [loggers.py:111] msg``; with ``--log-level DEBUG`` the
  source is a shortened path (``v1/engine/core.py:12``, ``model_executor/.../awq.py:3``).
* A per-process prefix ``(Name pid=N) ``. Name may hold spaces and ``=`` (0.8-0.10 workers are
  ``VllmWorker rank=1``); Ray adds ``, ip=...`` inside the parentheses. In 0.6-0.25 the prefix is
  written around *everything* the child prints (uvicorn, tracebacks, warnings), always in ANSI
  cyan, TTY or not; from ~0.26 it is part of the vLLM format and only on vLLM lines.
* Uvicorn: ``INFO:     Application startup complete.`` and access lines
  ``INFO:     127.0.0.1:41034 - "POST /v1/chat/completions HTTP/1.1" 500 Internal Server Error``.
* Python warnings: ``/usr/lib/python3.10/multiprocessing/resource_tracker.py:224: UserWarning: ...``.
* Unprefixed traceback lines (``Traceback (most recent call last):``, ``  File "...", line 3, in f``,
  ``RuntimeError: boom``). A traceback logged by vLLM's NewLineFormatter repeats the vLLM header on
  every line and ends each in ``\\r``: those are ``kind="vllm"`` lines whose *message* is a traceback
  line; `exception_text` recognises the exception line in either case.

`parse_line` never raises: the daemon calls it on every tailed line, and a parser exception there
would blind the supervisor exactly when the log gets strange. Anything unrecognised is
``kind="other"`` with the cleaned text as message.

Cost matters (the daemon parses every line online; the bench wants >= 200k lines/s with matching),
so each step is one anchored regex match guarded by a cheap string test, and ANSI stripping is
skipped unless the line contains an ESC byte.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields

__all__ = ["LogLine", "parse_line", "exception_text", "strip_ansi"]


@dataclass(frozen=True, slots=True)
class LogLine:
    """One parsed line. `raw` is the input exactly as given; every other field is from the cleaned text."""

    raw: str
    level: str | None
    time: str | None  # "MM-DD HH:MM:SS" as vLLM writes it (local time, no year)
    process: str | None  # "EngineCore", "VllmWorker rank=1", "Worker_TP0", ...
    pid: int | None
    source: str | None  # "core.py:123"
    message: str
    kind: str  # "vllm" | "uvicorn" | "traceback" | "warning" | "other"


# parse_line builds one LogLine per log line, and a frozen dataclass's generated __init__ sets each
# field through object.__setattr__ (~0.8 us for 8 fields, a third of the parse cost). _new sets the
# slots through their member descriptors instead (~0.4 us): same object, same equality, still
# immutable afterwards. The assert keeps it in step with the field list.
_FIELD_NAMES = tuple(f.name for f in fields(LogLine))
assert _FIELD_NAMES == ("raw", "level", "time", "process", "pid", "source", "message", "kind")  # noqa: S101 - at import
(_s_raw, _s_level, _s_time, _s_process, _s_pid, _s_source, _s_message, _s_kind) = (
    LogLine.__dict__[n].__set__ for n in _FIELD_NAMES
)
_object_new = object.__new__


def _new(
    raw: str,
    level: str | None,
    time: str | None,
    process: str | None,
    pid: int | None,
    source: str | None,
    message: str,
    kind: str,
) -> LogLine:
    o = _object_new(LogLine)
    _s_raw(o, raw)
    _s_level(o, level)
    _s_time(o, time)
    _s_process(o, process)
    _s_pid(o, pid)
    _s_source(o, source)
    _s_message(o, message)
    _s_kind(o, kind)
    return o


# CSI sequences (colours, cursor moves) and the rarer OSC/two-byte escapes.
_ANSI = re.compile(r"\x1b(?:\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(?:\x07|\x1b\\)|[@-Z\\-_])")

# "(Name pid=N) " or Ray's "(Name pid=N, ip=1.2.3.4) ". Name is lazy so "VllmWorker rank=1" works.
_PREFIX = re.compile(r"\(([^()\n]{1,120}?) pid=(\d{1,10})(?:,[^()]*)?\) ?")

_LEVELS = "DEBUG|INFO|WARNING|WARN|ERROR|CRITICAL|FATAL"
# vLLM header: LEVEL MM-DD HH:MM:SS [file.py:N] msg   (brackets optional: 0.6.x-0.7.x have none).
_VLLM = re.compile(
    r"(" + _LEVELS + r") (\d\d-\d\d \d\d:\d\d:\d\d)(?:[.,]\d+)? \[?([^\s\]]{1,200}?:\d+)\] ?(.*)",
    re.DOTALL,
)
# Prefix and header in one match: the most common line shape of 0.10+ ("(Worker_TP0 pid=9) DEBUG ..."),
# one regex call instead of two and a slice.
_PREFIXED_VLLM = re.compile(_PREFIX.pattern + _VLLM.pattern, re.DOTALL)
# Same header anywhere in the first part of the line: VLLM_LOGGING_PREFIX puts arbitrary text before
# the level (before the "(Name pid=N)" in 0.33). Only tried when nothing else matched.
_VLLM_HEADER_ANYWHERE = re.compile(
    r"(?:\(([^()\n]{1,120}?) pid=(\d{1,10})(?:,[^()]*)?\) ?)?"
    r"\b(" + _LEVELS + r") (\d\d-\d\d \d\d:\d\d:\d\d)(?:[.,]\d+)? \[?([^\s\]]{1,200}?:\d+)\] ?"
)
_HEADER_SEARCH_CHARS = 300
_UVICORN = re.compile(r"(DEBUG|INFO|WARNING|ERROR|CRITICAL|TRACE):  +(.*)", re.DOTALL)
# "/path/to/file.py:224: UserWarning: text" (warnings.showwarning's format).
_PYWARN = re.compile(r"(?:[^\s:]*/)?([^\s/:]+\.py):(\d+): ([A-Z]\w*Warning): (.*)", re.DOTALL)
_TB_FILE = re.compile(r'\s+File "')
# An exception line as traceback.format_exception ends: "RuntimeError: msg", "torch.OutOfMemoryError:
# CUDA out of memory", "vllm.v1.engine.exceptions.EngineDeadError: ...", "KeyboardInterrupt".
_EXC = re.compile(
    r"((?:[A-Za-z_]\w*\.)*[A-Z]\w*(?:Error|Exception|Exit|Interrupt|Warning|Failure|Timeout|Dead\w*))"
    r"(?::\s.*|:$|\(.*\)$|$)",
    re.DOTALL,
)
_TB_MARKERS = (
    "Traceback (most recent call last):",
    "During handling of the above exception, another exception occurred:",
    "The above exception was the direct cause of the following exception:",
)


def strip_ansi(text: str) -> str:
    """Remove ANSI escape sequences; the input itself when it has none."""
    if "\x1b" not in text:
        return text
    return _ANSI.sub("", text)


def exception_text(message: str) -> str | None:
    """The exception line ("RuntimeError: boom") if `message` is one, else None.

    Also accepts repr form ("RuntimeError('Engine loop has died')", which 0.6.x logs as the first line
    of `logger.exception(repr(e))`). Leading whitespace disqualifies: indented lines are source code.
    """
    if not message or message[0] in " \t":
        return None
    m = _EXC.match(message)
    if m is None:
        return None
    return message.rstrip()


def parse_line(raw: str) -> LogLine:
    """Parse one line of vLLM output. Never raises; unrecognised text is kind "other"."""
    try:
        return _parse(raw)
    except Exception:  # noqa: BLE001 - the invariant is "never raises"; _parse has no known failure
        return LogLine(raw, None, None, None, None, None, raw if isinstance(raw, str) else repr(raw), "other")


def _parse(raw: str) -> LogLine:
    line = raw
    if line and line[-1] in "\r\n":
        line = line.rstrip("\r\n")
    if "\x1b" in line:
        line = _ANSI.sub("", line)

    process: str | None = None
    pid: int | None = None
    if line.startswith("("):
        pm = _PREFIXED_VLLM.match(line)
        if pm is not None:
            name, pid_s, level, time, source, msg = pm.groups()
            if msg.endswith("\r"):
                msg = msg.rstrip("\r")
            return _new(raw, level, time, name, int(pid_s), source, msg, "vllm")
        p = _PREFIX.match(line)
        if p is not None:
            process = p.group(1)
            pid = int(p.group(2))
            line = line[p.end() :]

    m = _VLLM.match(line)
    if m is not None:
        level, time, source, msg = m.groups()
        if msg.endswith("\r"):
            msg = msg.rstrip("\r")
        return _new(raw, level, time, process, pid, source, msg, "vllm")

    u = _UVICORN.match(line)
    if u is not None:
        return _new(raw, u.group(1), None, process, pid, None, u.group(2), "uvicorn")

    if ".py:" in line:
        w = _PYWARN.match(line)
        if w is not None:
            return _new(
                raw,
                "WARNING",
                None,
                process,
                pid,
                f"{w.group(1)}:{w.group(2)}",
                f"{w.group(3)}: {w.group(4)}",
                "warning",
            )

    if line.startswith(_TB_MARKERS) or _TB_FILE.match(line) or exception_text(line) is not None:
        return _new(raw, None, None, process, pid, None, line, "traceback")

    # Slow path: a vLLM header somewhere in the first 300 characters (VLLM_LOGGING_PREFIX, glued output).
    if _might_have_header(line):
        h = _VLLM_HEADER_ANYWHERE.search(line, 0, _HEADER_SEARCH_CHARS)
        if h is not None:
            if h.group(1) is not None and process is None:
                process, pid = h.group(1), int(h.group(2))
            msg = line[h.end() :].rstrip("\r")
            return _new(raw, h.group(3), h.group(4), process, pid, h.group(5), msg, "vllm")

    return _new(raw, None, None, process, pid, None, line, "other")


def _might_have_header(line: str) -> bool:
    head = line[:_HEADER_SEARCH_CHARS]
    return "]" in head and (
        "INFO " in head
        or "WARNING " in head
        or "ERROR " in head
        or "DEBUG " in head
        or "CRITICAL " in head
        or "WARN " in head
        or "FATAL " in head
    )
