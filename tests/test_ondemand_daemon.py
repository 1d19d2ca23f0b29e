"""Issue 16 inside a real `vsup run` process, supervising tests/fakes/fake_api_server.py: idle
off-load and the request that loads the model again, `vsup unload` (CLI), swap on request and
the proxy's model list, unload during a reload. Fast: no vLLM.
"""

from __future__ import annotations

import concurrent.futures as cf
import socket
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from support import Daemon, free_port, wait_for
from vsup import proctree

pytestmark = pytest.mark.timeout(120)


def _daemon(fake_daemon: Callable[..., Daemon], **proxy: Any) -> tuple[Daemon, str]:
    listen = free_port(18700, 18799)
    extra: dict[str, dict[str, Any]] = {
        "proxy": {"listen": f"127.0.0.1:{listen}", **proxy},
        "vllm": {"port": free_port(18800, 18899), "served_model_name": "a"},
        "models.b": {"model": "fake-b", "served_model_name": "b", "env": {"FAKE_VLLM_DELAY_S": "2"}},
    }
    return fake_daemon(extra=extra), f"http://127.0.0.1:{listen}"


def _chat(base: str, model: str = "a", timeout: float = 60) -> httpx.Response:
    return httpx.post(
        base + "/v1/chat/completions",
        json={"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
        timeout=timeout,
        trust_env=False,
    )


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def test_idle_unload_then_a_request_loads_it_again(fake_daemon: Callable[..., Daemon]) -> None:
    """idle_unload_s = 1: soon after the last request the tree is gone (ledger empty, port free),
    the state is stopped/idle and /health answers 200; the next request is held through the
    start and succeeds; status and events carry the off-load and the load with their times."""
    d, base = _daemon(fake_daemon, idle_unload_s=1.0)
    d.wait_state("ready", timeout=60)
    assert _chat(base).status_code == 200
    last = time.monotonic()
    s = d.wait_state("stopped", timeout=20)
    assert s["reason"] == "idle" and s["on_demand"]["unloaded_for"] == "idle"
    assert time.monotonic() - last < 10
    assert proctree.Ledger(d.state_dir).load() == [] and _port_free(int(d.port))
    h = httpx.get(base + "/health", trust_env=False)
    assert h.status_code == 200 and h.json()["idle"] is True
    # readiness 'serving' (the default): an off-loaded pod stays in the Service, or no request
    # would ever come to load it again
    r = httpx.get(base + "/readyz", trust_env=False)
    assert r.status_code == 200 and r.json()["idle"] is True and r.json()["readiness"] == "serving"
    t0 = time.monotonic()
    r = _chat(base)
    waited = time.monotonic() - t0
    assert r.status_code == 200, r.text
    print(f"request after the idle off-load waited {waited:.2f}s")
    s = d.status()
    assert s["state"] == "ready" and s["on_demand"]["loaded"] == 1 and s["on_demand"]["unloaded"] >= 1
    names = [e["event"] for e in d.events()]
    assert "unloaded" in names and "load_on_demand" in names and "loaded" in names
    ev = next(e for e in d.events() if e["event"] == "loaded")
    assert ev["cause"] == "idle" and 0 < ev["seconds"] <= waited + 1


def test_vsup_unload_off_loads_now_and_the_next_request_loads_it(fake_daemon: Callable[..., Daemon]) -> None:
    """`vsup unload` (the CLI, admin): the tree is torn down and cleaned, stopped/unloaded; a
    request then loads the model again; `vsup unload` when nothing is loaded is a note."""
    d, base = _daemon(fake_daemon)
    d.wait_state("ready", timeout=60)
    p = d.cli("unload")
    assert p.returncode == 0 and "off-loaded" in p.stdout, p.stdout + p.stderr
    s = d.status()
    assert s["state"] == "stopped" and s["reason"] == "unloaded" and s["tree"] is None
    assert proctree.Ledger(d.state_dir).load() == [] and _port_free(int(d.port))
    assert "off-loaded" in d.cli("status").stdout
    p = d.cli("unload")
    assert p.returncode == 0 and "already stopped" in p.stdout
    assert _chat(base).status_code == 200
    assert d.status()["state"] == "ready"


def test_swap_on_request_and_the_model_list(fake_daemon: Callable[..., Daemon]) -> None:
    """swap_on_request, min_resident_s = 0: /v1/models lists a (loaded) and b; a request for b
    swaps (held meanwhile) and succeeds on b; a request for a then swaps back."""
    d, base = _daemon(fake_daemon, swap_on_request=True, min_resident_s=0.0)
    d.wait_state("ready", timeout=60)
    models = httpx.get(base + "/v1/models", trust_env=False).json()["data"]
    assert [(m["id"], m["loaded"]) for m in models] == [("a", True), ("b", False)]
    r = _chat(base, "b")
    assert r.status_code == 200 and r.json()["model"] == "b"
    assert d.status()["model"] == "b"
    r = _chat(base, "a")
    assert r.status_code == 200 and r.json()["model"] == "a"
    swaps = [e for e in d.events() if e["event"] == "swapped"]
    assert [(e["from"], e["to"], e["cause"]) for e in swaps] == [("a", "b", "request"), ("b", "a", "request")]
    assert all(e["seconds"] > 0 for e in swaps)


def test_unload_during_a_reload_is_busy(fake_daemon: Callable[..., Daemon]) -> None:
    """`vsup unload` while `vsup reload b` runs (b takes 2 s to answer): busy, exit 1; the reload
    finishes."""
    d, base = _daemon(fake_daemon)
    d.wait_state("ready", timeout=60)
    with cf.ThreadPoolExecutor(1) as pool:
        rl = pool.submit(d.cli, "reload", "b")
        wait_for(lambda: d.status()["state"] == "reloading", 20, "reloading")
        p = d.cli("unload")
        assert p.returncode == 1 and "busy" in p.stderr, p.stdout + p.stderr
        assert rl.result(60).returncode == 0
    assert d.status()["model"] == "b"
