"""What the benchmark's own vLLM trees are made of, observed from /proc, and how to remove them.

The harness shares the machine with other people's vLLM servers, so it never decides by name
alone. A tree is born when an API server with *our* port appears; every process first seen
while its parent is a member joins that tree (vLLM forks its engine core and workers during
start-up, long before any fault orphans them). IPC objects are attributed by who maps or holds
them (device + inode, so glibc's `sem.XXXXXX (deleted)` names resolve to `sem.mp-*`), ZMQ ipc
socket files by the listening inode, and the gloo store by the id that the workers print in
their own log line (`distributed_init_method=file:///tmp/vllm_dist_<hex>`). Removal acts only on
what was attributed this way, re-checking pid + start time before every signal.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

SHM = Path("/dev/shm")
TMP = Path("/tmp")
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")
UUID_NAME = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
# The store's full path: /tmp/vllm_dist_<hex>, or under a private TMPDIR a supervisor gave vLLM
# (vsup gives each tree /tmp/vsup-tree-<id>/).
DIST_LINE = re.compile(r"distributed_init_method=file://(/\S*/)?(vllm_dist_[0-9a-f]{32})")
LOG_PID = re.compile(r"\((?:[^()]*?) pid=(\d+)\)")
SOCKET_LINK = re.compile(r"socket:\[(\d+)\]")
RECHECK_S = 5.0  # how long a process is young enough to be looked at again (fork -> exec)


@dataclass(frozen=True)
class Stat:
    pid: int
    ppid: int
    pgid: int
    sid: int
    state: str
    start: int  # clock ticks since boot: (pid, start) names one process for its whole life
    utime: int
    stime: int
    rss_pages: int


def read_stat(pid: int) -> Stat | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    rest = raw.rsplit(")", 1)[1].split()
    return Stat(
        pid,
        int(rest[1]),
        int(rest[2]),
        int(rest[3]),
        rest[0],
        int(rest[19]),
        int(rest[11]),
        int(rest[12]),
        int(rest[21]),
    )


def all_stats() -> dict[int, Stat]:
    out = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            st = read_stat(int(name))
            if st is not None:
                out[st.pid] = st
    return out


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def alive(pid: int, start: int | None = None) -> bool:
    """The same process still runs (zombies count as gone: PID 1 here reaps slowly)."""
    st = read_stat(pid)
    return st is not None and st.state != "Z" and (start is None or st.start == start)


def cpu_seconds(pid: int) -> float | None:
    st = read_stat(pid)
    return None if st is None else (st.utime + st.stime) / CLK_TCK


def rss_bytes(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


@dataclass
class Member:
    pid: int
    start: int
    cmd: str
    first_seen: float


@dataclass
class IpcObj:
    name: str
    dev: int
    ino: int
    size: int

    @property
    def is_sem(self) -> bool:
        return self.name.startswith("sem.")


@dataclass
class Tree:
    """One vLLM process tree: an API server on our port and everything it spawned."""

    leader: Member
    members: dict[tuple[int, int], Member] = field(default_factory=dict)
    ipc: dict[tuple[int, int], IpcObj] = field(default_factory=dict)
    sockets: set[str] = field(default_factory=set)  # /tmp/<uuid> ZMQ ipc socket files
    dist_ids: set[str] = field(default_factory=set)  # vllm_dist_<hex>
    dist_paths: set[str] = field(default_factory=set)  # where the store file is
    tmpdirs: set[str] = field(default_factory=set)  # a private TMPDIR under /tmp holding them

    def live_members(self) -> list[Member]:
        return [m for m in self.members.values() if alive(m.pid, m.start)]

    def titles(self) -> str:
        return " ".join(m.cmd for m in self.members.values())


@dataclass
class Debris:
    """What is left of some trees now."""

    procs: list[tuple[int, str]] = field(default_factory=list)
    shm: list[IpcObj] = field(default_factory=list)
    sems: list[IpcObj] = field(default_factory=list)
    dist_files: list[str] = field(default_factory=list)
    sockets: list[str] = field(default_factory=list)
    tmpdirs: list[str] = field(default_factory=list)  # private TMPDIRs still there (empty or not)

    @property
    def shm_mb(self) -> float:
        return sum(o.size for o in self.shm) / 1e6

    @property
    def empty(self) -> bool:
        return not (self.procs or self.shm or self.sems or self.dist_files or self.sockets or self.tmpdirs)

    def total(self) -> int:
        return (
            len(self.procs)
            + len(self.shm)
            + len(self.sems)
            + len(self.dist_files)
            + len(self.sockets)
            + len(self.tmpdirs)
        )

    def to_json(self) -> dict:
        return {
            "procs": len(self.procs),
            "proc_names": [c[:40] for _, c in self.procs],
            "shm": len(self.shm),
            "shm_mb": round(self.shm_mb, 1),
            "sems": len(self.sems),
            "dist_files": len(self.dist_files),
            "sockets": len(self.sockets),
            "tmpdirs": len(self.tmpdirs),
        }


def _unix_listeners() -> dict[int, str]:
    out: dict[int, str] = {}
    try:
        lines = Path("/proc/net/unix").read_text().splitlines()[1:]
    except OSError:
        return out
    for line in lines:
        parts = line.split()
        if len(parts) >= 8 and parts[7].startswith(str(TMP) + "/"):
            out[int(parts[6])] = parts[7]
    return out


class Registry:
    """Follows every vLLM tree whose API server listens on `port`, in a background thread.

    `scan_s` is the process-table period (0.25 s: the resolution of "a new API server pid
    appeared"); holdings (maps, fds, sockets) are read every `hold_s`, which is enough because
    what a tree holds is created at start-up and kept for its whole life.
    """

    def __init__(
        self,
        port: int,
        logs: list[Path],
        scan_s: float = 0.25,
        hold_s: float = 2.0,
        roots: Callable[[], set[tuple[int, int]]] = lambda: set(),
    ) -> None:
        self.port = port
        # The supervisor's own processes (pid, start) and what they spawned that is not a vLLM
        # tree (helpers, e.g. circus's stats daemon): part of the supervisor, measured with it
        # and killed by the harness if the supervisor leaves them behind.
        self.roots = roots
        self.helpers: dict[tuple[int, int], Member] = {}
        self.logs = logs
        self.scan_s, self.hold_s = scan_s, hold_s
        self.trees: list[Tree] = []
        self.spawns: list[tuple[float, int]] = []  # (time seen, API server pid)
        self.extra: dict[tuple[int, int], Member] = {}  # processes we started ourselves (supervisors)
        self._known: dict[tuple[int, int], Tree | None] = {}
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_hold = 0.0
        self._port_arg = re.compile(rf"--port[ =]{port}(\s|$)")
        self._boot = _boot_time()

    # lifecycle
    def start(self) -> Registry:
        self._thread = threading.Thread(target=self._run, name="registry", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.scan()
            if time.monotonic() - self._last_hold >= self.hold_s:
                self.scan_holdings()
                self._last_hold = time.monotonic()
            self._stop.wait(self.scan_s)

    # observation
    def scan(self) -> None:
        stats = all_stats()
        now = time.time()
        with self._lock:
            by_pid = {}
            for key, tree in self._known.items():
                if tree is not None:
                    by_pid[key[0]] = (key, tree)
            roots = self.roots()  # the supervisor's own processes, once per scan
            # parents before children: sort by start time
            for st in sorted(stats.values(), key=lambda s: s.start):
                key = (st.pid, st.start)
                if key in self._known or st.state == "Z":
                    continue
                parent = by_pid.get(st.ppid)
                pst = stats.get(st.ppid)
                tree = parent[1] if parent and pst is not None and parent[0] == (pst.pid, pst.start) else None
                if tree is None:
                    cmd = cmdline(st.pid)
                    if "vllm.entrypoints" in cmd and self._port_arg.search(cmd):
                        m = Member(st.pid, st.start, cmd, now)
                        tree = Tree(leader=m)
                        tree.members[key] = m
                        self.trees.append(tree)
                        self.spawns.append((now, st.pid))
                        self._known[key] = tree
                        by_pid[st.pid] = (key, tree)
                        continue
                    # Between fork and exec a child still shows its parent's command line: look
                    # again at young processes until they are a few seconds old.
                    young = now - self._boot - st.start / CLK_TCK <= RECHECK_S
                    helper_parents = {k[0]: k for k in (*roots, *self.helpers)}
                    if (
                        st.ppid in helper_parents
                        and pst is not None
                        and helper_parents[st.ppid] == (pst.pid, pst.start)
                    ):
                        # spawned by the supervisor (or a helper of it): e.g. circus's stats process
                        if not young:
                            self.helpers[key] = Member(st.pid, st.start, cmd, now)
                            self._known[key] = None
                        continue
                    if not young:
                        self._known[key] = None
                    continue
                m = Member(st.pid, st.start, cmdline(st.pid), now)
                tree.members[key] = m
                self._known[key] = tree
                by_pid[st.pid] = (key, tree)
            if len(self._known) > 20000:  # forget foreign processes that are gone
                self._known = {k: v for k, v in self._known.items() if v is not None or k[0] in stats}

    def scan_holdings(self) -> None:
        """Record the /dev/shm objects and ZMQ socket files each live tree holds, and its dist ids."""
        with self._lock:
            trees = list(self.trees)
            for tree in trees:  # setproctitle renames members after start (VLLM::EngineCore, ...)
                for m in tree.live_members():
                    m.cmd = cmdline(m.pid) or m.cmd
        listeners: dict[int, str] | None = None
        unresolved: dict[tuple[int, int], Tree] = {}
        for tree in trees:
            for m in tree.live_members():
                held = _holdings(m.pid)
                for key in held["shm"]:
                    if key not in tree.ipc:
                        unresolved[key] = tree
                if held["sockets"]:
                    if listeners is None:
                        listeners = _unix_listeners()
                    for ino in held["sockets"]:
                        path = listeners.get(ino)
                        if path and UUID_NAME.match(os.path.basename(path)):
                            tree.sockets.add(path)
                            _note_tmpdir(tree, path)
        if unresolved:
            for name in _listdir(SHM):
                try:
                    st = os.stat(SHM / name)
                except OSError:
                    continue
                key = (st.st_dev, st.st_ino)
                if key in unresolved:
                    unresolved.pop(key).ipc[key] = IpcObj(name, st.st_dev, st.st_ino, st.st_size)
        self._scan_logs(trees)

    def _scan_logs(self, trees: list[Tree]) -> None:
        for log in self.logs:
            try:
                text = log.read_text(errors="replace")
            except OSError:
                continue
            for line in text.splitlines():
                d = DIST_LINE.search(line)
                if not d:
                    continue
                p = LOG_PID.search(line)
                pid = int(p.group(1)) if p else None
                for tree in trees:
                    if pid is not None and any(m.pid == pid for m in tree.members.values()):
                        tree.dist_ids.add(d.group(2))
                        path = (d.group(1) or str(TMP) + "/") + d.group(2)
                        tree.dist_paths.add(path)
                        _note_tmpdir(tree, path)

    # queries
    def live_helpers(self) -> list[Member]:
        with self._lock:
            return [m for m in self.helpers.values() if alive(m.pid, m.start)]

    def tree_of(self, pid: int) -> Tree | None:
        with self._lock:
            for t in self.trees:
                if any(m.pid == pid for m in t.members.values()):
                    return t
        return None

    def live_api_server(self) -> Member | None:
        """The newest live API server on our port."""
        with self._lock:
            for t in reversed(self.trees):
                if alive(t.leader.pid, t.leader.start):
                    return t.leader
        return None

    def member_titled(self, tree: Tree, title: str) -> Member | None:
        for m in tree.live_members():
            if title in m.cmd:
                return m
        return None

    def spawned_after(self, t: float, exclude: set[int]) -> tuple[float, int] | None:
        with self._lock:
            for ts, pid in self.spawns:
                if ts >= t and pid not in exclude:
                    return ts, pid
        return None


def _note_tmpdir(tree: Tree, path: str) -> None:
    """Remember the private directory directly under /tmp that holds one of the tree's files."""
    parent = os.path.dirname(path)
    if os.path.dirname(parent) == str(TMP):
        tree.tmpdirs.add(parent)


def _boot_time() -> float:
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith("btime "):
            return float(line.split()[1])
    return 0.0


def _listdir(p: Path) -> list[str]:
    try:
        return os.listdir(p)
    except OSError:
        return []


def _holdings(pid: int) -> dict[str, set]:
    """The /dev/shm objects (dev, ino) that `pid` maps or holds open, and its socket inodes."""
    shm: set[tuple[int, int]] = set()
    sockets: set[int] = set()
    try:
        with open(f"/proc/{pid}/maps") as f:
            for line in f:
                if "/dev/shm/" in line:
                    parts = line.split(None, 5)
                    dev_major, dev_minor = parts[3].split(":")
                    shm.add((os.makedev(int(dev_major, 16), int(dev_minor, 16)), int(parts[4])))
    except OSError:
        pass
    fd_dir = f"/proc/{pid}/fd"
    for fd in _listdir(Path(fd_dir)):
        try:
            target = os.readlink(f"{fd_dir}/{fd}")
        except OSError:
            continue
        if target.startswith("/dev/shm/"):
            try:
                st = os.stat(f"{fd_dir}/{fd}")
                shm.add((st.st_dev, st.st_ino))
            except OSError:
                pass
        elif s := SOCKET_LINK.match(target):
            sockets.add(int(s.group(1)))
    return {"shm": shm, "sockets": sockets}


def debris(trees: list[Tree]) -> Debris:
    """What of `trees` still exists: live processes, IPC objects (same inode), files."""
    d = Debris()
    for tree in trees:
        for m in tree.live_members():
            d.procs.append((m.pid, m.cmd))
        for (dev, ino), obj in tree.ipc.items():
            try:
                st = os.stat(SHM / obj.name)
            except OSError:
                continue
            if (st.st_dev, st.st_ino) == (dev, ino):
                (d.sems if obj.is_sem else d.shm).append(IpcObj(obj.name, dev, ino, st.st_size))
        for path in tree.dist_paths:
            if os.path.lexists(path):
                d.dist_files.append(path)
        for dist in tree.dist_ids:
            for name in _listdir(SHM):  # CPU shm communicator: vllm_dist_<id>-tp:0-[0-1]-cpushm_N
                if name.startswith(dist + "-") and not any(o.name == name for o in d.shm):
                    try:
                        st = os.stat(SHM / name)
                    except OSError:
                        continue
                    d.shm.append(IpcObj(name, st.st_dev, st.st_ino, st.st_size))
        for path in tree.sockets:
            if os.path.lexists(path):
                d.sockets.append(path)
        for path in tree.tmpdirs:
            if os.path.isdir(path):
                d.tmpdirs.append(path)
    return d


def kill_members(members: list[Member], grace_s: float = 3.0) -> list[tuple[int, str]]:
    """SIGCONT + SIGKILL `members` (engine/workers first, the resource tracker last), by pid + start time.

    Killing the tracker after the others lets it unlink what was registered with it (see
    vllm-facts.md); whatever it leaves is unlinked by `remove_objects` afterwards.
    Returns the processes that could not be killed.
    """

    def send(ms: list[Member], sig: int) -> None:
        for m in ms:
            if alive(m.pid, m.start):
                try:
                    os.kill(m.pid, sig)
                except ProcessLookupError:
                    pass

    trackers = [m for m in members if "resource_tracker" in m.cmd]
    others = [m for m in members if m not in trackers]
    send(others, signal.SIGCONT)
    send(others, signal.SIGKILL)
    _wait_gone(others, 10)
    end = time.monotonic() + grace_s
    while time.monotonic() < end and any(alive(m.pid, m.start) for m in trackers):
        time.sleep(0.1)
    send(trackers, signal.SIGKILL)
    _wait_gone(trackers, 10)
    return [(m.pid, m.cmd) for m in members if alive(m.pid, m.start)]


def _wait_gone(ms: list[Member], timeout: float) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end and any(alive(m.pid, m.start) for m in ms):
        time.sleep(0.05)


def remove_objects(d: Debris) -> list[str]:
    """Unlink the IPC objects and files in `d` (already attributed to our trees); return failures."""
    failed = []
    for obj in [*d.shm, *d.sems]:
        path = SHM / obj.name
        try:
            st = os.stat(path)
            if (st.st_dev, st.st_ino) == (obj.dev, obj.ino):
                os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as e:
            failed.append(f"{path}: {e.strerror}")
    for f in [*d.dist_files, *d.sockets]:
        try:
            os.unlink(f)
        except FileNotFoundError:
            pass
        except OSError as e:
            failed.append(f"{f}: {e.strerror}")
    for tmpdir in d.tmpdirs:  # attributed from the tree's own log line / listening sockets
        shutil.rmtree(tmpdir, ignore_errors=True)
        if os.path.exists(tmpdir):
            failed.append(f"{tmpdir}: could not remove the directory")
    return failed
