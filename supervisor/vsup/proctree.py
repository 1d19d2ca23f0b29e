"""Spawning a vLLM server tree and recording everything it is made of, so that the tree can be
found and removed later, even by another vsup process after this one was SIGKILLed.

A tree is the API server vsup started (the leader, in its own session), every process that ever
belonged to it (descendants, and members of its session: a process keeps its session and group
when it is reparented), the /dev/shm objects they were seen to hold (by device + inode), and the
/tmp files they created (gloo FileStore `vllm_dist_*`, ZMQ ipc socket files). The record lives
in `state_dir/ledger.json`.
"""

from __future__ import annotations

import json
import logging
import os
import re
import stat
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from vsup.host import FileStat, Host, ProcInfo, same_process, strip_deleted

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

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> TreeRecord:
        return cls(
            id=str(d["id"]),
            model=str(d["model"]),
            port=int(d["port"]),
            started_at=float(d["started_at"]),
            leader=_procref(d["leader"]),
            sid=int(d["sid"]),
            pgid=int(d["pgid"]),
            procs=[_procref(p) for p in d.get("procs", [])],
            ipc=[
                IpcRef(str(i["name"]), str(i["kind"]), int(i["dev"]), int(i["ino"]), int(i["size"]))
                for i in d.get("ipc", [])
            ],
            files=[str(f) for f in d.get("files", [])],
            ended=bool(d.get("ended", False)),
        )


def _procref(d: dict) -> ProcRef:
    return ProcRef(int(d["pid"]), float(d["create_time"]), str(d["name"]), [str(a) for a in d["cmdline"]])


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
def tree_members(rec: TreeRecord, snap: dict[int, ProcInfo]) -> list[ProcInfo]:
    """Processes of `snap` that belong to the tree (zombies included), by three rules:

    - a recorded process whose pid and create time still match;
    - a process in the tree's session or process group. Linux does not reuse a pid while it is
      still some process's session or group id, so a live member with that sid is ours, unless
      the pid itself now names a different process (the session was ours and is long gone, and
      a new session leader got the number): then only the recorded pids count;
    - a descendant of any of those.
    """
    recorded = {p.pid: p for p in rec.procs}
    recorded.setdefault(rec.leader.pid, rec.leader)

    def id_ok(idnum: int) -> bool:
        owner = snap.get(idnum)
        if owner is None:
            return True
        ref = recorded.get(idnum)
        return ref is not None and ref.matches(owner)

    sid_ok = rec.sid > 1 and id_ok(rec.sid)
    pgid_ok = rec.pgid > 1 and id_ok(rec.pgid)
    found: dict[int, ProcInfo] = {}
    for p in snap.values():
        ref = recorded.get(p.pid)
        if ref is not None and ref.matches(p):
            found[p.pid] = p
        elif sid_ok and p.sid == rec.sid:
            found[p.pid] = p
        elif pgid_ok and p.pgid == rec.pgid:
            found[p.pid] = p
    return list(_with_descendants(found, snap).values())


def _with_descendants(roots: dict[int, ProcInfo], snap: dict[int, ProcInfo]) -> dict[int, ProcInfo]:
    children: dict[int, list[ProcInfo]] = {}
    for p in snap.values():
        children.setdefault(p.ppid, []).append(p)
    out = dict(roots)
    stack = list(roots)
    while stack:
        for c in children.get(stack.pop(), ()):
            if c.pid not in out and c.pid > 1:
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
    root = tmp_root or tempfile.gettempdir()
    path = os.path.join(root, f"vsup-tree-{uuid.uuid4().hex[:12]}")
    os.mkdir(path, 0o700)
    return path


def _torch_user(env: dict[str, str]) -> str:
    """The user name torch's `default_cache_dir()` will compute in the child (getpass.getuser()
    with the child's environment), sanitised as torch does."""
    name = next((env[k] for k in ("LOGNAME", "USER", "LNAME", "USERNAME") if env.get(k)), None)
    if name is None:
        try:
            import pwd

            name = pwd.getpwuid(os.getuid()).pw_name
        except KeyError:
            name = f"uid_{os.getuid()}"
    return re.sub(r'[\\/:*?"<>|]', "_", name)


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
    name = f"torchinductor_{_torch_user(env)}"
    shared = os.path.join(os.path.dirname(tree_tmp.rstrip("/")), name)
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
) -> tuple[subprocess.Popen, TreeRecord]:
    """Start `argv` in a new session with stdout+stderr appended to `log_path`.

    The log fd is opened O_APPEND here and closed in the parent right after the fork, so the
    server keeps logging to the file (and keeps running) if vsup dies: no pipe to vsup exists
    that could fill up or break.
    """
    host = host or Host()
    started_at = host.time()
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o640)
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
    )
    return popen, rec


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
class Ledger:
    """`state_dir/ledger.json`: the trees vsup started and has not yet seen fully cleaned.

    Written atomically (temp file, fsync, rename, fsync of the directory) so a crash leaves the
    old or the new version, never a torn one. A file that cannot be read as a ledger is renamed
    aside (`ledger.json.corrupt-<ts>`) and an empty ledger is used: a daemon that refuses to
    start over a damaged bookkeeping file would be worse than one that forgets.
    """

    VERSION = 1

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = Path(state_dir)
        self.path = self.state_dir / "ledger.json"

    def load(self) -> list[TreeRecord]:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return []
        try:
            data = json.loads(raw)
            if not isinstance(data, dict) or not isinstance(data.get("trees"), list):
                raise ValueError("not a ledger object")
            return [TreeRecord.from_json(t) for t in data["trees"]]
        except (ValueError, KeyError, TypeError) as e:
            aside = self.path.with_name(f"ledger.json.corrupt-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}")
            try:
                os.replace(self.path, aside)
            except OSError as oe:
                log.error("ledger %s is corrupt (%s) and could not be moved aside: %s", self.path, e, oe)
            else:
                log.error("ledger %s is corrupt (%s); moved to %s, starting empty", self.path, e, aside)
            return []

    def save(self, recs: list[TreeRecord]) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
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
