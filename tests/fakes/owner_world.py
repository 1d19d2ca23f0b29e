"""The owner (vsup.daemon.Supervisor) in-process: a FakeHost for the OS, a fake spawner whose
"servers" are FakeHost processes holding a segment, a fake prober that answers from each
server's scripted mode, and a harness that runs the owner task and records everything.

A server's mode says how it behaves:
  ready     health, models and canary succeed
  loading   health never answers (a model that loads for ever)
  broken    health and models answer, the canary fails (engine dead at the first request)
  exit      exits right after the spawn (a start-up failure)
  stubborn  like ready, but ignores SIGTERM (vLLM waiting on an open connection)
  hung      health answers, a canary never completes (set on a running server)
"""

from __future__ import annotations

import asyncio
import itertools
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

from fakes.fake_host import FakeHost
from support import write_config
from vsup import config as config_mod
from vsup.daemon import Supervisor
from vsup.events import EventLog
from vsup.launch import Spawned
from vsup.observations import Exited, Shutdown
from vsup.probes import ProbeResult
from vsup.proctree import IpcRef, ProcRef, TreeRecord

MODELS = {"a": "model-a", "b": "model-b"}
P = ParamSpec("P")
R = TypeVar("R")


@dataclass
class Server:
    pid: int
    gen: int
    model: str
    mode: str
    segment: str
    port: int = 0
    private_tmp: bool = False


@dataclass
class World:
    host: FakeHost = field(default_factory=FakeHost)
    modes: dict[str, str] = field(default_factory=lambda: {"model-a": "ready", "model-b": "ready"})
    servers: list[Server] = field(default_factory=list)
    max_alive: int = 0  # the most trees alive at once, seen at every spawn
    post: Any = None  # the owner's post(), for exits
    gen: Any = None  # the owner's generation, read at a spawn
    _pids: Any = field(default_factory=lambda: itertools.count(5000, 10))

    def current(self) -> Server | None:
        for s in reversed(self.servers):
            if s.pid in self.host.procs:
                return s
        return None

    def alive_trees(self) -> list[Server]:
        return [s for s in self.servers if s.pid in self.host.procs]


class WorldHost(FakeHost):
    """A FakeHost that tells the owner when a server (a tree leader) exits, as SIGCHLD would."""

    world: World

    def _exit(self, p: Any) -> None:
        super()._exit(p)
        for s in self.world.servers:
            if s.pid == p.pid and self.world.post is not None:
                self.world.post(Exited(s.gen, s.pid, 0))


class FakeSpawner:
    def __init__(self, world: World) -> None:
        self.world = world

    def spawn(
        self,
        argv: list[str],
        env: dict[str, str],
        log_path: Path,
        *,
        model: str,
        port: int,
        private_tmp: bool = False,
    ) -> Spawned:
        w, h = self.world, self.world.host
        pid = next(w._pids)
        mode = w.modes.get(model, "ready")
        p = h.add_proc(
            pid, h.me, pid, ("python", "-m", "vllm.entrypoints.openai.api_server", "--model", model), ct=h.t
        )
        if mode == "stubborn":
            p.on_term = "ignore"
        seg = f"psm_{pid:x}"
        dev, ino = h.add_shm(seg, born=h.t)
        h.hold(pid, seg)
        server = Server(pid, w.gen(), model, mode, seg, port, private_tmp)
        w.servers.append(server)
        w.max_alive = max(w.max_alive, len(w.alive_trees()))
        leader = ProcRef(pid, h.t, "python", list(argv))
        rec = TreeRecord(
            id=f"t{pid}",
            model=model,
            port=port,
            started_at=h.t,
            leader=leader,
            sid=pid,
            pgid=pid,
            procs=[leader],
            ipc=[IpcRef(seg, "shm", dev, ino, 4096)],
        )
        if mode == "exit":
            h.procs[pid].dies_at = h.t
            asyncio.get_running_loop().call_soon(h._tick)
        return Spawned(pid, rec)


class FakeProber:
    """Probes the server listening on `port` (the newest alive one there), or, without a port,
    the newest alive server."""

    def __init__(self, world: World, port: int | None = None) -> None:
        self.world = world
        self.port = port

    def _mode(self) -> str:
        w = self.world
        s = next((s for s in reversed(w.alive_trees()) if s.port == self.port), None) if self.port else None
        s = s or (w.current() if self.port is None else None)
        return "gone" if s is None else s.mode

    async def health(self) -> ProbeResult:
        await asyncio.sleep(0)
        return ProbeResult("health", self._mode() in ("ready", "broken", "stubborn", "hung"), "fake")

    async def models(self, name: str) -> ProbeResult:
        await asyncio.sleep(0)
        return ProbeResult("models", self._mode() in ("ready", "broken", "stubborn"), name)

    async def canary(self, model: str, prompt: str, max_tokens: int, timeout_s: float) -> ProbeResult:
        await asyncio.sleep(0.01)
        while self._mode() == "hung":  # noqa: ASYNC110 - answers health, never completes (the test flips the mode)
            await asyncio.sleep(0.02)
        ok = self._mode() in ("ready", "stubborn")
        return ProbeResult("canary", ok, "ok" if ok else "500 engine dead", 0.01)

    async def metrics(self) -> ProbeResult:
        await asyncio.sleep(0)
        ok = self._mode() in ("ready", "stubborn", "broken")
        return ProbeResult("metrics", ok, "", data={"running": 0.0, "waiting": 0.0, "generation_tokens": 0.0})

    async def aclose(self) -> None:
        return None


async def inline(fn: Callable[P, R], /, *args: P.args, **kw: P.kwargs) -> R:
    """The owner's offload, run inline: FakeHost is not thread-safe, and its clock is fake."""
    return fn(*args, **kw)


FAST = {
    "timeouts": {
        "start_s": 5.0,
        "stop_grace_s": 0.2,
        "canary_s": 0.5,
        "first_canary_s": 0.5,
        "probe_s": 0.5,
        "cleanup_grace_s": 0.1,
        "kill_wait_s": 0.2,
        "drain_s": 0.3,
        "gpu_release_s": 0.0,
    },
    "restart": {"backoff_initial_s": 0.01, "backoff_max_s": 0.05, "max_failures": 3, "window_s": 60.0},
    "probes": {"interval_s": 0.1, "canary_interval_s": 0.2, "stall_s": 5.0, "confirm": 2},
}


class FakeTraffic:
    """What the proxy would show the owner (vsup.gate.Traffic): requests in flight and held, by
    model, as a test sets them."""

    def __init__(self) -> None:
        self.flight = 0
        self.wait: dict[str | None, float] = {}  # model -> oldest held since (monotonic)
        self.use: dict[str | None, float] = {}  # model (None: any) -> last arrival or end

    def request(self, model: str | None = None, held: bool = False) -> None:
        now = time.monotonic()
        self.use[None] = now
        if model is not None:
            self.use[model] = now
        if held:
            self.wait.setdefault(model, now)

    def in_flight(self, gen: int | None = None) -> int:
        return self.flight

    def held(self) -> int:
        return len(self.wait)

    def oldest_held_s(self) -> float | None:
        return time.monotonic() - min(self.wait.values()) if self.wait else None

    def last_success_at(self) -> float | None:
        return None

    def last_activity_at(self, model: str | None = None) -> float | None:
        return self.use.get(model)

    def waiting(self) -> dict[str | None, float]:
        return dict(self.wait)

    def stats(self) -> dict[str, object]:
        return {"in_flight": self.flight, "held": self.held()}


def make_config(tmp: Path, **over: dict[str, Any]) -> config_mod.Config:
    sections: dict[str, dict[str, Any]] = {
        "vllm": {
            "python": sys.executable,
            "model": MODELS["a"],
            "served_model_name": "a",
            "port": 8999,
            "log_file": str(tmp / "vllm.log"),
        },
        "daemon": {"state_dir": str(tmp / "state"), "socket": str(tmp / "run" / "vsup.sock")},
        "models.a": {"model": MODELS["a"], "served_model_name": "a"},
        "models.b": {"model": MODELS["b"], "served_model_name": "b"},
    }
    for k, v in FAST.items():
        sections[k] = dict(v)
    for k, v in over.items():
        sections.setdefault(k, {}).update(v)
    tmp.mkdir(parents=True, exist_ok=True)
    return config_mod.load(write_config(tmp / "vsup.toml", sections))


class Owner:
    """One Supervisor running in this event loop against a World. Use as `async with`."""

    def __init__(self, tmp: Path, *, autostart: bool = True, world: World | None = None, **over: Any) -> None:
        self.world = world or World(host=WorldHost())
        if isinstance(self.world.host, WorldHost):
            self.world.host.world = self.world
        self.cfg = make_config(tmp, **over)
        self.events = EventLog(self.cfg.state_dir, stream=None, ring=100_000)
        self.sup = Supervisor(
            self.cfg,
            events=self.events,
            autostart=autostart,
            host=self.world.host,
            prober=lambda cfg, spec: FakeProber(self.world, cfg.vllm.port),
            spawner=FakeSpawner(self.world),
            offload=inline,
        )
        self.world.post = self.sup.post
        self.world.gen = lambda: self.sup.gen
        self.task: asyncio.Task[None] | None = None
        self.replies: list[asyncio.Task[Any]] = []

    async def __aenter__(self) -> Owner:
        self.task = asyncio.get_running_loop().create_task(self.sup._main())
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.shutdown()

    async def shutdown(self, timeout: float = 20) -> None:
        if self.task is None or self.task.done():
            return
        self.sup.post(Shutdown("SIGTERM"))
        await asyncio.wait_for(self.task, timeout)

    # driving
    def command(self, name: str, **args: Any) -> asyncio.Task[Any]:
        """Submit a command as a socket handler would; the task holds its one reply."""
        t = asyncio.get_running_loop().create_task(self.sup.submit(name, args))
        self.replies.append(t)
        return t

    async def reply(self, t: asyncio.Task[Any], timeout: float = 10) -> tuple[bool, Any]:
        """(ok, result) or (False, CommandError) of a command task."""
        try:
            return True, await asyncio.wait_for(asyncio.shield(t), timeout)
        except TimeoutError:
            raise
        except Exception as e:  # noqa: BLE001 - the error is the result being checked
            return False, e

    async def until(self, pred: Any, timeout: float = 10, what: str = "condition") -> Any:
        end = asyncio.get_running_loop().time() + timeout
        while True:
            if self.task is not None and self.task.done():
                self.task.result()  # the owner ended: raise what ended it
            v = pred()
            if v:
                return v
            if asyncio.get_running_loop().time() > end:
                raise AssertionError(f"timed out waiting for {what}; state {self.sup.snap}")
            await asyncio.sleep(0.005)

    async def state(self, state: str, phase: str | None = None, timeout: float = 10) -> None:
        s = self.sup.snap

        def there() -> bool:
            s = self.sup.snap
            return str(s.state) == state and (phase is None or s.phase == phase)

        await self.until(there, timeout, f"state {state} phase {phase} (now {s.state} {s.phase})")

    # observing
    def evs(self, name: str | None = None) -> list[dict[str, Any]]:
        return [e for e in self.events.recent if name is None or e["event"] == name]

    def transitions(self) -> list[tuple[str, str]]:
        return [(e["old"], e["state"]) for e in self.evs("state") if e["old"] != e["state"]]
