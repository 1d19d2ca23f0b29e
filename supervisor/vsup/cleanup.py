"""Remove what dead vLLM trees leave behind: processes, /dev/shm segments and semaphores, and
their /tmp stores and ZMQ socket files; never anything else.

Three steps, in this order:

1. find: the processes of the dead trees (recorded pid + create time, session, group and their
   descendants), in `foreign` mode also orphaned vLLM processes of servers vsup never started;
   then what they hold (recorded in the ledger, and read from /proc before anything is killed);
2. kill: SIGTERM, a grace, SIGKILL, wait until gone; the multiprocessing resource_tracker last,
   because it unlinks what was registered with it once every other holder of its pipe is gone,
   and leaks it all if it dies with them (vllm-facts.md: within 3 s after an API-server
   SIGKILL);
3. unlink and remove: only objects no live process maps or holds open (matched by device and
   inode), only names of known vLLM patterns or names the dead tree was seen to hold, never
   what may belong to a live server.

Every decision is reported (`Report`), and every step is announced through `progress`.
"""

from __future__ import annotations

import re
import signal
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from vsup import podshm
from vsup.host import FileStat, Host, ProcInfo, SignalResult, same_process
from vsup.proctree import (
    DIST_FILE,
    RECORD_CLOCK_SLACK_S,
    TREE_TMPDIR,
    ZMQ_SOCKET,
    TreeRecord,
    cap_cgroup,
    descendants,
    ipc_kind,
    is_api_server,
    is_mp_helper,
    is_tracker,
    is_vllm_titled,
    looks_like_vllm,
    same_boot,
    tree_epoch,
    tree_members,
)

# SIGTERM to SIGKILL. vLLM 0.32 workers exit at once on SIGTERM; an engine core orphaned by an
# API-server SIGKILL did not exit within 5 s of SIGTERM in the real TP=2 test (then SIGKILL, and
# the tracker still cleaned up), and a wedged process never does: a longer grace only delays
# the restart.
GRACE_S = 5.0
# How long the resource_tracker may take to unlink its registered segments and exit once the
# other processes are gone (measured under 3 s on 2 cores with 4 segments and 2 semaphores).
TRACKER_GRACE_S = 5.0
# After SIGKILL the kernel tears a process down quickly unless it is stuck in D state; beyond
# this we report it as remaining instead of waiting forever.
KILL_WAIT_S = 5.0
# ...unless its exit is still moving. Tearing down a vLLM worker's address space (1.7 GB for a
# tiny TP=2 CPU server) costs 0.15 s of CPU, but a SIGKILLed process gets that CPU only in its
# turn: a worker is pinned to its core (VLLM_CPU_OMP_THREADS_BIND) beside the OMP threads of any
# other vLLM server bound there. Two servers on 2 cores: 2.4 s in a quiet run, and in two runs on
# a busy machine over a minute, during which a fixed 10 s wait declared the still-exiting workers
# "still alive after SIGKILL" four times over, and the instance ended `failed` (issue 18). A
# dying process (SIGKILL pending or in do_exit) whose CPU time grows, or that waits for a CPU
# (state R), is making progress: the wait goes on, each process allowed `kill_wait_s` without
# progress, all of it at most this long after the SIGKILL. It still holds its files until the
# very end (do_exit closes them after the memory): sockets (a SIGKILLed API server's port
# answered nothing for 38 s instead of refusing, in one of those runs) and GPU memory, so
# starting the next tree before it is gone would only fail on them. The cause was the wait for a
# CPU, not the work: the exiting workers got 1 % of their cores (CPU time against wall time), and
# one CI run saw them still exiting after 120 s. So every SIGKILLed process is hastened
# (Host.hasten_exit: nice -20 for the dying threads and their tree's session): the same two-server
# kill then went in under 1 s. This wait remains for where that is not allowed (no CAP_SYS_NICE).
EXIT_WAIT_S = 120.0
# Interval of the "gone yet?" polls: /proc reads of a handful of pids.
POLL_S = 0.05
# An unheld object born less than this before a live vLLM tree started may still be that
# tree's (timestamps have a 1-tick and clock-step fuzz): presumed its.
LIVE_START_SLACK_S = 1.0

# What a V0 engine or worker maps (vllm/_C.abi3.so), its only mark: V0 sets no process title.
V0_MARK = "/vllm/_C."

# Names vLLM (and the libraries under it) create in /dev/shm.
SHM_PATTERN = re.compile(
    r"^(psm_.+|sem\.mp-.+|nccl-.+|torch_.+|vllm_mm_.+|VLLM_OBJECT_STORAGE_SHM_BUFFER.*"
    r"|vllm_offload_.+\.mmap|vllm_ec_.+\.mmap|vllm_dist_.+)$"
)


@dataclass
class Report:
    killed: list[dict[str, Any]] = field(default_factory=list)  # {"pid","name","sid","how"}
    unlinked: list[dict[str, Any]] = field(default_factory=list)  # {"name","kind","bytes","size","by"}
    removed_files: list[str] = field(default_factory=list)
    skipped: list[dict[str, Any]] = field(default_factory=list)  # {"name","reason"}
    bytes_freed: int = 0  # allocated bytes (st_blocks * 512) of what was unlinked or freed
    remaining: list[dict[str, Any]] = field(default_factory=list)  # {"name"|"pid", "reason"}
    zombies: list[dict[str, Any]] = field(default_factory=list)  # {"pid","name","ppid"}: already dead
    dry_run: bool = False
    apparent_bytes_freed: int = 0  # st_size sum: what `ls -l` would have shown

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def clean(self) -> bool:
        return not self.remaining


# ---- find ------------------------------------------------------------------------------------
def find_orphans(snap: dict[int, ProcInfo], host: Host | None = None) -> list[ProcInfo]:
    """vLLM processes whose server is gone (foreign mode), and all their descendants.

    A root is a process vLLM spawned (titled `VLLM::*` / `VllmWorkerProcess` in its cmdline; a
    V0 MQLLMEngine or VllmWorkerProcess, which sets no title: a multiprocessing child that maps
    vLLM's native extension, asked of `host`; or an untitled multiprocessing helper such as the
    resource_tracker in the same session as those) whose parent is neither a vLLM API server nor
    another such process. The parent is what counts, not "ppid is 1": orphans may be reparented
    to any subreaper.
    """

    def v0(p: ProcInfo) -> bool:
        return host is not None and is_mp_helper(p) and not is_tracker(p) and host.maps_file(p.pid, V0_MARK)

    vllm = {p.pid for p in snap.values() if not p.zombie and (is_vllm_titled(p) or v0(p))}
    titled_sids = {snap[pid].sid for pid in vllm}

    def spawned_by_vllm(p: ProcInfo) -> bool:
        return not p.zombie and (p.pid in vllm or (is_mp_helper(p) and p.sid in titled_sids))

    roots = []
    for p in snap.values():
        if not spawned_by_vllm(p):
            continue
        parent = snap.get(p.ppid)
        if parent is not None and (is_api_server(parent) or spawned_by_vllm(parent)):
            continue
        roots.append(p)
    return descendants(roots, snap)


def _ancestors(pid: int, snap: dict[int, ProcInfo]) -> set[int]:
    out = set()
    while pid in snap and pid not in out:
        out.add(pid)
        pid = snap[pid].ppid
    return out


def _label(p: ProcInfo) -> str:
    return f"pid {p.pid} ({p.title})"


def refusal(rec: TreeRecord, may_touch: Callable[[int], bool]) -> str | None:
    """Why a ledger record must not be acted on at all, or None. vsup writes none of these; a
    record that says them was damaged, forged or is not ours, and a SIGKILL on its word could
    hit anything (a record naming pid 1 once meant every process of the machine). Clock
    readings are not judged against `now`: a clock stepped back since the spawn would disown a
    real tree."""
    refs = [rec.leader, *rec.procs]
    if min(rec.sid, rec.pgid, *(r.pid for r in refs)) <= 1:
        return "it names pid, session or group 0 or 1"
    older = [r.pid for r in rec.procs if r.create_time < tree_epoch(rec) - RECORD_CLOCK_SLACK_S]
    if older:
        return f"pid(s) {older[:5]} started before the tree did (before its leader)"
    if rec.uid is not None and not may_touch(rec.uid):
        return f"the tree was started by uid {rec.uid}; only that user (or root with all_users) cleans it"
    return None


# ---- kill ------------------------------------------------------------------------------------
def _alive(host: Host, p: ProcInfo) -> bool:
    now = host.process(p.pid, cmdline=False)
    return now is not None and same_process(now.create_time, p.create_time) and not now.zombie


def _wait_gone(host: Host, procs: list[ProcInfo], timeout: float, poll_s: float) -> list[ProcInfo]:
    deadline = host.monotonic() + timeout
    while True:
        left = [p for p in procs if _alive(host, p)]
        if not left or host.monotonic() >= deadline:
            return left
        host.sleep(poll_s)


def kill_bound(kill_wait_s: float, exit_wait_s: float = EXIT_WAIT_S) -> float:
    """The longest one SIGKILL's wait can last (see EXIT_WAIT_S): for a caller's deadline."""
    return max(kill_wait_s, exit_wait_s)


def _wait_exited(
    host: Host, procs: list[ProcInfo], stall_s: float, cap_s: float, poll_s: float
) -> tuple[list[ProcInfo], dict[int, str], dict[int, float]]:
    """Wait for SIGKILLed `procs` to be gone while their exits make progress (EXIT_WAIT_S).
    Returns those left, why each is left, and how long each one that went took to go."""
    start = host.monotonic()
    last_progress = {p.pid: start for p in procs}
    ticks: dict[int, int] = {}
    why: dict[int, str] = {}
    took: dict[int, float] = {}
    left = list(procs)
    while True:
        now = host.monotonic()
        still = []
        for p in left:
            f = host.exit_facts(p.pid, p.create_time)
            if f is None:  # gone, a zombie (nothing left to free) or its pid reused
                took[p.pid] = now - start
                continue
            still.append(p)
            if f.dying and (f.state == "R" or f.cpu_ticks > ticks.get(p.pid, f.cpu_ticks)):
                last_progress[p.pid] = now
            ticks[p.pid] = f.cpu_ticks
            where = f"state {f.state}" + (f" in {f.wchan}" if f.wchan else "")
            if not f.dying:
                why[p.pid] = f"still alive {now - start:.3g} s after SIGKILL, not exiting ({where})"
            elif now - last_progress[p.pid] >= stall_s:
                why[p.pid] = f"exiting, but no progress for {stall_s:g} s after SIGKILL ({where})"
            else:
                why[p.pid] = (
                    f"still exiting {now - start:.3g} s after SIGKILL ({where}: the kernel is freeing it)"
                )
        left = still
        stalled = all(now - last_progress[p.pid] >= stall_s for p in left)
        if not left or stalled or now - start >= cap_s:
            return left, why, took
        host.sleep(poll_s)


class _Killer:
    def __init__(
        self,
        host: Host,
        rep: Report,
        say: Callable[[str], None],
        poll_s: float,
        exit_wait_s: float,
        own_sids: frozenset[int] = frozenset(),
    ) -> None:
        self.host, self.rep, self.say, self.poll_s = host, rep, say, poll_s
        self.exit_wait_s = exit_wait_s
        self.own_sids = own_sids  # sessions of the dead trees (vsup's setsid): all of them dying
        self.how: dict[int, str] = {}
        self.stuck: dict[int, str] = {}
        self.exit_s: dict[int, float] = {}  # how long a SIGKILLed process took to go, past a moment

    def send(self, procs: list[ProcInfo], sig: signal.Signals) -> list[ProcInfo]:
        """Signal each (identity re-checked); return those that still need waiting for."""
        pending = []
        for p in procs:
            res = self.host.signal(p.pid, p.create_time, sig)
            if res is SignalResult.SENT:
                self.how[p.pid] = sig.name
                self.say(f"{sig.name} {_label(p)}")
                pending.append(p)
            elif res is SignalResult.GONE:
                self.how.setdefault(p.pid, "exited")
            elif res is SignalResult.REUSED:
                self.how[p.pid] = "reused"
                self.say(f"{_label(p)} exited and its pid was reused; not signalled")
            else:
                self.stuck[p.pid] = f"permission denied sending {sig.name}"
                self.say(f"{_label(p)}: permission denied for {sig.name}")
        return pending

    def term_then_kill(self, procs: list[ProcInfo], grace_s: float, kill_wait_s: float) -> None:
        if not procs:
            return
        left = _wait_gone(self.host, self.send(procs, signal.SIGTERM), grace_s, self.poll_s)
        if left:
            self.say(f"{len(left)} still alive after {grace_s:g} s; SIGKILL")
            self.kill(left, kill_wait_s)

    def kill(self, procs: list[ProcInfo], kill_wait_s: float) -> None:
        sent = self.send(procs, signal.SIGKILL)
        for p in sent:  # their exits first in the CPU queue (Host.hasten_exit)
            self.host.hasten_exit(p.pid, p.create_time, session=p.sid in self.own_sids)
        cap = kill_bound(kill_wait_s, self.exit_wait_s)
        left, why, took = _wait_exited(self.host, sent, kill_wait_s, cap, self.poll_s)
        # SIGKILL to gone, for those that took long enough to be worth a look (EXIT_WAIT_S)
        self.exit_s.update({pid: round(t, 3) for pid, t in took.items() if t >= 1.0})
        for p in left:
            self.stuck[p.pid] = why.get(p.pid, f"still alive {kill_wait_s:g} s after SIGKILL")

    def report(self, targets: list[ProcInfo]) -> None:
        for p in targets:
            how = self.how.get(p.pid, "exited")
            if p.pid in self.stuck:
                self.rep.remaining.append({"pid": p.pid, "name": p.title, "reason": self.stuck[p.pid]})
            elif how != "reused":
                row: dict[str, Any] = {"pid": p.pid, "name": p.title, "sid": p.sid, "how": how}
                if p.pid in self.exit_s:
                    row["exit_s"] = self.exit_s[p.pid]  # SIGKILL to gone, when it took a while
                self.rep.killed.append(row)


# ---- the engine ------------------------------------------------------------------------------
def cleanup(
    dead: Sequence[TreeRecord],
    *,
    live: Iterable[TreeRecord] = (),
    foreign: bool = False,
    all_users: bool = False,
    dry_run: bool = False,
    grace_s: float = GRACE_S,
    host: Host | None = None,
    progress: Callable[[str], None] | None = None,
    tracker_grace_s: float = TRACKER_GRACE_S,
    kill_wait_s: float = KILL_WAIT_S,
    poll_s: float = POLL_S,
    exit_wait_s: float = EXIT_WAIT_S,
) -> Report:
    """Kill the processes of the `dead` trees (and, with `foreign`, orphaned vLLM processes),
    then unlink the /dev/shm objects and remove the /tmp files they leave, as the module doc
    says. `live` trees are never touched. With `dry_run` nothing is signalled or removed and the
    report says what would have been. Blocking; run it in a thread from an event loop.
    After a SIGKILL a process gets `kill_wait_s` without progress, and while its exit makes
    progress up to `exit_wait_s` in all (EXIT_WAIT_S; `kill_bound` is the total).
    """
    host = host or Host()
    say = progress or (lambda _msg: None)
    live = list(live)
    rep = Report(dry_run=dry_run)
    # In a PID namespace of its own vsup cannot see every holder of the real /dev/shm: only
    # what the ledger recorded as its trees' is removed then (podshm.blind_reason, issue 18).
    blind = None
    if str(getattr(host, "shm_root", "")) == podshm.SHM_ROOT:
        blind = podshm.blind_reason(podshm.SHM_ROOT, str(getattr(host, "proc_root", "/proc")))
    euid = host.euid()

    def may_touch(uid: int) -> bool:
        return uid == euid or (all_users and euid == 0)

    def owner(uid: int) -> str:
        return f"owned by {host.username(uid)} (uid {uid}); only root with all_users touches it"

    # 0. records that must not be acted on ------------------------------------------------
    sane: list[TreeRecord] = []
    for rec in dead:
        why = refusal(rec, may_touch)
        if why is None:
            sane.append(rec)
        else:
            rep.skipped.append({"name": f"ledger record of tree {rec.id}", "reason": f"refused: {why}"})
            say(f"refused the ledger record of tree {rec.id}: {why}")
    dead = sane
    # A record of another boot matches no process, and what it recorded by inode is not proof
    # (inode numbers are reused); its paths are judged below like anyone's.
    this_boot = [r for r in dead if same_boot(r)]

    # 1. find processes -------------------------------------------------------------------
    snap = host.processes(cmdline=True)
    protected = _ancestors(host.self_pid(), snap) | {0, 1}
    for rec in live:
        protected |= {p.pid for p in tree_members(rec, snap, protected)}
    candidates: dict[int, ProcInfo] = {}
    for rec in dead:
        for p in tree_members(rec, snap, protected):
            candidates.setdefault(p.pid, p)
    tree_pids = set(candidates)
    if foreign:
        for p in find_orphans(snap, host):
            candidates.setdefault(p.pid, p)
    targets: list[ProcInfo] = []
    for p in candidates.values():
        if p.pid in protected:
            rep.skipped.append({"name": _label(p), "reason": "belongs to a live tree or to vsup itself"})
        elif p.zombie:
            rep.zombies.append({"pid": p.pid, "name": p.title, "ppid": p.ppid})
        elif not may_touch(p.uid):
            rep.skipped.append({"name": _label(p), "reason": owner(p.uid)})
        else:
            targets.append(p)
    n_tree_targets = sum(1 for p in targets if p.pid in tree_pids)
    say(
        f"found {len(targets)} process(es) to stop ({n_tree_targets} of dead trees, "
        f"{len(targets) - n_tree_targets} orphaned), {len(rep.zombies)} zombie(s), "
        f"{len(candidates) - len(targets) - len(rep.zombies)} skipped"
    )
    target_pids = {p.pid for p in targets}

    # What the dead trees hold: recorded in the ledger, and read now, before the kill, because
    # an orphan's mappings and listening sockets vanish with it.
    owned: dict[tuple[int, int], str] = {}  # (dev, ino) -> name, objects of the dead trees
    owned_names: set[str] = set()
    files: list[str] = []
    for rec in this_boot:
        for i in rec.ipc:
            owned[(i.dev, i.ino)] = i.name
            owned_names.add(i.name)
        files.extend(rec.files)
    judged = [f for r in dead if not same_boot(r) for f in r.files]
    shm_prefix = str(host.shm_root).rstrip("/") + "/"
    tmp_prefix = str(host.tmp_root).rstrip("/") + "/"
    sockets: set[int] = set()
    for p in targets:
        h = host.holdings(p.pid)
        if h is None:
            continue
        sockets |= h.sockets
        for key, path in h.files.items():
            if path.startswith(shm_prefix):
                owned.setdefault(key, "")
                if not path.endswith(" (deleted)"):
                    # A glibc temporary semaphore name resolves through the sem.mp-* listing.
                    owned_names.add(path[len(shm_prefix) :])
            elif path.startswith(tmp_prefix) and DIST_FILE.match(path[len(tmp_prefix) :]):
                files.append(path)
    if sockets:
        files.extend(path for ino, path in host.unix_sockets().items() if ino in sockets)
    ours_files = set(files)
    files.extend(judged)
    # Objects of the dead trees present before the kill, to account for what the
    # resource_tracker (or any exiting holder) frees by itself.
    before = {}
    for name in host.list_names(host.shm_root):
        if name in owned_names or SHM_PATTERN.match(name):
            st = host.stat(host.shm_root / name)
            if st is not None and (st.dev, st.ino) in owned:
                owned[(st.dev, st.ino)] = name
                before[name] = st

    # 2. kill -----------------------------------------------------------------------------
    if dry_run:
        for p in targets:
            rep.killed.append({"pid": p.pid, "name": p.title, "sid": p.sid, "how": "would signal"})
    elif targets:
        own_sids = frozenset(rec.sid for rec in sane)
        killer = _Killer(host, rep, say, poll_s, exit_wait_s, own_sids)
        trackers = [p for p in targets if is_tracker(p)]
        killer.term_then_kill([p for p in targets if not is_tracker(p)], grace_s, kill_wait_s)
        if trackers:
            say(f"waiting up to {tracker_grace_s:g} s for the resource tracker to unlink its segments")
            left = _wait_gone(host, trackers, tracker_grace_s, poll_s)
            if left:
                # It ignores SIGTERM by design; what it did not unlink is unlinked below.
                killer.kill(left, kill_wait_s)
        killer.report(targets)

    # 3. unlink ---------------------------------------------------------------------------
    snap_after = host.processes(cmdline=True)
    held: dict[tuple[int, int], ProcInfo] = {}
    held_paths: dict[str, ProcInfo] = {}
    for p in snap_after.values():
        if p.zombie or (dry_run and p.pid in target_pids):
            continue
        h = host.holdings(p.pid)
        if h is not None:
            for key, hpath in h.files.items():
                held.setdefault(key, p)
                held_paths.setdefault(hpath, p)
    live_owned = {(i.dev, i.ino): r.id for r in live for i in r.ipc}
    starts = [(r.started_at, f"tree {r.id} ({r.model})") for r in live]
    for p in snap_after.values():
        if p.zombie or p.pid in target_pids:
            continue
        if looks_like_vllm(p):
            starts.append((p.create_time, f"vLLM process {_label(p)}"))
    first_live = min(starts) if starts else None

    def left_alone(st: FileStat, ours: bool) -> str | None:
        """Why a shm object or /tmp file that nothing holds is not removed: another user's, or
        (when not recorded as ours) born after a live vLLM started, so presumed that one's."""
        if not may_touch(st.uid):
            return owner(st.uid)
        if not ours and first_live is not None and st.born >= first_live[0] - LIVE_START_SLACK_S:
            return f"created after live {first_live[1]} started; presumed its"
        return None

    seen: set[tuple[int, int]] = set()
    for name in host.list_names(host.shm_root):
        pattern = bool(SHM_PATTERN.match(name))
        if not pattern and name not in owned_names and name not in before:
            continue
        st = host.stat(host.shm_root / name)
        if st is None:
            continue
        key = (st.dev, st.ino)
        seen.add(key)
        ours = key in owned
        if not ours and not pattern:
            rep.skipped.append(
                {"name": name, "reason": "recorded name now has another inode and is no vLLM name"}
            )
            continue
        if key in live_owned:
            rep.skipped.append({"name": name, "reason": f"held by live tree {live_owned[key]}"})
            continue
        if key in held:
            why = f"in use by {_label(held[key])}"
            (rep.remaining if ours else rep.skipped).append({"name": name, "reason": why})
            continue
        why = left_alone(st, ours)
        if why is not None:
            rep.skipped.append({"name": name, "reason": why})
            continue
        if not ours and blind is not None:
            rep.skipped.append({"name": name, "reason": blind})
            continue
        kind = ipc_kind(name)
        if not dry_run:
            again = host.stat(host.shm_root / name)
            if again is None or (again.dev, again.ino) != key:
                continue
            try:
                host.unlink_ipc(name, kind)
            except FileNotFoundError:
                # Gone between the look and the unlink: the tracker or its owner got there.
                if name in before:
                    _freed(rep, name, kind, before[name], "holder exit")
                continue
            except PermissionError as e:
                (rep.remaining if ours else rep.skipped).append(
                    {"name": name, "reason": f"unlink refused: {e}"}
                )
                continue
        say(f"{'would unlink' if dry_run else 'unlinked'} {name} ({st.alloc} bytes allocated)")
        _freed(rep, name, kind, st, "would unlink" if dry_run else "vsup")
    for name, st in before.items():
        if (st.dev, st.ino) not in seen:
            _freed(rep, name, ipc_kind(name), st, "holder exit")
            say(f"{name} was removed by its holders' exit (resource_tracker or exit handler)")

    # 4. files ----------------------------------------------------------------------------
    if foreign:
        for name in host.list_names(host.tmp_root):
            if DIST_FILE.match(name) or ZMQ_SOCKET.match(name):
                files.append(tmp_prefix + name)
    # In a dry run the targets still live: their sockets do not count as "in use".
    bound = {path for ino, path in host.unix_sockets().items() if not (dry_run and ino in sockets)}
    done: set[str] = set()
    for path in files:
        if path in done:
            continue
        done.add(path)
        if not path.startswith(tmp_prefix) or "/" in path[len(tmp_prefix) :]:
            if TREE_TMPDIR.match(path.rstrip("/").rsplit("/", 1)[-1]):
                # A tree dir made under vsup's own $TMPDIR by an older vsup: not judged here
                # (only tmp-root paths are), but said, not silently dropped as clean.
                rep.skipped.append({"name": path, "reason": f"outside {host.tmp_root}: not removed"})
            continue
        name = path[len(tmp_prefix) :]
        if TREE_TMPDIR.match(name):
            # The tree's own TMPDIR (vsup made it for this tree alone): everything in it is the
            # tree's, once nothing alive holds or listens on anything inside it. Of another
            # boot only when it is still a real directory of a user we may clean up after.
            if not host.is_dir(path):
                continue
            dst = host.stat(path)
            if dst is None or (path not in ours_files and path not in judged):
                continue
            if not may_touch(dst.uid):
                rep.skipped.append({"name": path, "reason": owner(dst.uid)})
                continue
            inside = path + "/"
            users = [_label(p) for hp, p in held_paths.items() if hp.startswith(inside)]
            users += [bp for bp in bound if bp.startswith(inside)]
            if users:
                rep.remaining.append({"name": path, "reason": f"in use: {users[0]}"})
                continue
            if not dry_run:
                try:
                    host.remove_dir(path)
                except OSError as e:
                    rep.remaining.append({"name": path, "reason": f"remove refused: {e}"})
                    continue
            rep.removed_files.append(path)
            say(f"{'would remove' if dry_run else 'removed'} {path} (the tree's TMPDIR)")
            continue
        st = host.stat(path)
        if st is None:
            continue
        is_dist = bool(DIST_FILE.match(name)) and not st.is_socket
        if not is_dist and not (ZMQ_SOCKET.match(name) and st.is_socket):
            continue
        ours = path in ours_files
        in_use = path in bound if st.is_socket else (st.dev, st.ino) in held
        if in_use:
            (rep.remaining if ours else rep.skipped).append(
                {"name": path, "reason": "in use by a live process"}
            )
            continue
        why = left_alone(st, ours)
        if why is not None:
            rep.skipped.append({"name": path, "reason": why})
            continue
        if not dry_run:
            try:
                host.unlink_file(path)
            except FileNotFoundError:
                continue
            except PermissionError as e:
                (rep.remaining if ours else rep.skipped).append(
                    {"name": path, "reason": f"remove refused: {e}"}
                )
                continue
        rep.removed_files.append(path)
        say(f"{'would remove' if dry_run else 'removed'} {path}")

    # 5. the CPU cap of a tree that loaded beside a serving one (overlapped.py), left by a vsup
    # that ended before lifting it: an empty cgroup once the tree is gone, removed.
    for rec in [] if dry_run else sane:
        name = cap_cgroup(rec.id)
        try:
            cg = host.cpu_uncap(name)
        except OSError as e:
            rep.remaining.append({"name": f"cpu cgroup {name}", "reason": f"remove refused: {e}"})
            continue
        if cg is not None:
            rep.removed_files.append(cg)
            say(f"removed {cg} (the tree's CPU cap)")

    say(
        f"cleanup {'(dry run) ' if dry_run else ''}done: {len(rep.killed)} process(es), "
        f"{len(rep.unlinked)} object(s), {len(rep.removed_files)} file(s), "
        f"{rep.bytes_freed} bytes freed, {len(rep.remaining)} remaining"
    )
    return rep


def _freed(rep: Report, name: str, kind: str, st: FileStat, by: str) -> None:
    rep.unlinked.append({"name": name, "kind": kind, "bytes": st.alloc, "size": st.size, "by": by})
    rep.bytes_freed += st.alloc
    rep.apparent_bytes_freed += st.size


# ---- port ------------------------------------------------------------------------------------
def port_holder(port: int, host: Host | None = None) -> dict[str, Any] | None:
    """Who listens on TCP `port` (IPv4 or IPv6): {"pid","name","cmdline","user"}, or None."""
    host = host or Host()
    pids = host.tcp_listeners(port)
    if not pids:
        return None
    for pid in pids:
        info = host.process(pid) if pid is not None else None
        if info is not None:
            return {
                "pid": info.pid,
                "name": info.title,
                "cmdline": list(info.cmdline or ()),
                "user": host.username(info.uid),
            }
    return {"pid": None, "name": "unknown", "cmdline": [], "user": "unknown"}


# ---- human output ----------------------------------------------------------------------------
def _mib(n: int) -> str:
    return f"{n / 1048576:.1f} MiB"


def render_table(report: Report) -> str:
    """A short table for `vsup cleanup` without --json."""
    rows: list[tuple[str, str, str]] = []
    for k in report.killed:
        rows.append(("killed", f"pid {k['pid']} {k['name']}", k.get("how", "")))
    for u in report.unlinked:
        rows.append(("unlinked", u["name"], f"{_mib(u['bytes'])} ({u.get('by', '')})"))
    for f in report.removed_files:
        rows.append(("removed", f, ""))
    for z in report.zombies:
        rows.append(("zombie", f"pid {z['pid']} {z['name']}", f"awaiting reaping by pid {z.get('ppid')}"))
    for s in report.skipped:
        rows.append(("skipped", s["name"], s["reason"]))
    for r in report.remaining:
        rows.append(
            (
                "REMAINING",
                r["name"] if "pid" not in r else f"pid {r['pid']} {r.get('name', '')}",
                r["reason"],
            )
        )
    out = []
    if rows:
        w0 = max(len(r[0]) for r in rows)
        w1 = min(max(len(r[1]) for r in rows), 48)
        out = [f"{a:<{w0}}  {b:<{w1}}  {c}".rstrip() for a, b, c in rows]
    else:
        out = ["nothing to clean"]
    verb = "would free" if report.dry_run else "freed"
    out.append(
        f"{verb} {_mib(report.bytes_freed)} allocated ({_mib(report.apparent_bytes_freed)} apparent); "
        + ("clean" if report.clean else f"{len(report.remaining)} item(s) remaining")
    )
    return "\n".join(out)
