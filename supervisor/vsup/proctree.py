"""Spawning a vLLM server tree and recording everything it is made of, so that the tree can be
found and removed later, even by another vsup process after this one was SIGKILLed.

A tree is the API server vsup started (the leader, in its own session), every process that ever
belonged to it (descendants, and members of its session: a process keeps its session and group
when it is reparented), the /dev/shm objects they were seen to hold (by device + inode), and the
/tmp files they created (gloo FileStore `vllm_dist_*`, ZMQ ipc socket files). The record lives
in `state_dir/ledger.json`.
"""

from __future__ import annotations

import errno
import functools
import json
import logging
import math
import os
import re
import stat
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from vsup.host import (
    CREATE_TIME_TOLERANCE_S,
    FileStat,
    Host,
    ProcInfo,
    open_append,
    same_process,
    strip_deleted,
)

log = logging.getLogger(__name__)

# A gloo FileStore file (`vllm_dist_<uuid hex>`) is not held open between store operations,
# so a refresh rarely sees a member holding it. An unheld one is attributed to the tree when it
# was created after the tree started and no other vLLM-looking process (outside this tree) was
# started within this many seconds before the file appeared: such a process could be a server
# still in start-up creating its own store. Distributed init comes early in a vLLM start, well
# inside this window, so a store born later than this after the tree started is not ours either.
DIST_ATTRIBUTION_WINDOW_S = 600.0

DIST_FILE = re.compile(r"^vllm_dist_[0-9a-f]{32}$")
# The private TMPDIR vsup gives each tree it starts (see make_tree_tmpdir).
TREE_TMPDIR = re.compile(r"^vsup-tree-[0-9a-f]{12}$")


def cap_cgroup(tree_id: str) -> str:
    """The name of the cpu cgroup that caps a tree loading beside a serving one (overlapped.py)."""
    return f"vsup-cap-{tree_id}"


# Where every tree's private TMPDIR is made, whatever vsup's own $TMPDIR says: the cleanup
# judges only paths under the tmp root (a ledger path elsewhere is ignored, so a planted ledger
# cannot make it remove /etc/...). A tree dir made under another $TMPDIR leaked and its ledger
# entry was dropped as clean (issue 20, finding 9).
TREE_TMP_ROOT = "/tmp"  # noqa: S108 - a root: each tree's dir in it is a fresh random-named mkdir 0700
# A process is the tree's only if it started no earlier than the tree (tree_epoch) less this:
# a create time is starttime/CLK_TCK + /proc/stat's btime, an integer (up to 1 s early), and
# host.CREATE_TIME_TOLERANCE_S allows a small clock step on top.
RECORD_CLOCK_SLACK_S = CREATE_TIME_TOLERANCE_S + 1.0
# A session or group whose leader is gone is the tree's only if a live recorded member is in it,
# or its oldest live process was born within this long of the tree's start (the tree's own
# unrecorded members: a vsup killed before its first refresh). A session id reused later (the
# ledger of a tree that died yesterday, or before a power loss) matches neither (finding 3).
SESSION_ANCHOR_WINDOW_S = 120.0
ZMQ_SOCKET = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")

_API_SERVER = re.compile(r"(^|[\s/=])vllm\.entrypoints\.|(^|[\s/])vllm\s+serve(\s|$)")
_MP_HELPER = re.compile(r"multiprocessing\.(resource_tracker|spawn|forkserver)")
_TRACKER = re.compile(r"multiprocessing\.resource_tracker")


@dataclass(frozen=True)
class ProcRef:
    pid: int
    create_time: float
    name: str
    cmdline: list[str]

    def matches(self, info: ProcInfo) -> bool:
        return info.pid == self.pid and same_process(info.create_time, self.create_time)


@dataclass(frozen=True)
class IpcRef:
    name: str  # file name in the shm root, e.g. "psm_ab12cd34", "sem.mp-x1y2z3"
    kind: str  # "shm" | "sem" | "file"
    dev: int
    ino: int
    size: int


@dataclass
class TreeRecord:
    id: str
    model: str
    port: int
    started_at: float  # epoch, taken just before the spawn
    leader: ProcRef
    sid: int
    pgid: int
    procs: list[ProcRef] = field(default_factory=list)  # every process ever seen (leader too)
    ipc: list[IpcRef] = field(default_factory=list)  # shm-root objects the tree was seen to hold
    files: list[str] = field(default_factory=list)  # tmp-root dist stores and ZMQ socket paths
    ended: bool = False  # the daemon knows the tree is to be torn down
    # /proc/sys/kernel/random/boot_id when the tree was spawned: records of another boot match
    # no process (pids and create times mean nothing across a reboot). "" = unknown (older
    # ledgers): trusted as this boot's, as before.
    boot_id: str = ""
    uid: int | None = None  # the euid that spawned the tree; None = unknown (older ledgers)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> TreeRecord:
        """Parse one record; anything but the documented types and ranges raises ValueError,
        TypeError or KeyError (never a huge or infinite number: `"pid": 1e400`)."""
        uid = d.get("uid")
        return cls(
            id=_str(d["id"]),
            model=_str(d["model"]),
            port=_int(d["port"]),
            started_at=_float(d["started_at"]),
            leader=_procref(d["leader"]),
            sid=_int(d["sid"]),
            pgid=_int(d["pgid"]),
            procs=[_procref(p) for p in _list(d.get("procs", []))],
            ipc=[
                IpcRef(_str(i["name"]), _str(i["kind"]), _int(i["dev"]), _int(i["ino"]), _int(i["size"]))
                for i in _list(d.get("ipc", []))
            ],
            files=[_str(f) for f in _list(d.get("files", []))],
            ended=bool(d.get("ended", False)),
            boot_id=_str(d.get("boot_id", "")),
            uid=None if uid is None else _int(uid),
        )


def _procref(d: dict[str, Any]) -> ProcRef:
    return ProcRef(
        _int(d["pid"]), _float(d["create_time"]), _str(d["name"]), [_str(a) for a in _list(d["cmdline"])]
    )


# Ledger values are checked as strictly as the control protocol checks requests: a record is
# acted on with SIGKILL, so a value that is not what vsup itself writes makes the file corrupt.
_MAX_INT = 2**64


def _int(v: object) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not -_MAX_INT < v < _MAX_INT:
        raise ValueError(f"expected an integer, got {type(v).__name__}")
    return v


def _float(v: object) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ValueError(f"expected a number, got {type(v).__name__}")
    f = float(v)  # an int too large for a float raises OverflowError: caught as corrupt
    if not math.isfinite(f):
        raise ValueError("expected a finite number")
    return f


def _str(v: object) -> str:
    if not isinstance(v, str):
        raise ValueError(f"expected a string, got {type(v).__name__}")
    return v


def _list(v: object) -> list[Any]:
    if not isinstance(v, list):
        raise ValueError(f"expected a list, got {type(v).__name__}")
    return v


@functools.lru_cache(maxsize=1)
def current_boot_id() -> str:
    """This boot's id (changes at every boot); "" where the kernel does not offer it."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def same_boot(rec: TreeRecord) -> bool:
    """False only when the record names another boot (unknown counts as this one)."""
    here = current_boot_id()
    return not rec.boot_id or not here or rec.boot_id == here


# ---- classification helpers shared with cleanup ----------------------------------------------
def ipc_kind(name: str) -> str:
    if name.startswith("sem."):
        return "sem"
    if name.endswith(".mmap"):
        return "file"
    return "shm"


def joined(info: ProcInfo) -> str:
    return " ".join(info.cmdline or ())


def is_vllm_titled(info: ProcInfo) -> bool:
    """A process vLLM spawned and titled (cmdline, not comm: comm stops at 15 characters)."""
    j = joined(info)
    return j.startswith("VLLM::") or "VllmWorkerProcess" in j


def is_api_server(info: ProcInfo) -> bool:
    """`python -m vllm.entrypoints.openai.api_server ...` or `vllm serve ...`."""
    return bool(_API_SERVER.search(joined(info)))


def is_mp_helper(info: ProcInfo) -> bool:
    """A multiprocessing resource_tracker, spawn or forkserver child (untitled python)."""
    return bool(_MP_HELPER.search(joined(info)))


def is_tracker(info: ProcInfo) -> bool:
    return bool(_TRACKER.search(joined(info)))


def looks_like_vllm(info: ProcInfo) -> bool:
    return is_vllm_titled(info) or is_api_server(info)


def procref(info: ProcInfo, host: Host) -> ProcRef:
    cmd = info.cmdline if info.cmdline is not None else host.cmdline(info.pid)
    if info.cmdline is None and cmd is not None:
        info = ProcInfo(
            info.pid, info.ppid, info.pgid, info.sid, info.create_time, info.comm, info.state, info.uid, cmd
        )
    return ProcRef(info.pid, info.create_time, info.title, list(cmd or ()))


# ---- membership ------------------------------------------------------------------------------
ALWAYS_PROTECTED = frozenset({0, 1})


def tree_epoch(rec: TreeRecord) -> float:
    """When the tree started, on the clock of /proc create times: the earlier of `started_at`
    (time.time() before the spawn) and the leader's create time. A daemon computes create times
    with the btime its Host read at start; after a clock step since then they are off from
    time.time() by the step, but not from each other, and the leader was recorded the same way
    as its members: comparing members with started_at alone would then disown the whole tree."""
    return min(rec.started_at, rec.leader.create_time)


def tree_members(
    rec: TreeRecord, snap: dict[int, ProcInfo], protected: Iterable[int] = ALWAYS_PROTECTED
) -> list[ProcInfo]:
    """Processes of `snap` that belong to the tree (zombies included), by three rules:

    - a recorded process whose pid and create time still match;
    - a process in the tree's session or process group. Linux does not reuse a pid while it is
      still some process's session or group id, so a live member with that sid is ours, unless
      the pid itself now names a different process (the session was ours and is long gone, and
      a new session leader got the number): then only the recorded pids count. A session whose
      leader is gone is ours only when anchored (SESSION_ANCHOR_WINDOW_S): once every process
      of the tree's session is gone, its number is free for anyone's new session;
    - a descendant of any of those.

    Never a member, whatever the record says (a ledger is data another user may have planted,
    or a record that outlived its tree): a process older than the tree, one of another uid than
    the record's, or anything when the record is from another boot. Pids in `protected` (0, 1,
    vsup and its ancestors, live trees) that a rule names are returned, so that the caller can
    report them, but nothing below them is: a record naming pid 1 once meant "every process".
    """
    if not same_boot(rec):
        return []
    guard = ALWAYS_PROTECTED | set(protected)
    floor = tree_epoch(rec) - RECORD_CLOCK_SLACK_S
    recorded = {p.pid: p for p in rec.procs}
    recorded.setdefault(rec.leader.pid, rec.leader)

    def same_uid(p: ProcInfo) -> bool:
        return rec.uid is None or p.uid == rec.uid

    def eligible(p: ProcInfo) -> bool:
        # A zombie is never signalled, only reported: its age does not matter.
        return (p.create_time >= floor or p.zombie) and same_uid(p)

    def is_recorded(p: ProcInfo) -> bool:
        ref = recorded.get(p.pid)
        return ref is not None and ref.matches(p) and eligible(p)

    def anchored(idnum: int, attr: str) -> bool:
        if idnum <= 1:
            return False
        owner = snap.get(idnum)
        if owner is not None:
            return is_recorded(owner)
        inside = [p for p in snap.values() if getattr(p, attr) == idnum and eligible(p)]
        if any(is_recorded(p) for p in inside):
            return True
        oldest = min((p.create_time for p in inside), default=None)
        return oldest is not None and oldest <= tree_epoch(rec) + SESSION_ANCHOR_WINDOW_S

    sid_ok = anchored(rec.sid, "sid")
    pgid_ok = anchored(rec.pgid, "pgid")
    found: dict[int, ProcInfo] = {}
    for p in snap.values():
        if p.pid in guard:
            if (
                (recorded.get(p.pid) is not None and recorded[p.pid].matches(p))
                or (sid_ok and p.sid == rec.sid)
                or (pgid_ok and p.pgid == rec.pgid)
            ):
                found[p.pid] = p  # reported by the caller, never expanded
            continue
        if not eligible(p):
            continue
        if is_recorded(p) or (sid_ok and p.sid == rec.sid) or (pgid_ok and p.pgid == rec.pgid):
            found[p.pid] = p
    roots = {pid: p for pid, p in found.items() if pid not in guard}
    # A child is younger than its parent, so below an eligible root every process is younger
    # than the tree; only a subreaper could adopt an older one, and vLLM sets none.
    out = _with_descendants(roots, snap, lambda c: c.pid not in guard and same_uid(c))
    out.update(found)
    return list(out.values())


def _with_descendants(
    roots: dict[int, ProcInfo],
    snap: dict[int, ProcInfo],
    admit: Callable[[ProcInfo], bool] = lambda c: c.pid > 1,
) -> dict[int, ProcInfo]:
    children: dict[int, list[ProcInfo]] = {}
    for p in snap.values():
        children.setdefault(p.ppid, []).append(p)
    out = dict(roots)
    stack = list(roots)
    while stack:
        for c in children.get(stack.pop(), ()):
            if c.pid not in out and c.pid > 1 and admit(c):
                out[c.pid] = c
                stack.append(c.pid)
    return out


def descendants(roots: Iterable[ProcInfo], snap: dict[int, ProcInfo]) -> list[ProcInfo]:
    return list(_with_descendants({r.pid: r for r in roots}, snap).values())


# ---- spawn / refresh -------------------------------------------------------------------------
def make_tree_tmpdir(tmp_root: str | None = None) -> str:
    """A private TMPDIR for one tree: vLLM puts its gloo FileStore (`vllm_dist_*`) and its ZMQ
    ipc sockets under `tempfile.gettempdir()`, so with TMPDIR set they land in a directory that is
    the tree's alone. Attribution is then exact even with other vLLM servers on the machine, where
    an unheld `/tmp/vllm_dist_*` could be anyone's."""
    root = tmp_root or TREE_TMP_ROOT  # not $TMPDIR: see TREE_TMP_ROOT
    path = os.path.join(root, f"vsup-tree-{uuid.uuid4().hex[:12]}")
    os.mkdir(path, 0o700)
    return path


def _own_user() -> str:
    try:
        import pwd

        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return f"uid_{os.getuid()}"


def _torch_user(env: dict[str, str]) -> str:
    """The user name torch's `default_cache_dir()` will compute in the child (getpass.getuser()
    with the child's environment), sanitised as torch does."""
    name = next((env[k] for k in ("LOGNAME", "USER", "LNAME", "USERNAME") if env.get(k)), None)
    return re.sub(r'[\\/:*?"<>|]', "_", name if name is not None else _own_user())


def _names_another_user(name: str) -> bool:
    """Is `name` the login of a real user other than ours? (`USER=alice` inherited by a root
    daemon: a root-owned /tmp/torchinductor_alice would lock alice out of her own cache.)"""
    try:
        import pwd

        return pwd.getpwnam(name).pw_uid != os.getuid()
    except KeyError:
        return False


def share_torch_caches(tree_tmp: str, env: dict[str, str]) -> str | None:
    """Keep torch's compile caches shared across starts, where a bare vLLM keeps them.

    torch puts its inductor cache and, always (TORCHINDUCTOR_CACHE_DIR does not move them), its
    precompiled C++ headers under `<tempdir>/torchinductor_<user>`. Under a fresh private TMPDIR
    every start would rebuild them: measured here, vLLM 0.32 CPU's first completion came 4 s
    later for the headers alone (150 MB) and 11 s later with the kernels too. So the tree's
    `torchinductor_<user>` is a symlink to the shared one beside the private dir (made 0755 if
    missing, as torch would). Returns the shared path, or None when it is not safe to share: it
    exists but is a symlink, not a directory, or someone else's (a planted cache would be code we
    load); the tree then compiles into its private dir, slower but correct. The cleanup removes
    the link with the tree's TMPDIR and never follows it."""
    user = _torch_user(env)
    name = f"torchinductor_{user}"
    # The link keeps the name the child will look for; the shared directory is never named
    # after another real user (finding 10: it would be ours, and in their way).
    shared_name = f"torchinductor_{_torch_user({}) if _names_another_user(user) else user}"
    shared = os.path.join(os.path.dirname(tree_tmp.rstrip("/")), shared_name)
    try:
        os.mkdir(shared, 0o755)
    except FileExistsError:
        pass
    except OSError as e:
        log.warning("cannot create shared torch cache %s: %s", shared, e)
        return None
    try:
        st = os.lstat(shared)
    except OSError:
        return None
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
        log.warning("not sharing torch cache %s: not a directory of uid %d", shared, os.getuid())
        return None
    try:
        os.symlink(shared, os.path.join(tree_tmp, name))
    except OSError as e:
        log.warning("cannot link the shared torch cache into %s: %s", tree_tmp, e)
        return None
    return shared


def spawn(
    argv: list[str],
    env: dict[str, str],
    log_path: Path,
    *,
    model: str,
    port: int,
    host: Host | None = None,
) -> tuple[subprocess.Popen[bytes], TreeRecord]:
    """Start `argv` in a new session with stdout+stderr appended to `log_path`.

    The log fd is opened O_APPEND here and closed in the parent right after the fork, so the
    server keeps logging to the file (and keeps running) if vsup dies: no pipe to vsup exists
    that could fill up or break.
    """
    host = host or Host()
    started_at = host.time()
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    fd = open_log(log_path)
    try:
        popen = subprocess.Popen(
            argv,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=fd,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            close_fds=True,
        )
    finally:
        os.close(fd)
    # Our unreaped child: /proc/PID stays readable even if it already exited (as a zombie).
    info = host.process(popen.pid)
    if info is not None:
        leader = ProcRef(popen.pid, info.create_time, info.title, list(info.cmdline or argv))
    else:
        leader = ProcRef(popen.pid, started_at, os.path.basename(argv[0]), list(argv))
    rec = TreeRecord(
        id=uuid.uuid4().hex[:12],
        model=model,
        port=port,
        started_at=started_at,
        leader=leader,
        sid=popen.pid,
        pgid=popen.pid,
        procs=[leader],
        boot_id=current_boot_id(),
        uid=os.geteuid(),
    )
    return popen, rec


def open_log(path: Path) -> int:
    """vLLM's log, opened for append the way a root daemon may (see `host.open_append`)."""
    return open_append(path, 0o640, "log file")[0]


def refresh(rec: TreeRecord, host: Host | None = None) -> TreeRecord:
    """Add what the tree is made of now to `rec` (in place; also returned).

    Cheap by design (run every few seconds): one pass over /proc/*/stat, then maps and fds of the
    members only; the shm root is listed only when a held object is not yet recorded and its name
    cannot be read from the mapping (glibc's temporary semaphore name).
    """
    host = host or Host()
    snap = host.processes()
    members = tree_members(rec, snap)
    for m in members:
        if not any(ref.matches(m) for ref in rec.procs if ref.pid == m.pid):
            rec.procs.append(procref(m, host))

    recorded_ipc = {(i.dev, i.ino) for i in rec.ipc}
    recorded_files = set(rec.files)
    held_files: dict[tuple[int, int], str] = {}
    sockets: set[int] = set()
    for m in members:
        if m.zombie:
            continue
        h = host.holdings(m.pid)
        if h is None:
            continue
        held_files.update(h.files)
        sockets |= h.sockets

    shm_prefix = str(host.shm_root).rstrip("/") + "/"
    tmp_prefix = str(host.tmp_root).rstrip("/") + "/"
    unresolved: set[tuple[int, int]] = set()
    for key, path in held_files.items():
        clean = strip_deleted(path)
        if clean.startswith(shm_prefix):
            if key in recorded_ipc:
                continue
            name = clean[len(shm_prefix) :]
            st = host.stat(clean) if not path.endswith(" (deleted)") and "/" not in name else None
            if st is not None and (st.dev, st.ino) == key:
                rec.ipc.append(IpcRef(name, ipc_kind(name), st.dev, st.ino, st.size))
                recorded_ipc.add(key)
            else:
                unresolved.add(key)
        elif clean.startswith(tmp_prefix) and not path.endswith(" (deleted)"):
            name = clean[len(tmp_prefix) :]
            if DIST_FILE.match(name) and clean not in recorded_files:
                rec.files.append(clean)
                recorded_files.add(clean)
    if unresolved:
        for name in host.list_names(host.shm_root):
            st = host.stat(host.shm_root / name)
            if st is not None and (st.dev, st.ino) in unresolved:
                rec.ipc.append(IpcRef(name, ipc_kind(name), st.dev, st.ino, st.size))
                unresolved.discard((st.dev, st.ino))
                if not unresolved:
                    break

    if sockets:
        for ino, path in host.unix_sockets().items():
            name = path[len(tmp_prefix) :] if path.startswith(tmp_prefix) else ""
            if ino in sockets and ZMQ_SOCKET.match(name) and path not in recorded_files:
                rec.files.append(path)
                recorded_files.add(path)

    _attribute_dist_files(rec, host, snap, members, recorded_files)
    return rec


def _attribute_dist_files(
    rec: TreeRecord,
    host: Host,
    snap: dict[int, ProcInfo],
    members: list[ProcInfo],
    recorded: set[str],
) -> None:
    """Claim unheld `vllm_dist_*` stores created after the tree started, unless ambiguous."""
    candidates: list[FileStat] = []
    for name in host.list_names(host.tmp_root):
        if not DIST_FILE.match(name):
            continue
        path = str(host.tmp_root / name)
        if path in recorded:
            continue
        st = host.stat(path)
        if (
            st is not None
            and rec.started_at <= st.born <= rec.started_at + DIST_ATTRIBUTION_WINDOW_S
            and st.uid == _leader_uid(rec, members)
        ):
            candidates.append(st)
    if not candidates:
        return
    member_pids = {m.pid for m in members}
    others = []
    for p in snap.values():
        if p.pid in member_pids or p.zombie:
            continue
        full = host.process(p.pid)
        if full is not None and (looks_like_vllm(full) or is_mp_helper(full)):
            others.append(full.create_time)
    for st in candidates:
        lo = st.born - DIST_ATTRIBUTION_WINDOW_S
        if any(lo <= t <= st.born for t in others):
            continue  # another server may be starting: not provably ours
        rec.files.append(st.path)
        recorded.add(st.path)


def _leader_uid(rec: TreeRecord, members: list[ProcInfo]) -> int | None:
    for m in members:
        if m.pid == rec.leader.pid:
            return m.uid
    return members[0].uid if members else os.geteuid()


def live_members(rec: TreeRecord, host: Host | None = None) -> list[ProcRef]:
    """Processes of the tree that are alive and not zombies."""
    host = host or Host()
    snap = host.processes()
    return [procref(m, host) for m in tree_members(rec, snap) if not m.zombie]


# ---- ledger ----------------------------------------------------------------------------------
class LedgerWriteError(OSError):
    """The ledger could not be written (ENOSPC, EROFS, EIO...): the message names the path and
    the cause, errno is the cause's. The ledger on disk is then the previous version, whole.

    For the daemon's owner: a tree that cannot be recorded must not be left running
    unrecorded (kill it), and a teardown whose final write fails has still torn down (say so).
    """


class Ledger:
    """`state_dir/ledger.json`: the trees vsup started and has not yet seen fully cleaned.

    Written atomically (temp file, fsync, rename, fsync of the directory) so a crash leaves the
    old or the new version, never a torn one. A file that cannot be read as a ledger (bad JSON,
    a value vsup never writes, nesting deep enough to exhaust the parser, a symlink, a FIFO,
    another user's file) is renamed aside (`ledger.json.corrupt-<ts>`) and an empty ledger is
    used: a daemon that refuses to start (or crashes at every start) over a damaged bookkeeping
    file would be worse than one that forgets. A ledger in a directory vsup cannot trust
    (another user's, or writable by others) is not read at all and not touched: it could name
    any process. Each load says what it refused in `problems` (also logged).
    """

    VERSION = 1
    MAX_BYTES = 16 * 1024 * 1024  # vsup's own ledgers are a few KiB per tree

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = Path(state_dir)
        self.path = self.state_dir / "ledger.json"
        self.problems: list[str] = []

    def load(self) -> list[TreeRecord]:
        self.problems = []
        untrusted = untrusted_dir(self.state_dir)
        if untrusted is not None:
            if untrusted != "does not exist":
                self._problem(f"ledger {self.path} not read: its directory {untrusted}")
            return []
        try:
            raw = self._read()
        except FileNotFoundError:
            return []
        except OSError as e:
            return self._aside(e.strerror or str(e))
        try:
            data = json.loads(raw)
            if not isinstance(data, dict) or not isinstance(data.get("trees"), list):
                raise ValueError("not a ledger object")
            return [TreeRecord.from_json(t) for t in data["trees"]]
        except RecursionError:
            return self._aside("nested too deeply")
        except Exception as e:  # noqa: BLE001 - any way a file fails to parse means corrupt, never a crash
            return self._aside(f"{type(e).__name__}: {e}")

    def _read(self) -> bytes:
        # O_NOFOLLOW: never read through a link; O_NONBLOCK: a FIFO planted here cannot hang us.
        fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise OSError(errno.EINVAL, "not a regular file")
            if st.st_uid not in (0, os.geteuid()) or st.st_mode & 0o022:
                raise OSError(errno.EPERM, f"owned by uid {st.st_uid} with mode {st.st_mode & 0o7777:04o}")
            if st.st_size > self.MAX_BYTES:
                raise OSError(errno.EFBIG, f"{st.st_size} bytes")
            with os.fdopen(os.dup(fd), "rb") as f:
                return f.read(self.MAX_BYTES + 1)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise OSError(errno.ELOOP, "a symbolic link") from None
            raise
        finally:
            os.close(fd)

    def _problem(self, text: str) -> None:
        self.problems.append(text)
        log.error("%s", text)

    def _aside(self, why: str) -> list[TreeRecord]:
        aside = self.path.with_name(f"ledger.json.corrupt-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}")
        try:
            os.replace(self.path, aside)  # renames a link itself, never its target
        except OSError as oe:
            self._problem(f"ledger {self.path} is corrupt ({why}) and could not be moved aside: {oe}")
        else:
            self._problem(f"ledger {self.path} is corrupt ({why}); moved to {aside}, starting empty")
        return []

    def save(self, recs: list[TreeRecord]) -> None:
        """Replace the ledger with `recs`; LedgerWriteError (an OSError) if it cannot."""
        try:
            self._save(recs)
        except OSError as e:
            raise LedgerWriteError(e.errno, f"cannot write the ledger {self.path}: {e.strerror or e}") from e

    def _save(self, recs: list[TreeRecord]) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o750)
        body = json.dumps({"version": self.VERSION, "trees": [r.to_json() for r in recs]}, indent=1)
        fd, tmp = tempfile.mkstemp(prefix=".ledger.", suffix=".tmp", dir=self.state_dir)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(body)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise
        dfd = os.open(self.state_dir, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

    def upsert(self, rec: TreeRecord) -> None:
        recs = [r for r in self.load() if r.id != rec.id]
        recs.append(rec)
        self.save(recs)

    def remove(self, tree_id: str) -> None:
        recs = self.load()
        kept = [r for r in recs if r.id != tree_id]
        if len(kept) != len(recs):
            self.save(kept)


# ---- trusted directories ---------------------------------------------------------------------
def untrusted_dir(path: Path | str, uid: int | None = None) -> str | None:
    """Why vsup must not trust what it finds in directory `path`, or None when it may.

    A directory is trusted when it, and every directory above it, is owned by vsup's user
    (`uid`, default the euid) or root, and another user can neither write into it nor replace
    it: the directory itself not writable by group or others, those above it not writable by
    others unless sticky (a private `mktemp -d` inside /tmp is fine, /tmp itself is not). A
    path that does not exist yet is judged by its nearest existing ancestor, which must be
    trusted the same way or be sticky (vsup creates the rest, and checks it again after).
    Returns "does not exist" for a missing path whose ancestors are fine.
    """
    uid = os.geteuid() if uid is None else uid
    p = Path(path)
    if not p.is_absolute():
        return f"{p} is a relative path"
    target = Path(os.path.realpath(p))
    missing = False
    while True:
        try:
            st = os.stat(target)
            break
        except FileNotFoundError:
            missing, target = True, target.parent
        except OSError as e:
            return f"{target}: {e.strerror or e}"
    if not stat.S_ISDIR(st.st_mode):
        return f"{target} is not a directory"
    if not missing:
        if st.st_uid not in (0, uid):
            return f"{target} is owned by {_user_name(st.st_uid)}, not by {_owners(uid)}"
        if st.st_mode & 0o022:
            who = "others" if st.st_mode & 0o002 else "its group"
            return f"{target} is writable by {who} (mode {st.st_mode & 0o7777:04o})"
    above = [target] if missing else []
    # The real chain and the one as written (a symlink in it lives in a directory that counts).
    for d in dict.fromkeys([*above, *target.parents, *(q for q in p.parents if q.exists())]):
        try:
            st = os.stat(d)
        except OSError as e:
            return f"{d}: {e.strerror or e}"
        if st.st_uid not in (0, uid):
            return f"{d} (above it) is owned by {_user_name(st.st_uid)}, not by {_owners(uid)}"
        if st.st_mode & 0o002 and not st.st_mode & stat.S_ISVTX:
            return f"{d} (above it) is writable by others (mode {st.st_mode & 0o7777:04o})"
    return "does not exist" if missing else None


def _owners(uid: int) -> str:
    return "root" if uid == 0 else f"{_user_name(uid)} or root"


def _user_name(uid: int) -> str:
    try:
        import pwd

        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"
