"""A container's own /dev/shm: prove it is the pod's, then clear what a dead container left.

In Kubernetes the usual `/dev/shm` for vLLM is an `emptyDir` with `medium: Memory` (the
runtime's default is 64 MiB). An emptyDir lives as long as the pod, not the container: when
vLLM's tree dies without unlinking its segments (SIGKILL, OOM, an engine crash), a restarted
container finds them still there, still counted against the `sizeLimit` and the node's memory,
and every later start can fail the same way (CrashLoopBackOff; vllm#54002, sglang#40723).
The ledger on the state emptyDir lets vsup remove what it had recorded; this module removes the
rest, but only where that is provably safe.

**How vsup knows `/dev/shm` is the container's own** (`gather` reads the facts, `decide` rules):

1. the operator says so: `[daemon] shm_private = true` (the shipped manifest mounts the
   `dshm` emptyDir into the vsup container only; its test checks that). Nothing seen from
   inside a container can prove that no *sibling* container mounts the same emptyDir when the
   pod does not share its process namespace: their processes and mounts are invisible;
2. vsup is not in the host's PID namespace (`/proc/self/ns/pid` is not the kernel's initial
   namespace, inode 0xEFFFFFFC), and `/proc` is this namespace's (`/proc/self` is our pid): so
   every process that could map a segment *from this container* is in `/proc`, and a previous
   container's processes are all dead (its PID 1 ended, and the kernel killed the rest of its
   namespace with it);
3. not the host's IPC namespace (`/proc/self/ns/ipc` is not 0xEFFFFFFF): with `hostIPC: true`
   the runtime binds the host's `/dev/shm` into the container;
4. `/dev/shm` is a mount point of its own in our mount namespace (`/proc/self/mountinfo`), a
   `tmpfs`, on a device (major:minor) that no other mount of ours has: not a directory of the
   root file system, not a bind of another visible file system;
5. no visible process in *another* mount namespace (pause and sibling containers when the pod
   sets `shareProcessNamespace: true`) has a mount on that device: their `mountinfo` is read;
   one we may not read counts as a sharer.

Then at start (before vLLM is spawned) every entry of `/dev/shm` that no live process maps or
holds open (device + inode, as cleanup matches them) and that existed before the scan began is
unlinked: in a container of one's own, such an object can only be a dead container's. Anything
else (directories, objects created during the scan, objects a live process holds) is kept and
reported. Where ownership is not proven nothing here runs and cleanup's usual rules apply.
"""

from __future__ import annotations

import os
import stat as _stat
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .host import Host

# include/linux/proc_ns.h: the inode numbers of the kernel's initial namespaces are fixed.
INIT_PID_NS_INO = 0xEFFFFFFC
INIT_IPC_NS_INO = 0xEFFFFFFF
# An object whose timestamps are this close to the scan's start may have been created by a
# live process during the scan: kept (tmpfs times have jiffy granularity).
BORN_SLACK_S = 1.0
SHM_ROOT = "/dev/shm"  # noqa: S108 - the POSIX shm root is what this module is about


@dataclass(frozen=True)
class Mount:
    """One line of /proc/PID/mountinfo (proc(5))."""

    mount_id: int
    parent_id: int
    dev: tuple[int, int]  # (major, minor) of the file system
    root: str  # the path inside the file system that is mounted here
    mount_point: str
    fstype: str
    source: str


def _unescape(field_: str) -> str:
    # mountinfo writes space, tab, newline and backslash as \040, \011, \012, \134.
    out, i = [], 0
    while i < len(field_):
        code = field_[i + 1 : i + 4]
        if field_[i] == "\\" and len(code) == 3 and code.isdigit():
            out.append(chr(int(field_[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field_[i])
            i += 1
    return "".join(out)


def parse_mountinfo(text: str) -> list[Mount]:
    mounts = []
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        a, b = left.split(), right.split()
        if len(a) < 5 or len(b) < 2:
            continue
        major, _, minor = a[2].partition(":")
        mounts.append(
            Mount(
                mount_id=int(a[0]),
                parent_id=int(a[1]),
                dev=(int(major), int(minor)),
                root=_unescape(a[3]),
                mount_point=_unescape(a[4]),
                fstype=b[0],
                source=_unescape(b[1]),
            )
        )
    return mounts


def mount_at(mounts: list[Mount], path: str) -> Mount | None:
    """The mount visible at `path`: of the mounts there, the one no other mount there sits on
    (a container runtime may mount a tmpfs over an inherited /dev/shm mount)."""
    here = [m for m in mounts if m.mount_point == path]
    below = {m.parent_id for m in here}
    top = [m for m in here if m.mount_id not in below]
    return top[-1] if top else None


@dataclass(frozen=True)
class Facts:
    """What `decide` needs, read by `gather` (tests build these by hand)."""

    declared: bool
    pid_ns_ino: int | None
    ipc_ns_ino: int | None
    proc_is_ours: bool
    shm_mount: Mount | None
    other_mounts_same_dev: tuple[str, ...] = ()  # our other mount points on that device
    sharers: tuple[str, ...] = ()  # "pid N (comm)" of other mount namespaces that mount it


@dataclass(frozen=True)
class Ownership:
    own: bool
    reason: str
    facts: Facts | None = None


def decide(f: Facts, shm_root: str = SHM_ROOT) -> Ownership:
    """Is `shm_root` provably this container's own? The first failed condition is the reason."""
    if not f.declared:
        return Ownership(False, "not declared private ([daemon] shm_private = false)", f)
    if f.pid_ns_ino is None or f.pid_ns_ino == INIT_PID_NS_INO:
        return Ownership(False, "vsup runs in the host's PID namespace (not a container)", f)
    if not f.proc_is_ours:
        return Ownership(False, "/proc is not this PID namespace's: processes may be invisible", f)
    if f.ipc_ns_ino is None or f.ipc_ns_ino == INIT_IPC_NS_INO:
        return Ownership(False, f"the host's IPC namespace (hostIPC): {shm_root} is the host's", f)
    m = f.shm_mount
    if m is None:
        return Ownership(False, f"{shm_root} is not a mount point of its own", f)
    if m.fstype != "tmpfs":
        return Ownership(False, f"{shm_root} is {m.fstype}, not tmpfs", f)
    if f.other_mounts_same_dev:
        return Ownership(
            False, f"{shm_root}'s file system is also mounted at {', '.join(f.other_mounts_same_dev)}", f
        )
    if f.sharers:
        return Ownership(False, f"{shm_root}'s file system is mounted by {', '.join(f.sharers)}", f)
    return Ownership(True, f"{shm_root} is a tmpfs of this container's own (device {m.dev[0]}:{m.dev[1]})", f)


def _ns_ino(proc: str, pid: int | str, name: str) -> int | None:
    try:
        return os.stat(f"{proc}/{pid}/ns/{name}").st_ino
    except OSError:
        return None


def gather(declared: bool, shm_root: str = SHM_ROOT, proc_root: str = "/proc") -> Facts:
    """Read the facts from /proc for `decide`."""
    proc = str(proc_root)
    try:
        proc_is_ours = os.readlink(f"{proc}/self") == str(os.getpid())
    except OSError:
        proc_is_ours = False
    try:
        mine = parse_mountinfo(Path(f"{proc}/self/mountinfo").read_text())
    except OSError:
        mine = []
    shm = mount_at(mine, str(shm_root))
    same: list[str] = []
    sharers: list[str] = []
    if shm is not None:
        same = sorted({m.mount_point for m in mine if m.dev == shm.dev and m.mount_point != shm.mount_point})
        my_mnt = _ns_ino(proc, "self", "mnt")
        for name in os.listdir(proc):
            if not name.isdigit():
                continue
            mnt = _ns_ino(proc, name, "mnt")
            if mnt is None or mnt == my_mnt:
                continue  # gone, a kernel thread, or our own mount namespace (same mounts)
            try:
                theirs = parse_mountinfo(Path(f"{proc}/{name}/mountinfo").read_text())
            except FileNotFoundError:
                continue
            except OSError:
                sharers.append(f"pid {name} (mounts unreadable)")
                continue
            if any(m.dev == shm.dev for m in theirs):
                sharers.append(f"pid {name} ({_comm(proc, name)})")
    return Facts(
        declared=declared,
        pid_ns_ino=_ns_ino(proc, "self", "pid"),
        ipc_ns_ino=_ns_ino(proc, "self", "ipc"),
        proc_is_ours=proc_is_ours,
        shm_mount=shm,
        other_mounts_same_dev=tuple(same),
        sharers=tuple(sharers),
    )


def _comm(proc: str, pid: str) -> str:
    try:
        return Path(f"{proc}/{pid}/comm").read_text().strip()
    except OSError:
        return "?"


@dataclass
class ClearReport:
    ownership: Ownership
    unlinked: list[dict[str, Any]] = field(default_factory=list)  # name, bytes
    kept: list[dict[str, Any]] = field(default_factory=list)  # name, reason
    bytes_freed: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "own": self.ownership.own,
            "why": self.ownership.reason,
            "unlinked": self.unlinked,
            "kept": self.kept,
            "bytes_freed": self.bytes_freed,
        }


def clear_leftovers(
    ownership: Ownership, *, host: Host | None = None, clock: Callable[[], float] = time.time
) -> ClearReport:
    """Unlink every entry of the shm root that no live process maps or holds, if `ownership`
    is proven; otherwise do nothing. Call before vLLM is spawned. Blocking."""
    host = host or Host()
    rep = ClearReport(ownership)
    if not ownership.own:
        return rep
    t0 = clock()
    held: dict[tuple[int, int], str] = {}
    for p in host.processes().values():
        if p.zombie:
            continue
        h = host.holdings(p.pid)
        if h is not None:
            for key in h.files:
                held.setdefault(key, f"pid {p.pid} ({p.comm})")
    root = host.shm_root
    for name in sorted(_entries(root)):
        path = root / name
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            continue
        if _stat.S_ISDIR(st.st_mode):
            rep.kept.append({"name": name, "reason": "a directory (vLLM makes none)"})
            continue
        key = (st.st_dev, st.st_ino)
        if key in held:
            rep.kept.append({"name": name, "reason": f"in use by {held[key]}"})
            continue
        # tmpfs keeps no birth time; the earliest of the three is an upper bound on it.
        if min(st.st_atime, st.st_mtime, st.st_ctime) >= t0 - BORN_SLACK_S:
            rep.kept.append({"name": name, "reason": "created during the scan: a live process's"})
            continue
        again = host.stat(path)
        if again is None or (again.dev, again.ino) != key:
            continue
        try:
            host.unlink_file(str(path))
        except FileNotFoundError:
            continue
        except PermissionError as e:
            rep.kept.append({"name": name, "reason": f"unlink refused: {e.strerror}"})
            continue
        rep.unlinked.append({"name": name, "bytes": st.st_blocks * 512})
        rep.bytes_freed += st.st_blocks * 512
    return rep


def _entries(root: Path) -> list[str]:
    try:
        return os.listdir(root)
    except FileNotFoundError:
        return []


# Shm roots proven this container's own by `prepare` in this process (at daemon start).
_proven: set[str] = set()


def blind_reason(shm_root: str = SHM_ROOT, proc_root: str = "/proc") -> str | None:
    """Why a cleanup cannot see every process that may hold objects under `shm_root`, or None.

    In the host's PID namespace every process is in /proc. In a PID namespace of its own (a
    container, `unshare --pid`), processes outside it are invisible while they may still map
    the same /dev/shm (a host's /dev/shm bound in, `hostIPC`, a sibling container): an object
    no *visible* process holds is then not provably unheld, and only objects the ledger
    recorded for vsup's own trees may be unlinked. A /dev/shm proven this container's own by
    `prepare` is the exception. (A real server beside vsup's own tests lost its semaphore to a
    vsup in a PID namespace before this rule.)"""
    if shm_root in _proven:
        return None
    ino = _ns_ino(proc_root, "self", "pid")
    if ino is None or ino == INIT_PID_NS_INO:
        return None
    return (
        "vsup runs in a PID namespace of its own: a process outside it may hold this, and "
        f"{shm_root} is not proven this container's own ([daemon] shm_private)"
    )


def prepare(declared: bool, shm_root: str = SHM_ROOT, *, host: Host | None = None) -> ClearReport:
    """At daemon start: decide ownership of `shm_root` and clear a dead container's leftovers."""
    if not declared:  # the usual case (systemd, a host): nothing to read
        return ClearReport(Ownership(False, "not declared private ([daemon] shm_private = false)"))
    own = decide(gather(declared, shm_root), shm_root)
    if own.own:
        _proven.add(shm_root)
    return clear_leftovers(own, host=host or Host(shm_root=shm_root))
