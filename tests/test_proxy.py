"""The proxy (proxy.py) in front of tests/fakes/fake_api_server.py, with a Gate the test publishes
routes on, as the owner would. Each test runs one asyncio loop with the proxy in it; the fake
servers are real processes, so dying, hanging and 5xx-then-death are the real thing on a socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from yarl import URL

from support import FAKES, free_port, wait_for
from vsup import config as config_mod
from vsup.config import ConfigError, ProxyConfig, parse_listen
from vsup.gate import Demand, Gate, Route, UpstreamRefused, UpstreamStalled
from vsup.proxy import Proxy

pytestmark = pytest.mark.timeout(60)
CHAT = "/v1/chat/completions"


# ---- fakes ----------------------------------------------------------------------------------


class Fake:
    """One fake_api_server process on a free port."""

    def __init__(self, mode: str = "ok", name: str = "tiny", args: tuple[str, ...] = (), **env: str) -> None:
        self.port = free_port(18100, 18999)
        e = {**os.environ, "FAKE_VLLM_MODE": mode, **{f"FAKE_VLLM_{k.upper()}": v for k, v in env.items()}}
        self.proc = subprocess.Popen(
            [
                sys.executable,
                str(FAKES / "fake_api_server.py"),
                "--model",
                name,
                "--port",
                str(self.port),
                *args,
            ],
            env=e,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for(self._up, 20, f"fake server ({mode}) on {self.port}", interval=0.05)

    @property
    def upstream(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    def _up(self) -> bool:
        assert self.proc.poll() is None, "fake server exited at start"
        with socket.socket() as s:
            return s.connect_ex(self.upstream) == 0

    def stats(self) -> dict[str, Any]:
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/_stats", timeout=5) as r:
            return json.loads(r.read())

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)


@pytest.fixture
def fakes() -> Iterator[Any]:
    started: list[Fake] = []

    def make(mode: str = "ok", **kw: Any) -> Fake:
        f = Fake(mode, **kw)
        started.append(f)
        return f

    yield make
    for f in started:
        f.kill()


def ready(fake: Fake, gen: int = 1) -> Route:
    return Route(state="ready", upstream=fake.upstream, gen=gen, model="tiny")


HOLD = Route(state="starting", reason="loading", hold=True)


class Harness:
    def __init__(self, proxy: Proxy, gate: Gate, events: list[tuple[str, dict[str, Any]]], posted: list[Any]):
        self.proxy, self.gate, self.events, self.posted = proxy, gate, events, posted
        assert proxy.address is not None
        self.addr: tuple[str, int] = proxy.address
        self.base = f"http://127.0.0.1:{proxy.address[1]}"
        self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30))

    def names(self) -> list[str]:
        return [n for n, _ in self.events]

    async def until(self, pred: Any, what: str, timeout: float = 20) -> Any:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if v := pred():
                return v
            await asyncio.sleep(0.01)
        raise AssertionError(f"timed out waiting for {what}")

    async def chat(self, stream: bool = False, model: str = "tiny", **kw: Any) -> aiohttp.ClientResponse:
        body = {
            "model": model,
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 4,
            "stream": stream,
        }
        return await self.session.post(self.base + CHAT, json=body, **kw)


@contextlib.asynccontextmanager
async def running(route: Route, metrics: Any = None, **over: Any) -> AsyncIterator[Harness]:
    cfg = dataclasses.replace(ProxyConfig(listen="127.0.0.1:0"), **over)
    gate = Gate(route)
    events: list[tuple[str, dict[str, Any]]] = []
    posted: list[Any] = []
    proxy = Proxy(cfg, gate, post=posted.append, emit=lambda n, **f: events.append((n, f)), metrics=metrics)
    await proxy.start()
    h = Harness(proxy, gate, events, posted)
    try:
        yield h
    finally:
        await h.session.close()
        await proxy.stop()


def run(coro: Any) -> Any:
    return asyncio.run(coro)


async def sse_events(resp: aiohttp.ClientResponse) -> list[str]:
    text = (await resp.read()).decode()
    return [line[len("data: ") :] for line in text.split("\n\n") if line.startswith("data: ")]


# ---- transparent forwarding -----------------------------------------------------------------


def test_every_method_path_query_header_and_body_is_forwarded(fakes: Any) -> None:
    """PUT/DELETE/PATCH/POST/GET reach the server with path, query, headers and body; the
    server's status and headers come back."""
    f = fakes()

    async def main() -> None:
        async with running(ready(f)) as h:
            for method in ("PUT", "DELETE", "PATCH", "POST", "GET"):
                async with h.session.request(
                    method,
                    URL(h.base + "/_echo/a%20b?x=1&y=%2F", encoded=True),
                    data=b"\x00body\xff",
                    headers={"X-Custom": "v1"},
                ) as r:
                    assert r.status == 200
                    got = await r.json()
                assert got["method"] == method
                assert got["path"] == "/_echo/a%20b?x=1&y=%2F"
                hdrs = {k.lower(): v for k, v in got["headers"]}
                assert hdrs["x-custom"] == "v1"
                assert "127.0.0.1" in hdrs["x-forwarded-for"]
                assert got["body"] == "\x00body\xff"
            async with h.session.get(h.base + "/nope") as r:
                assert r.status == 404  # the server's own answer
            async with h.session.get(h.base + "/v1/models") as r:
                assert r.status == 200
                assert (await r.json())["data"][0]["id"] == "tiny"

    run(main())


def test_stream_is_forwarded_chunk_by_chunk_never_buffered(fakes: Any, tmp_path: Path) -> None:
    """The first SSE chunk reaches the client while the server still holds back the rest."""
    f = fakes()
    pause = tmp_path / "go"

    async def main() -> None:
        async with running(ready(f)) as h:
            async with await h.chat(stream=True, headers={"X-Fake-Pause": str(pause)}) as r:
                assert r.status == 200
                assert r.headers["Content-Type"].startswith("text/event-stream")
                first = await r.content.readuntil(b"\n\n")
                assert b"t0" in first  # arrived while the server waits for the pause file
                pause.touch()
                events = await sse_events(r)
            assert events[-1] == "[DONE]"
            assert len(events) == 4  # 3 more tokens, then [DONE]

    run(main())


def test_client_disconnect_aborts_the_upstream_request(fakes: Any) -> None:
    """A client that leaves mid-stream closes the proxy's upstream request: vLLM stops generating."""
    f = fakes(token_s="0.01")  # noqa: S106 - seconds per token, not a secret

    async def main() -> None:
        async with running(ready(f)) as h:
            body = {"model": "tiny", "messages": [], "max_tokens": 100000, "stream": True}
            r = await h.session.post(h.base + CHAT, json=body)
            await r.content.readuntil(b"\n\n")
            r.close()  # the client goes away
            await h.until(lambda: f.stats()["aborted"] == 1, "the fake to see its stream aborted")
            await h.until(lambda: h.proxy.in_flight() == 0, "the proxy to forget the request")

    run(main())


def test_keep_alive_on_both_sides(fakes: Any) -> None:
    """Five requests on one client connection use one upstream connection."""
    f = fakes()

    async def main() -> None:
        async with running(ready(f)) as h:
            before = f.stats()["connections"]
            reader, writer = await asyncio.open_connection(*h.addr)
            for _ in range(5):
                writer.write(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n")
                status = await reader.readline()
                assert status.startswith(b"HTTP/1.1 200"), status
                length = 0
                while (line := await reader.readline()) != b"\r\n":
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                await reader.readexactly(length)
            writer.close()
            # +1: the stats request itself
            assert f.stats()["connections"] - before == 2

    run(main())


# ---- health ---------------------------------------------------------------------------------


def test_health_is_answered_by_the_proxy_from_the_route(fakes: Any) -> None:
    """200 only while ready; 503 with state and reason otherwise, whatever the server says."""
    f = fakes()

    async def main() -> None:
        async with running(ready(f)) as h:
            async with h.session.get(h.base + "/health") as r:
                assert r.status == 200
                assert (await r.json())["state"] == "ready"
            h.gate.publish(Route(state="unhealthy", reason="canary timed out", hold=True))
            async with h.session.get(h.base + "/health") as r:
                assert r.status == 503
                assert await r.json() == {"state": "unhealthy", "reason": "canary timed out"}
            assert f.stats()["requests"] == 0

    run(main())


def test_local_path_hook_for_later_endpoints() -> None:
    """add_local() answers a path in the proxy (for /livez, /readyz, /startupz later)."""

    async def main() -> None:
        cfg = ProxyConfig(listen="127.0.0.1:0")
        p = Proxy(cfg, Gate(), post=lambda o: None, emit=lambda n, **f: None)

        async def livez(request: Any) -> Any:
            return aiohttp.web.Response(text="alive")

        p.add_local("/livez", livez)
        await p.start()
        try:
            assert p.address is not None
            async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{p.address[1]}/livez") as r:
                assert (r.status, await r.text()) == (200, "alive")
        finally:
            await p.stop()

    run(main())


# ---- hold -----------------------------------------------------------------------------------


def test_held_requests_are_released_in_arrival_order_when_a_server_is_ready(fakes: Any) -> None:
    """Requests that arrive while a server starts wait, then go to it in arrival order; status
    shows them held; one hold and one release event."""
    f = fakes()

    async def main() -> None:
        async with running(HOLD) as h:
            order: list[int] = []
            forward = h.proxy._forward

            async def recording(request: Any, req: Any, body: bytes, route: Route) -> Any:
                order.append(int(request.headers["X-Req"]))
                return await forward(request, req, body, route)

            h.proxy._forward = recording  # type: ignore[method-assign]  # a recording wrapper
            tasks = []
            for i in range(1, 6):
                tasks.append(asyncio.create_task(h.chat(headers={"X-Req": str(i)})))
                await h.until(lambda i=i: h.proxy.held() == i, f"{i} held")
            st = h.proxy.stats()
            assert st["held"] == 5 and st["oldest_held_s"] is not None and (h.proxy.oldest_held_s() or 0) >= 0
            h.gate.publish(ready(f))
            for t in tasks:
                r = await t
                assert r.status == 200
                r.close()
            assert order == [1, 2, 3, 4, 5]
            assert h.proxy.held() == 0 and h.proxy.oldest_held_s() is None
            assert h.proxy.last_success_at() is not None
            await h.until(lambda: "proxy_release" in h.names(), "the release event")
            assert h.names().count("proxy_hold") == 1
            rel = dict(h.events)["proxy_release"]
            assert rel["released"] == 5 and rel["gen"] == 1

    run(main())


def test_hold_survives_intermediate_routes_that_still_hold(fakes: Any) -> None:
    """starting -> unhealthy -> reloading (all holding) keeps the request waiting, not failing."""
    f = fakes()

    async def main() -> None:
        async with running(HOLD) as h:
            t = asyncio.create_task(h.chat())
            await h.until(lambda: h.proxy.held() == 1, "held")
            for state in ("unhealthy", "stopping", "starting"):
                h.gate.publish(Route(state=state, reason=state, hold=True))
                await asyncio.sleep(0)
            assert not t.done()
            h.gate.publish(ready(f, gen=7))
            r = await t
            assert r.status == 200

    run(main())


def test_hold_timeout_answers_503_with_retry_after_in_openai_shape() -> None:
    """A held request that outlasts hold_timeout_s gets 503 + Retry-After, and an event."""

    async def main() -> None:
        async with running(HOLD, hold_timeout_s=0.2, retry_after_s=7) as h:
            async with await h.chat() as r:
                assert r.status == 503
                assert r.headers["Retry-After"] == "7"
                err = (await r.json())["error"]
            assert set(err) >= {"message", "type", "param", "code"}
            assert err["code"] == 503 and err["state"] == "starting"
            assert "proxy_hold_timeout" in h.names()
            assert h.proxy.held() == 0

    run(main())


def test_past_max_held_a_request_gets_503_at_once() -> None:
    """max_held requests wait; the next one is answered 503 while they still wait."""

    async def main() -> None:
        async with running(HOLD, max_held=2, hold_timeout_s=30) as h:
            waiting = [asyncio.create_task(h.chat()) for _ in range(2)]
            await h.until(lambda: h.proxy.held() == 2, "two held")
            async with await h.chat() as r:
                assert r.status == 503 and "Retry-After" in r.headers
                assert "max_held" in (await r.json())["error"]["message"]
            assert h.proxy.held() == 2 and not any(t.done() for t in waiting)
            assert "proxy_hold_full" in h.names()
            h.gate.publish(Route(state="failed", reason="gave up", hold=False))
            for t in waiting:
                assert (await t).status == 503

    run(main())


def test_failed_or_stopped_refuses_at_once_with_state_and_reason() -> None:
    """hold=False (failed, or stopped by an operator): 503 now, saying why."""

    async def main() -> None:
        async with running(Route(state="failed", reason="5 failures in 600s", hold=False)) as h:
            async with await h.chat() as r:
                assert r.status == 503
                err = (await r.json())["error"]
            assert err["state"] == "failed" and err["reason"] == "5 failures in 600s"
            assert h.proxy.held() == 0

    run(main())


def test_idle_route_posts_demand_once() -> None:
    """A request held while the server is off-loaded asks the owner for it (one Demand)."""

    async def main() -> None:
        async with running(Route(state="stopped", hold=True, idle=True), hold_timeout_s=30) as h:
            tasks = [asyncio.create_task(h.chat(model="tiny")) for _ in range(3)]
            await h.until(lambda: h.proxy.held() == 3, "held")
            assert h.posted == [Demand("tiny")]
            h.gate.publish(Route(state="stopped", hold=False))
            for t in tasks:
                (await t).close()

    run(main())


def test_held_request_for_a_model_the_new_server_lacks_gets_its_404(fakes: Any) -> None:
    """A held request goes to the new server even when it serves another model: its own 404."""
    other = fakes(name="other")

    async def main() -> None:
        async with running(HOLD) as h:
            t = asyncio.create_task(h.chat(model="tiny"))
            await h.until(lambda: h.proxy.held() == 1, "held")
            h.gate.publish(ready(other, gen=2))
            async with await t as r:
                assert r.status == 404
                assert "does not exist" in (await r.json())["error"]["message"]

    run(main())


# ---- replay ---------------------------------------------------------------------------------


async def _withdraw_then(h: Harness, dead: Fake, new: Route) -> None:
    """The owner's part: the server died (vsup saw it), hold, then the next one is ready."""
    await h.until(lambda: dead.proc.poll() is not None, "the fake to die")
    h.gate.publish(Route(state="starting", reason="restart", hold=True, gen=new.gen))
    await asyncio.sleep(0.05)
    h.gate.publish(new)


def test_non_streaming_request_is_replayed_when_its_server_dies_unanswered(fakes: Any) -> None:
    """The server exits before answering: the client gets the next server's answer, no error."""
    a, b = fakes("die_mid_stream"), fakes()

    async def main() -> None:
        async with running(ready(a)) as h:
            t = asyncio.create_task(h.chat())
            await _withdraw_then(h, a, ready(b, gen=2))
            async with await t as r:
                assert r.status == 200
                assert (await r.json())["choices"]
            assert h.names().count("proxy_replay") == 1
            assert b.stats()["completed"] == 1

    run(main())


def test_stream_whose_headers_came_but_no_token_is_replayed(fakes: Any) -> None:
    """vLLM sends a stream's 200 before its first token; the proxy held it back, so a death
    before the first token is replayed and the client sees one whole stream."""
    a, b = fakes("die_mid_stream", die_after_chunks="0"), fakes()

    async def main() -> None:
        async with running(ready(a)) as h:
            t = asyncio.create_task(h.chat(stream=True))
            await _withdraw_then(h, a, ready(b, gen=2))
            async with await t as r:
                assert r.status == 200
                events = await sse_events(r)
            assert events[-1] == "[DONE]" and not any('"error"' in e for e in events)

    run(main())


def test_5xx_followed_by_the_servers_withdrawal_counts_as_nothing_sent(fakes: Any) -> None:
    """vLLM answers 500 when its engine dies; the owner withdraws the route moments later: the
    500 is never shown, the request is replayed."""
    a, b = fakes("error_then_die"), fakes()

    async def main() -> None:
        async with running(ready(a), replay_window_s=30) as h:
            t = asyncio.create_task(h.chat(stream=True))
            await _withdraw_then(h, a, ready(b, gen=2))
            async with await t as r:
                assert r.status == 200
                assert (await sse_events(r))[-1] == "[DONE]"
            assert dict(h.events)["proxy_replay"]["gen"] == 1

    run(main())


def test_stream_whose_first_event_is_an_error_from_a_dying_server_is_replayed(fakes: Any) -> None:
    """vLLM 0.32 answers a stream in flight when its engine dies with 200 and an error event as
    the first bytes; the owner withdraws the server moments later: the client gets the next
    server's whole stream, no error."""
    a, b = fakes("sse_error_then_die"), fakes()

    async def main() -> None:
        async with running(ready(a), replay_window_s=30) as h:
            t = asyncio.create_task(h.chat(stream=True))
            await _withdraw_then(h, a, ready(b, gen=2))
            async with await t as r:
                events = await sse_events(r)
            assert events[-1] == "[DONE]" and not any('"error"' in e for e in events)
            assert h.names().count("proxy_replay") == 1

    run(main())


def test_a_streams_error_event_from_a_server_that_stays_is_forwarded(fakes: Any) -> None:
    a = fakes("sse_error_then_die", die_after_s="3600")

    async def main() -> None:
        async with running(ready(a), replay_window_s=0.2) as h, await h.chat(stream=True) as r:
            events = await sse_events(r)
            assert json.loads(events[0])["error"]["message"].startswith("EngineCore")

    run(main())


def test_5xx_from_a_server_that_stays_ready_is_its_answer(fakes: Any) -> None:
    """A 5xx whose server is not withdrawn within replay_window_s reaches the client as sent."""
    a = fakes("error_then_die", die_after_s="3600")

    async def main() -> None:
        async with running(ready(a), replay_window_s=0.2) as h:
            async with await h.chat() as r:
                assert r.status == 500
                assert (await r.json())["error"]["message"] == "EngineDeadError"
            assert "proxy_replay" not in h.names()

    run(main())


def test_stream_cut_midway_ends_with_an_sse_error_event_and_a_clean_close(fakes: Any) -> None:
    """Two tokens reached the client, then the server died: no replay (the client has bytes);
    the stream ends with an error event, and the response completes without a protocol error."""
    a = fakes("die_mid_stream", die_after_chunks="2")

    async def main() -> None:
        async with running(ready(a)) as h:
            async with await h.chat(stream=True) as r:
                assert r.status == 200
                events = await sse_events(r)  # reads to the clean end, or raises
            assert len(events) == 3
            assert json.loads(events[-1])["error"]["code"] == 502
            assert "proxy_replay" not in h.names() and "proxy_cut" in h.names()

    run(main())


def test_non_stream_cut_after_its_first_bytes_is_closed_not_completed() -> None:
    """A plain response that dies after its status and first bytes cannot be replayed or
    turned into a 502 (its status is out): the client's connection is closed, so it sees a
    truncated body, never a completed one; the proxy serves the next request."""

    async def main() -> None:
        async def partial(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{")
            await writer.drain()
            await asyncio.sleep(0.05)
            writer.close()

        srv = await asyncio.start_server(partial, "127.0.0.1", 0)
        port = srv.sockets[0].getsockname()[1]
        try:
            async with running(Route(state="ready", upstream=("127.0.0.1", port), gen=1)) as h:
                with pytest.raises(aiohttp.ClientPayloadError):
                    async with h.session.get(h.base + "/v1/models") as r:
                        assert r.status == 200
                        await r.read()
                assert "proxy_cut" in h.names() and "proxy_replay" not in h.names()
                async with h.session.get(h.base + "/health") as r:
                    assert r.status == 200
        finally:
            srv.close()

    run(main())


@pytest.mark.parametrize("stream", [False, True])
def test_hung_server_torn_down_replays_what_had_no_byte(fakes: Any, stream: bool) -> None:
    """A hung server (no first byte; a stream's headers only) is killed by the owner's teardown:
    the request is replayed on the next server."""
    a, b = fakes("hang"), fakes()

    async def main() -> None:
        async with running(ready(a)) as h:
            t = asyncio.create_task(h.chat(stream=stream))
            await h.until(lambda: h.proxy.in_flight(1) == 1, "the request in flight")
            h.gate.publish(Route(state="unhealthy", reason="canary timed out", hold=True, gen=1))
            await asyncio.sleep(0.05)
            assert not t.done()  # in flight requests are never cut by a route change
            a.kill()  # the teardown
            await _withdraw_then(h, a, ready(b, gen=2))
            async with await t as r:
                assert r.status == 200
                await r.read()
            assert h.names().count("proxy_replay") == 1

    run(main())


def test_a_request_is_replayed_once_then_502(fakes: Any) -> None:
    """Two servers die under the same request: the second failure is a 502 JSON error."""
    a, b = fakes("die_mid_stream"), fakes("die_mid_stream")

    async def main() -> None:
        async with running(ready(a)) as h:
            t = asyncio.create_task(h.chat())
            await _withdraw_then(h, a, ready(b, gen=2))
            await h.until(lambda: b.proc.poll() is not None, "the second fake to die")
            h.gate.publish(Route(state="starting", reason="restart", hold=True, gen=3))
            async with await t as r:
                assert r.status == 502
                err = (await r.json())["error"]
            assert "replayed once" in err["message"]
            assert [f["withdrawn"] for n, f in h.events if n == "proxy_replay"] == [True]

    run(main())


class Scripted:
    """A raw HTTP server that treats each connection by the next entry of `script`: "close"
    (read the request, close unanswered: a keep-alive connection the server was closing),
    "hang" (read it, never answer, until `release()` closes every such connection: a hung
    tree's teardown), "ok" (a JSON 200). It stays up throughout."""

    def __init__(self, *script: str) -> None:
        self.script, self.seen = list(script), 0
        self.hung: list[asyncio.StreamWriter] = []
        self.hanging = asyncio.Event()
        self.srv: asyncio.Server | None = None

    async def __aenter__(self) -> Scripted:
        self.srv = await asyncio.start_server(self._conn, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.srv is not None
        self.srv.close()
        self.release()

    def route(self, gen: int) -> Route:
        assert self.srv is not None
        return Route(state="ready", upstream=("127.0.0.1", self.srv.sockets[0].getsockname()[1]), gen=gen)

    def release(self) -> None:
        for w in self.hung:
            w.close()

    async def _conn(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        what = self.script.pop(0) if self.script else "ok"
        self.seen += 1
        head = await reader.readuntil(b"\r\n\r\n")
        n = next(
            (int(x.split(b":")[1]) for x in head.split(b"\r\n") if x.lower().startswith(b"content-length")), 0
        )
        await reader.readexactly(n)
        if what == "close":
            writer.close()
        elif what == "hang":
            self.hung.append(writer)
            self.hanging.set()
        else:
            body = b'{"choices": [{"text": "ok"}]}'
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n"
                + f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
            await writer.drain()
            writer.close()


def test_a_server_that_stays_up_and_closes_unanswered_gets_the_request_once_more() -> None:
    """A connection closed unanswered by a server that is not withdrawn (a keep-alive race):
    re-sent to the same server once, answered; not counted as the replay a death needs."""

    async def main() -> None:
        async with Scripted("close") as up, running(up.route(1), replay_window_s=0.2) as h:
            async with await h.chat() as r:
                assert r.status == 200, await r.text()
            assert up.seen == 2
            (ev,) = [f for n, f in h.events if n == "proxy_replay"]
            assert ev["withdrawn"] is False and ev["gen"] == 1

    run(main())


def test_a_keep_alive_race_then_a_hang_teardown_still_replays_on_the_next_server(fakes: Any) -> None:
    """The CI case: the first send fails on a server that stays up; the re-send hangs there and
    is cut by the hang's teardown: the request is still replayed on the next server, 200."""
    b = fakes()

    async def main() -> None:
        async with Scripted("close", "hang") as up, running(up.route(1), replay_window_s=0.2) as h:
            t = asyncio.create_task(h.chat(stream=True))
            await asyncio.wait_for(up.hanging.wait(), 10)
            h.gate.publish(Route(state="unhealthy", reason="hang", hold=True, gen=1))
            up.release()  # the teardown
            await h.until(lambda: h.proxy.held() == 1, "the replay held")
            h.gate.publish(ready(b, gen=2))
            async with await t as r:
                assert r.status == 200
                assert (await sse_events(r))[-1] == "[DONE]"
            evs = [f for n, f in h.events if n == "proxy_replay"]
            assert [e["withdrawn"] for e in evs] == [False, True]
            assert "proxy_failed" not in h.names()

    run(main())


def test_a_server_that_stays_up_and_closes_twice_answers_502_and_says_so() -> None:
    async def main() -> None:
        async with Scripted("close", "close") as up, running(up.route(1), replay_window_s=0.2) as h:
            async with await h.chat() as r:
                assert r.status == 502
                assert "re-sent once to this server" in (await r.json())["error"]["message"]
            assert up.seen == 2
            (ev,) = [f for n, f in h.events if n == "proxy_failed"]
            assert ev["attempts"] == 2 and ev["status"] == 502
            assert h.proxy.stats()["failed"] == 1

    run(main())


def test_idle_upstream_connections_are_closed_by_the_proxy_before_vllms_keep_alive() -> None:
    """upstream_keepalive_s: the proxy, not the server, closes an idle pooled connection (the
    server here keeps it open for ever and sees the proxy's EOF)."""

    async def main() -> None:
        closed = asyncio.Event()

        async def keep(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()
            if await reader.read() == b"":  # EOF: the proxy closed it
                closed.set()

        srv = await asyncio.start_server(keep, "127.0.0.1", 0)
        port = srv.sockets[0].getsockname()[1]
        try:
            route = Route(state="ready", upstream=("127.0.0.1", port), gen=1)
            async with running(route, upstream_keepalive_s=0.3) as h:
                async with h.session.get(h.base + "/v1/models") as r:
                    assert await r.read() == b"ok"
                t0 = time.monotonic()
                await asyncio.wait_for(closed.wait(), 10)
                assert time.monotonic() - t0 < 5  # the proxy's 0.3 s, not some later close
        finally:
            srv.close()

    run(main())


def test_replay_off_answers_502_at_once(fakes: Any) -> None:
    a = fakes("die_mid_stream")

    async def main() -> None:
        async with running(ready(a), replay=False) as h, await h.chat() as r:
            assert r.status == 502
            assert (await r.json())["error"]["type"] == "BadGateway"

    run(main())


def test_refused_connection_is_posted_and_replayed_on_the_next_server(fakes: Any) -> None:
    """The route points at a port nobody listens on: UpstreamRefused is posted, the request is
    replayed when the owner publishes the next server."""
    b = fakes()
    dead = ("127.0.0.1", free_port(19000, 19999))

    async def main() -> None:
        async with running(Route(state="ready", upstream=dead, gen=3), replay_window_s=30) as h:
            t = asyncio.create_task(h.chat())
            await h.until(lambda: h.posted, "an observation")
            assert isinstance(h.posted[0], UpstreamRefused) and h.posted[0].gen == 3
            assert h.proxy.held() == 1  # waiting for another server than gen 3
            h.gate.publish(ready(b, gen=4))
            async with await t as r:
                assert r.status == 200

    run(main())


def test_every_stream_stalled_is_posted_once_to_the_owner(fakes: Any, tmp_path: Path) -> None:
    """A stream whose server stops sending (here: pauses after its first token) for stall_s is
    told to the owner once, as UpstreamStalled for its tree; the stream itself goes on."""
    f = fakes()
    pause = tmp_path / "go"

    async def main() -> None:
        async with (
            running(ready(f, gen=5), stall_s=0.3) as h,
            await h.chat(stream=True, headers={"X-Fake-Pause": str(pause)}) as r,
        ):
            await r.content.readuntil(b"\n\n")
            await h.until(lambda: h.posted, "an observation")
            await asyncio.sleep(0.5)  # a second look must not post it again
            assert [type(o) for o in h.posted] == [UpstreamStalled] and h.posted[0].gen == 5
            pause.touch()
            assert (await sse_events(r))[-1] == "[DONE]"

    run(main())


def test_a_tree_stalled_again_after_its_stalled_streams_ended_is_posted_again(
    fakes: Any, tmp_path: Path
) -> None:
    """Issue 17: the owner clears a stall strike that a stack check disproves; once those streams
    are gone (their clients left), a new stall of the same tree is a new strike, not a repeat
    (a new stream's first byte is fresh, so the next look forgets the old stall)."""
    f = fakes()

    async def main() -> None:
        async with running(ready(f, gen=5), stall_s=0.3) as h:
            for i in range(2):
                pause = tmp_path / f"go{i}"
                async with await h.chat(stream=True, headers={"X-Fake-Pause": str(pause)}) as r:
                    await r.content.readuntil(b"\n\n")
                    await h.until(lambda i=i: len(h.posted) == i + 1, "an observation")
                await h.until(lambda: h.proxy.in_flight() == 0, "the abandoned stream gone")
            assert [(type(o), o.gen) for o in h.posted] == [(UpstreamStalled, 5)] * 2
        for i in range(2):
            (tmp_path / f"go{i}").touch()  # the fake server's paused handlers end

    run(main())


# ---- api key --------------------------------------------------------------------------------


def test_client_api_key_passes_through(fakes: Any) -> None:
    f = fakes(args=("--api-key", "sekrit"))

    async def main() -> None:
        async with running(ready(f)) as h:
            async with await h.chat(headers={"Authorization": "Bearer sekrit"}) as r:
                assert r.status == 200
            async with await h.chat() as r:
                assert r.status == 401
            assert not any("sekrit" in json.dumps(e) for e in h.events)

    run(main())


def test_api_key_is_found_as_vllm_finds_it() -> None:
    from vsup.probes import api_key

    assert api_key([], {}, {}) is None
    assert api_key(["-tp", "2", "--api-key", "k1", "k2", "--dtype", "x"], {}, {}) == "k1"
    assert api_key(["--api-key=a", "--api-key", "b"], {}, {}) == "b"  # the last one wins
    assert api_key([], {"VLLM_API_KEY": "e"}, {"VLLM_API_KEY": "inherited"}) == "e"
    assert api_key([], {}, {"VLLM_API_KEY": "inherited"}) == "inherited"
    assert api_key(["--api-key", "cli"], {"VLLM_API_KEY": "e"}, {}) == "cli"  # as vLLM: the flag first


def test_probes_send_the_api_key(fakes: Any) -> None:
    """A server started with --api-key: models and canary probes pass with the key, fail without."""
    from vsup.probes import Prober

    f = fakes(args=("--api-key", "sekrit"))

    async def main() -> None:
        good = Prober("127.0.0.1", f.port, timeout_s=5, api_key="sekrit")
        bad = Prober("127.0.0.1", f.port, timeout_s=5)
        try:
            assert (await good.models("tiny")).ok
            assert (await good.canary("tiny", "Say OK.", 4, 5)).ok
            assert (await good.health()).ok
            assert not (await bad.models("tiny")).ok
            c = await bad.canary("tiny", "Say OK.", 4, 5)
            assert not c.ok and "401" in c.detail and "sekrit" not in c.detail
        finally:
            await good.aclose()
            await bad.aclose()

    run(main())


def test_incident_bundles_never_hold_the_api_key(tmp_path: Path) -> None:
    """The key given as --api-key (or VLLM_API_KEY) is scrubbed from every file of a bundle:
    the config copy, the tree's command lines and vLLM's own log lines, which print it."""
    from support import write_config
    from vsup import incidents

    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    p = write_config(
        tmp_path / "c.toml",
        {
            "vllm": {"python": sys.executable, "model": "m", "args": ["-tp", "2", "--api-key", "sk-abcdef"]},
            "daemon": {"state_dir": str(state), "socket": str(tmp_path / "s.sock")},
            "models.b": {"model": "b", "env": {"VLLM_API_KEY": "sk-fromenv"}},
        },
    )
    cfg = config_mod.load(p)

    class Tree:
        def to_json(self) -> dict[str, Any]:
            return {"cmdline": ["python", "-m", "vllm", "--api-key", "sk-abcdef"]}

    path = incidents.write_bundle(
        cfg,
        reason="r",
        kind="exited",
        lines=["INFO non-default args: {'api_key': ['sk-abcdef'], 'x': 'sk-fromenv'}"],
        tree=Tree(),
        events=[],
        cleanup=None,
        vllm_version=None,
    )
    assert path is not None
    files = {f.name: f.read_text() for f in path.iterdir()}
    assert {"config.toml", "tree.json", "log_tail.txt"} <= set(files)
    assert not [n for n, t in files.items() if "sk-abcdef" in t or "sk-fromenv" in t]
    assert "<redacted>" in files["config.toml"] and "<redacted>" in files["tree.json"]


# ---- bad input ------------------------------------------------------------------------------


async def _raw(h: Harness, data: bytes, *, read: bool = True) -> bytes:
    reader, writer = await asyncio.open_connection(*h.addr)
    writer.write(data)
    out = await asyncio.wait_for(reader.read(), 20) if read else b""
    writer.close()
    return out


def test_malformed_http_gets_400(fakes: Any) -> None:
    f = fakes()

    async def main() -> None:
        async with running(ready(f)) as h:
            out = await _raw(h, b"GARBAGE \x00\x01 nonsense\r\n\r\n")
            assert out.split(b" ")[1] == b"400", out[:80]
            assert f.stats()["requests"] == 0

    run(main())


def test_oversized_body_gets_413_declared_or_chunked(fakes: Any) -> None:
    f = fakes()

    async def main() -> None:
        async with running(ready(f), max_body_bytes=1024) as h:
            out = await _raw(h, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n")
            assert out.startswith(b"HTTP/1.1 413"), out[:80]
            chunk = b"800\r\n" + b"x" * 0x800 + b"\r\n"
            out = await _raw(
                h, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" + chunk
            )
            assert out.startswith(b"HTTP/1.1 413"), out[:80]
            assert b'"error"' in out

    run(main())


def test_slow_body_gets_408_and_slow_headers_are_closed(fakes: Any) -> None:
    f = fakes()

    async def main() -> None:
        async with running(ready(f), body_timeout_s=0.3, idle_timeout_s=0.3) as h:
            out = await _raw(h, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nabc")
            assert out.startswith(b"HTTP/1.1 408"), out[:80]
            out = await _raw(h, b"GET /v1/mod")  # headers never finished: closed, nothing sent
            assert out == b""

    run(main())


def test_connections_past_the_cap_get_503_and_close(fakes: Any) -> None:
    """Idle connections up to max_connections are kept; one more is answered 503 and closed,
    and the proxy still serves once they go."""
    f = fakes()

    async def main() -> None:
        async with running(ready(f), max_connections=3) as h:
            idle = [await asyncio.open_connection(*h.addr) for _ in range(3)]
            await h.until(lambda: h.proxy.stats()["connections"] == 3, "three connections")
            out = await _raw(h, b"")
            assert out.startswith(b"HTTP/1.1 503"), out[:80]
            for _r, w in idle:
                w.close()
            await h.until(lambda: h.proxy.stats()["connections"] == 0, "connections gone")
            async with h.session.get(h.base + "/v1/models") as r:
                assert r.status == 200

    run(main())


def test_connection_cap_stays_below_the_fd_limit() -> None:
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert Proxy._connection_cap(10**9) <= (soft - 256) // 2


def test_port_in_use_never_raises_and_binds_when_free() -> None:
    """The proxy's failure is its own: an event, retries, and no exception to the owner."""

    async def main() -> None:
        blocker = socket.socket()
        blocker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        port = blocker.getsockname()[1]
        events: list[str] = []
        p = Proxy(
            ProxyConfig(listen=f"127.0.0.1:{port}"),
            Gate(),
            post=lambda o: None,
            emit=lambda n, **f: events.append(n),
        )
        p.bind_retry_s = 0.05
        await p.start()  # does not raise
        try:
            assert events == ["proxy_error"] and not p.bound.is_set()
            blocker.close()
            await asyncio.wait_for(p.bound.wait(), 20)
            assert "proxy_listening" in events
        finally:
            await p.stop()

    run(main())


# ---- metrics --------------------------------------------------------------------------------


def test_metrics_held_hold_time_replays_rejections(fakes: Any) -> None:
    from vsup.metrics import Metrics

    m = Metrics()
    if not m.available:
        pytest.skip("prometheus-client not installed")
    a, b = fakes("die_mid_stream"), fakes()

    def val(name: str, **labels: str) -> float | None:
        return m.registry.get_sample_value(name, labels)

    async def main() -> None:
        async with running(HOLD, metrics=m) as h:
            t = asyncio.create_task(h.chat())
            await h.until(lambda: val("vsup_proxy_held_requests") == 1, "held gauge 1")
            h.gate.publish(ready(a))
            await _withdraw_then(h, a, ready(b, gen=2))
            (await t).close()
            h.gate.publish(Route(state="failed", hold=False))
            (await h.chat()).close()
        assert val("vsup_proxy_held_requests") == 0
        assert val("vsup_proxy_hold_seconds_count") == 2  # held at first, and again for the replay
        assert val("vsup_proxy_replays_total") == 1
        assert val("vsup_proxy_rejections_total", reason="refused") == 1
        assert val("vsup_proxy_in_flight_requests") == 0

    run(main())


# ---- config ---------------------------------------------------------------------------------


def _cfg(tmp_path: Path, proxy: dict[str, Any], **vllm: Any) -> Any:
    from support import write_config

    p = write_config(
        tmp_path / "c.toml",
        {
            "vllm": {"python": sys.executable, "model": "m", "port": 8000, **vllm},
            "daemon": {"metrics_port": 9100},
            "proxy": proxy,
        },
    )
    return config_mod.load(p)


def test_config_proxy_section(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, {"listen": "0.0.0.0:8080", "hold_timeout_s": 30})
    assert cfg.proxy.listen == "0.0.0.0:8080" and cfg.proxy.hold_timeout_s == 30.0 and cfg.proxy.replay
    assert config_mod.warnings(cfg) == []
    assert parse_listen("[::1]:80") == ("::1", 80)
    assert parse_listen("my-host:80") == ("my-host", 80)
    for bad in ("8080", "::1:80", "h:0", "h:99999", ":80"):
        with pytest.raises(ValueError):
            parse_listen(bad)
    with pytest.raises(ConfigError, match="proxy.listen.*vllm.port"):
        _cfg(tmp_path, {"listen": "10.0.0.1:8000"})
    with pytest.raises(ConfigError, match="proxy.listen.*metrics_port"):
        _cfg(tmp_path, {"listen": "[::]:9100"})
    with pytest.raises(ConfigError, match="proxy.listen"):
        _cfg(tmp_path, {"listen": "nope"})
    with pytest.raises(ConfigError, match="proxy.listen: required"):
        _cfg(tmp_path, {"max_held": 3})
    with pytest.raises(ConfigError, match="proxy.max_held"):
        _cfg(tmp_path, {"listen": "127.0.0.1:8080", "max_held": 0})
    w = config_mod.warnings(_cfg(tmp_path, {"listen": "127.0.0.1:8080"}, host="0.0.0.0"))  # noqa: S104 - the warning under test
    assert len(w) == 1 and "vllm.host" in w[0] and "loopback" in w[0]
    explained = config_mod.explain()
    for f in dataclasses.fields(ProxyConfig):
        assert f"  {f.name} = " in explained.split("[proxy]")[1]


def test_config_upstream_keepalive_must_be_below_vllms(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """vLLM's keep-alive as vLLM will get it ([vllm].env, or this environment): vsup's idle
    upstream connections must close first; a value vLLM cannot read is named."""
    monkeypatch.delenv("VLLM_HTTP_TIMEOUT_KEEP_ALIVE", raising=False)
    listen = {"listen": "127.0.0.1:8080"}
    assert _cfg(tmp_path, listen).proxy.upstream_keepalive_s == 4.0  # vLLM's default is 5
    with pytest.raises(ConfigError, match=r"proxy.upstream_keepalive_s: 4 must be below .*=3 \(vllm.env\)"):
        _cfg(tmp_path, listen, env={"VLLM_HTTP_TIMEOUT_KEEP_ALIVE": "3"})
    assert _cfg(tmp_path, {**listen, "upstream_keepalive_s": 2.5}, env={"VLLM_HTTP_TIMEOUT_KEEP_ALIVE": "3"})
    with pytest.raises(ConfigError, match="vllm.env: VLLM_HTTP_TIMEOUT_KEEP_ALIVE='5s'"):
        _cfg(tmp_path, listen, env={"VLLM_HTTP_TIMEOUT_KEEP_ALIVE": "5s"})
    monkeypatch.setenv("VLLM_HTTP_TIMEOUT_KEEP_ALIVE", "4")
    with pytest.raises(ConfigError, match=r"=4 \(the environment\)"):
        _cfg(tmp_path, listen)


def test_without_proxy_section_nothing_changes(tmp_path: Path) -> None:
    from support import write_config

    p = write_config(
        tmp_path / "c.toml",
        {"vllm": {"python": sys.executable, "model": "m", "host": "0.0.0.0"}},  # noqa: S104 - the case under test
    )
    cfg = config_mod.load(p)
    assert cfg.proxy is None and config_mod.warnings(cfg) == []
