"""One measured episode: a fresh supervisor serving tiny-a, one fault, what happens next.

Times are wall-clock (`time.time()`) so they compare with vsup's event timestamps. The
background client sends one chat completion (4 tokens) every `CLIENT_INTERVAL_S` with a
`CLIENT_TIMEOUT_S` timeout, each in its own thread so a hung request does not delay the next;
"time to serve again" is when the first request *sent after the fault* completes with 200, so
its resolution is the client interval.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

import clients
import procs
from fronts import HAProxy
from supervisors import Supervisor, Vsup, VsupProxy
from vsup.starting import REFRESH_AFTER_READY_S

IDLE_SETTLE_S = REFRESH_AFTER_READY_S + 5.0  # from ready to the idle window (measure_idle)

CLIENT_INTERVAL_S = 1.0
# Longer than any healthy completion of 4 tokens here (the first after a start took ~3 s on a
# busy machine), far shorter than a hang.
CLIENT_TIMEOUT_S = 10.0
START_TIMEOUT_S = 300.0  # a fresh supervisor to its first completion
DEBRIS_AFTER_S = 30.0  # debris is counted this long after the supervisor's first action
WATCH_S = 300.0  # the most any fault other than the hang is watched
FAULT4_WATCH_S = 90.0  # fault 4 is watched at least this long
SETTLE_S = 10.0  # after the watch, requests still open and younger than clients.HUNG_S get this long
# vsup events that are the supervisor acting on a fault (the first one after the fault counts)
ACT_EVENTS = {"detection", "state", "teardown", "cleanup", "leftovers_found"}

FAULTS = {
    1: "SIGKILL API server",
    2: "SIGKILL worker TP1",
    3: "SIGSTOP worker TP1 (request in flight)",
    4: "SIGKILL supervisor, start it again",
    5: "model swap tiny-a -> tiny-b",
}


@dataclass
class Req:
    sent: float
    done: float | None = None
    outcome: str = "pending"  # ok | http_NNN | refused | timeout | error


class Client:
    """A request every second against `port`, for whichever model is current."""

    def __init__(
        self, port: int, model: str, interval: float = CLIENT_INTERVAL_S, timeout: float = CLIENT_TIMEOUT_S
    ) -> None:
        self.port, self.model = port, model
        self.interval, self.timeout = interval, timeout
        self.reqs: list[Req] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def start(self) -> Client:
        self._thread = threading.Thread(target=self._run, name="client", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.is_set():
            threading.Thread(target=self._one, args=(self.model,), daemon=True).start()
            self._stop.wait(self.interval)

    def _one(self, model: str) -> None:
        r = Req(time.time())
        with self._lock:
            self.reqs.append(r)
        r.outcome = complete(self.port, model, self.timeout)
        r.done = time.time()

    def first_ok_after(self, t: float) -> Req | None:
        with self._lock:
            oks = [r for r in self.reqs if r.sent >= t and r.outcome == "ok" and r.done is not None]
        return min(oks, key=lambda r: r.done) if oks else None  # type: ignore[return-value, arg-type]  # done is set in oks

    def tally(self, t0: float, t1: float) -> dict[str, int]:
        """Requests sent in [t0, t1): completed, failed (an error answer) and hung (timed out)."""
        out = {"ok": 0, "failed": 0, "hung": 0, "pending": 0}
        with self._lock:
            for r in self.reqs:
                if t0 <= r.sent < t1:
                    key = {"ok": "ok", "timeout": "hung", "pending": "pending"}.get(r.outcome, "failed")
                    out[key] += 1
        return out


def complete(port: int, model: str, timeout: float, max_tokens: int = 4) -> str:
    try:
        r = httpx.post(
            f"http://127.0.0.1:{port}/v1/chat/completions",
            trust_env=False,
            timeout=timeout,
            json={
                "model": model,
                "messages": [{"role": "user", "content": "Say hi"}],
                "max_tokens": max_tokens,
            },
        )
    except httpx.TimeoutException:
        return "timeout"
    except httpx.ConnectError:
        return "refused"
    except httpx.HTTPError as e:
        return f"error:{type(e).__name__}"
    return "ok" if r.status_code == 200 else f"http_{r.status_code}"


def wait_serving(
    port: int, model: str, timeout: float, stop: Callable[[], bool] = lambda: False
) -> float | None:
    """Poll until a completion succeeds; the time it did, or None."""
    end = time.time() + timeout
    while time.time() < end and not stop():
        if complete(port, model, 5.0) == "ok":
            return time.time()
        time.sleep(0.5)
    return None


def port_in_use(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


def port_owner(port: int) -> int | None:
    """The pid listening on 127.0.0.1:`port`, if it is one we can see."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            if parts[3] == "0A" and int(parts[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(f"socket:[{parts[9]}]")
    if not inodes:
        return None
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            for fd in os.listdir(f"/proc/{name}/fd"):
                if os.readlink(f"/proc/{name}/fd/{fd}") in inodes:
                    return int(name)
        except OSError:
            continue
    return None


def wait_tree_complete(reg: procs.Registry, timeout: float = 60) -> procs.Tree | None:
    """The live tree once it shows the engine core, both workers, its segments and its dist id."""
    end = time.time() + timeout
    while time.time() < end:
        api = reg.live_api_server()
        tree = reg.tree_of(api.pid) if api else None
        if (
            tree
            and "Worker_TP1" in tree.titles()
            and "EngineCore" in tree.titles()
            and any(o.name.startswith("psm_") for o in tree.ipc.values())
            and tree.dist_ids
            and tree.sockets
        ):
            return tree
        time.sleep(0.5)
    return None


def measure_idle(sup: Supervisor, reg: procs.Registry, seconds: float) -> dict[str, Any]:
    """CPU (% of one core) and RSS of the supervisor's own process(es) over `seconds`, sampled 1/s.

    Its own processes: those the harness started and the helpers they spawned (not vLLM)."""
    return measure_members(sup.pids() + reg.live_helpers(), seconds)


def measure_members(members: list[procs.Member], seconds: float) -> dict[str, Any]:
    """CPU (% of one core) and RSS of `members` over `seconds`, sampled 1/s."""
    return measure_groups({"": members}, seconds)[""]


def measure_groups(groups: dict[str, list[procs.Member]], seconds: float) -> dict[str, dict[str, Any]]:
    """`measure_members` for several groups over the same window (a supervisor and its front)."""
    cpu0 = {k: sum(procs.cpu_seconds(m.pid) or 0 for m in ms) for k, ms in groups.items()}
    t0 = time.monotonic()
    rss: dict[str, list[int]] = {k: [] for k in groups}
    while time.monotonic() - t0 < seconds:
        for k, ms in groups.items():
            rss[k].append(sum(procs.rss_bytes(m.pid) or 0 for m in ms))
        time.sleep(1.0)
    dt = time.monotonic() - t0
    out = {}
    for k, ms in groups.items():
        cpu1 = sum(procs.cpu_seconds(m.pid) or 0 for m in ms)
        out[k] = {
            "seconds": round(dt, 1),
            "cpu_pct": round(100 * (cpu1 - cpu0[k]) / dt, 3),
            "rss_mb": round(sum(rss[k]) / max(1, len(rss[k])) / 1e6, 1),
            "rss_max_mb": round(max(rss[k], default=0) / 1e6, 1),
            "procs": len(ms),
        }
    return out


@dataclass
class Episode:
    supervisor: str
    fault: int
    rep: int
    cold_start_s: float | None = None
    acted_s: float | None = None
    acted_how: str = ""
    teardown_s: float | None = None  # when the old tree was acted on (vsup: teardown event; peers: new pid)
    respawn_s: float | None = None
    serve_s: float | None = None
    served_by: str = ""
    requests: dict[str, int] = field(default_factory=dict)
    inflight: str = ""
    debris: dict[str, Any] | None = None
    debris_at_serve: dict[str, Any] | None = None
    next_start: str = ""
    watch_s: float = 0.0
    idle: dict[str, Any] | None = None
    reload_phases: dict[str, float] | None = None
    harness_cleanup: list[str] = field(default_factory=list)
    left_by_stop: dict[str, Any] | None = None  # what the supervisor's own final stop left
    # issue 19: what clients see at the address they use (vsup's proxy, or HAProxy for a peer)
    front: str = ""
    clients: dict[str, dict[str, Any]] | None = None
    first_ok_s: float | None = None  # fault -> the first success among requests sent after it
    first_ok_by: str = ""
    held_max_s: float | None = None  # vsup: the longest a held request waited (proxy_release)
    idle_front: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def run_episode(
    sup: Supervisor,
    fault: int,
    rep: int,
    *,
    hang_watch_s: float,
    idle_s: float,
    log: Callable[[str], None],
    front: HAProxy | None = None,
) -> Episode:
    """One fault. Clients connect to vsup's proxy (a VsupProxy), to `front`, else to vLLM itself."""
    ep = Episode(sup.name, fault, rep)
    reg = procs.Registry(sup.port, sup.logs(), roots=lambda: {(m.pid, m.start) for m in sup.pids()}).start()
    shm_before, tmp_before = set(os.listdir(procs.SHM)), set(os.listdir(procs.TMP))
    client: clients.Load | None = None
    cport = sup.listen if isinstance(sup, VsupProxy) else front.port if front else sup.port
    ep.front = "vsup proxy" if isinstance(sup, VsupProxy) else front.name if front else "none"
    try:
        for p in {sup.port, cport}:
            if port_in_use(p):
                raise RuntimeError(f"port {p} is in use by pid {port_owner(p)}")
        if front is not None:
            front.start()
        t_launch = time.time()
        sup.start()
        up = wait_serving(sup.port, "tiny-a", START_TIMEOUT_S, stop=lambda: not sup.pids())
        if up is None:
            raise RuntimeError(f"{sup.name} did not serve within {START_TIMEOUT_S:g}s")
        ep.cold_start_s = round(up - t_launch, 1)
        if wait_serving(cport, "tiny-a", 60) is None:
            raise RuntimeError(f"nothing served at the clients' port {cport} ({ep.front}) within 60 s")
        tree = wait_tree_complete(reg)
        if tree is None:
            api = reg.live_api_server()
            t = reg.tree_of(api.pid) if api else None
            seen = (
                "no live API server on the port"
                if t is None
                else (
                    f"API server {t.leader.pid}: {len(t.live_members())} live members "
                    f"({', '.join(sorted({m.cmd.split()[0][-20:] for m in t.live_members()}))}), "
                    f"{len(t.ipc)} shm/sem, dist ids {len(t.dist_ids)}, sockets {len(t.sockets)}; trees {len(reg.trees)}"
                )
            )
            raise RuntimeError(
                f"the tree never showed engine core, workers, segments, dist id and sockets: {seen}"
            )
        if isinstance(sup, Vsup):
            _wait_vsup_ready(sup)
        log(
            f"  serving after {ep.cold_start_s:.1f}s; tree {tree.leader.pid}: "
            f"{len(tree.members)} procs, {len(tree.ipc)} shm/sem, {len(tree.sockets)} sockets, dists {len(tree.dist_ids)}"
        )
        if idle_s > 0:
            # Idle is the steady state, for every supervisor alike: vsup looks at a forming tree
            # every 2 s for its first 20 s after ready (vsup.starting.REFRESH_AFTER_READY_S),
            # then every 60 s. Round 2 began this window 3 s after ready, and its 0.350 % was
            # mostly those looks; bench_hang.py, which waits them out, measured 0.067 %.
            time.sleep(IDLE_SETTLE_S)
            groups = {"sup": sup.pids() + reg.live_helpers()}
            if front is not None:
                groups["front"] = front.pids()
            m = measure_groups(groups, idle_s)
            ep.idle, ep.idle_front = m["sup"], m.get("front")
            log(f"  idle: {ep.idle}; its front: {ep.idle_front}")
        client = clients.Load(cport, "tiny-a").start()
        t_load = time.time()
        time.sleep(3)
        old = list(reg.trees)
        old_leaders = {t.leader.pid for t in old}
        n_events = len(sup.events()) if isinstance(sup, Vsup) else 0
        t_fault, watch_s, swap_thread, inflight = _inject(
            sup, fault, reg, tree, client, hang_watch_s, ep, cport
        )
        ep.watch_s = watch_s
        t_act: float | None = None
        t_served: float | None = None
        check_at: float | None = None
        t_tree_at: float | None = None
        deadline = t_fault + watch_s
        # After a supervisor restart the old server may keep serving; watch long enough to see
        # whether the restarted supervisor's own start gets the port (a vLLM start is ~40 s).
        min_end = t_fault + (FAULT4_WATCH_S if fault == 4 else 0)
        while time.time() < deadline:
            time.sleep(0.25)
            now = time.time()
            if t_act is None:
                t_act, ep.acted_how = _action(sup, fault, reg, t_fault, old_leaders, n_events)
            if check_at is None and (t_tree := _tree_action(sup, fault, reg, t_fault, old_leaders, n_events)):
                # debris is counted from when the old tree was acted on (vsup: its teardown)
                check_at = t_tree + DEBRIS_AFTER_S
                t_tree_at = t_tree
                ep.teardown_s = round(t_tree - t_fault, 1)
                deadline = max(deadline, t_tree + WATCH_S)  # once it acts, watch it through
            if ep.respawn_s is None and (sp := reg.spawned_after(t_fault, old_leaders)):
                ep.respawn_s = round(sp[0] - t_fault, 1)
            # Served again = the first success among requests sent after the supervisor acted on
            # the old tree (after a supervisor restart the old server answers until vsup removes it).
            if (
                t_served is None
                and t_tree_at is not None
                and (ok := client.first_ok_after(t_tree_at)) is not None
            ):
                t_served = ok.done
                owner = port_owner(sup.port)
                ep.served_by = "old tree (orphan)" if owner in old_leaders else "new tree"
                ep.debris_at_serve = procs.debris(old).to_json()
            if check_at is not None and ep.debris is None and now >= check_at:
                ep.debris = procs.debris(old).to_json()
            if (
                ep.debris is not None
                and t_served is not None
                and (swap_thread is None or not swap_thread.is_alive())
                and (inflight is None or inflight)  # fault 3: its request's own outcome, too
                and now >= min_end
            ):
                break
        client.stop()
        settle = time.time() + SETTLE_S
        while time.time() < settle and client.pending_young(time.time()):
            time.sleep(0.25)
        t_freeze = time.time()
        if t_act is not None:
            ep.acted_s = round(t_act - t_fault, 1)
        if t_served is not None:
            ep.serve_s = round(t_served - t_fault, 1)
        ep.clients = client.tally(t_load, t_freeze)
        first = client.first_ok_after(t_fault, t_freeze)
        if first is not None and first.done is not None:
            ep.first_ok_s = round(first.done - t_fault, 1)
            ep.first_ok_by = f"{clients.label(first.client, first.stream)}"
        sums = {"failed": 0, "hung": 0, "pending": 0}
        for d in ep.clients.values():
            sums["failed"] += d["failed"]
            sums["hung"] += d["hung"]
            sums["pending"] += d["waiting"]
        ep.requests = sums
        client.close()
        if inflight is not None:
            if inflight:
                ep.inflight = inflight[0]
            elif t_served is not None:
                ep.inflight = (
                    f"no answer when the watch ended, {t_freeze - t_served:.0f} s after serving again"
                )
            else:
                ep.inflight = "still hung at the end of the watch"
        ep.next_start = _next_start(ep, reg, old_leaders, t_fault, sup.port)
        if isinstance(sup, Vsup):
            evs = sup.events()[n_events:]
            ep.reload_phases = {
                e["phase"]: e["seconds"] for e in evs if e.get("event") == "reload_phase"
            } or None
            ep.notes += _vsup_notes(evs)
            waits = [
                e["max_wait_s"]
                for e in evs
                if e.get("event") == "proxy_release" and isinstance(e.get("max_wait_s"), int | float)
            ]
            ep.held_max_s = round(max(waits), 1) if waits else None
        if swap_thread is not None:
            swap_thread.join(60)
    except Exception as e:  # noqa: BLE001 - one failed episode must not stop the whole benchmark
        ep.error = f"{type(e).__name__}: {e}"
        log(f"  ERROR: {ep.error}")
    finally:
        if client is not None:
            client.close()
        ep.harness_cleanup, ep.left_by_stop = _teardown(sup, reg, shm_before, tmp_before, fault)
        if front is not None:
            front.stop()
        reg.stop()
    return ep


def _wait_vsup_ready(sup: Vsup, timeout: float = 120) -> None:
    end = time.time() + timeout
    while time.time() < end:
        s = sup.status()
        if s and s.get("state") == "ready":
            return
        time.sleep(1)
    raise RuntimeError("vsup never reported state ready")


def _inject(
    sup: Supervisor,
    fault: int,
    reg: procs.Registry,
    tree: procs.Tree,
    client: Client | clients.Load,
    hang_watch_s: float,
    ep: Episode,
    cport: int | None = None,
) -> tuple[float, float, threading.Thread | None, list[str] | None]:
    """Inject `fault`; returns the fault time, how long to watch, a swap thread, the in-flight outcome."""
    if fault == 1:
        t = time.time()
        os.kill(tree.leader.pid, signal.SIGKILL)
        return t, WATCH_S, None, None
    if fault in (2, 3):
        w = reg.member_titled(tree, "VLLM::Worker_TP1")
        if w is None:
            raise RuntimeError("no live VLLM::Worker_TP1 in the tree")
        if fault == 2:
            t = time.time()
            os.kill(w.pid, signal.SIGKILL)
            return t, WATCH_S, None, None
        outcome: list[str] = []
        t = time.time()
        os.kill(w.pid, signal.SIGSTOP)
        # one long request in flight on the stopped worker; its outcome is reported as is
        threading.Thread(
            target=lambda: outcome.append(complete(cport or sup.port, "tiny-a", hang_watch_s + 120, 200)),
            daemon=True,
        ).start()
        return t, hang_watch_s, None, outcome
    if fault == 4:
        t = sup.sigkill()
        reaped = time.time() - t
        time.sleep(1.0)  # an operator (or systemd's Restart=) starts it again
        sup.start()
        ep.notes.append(
            f"supervisor SIGKILLed and reaped in {reaped:.2f}s, started again {time.time() - t:.2f}s "
            "after the fault"
        )
        return t, WATCH_S, None, None
    if fault == 5:
        client.model = "tiny-b"
        t = time.time()
        th = threading.Thread(target=_swap, args=(sup, ep), daemon=True)
        th.start()
        return t, WATCH_S + 120, th, None
    raise ValueError(fault)


def _swap(sup: Supervisor, ep: Episode) -> None:
    try:
        sup.swap("tiny-b")
    except Exception as e:  # noqa: BLE001 - reported, not raised: the watch loop measures what happened
        ep.notes.append(f"swap: {type(e).__name__}: {e}")


def _action(
    sup: Supervisor, fault: int, reg: procs.Registry, t_fault: float, old_leaders: set[int], n_events: int
) -> tuple[float | None, str]:
    """When the supervisor first acted on the fault, and how that was observed."""
    if isinstance(sup, Vsup) and fault != 5:
        for e in sup.events()[n_events:]:
            ts = _ts(e.get("ts"))
            if ts is not None and ts >= t_fault and e.get("event") in ACT_EVENTS:
                what = e.get("event")
                detail = e.get("kind") or e.get("state") or e.get("why") or ""
                return ts, f"event {what} {detail}".strip()
        return None, ""
    sp = reg.spawned_after(t_fault, old_leaders)
    if sp is not None:
        return sp[0], "new API server pid"
    return None, ""


def _tree_action(
    sup: Supervisor, fault: int, reg: procs.Registry, t_fault: float, old_leaders: set[int], n_events: int
) -> float | None:
    """When the supervisor acted on the old tree itself: vsup's teardown/cleanup, else a new server."""
    if isinstance(sup, Vsup) and fault != 5:
        for e in sup.events()[n_events:]:
            ts = _ts(e.get("ts"))
            if (
                ts is not None
                and ts >= t_fault
                and e.get("event") in ("teardown", "cleanup", "leftovers_found")
            ):
                return ts
        return None
    sp = reg.spawned_after(t_fault, old_leaders)
    return sp[0] if sp else None


def _next_start(ep: Episode, reg: procs.Registry, old_leaders: set[int], t_fault: float, port: int) -> str:
    new = [t for t in reg.trees if t.leader.pid not in old_leaders]
    if not new:
        return "none"
    owner = port_owner(port)
    mine = any(t.leader.pid == owner for t in new)
    if ep.served_by == "new tree" or (mine and ep.serve_s is not None):
        mine = True
    elif mine:
        return "started, not serving by the end of the watch"
    if not mine:
        alive_new = [t for t in new if procs.alive(t.leader.pid, t.leader.start)]
        why = (
            "the old, unsupervised server holds the port" if owner in old_leaders else "did not get the port"
        )
        return f"failed: {why} ({len(new)} start attempt(s), {len(alive_new)} still running)"
    d = ep.debris_at_serve
    if ep.served_by == "new tree" and d and any(d[k] for k in ("procs", "shm", "sems", "dist_files")):
        return "ok beside debris"
    return "ok"


def _vsup_notes(evs: list[dict[str, Any]]) -> list[str]:
    notes = []
    for e in evs:
        if e.get("event") == "cleanup" and e.get("remaining"):
            notes.append(f"vsup cleanup ({e.get('why')}) reported remaining: {e['remaining']}")
        if e.get("event") == "state" and e.get("state") == "failed":
            notes.append(f"vsup went to failed: {e.get('reason')}")
    return notes


def _teardown(
    sup: Supervisor, reg: procs.Registry, shm_before: set[str], tmp_before: set[str], fault: int
) -> tuple[list[str], dict[str, Any]]:
    """Stop the supervisor, kill what is left of our trees by pid, unlink what they held.

    Returns the notes and what the supervisor's own stop left (before the harness removed it)."""
    report: list[str] = []
    if fault == 3:  # let a graceful stop work: a stopped worker ignores SIGTERM
        for t in reg.trees:
            for m in t.live_members():
                try:
                    os.kill(m.pid, signal.SIGCONT)
                except ProcessLookupError:
                    pass
    report += sup.shutdown()
    reg.scan()
    helpers = reg.live_helpers()
    if helpers:
        report.append(
            f"harness killed {len(helpers)} supervisor helper process(es) left running: "
            + ", ".join(m.cmd[:60] for m in helpers)
        )
        procs.kill_members(helpers)
    reg.scan_holdings()  # the dist ids of trees that died since the last look are in the log
    left = procs.debris(reg.trees)
    left_by_stop = left.to_json()
    if left.procs:
        report.append(
            f"harness killed {len(left.procs)} leftover process(es): "
            + ", ".join(c.split()[0][-30:] for _, c in left.procs)
        )
        members = [m for t in reg.trees for m in t.live_members()]
        stuck = procs.kill_members(members)
        if stuck:
            report.append(f"COULD NOT KILL: {stuck}")
    left = procs.debris(reg.trees)
    n = len(left.shm) + len(left.sems) + len(left.dist_files) + len(left.sockets) + len(left.tmpdirs)
    if n:
        report.append(
            f"harness removed {n} object(s) left after the supervisor's own stop "
            f"({len(left.shm)} shm {left.shm_mb:.0f} MB, {len(left.sems)} sem, "
            f"{len(left.dist_files)} dist, {len(left.sockets)} sockets, {len(left.tmpdirs)} tmp dirs)"
        )
        failed = procs.remove_objects(left)
        if failed:
            report.append(f"COULD NOT REMOVE: {failed}")
    final = procs.debris(reg.trees)
    if not final.empty:
        report.append(f"REMAINING after harness cleanup: {final.to_json()}")
    new_shm = {
        n
        for n in set(os.listdir(procs.SHM)) - shm_before
        if n.startswith(("psm_", "sem.mp-", "vllm_dist_", "nccl-", "torch_"))
    }
    new_tmp = {
        n
        for n in set(os.listdir(procs.TMP)) - tmp_before
        if n.startswith(("vllm_dist_", "vsup-tree-")) or procs.UUID_NAME.match(n)
    }
    if new_shm or new_tmp:
        names = sorted(new_shm | new_tmp)
        report.append(
            f"unattributed new names left alone (other users' servers?): "
            f"{len(new_shm)} in /dev/shm, {len(new_tmp)} in /tmp: {', '.join(names[:4])}"
            + (" ..." if len(names) > 4 else "")
        )
    return report, left_by_stop


def _ts(iso: Any) -> float | None:
    if not isinstance(iso, str):
        return None
    from datetime import datetime

    try:
        return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def dump(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=1, default=str))
