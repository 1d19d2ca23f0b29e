"""The proxy inside a real `vsup run` process, supervising tests/fakes/fake_api_server.py: the
wiring (routes published by the owner, status, events) and the hold bounds against a server
that never becomes ready. Fast: no vLLM.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from support import Daemon, free_port, wait_for

pytestmark = pytest.mark.timeout(120)
KEY = "vsup-test-key-5c1e"


def _proxy(fake_daemon: Callable[..., Daemon], mode: str = "ok", **proxy: Any) -> tuple[Daemon, str]:
    port = free_port(18500, 18599)
    env = proxy.pop("env", {})
    args = proxy.pop("vllm_args", None)
    extra: dict[str, dict[str, Any]] = {"proxy": {"listen": f"127.0.0.1:{port}", **proxy}}
    # vLLM's port outside 8050-8099, where every helper's fake daemons take the lowest free one
    extra["vllm"] = {"port": free_port(18600, 18699)}
    if args:
        extra["vllm"]["args"] = ["-tp", "2", *args]
    d = fake_daemon(mode, env=env, extra=extra)
    return d, f"http://127.0.0.1:{port}"


def _chat(base: str, key: str | None = None, timeout: float = 30) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(
        base + "/v1/chat/completions",
        json={"model": "fake-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
        headers=headers,
        timeout=timeout,
        trust_env=False,
    )


def test_proxy_serves_once_ready_and_status_shows_its_traffic(fake_daemon: Callable[..., Daemon]) -> None:
    """The owner's routes reach the proxy: /health 200 once ready, completions go through, and
    `vsup status` carries the proxy's numbers."""
    d, base = _proxy(fake_daemon)
    d.wait_state("ready", timeout=60)
    wait_for(lambda: httpx.get(base + "/health", trust_env=False).status_code == 200, 10, "/health 200")
    r = _chat(base)
    assert r.status_code == 200 and r.json()["choices"]
    t = d.status()["traffic"]
    assert {"in_flight", "held", "oldest_held_s"} <= set(t) and t["held"] == 0
    assert "requests:  0 in flight, 0 held" in d.cli("status").stdout
    assert any(e["event"] == "proxy_listening" for e in d.events())


def test_server_that_never_becomes_ready_held_requests_get_503_at_the_hold_timeout(
    fake_daemon: Callable[..., Daemon],
) -> None:
    """The server never answers (it sleeps before listening): two requests are held and get 503 +
    Retry-After at hold_timeout_s; a third, beyond max_held, gets 503 at once; /health is 503
    with the state meanwhile."""
    import concurrent.futures as cf

    d, base = _proxy(fake_daemon, env={"FAKE_VLLM_DELAY_S": "3600"}, hold_timeout_s=4.0, max_held=2)
    h = httpx.get(base + "/health", trust_env=False, timeout=5)
    assert h.status_code == 503 and h.json()["state"] == "starting"
    with cf.ThreadPoolExecutor(2) as pool:
        held = [pool.submit(_chat, base) for _ in range(2)]
        wait_for(lambda: d.status().get("traffic", {}).get("held") == 2, 10, "two requests held")
        assert d.status()["traffic"]["oldest_held_s"] >= 0
        r = _chat(base)
        assert r.status_code == 503 and r.headers["Retry-After"]
        assert "max_held" in r.json()["error"]["message"]
        assert not any(f.done() for f in held)  # answered while the two still wait
        for f in held:
            r = f.result()
            assert r.status_code == 503 and r.headers["Retry-After"]
            assert r.json()["error"]["state"] == "starting"
    names = [e["event"] for e in d.events()]
    assert names.count("proxy_hold_timeout") == 2 and "proxy_hold_full" in names


def test_api_key_server_becomes_ready_and_the_key_is_in_no_event(fake_daemon: Callable[..., Daemon]) -> None:
    """A server started with --api-key: the probes send the key (else it never becomes ready),
    the client's key passes through the proxy, no key is refused, and the key appears in no
    event."""
    d, base = _proxy(fake_daemon, vllm_args=("--api-key", KEY))
    d.wait_state("ready", timeout=60)
    assert _chat(base, KEY).status_code == 200
    assert _chat(base).status_code == 401
    text = (d.state_dir / "events.jsonl").read_text()
    assert KEY not in text, [json.loads(x)["event"] for x in text.splitlines() if KEY in x]


def test_reload_holds_new_requests_and_releases_them_to_the_new_server(
    fake_daemon: Callable[..., Daemon],
) -> None:
    """During `vsup reload` requests are held, not refused, and complete on the new server."""
    import concurrent.futures as cf

    d, base = _proxy(fake_daemon, env={"FAKE_VLLM_DELAY_S": "1"})
    d.wait_state("ready", timeout=60)
    with cf.ThreadPoolExecutor(8) as pool:
        t0 = time.monotonic()
        reload = pool.submit(d.cli, "reload", "--current", timeout=120)
        wait_for(lambda: d.status()["state"] != "ready", 20, "the reload to begin", 0.05)
        futs = [pool.submit(_chat, base, None, 60) for _ in range(4)]
        out = reload.result()
        assert out.returncode == 0, out.stderr
        took = time.monotonic() - t0
        assert [f.result().status_code for f in futs] == [200] * 4
    rel = [e for e in d.events() if e["event"] == "proxy_release"]
    assert rel and all(e["max_wait_s"] <= took for e in rel)


def test_a_flood_of_idle_connections_is_capped_and_supervision_goes_on(
    fake_daemon: Callable[..., Daemon],
) -> None:
    """600 idle client connections against max_connections=300: those past the cap get one 503
    and are closed (their fds freed); the server stays `ready` through several canaries, the
    control socket answers, and the proxy serves again once the idle ones leave."""
    import socket

    d, base = _proxy(fake_daemon, max_connections=300)
    d.wait_state("ready", timeout=60)
    n = len(d.events())
    port = int(base.rsplit(":", 1)[1])
    socks, refused = [], 0
    try:
        for _ in range(600):
            s = socket.create_connection(("127.0.0.1", port), timeout=10)
            socks.append(s)
        wait_for(lambda: d.status()["traffic"]["refused_conns"] >= 300, 30, "300 connections refused")
        assert d.status()["traffic"]["connections"] == 300
        for s in socks:
            s.setblocking(False)
            try:
                refused += s.recv(64).startswith(b"HTTP/1.1 503")
            except BlockingIOError:
                pass  # an idle connection the proxy kept
        assert refused == 300, refused
        time.sleep(4)  # several canaries (canary_interval_s = 1) while the proxy is at its cap
        assert d.status()["state"] == "ready"
    finally:
        for s in socks:
            s.close()
    assert not [e for e in d.events()[n:] if e["event"] == "state" and e["state"] != "ready"]
    wait_for(lambda: d.status()["traffic"]["connections"] == 0, 20, "idle connections gone")
    assert _chat(base).status_code == 200
