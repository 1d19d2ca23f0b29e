"""The HTTP proxy in front of vLLM: clients see a delay, never an error.

Clients connect to ``[proxy].listen``; the proxy forwards every method and path to the server
the owner has proven ready (``gate.route.upstream``), and holds requests while a server is
coming (``route.hold``). It never writes state: it reads routes, posts observations and lets the
owner read its numbers through the ``gate.Traffic`` methods.

Decisions, and why:
- **Hold in arrival order.** A request that finds no upstream waits on ``gate.changed()``;
  ``asyncio.Event`` wakes its waiters in the order they started waiting, so a published route
  releases held requests in arrival order. Bounded by ``hold_timeout_s`` (from the moment the
  request is held) and ``max_held``; past either, 503 + Retry-After in OpenAI's error shape.
  llama-swap parks requests the same way; unlike it, nothing is released before the owner's
  canary has proven the new server (the owner publishes an upstream only then).
- **Replay only when the client got nothing** (nginx ``proxy_next_upstream``'s rule). The
  status line is held back until the first body byte: vLLM sends a stream's 200 headers before
  its first token, and those headers must not commit us to a server that then dies. A 5xx is
  kept back too (it is small) for up to ``replay_window_s``: vLLM answers requests in flight
  with a 500 when its engine dies, and if the owner then withdraws that server's route, the 500
  was the death, not the answer, and the request is replayed. One replay per request after a
  server is withdrawn (the request may be what killed it), and one re-send to a server that
  stays up but closed the connection unanswered (a keep-alive race: no death, so it must not
  use up the replay). Idle upstream connections close before vLLM's keep-alive ends
  (``upstream_keepalive_s``), as nginx's upstream ``keepalive_timeout`` should.
- **Never buffered.** After the first byte every chunk is written as it arrives
  (``StreamResponse.write`` applies the client's back-pressure). A client that disconnects
  cancels its handler (``handler_cancellation=True``), which closes the upstream connection, so
  vLLM aborts the request and stops generating.
- **In-flight requests are never cut by a route change.** A reload withdraws the route at once
  (new requests are held) but lets the old server finish what it has; a torn-down server's
  connections die and what had sent nothing is replayed.
- **The proxy's failure is its own.** Every handler catches its own errors (a 502, logged);
  a listen socket that cannot be bound is retried; nothing here raises into the owner.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import resource
import time
from collections.abc import Awaitable, Callable, Collection
from typing import Any

import aiohttp
from aiohttp import web
from yarl import URL

from .config import ProxyConfig, parse_listen
from .gate import Demand, Gate, Route, UpstreamRefused, UpstreamStalled
from .metrics import Metrics

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# RFC 9110 7.6.1 hop-by-hop headers, plus those the proxy recomputes (Host, Content-Length) and
# Expect (the proxy has the whole body before it connects upstream).
_HOP = frozenset(
    h.lower()
    for h in (
        "Connection",
        "Keep-Alive",
        "Proxy-Authenticate",
        "Proxy-Authorization",
        "Proxy-Connection",
        "TE",
        "Trailer",
        "Transfer-Encoding",
        "Upgrade",
        "Host",
        "Content-Length",
        "Expect",
    )
)
_MAX_5XX_KEPT = 64 * 1024  # a 5xx body kept back while we learn whether its server is dying
_FD_RESERVE = 256  # fds left for the supervisor itself: log tail, probes, /proc scans, ledger


def error_body(status: int, message: str, type_: str, **extra: Any) -> bytes:
    """OpenAI's error JSON shape (as vLLM answers too), with vsup's extra facts beside."""
    err = {"message": message, "type": type_, "param": None, "code": status, **extra}
    return json.dumps({"error": err}).encode()


def error_response(
    status: int, message: str, type_: str, retry_after: float | None = None, **extra: Any
) -> web.Response:
    headers = {"Retry-After": str(max(1, round(retry_after)))} if retry_after is not None else None
    return web.Response(
        status=status,
        body=error_body(status, message, type_, **extra),
        content_type="application/json",
        headers=headers,
    )


class _Refuse(Exception):
    """Answer the client with this error response now (nothing was sent yet)."""

    def __init__(self, reason: str, response: web.Response) -> None:
        super().__init__(reason)
        self.reason = reason
        self.response = response


class _GiveUp(Exception):
    """A failed request is not re-sent: answer it with this (its event is out)."""

    def __init__(self, response: web.StreamResponse) -> None:
        super().__init__("give up")
        self.response = response


class _NothingSent(Exception):
    """The upstream failed before the client was sent a byte: the request may be replayed."""

    def __init__(self, why: str, gen: int, *, refused: bool = False, kept: web.Response | None = None):
        super().__init__(why)
        self.why, self.gen, self.refused = why, gen, refused
        self.kept = kept  # the 5xx to send after all when no replay is allowed


class _Req:
    __slots__ = (
        "id",
        "method",
        "path",
        "arrived",
        "gen",
        "attempts",
        "replays",
        "retries",
        "last_byte",
        "model",
    )

    def __init__(self, rid: int, method: str, path: str, arrived: float) -> None:
        self.id, self.method, self.path, self.arrived = rid, method, path, arrived
        self.gen: int | None = None
        self.model: str | None = None  # the body's "model", read only with swap_on_request
        self.attempts = 0
        self.replays = 0  # re-sent after its server was withdrawn (died, hung, stopped): at most 1
        self.retries = 0  # re-sent to a server that stayed up after failing it unanswered: at most 1
        self.last_byte = arrived  # of a stream in flight: when its upstream last sent a byte


class Proxy:
    """One listening proxy. ``start()``/``stop()`` from the owner's loop; implements ``gate.Traffic``.

    ``post(observation)`` queues an observation for the owner; ``emit(name, **fields)`` writes an
    event (never a prompt: only method, path, counts and times); ``metrics`` is a
    ``vsup.metrics.Metrics`` or None.
    """

    def __init__(
        self,
        cfg: ProxyConfig,
        gate: Gate,
        *,
        post: Callable[[object], None],
        emit: Callable[..., None],
        metrics: Metrics | None = None,
        clock: Callable[[], float] = time.monotonic,
        models: Collection[str] = (),
        api_key: str | None = None,
    ) -> None:
        """``models``: the served names of the configured models (swap_on_request routes and
        lists them); ``api_key``: vLLM's --api-key, which the proxy's own /v1/models demands too."""
        self.cfg = cfg
        self.gate = gate
        self._post = post
        self._emit = emit
        self._metrics = metrics
        self._clock = clock
        self.host, self.port = parse_listen(cfg.listen, allow_zero=True)  # 0: any free port (tests)
        self._ids = itertools.count(1)
        self._held: dict[int, float] = {}  # request id -> held since (monotonic)
        self._held_model: dict[int, str | None] = {}  # request id -> the model it asked for
        self._last_use: dict[str | None, float] = {}  # model asked (None: any) -> last arrival or end
        self._models = tuple(models)
        self._api_key = api_key
        self._in_flight: dict[int, int] = {}  # gen -> requests forwarded and not finished
        self._streams: dict[int, _Req] = {}  # request id -> SSE streams in flight
        self._stall_task: asyncio.Task[None] | None = None
        self._stall_posted: set[int] = set()  # gens told about, until one of their streams moves
        self._last_success: float | None = None
        self._counts = {
            "requests": 0,
            "replays": 0,
            "failed": 0,
            "rejected": 0,
            "hold_timeouts": 0,
            "refused_conns": 0,
        }
        self._local: dict[str, Handler] = {"/health": self._health}
        if cfg.swap_on_request:
            self._local["/v1/models"] = self._list_models  # every configured model, loaded or not
        self._episode_full = False  # one "queue full" event per hold episode
        self._released: list[float] = []  # waits of requests released since the last event
        self._demanded: tuple[Route, set[str | None]] | None = None  # models asked of this route
        self._runner: web.AppRunner | None = None
        self._server: asyncio.AbstractServer | None = None
        self._session: aiohttp.ClientSession | None = None
        self._bind_task: asyncio.Task[None] | None = None
        self.max_connections = self._connection_cap(cfg.max_connections)
        self.address: tuple[str, int] | None = None  # bound (host, port), once listening
        self.bound = asyncio.Event()
        self._pending: list[Any] = []  # client handlers created, not yet connected (see _bind)
        self.bind_retry_s = 5.0
        self._started = time.time()

    # ---- hooks --------------------------------------------------------------------------------

    def add_local(self, path: str, handler: Handler) -> None:
        """Answer ``path`` in the proxy itself (e.g. /livez, /readyz, /startupz); before start()."""
        self._local[path] = handler

    # ---- lifecycle ----------------------------------------------------------------------------

    @staticmethod
    def _connection_cap(configured: int) -> int:
        """Each client connection may hold one upstream connection too: two fds. Keep the
        supervisor's own reserve free, so a flood of idle connections never makes the
        cleanup's /proc scans fail with EMFILE."""
        soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft == resource.RLIM_INFINITY:
            return configured
        return max(1, min(configured, (soft - _FD_RESERVE) // 2))

    async def start(self) -> None:
        """Set up, then bind the listen socket (retried every 5 s in the background if it fails,
        with an event: supervision goes on without the proxy meanwhile)."""
        app = web.Application(client_max_size=self.cfg.max_body_bytes)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(
            app,
            handle_signals=False,
            access_log=None,
            handler_cancellation=True,  # a client that disconnects cancels its upstream request
            keepalive_timeout=self.cfg.idle_timeout_s,  # also bounds reading the request headers
            auto_decompress=False,
            # After a 413 or 408, read the rest of the refused body this long at most (so the client
            # sees our answer rather than a reset), not aiohttp's default 10 s.
            lingering_time=1.0,
        )
        await self._runner.setup()
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(
                limit=self.max_connections,
                ttl_dns_cache=60,
                keepalive_timeout=self.cfg.upstream_keepalive_s,  # below vLLM's own (config.py)
            ),
            timeout=aiohttp.ClientTimeout(total=None, connect=self.cfg.connect_timeout_s, sock_read=None),
            auto_decompress=False,
            cookie_jar=aiohttp.DummyCookieJar(),  # one client's cookies never reach another's request
            skip_auto_headers=("User-Agent", "Accept-Encoding", "Content-Type", "Accept"),
        )
        try:
            await self._bind()
        except OSError as e:
            self._emit("proxy_error", reason=f"cannot listen on {self.cfg.listen}: {e}; retrying every 5 s")
            self._bind_task = asyncio.create_task(self._bind_retry(), name="proxy-bind")

    async def _bind(self) -> None:
        loop = asyncio.get_running_loop()
        if self._runner is None or self._runner.server is None:
            raise RuntimeError("Proxy._bind before start()")
        handler_factory = self._runner.server

        def factory() -> asyncio.BaseProtocol:
            # The loop accepts a burst of connections before any handler's connection_made
            # registers it with the server: count the handlers made but not yet connected too
            # (a handler whose connection was lost has no manager any more).
            self._pending = [h for h in self._pending if h.transport is None and h._manager is not None]
            if len(handler_factory.connections) + len(self._pending) >= self.max_connections:
                self._counts["refused_conns"] += 1
                return _TooMany()
            h = handler_factory()
            self._pending.append(h)
            return h

        self._server = await loop.create_server(
            factory, self.host, self.port, reuse_address=True, backlog=1024
        )
        sock = self._server.sockets[0].getsockname()
        self.address = (sock[0], sock[1])
        self.bound.set()
        self._emit(
            "proxy_listening",
            listen=self.cfg.listen,
            max_connections=self.max_connections,
            reason=None,
        )

    async def _bind_retry(self) -> None:
        while True:
            await asyncio.sleep(self.bind_retry_s)
            try:
                await self._bind()
                return
            except OSError:
                continue

    async def stop(self) -> None:
        """Close the listener and every connection; idempotent. Held requests get a 503."""
        if self._stall_task is not None:
            self._stall_task.cancel()
        if self._bind_task is not None:
            self._bind_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._bind_task
            self._bind_task = None
        if self._server is not None:
            self._server.close()
            self._server = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    # ---- gate.Traffic -------------------------------------------------------------------------

    def in_flight(self, gen: int | None = None) -> int:
        if gen is None:
            return sum(self._in_flight.values())
        return self._in_flight.get(gen, 0)

    def held(self) -> int:
        return len(self._held)

    def oldest_held_s(self) -> float | None:
        if not self._held:
            return None
        return self._clock() - min(self._held.values())

    def last_success_at(self) -> float | None:
        return self._last_success

    def last_activity_at(self, model: str | None = None) -> float | None:
        return self._last_use.get(model)

    def waiting(self) -> dict[str | None, float]:
        out: dict[str | None, float] = {}
        for rid, since in self._held.items():
            m = self._held_model.get(rid)
            if m not in out or since < out[m]:
                out[m] = since
        return out

    def _touch(self, model: str | None) -> None:
        now = self._clock()
        self._last_use[None] = now
        if model is not None:
            self._last_use[model] = now

    def stats(self) -> dict[str, object]:
        oldest = self.oldest_held_s()
        now = self._clock()
        last = self._last_use.get(None)
        return {
            "listen": self.cfg.listen,
            "in_flight": self.in_flight(),
            "held": self.held(),
            "oldest_held_s": None if oldest is None else round(oldest, 3),
            "idle_s": None if last is None else round(now - last, 3),
            "waiting": {str(m): round(now - t, 3) for m, t in self.waiting().items()},
            "connections": len(self._runner.server.connections)
            if self._runner and self._runner.server
            else 0,
            **self._counts,
        }

    # ---- request handling ---------------------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        local = self._local.get(request.path)
        if local is not None:
            return await local(request)
        self._counts["requests"] += 1
        req = _Req(next(self._ids), request.method, request.path, self._clock())
        self._touch(None)  # a request held or in flight is activity; so are its arrival and end
        try:
            body = await self._read_body(request)
            if self.cfg.swap_on_request:
                req.model = _model_of(body)
                self._touch(req.model)
            return await self._serve(request, req, body)
        except _Refuse as r:
            self._counts["rejected"] += 1
            if self._metrics is not None:
                self._metrics.proxy_rejected(r.reason)
            return r.response
        except (asyncio.CancelledError, ConnectionResetError):
            raise  # the client left; the upstream request was closed on the way out
        except Exception as e:  # a bug here answers one request with a 502, never more
            log.exception("proxy: %s %s failed", req.method, req.path)
            return error_response(502, f"vsup proxy error: {type(e).__name__}", "BadGateway")
        finally:
            self._touch(req.model)

    async def _read_body(self, request: web.Request) -> bytes:
        limit = self.cfg.max_body_bytes
        if request.content_length is not None and request.content_length > limit:
            raise self._too_large(request, limit)
        buf = bytearray()
        try:
            async with asyncio.timeout(self.cfg.body_timeout_s):
                while chunk := await request.content.readany():
                    buf += chunk
                    if len(buf) > limit:
                        raise self._too_large(request, limit)
        except TimeoutError:
            resp = error_response(
                408, f"request body not received within {self.cfg.body_timeout_s:g}s", "RequestTimeout"
            )
            resp.force_close()
            raise _Refuse("body_timeout", resp) from None
        return bytes(buf)

    @staticmethod
    def _too_large(request: web.Request, limit: int) -> _Refuse:
        resp = error_response(413, f"request body is larger than {limit} bytes", "RequestTooLarge")
        resp.force_close()  # never read the rest of a body we refused
        return _Refuse("too_large", resp)

    async def _serve(self, request: web.Request, req: _Req, body: bytes) -> web.StreamResponse:
        failed: tuple[_NothingSent, float] | None = None  # the last failure, and when
        while True:
            try:
                route = await self._acquire(request, req, body, failed)
            except _GiveUp as g:
                return g.response
            try:
                return await self._forward(request, req, body, route)
            except _NothingSent as n:
                if n.refused:
                    self._post(UpstreamRefused(n.gen, n.why))
                if not self.cfg.replay:
                    return self._give_up(req, n, "")
                failed = (n, self._clock())

    def _resend(self, req: _Req, n: _NothingSent, withdrawn: bool) -> None:
        """Decide a failed request's re-send, once its server is withdrawn or seen to stay up.

        Withdrawn (it died, hung or was stopped: the owner takes it out of the route at once, or
        within replay_window_s of a sudden death), the request is replayed once on the next
        server: once, as it may be what killed this one. A server that stays up and closed the
        connection unanswered (a keep-alive connection it was closing, aio-libs/aiohttp#2682)
        gets it once more: no server died, so that must not use up the replay a later death
        needs (a CI run lost one stream so: its replay then hung with the worker)."""
        if withdrawn and req.replays:
            raise _GiveUp(self._give_up(req, n, "; already replayed once"))
        if not withdrawn and req.retries:
            raise _GiveUp(self._give_up(req, n, "; already re-sent once to this server, which stays up"))
        if withdrawn:
            req.replays += 1
        else:
            req.retries += 1
        self._counts["replays"] += 1
        if self._metrics is not None:
            self._metrics.proxy_replay()
        self._emit(
            "proxy_replay",
            method=req.method,
            path=req.path,
            gen=n.gen,
            reason=n.why,
            attempt=req.attempts,
            withdrawn=withdrawn,
        )

    def _give_up(self, req: _Req, n: _NothingSent, why: str) -> web.StreamResponse:
        """The request's answer when it is not re-sent: the 5xx kept back, or a 502 (an event
        either way: a request lost is never silent)."""
        self._counts["failed"] += 1
        self._emit(
            "proxy_failed",
            method=req.method,
            path=req.path,
            gen=n.gen,
            attempts=req.attempts,
            reason=n.why + why,
            status=n.kept.status if n.kept is not None else 502,
        )
        if n.kept is not None:
            return n.kept
        return error_response(502, f"the server failed before answering ({n.why}){why}", "BadGateway")

    async def _acquire(
        self, request: web.Request, req: _Req, body: bytes, failed: tuple[_NothingSent, float] | None
    ) -> Route:
        """A route with an upstream, waiting (held) while the owner says one is coming. After a
        failure, held until its server is withdrawn (then the next one) or replay_window_s
        shows it stays up (then it again); `_resend` decides whether to go on."""
        deadline: float | None = None
        avoid: tuple[int, float] | None = None
        if failed is not None:
            avoid = (failed[0].gen, failed[1] + self.cfg.replay_window_s)
        undecided = failed[0] if failed is not None else None  # until _resend has decided it
        try:
            while True:
                route = self.gate.route
                now = self._clock()
                if route.closing:
                    raise _Refuse("shutting_down", self._closing(route))
                if undecided is not None and avoid is not None:
                    if route.upstream is None or route.gen != avoid[0]:
                        self._resend(req, undecided, withdrawn=True)
                        undecided = None
                    elif now >= avoid[1]:  # it stays up: the request goes to it again
                        self._resend(req, undecided, withdrawn=False)
                        undecided = None
                # swap_on_request: a request for another configured model waits for its swap;
                # requests for the loaded one keep flowing until the swap begins (issue 16).
                other = req.model is not None and req.model != route.model and req.model in self._models
                if (
                    route.upstream is not None
                    and not other
                    and (avoid is None or route.gen != avoid[0] or now >= avoid[1])
                ):
                    return route
                if route.upstream is None and not route.hold:
                    raise _Refuse(
                        "refused",
                        error_response(
                            503,
                            f"no server: vsup is {route.state}"
                            + (f" ({route.reason})" if route.reason else ""),
                            "ServiceUnavailable",
                            state=route.state,
                            reason=route.reason,
                        ),
                    )
                if deadline is None:
                    deadline = self._hold(req, route, now, body)
                if route.idle or other:
                    self._demand(route, req.model if other else _model_of(body))
                wait = deadline - now
                if avoid is not None and route.upstream is not None:
                    wait = min(wait, avoid[1] - now)
                if wait <= 0:
                    self._counts["hold_timeouts"] += 1
                    self._emit(
                        "proxy_hold_timeout",
                        method=req.method,
                        path=req.path,
                        waited_s=round(now - self._held[req.id], 3),
                        state=route.state,
                        reason=route.reason,
                    )
                    raise _Refuse(
                        "hold_timeout",
                        error_response(
                            503,
                            f"no server became ready within {self.cfg.hold_timeout_s:g}s"
                            f" (vsup is {route.state})",
                            "ServiceUnavailable",
                            retry_after=self.cfg.retry_after_s,
                            state=route.state,
                            reason=route.reason,
                        ),
                    )
                await self.gate.changed(wait)
        finally:
            if deadline is not None:
                self._unhold(req)

    def _closing(self, route: Route) -> web.Response:
        """Shutdown (issue 18): 503 + Retry-After (another replica, or this one restarted, will
        answer) and Connection: close, so a keep-alive client reconnects through the Service."""
        resp = error_response(
            503,
            "vsup is shutting down",
            "ServiceUnavailable",
            retry_after=self.cfg.retry_after_s,
            state=route.state,
            reason=route.reason,
        )
        resp.force_close()
        return resp

    def _hold(self, req: _Req, route: Route, now: float, body: bytes) -> float:
        if len(self._held) >= self.cfg.max_held:
            if not self._episode_full:
                self._episode_full = True
                self._emit("proxy_hold_full", held=len(self._held), state=route.state, reason=route.reason)
            raise _Refuse(
                "full",
                error_response(
                    503,
                    f"{len(self._held)} requests are already waiting for a server (max_held)",
                    "ServiceUnavailable",
                    retry_after=self.cfg.retry_after_s,
                    state=route.state,
                    reason=route.reason,
                ),
            )
        if not self._held:
            self._emit("proxy_hold", state=route.state, reason=route.reason)
        self._held[req.id] = now
        self._held_model[req.id] = req.model
        if self._metrics is not None:
            self._metrics.proxy_held(len(self._held))
        return now + self.cfg.hold_timeout_s

    def _demand(self, route: Route, model: str | None) -> None:
        """Ask the owner for a server (off-loaded) or a swap: once per route and model. The
        owner also reads ``waiting()``, so a Demand lost in a busy phase is not a lost request."""
        if self._demanded is None or self._demanded[0] is not route:
            self._demanded = (route, set())
        asked = self._demanded[1]
        if model not in asked:
            asked.add(model)
            self._post(Demand(model))

    def _unhold(self, req: _Req) -> None:
        self._held_model.pop(req.id, None)
        since = self._held.pop(req.id, None)
        if since is None:
            return
        waited = self._clock() - since
        if self._metrics is not None:
            self._metrics.proxy_held(len(self._held))
            self._metrics.proxy_hold_time(waited)
        if self.gate.route.upstream is not None:
            if not self._released:
                asyncio.get_running_loop().call_soon(self._flush_released)
            self._released.append(waited)
        if not self._held:
            self._episode_full = False

    def _flush_released(self) -> None:
        """One event for the requests one published route released (they wake in one pass)."""
        waits, self._released = self._released, []
        if waits:
            r = self.gate.route
            self._emit(
                "proxy_release",
                released=len(waits),
                max_wait_s=round(max(waits), 3),
                gen=r.gen,
                state=r.state,
                reason=None,
            )

    async def _forward(
        self, request: web.Request, req: _Req, body: bytes, route: Route
    ) -> web.StreamResponse:
        if route.upstream is None or self._session is None:
            raise RuntimeError("forward without an upstream or before start()")
        host, port = route.upstream
        gen = route.gen
        h = f"[{host}]" if ":" in host else host
        url = URL(f"http://{h}:{port}{request.raw_path}", encoded=True)
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in _HOP]
        peer = request.remote
        if peer:
            prior = request.headers.get("X-Forwarded-For")
            headers.append(("X-Forwarded-For", f"{prior}, {peer}" if prior else peer))
        req.attempts += 1
        req.gen = gen
        self._in_flight[gen] = self._in_flight.get(gen, 0) + 1
        if self._metrics is not None:
            self._metrics.proxy_in_flight(self.in_flight())
        up: aiohttp.ClientResponse | None = None
        try:
            try:
                up = await self._session.request(
                    request.method,
                    url,
                    headers=headers,
                    data=body if body else None,
                    allow_redirects=False,
                    compress=None,
                )
            except aiohttp.ClientConnectorError as e:
                raise _NothingSent(f"connect: {e.os_error or e}", gen, refused=True) from None
            except (aiohttp.ClientError, TimeoutError) as e:
                raise _NothingSent(f"{type(e).__name__}: {e}", gen) from None
            try:
                first = await up.content.readany()
            except (aiohttp.ClientError, TimeoutError) as e:
                raise _NothingSent(f"{type(e).__name__} before the first byte", gen) from None
            sse = up.headers.get("Content-Type", "").startswith("text/event-stream")
            if sse and self.cfg.replay and not req.replays:
                # vLLM answers a stream in flight when its engine dies with 200, then an error
                # event as the first bytes ("EngineCore encountered an issue"): nothing the
                # client can use, so it counts as nothing sent if the server is withdrawn, as a
                # 5xx does. (Found by the real worker-SIGKILL acceptance: one stream failed so.)
                try:
                    while b"\n\n" not in first and len(first) <= _MAX_5XX_KEPT:
                        if not (more := await up.content.readany()):
                            break
                        first += more
                except (aiohttp.ClientError, TimeoutError) as e:
                    raise _NothingSent(f"{type(e).__name__} within the first event", gen) from None
                if _is_error_event(first) and await self._withdrawn_soon(gen):
                    raise _NothingSent("an error event first, from a server that was then withdrawn", gen)
            if up.status >= 500 and self.cfg.replay and not req.replays:
                kept = await self._keep_5xx(up, first, gen)
                if await self._withdrawn_soon(gen):
                    raise _NothingSent(
                        f"HTTP {up.status} from a server that was then withdrawn", gen, kept=kept
                    )
                return kept
            if up.content.at_eof() and request.method != "HEAD":
                # The whole body came with the first read (a non-streaming answer): one response
                # written at once, headers and body together, instead of three writes.
                whole = web.Response(status=up.status, reason=up.reason, body=first)
                for k, v in up.headers.items():
                    if k.lower() not in _HOP:
                        whole.headers.add(k, v)
                if 200 <= up.status < 300:
                    self._last_success = self._clock()
                return whole
            resp = web.StreamResponse(status=up.status, reason=up.reason)
            for k, v in up.headers.items():
                if k.lower() not in _HOP:
                    resp.headers.add(k, v)
            if up.content_length is not None and "chunked" not in up.headers.get("Transfer-Encoding", ""):
                resp.content_length = up.content_length
            await resp.prepare(request)
            if first:
                await resp.write(first)
            if up.headers.get("Content-Type", "").startswith("text/event-stream"):
                self._watch_stream(req)
            try:
                while chunk := await up.content.readany():
                    req.last_byte = self._clock()
                    await resp.write(chunk)
            except (aiohttp.ClientError, TimeoutError) as e:
                return await self._cut(request, resp, up, req, gen, e)
            await resp.write_eof()
            if 200 <= up.status < 300:
                self._last_success = self._clock()
            return resp
        finally:
            self._streams.pop(req.id, None)
            if up is not None:
                up.close()  # a no-op when the body was read to the end; else vLLM sees the abort
            self._in_flight[gen] -= 1
            if not self._in_flight[gen]:
                del self._in_flight[gen]
            if self._metrics is not None:
                self._metrics.proxy_in_flight(self.in_flight())

    def _watch_stream(self, req: _Req) -> None:
        req.last_byte = self._clock()
        self._streams[req.id] = req
        if self._stall_task is None or self._stall_task.done():
            self._stall_task = asyncio.get_running_loop().create_task(self._stall_watch(), name="proxy-stall")

    async def _stall_watch(self) -> None:
        """While streams are in flight: when every stream to one tree has waited ``stall_s``
        without a byte, tell the owner once (one strike, like a failed canary; the owner
        confirms). A stream between tokens is the sign a non-streaming request cannot give."""
        stall = self.cfg.stall_s
        while self._streams:
            await asyncio.sleep(min(stall / 4, 5.0))
            now = self._clock()
            by_gen: dict[int, list[_Req]] = {}
            for r in self._streams.values():
                if r.gen is not None:
                    by_gen.setdefault(r.gen, []).append(r)
            for gen, rs in by_gen.items():
                quiet = min(now - r.last_byte for r in rs)
                if quiet < stall:
                    self._stall_posted.discard(gen)
                elif gen not in self._stall_posted:
                    self._stall_posted.add(gen)
                    self._post(
                        UpstreamStalled(gen, f"{len(rs)} stream(s) in flight, no byte for {quiet:.0f}s")
                    )

    async def _keep_5xx(self, up: aiohttp.ClientResponse, first: bytes, gen: int) -> web.Response:
        buf = bytearray(first)
        try:
            while len(buf) <= _MAX_5XX_KEPT and (chunk := await up.content.readany()):
                buf += chunk
        except (aiohttp.ClientError, TimeoutError):
            pass  # what arrived is what the client gets if nothing is replayed
        resp = web.Response(status=up.status, reason=up.reason, body=bytes(buf))
        for k, v in up.headers.items():
            if k.lower() not in _HOP:
                resp.headers.add(k, v)
        return resp

    async def _withdrawn_soon(self, gen: int) -> bool:
        """Whether the owner withdraws tree ``gen`` within ``replay_window_s`` (a 5xx from a
        server whose death vsup detects moments later counts as nothing sent)."""
        end = self._clock() + self.cfg.replay_window_s
        while True:
            r = self.gate.route
            if r.upstream is None or r.gen != gen:
                return True
            left = end - self._clock()
            if left <= 0:
                return False
            await self.gate.changed(left)

    async def _cut(
        self,
        request: web.Request,
        resp: web.StreamResponse,
        up: aiohttp.ClientResponse,
        req: _Req,
        gen: int,
        e: BaseException,
    ) -> web.StreamResponse:
        """The upstream died after the client had bytes: no replay. A stream ends with an SSE
        error event and a clean close; anything else can only be cut (its status is sent)."""
        self._emit("proxy_cut", method=req.method, path=req.path, gen=gen, reason=type(e).__name__)
        if up.headers.get("Content-Type", "").startswith("text/event-stream"):
            msg = "the server died while streaming this response (vsup will restart it)"
            await resp.write(b"data: " + error_body(502, msg, "BadGateway") + b"\n\n")
            await resp.write_eof()
            return resp
        transport = request.transport
        if transport is not None:
            transport.close()
        return resp

    async def _health(self, request: web.Request) -> web.StreamResponse:
        """200 only while vsup's state is ready, or a proven server is routed (an overlapped
        reload's old server serves while the new one loads, issue 23), or off-loaded (it will
        serve after a load: a balancer that saw 503 would never send the request that wakes it);
        a hung server's own /health says 200 too."""
        r = self.gate.route
        routed = r.upstream is not None and not r.closing
        status = 200 if r.state == "ready" or routed or (r.idle and not r.closing) else 503
        body: dict[str, Any] = {"state": r.state, "reason": r.reason}
        if r.idle:
            body["idle"] = True
        return web.json_response(body, status=status)

    async def _list_models(self, request: web.Request) -> web.StreamResponse:
        """swap_on_request: every configured model, each with ``loaded`` (serving now) and
        ``status`` (loaded, loading, unloaded), so clients see what they may ask for. Answered
        here, loaded or not, with vLLM's key check when vLLM has one."""
        if request.method not in ("GET", "HEAD"):
            return error_response(405, "method not allowed", "MethodNotAllowed")
        if self._api_key and request.headers.get("Authorization") != f"Bearer {self._api_key}":
            return web.json_response({"error": "Unauthorized"}, status=401)
        r = self.gate.route
        data = []
        for name in self._models:
            here = name == r.model
            loaded = here and r.upstream is not None
            status = "loaded" if loaded else "loading" if here and r.hold and not r.idle else "unloaded"
            data.append(
                {
                    "id": name,
                    "object": "model",
                    "created": int(self._started),
                    "owned_by": "vsup",
                    "loaded": loaded,
                    "status": status,
                }
            )
        return web.json_response({"object": "list", "data": data})


def for_supervisor(sup: Any) -> Proxy | None:
    """The proxy for a daemon whose config has a [proxy] section, else None: it follows
    ``sup.gate``, posts to ``sup.post``, writes ``sup.events`` and ``sup.metrics``, and becomes
    ``sup.traffic`` (what the owner reads for drain and status). The runtime starts it before
    the control socket and stops it after the owner."""
    if sup.cfg.proxy is None:
        return None
    from . import probes
    from .config import served_models

    cfg = sup.cfg
    proxy = Proxy(
        cfg.proxy,
        sup.gate,
        post=sup.post,
        emit=sup.events.emit,
        metrics=sup.metrics,
        models=list(served_models(cfg)) if cfg.proxy.swap_on_request else (),
        api_key=probes.api_key(list(cfg.vllm.args), dict(cfg.vllm.env)),
    )
    sup.traffic = proxy
    return proxy


def _is_error_event(data: bytes) -> bool:
    """Whether an SSE body starts with an error event (vLLM: `data: {"error": {...}}`)."""
    event = data.split(b"\n\n", 1)[0].strip()
    if not event.startswith(b"data:"):
        return False
    try:
        obj = json.loads(event[5:])
    except ValueError:
        return False
    return isinstance(obj, dict) and ("error" in obj or obj.get("object") == "error")


def _model_of(body: bytes) -> str | None:
    if not body or len(body) > 1 << 20:
        return None
    try:
        m = json.loads(body).get("model")
    except (ValueError, AttributeError):
        return None
    return m if isinstance(m, str) else None


class _TooMany(asyncio.Protocol):
    """A connection past the cap: one 503 and close, so its fd is freed at once."""

    _BODY = error_body(503, "too many connections to vsup's proxy", "ServiceUnavailable")
    _RESP = (
        b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\n"
        b"Connection: close\r\nContent-Length: " + str(len(_BODY)).encode() + b"\r\n\r\n" + _BODY
    )

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if isinstance(transport, asyncio.Transport):
            transport.write(self._RESP)
        transport.close()
