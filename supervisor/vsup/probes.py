"""HTTP probes of the vLLM OpenAI server: health, model list, canary completion, progress.

``/health`` is necessary but never sufficient: a V1 server with a wedged worker answers 200
for as long as it lives (78 of 78 polls over 155 s here). Only a real completion proves the
engine serves, and only the token counter in ``/metrics`` tells a slow engine from a stuck
one. Each probe returns a ``ProbeResult``; none raises for a network or protocol failure.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp


@dataclass(frozen=True)
class ProbeResult:
    probe: str  # "health" | "models" | "canary" | "metrics"
    ok: bool
    detail: str = ""
    seconds: float = 0.0
    data: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Progress:
    running: float
    waiting: float
    generation_tokens: float
    prompt_tokens: float = 0.0  # prompt tokens prefilled: a long prefill generates nothing for a while


_SERIES = (
    "vllm:num_requests_running",
    "vllm:num_requests_waiting",
    "vllm:generation_tokens_total",
    "vllm:prompt_tokens_total",
)
_VALUE = re.compile(r"(?:\{[^}\n]*\})?[ \t]+([0-9.eE+-]+|NaN)[ \t]*$")


def parse_metrics(text: str) -> Progress | None:
    """Sum the three series over all label sets; None when vLLM exports none of them.

    Finds each series' lines with str.find rather than one regex over the whole text: vLLM's
    /metrics is ~80 KB of histogram buckets, and a multi-line regex tried at every position
    cost 0.54 ms a reading against ~0.02 ms (the probe reads it every few seconds, idle too)."""
    sums: dict[str, float] = {}
    body = "\n" + text  # every series line then follows a newline, the first one too
    for name in _SERIES:
        needle = "\n" + name
        i = body.find(needle)
        while i >= 0:
            start = i + len(needle)
            end = body.find("\n", start)
            end = len(body) if end < 0 else end
            i = body.find(needle, end)
            m = _VALUE.match(body, start, end)
            if m is None:  # another series whose name begins with this one's
                continue
            try:
                v = float(m.group(1))
            except ValueError:
                continue
            if v != v:  # NaN
                continue
            sums[name] = sums.get(name, 0.0) + v
    if not sums:
        return None
    return Progress(
        sums.get("vllm:num_requests_running", 0.0),
        sums.get("vllm:num_requests_waiting", 0.0),
        sums.get("vllm:generation_tokens_total", 0.0),
        sums.get("vllm:prompt_tokens_total", 0.0),
    )


def api_key(
    args: Sequence[str], env: Mapping[str, str] | None = None, environ: Mapping[str, str] = os.environ
) -> str | None:
    """The key a vLLM started with ``args`` and ``env`` (added to ``environ``) will demand on
    /v1/*, as vLLM 0.32 decides: ``--api-key K [K2 ...]`` (the last occurrence; any of its keys
    works, we send the first) over ``VLLM_API_KEY``. None when the server is open."""
    keys: list[str] | None = None
    for i, a in enumerate(args):
        name, eq, val = a.partition("=")
        if name not in ("--api-key", "--api_key"):
            continue
        if eq:
            keys = [val]
            continue
        keys = []
        for v in args[i + 1 :]:
            if v.startswith("-"):
                break
            keys.append(v)
    if keys:
        return keys[0] or None
    merged = {**environ, **(env or {})}
    return merged.get("VLLM_API_KEY") or None


class Prober:
    """Probes one server, over one pooled aiohttp session made on first use (inside the loop).
    aiohttp, as the proxy: one HTTP stack in the daemon. It ignores proxy variables unless told
    (``trust_env`` defaults to False), so no host proxy can route a loopback probe elsewhere.
    ``api_key``: sent as a Bearer token (a server started with ``--api-key`` answers 401 to /v1/*
    without it, so it could never become ready); never logged: a failed probe's detail carries
    the status, not the headers. ``timeout_s`` bounds each probe in total (connect to last byte)."""

    def __init__(self, host: str, port: int, *, timeout_s: float, api_key: str | None = None) -> None:
        h = f"[{host}]" if ":" in host and not host.startswith("[") else host
        self.base = f"http://{h}:{port}"
        self.timeout_s = timeout_s
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=4),
                headers=self._headers,
                timeout=aiohttp.ClientTimeout(total=self.timeout_s),
                cookie_jar=aiohttp.DummyCookieJar(),
            )
        return self._session

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _get(self, probe: str, path: str) -> tuple[ProbeResult, bytes]:
        t0 = time.monotonic()
        try:
            async with self._client().get(self.base + path) as r:
                status, body = r.status, await r.read()
        except TimeoutError:
            return ProbeResult(
                probe, False, f"GET {path} timed out after {self.timeout_s:g}s", time.monotonic() - t0
            ), b""
        except aiohttp.ClientError as e:
            return ProbeResult(
                probe, False, f"GET {path}: {type(e).__name__}: {e}", time.monotonic() - t0
            ), b""
        dt = time.monotonic() - t0
        if status != 200:
            return ProbeResult(probe, False, f"GET {path} -> HTTP {status}", dt), body
        return ProbeResult(probe, True, "200", dt), body

    async def health(self) -> ProbeResult:
        return (await self._get("health", "/health"))[0]

    async def models(self, expect: str) -> ProbeResult:
        res, body = await self._get("models", "/v1/models")
        if not res.ok:
            return res
        try:
            ids = [m["id"] for m in json.loads(body).get("data", [])]
        except (ValueError, KeyError, TypeError, AttributeError):
            return ProbeResult("models", False, "GET /v1/models: malformed JSON", res.seconds)
        if expect not in ids:
            return ProbeResult(
                "models", False, f"model {expect!r} not listed (listed: {ids})", res.seconds, {"ids": ids}
            )
        return ProbeResult("models", True, f"lists {expect!r}", res.seconds, {"ids": ids})

    async def metrics(self) -> ProbeResult:
        res, body = await self._get("metrics", "/metrics")
        if not res.ok:
            return res
        p = parse_metrics(body.decode("utf-8", "replace"))
        if p is None:
            return ProbeResult("metrics", False, "no vllm:* request/token series in /metrics", res.seconds)
        return ProbeResult(
            "metrics",
            True,
            "",
            res.seconds,
            {
                "running": p.running,
                "waiting": p.waiting,
                "generation_tokens": p.generation_tokens,
                "prompt_tokens": p.prompt_tokens,
            },
        )

    async def canary(self, model: str, prompt: str, max_tokens: int, timeout_s: float) -> ProbeResult:
        """One real chat completion. Success needs HTTP 200 and at least one choice."""
        body = {
            "model": model,
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": max_tokens,
            "temperature": 0,
        }
        t0 = time.monotonic()
        try:
            async with self._client().post(
                self.base + "/v1/chat/completions", json=body, timeout=aiohttp.ClientTimeout(total=timeout_s)
            ) as r:
                status, raw = r.status, await r.read()
        except TimeoutError:
            return ProbeResult("canary", False, f"no completion within {timeout_s:g}s", time.monotonic() - t0)
        except aiohttp.ClientError as e:
            return ProbeResult("canary", False, f"{type(e).__name__}: {e}", time.monotonic() - t0)
        dt = time.monotonic() - t0
        if status != 200:
            snippet = raw[:200].decode("utf-8", "replace").replace("\n", " ")
            return ProbeResult("canary", False, f"HTTP {status}: {snippet}", dt)
        try:
            choices = json.loads(raw)["choices"]
            ok = bool(choices)
        except (ValueError, KeyError, TypeError):
            ok = False
        if not ok:
            return ProbeResult("canary", False, "HTTP 200 without choices", dt)
        return ProbeResult("canary", True, f"completed in {dt:.2f}s", dt)
