"""Optional Prometheus endpoint: what the daemon is doing, as numbers a scraper can alert on.

prometheus-client is an optional extra (``pip install vsup[metrics]``). Without it every method
is a no-op and ``start`` logs one line: metrics are a window on the daemon, never a reason for it
not to supervise.

Invariants:
- A dedicated ``CollectorRegistry`` per ``Metrics``: nothing lands in the library's global
  default registry (whose process/GC collectors and module-level state would make two daemons in
  one test process share series), and tests can build as many as they like.
- The HTTP server is the library's own threaded WSGI server. The daemon's loop only updates
  values (lock-protected in the library, microseconds); a slow scraper cannot stall supervision.
- One-hot gauges (``vsup_state``, ``vsup_reload_phase``) set every known label each time, so a
  scrape never shows two current states.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from typing import Any

try:
    import prometheus_client as _prom
except ImportError:  # optional extra not installed
    _prom = None  # type: ignore[assignment]  # `available` says so; checked before every use

log = logging.getLogger(__name__)

# The daemon's states (issue 3); set_state() adds any other name it is given.
STATES = ("starting", "ready", "unhealthy", "stopping", "stopped", "failed", "reloading")


class Metrics:
    """The daemon's metrics; safe to call whether or not the endpoint was started."""

    def __init__(self, states: Iterable[str] = STATES) -> None:
        self.available = _prom is not None
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self._states: list[str] = list(states)
        self._phases: list[str] = []
        if _prom is None:
            return
        self.registry = _prom.CollectorRegistry(auto_describe=True)
        r = self.registry
        self._state = _prom.Gauge(
            "vsup_state", "1 for the daemon's current state, 0 for the others", ["state"], registry=r
        )
        self._restarts = _prom.Counter(
            "vsup_restarts", "automatic restarts of vLLM by reason", ["reason"], registry=r
        )
        self._detections = _prom.Counter("vsup_detections", "failures detected by kind", ["kind"], registry=r)
        self._latency = _prom.Gauge(
            "vsup_last_detection_latency_seconds",
            "time from the fault's first sign to its detection, last detection",
            registry=r,
        )
        self._killed = _prom.Counter(
            "vsup_cleanup_processes_killed", "orphan or leftover processes killed by cleanup", registry=r
        )
        self._unlinked = _prom.Counter(
            "vsup_cleanup_objects_unlinked",
            "/dev/shm and /tmp objects unlinked by cleanup",  # noqa: S108 - help text
            registry=r,
        )
        self._freed = _prom.Counter(
            "vsup_cleanup_bytes_freed", "bytes of /dev/shm and /tmp freed by cleanup", registry=r
        )
        self._phase_s = _prom.Gauge(
            "vsup_reload_phase_seconds",
            "duration of the last run of each reload phase",
            ["phase"],
            registry=r,
        )
        self._phase = _prom.Gauge(
            "vsup_reload_phase", "1 while a reload is in this phase", ["phase"], registry=r
        )
        self._gpu_used = _prom.Gauge(
            "vsup_gpu_memory_used_bytes", "GPU memory used (all processes)", ["gpu"], registry=r
        )
        self._gpu_total = _prom.Gauge(
            "vsup_gpu_memory_total_bytes", "GPU memory in total", ["gpu"], registry=r
        )
        self._gpu_model = _prom.Gauge(
            "vsup_gpu_memory_model_bytes", "GPU memory used by the supervised vLLM tree", ["gpu"], registry=r
        )
        for s in self._states:
            self._state.labels(state=s).set(0)
        # the proxy (proxy.py), only moved when [proxy] is configured
        self._proxy_held = _prom.Gauge(
            "vsup_proxy_held_requests", "client requests waiting for a ready server now", registry=r
        )
        self._proxy_in_flight = _prom.Gauge(
            "vsup_proxy_in_flight_requests", "client requests forwarded to vLLM and not finished", registry=r
        )
        self._proxy_hold = _prom.Histogram(
            "vsup_proxy_hold_seconds",
            "how long a held request waited for a ready server",
            buckets=(0.1, 0.5, 1, 2.5, 5, 10, 20, 30, 45, 60, 90, 120, 180, 300, 600),
            registry=r,
        )
        self._proxy_replays = _prom.Counter(
            "vsup_proxy_replays",
            "requests re-sent to the next server after theirs died unanswered",
            registry=r,
        )
        self._proxy_rejected = _prom.Counter(
            "vsup_proxy_rejections",
            "requests the proxy answered with an error itself, by reason",
            ["reason"],
            registry=r,
        )
        # issue 16: off-loads (idle, operator), loads on demand, swaps on request
        self._on_demand = _prom.Counter(
            "vsup_on_demand",
            "off-loads (unloaded), loads on demand (loaded) and swaps (swapped), by cause",
            ["kind", "cause"],
            registry=r,
        )
        self._on_demand_s = _prom.Histogram(
            "vsup_on_demand_seconds",
            "how long each off-load, load on demand (request to ready) and swap took",
            ["kind"],
            buckets=(0.5, 1, 2.5, 5, 10, 20, 30, 45, 60, 90, 120, 180, 300, 600),
            registry=r,
        )
        # issue 23: an overlapped reload's two trees, and how each one ended
        self._overlap_trees = _prom.Gauge(
            "vsup_overlap_trees",
            "trees of an overlapped reload now, by role: serving (gets new requests), loading "
            "(the new one, not yet proven), retiring (the old one, draining then stopped)",
            ["role"],
            registry=r,
        )
        self._overlaps = _prom.Counter(
            "vsup_overlap_reloads",
            "reloads that asked to overlap, by outcome: switched, rolled_back, cancelled, fallback",
            ["outcome"],
            registry=r,
        )

    # -- endpoint -------------------------------------------------------------------------------

    def start(self, host: str, port: int) -> bool:
        """Serve /metrics on host:port in a background thread; False if not available."""
        if not self.available:
            log.warning(
                "metrics: prometheus_client is not installed (pip install 'vsup[metrics]'); "
                "no endpoint on %s:%d",
                host,
                port,
            )
            return False
        self._server, self._thread = _prom.start_http_server(port, addr=host, registry=self.registry)
        return True

    @property
    def address(self) -> tuple[str, int] | None:
        """The bound (host, port), or None when not serving."""
        if self._server is None:
            return None
        host, port = self._server.server_address[:2]
        return host, port

    def stop(self) -> None:
        """Stop serving and free the port; idempotent."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    # -- what the daemon reports --------------------------------------------------------------

    def set_state(self, name: str) -> None:
        if not self.available:
            return
        if name not in self._states:
            self._states.append(name)
        for s in self._states:
            self._state.labels(state=s).set(1 if s == name else 0)

    def restart(self, reason: str) -> None:
        if self.available:
            self._restarts.labels(reason=reason).inc()

    def detection(self, kind: str, latency_s: float) -> None:
        if self.available:
            self._detections.labels(kind=kind).inc()
            self._latency.set(latency_s)

    def cleanup(self, killed: int, unlinked: int, bytes_freed: int) -> None:
        if self.available:
            self._killed.inc(killed)
            self._unlinked.inc(unlinked)
            self._freed.inc(bytes_freed)

    def reload_phase(self, phase: str) -> None:
        """Mark ``phase`` as the one a reload is in now (and no other)."""
        if not self.available:
            return
        if phase not in self._phases:
            self._phases.append(phase)
        for p in self._phases:
            self._phase.labels(phase=p).set(1 if p == phase else 0)

    def reload_phase_done(self, phase: str, seconds: float) -> None:
        """Record how long ``phase`` took; it is no longer current."""
        if not self.available:
            return
        if phase not in self._phases:
            self._phases.append(phase)
        self._phase.labels(phase=phase).set(0)
        self._phase_s.labels(phase=phase).set(seconds)

    def gpu(self, index: int, used_bytes: int, total_bytes: int, model_bytes: int | None = None) -> None:
        if not self.available:
            return
        g = str(index)
        self._gpu_used.labels(gpu=g).set(used_bytes)
        self._gpu_total.labels(gpu=g).set(total_bytes)
        if model_bytes is not None:
            self._gpu_model.labels(gpu=g).set(model_bytes)

    # -- the proxy ------------------------------------------------------------------------------

    def proxy_held(self, n: int) -> None:
        if self.available:
            self._proxy_held.set(n)

    def proxy_in_flight(self, n: int) -> None:
        if self.available:
            self._proxy_in_flight.set(n)

    def proxy_hold_time(self, seconds: float) -> None:
        if self.available:
            self._proxy_hold.observe(seconds)

    def proxy_replay(self) -> None:
        if self.available:
            self._proxy_replays.inc()

    def proxy_rejected(self, reason: str) -> None:
        """reason: full, hold_timeout, refused (failed/stopped), too_large, body_timeout."""
        if self.available:
            self._proxy_rejected.labels(reason=reason).inc()

    def on_demand(self, kind: str, cause: str, seconds: float) -> None:
        """kind: unloaded, loaded, swapped; cause: idle, operator, request."""
        if self.available:
            self._on_demand.labels(kind=kind, cause=cause).inc()
            self._on_demand_s.labels(kind=kind).observe(seconds)

    def overlap_roles(self, roles: dict[str, int]) -> None:
        """How many trees of an overlapped reload hold each role now ({} when none runs)."""
        if self.available:
            for role in ("serving", "loading", "retiring"):
                self._overlap_trees.labels(role=role).set(roles.get(role, 0))

    def overlap_outcome(self, outcome: str) -> None:
        if self.available:
            self._overlaps.labels(outcome=outcome).inc()
