"""vsup as a container's entrypoint: the three probes, the termination message, PID 1 facts.

The kubelet's probes are HTTP requests to the proxy's port (``Proxy.add_local``). Each answers
a different question, and none of them is vLLM's own ``/health``, which says 200 while the
engine is hung or dead (vllm#39863, #36960, kserve#6259):

- ``/livez``: is vsup's own loop alive? The watchdog's rule: the owner's heartbeat (it wakes
  at least every second) is fresh, or the owner is inside a bounded step (teardown, cleanup)
  whose deadline has not passed. Never vLLM's health: a hung vLLM is vsup's to restart, and a
  kubelet that restarted the container for it would throw away vsup's diagnosis, its backoff
  and the remedy ladder. If the event loop itself is blocked, the probe gets no answer at all,
  which the kubelet counts as a failure too.
- ``/readyz``: should the Service send this pod traffic? ``[daemon] readiness`` decides:
  ``serving`` (the shipped manifests' choice, several replicas) = 200 only while a proven-ready
  server is routed: during a load, a reload, a hang or a restart the Service sends clients to a
  ready replica instead of holding them here. ``hold`` (one replica) = 200 also while a server
  is coming and requests are held: with one replica a 503 would empty the Service's endpoints
  and clients would get connection errors instead of the proxy's hold. Both say 200 while the
  model is off-loaded (idle or `vsup unload`, issue 16): the pod takes requests, the first one
  loads the model and is held meanwhile, like vsup's own ``/health``; a 503 there would take an
  idle pod out of the Service for good, since only a request can wake it. Both say 503 once
  shutdown has begun and while nothing is coming (stopped by an operator, failed).
- ``/startupz``: has the first model been proven ready (health, model listed, a canary
  completion) since vsup started? Until then the kubelet holds back the other two probes; its
  ``failureThreshold x periodSeconds`` is the longest a first load may take.

The bodies are small JSON objects saying why, for `kubectl describe pod` and humans.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

# Kubernetes keeps at most 4096 bytes of a container's termination message.
TERMINATION_MESSAGE_MAX = 4096
# The owner wakes at least every HEARTBEAT_S (1 s); the watchdog allows twice that. A probe
# allows more: the kubelet acts only after failureThreshold misses anyway, and a 2-core box
# loading a model can delay the loop by seconds without anything being wrong.
LIVENESS_STALE_S = 10.0


@dataclass(frozen=True)
class View:
    """What the probes read from the owner, at one moment (monotonic times)."""

    now: float
    heartbeat: float  # when the owner last woke
    bounded_until: float  # deadline of the bounded step in progress (0: none)
    state: str  # the owner's state
    routed: bool  # a proven-ready server is routed (the gate's route has an upstream)
    holding: bool  # no upstream, but requests are held: a server is coming
    loaded: bool  # a model has been proven ready since vsup started
    shutting_down: bool
    idle: bool = False  # off-loaded: no server, but a request loads one (and is held meanwhile)


Answer = tuple[int, dict[str, Any]]


def livez(v: View, stale_s: float | None = None) -> Answer:
    stale_s = LIVENESS_STALE_S if stale_s is None else stale_s  # read at call time: tests lower it
    age = v.now - v.heartbeat
    if age < stale_s:
        return 200, {"alive": True, "heartbeat_age_s": round(age, 3)}
    if v.now < v.bounded_until:
        return 200, {"alive": True, "bounded_for_s": round(v.bounded_until - v.now, 3)}
    return 503, {
        "alive": False,
        "heartbeat_age_s": round(age, 3),
        "reason": f"vsup's owner has not woken for {age:.1f} s outside a bounded step",
    }


def readyz(v: View, mode: str) -> Answer:
    body: dict[str, Any] = {"state": v.state, "readiness": mode}
    if v.shutting_down:
        return 503, {**body, "ready": False, "reason": "shutting down"}
    if v.routed:
        return 200, {**body, "ready": True}
    if v.idle:
        return 200, {**body, "ready": True, "idle": True}
    if mode == "hold" and v.holding:
        return 200, {**body, "ready": True, "holding": True}
    why = "a server is coming; requests go to a ready replica" if v.holding else "no server is coming"
    return 503, {**body, "ready": False, "reason": why}


def startupz(v: View) -> Answer:
    if v.loaded:
        return 200, {"started": True, "state": v.state}
    return 503, {"started": False, "state": v.state, "reason": "the first model is not proven ready yet"}


PATHS: dict[str, Callable[[View, str], Answer]] = {
    "/livez": lambda v, _mode: livez(v),
    "/readyz": readyz,
    "/startupz": lambda v, _mode: startupz(v),
}


class Probes:
    """The three endpoints over a `read` of the owner's View; `on_event` (an EventLog
    subscriber) notices the first proven-ready state, so a short-lived ready is never missed."""

    def __init__(self, read: Callable[[], View], mode: str) -> None:
        self._read = read
        self.mode = mode
        self.loaded = False

    def on_event(self, ev: dict[str, Any]) -> None:
        if ev.get("event") == "state" and ev.get("state") == "ready":
            self.loaded = True

    def view(self) -> View:
        v = self._read()
        return v if v.loaded or not self.loaded else replace(v, loaded=True)

    def answer(self, path: str) -> Answer | None:
        fn = PATHS.get(path)
        return None if fn is None else fn(self.view(), self.mode)

    def aiohttp_handlers(self) -> dict[str, Any]:
        """{path: aiohttp handler} for `Proxy.add_local`."""
        from aiohttp import web

        def handler(path: str) -> Any:
            async def handle(request: web.Request) -> web.StreamResponse:
                status, body = PATHS[path](self.view(), self.mode)
                return web.json_response(body, status=status, headers={"Cache-Control": "no-store"})

            return handle

        return {path: handler(path) for path in PATHS}


# ---- the termination message ----------------------------------------------------------------


def write_termination_message(reason: str, path: str = "/dev/termination-log") -> bool:
    """Write `reason` to Kubernetes' terminationMessagePath, only if the file exists (the kubelet
    mounts it; vsup never creates it elsewhere). Cut to 4096 bytes. True when written."""
    data = reason.encode("utf-8", "replace")
    if len(data) > TERMINATION_MESSAGE_MAX:
        data = data[: TERMINATION_MESSAGE_MAX - 3] + b"..."
    try:
        fd = os.open(path, os.O_WRONLY | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        os.write(fd, data)
    except OSError:
        return False
    finally:
        os.close(fd)
    return True


def failure_message(state: str, reason: str | None, restarts: int, model: str | None) -> str:
    """The termination message for a server that ended `failed`: one line, then JSON."""
    head = f"vsup: the vLLM server ended {state}: {reason or 'no reason recorded'}"
    detail = {"state": state, "reason": reason, "restarts": restarts, "model": model, "ts": time.time()}
    return head + "\n" + json.dumps(detail)


# ---- PID 1 --------------------------------------------------------------------------------------


def is_pid1() -> bool:
    """vsup is the first process of its PID namespace (a container's entrypoint): the kernel
    reparents every orphan of the namespace to it, delivers no signal it has no handler for,
    and kills the whole namespace when it exits."""
    return os.getpid() == 1
