"""Tests for vsup.logparse: one vLLM output line -> LogLine."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vsup.logparse import LogLine, exception_text, parse_line, strip_ansi

DATA = Path(__file__).parent / "data"


def test_v063_line_without_brackets():
    """A 0.6.3 line has level, time, bare source and message, no process prefix."""
    ll = parse_line("INFO 03-12 06:00:56 metrics.py:349] Avg prompt throughput: 0.0 tokens/s")
    assert ll == LogLine(
        raw="INFO 03-12 06:00:56 metrics.py:349] Avg prompt throughput: 0.0 tokens/s",
        level="INFO",
        time="03-12 06:00:56",
        process=None,
        pid=None,
        source="metrics.py:349",
        message="Avg prompt throughput: 0.0 tokens/s",
        kind="vllm",
    )


def test_v032_line_with_prefix_and_brackets():
    """A 0.32 line yields process name and pid from the prefix and the bracketed source."""
    ll = parse_line("(EngineCore pid=8362) INFO 11-25 12:42:46 [core.py:402] init engine took 3.43 s")
    assert (ll.process, ll.pid, ll.level, ll.time, ll.source, ll.message, ll.kind) == (
        "EngineCore",
        8362,
        "INFO",
        "11-25 12:42:46",
        "core.py:402",
        "init engine took 3.43 s",
        "vllm",
    )


def test_ansi_colour_prefix_is_stripped_but_raw_kept():
    """0.6-0.25 colour the prefix even without a TTY; fields are clean, raw is untouched."""
    raw = (
        "\x1b[1;36m(VllmWorkerProcess pid=1064554)\x1b[0;0m WARNING 03-12 06:01:57 "
        "shm_broadcast.py:396] No available block found in 60 second. "
    )
    ll = parse_line(raw)
    assert (ll.process, ll.pid, ll.level, ll.source) == (
        "VllmWorkerProcess",
        1064554,
        "WARNING",
        "shm_broadcast.py:396",
    )
    assert ll.message == "No available block found in 60 second. "
    assert ll.raw == raw


def test_coloured_level_and_time_of_033_tty_output():
    """ColoredFormatter (0.33 on a TTY) wraps level, time and source in colour codes."""
    raw = (
        "\x1b[0;36m(APIServer pid=1)\x1b[0;0m \x1b[32mINFO\x1b[0m \x1b[90m11-24 03:50:13\x1b[0m "
        "\x1b[90m[core.py:99]\x1b[0m hello"
    )
    ll = parse_line(raw)
    assert (ll.process, ll.level, ll.time, ll.source, ll.message) == (
        "APIServer",
        "INFO",
        "11-24 03:50:13",
        "core.py:99",
        "hello",
    )


def test_process_name_with_space_and_equals():
    """0.8-0.10 name workers 'VllmWorker rank=1': the name keeps its space and '='."""
    ll = parse_line("(VllmWorker rank=1 pid=77) ERROR 05-11 18:07:24 [multiproc_executor.py:12] boom")
    assert (ll.process, ll.pid, ll.message) == ("VllmWorker rank=1", 77, "boom")


def test_ray_prefix_with_ip():
    """Ray's outer prefix '(Name pid=N, ip=...)' gives name and pid."""
    ll = parse_line("(RayWorkerWrapper pid=5, ip=10.0.0.1) INFO 11-24 03:50:13 [worker.py:1] hi")
    assert (ll.process, ll.pid, ll.message) == ("RayWorkerWrapper", 5, "hi")


def test_trailing_carriage_return_is_stripped():
    """NewLineFormatter ends traceback lines in '\\r'; the message has none."""
    ll = parse_line("ERROR 03-12 06:01:27 client.py:250] RuntimeError: Engine loop has died\r")
    assert ll.message == "RuntimeError: Engine loop has died"


def test_debug_relpath_source():
    """With --log-level DEBUG the source is a shortened path, kept whole."""
    ll = parse_line("DEBUG 06-02 10:00:00 [model_executor/.../quantization/awq.py:12] x")
    assert ll.source == "model_executor/.../quantization/awq.py:12"


def test_uvicorn_line():
    """Uvicorn's 'INFO:     msg' is kind uvicorn with its level."""
    ll = parse_line("INFO:     Application startup complete.")
    assert (ll.kind, ll.level, ll.message, ll.process) == (
        "uvicorn",
        "INFO",
        "Application startup complete.",
        None,
    )


def test_prefixed_uvicorn_access_line():
    """0.6-0.25 prefix uvicorn output too: process comes from the prefix."""
    ll = parse_line('(APIServer pid=851) INFO:     10.1.2.3:5 - "GET /metrics HTTP/1.1" 200 OK')
    assert (ll.kind, ll.process, ll.pid, ll.message) == (
        "uvicorn",
        "APIServer",
        851,
        '10.1.2.3:5 - "GET /metrics HTTP/1.1" 200 OK',
    )


def test_python_warning():
    """A warnings.showwarning line: source is file:line, message starts with the category."""
    ll = parse_line(
        "/usr/lib/python3.10/multiprocessing/resource_tracker.py:224: UserWarning: resource_tracker: "
        "There appear to be 1 leaked semaphore objects to clean up at shutdown"
    )
    assert (ll.kind, ll.level, ll.source) == ("warning", "WARNING", "resource_tracker.py:224")
    assert ll.message.startswith("UserWarning: resource_tracker: There appear")


@pytest.mark.parametrize(
    "text",
    [
        "Traceback (most recent call last):",
        '  File "/x/y.py", line 3, in f',
        "RuntimeError: Unsupported CPU attention configuration: head_dim=16",
        "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB.",
        "KeyboardInterrupt",
        "The above exception was the direct cause of the following exception:",
    ],
)
def test_unprefixed_traceback_lines(text):
    """Raw traceback lines are kind traceback with the whole line as message."""
    ll = parse_line(text)
    assert (ll.kind, ll.message) == ("traceback", text)


def test_logging_prefix_before_header():
    """VLLM_LOGGING_PREFIX puts text before the header; it is still a vLLM line."""
    ll = parse_line("[gpu-box-7] (EngineCore pid=9) INFO 11-24 03:50:13 [core.py:123] hello")
    assert (ll.kind, ll.process, ll.pid, ll.message) == ("vllm", "EngineCore", 9, "hello")


def test_other_line_keeps_prefix_info():
    """Unrecognised text under a prefix is 'other' but keeps process and pid."""
    ll = parse_line("(Worker_TP0 pid=4) Loading safetensors checkpoint shards: 100% Completed")
    assert (ll.kind, ll.process, ll.pid, ll.message) == (
        "other",
        "Worker_TP0",
        4,
        "Loading safetensors checkpoint shards: 100% Completed",
    )


def test_exception_text_recognises_repr_and_plain_forms():
    """exception_text accepts 'E: msg' and 'E(...)' and rejects indented code and prose."""
    assert exception_text("RuntimeError('Engine loop has died')") == "RuntimeError('Engine loop has died')"
    assert exception_text("vllm.v1.engine.exceptions.EngineDeadError: x") is not None
    assert exception_text("    raise RuntimeError('x')") is None
    assert exception_text("Loading weights took 0.00 seconds") is None


def test_parsed_line_is_a_normal_frozen_logline() -> None:
    """parse_line's fast constructor yields an equal, immutable LogLine."""
    import dataclasses

    ll = parse_line("(Worker_TP1 pid=3) ERROR 11-24 03:50:13 [x.py:9] boom")
    assert ll == LogLine(
        "(Worker_TP1 pid=3) ERROR 11-24 03:50:13 [x.py:9] boom",
        "ERROR",
        "11-24 03:50:13",
        "Worker_TP1",
        3,
        "x.py:9",
        "boom",
        "vllm",
    )
    assert hash(ll) == hash(dataclasses.replace(ll))
    with pytest.raises(dataclasses.FrozenInstanceError):
        ll.message = "changed"  # type: ignore[misc]  # the frozen dataclass must refuse it


def test_strip_ansi_returns_same_object_without_escape():
    """The fast path returns the input unchanged when there is no ESC."""
    s = "plain line"
    assert strip_ansi(s) is s
    assert strip_ansi("\x1b[31mred\x1b[0m") == "red"


CAPTURES = sorted((DATA / "logs").glob("*.log"))


@pytest.mark.parametrize("path", CAPTURES, ids=lambda p: p.name)
def test_every_vllm_line_of_real_captures_parses(path):
    """In each real 0.32 capture, every line with a process prefix and a header is kind vllm with pid."""
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    for raw in lines:
        ll = parse_line(raw)
        head = raw.split(")", 1)
        if (
            raw.startswith("(")
            and " pid=" in head[0]
            and re.match(r" (DEBUG|INFO|WARNING|ERROR|CRITICAL) \d", head[1])
        ):
            assert ll.kind == "vllm" and ll.pid is not None and ll.source, raw
        if raw.startswith("INFO:     "):
            assert ll.kind == "uvicorn", raw


def test_real_captures_contain_every_line_kind():
    """Across the captures, the parser sees vllm, uvicorn, warning, traceback and other lines."""
    assert CAPTURES, "tests/data/logs has no captures"
    kinds = {
        parse_line(x).kind
        for p in CAPTURES
        for x in p.read_text(encoding="utf-8", errors="replace").splitlines()
    }
    assert kinds == {"vllm", "uvicorn", "warning", "traceback", "other"}


@settings(max_examples=500, deadline=None)
@given(st.text())
def test_never_raises_on_any_text(text):
    """parse_line returns a LogLine with raw == input for any string."""
    ll = parse_line(text)
    assert isinstance(ll, LogLine) and ll.raw == text


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("()[]: =pid0123456789INFOERW\x1b\r\n-.abc"))))
def test_never_raises_on_header_like_noise(text):
    """Near-miss headers (parentheses, digits, escapes) never raise."""
    assert parse_line(text).raw == text
