"""vsup.pod: the three probes' answers, the termination message, and the pod config keys."""

from __future__ import annotations

import asyncio
import json
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from support import write_config
from vsup import config, pod
from vsup.config import ConfigError
from vsup.pod import View

READY = View(
    now=1000.0,
    heartbeat=999.5,
    bounded_until=0.0,
    state="ready",
    routed=True,
    holding=False,
    loaded=True,
    shutting_down=False,
)
LOADING = replace(READY, state="starting", routed=False, holding=True, loaded=False)
HUNG = replace(READY, state="unhealthy", routed=False, holding=True)


def test_liveness_follows_the_owners_heartbeat_not_vllm() -> None:
    """Fresh heartbeat: 200 in every state, a hung or loading server included."""
    for v in (READY, LOADING, HUNG, replace(READY, state="failed", routed=False)):
        assert pod.livez(v)[0] == 200


def test_liveness_fails_when_the_owner_is_wedged() -> None:
    """No wake-up for longer than the limit, outside a bounded step: 503 with the age."""
    status, body = pod.livez(replace(READY, heartbeat=READY.now - pod.LIVENESS_STALE_S - 1))
    assert status == 503 and body["alive"] is False and "has not woken" in body["reason"]


def test_liveness_holds_inside_a_bounded_step() -> None:
    """A teardown waiting out its grace does not wake the owner, but has a deadline: 200 until it."""
    inside = replace(READY, heartbeat=READY.now - 60, bounded_until=READY.now + 5)
    assert pod.livez(inside)[0] == 200
    assert pod.livez(replace(inside, bounded_until=READY.now - 0.1))[0] == 503


@pytest.mark.parametrize(
    ("view", "serving", "hold"),
    [
        (READY, 200, 200),
        (LOADING, 503, 200),
        (HUNG, 503, 200),
        (replace(READY, state="failed", routed=False), 503, 503),
        (replace(READY, state="stopped", routed=False), 503, 503),
        (replace(READY, state="stopped", routed=False, holding=True, idle=True), 200, 200),
        (
            replace(READY, state="stopped", routed=False, holding=True, idle=True, shutting_down=True),
            503,
            503,
        ),
        (replace(READY, shutting_down=True), 503, 503),
        (replace(LOADING, shutting_down=True), 503, 503),
    ],
)
def test_readiness_per_setting(view: View, serving: int, hold: int) -> None:
    """'serving': ready only with a routed server or an off-loaded model (a request loads it);
    'hold': also while one is coming; never while shutting down or with nothing coming."""
    assert pod.readyz(view, "serving")[0] == serving
    assert pod.readyz(view, "hold")[0] == hold


def test_startup_is_the_first_model_proven_ready() -> None:
    """503 until a model was proven ready once; then 200 whatever follows."""
    assert pod.startupz(LOADING)[0] == 503
    assert pod.startupz(replace(HUNG, loaded=True))[0] == 200


def test_probes_remember_the_first_ready_from_events() -> None:
    """A ready state seen once in the events makes /startupz 200, even after it is gone."""
    current = [LOADING]
    probes = pod.Probes(lambda: current[0], "serving")
    assert probes.answer("/startupz") == pod.startupz(LOADING)
    probes.on_event({"event": "state", "state": "starting"})
    assert not probes.loaded
    probes.on_event({"event": "state", "state": "ready"})
    assert probes.loaded
    assert probes.answer("/nope") is None


def test_aiohttp_handlers_answer_json_without_caching() -> None:
    """The handlers the proxy mounts: status, JSON body, no caching, for each path."""
    from aiohttp.test_utils import make_mocked_request

    probes = pod.Probes(lambda: HUNG, "serving")
    handlers = probes.aiohttp_handlers()
    assert set(handlers) == {"/livez", "/readyz", "/startupz"}

    async def ask(path: str) -> tuple[int, dict, str]:
        resp = await handlers[path](make_mocked_request("GET", path))
        return resp.status, json.loads(resp.body), resp.headers["Cache-Control"]

    assert asyncio.run(ask("/livez")) == (200, {"alive": True, "heartbeat_age_s": 0.5}, "no-store")
    status, body, _ = asyncio.run(ask("/readyz"))
    assert status == 503 and body["state"] == "unhealthy" and body["readiness"] == "serving"


# ---- termination message ------------------------------------------------------------------------


def test_termination_message_written_only_where_the_file_exists(tmp_path: Path) -> None:
    """An existing file is replaced by the message; a missing one is not created."""
    log = tmp_path / "termination-log"
    log.write_text("old and longer than the message")
    assert pod.write_termination_message("engine died", str(log))
    assert log.read_text() == "engine died"
    missing = tmp_path / "absent"
    assert not pod.write_termination_message("engine died", str(missing))
    assert not missing.exists()


def test_termination_message_is_cut_to_kubernetes_limit(tmp_path: Path) -> None:
    """Kubernetes keeps 4096 bytes: a longer message is cut there and says so."""
    log = tmp_path / "termination-log"
    log.touch()
    assert pod.write_termination_message("x" * 10000, str(log))
    data = log.read_bytes()
    assert len(data) == 4096 and data.endswith(b"...")


def test_termination_message_never_follows_a_symlink(tmp_path: Path) -> None:
    """A symlink at the path is refused (O_NOFOLLOW): vsup never writes through it."""
    target = tmp_path / "elsewhere"
    target.write_text("keep")
    (tmp_path / "termination-log").symlink_to(target)
    assert not pod.write_termination_message("boom", str(tmp_path / "termination-log"))
    assert target.read_text() == "keep"


def test_failure_message_has_a_line_and_the_facts() -> None:
    """First line for humans (kubectl describe), then JSON with state, reason, restarts."""
    msg = pod.failure_message("failed", "engine died 5 times in 600 s", 5, "tiny-a")
    head, detail = msg.split("\n", 1)
    assert head == "vsup: the vLLM server ended failed: engine died 5 times in 600 s"
    assert json.loads(detail)["restarts"] == 5


def test_pid1_is_false_here() -> None:
    """The test runner is not PID 1 (the in-namespace tests prove the other side)."""
    assert pod.is_pid1() is (os.getpid() == 1) is False


# ---- config -------------------------------------------------------------------------------------


def _cfg(tmp_path: Path, **daemon: object) -> config.Config:
    import sys

    path = write_config(
        tmp_path / "vsup.toml",
        {"vllm": {"python": sys.executable, "model": "m"}, "daemon": dict(daemon)},
    )
    return config.load(path)


def test_pod_keys_default_to_systemd_behaviour(tmp_path: Path) -> None:
    """Defaults: stay up in failed, serving readiness, no shm claim, 20 s shutdown drain."""
    cfg = _cfg(tmp_path)
    d = cfg.daemon
    assert (d.exit_on_failed, d.readiness, d.shm_private) == (False, "serving", False)
    assert d.termination_log == "/dev/termination-log"
    assert cfg.timeouts.shutdown_drain_s == 20.0


def test_readiness_must_be_a_known_mode(tmp_path: Path) -> None:
    """An unknown readiness mode is a config error naming the key and the choices."""
    with pytest.raises(ConfigError) as e:
        _cfg(tmp_path, readiness="always")
    assert e.value.key == "daemon.readiness" and "'serving', 'hold'" in e.value.problem
    assert _cfg(tmp_path, readiness="hold", exit_on_failed=True).daemon.exit_on_failed


# ---- the proxy's side of a shutdown -------------------------------------------------------------


def test_closing_route_refuses_held_and_new_requests_while_in_flight_ones_finish() -> None:
    """After SIGTERM the owner publishes a closing route: a held request gets 503 + Retry-After
    at once, a new one 503 with Connection: close, and a request already forwarded finishes."""
    import aiohttp
    from aiohttp import web

    from vsup.config import ProxyConfig
    from vsup.gate import Gate, Route
    from vsup.proxy import Proxy

    async def scenario() -> None:
        release = asyncio.Event()

        async def slow(request: web.Request) -> web.Response:
            await release.wait()
            return web.json_response({"done": True})

        up = web.AppRunner(web.Application())
        up.app.router.add_post("/v1/completions", slow)
        await up.setup()
        site = web.TCPSite(up, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]  # started just above
        gate = Gate(Route(state="ready", upstream=("127.0.0.1", port), gen=1))
        proxy = Proxy(ProxyConfig(listen="127.0.0.1:0"), gate, post=lambda o: None, emit=lambda n, **f: None)
        await proxy.start()
        assert proxy.address is not None
        base = f"http://127.0.0.1:{proxy.address[1]}"
        try:
            async with aiohttp.ClientSession() as s:
                in_flight = asyncio.create_task(s.post(base + "/v1/completions", json={}))
                await wait_async(lambda: proxy.in_flight() == 1)
                gate.publish(Route(state="reloading", hold=True, gen=1))
                held = asyncio.create_task(s.post(base + "/v1/completions", json={}))
                await wait_async(lambda: proxy.held() == 1)
                gate.publish(Route(state="stopping", reason="shutting down", closing=True, gen=1))
                r = await held
                assert r.status == 503 and r.headers["Retry-After"] and r.headers["Connection"] == "close"
                assert (await r.json())["error"]["message"] == "vsup is shutting down"
                r2 = await s.post(base + "/v1/completions", json={})
                assert r2.status == 503 and r2.headers["Connection"] == "close"
                assert not in_flight.done()
                release.set()
                r3 = await in_flight
                assert r3.status == 200 and await r3.json() == {"done": True}
                assert proxy.in_flight() == 0
        finally:
            await proxy.stop()
            await up.cleanup()

    asyncio.run(scenario())


async def wait_async(pred: Any, timeout: float = 5.0) -> None:
    end = asyncio.get_running_loop().time() + timeout
    while not pred():
        assert asyncio.get_running_loop().time() < end, "timed out"
        await asyncio.sleep(0.01)
