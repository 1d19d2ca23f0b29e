"""An in-memory Host for unit tests: a process table, a /dev/shm and a /tmp, a fake clock.

Processes react to signals as configured (exit, ignore SIGTERM, get stuck in D state, refuse
with EPERM, vanish between the look and the signal); a fake resource_tracker unlinks what is
registered with it once the other processes of its session are gone. Time only moves when the
code under test sleeps, so a 5 s grace costs nothing.
"""

from __future__ import annotations

import errno
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from vsup.host import ExitFacts, FileStat, Holdings, ProcInfo, SignalResult, same_process

if TYPE_CHECKING:
    # To the type checker a FakeHost is a Host (the code under test takes `Host | None`), and its
    # methods must keep Host's signatures; at run time it stays a plain object, so a method it
    # lacks fails loudly instead of reaching the real OS through Host's.
    from vsup.host import Host as _HostBase
else:
    _HostBase = object

SHM_DEV = 27
TMP_DEV = 64768


@dataclass
class FakeProc:
    pid: int
    ppid: int
    sid: int
    create_time: float
    cmdline: tuple[str, ...]
    comm: str = ""
    pgid: int | None = None
    uid: int = 0
    state: str = "S"
    on_term: str = "exit"  # "exit" | "ignore"
    on_kill: str = "exit"  # "exit" | "stuck" (uninterruptible sleep) | "ignore" (never dying)
    kill_exit_s: float = 0.0  # fake seconds a SIGKILLed process takes to exit, running (state R)
    killed_at: float | None = None
    exit_delay: float = 0.0  # fake seconds between a fatal signal and the exit
    deny: bool = False  # signals fail with EPERM
    vanish_on_signal: bool = False  # exits right before the first signal reaches it
    maps: dict[tuple[int, int], str] = field(default_factory=dict)  # (dev, ino) -> path
    sockets: set[int] = field(default_factory=set)
    tracker_names: list[str] = field(default_factory=list)  # a tracker: names it will unlink
    tracker_delay: float = 0.5
    dies_at: float | None = None

    def info(self, with_cmdline: bool) -> ProcInfo:
        return ProcInfo(
            pid=self.pid,
            ppid=self.ppid,
            pgid=self.pgid if self.pgid is not None else self.sid,
            sid=self.sid,
            create_time=self.create_time,
            comm=(self.comm or (self.cmdline[0] if self.cmdline else "?"))[:15],
            state=self.state,
            uid=self.uid,
            cmdline=self.cmdline if with_cmdline else None,
        )


@dataclass
class FakeFile:
    dev: int
    ino: int
    size: int
    alloc: int
    uid: int
    born: float
    is_socket: bool = False


class FakeHost(_HostBase):
    def __init__(self, now: float = 1_000_000.0, euid: int = 0) -> None:
        self.shm_root = Path("/fakeshm")
        self.tmp_root = Path("/faketmp")
        self.t = now
        self.mono = 0.0
        self._euid = euid
        self.me = 99999
        self.procs: dict[int, FakeProc] = {}
        self.files: dict[str, FakeFile] = {}
        self.bound: dict[int, str] = {}  # unix socket inode -> path
        self.listeners: dict[int, list[int | None]] = {}
        self.signals: list[tuple[int, int]] = []
        self.unlinked: list[str] = []
        self.deny_unlink: set[str] = set()
        self.users = {0: "root"}
        self._ino = 1000
        # /proc/meminfo in bytes (overlap.py's CPU fit): 64 GiB, 48 available unless a test says
        self.mem: dict[str, int] = {"MemTotal": 64 << 30, "MemAvailable": 48 << 30}
        self.autogroups: dict[int, int] = {}  # session id -> autogroup nice (0 unless set)
        self.nices: dict[int, int] = {}  # pid -> nice set by set_nice (0 unless set)
        self.caps: dict[str, tuple[int, float]] = {}  # cpu cgroup name -> (pid moved in, cores)
        self.cap_refused: str | None = None  # cpu_cap raises OSError(this) when set
        self.caps_made: list[str] = []  # every cgroup cpu_cap made, in order
        self.hastened: list[tuple[int, bool]] = []  # (pid, its session too) per hasten_exit

    # ---- building the world ------------------------------------------------------------------
    def add_proc(
        self,
        pid: int,
        ppid: int,
        sid: int,
        cmdline: tuple[str, ...] | list[str],
        *,
        ct: float | None = None,
        **kw,
    ) -> FakeProc:
        p = FakeProc(
            pid=pid,
            ppid=ppid,
            sid=sid,
            create_time=self.t - 100 if ct is None else ct,
            cmdline=tuple(cmdline),
            **kw,
        )
        self.procs[pid] = p
        return p

    def add_shm(
        self,
        name: str,
        *,
        size: int = 4096,
        alloc: int | None = None,
        uid: int = 0,
        born: float | None = None,
    ) -> tuple[int, int]:
        self._ino += 1
        self.files[f"{self.shm_root}/{name}"] = FakeFile(
            SHM_DEV,
            self._ino,
            size,
            size if alloc is None else alloc,
            uid,
            self.t - 50 if born is None else born,
        )
        return (SHM_DEV, self._ino)

    def add_file(self, path: str, size: int) -> None:
        """A plain file anywhere (a model directory's weights, for overlap.py)."""
        self._ino += 1
        self.files[path] = FakeFile(TMP_DEV, self._ino, size, size, 0, self.t)

    def add_tmp(
        self, name: str, *, socket: bool = False, uid: int = 0, born: float | None = None
    ) -> tuple[int, int]:
        self._ino += 1
        self.files[f"{self.tmp_root}/{name}"] = FakeFile(
            TMP_DEV,
            self._ino,
            0 if socket else 64,
            0 if socket else 4096,
            uid,
            self.t - 50 if born is None else born,
            socket,
        )
        return (TMP_DEV, self._ino)

    def hold(self, pid: int, name: str, *, deleted_as: str | None = None) -> None:
        """Make `pid` map shm object `name` (as glibc's temporary name when `deleted_as`)."""
        f = self.files[f"{self.shm_root}/{name}"]
        path = f"{self.shm_root}/{deleted_as} (deleted)" if deleted_as else f"{self.shm_root}/{name}"
        self.procs[pid].maps[(f.dev, f.ino)] = path

    def hold_tmp(self, pid: int, name: str) -> None:
        f = self.files[f"{self.tmp_root}/{name}"]
        self.procs[pid].maps[(f.dev, f.ino)] = f"{self.tmp_root}/{name}"

    def listen(self, pid: int, name: str) -> int:
        self._ino += 1
        self.bound[self._ino] = f"{self.tmp_root}/{name}"
        self.procs[pid].sockets.add(self._ino)
        return self._ino

    def shm_names(self) -> set[str]:
        prefix = f"{self.shm_root}/"
        return {p[len(prefix) :] for p in self.files if p.startswith(prefix)}

    # ---- clock -------------------------------------------------------------------------------
    def time(self) -> float:
        return self.t

    def monotonic(self) -> float:
        return self.mono

    def sleep(self, s: float) -> None:
        self.t += s
        self.mono += s
        self._tick()

    def _tick(self) -> None:
        for p in list(self.procs.values()):
            if p.dies_at is not None and p.dies_at <= self.t:
                self._exit(p)
        for p in list(self.procs.values()):
            if p.tracker_names and p.pid in self.procs and p.dies_at is None:
                others = [q for q in self.procs.values() if q.sid == p.sid and q is not p and q.state != "Z"]
                if not others:
                    p.dies_at = self.t + p.tracker_delay
                    for n in p.tracker_names:
                        if self.files.pop(f"{self.shm_root}/{n}", None) is not None:
                            self.unlinked.append(f"tracker:{n}")

    def _exit(self, p: FakeProc) -> None:
        self.procs.pop(p.pid, None)
        for ino in p.sockets:
            self.bound.pop(ino, None)
        for c in self.procs.values():
            if c.ppid == p.pid:
                c.ppid = 1

    # ---- Host interface ----------------------------------------------------------------------
    def self_pid(self) -> int:
        return self.me

    def euid(self) -> int:
        return self._euid

    def username(self, uid: int) -> str:
        return self.users.get(uid, str(uid))

    def processes(self, cmdline: bool = False) -> dict[int, ProcInfo]:
        return {pid: p.info(cmdline) for pid, p in self.procs.items()}

    def process(self, pid: int, cmdline: bool = True) -> ProcInfo | None:
        p = self.procs.get(pid)
        return p.info(cmdline) if p else None

    def cmdline(self, pid: int) -> tuple[str, ...] | None:
        p = self.procs.get(pid)
        return p.cmdline if p else None

    def holdings(self, pid: int) -> Holdings | None:
        p = self.procs.get(pid)
        if p is None or p.state == "Z":
            return None
        return Holdings(files=dict(p.maps), sockets=set(p.sockets))

    def maps_file(self, pid: int, fragment: str) -> bool:
        p = self.procs.get(pid)
        return p is not None and p.state != "Z" and any(fragment in path for path in p.maps.values())

    def unix_sockets(self) -> dict[int, str]:
        return dict(self.bound)

    def tcp_listeners(self, port: int) -> list[int | None]:
        return list(self.listeners.get(port, []))

    def signal(self, pid: int, create_time: float, sig: int) -> SignalResult:
        p = self.procs.get(pid)
        if p is not None and p.vanish_on_signal:
            self._exit(p)
            p = None
        if p is None or p.state == "Z":
            return SignalResult.GONE
        if not same_process(p.create_time, create_time):
            return SignalResult.REUSED
        if p.deny:
            return SignalResult.DENIED
        self.signals.append((pid, sig))
        if sig == signal.SIGKILL:
            if p.on_kill != "ignore" and p.killed_at is None:
                p.killed_at = self.t
            if p.on_kill == "stuck":
                p.state = "D"
            elif p.on_kill == "exit":
                p.state = "R" if p.kill_exit_s else p.state
                at = self.t + p.kill_exit_s
                p.dies_at = at if p.dies_at is None else min(p.dies_at, at)
        elif sig == signal.SIGTERM and p.on_term == "exit" and not p.tracker_names:
            p.dies_at = self.t + p.exit_delay
        self._tick()
        return SignalResult.SENT

    def exit_facts(self, pid: int, create_time: float) -> ExitFacts | None:
        p = self.procs.get(pid)
        if p is None or p.state == "Z" or not same_process(p.create_time, create_time):
            return None
        dying = p.killed_at is not None
        # a running exit uses CPU (100 ticks a fake second); a stuck one none
        ticks = int((self.t - p.killed_at) * 100) if dying and p.state == "R" and p.killed_at else 0
        return ExitFacts(
            dying=dying, cpu_ticks=ticks, state=p.state, wchan="" if p.state == "R" else "fake_wait"
        )

    def hasten_exit(self, pid: int, create_time: float, session: bool) -> bool:
        facts = self.exit_facts(pid, create_time)
        if facts is None or not facts.dying:
            return False
        self.hastened.append((pid, session))
        if session:
            self.autogroups[self.procs[pid].sid] = -20
        return True

    def meminfo(self) -> dict[str, int]:
        return dict(self.mem)

    def autogroup_nice(self, pid: int, nice: int | None = None) -> int | None:
        if pid not in self.procs:
            return None
        before = self.autogroups.get(self.procs[pid].sid, 0)
        if nice is not None:
            self.autogroups[self.procs[pid].sid] = nice
        return before

    def cpu_cap(self, name: str, pid: int, cores: float) -> str:
        if self.cap_refused is not None:
            raise OSError(self.cap_refused)
        if name in self.caps:
            raise FileExistsError(name)
        self.caps[name] = (pid, cores)
        self.caps_made.append(name)
        return f"/fake/cgroup/cpu/{name}"

    def cpu_uncap(self, name: str) -> str | None:
        return f"/fake/cgroup/cpu/{name}" if self.caps.pop(name, None) is not None else None

    def set_nice(self, pid: int, nice: int) -> int | None:
        if pid not in self.procs:
            return None
        before = self.nices.get(pid, 0)
        self.nices[pid] = nice
        return before

    def stat(self, path) -> FileStat | None:
        f = self.files.get(str(path))
        if f is None:
            return None
        return FileStat(
            Path(str(path)).name, str(path), f.dev, f.ino, f.size, f.alloc, f.uid, f.born, f.is_socket
        )

    def list_names(self, root) -> list[str]:
        prefix = f"{root}/"
        return sorted(
            p[len(prefix) :] for p in self.files if p.startswith(prefix) and "/" not in p[len(prefix) :]
        )

    def unlink_ipc(self, name: str, kind: str) -> None:
        self.unlink_file(f"{self.shm_root}/{name}")

    def unlink_file(self, path: str) -> None:
        if path in self.deny_unlink:
            raise PermissionError(errno.EPERM, "denied", path)
        if self.files.pop(path, None) is None:
            raise FileNotFoundError(errno.ENOENT, "gone", path)
        self.unlinked.append(Path(path).name)


API_CMD = ("python", "-m", "vllm.entrypoints.openai.api_server", "--model", "m", "-tp", "2")
TRACKER_CMD = ("python", "-B", "-c", "from multiprocessing.resource_tracker import main;main(8)")


def add_vllm_tree(
    host: FakeHost,
    sid: int,
    *,
    api_alive: bool = True,
    ppid: int = 1,
    segments: int = 4,
    model: str = "m",
    record: bool = True,
    started_at: float | None = None,
):
    """A 0.32-shaped tree (API server, tracker, engine core, 2 workers) with 4 psm_*, 2 sem.mp-*,
    a dist store and 3 ZMQ sockets. Returns (pids dict, TreeRecord of what vsup would have recorded)."""
    from vsup.proctree import IpcRef, ProcRef, TreeRecord

    start = host.t - 60 if started_at is None else started_at
    pids = {"api": sid, "tracker": sid + 1, "engine": sid + 2, "w0": sid + 3, "w1": sid + 4}
    if api_alive:
        host.add_proc(sid, ppid, sid, API_CMD, ct=start + 0.1)
    top = sid if api_alive else 1
    host.add_proc(sid + 1, top, sid, TRACKER_CMD, ct=start + 1)
    host.add_proc(sid + 2, top, sid, ("VLLM::EngineCore",), ct=start + 2)
    host.add_proc(sid + 3, sid + 2, sid, ("VLLM::Worker_TP0",), ct=start + 3)
    host.add_proc(sid + 4, sid + 2, sid, ("VLLM::Worker_TP1",), ct=start + 3)
    names = [f"psm_{sid:x}{i}" for i in range(segments)] + [f"sem.mp-{sid:x}a", f"sem.mp-{sid:x}b"]
    ipc = []
    for n in names:
        key = host.add_shm(n, size=1 << 20, alloc=1 << 16, born=start + 2)
        ipc.append(IpcRef(n, "sem" if n.startswith("sem.") else "shm", key[0], key[1], 1 << 20))
        for w in ("engine", "w0", "w1"):
            host.hold(pids[w], n, deleted_as="sem.Xy12Zq" if n.startswith("sem.") and w == "engine" else None)
    host.procs[sid + 1].tracker_names = list(names)
    dist = f"vllm_dist_{sid:032x}"
    host.add_tmp(dist, born=start + 2)
    socks = [f"{sid:08x}-0000-4000-8000-{i:012x}" for i in range(3)]
    for s, w in zip(socks, ("engine", "w0", "w1"), strict=True):
        host.add_tmp(s, socket=True, born=start + 2)
        host.listen(pids[w], s)
    leader = ProcRef(sid, start + 0.1, "python", list(API_CMD))
    procs = [leader] + [
        ProcRef(pids[k], host.procs[pids[k]].create_time, k, list(host.procs[pids[k]].cmdline))
        for k in ("tracker", "engine", "w0", "w1")
    ]
    rec = TreeRecord(
        id=f"t{sid}",
        model=model,
        port=8200,
        started_at=start,
        leader=leader,
        sid=sid,
        pgid=sid,
        procs=procs if record else [leader],
        ipc=ipc if record else [],
        files=[f"{host.tmp_root}/{dist}"] + [f"{host.tmp_root}/{s}" for s in socks] if record else [],
    )
    return pids, rec
