"""The watchers that turn a running server into observations: its log, its readiness, its
probes while ready, the drain before a reload.

Each watcher only reads and posts (`post(obs)` puts on the owner's queue); none writes the
owner's state. They take the owner's generation number so what they post after their tree is
gone is dropped by the owner.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Protocol

from .config import Config, ModelConfig
from .observations import HangEvidence, LogSignal, NotReady, Probe, ReadyProven
from .probes import ProbeResult

if TYPE_CHECKING:  # set by the runtime, which imports them where they may fail
    from .logparse import LogLine
    from .logtail import LogTailer
    from .signatures import Catalog

# Signature kinds that end a server at once (engine death is acted on whether or not the API
# server exits), kinds that are one strike against a ready server, and start-up failures.
FATAL_KINDS = frozenset({"engine_dead", "worker_died", "oom", "nccl_error", "startup_failed"})
STRIKE_KINDS = frozenset({"shm_stall"})
LINE_RING = 4000
DRAIN_IDLE_S = 1.0  # reload's drain: no running or waiting request for this long
DRAIN_POLL_S = 0.25
READINESS_POLL_S = 0.5  # the server is loading; poll politely

Post = Callable[[Any], None]


class Clock:
    """Monotonic and wall time, and sleeping; the in-process tests pass their own."""

    def monotonic(self) -> float:
        return time.monotonic()

    def time(self) -> float:
        return time.time()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


class ProberLike(Protocol):
    async def health(self) -> ProbeResult: ...
    async def models(self, name: str) -> ProbeResult: ...
    async def canary(self, model: str, prompt: str, max_tokens: int, timeout_s: float) -> ProbeResult: ...
    async def metrics(self) -> ProbeResult: ...
    async def aclose(self) -> None: ...


# ---- the log -----------------------------------------------------------------------------------


class LogWatch:
    """Lines from the tailer (on the loop thread): parsed, matched, kept in a ring; what the
    owner acts on is posted. Counts completions served (the remedy ladder's "first requests")."""

    def __init__(
        self, post: Post, gen: Callable[[], int], clock: Clock, redact: Callable[[str], str]
    ) -> None:
        self._post = post
        self._gen = gen
        self._clock = clock
        self._redact = redact
        self.lines: collections.deque[str] = collections.deque(maxlen=LINE_RING)
        self.total = 0
        self._at_spawn = 0
        self.served = 0  # completions served since the current tree started
        self.catalog: Catalog | None = None
        self.parse: Callable[[str], LogLine] | None = None
        self.tailer: LogTailer | None = None
        self.path: str | None = None

    def new_tree(self) -> None:
        self._at_spawn = self.total
        self.served = 0

    def since_spawn(self) -> list[str]:
        n = min(self.total - self._at_spawn, len(self.lines))
        return list(self.lines)[-n:] if n > 0 else []

    def on_lines(self, lines: list[str]) -> None:
        now = self._clock.monotonic()
        for raw in lines:
            self.lines.append(raw)
            self.total += 1
            if self.parse is None or self.catalog is None:  # set together, or neither
                continue
            m = self.catalog.match(self.parse(raw))
            if m is None:
                continue
            kind = m.sig.kind
            if kind == "serving":
                g = m.groups
                if (
                    g.get("method") == "POST"
                    and str(g.get("path", "")).startswith("/v1/")
                    and g.get("status") == 200
                ):
                    self.served += 1
                continue
            if kind in FATAL_KINDS or kind in STRIKE_KINDS or kind == "ready":
                msg = self._redact(m.line.message)
                self._post(LogSignal(self._gen(), kind, m.sig.id, msg, m.line.process, m.line.pid, now))

    async def catch_up(self, timeout: float = 1.5) -> None:
        """Let the tailer reach the end of the log before explaining a failure: the exit
        (SIGCHLD) usually arrives before the tailer thread has read the dying words."""
        if self.tailer is None or self.path is None:
            return
        try:
            size = os.stat(self.path).st_size
        except OSError:
            return
        end = self._clock.monotonic() + timeout
        # polled: the tailer is a thread with no event to wait on; 1.5 s at most, on a failure only
        while getattr(self.tailer, "position", size) < size and self._clock.monotonic() < end:  # noqa: ASYNC110 - see above
            await asyncio.sleep(0.02)
        await asyncio.sleep(0)  # let call_soon_threadsafe'd line batches run

    async def settle(self, quiet_s: float = 0.5, max_s: float = 3.0) -> None:
        """Wait until the log has been quiet for `quiet_s` (at most `max_s`): a fatal line is
        followed by the traceback that names the cause, often from another process."""
        if self.tailer is None:
            return
        end = self._clock.monotonic() + max_s
        seen = self.total
        while self._clock.monotonic() < end:
            await asyncio.sleep(quiet_s)
            if self.total == seen:
                return
            seen = self.total


# ---- readiness, probes, drain -----------------------------------------------------------------


async def readiness(
    gen: int, spec: ModelConfig, cfg: Config, prober: ProberLike, post: Post, emit: Callable[..., None]
) -> None:
    """health 200, model listed, then one real canary completion: only then ready."""
    t, p = cfg.timeouts, cfg.probes
    name = spec.served_model_name or spec.model  # vLLM serves the model path unless renamed
    try:
        step = "health"
        while True:
            if step == "health":
                r = await prober.health()
                if r.ok:
                    emit("probe", probe="health", ok=True)
                    step = "models"
                    continue
            elif step == "models":
                r = await prober.models(name)
                if r.ok:
                    emit("probe", probe="models", ok=True, detail=r.detail)
                    step = "canary"
                    continue
            else:
                r = await prober.canary(name, p.canary_prompt, p.canary_max_tokens, t.first_canary_s)
                emit("probe", probe="canary", ok=r.ok, detail=r.detail, seconds=round(r.seconds, 3))
                # a server that answered health and listed the model but cannot complete: the
                # engine is dead or hung at its first request.
                post(ReadyProven(gen) if r.ok else NotReady(gen, f"canary failed: {r.detail}"))
                return
            await asyncio.sleep(READINESS_POLL_S)
    finally:
        await prober.aclose()


async def probe_loop(
    gen: int,
    spec: ModelConfig,
    cfg: Config,
    prober: ProberLike,
    post: Post,
    clock: Clock,
    confirm: bool,
    served_at: Callable[[], float | None] | None = None,
    quiet: Callable[[], bool] | None = None,
    in_flight: Callable[[], int] | None = None,
) -> None:
    """Canary + progress probes while ready. In confirm mode, probe again at once.

    The periodic canary is skipped when real requests proved the engine since the last one: the
    proxy saw a request succeed (`served_at`: monotonic time of the last success), or /metrics
    counted tokens that were not the canary's. A request that succeeds proves the server better
    than a canary does (GPUStack skips its inference probe so), and a saturated engine is not
    asked to fit one more request in.

    With the proxy in front (`quiet`: it has had no request in flight for a while), an idle
    engine is not read at all between canaries: the proxy sees every request, so /metrics is
    read only while there is traffic or the last reading showed work (idle CPU: one canary a
    canary_interval_s). Requests that bypass the proxy are then seen by the canary alone.

    The proxy's count of requests in flight to this tree (`in_flight`) counts as running too:
    vLLM's `num_requests_running` comes with the engine core's outputs, so an engine that hung
    while idle still says 0 with requests stuck in it (a hang found by the canary after 12-13 s
    in the benchmark's fault 3, 1 request/s; with the count, after stall_s). A strike is only a
    strike: the hang check's token and prompt counters clear a long prefill or a pooling model."""
    t, p = cfg.timeouts, cfg.probes
    name = spec.served_model_name or spec.model
    last_tokens: float | None = None
    canary_tokens = 0
    last_change = clock.monotonic()
    next_canary = clock.monotonic() + (0 if confirm else p.canary_interval_s or float("inf"))
    last_canary = clock.monotonic()
    generated = False  # tokens not ours since the last canary
    busy = True
    try:
        while True:
            m = None
            if confirm or busy or quiet is None or not quiet():
                m = await prober.metrics()
            else:
                last_tokens = None  # a new baseline at the next reading (our canaries' tokens meanwhile)
            busy = m is not None  # no metrics: keep the short period
            if m is not None and m.ok:
                tokens, running = m.data["generation_tokens"], m.data["running"]
                proxied = in_flight() if in_flight is not None else 0
                running = max(running, float(proxied))
                # Tokens not the canary's say real traffic proved the engine (no canary needed)
                # and keep the idle engine's reading period long. Any token, a canary's too, says
                # the engine steps: that is what clears a strike, and a slow engine's canary that
                # timed out after a token of it proved exactly that.
                progressed = last_tokens is not None and tokens > last_tokens + canary_tokens
                stepped = last_tokens is not None and tokens > last_tokens
                generated = generated or progressed
                canary_tokens = 0
                busy = progressed or running > 0 or m.data["waiting"] > 0
                if last_tokens is None or stepped or running == 0:
                    last_change = clock.monotonic()
                last_tokens = tokens
                stuck_for = clock.monotonic() - last_change
                if running > 0 and stuck_for >= p.stall_s:
                    what = f"{running:g} running" if running > proxied else f"{proxied} in flight (proxy)"
                    detail = f"{what}, no token generated for {stuck_for:.0f}s"
                    post(Probe(gen, ProbeResult("progress", False, detail)))
                    last_change = clock.monotonic()
                elif stepped:
                    post(Probe(gen, replace(m, data={**m.data, "progressed": True})))
            elif m is not None:
                h = await prober.health()
                if not h.ok:
                    post(Probe(gen, h))
            now = clock.monotonic()
            ok_at = served_at() if served_at is not None else None
            if (
                now >= next_canary
                and not confirm
                and (generated or (ok_at is not None and ok_at > last_canary))
            ):
                # proven by real traffic since the last canary: no canary this time
                generated, last_canary = False, now
                next_canary = now + (p.canary_interval_s or float("inf"))
            if clock.monotonic() >= next_canary:
                generated, last_canary = False, clock.monotonic()
                r = await prober.canary(name, p.canary_prompt, p.canary_max_tokens, t.canary_s)
                post(Probe(gen, r))
                canary_tokens = p.canary_max_tokens  # its own tokens are not the engine's progress
                next_canary = clock.monotonic() + (p.canary_interval_s or float("inf"))
                if confirm and not r.ok:
                    next_canary = clock.monotonic()  # keep confirming until torn down or healed
                    continue
            # An idle engine (nothing running or waiting, no new tokens) has no progress to
            # watch: the canary is what proves it serves, so look again just before the next
            # one instead of every interval_s (idle CPU 0.4 % -> 0.28 % of a core in the benchmark).
            until_canary = next_canary - clock.monotonic()
            period = p.interval_s if busy or until_canary == float("inf") else until_canary
            await clock.sleep(max(0.05, min(period, until_canary)))
    finally:
        await prober.aclose()


# ---- confirming a hang (issue 17) ---------------------------------------------------------------

CHECK_GAP_S = 1.0  # between the starts of a check's two stack samples
# CPU use is measured over this window before each sample: enough to tell a spinning rank (R,
# ~100 %) from a sleeping one (the kernel counts it in 10 ms ticks); the incident keeps the
# second sample, so it gets the longer one. Every 0.1 s here is 0.1 s more before a teardown.
CHECK_CPU_S = (0.1, 0.25)
CHECK_METRICS_S = 2.0  # a /metrics reading that takes longer says nothing (None), and the check goes on

# cpu window -> a stacks.StacksReport's JSON (None when there is nothing to sample)
Sampler = Callable[[float], Awaitable[dict[str, Any] | None]]


async def hang_check(
    gen: int,
    strike: str,
    prober: ProberLike,
    sample: Sampler,
    post: Post,
    clock: Clock,
    gap_s: float = CHECK_GAP_S,
) -> None:
    """After a strike: the generated-token counter, a stack sample, another sample `gap_s`
    later, the counter again; posted as one HangEvidence. Reads only (py-spy changes nothing in
    the processes it reads): a check of a healthy server costs it two pauses of a few ms a process."""
    t0 = clock.monotonic()
    before = asyncio.ensure_future(_tokens(prober))
    try:
        first = await sample(CHECK_CPU_S[0])
        tokens_before = await before
        await clock.sleep(max(0.0, t0 + gap_s - clock.monotonic()))
        t2 = clock.monotonic()
        second = await sample(CHECK_CPU_S[1])
        tokens_after = await _tokens(prober)
    finally:
        before.cancel()  # done by now, unless the check itself was cancelled
        await prober.aclose()
    post(
        HangEvidence(gen, strike, first, second, tokens_before, tokens_after, t2 - t0, clock.monotonic() - t0)
    )


async def _tokens(prober: ProberLike) -> float | None:
    with contextlib.suppress(TimeoutError):
        m = await asyncio.wait_for(prober.metrics(), CHECK_METRICS_S)
        # prompt tokens too: an engine prefilling a long prompt steps without generating (and
        # with chunked prefill off, every stream in flight waits meanwhile: a stall strike)
        return float(m.data["generation_tokens"]) + float(m.data.get("prompt_tokens", 0.0)) if m.ok else None
    return None


async def health_once(gen: int, prober: ProberLike, post: Post) -> None:
    """One health probe now (the proxy saw the upstream refuse a connection)."""
    try:
        r = await prober.health()
        post(Probe(gen, r))
    finally:
        await prober.aclose()


async def drain(cfg: Config, prober: ProberLike, clock: Clock) -> tuple[bool, float]:
    """Wait until /metrics shows no running or waiting requests, up to drain_s.
    Returns (drained, the most requests seen in flight)."""
    end = clock.monotonic() + cfg.timeouts.drain_s
    busiest = 0.0
    idle_since: float | None = None
    try:
        while clock.monotonic() < end:
            m = await prober.metrics()
            if m.ok:
                busiest = max(busiest, m.data["running"] + m.data["waiting"])
            if m.ok and m.data["running"] == 0 and m.data["waiting"] == 0:
                # A request the API server is still tokenizing is not in the engine's counts yet
                # (measured: one sent just before the drain slipped through a single idle
                # reading): idle means idle for DRAIN_IDLE_S.
                idle_since = idle_since or clock.monotonic()
                if clock.monotonic() - idle_since >= DRAIN_IDLE_S:
                    return True, busiest
            else:
                idle_since = None
            if not m.ok and not (await prober.health()).ok:
                return True, busiest  # nothing to drain from a server that does not answer
            await clock.sleep(DRAIN_POLL_S)
        return False, busiest
    finally:
        await prober.aclose()


async def drain_traffic(cfg: Config, traffic: Any, gen: int, clock: Clock) -> tuple[bool, float]:
    """With the proxy in front, new requests are already held: wait for the ones in flight to
    the old tree to finish (the proxy counts them exactly; /metrics would miss one still being
    tokenized), up to drain_s."""
    end = clock.monotonic() + cfg.timeouts.drain_s
    busiest = float(traffic.in_flight(gen))
    while clock.monotonic() < end:
        n = traffic.in_flight(gen)
        busiest = max(busiest, float(n))
        if n == 0:
            return True, busiest
        await clock.sleep(DRAIN_POLL_S / 5)
    return False, busiest
