"""Property tests of the control protocol: random bytes and JSON never break a live server."""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from support import ControlServerThread
from vsup.control import ERROR_CODES, ControlClient, Request

MAX_LINE = 4096  # small, so that oversized lines are cheap to generate
WAIT_S = 10.0
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def LiveServer(path: Path) -> ControlServerThread:
    """The fuzzed server: small lines, short read timeout."""
    return ControlServerThread(
        path,
        {"status": _status, "echo": _echo, "typed": _typed, "phases": _phases},
        max_line=MAX_LINE,
        read_timeout_s=5.0,
    )


async def _status(req: Request) -> Any:
    return {"state": "ready"}


async def _echo(req: Request) -> Any:
    return req.args


async def _typed(req: Request) -> Any:
    return {"model": req.arg("model", str), "n": req.arg("n", int, 1)}


async def _phases(req: Request) -> Any:
    await req.progress(phase="one", elapsed_s=0.0)
    return "done"


@pytest.fixture(scope="module")
def live() -> Iterator[ControlServerThread]:
    directory = Path(tempfile.mkdtemp(prefix="vsup-fuzz-"))
    try:
        with LiveServer(directory / "vsup.sock") as srv:
            yield srv
        assert not srv.loop_errors, f"unhandled errors on the server loop: {srv.loop_errors[:3]}"
        assert not [f for n, f in srv.events if n == "control_internal_error"]
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def exchange(path: Path, data: bytes) -> list[dict[str, Any]]:
    """Send data, half-close, and return every line the server wrote until it closed."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(WAIT_S)
    received = b""
    try:
        sock.connect(str(path))
        try:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass  # closed on us after a too_large line: its reply is still readable
        while chunk := sock.recv(65536):
            received += chunk
    except ConnectionResetError:
        pass
    finally:
        sock.close()
    assert received == b"" or received.endswith(b"\n"), f"torn line {received[-80:]!r}"
    lines = [json.loads(line) for line in received.splitlines()]
    assert all(isinstance(line, dict) for line in lines)
    return lines


def assert_well_formed(lines: list[dict[str, Any]]) -> None:
    for line in lines:
        if "progress" in line:
            continue
        assert isinstance(line["ok"], bool)
        if not line["ok"]:
            assert line["error"]["code"] in ERROR_CODES
            assert isinstance(line["error"]["message"], str)


def assert_status_answers(live: ControlServerThread) -> None:
    reply = ControlClient(live.server.path, timeout_s=WAIT_S).call("status")
    assert reply["ok"] is True and reply["result"] == {"state": "ready"}


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5)
    ),
    max_leaves=20,
)
commands = st.sampled_from(["status", "echo", "typed", "phases", "reload", ""]) | st.text(max_size=20)
requests = st.fixed_dictionaries(
    {"id": st.integers() | st.text(max_size=20) | json_values, "cmd": commands | json_values},
    optional={"args": st.dictionaries(st.sampled_from(["model", "n", "x"]), json_values) | json_values},
)


@FUZZ
@given(data=st.binary(max_size=2 * MAX_LINE))
def test_random_bytes(live: ControlServerThread, data: bytes) -> None:
    """Arbitrary bytes get only well-formed error lines, and status is answered afterwards."""
    assert_well_formed(exchange(live.server.path, data))
    assert_status_answers(live)


@FUZZ
@given(chunks=st.lists(st.binary(max_size=200), max_size=10))
def test_random_lines(live: ControlServerThread, chunks: list[bytes]) -> None:
    """Random newline-separated lines get at most one final reply each, all well formed."""
    payload = b"\n".join(chunks) + b"\n"
    lines = exchange(live.server.path, payload)
    assert_well_formed(lines)
    assert len([line for line in lines if "ok" in line]) <= payload.count(b"\n")
    assert_status_answers(live)


@FUZZ
@given(values=st.lists(json_values | requests, min_size=1, max_size=6))
def test_random_json(live: ControlServerThread, values: list[Any]) -> None:
    """Random JSON values and request-shaped objects get one well-formed reply per line."""
    payload = b"".join(json.dumps(value).encode() + b"\n" for value in values)
    lines = exchange(live.server.path, payload)
    assert_well_formed(lines)
    if len(payload) <= MAX_LINE:  # no line can be too_large, so every line is answered
        assert len([line for line in lines if "ok" in line]) == len(values)
    assert_status_answers(live)


@FUZZ
@given(args=st.lists(st.dictionaries(st.text(max_size=8), json_values, max_size=4), min_size=1, max_size=5))
def test_valid_requests_answered_in_order(live: ControlServerThread, args: list[dict[str, Any]]) -> None:
    """Pipelined valid echo requests come back in order, each with its own id and args."""
    payload = b"".join(
        json.dumps({"id": i, "cmd": "echo", "args": a}).encode() + b"\n" for i, a in enumerate(args)
    )
    if any(len(line) > MAX_LINE for line in payload.splitlines()):
        return
    lines = exchange(live.server.path, payload)
    assert [(line["id"], line["ok"], line["result"]) for line in lines] == [
        (i, True, a) for i, a in enumerate(args)
    ]


@FUZZ
@given(size=st.integers(MAX_LINE + 1, 8 * MAX_LINE), byte=st.sampled_from([b"x", b"{", b"\x00", b"\xff"]))
def test_oversized_lines(live: ControlServerThread, size: int, byte: bytes) -> None:
    """Any line over the limit gets exactly one too_large reply, then the connection closes."""
    lines = exchange(live.server.path, byte * size + b"\n")
    assert [line["error"]["code"] for line in lines] == ["too_large"]
    assert_status_answers(live)


def test_fuzz_server_reported_no_internal_errors(live: ControlServerThread) -> None:
    """After the fuzzing above, the server logged no internal error and no loop error."""
    assert not [f for n, f in live.events if n == "control_internal_error"]
    assert not live.loop_errors
    assert os.path.exists(live.server.path)
