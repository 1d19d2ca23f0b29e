"""The owner's published route for the proxy, and what the proxy tells the owner.

Data still flows one way. The owner (the one task that writes state) publishes a `Route`
whenever what clients should get changes: a proven-ready upstream to forward to, or the reason
to hold requests (a server is coming) or to refuse them (nothing is coming). The proxy only
reads routes and waits for the next one; it never writes state. What the proxy sees that the
owner should know (every stream in flight stalled, the upstream refusing connections, a request
for a model that is not loaded) it posts as an observation, like every other source.

Per-request numbers (in flight, held, last success) are not posted per request: the owner reads
them from the proxy's `Traffic` view when it needs them (status, drain, canary skipping).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True)
class Route:
    """Where client requests go now. `upstream` is set only while a server is proven ready."""

    state: str = "stopped"  # the owner's state, for /health bodies and 503 messages
    reason: str | None = None
    upstream: tuple[str, int] | None = None  # (host, port) of the proven-ready server
    gen: int = 0  # generation of the tree behind `upstream` (stale routes are ignored)
    hold: bool = False  # no upstream: True = requests wait (a server is coming), False = 503 now
    model: str | None = None  # served model name of the current or coming server
    # Off-loaded (idle or `vsup unload`): held requests ask for a load (Demand); /health is 200
    # (it will serve, after a load: a balancer that saw 503 would never send the waking request).
    idle: bool = False
    # vsup is shutting down (SIGTERM): every request not yet forwarded, held or new, gets 503
    # with Retry-After at once and its connection is closed; requests in flight finish.
    closing: bool = False
    since: float = field(default_factory=time.monotonic)


class Gate:
    """One writer (the owner) publishes routes; any number of readers wait for changes."""

    def __init__(self, route: Route | None = None) -> None:
        self._route = route or Route()
        self._changed = asyncio.Event()

    @property
    def route(self) -> Route:
        return self._route

    def publish(self, route: Route) -> None:
        """Owner only. Wakes every waiter; they re-read `route`."""
        if route == self._route:
            return
        self._route = route
        self._changed.set()
        self._changed = asyncio.Event()

    async def changed(self, timeout: float | None = None) -> Route:
        """Wait until the next publish (or `timeout`), then return the current route."""
        ev = self._changed
        try:
            await asyncio.wait_for(ev.wait(), timeout)
        except TimeoutError:
            pass
        return self._route


class Traffic(Protocol):
    """What the owner may read from the proxy (never posted per request)."""

    def in_flight(self, gen: int | None = None) -> int: ...

    def held(self) -> int: ...

    def oldest_held_s(self) -> float | None: ...

    def last_success_at(self) -> float | None: ...  # monotonic time of the last 2xx completion

    # Issue 16 (idle off-load, swap on request): the monotonic time a request (for served name
    # `model`, or for any when None) last arrived or ended; and, per model name asked for
    # (None: no model in the body), when the oldest request held now began waiting.
    def last_activity_at(self, model: str | None = None) -> float | None: ...

    def waiting(self) -> dict[str | None, float]: ...

    def stats(self) -> dict[str, object]: ...


# ---- observations the proxy posts to the owner's queue ----------------------------------------


@dataclass(frozen=True)
class UpstreamStalled:
    """Every request in flight to tree `gen` has waited `seconds` without a byte."""

    gen: int
    detail: str


@dataclass(frozen=True)
class UpstreamRefused:
    """The upstream of tree `gen` refused or reset a connection the route said was ready."""

    gen: int
    detail: str


@dataclass(frozen=True)
class Demand:
    """A request arrived that needs a server the owner is not running (off-loaded, or, with
    swap_on_request, another configured model). `model` is the served name asked for."""

    model: str | None
