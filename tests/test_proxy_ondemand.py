"""Issue 16, the proxy's part, in-process (as tests/test_proxy.py: a Gate the test publishes routes
on, as the owner would, and real fake_api_server processes as upstreams): requests for another
configured model held while the loaded one's keep flowing, one Demand per route and model,
/health while off-loaded, the proxy's own /v1/models, and the activity the owner reads.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from test_proxy import CHAT, Fake, fakes  # noqa: F401 - fakes is a fixture used by name
from vsup.config import ProxyConfig
from vsup.gate import Demand, Gate, Route
from vsup.proxy import Proxy

pytestmark = pytest.mark.timeout(60)


@contextlib.asynccontextmanager
async def proxy(route: Route, models: tuple[str, ...] = ("a", "b"), **over: Any) -> AsyncIterator[Any]:
    api_key = over.pop("api_key", None)
    cfg = dataclasses.replace(ProxyConfig(listen="127.0.0.1:0"), **over)
    gate = Gate(route)
    posted: list[Any] = []
    p = Proxy(cfg, gate, post=posted.append, emit=lambda n, **f: None, models=models, api_key=api_key)
    await p.start()
    assert p.address is not None
    base = f"http://127.0.0.1:{p.address[1]}"
    session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30))
    try:
        yield p, gate, posted, base, session
    finally:
        await session.close()
        await p.stop()


def chat(session: aiohttp.ClientSession, base: str, model: str) -> Any:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    return session.post(base + CHAT, json=body)


async def until(pred: Any, what: str, timeout: float = 10) -> Any:
    end = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < end:
        if v := pred():
            return v
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


def ready(f: Fake, model: str, gen: int) -> Route:
    return Route(state="ready", upstream=f.upstream, gen=gen, model=model)


def test_other_model_is_held_while_the_loaded_ones_flow_then_released_to_its_server(fakes: Any) -> None:  # noqa: F811 - the imported fixture
    """swap_on_request: a request for b (configured, not loaded) is held and asks for b once;
    requests for a keep flowing meanwhile; when the owner publishes b's server, the held one
    goes there. A model nobody configured is forwarded as before (the server's own 404)."""
    fa, fb = fakes(name="a"), fakes(name="b")

    async def main() -> None:
        async with proxy(ready(fa, "a", 1), swap_on_request=True) as (p, gate, posted, base, s):
            held = [asyncio.create_task(chat(s, base, "b")) for _ in range(2)]
            await until(lambda: p.held() == 2, "two held for b")
            assert posted == [Demand("b")]
            assert set(p.waiting()) == {"b"}
            async with chat(s, base, "a") as r:
                assert r.status == 200
            async with chat(s, base, "zz") as r:
                assert r.status == 404  # not configured: forwarded, the server answers
            assert p.held() == 2 and not any(t.done() for t in held)
            gate.publish(Route(state="reloading", hold=True, model="a"))
            gate.publish(ready(fb, "b", 2))
            for t in held:
                r = await t
                assert r.status == 200 and (await r.json())["model"] == "b"
                r.close()
            assert p.held() == 0 and posted == [Demand("b")]
            assert p.last_activity_at("b") is not None and p.last_activity_at() is not None

    asyncio.run(main())


def test_requests_for_the_old_model_after_a_swap_ask_for_it_again(fakes: Any) -> None:  # noqa: F811 - the imported fixture
    """After the swap to b, a request for a is held and asks for a (a new route: a new Demand)."""
    fb = fakes(name="b")

    async def main() -> None:
        async with proxy(ready(fb, "b", 2), swap_on_request=True) as (p, gate, posted, base, s):
            t = asyncio.create_task(chat(s, base, "a"))
            await until(lambda: p.held() == 1, "held for a")
            assert posted == [Demand("a")]
            gate.publish(Route(state="stopped", hold=False))  # e.g. an operator's stop
            r = await t
            assert r.status == 503
            r.close()

    asyncio.run(main())


def test_a_request_held_before_the_off_load_route_asks_for_a_load() -> None:
    """A request that arrived during the off-load's teardown (held: stopping, no idle yet) posts
    its Demand when the route turns idle, not only requests that arrive later."""

    async def main() -> None:
        stopping = Route(state="stopping", reason="unload (idle)", hold=True, model="a")
        async with proxy(stopping, hold_timeout_s=30) as (p, gate, posted, base, s):
            t = asyncio.create_task(chat(s, base, "a"))
            await until(lambda: p.held() == 1, "held")
            assert posted == []
            gate.publish(Route(state="stopped", reason="idle", hold=True, idle=True, model="a"))
            await until(lambda: posted, "a Demand")
            assert posted == [Demand("a")]
            gate.publish(Route(state="stopped", hold=False))
            (await t).close()

    asyncio.run(main())


def test_health_is_200_while_off_loaded_and_503_when_stopped_by_an_operator() -> None:
    """An off-loaded server will serve after a load: /health 200 (a balancer that saw 503 would
    never send the request that wakes it). Stopped by an operator, failed: 503."""

    async def main() -> None:
        idle = Route(state="stopped", reason="idle", hold=True, idle=True, model="a")
        async with proxy(idle) as (p, gate, posted, base, s):
            async with s.get(base + "/health") as r:
                assert r.status == 200 and (await r.json()) == {
                    "state": "stopped",
                    "reason": "idle",
                    "idle": True,
                }
            gate.publish(Route(state="stopped", reason="operator stop"))
            async with s.get(base + "/health") as r:
                assert r.status == 503
            assert p.last_activity_at() is None  # /health is not a request for the model
            assert posted == []

    asyncio.run(main())


def test_models_lists_every_configured_model_with_which_is_loaded(fakes: Any) -> None:  # noqa: F811 - the imported fixture
    """swap_on_request: GET /v1/models through the proxy lists a and b, loaded or not, with
    `loaded` and `status`; vLLM's --api-key is demanded here too."""
    fa = fakes(name="a")

    async def main() -> None:
        async with proxy(ready(fa, "a", 1), swap_on_request=True, api_key="k1") as (p, gate, _, base, s):
            async with s.get(base + "/v1/models") as r:
                assert r.status == 401
            auth = {"Authorization": "Bearer k1"}
            async with s.get(base + "/v1/models", headers=auth) as r:
                data = (await r.json())["data"]
            assert [(m["id"], m["loaded"], m["status"]) for m in data] == [
                ("a", True, "loaded"),
                ("b", False, "unloaded"),
            ]
            gate.publish(Route(state="reloading", hold=True, model="b"))
            async with s.get(base + "/v1/models", headers=auth) as r:
                data = (await r.json())["data"]
            assert [(m["id"], m["status"]) for m in data] == [("a", "unloaded"), ("b", "loading")]
            assert p.last_activity_at() is None

    asyncio.run(main())


def test_without_swap_on_request_models_is_forwarded_and_nothing_is_held_by_model(fakes: Any) -> None:  # noqa: F811 - the imported fixture
    """Off by default: /v1/models is the server's, and a request for another name goes to it."""
    fa = fakes(name="a")

    async def main() -> None:
        async with proxy(ready(fa, "a", 1)) as (p, gate, posted, base, s):
            async with s.get(base + "/v1/models") as r:
                assert [m["id"] for m in (await r.json())["data"]] == ["a"]
            async with chat(s, base, "b") as r:
                assert r.status == 404
            assert posted == [] and p.waiting() == {}

    asyncio.run(main())
