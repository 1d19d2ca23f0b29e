"""What a client sees during a fault: four request streams against the address clients use.

Every `interval` seconds each of four clients sends one 4-token chat completion, each in its own
thread so a hung request never delays the next:

- `openai` non-streaming and streaming: the official `openai` package at its defaults
  (`max_retries=2`, its backoff) except its timeout, 600 s by default, cut to 60 s;
- `plain` non-streaming and streaming: httpx, no retries, a 60 s timeout.

Outcomes, judged at a frozen moment (`tally(t_freeze)`): *ok* = a complete answer within
`HUNG_S` of sending it (non-streaming: 200 with a choice; streaming: a chunk with a
`finish_reason`, or `data: [DONE]`, and no error event); *failed* = an error answer within
`HUNG_S` (an exception after the client's own retries, a non-200, an error event, a stream cut
short); *hung* = no answer within `HUNG_S` (still open, or answered later than that);
*waiting* = still open at the freeze and younger than `HUNG_S`.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from dataclasses import dataclass
from typing import Any

import httpx
from openai.types.chat import ChatCompletionMessageParam

TIMEOUT_S = 60.0
HUNG_S = 60.0
PROMPT: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Say hi"}]
CLIENTS = (("openai", False), ("openai", True), ("plain", False), ("plain", True))


def label(client: str, stream: bool) -> str:
    return f"{client} {'streaming' if stream else 'non-streaming'}"


@dataclass
class Rec:
    client: str
    stream: bool
    sent: float
    done: float | None = None
    outcome: str = "pending"  # ok | failed
    detail: str = ""


class Load:
    """The four clients against 127.0.0.1:`port`, for whichever model is current."""

    def __init__(self, port: int, model: str, interval: float = 1.0, max_tokens: int = 4) -> None:
        import openai

        self.port, self.model, self.interval, self.max_tokens = port, model, interval, max_tokens
        self.base = f"http://127.0.0.1:{port}"
        self._openai = openai
        self.oa = openai.OpenAI(base_url=self.base + "/v1", api_key="bench", timeout=TIMEOUT_S)
        self.http = httpx.Client(trust_env=False, timeout=TIMEOUT_S)
        self.recs: list[Rec] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> Load:
        self._thread = threading.Thread(target=self._run, name="load", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop sending (requests in flight go on until close())."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)

    def close(self) -> None:
        """Stop, and close both clients: what is still open ends (after any freeze, so uncounted)."""
        self.stop()
        for c in (self.oa, self.http):
            with contextlib.suppress(Exception):  # closing under open requests may raise; nothing to do
                c.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            for client, stream in CLIENTS:
                threading.Thread(target=self._one, args=(client, stream, self.model), daemon=True).start()
            self._stop.wait(self.interval)

    def _one(self, client: str, stream: bool, model: str) -> None:
        r = Rec(client, stream, time.time())
        with self._lock:
            self.recs.append(r)
        try:
            ok, detail = (self._openai_one if client == "openai" else self._plain_one)(stream, model)
        except Exception as e:  # noqa: BLE001 - every failure is an outcome the table counts
            code = getattr(e, "status_code", None)
            ok, detail = False, f"{type(e).__name__}{f' {code}' if code else ''}: {e}"[:200]
        r.detail = detail
        r.outcome = "ok" if ok else "failed"
        r.done = time.time()

    def _openai_one(self, stream: bool, model: str) -> tuple[bool, str]:
        if not stream:
            resp = self.oa.chat.completions.create(model=model, messages=PROMPT, max_tokens=self.max_tokens)
            return bool(resp.choices), "" if resp.choices else "no choices"
        finished = False
        for chunk in self.oa.chat.completions.create(
            model=model,
            messages=PROMPT,
            max_tokens=self.max_tokens,
            stream=True,
        ):
            if chunk.choices and chunk.choices[0].finish_reason is not None:
                finished = True
        return finished, "" if finished else "stream ended without a finish_reason"

    def _plain_one(self, stream: bool, model: str) -> tuple[bool, str]:
        body: dict[str, Any] = {
            "model": model,
            "messages": PROMPT,
            "max_tokens": self.max_tokens,
            "stream": stream,
        }
        url = self.base + "/v1/chat/completions"
        if not stream:
            resp = self.http.post(url, json=body)
            if resp.status_code != 200:
                return False, f"http_{resp.status_code}"
            return bool(resp.json().get("choices")), ""
        with self.http.stream("POST", url, json=body) as resp:
            if resp.status_code != 200:
                return False, f"http_{resp.status_code}"
            for line in resp.iter_lines():
                if line == "data: [DONE]":
                    return True, ""
                if line.startswith("data: "):
                    try:
                        ev = json.loads(line[6:])
                    except ValueError:
                        continue
                    if "error" in ev:
                        return False, f"error event: {str(ev['error'])[:120]}"
        return False, "stream ended without [DONE]"

    # ---- reading the outcomes ----------------------------------------------------------------

    def snapshot(self, t_freeze: float) -> list[Rec]:
        """Every request as it stood at `t_freeze` (answers after it count as not yet come)."""
        with self._lock:
            recs = list(self.recs)
        out = []
        for r in recs:
            if r.sent >= t_freeze:
                continue
            if r.done is not None and r.done > t_freeze:
                r = Rec(r.client, r.stream, r.sent)
            out.append(r)
        return out

    def first_ok_after(self, t: float, t_freeze: float | None = None) -> Rec | None:
        """The earliest-answered success among requests sent at or after `t`."""
        oks = [
            r
            for r in self.snapshot(t_freeze or time.time())
            if r.sent >= t and r.outcome == "ok" and r.done is not None
        ]
        return min(oks, key=lambda r: r.done or 0.0) if oks else None

    def pending_young(self, now: float) -> int:
        with self._lock:
            return sum(1 for r in self.recs if r.done is None and now - r.sent < HUNG_S)

    def tally(self, t0: float, t_freeze: float) -> dict[str, dict[str, Any]]:
        """Per client kind, the requests sent from `t0` on: ok, failed, hung, waiting, slowest ok."""
        out: dict[str, dict[str, Any]] = {}
        for client, stream in CLIENTS:
            d: dict[str, Any] = {
                "sent": 0,
                "ok": 0,
                "failed": 0,
                "hung": 0,
                "waiting": 0,
                "slowest_ok_s": None,
            }
            why: dict[str, int] = {}
            for r in self.snapshot(t_freeze):
                if r.client != client or r.stream != stream or r.sent < t0:
                    continue
                d["sent"] += 1
                took = (r.done if r.done is not None else t_freeze) - r.sent
                if took > HUNG_S:
                    d["hung"] += 1
                elif r.done is None:
                    d["waiting"] += 1
                elif r.outcome == "ok":
                    d["ok"] += 1
                    d["slowest_ok_s"] = max(d["slowest_ok_s"] or 0.0, round(took, 2))
                else:
                    d["failed"] += 1
                    key = r.detail.split(":")[0][:40]
                    why[key] = why.get(key, 0) + 1
            d["failures"] = why
            out[label(client, stream)] = d
        return out
