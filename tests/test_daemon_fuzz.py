"""Fuzzing the daemon's real control socket while it serves (fake server): it keeps answering
`status` and the served model keeps its pid and state."""

from __future__ import annotations

import json
import socket

import httpx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=10,
)
requests = st.fixed_dictionaries(
    {
        "id": st.integers() | st.text(max_size=5),
        "cmd": st.sampled_from(["status", "nope", "reload", "events", ""]),
    },
    optional={"args": json_values},
)
payloads = st.one_of(
    st.binary(max_size=300),
    json_values.map(lambda v: json.dumps(v).encode()),
    requests.map(lambda v: json.dumps(v).encode()),
)


def send_raw(path: str, data: bytes) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(2)
        s.connect(path)
        s.sendall(data + b"\n")
        try:
            s.recv(65536)
        except OSError:
            pass


def test_random_input_leaves_daemon_and_model_unaffected(fake_daemon) -> None:
    """Random bytes, JSON and request-shaped objects: status still answers, the model still serves."""
    d = fake_daemon()
    before = d.wait_state("ready", timeout=30)

    @settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(payloads)
    def one(payload: bytes) -> None:
        if b"reload" in payload:
            payload = payload.replace(b"reload", b"relaod")  # a real reload is not the point here
        send_raw(str(d.socket), payload)
        s = d.status()
        assert s["state"] == "ready" and s["pid"] == before["pid"]

    one()
    r = httpx.post(
        f"http://127.0.0.1:{d.port}/v1/chat/completions",
        trust_env=False,
        timeout=10,
        json={"model": "fake-model", "messages": [{"role": "user", "content": "x"}], "max_tokens": 2},
    )
    assert r.status_code == 200
