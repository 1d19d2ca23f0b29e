"""The thin OS seam: every /proc read, signal, unlink and clock call that process-tree
recording and cleanup make goes through one `Host` object, so tests can substitute a fake
(supervisord's `options` idea) and the real-vLLM tests prove the real thing.

Nothing here decides anything; it reports what the OS says and does exactly what it is told,
re-checking identity (pid + create time) right before a signal.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
import resource
import signal as _signal
import stat as _stat
import threading
import time
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

import posix_ipc
import psutil

# A pid's create time is read as starttime/CLK_TCK + btime, exactly as psutil does, so values
# agree with psutil.Process(pid).create_time(). btime (/proc/stat) moves when the wall clock is
# stepped, so a recorded create time may be off by a clock step: identity comparisons allow this
# much. A pid reused within a second of its previous owner's start is not a realistic case.
CREATE_TIME_TOLERANCE_S = 1.0

PR_SET_CHILD_SUBREAPER = 36
CAP_SYS_PTRACE = 19
# include/linux/sched.h: set on a task once it is inside do_exit(). Its user code never runs
# again; the kernel is releasing its memory (exit_mm), then its files (sockets, GPU handles).
PF_EXITING = 0x00000004
_SIGKILL_BIT = 1 << (_signal.SIGKILL - 1)

_SOCKET_LINK = re.compile(r"socket:\[(\d+)\]")
_DELETED = " (deleted)"
_DEAD = (b"Z", b"X")  # /proc stat states of a thread that has ended


@dataclass(frozen=True)
class ProcInfo:
    """One process as /proc/PID/stat shows it (cmdline only when asked for)."""

    pid: int
    ppid: int
    pgid: int
    sid: int
    create_time: float
    comm: str
    state: str  # one letter from /proc/PID/stat: R S D Z T t X I ...
    uid: int
    cmdline: tuple[str, ...] | None = None

    @property
    def zombie(self) -> bool:
        return self.state in ("Z", "X")

    @property
    def title(self) -> str:
        """The name a human would use: the setproctitle title if set, else comm."""
        if self.cmdline:
            first = self.cmdline[0]
            # setproctitle puts the whole title in argv[0]; comm is cut at 15 characters.
            if first.startswith("VLLM::"):
                return first.split()[0]
            if any("multiprocessing.resource_tracker" in a for a in self.cmdline):
                return "resource_tracker"
        return self.comm


@dataclass(frozen=True)
class FileStat:
    """A directory entry of the shm root or the tmp root, with the fields cleanup needs."""

    name: str
    path: str
    dev: int
    ino: int
    size: int  # st_size, the apparent size
    alloc: int  # st_blocks * 512: memory the object really occupies on tmpfs
    uid: int
    born: float  # min(atime, mtime, ctime): no earlier than creation, see Host.stat
    is_socket: bool = False


@dataclass
class Holdings:
    """What one process maps or holds open under the shm and tmp roots, and its socket inodes."""

    files: dict[tuple[int, int], str] = field(default_factory=dict)  # (dev, ino) -> path as seen
    sockets: set[int] = field(default_factory=set)


class SignalResult(Enum):
    SENT = "sent"
    GONE = "gone"  # no such process (or already a zombie, which counts as gone)
    REUSED = "reused"  # the pid now belongs to a different process
    DENIED = "denied"  # EPERM


@dataclass(frozen=True)
class ThreadFacts:
    tid: int
    comm: str
    state: str
    wchan: str
    cpu_s: float  # utime + stime since the thread started


@dataclass(frozen=True)
class ProcFacts:
    """What the kernel says one process is doing, for the stack forensics."""

    pid: int
    create_time: float
    state: str  # the main thread's: R S D T t Z ...
    wchan: str
    cpu_s: float  # all threads, utime + stime
    threads: tuple[ThreadFacts, ...]


@dataclass(frozen=True)
class ExitFacts:
    """How far a signalled process is on its way out (/proc/PID/stat and status)."""

    dying: bool  # SIGKILL is pending or the kernel is in do_exit() for it: never runs user code again
    cpu_ticks: int  # utime + stime of the whole process: grows while the kernel tears it down
    state: str  # the main thread's: R (running or waiting for a CPU) D S Z ...
    wchan: str  # where it sleeps, "" when it runs


# A helper whose status a foreign waitpid(-1) took (a reaper that does not call deliver_child).
HELPER_STATUS_LOST = -1000


@dataclass
class Helper:
    """A short-lived subprocess of vsup's own (py-spy): pid, pidfd and the read ends of its pipes."""

    pid: int
    pidfd: int
    stdout: int
    stderr: int
    returncode: int | None = None


_HELPERS: dict[int, Helper] = {}
_HELPERS_LOCK = threading.Lock()


def deliver_child(pid: int, status: int) -> bool:
    """See Host.deliver_child. Process-wide, as waitpid(-1) is."""
    with _HELPERS_LOCK:
        h = _HELPERS.pop(pid, None)
        if h is None:
            return False
        h.returncode = os.waitstatus_to_exitcode(status)
        return True


class Host:
    """The real OS. `shm_root` and `tmp_root` are parameters so tests can point them elsewhere."""

    def __init__(
        self,
        shm_root: Path | str = "/dev/shm",  # noqa: S108 - roots scanned and judged, no file made in them
        tmp_root: Path | str = "/tmp",  # noqa: S108 - root scanned, no file made in it
        proc_root: Path | str = "/proc",
    ) -> None:
        self.shm_root = Path(shm_root)
        self.tmp_root = Path(tmp_root)
        self.proc_root = Path(proc_root)
        self._proc = str(self.proc_root)
        self._shm_prefix = str(self.shm_root).rstrip("/") + "/"
        self._tmp_prefix = str(self.tmp_root).rstrip("/") + "/"
        self._clk_tck = os.sysconf("SC_CLK_TCK")
        self._btime_cache: float | None = None  # read at first use: gpu's fake /proc roots have no stat
        self._real_shm = self.shm_root == Path("/dev/shm")  # noqa: S108 - a comparison

    # ---- clock -------------------------------------------------------------------------------
    def time(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)

    # ---- identity ----------------------------------------------------------------------------
    def self_pid(self) -> int:
        return os.getpid()

    def euid(self) -> int:
        return os.geteuid()

    def username(self, uid: int) -> str:
        import pwd

        try:
            return pwd.getpwuid(uid).pw_name
        except KeyError:
            return str(uid)

    # ---- processes ---------------------------------------------------------------------------
    @property
    def _btime(self) -> float:
        if self._btime_cache is None:
            self._btime_cache = self._read_btime()
        return self._btime_cache

    def _read_btime(self) -> float:
        with open(f"{self._proc}/stat", "rb") as f:
            for line in f:
                if line.startswith(b"btime"):
                    return float(line.split()[1])
        raise RuntimeError("btime not found in /proc/stat")

    def _stat_pid(self, pid: int) -> ProcInfo | None:
        try:
            with open(f"{self._proc}/{pid}/stat", "rb") as f:
                data = f.read()
            uid = os.stat(f"{self._proc}/{pid}").st_uid
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            return None
        lp, rp = data.find(b"("), data.rfind(b")")
        if lp < 0 or rp < 0:
            return None
        comm = data[lp + 1 : rp].decode("utf-8", "replace")
        fs = data[rp + 2 :].split()
        state = fs[0]
        if state in _DEAD:
            live = self._live_thread(pid)
            if live is not None:  # the leader is done, the process is not: it holds everything yet
                state = live[1][0]
        return ProcInfo(
            pid=pid,
            ppid=int(fs[1]),
            pgid=int(fs[2]),
            sid=int(fs[3]),
            create_time=int(fs[19]) / self._clk_tck + self._btime,
            comm=comm,
            state=state.decode(),
            uid=uid,
        )

    def _live_thread(self, pid: int) -> tuple[str, list[bytes]] | None:
        """For a process whose thread-group leader reads Z: one of its other threads that has
        not ended yet, as (its /proc directory, its stat fields); None when there is none.

        The leader thread of a process can end first (it called pthread_exit, or exit_group
        reached it first) and then reads Z in /proc/PID/stat, with empty maps and fd listings,
        while another thread still tears the address space down with every file, socket and
        mapping of the process still open. Seen in CI: a SIGKILLed vLLM worker read as a zombie
        while its ZMQ socket in the tree's TMPDIR was still live, so the forced exit's cleanup
        took it for gone and found the directory "in use" by nobody it could see."""
        base = f"{self._proc}/{pid}/task"
        try:
            tids = os.listdir(base)
        except OSError:
            return None
        for tid in tids:
            if tid == str(pid) or not tid.isdigit():
                continue
            try:
                with open(f"{base}/{tid}/stat", "rb") as f:
                    data = f.read()
            except OSError:
                continue
            fs = data[data.rfind(b")") + 2 :].split()
            if len(fs) > 19 and fs[0] not in _DEAD:
                return f"{base}/{tid}", fs
        return None

    def cmdline(self, pid: int) -> tuple[str, ...] | None:
        """argv as /proc/PID/cmdline shows it; a setproctitle title comes back as one element."""
        try:
            with open(f"{self._proc}/{pid}/cmdline", "rb") as f:
                raw = f.read()
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            return None
        parts = raw.split(b"\0")
        while parts and parts[-1] == b"":
            parts.pop()
        return tuple(p.decode("utf-8", "replace") for p in parts)

    def process(self, pid: int, cmdline: bool = True) -> ProcInfo | None:
        info = self._stat_pid(pid)
        if info is None or not cmdline:
            return info
        return _with_cmdline(info, self.cmdline(pid))

    def processes(self, cmdline: bool = False) -> dict[int, ProcInfo]:
        """Every process (not thread) now visible, by pid. One pass over /proc."""
        out: dict[int, ProcInfo] = {}
        for name in os.listdir(self._proc):
            if not name.isdigit():
                continue
            info = self.process(int(name), cmdline=cmdline)
            if info is not None:
                out[info.pid] = info
        return out

    def pids(self) -> list[int]:
        """Every pid now listed under the proc root."""
        try:
            return [int(n) for n in os.listdir(self._proc) if n.isdigit()]
        except OSError:
            return []

    def exists(self, pid: int) -> bool:
        """The pid is listed (a zombie included)."""
        return os.path.exists(f"{self._proc}/{pid}")

    def fd_targets(self, pid: int) -> list[str] | None:
        """Where each open file descriptor of `pid` points; None when its fds cannot be read."""
        fd_dir = f"{self._proc}/{pid}/fd"
        try:
            names = os.listdir(fd_dir)
        except OSError:
            return None
        out = []
        for name in names:
            try:
                out.append(os.readlink(f"{fd_dir}/{name}"))
            except OSError:
                continue  # closed between listdir and readlink
        return out

    def ns_pids(self, pid: int) -> list[int] | None:
        """`pid`'s NSpid chain (this namespace's pid first, then each inner one), None if unknown."""
        try:
            with open(f"{self._proc}/{pid}/status") as f:
                for line in f:
                    if line.startswith("NSpid:"):
                        return [int(x) for x in line.split()[1:]]
        except (OSError, ValueError):
            return None
        return None

    def comm(self, pid: int) -> str | None:
        try:
            with open(f"{self._proc}/{pid}/comm", "rb") as f:
                return f.read().decode(errors="replace").strip()
        except OSError:
            return None

    # ---- what a process holds ----------------------------------------------------------------
    def holdings(self, pid: int) -> Holdings | None:
        """Files under the shm/tmp roots that `pid` maps or has open, and its socket inodes.

        Maps are matched by device and inode, not by name: a process that created a POSIX
        semaphore maps it under glibc's temporary name `sem.XXXXXX (deleted)`, with the inode of
        the `sem.mp-*` it was linked to. None when the process is gone. Run as non-root, the
        maps and fds of other users' processes are unreadable and come back empty; objects are
        created 0600 by Python and vLLM, so other users cannot hold ours anyway.
        """
        h = Holdings()
        root = self._shm_prefix.encode()
        base = f"{self._proc}/{pid}"
        data = _read_maps(base)
        if data is None:
            return None
        if not data:  # a kernel thread, another user's process, or a leader thread that has
            live = self._live_thread(pid)  # ended while another one still holds everything
            if live is not None:
                base = live[0]
                data = _read_maps(base) or b""
        if root in data:
            for line in data.splitlines():
                i = line.find(root)
                if i < 0:
                    continue
                cols = line[:i].split()
                if len(cols) < 5:
                    continue
                major, _, minor = cols[3].partition(b":")
                ino = int(cols[4])
                if ino == 0:
                    continue
                dev = os.makedev(int(major, 16), int(minor, 16))
                h.files.setdefault((dev, ino), line[i:].decode("utf-8", "replace"))
        fd_dir = f"{base}/fd"
        try:
            fds = os.listdir(fd_dir)
        except (FileNotFoundError, ProcessLookupError):
            return None if not h.files else h
        except PermissionError:
            return h
        for fd in fds:
            try:
                target = os.readlink(f"{fd_dir}/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                m = _SOCKET_LINK.match(target)
                if m:
                    h.sockets.add(int(m.group(1)))
            elif target.startswith(self._shm_prefix) or target.startswith(self._tmp_prefix):
                try:
                    st = os.stat(f"{fd_dir}/{fd}")
                except OSError:
                    continue
                h.files.setdefault((st.st_dev, st.st_ino), target)
        return h

    def maps_file(self, pid: int, fragment: str) -> bool:
        """Whether `pid` maps a file whose path contains `fragment`. vLLM's V0 engine and workers
        (MQLLMEngine, VllmWorkerProcess; up to 0.10) set no process title: their command line is
        multiprocessing's `spawn_main`, and only the native extension they map (`/vllm/_C.`) says
        what they are. False when the process is gone or its maps are unreadable."""
        try:
            with open(f"{self._proc}/{pid}/maps", "rb") as f:
                return fragment.encode() in f.read()
        except OSError:
            return False

    def unix_sockets(self) -> dict[int, str]:
        """Bound unix sockets with a path under the tmp root: inode -> path (/proc/net/unix).

        A socket file stays on disk after its process dies, but only a live socket is listed,
        so "listed" means "someone listens on (or is connected through) this path now".
        """
        out: dict[int, str] = {}
        try:
            with open(f"{self._proc}/net/unix", "rb") as f:
                lines = f.read().splitlines()[1:]
        except OSError:
            return out
        prefix = self._tmp_prefix.encode()
        for line in lines:
            cols = line.split(None, 7)
            if len(cols) < 8 or not cols[7].startswith(prefix):
                continue
            out[int(cols[6])] = cols[7].decode("utf-8", "replace")
        return out

    def tcp_listeners(self, port: int) -> list[int | None]:
        """Pids listening on TCP `port` (IPv4 or IPv6); None for a socket whose owner is unseen."""
        pids: list[int | None] = []
        for c in psutil.net_connections(kind="tcp"):
            if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port and c.pid not in pids:
                pids.append(c.pid)
        return pids

    # ---- signals -----------------------------------------------------------------------------
    def signal(self, pid: int, create_time: float, sig: int) -> SignalResult:
        """Send `sig` to `pid` only if it is still the process born at `create_time`.

        A pidfd pins the process between the identity check and the signal, so a pid reused in
        between cannot be hit; plain kill() is the fallback where pidfds are missing.
        """
        pidfd = -1
        try:
            pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            return SignalResult.GONE
        except (AttributeError, OSError):
            pidfd = -1
        try:
            info = self._stat_pid(pid)
            if info is None:
                return SignalResult.GONE
            if abs(info.create_time - create_time) > CREATE_TIME_TOLERANCE_S:
                return SignalResult.REUSED
            if info.zombie:
                return SignalResult.GONE
            try:
                if pidfd >= 0:
                    _signal.pidfd_send_signal(pidfd, sig)
                else:
                    os.kill(pid, sig)
            except ProcessLookupError:
                return SignalResult.GONE
            except PermissionError:
                return SignalResult.DENIED
            return SignalResult.SENT
        finally:
            if pidfd >= 0:
                os.close(pidfd)

    # ---- process facts (stack forensics) ------------------------------------------------------
    def proc_facts(self, pid: int) -> ProcFacts | None:
        """State, wchan, CPU time and every thread's state of `pid`, from /proc; None when gone.

        wchan is the kernel function a sleeping task waits in ("futex_wait_queue", "do_select",
        "do_signal_stop"); "" where the kernel hides it (kptr_restrict) or the task runs.
        """
        info = self._stat_pid(pid)
        if info is None:
            return None
        base = f"{self._proc}/{pid}"
        threads: list[ThreadFacts] = []
        try:
            tids = sorted(int(t) for t in os.listdir(f"{base}/task") if t.isdigit())
        except OSError:
            tids = [pid]
        cpu = 0.0
        for tid in tids:
            t = self._thread_stat(f"{base}/task/{tid}")
            if t is None:
                continue
            comm, state, ticks = t
            cpu += ticks
            threads.append(
                ThreadFacts(tid, comm, state, _read_wchan(f"{base}/task/{tid}/wchan"), ticks / self._clk_tck)
            )
        main = next((t for t in threads if t.tid == pid), None)
        return ProcFacts(
            pid=pid,
            create_time=info.create_time,
            state=info.state,
            wchan=main.wchan if main else _read_wchan(f"{base}/wchan"),
            cpu_s=cpu / self._clk_tck,
            threads=tuple(threads),
        )

    def exit_facts(self, pid: int, create_time: float) -> ExitFacts | None:
        """Is `pid` (still the process born at `create_time`) dying, and is its exit moving?
        None when it is gone, a zombie (every thread ended) or another process now.

        A SIGKILLed process is not gone when kill() returns: every thread must be scheduled to
        act on the signal, and the last one tears the address space down (exit_mmap) before the
        files are closed and the parent can reap it. That takes CPU time: 0.15 s for 1.7 GB
        here on an idle core, 1.75 s beside 8 busy threads pinned to the same core, longer
        behind vLLM's OMP threads on a 2-core box. Its CPU time growing is the progress.
        """
        try:
            with open(f"{self._proc}/{pid}/stat", "rb") as f:
                data = f.read()
            with open(f"{self._proc}/{pid}/status", "rb") as f:
                status = f.read()
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            return None
        rp = data.rfind(b")")
        fs = data[rp + 2 :].split()
        if len(fs) < 20:
            return None
        if abs(int(fs[19]) / self._clk_tck + self._btime - create_time) > CREATE_TIME_TOLERANCE_S:
            return None
        ticks = int(fs[11]) + int(fs[12])  # the leader's stat counts every thread's CPU time
        wchan_at = f"{self._proc}/{pid}"
        if fs[0] in _DEAD:
            # The leader thread has ended; the process has not while another thread is still
            # exiting (with the address space and every file still held): judge by that thread.
            live = self._live_thread(pid)
            if live is None:
                return None
            wchan_at, fs = live
            try:
                with open(f"{wchan_at}/status", "rb") as f:
                    status = f.read()
            except OSError:
                return None
        pending = 0
        for line in status.splitlines():
            if line.startswith((b"SigPnd:", b"ShdPnd:")):
                pending |= int(line.split()[1], 16)
        return ExitFacts(
            dying=bool(int(fs[6]) & PF_EXITING or pending & _SIGKILL_BIT),
            cpu_ticks=ticks,
            state=fs[0].decode(),
            wchan=_read_wchan(f"{wchan_at}/wchan"),
        )

    def hasten_exit(self, pid: int, create_time: float, session: bool) -> bool:
        """Put a SIGKILLed process's exit at the front of the CPU queue: nice -20 on each of its
        threads and, with `session` (the session is a tree vsup started, all of it dying), on
        its session's autogroup. A dying process runs no code of its own, only the kernel's
        teardown of it, so the priority cannot favour anything else; and while it waits its turn
        it holds its memory, GPU memory, sockets and files. Measured here: two TP=2 servers on 2
        cores, one tree SIGKILLed, its workers ran 1 % of the time behind the other tree's
        threads pinned to the same cores and took 10 s to go (over 120 s on a busier machine);
        hastened, 2.5 s. Needs CAP_SYS_NICE (root): without it nothing changes, and False."""
        facts = self.exit_facts(pid, create_time)
        if facts is None or not facts.dying:  # gone, another process, or not killed: never a live one
            return False
        done = False
        with contextlib.suppress(OSError):
            for tid in os.listdir(f"{self._proc}/{pid}/task"):
                with contextlib.suppress(OSError, ValueError):
                    os.setpriority(os.PRIO_PROCESS, int(tid), -20)
                    done = True
        if session:
            done = self.autogroup_nice(pid, -20) is not None and done
        return done

    def _thread_stat(self, path: str) -> tuple[str, str, int] | None:
        try:
            with open(f"{path}/stat", "rb") as f:
                data = f.read()
        except OSError:
            return None
        lp, rp = data.find(b"("), data.rfind(b")")
        if lp < 0 or rp < 0:
            return None
        fs = data[rp + 2 :].split()
        return data[lp + 1 : rp].decode("utf-8", "replace"), fs[0].decode(), int(fs[11]) + int(fs[12])

    def ptrace_scope(self) -> int | None:
        """Yama's kernel.yama.ptrace_scope (0-3), or None where Yama is not in the kernel."""
        try:
            with open(f"{self._proc}/sys/kernel/yama/ptrace_scope") as f:
                return int(f.read().strip())
        except (OSError, ValueError):
            return None

    def has_cap_sys_ptrace(self) -> bool:
        """Is CAP_SYS_PTRACE in this process's effective set? (The shipped unit drops them all.)"""
        try:
            with open(f"{self._proc}/self/status") as f:
                for line in f:
                    if line.startswith("CapEff:"):
                        return bool(int(line.split()[1], 16) >> CAP_SYS_PTRACE & 1)
        except (OSError, ValueError):
            pass
        return False

    def disable_core(self, pid: int, create_time: float) -> SignalResult:
        """RLIMIT_CORE=0 on `pid` (prlimit) if it is still the process born at `create_time`.

        Before vsup's own SIGABRT: a dump of a 10 GB worker's core would fill the disk or keep
        systemd-coredump busy for minutes. Not PR_SET_DUMPABLE=0: that also forbids same-user
        ptrace (py-spy) and cannot be set from outside anyway. Lowering a limit of a same-user
        process needs no capability.
        """
        info = self._stat_pid(pid)
        if info is None or info.zombie:
            return SignalResult.GONE
        if abs(info.create_time - create_time) > CREATE_TIME_TOLERANCE_S:
            return SignalResult.REUSED
        try:
            resource.prlimit(pid, resource.RLIMIT_CORE, (0, 0))
        except ProcessLookupError:
            return SignalResult.GONE
        except PermissionError:
            return SignalResult.DENIED
        return SignalResult.SENT

    def append_line(self, path: str | Path, line: str) -> None:
        """Append one line to a log file vLLM also appends to (one write: O_APPEND keeps it whole)."""
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        try:
            os.write(fd, line.rstrip("\n").encode("utf-8", "replace") + b"\n")
        finally:
            os.close(fd)

    def file_size(self, path: str | Path) -> int:
        try:
            return os.stat(path).st_size
        except OSError:
            return 0

    def read_from(self, path: str | Path, offset: int, limit: int = 4 << 20) -> bytes:
        """Up to `limit` bytes of `path` from `offset` (b"" when it cannot be read)."""
        try:
            with open(path, "rb") as f:
                f.seek(offset)
                return f.read(limit)
        except OSError:
            return b""

    # ---- helper subprocesses (the stack dumper) ------------------------------------------------
    # The daemon reaps with waitpid(-1) (it is the tree's subreaper), so a helper's exit status
    # would be taken by whichever wait comes first: subprocess.Popen.wait() then sees ECHILD and
    # reports 0, a lie. Helpers therefore run only through here: spawned under a process-wide
    # registry lock, waited for through a pidfd (waitid P_PIDFD), and any reaper of this process
    # hands statuses it collects to `deliver_child()`, which files a helper's status with it.
    def spawn_helper(self, argv: list[str], env: dict[str, str] | None = None) -> Helper:
        """Start `argv` with stdout and stderr to pipes and stdin from /dev/null; never a shell."""
        out_r, out_w = os.pipe2(os.O_CLOEXEC)
        err_r, err_w = os.pipe2(os.O_CLOEXEC)
        actions = [
            (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
            (os.POSIX_SPAWN_DUP2, out_w, 1),
            (os.POSIX_SPAWN_DUP2, err_w, 2),
        ]
        try:
            with _HELPERS_LOCK:  # a reaper on another thread waits until the pid is registered
                pid = os.posix_spawn(
                    argv[0], argv, env if env is not None else os.environ, file_actions=actions
                )
                try:
                    pidfd = os.pidfd_open(pid)
                except OSError:
                    pidfd = -1
                h = Helper(pid=pid, pidfd=pidfd, stdout=out_r, stderr=err_r)
                _HELPERS[pid] = h
        except BaseException:
            for fd in (out_r, err_r):
                os.close(fd)
            raise
        finally:
            os.close(out_w)
            os.close(err_w)
        return h

    def poll_helper(self, h: Helper) -> int | None:
        """The helper's exit code (negative: killed by that signal) once it exited, else None."""
        if h.returncode is not None:
            return h.returncode
        with _HELPERS_LOCK:
            if h.returncode is not None:
                return h.returncode
            try:
                if h.pidfd >= 0:
                    r = os.waitid(os.P_PIDFD, h.pidfd, os.WEXITED | os.WNOHANG)
                else:
                    r = os.waitid(os.P_PID, h.pid, os.WEXITED | os.WNOHANG)
            except ChildProcessError:
                # Reaped by a waitpid(-1) that did not hand it to deliver_child: say so, never 0.
                h.returncode = HELPER_STATUS_LOST
                _HELPERS.pop(h.pid, None)
                return h.returncode
            if r is None:
                return None
            code = r.si_status if r.si_code == os.CLD_EXITED else -r.si_status
            h.returncode = code
            _HELPERS.pop(h.pid, None)
            return code

    def kill_helper(self, h: Helper) -> None:
        """SIGKILL a helper that overran its budget (through its pidfd: never a reused pid)."""
        if h.returncode is not None:
            return
        try:
            if h.pidfd >= 0:
                _signal.pidfd_send_signal(h.pidfd, _signal.SIGKILL)
            else:
                os.kill(h.pid, _signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def close_helper(self, h: Helper) -> None:
        """Close the helper's descriptors. A helper still running stays registered, so the
        reaper files its status whenever it ends (the caller stopped waiting for it)."""
        for fd in (h.stdout, h.stderr, h.pidfd):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        h.stdout = h.stderr = h.pidfd = -1

    def deliver_child(self, pid: int, status: int) -> bool:
        """A reaper (waitpid(-1)) reaped `pid` with raw `status`: True if it was a helper, whose
        exit code is then kept for poll_helper(); False for every other child."""
        return deliver_child(pid, status)

    # ---- memory ------------------------------------------------------------------------------
    def meminfo(self) -> dict[str, int]:
        """/proc/meminfo in bytes ({} when unreadable): the overlapped reload's CPU fit check
        (overlap.py) reads MemAvailable and MemTotal."""
        out: dict[str, int] = {}
        try:
            with open(self.proc_root / "meminfo", encoding="ascii", errors="replace") as f:
                for line in f:
                    key, _, rest = line.partition(":")
                    parts = rest.split()
                    if parts and parts[0].isdigit():
                        out[key.strip()] = int(parts[0]) * (1024 if parts[1:2] == ["kB"] else 1)
        except OSError:
            return {}
        return out

    # ---- files -------------------------------------------------------------------------------
    def stat(self, path: str | Path) -> FileStat | None:
        """lstat a path. `born` is min(atime, mtime, ctime): tmpfs keeps no birth time that
        Python 3.11 can read, and all three start at creation and only move forward unless
        someone sets them back with utime (which moves ctime to now), so the minimum is an upper
        bound on when the object was created."""
        try:
            st = os.lstat(path)
        except (FileNotFoundError, NotADirectoryError):
            return None
        p = str(path)
        return FileStat(
            name=os.path.basename(p),
            path=p,
            dev=st.st_dev,
            ino=st.st_ino,
            size=st.st_size,
            alloc=st.st_blocks * 512,
            uid=st.st_uid,
            born=min(st.st_atime, st.st_mtime, st.st_ctime),
            is_socket=_stat.S_ISSOCK(st.st_mode),
        )

    def list_names(self, root: Path) -> list[str]:
        """Names of the non-directory entries of `root` (the shm or tmp root)."""
        try:
            with os.scandir(root) as it:
                return [e.name for e in it if not e.is_dir(follow_symlinks=False)]
        except FileNotFoundError:
            return []

    def unlink_ipc(self, name: str, kind: str) -> None:
        """Remove /dev/shm/`name`. Raises FileNotFoundError / PermissionError like os.unlink.

        On the real /dev/shm this goes through posix_ipc (glibc adds the `sem.` prefix itself);
        under another shm root (tests) the file is unlinked directly.
        """
        if not self._real_shm or kind == "file":
            os.unlink(self.shm_root / name)
            return
        try:
            if kind == "sem" and name.startswith("sem."):
                posix_ipc.unlink_semaphore("/" + name[4:])
            else:
                posix_ipc.unlink_shared_memory("/" + name)
        except posix_ipc.ExistentialError as e:
            raise FileNotFoundError(errno.ENOENT, str(e), name) from e
        except posix_ipc.PermissionsError as e:
            raise PermissionError(errno.EACCES, str(e), name) from e

    def unlink_file(self, path: str) -> None:
        os.unlink(path)

    def is_dir(self, path: str) -> bool:
        return os.path.isdir(path) and not os.path.islink(path)

    def remove_dir(self, path: str) -> None:
        """Remove a directory vsup created for one tree, with everything in it (no symlink is
        followed: shutil.rmtree refuses a symlinked top and unlinks links inside)."""
        import shutil

        shutil.rmtree(path)

    # ---- scheduling --------------------------------------------------------------------------
    def autogroup_nice(self, pid: int, nice: int | None = None) -> int | None:
        """The scheduler's autogroup nice of `pid`'s session (/proc/PID/autogroup; with
        CONFIG_SCHED_AUTOGROUP each session shares the CPU as one group), set to `nice` when
        given. Returns the value before, or None where there is no autogroup or it cannot be
        read or written (raising it needs no privilege; lowering it below 0 does)."""
        path = f"{self._proc}/{pid}/autogroup"
        try:
            with open(path, encoding="ascii") as f:
                before = int(f.read().split()[-1])
            if nice is not None:
                with open(path, "w", encoding="ascii") as f:
                    f.write(str(nice))
        except (OSError, ValueError, IndexError):
            return None
        return before

    def cpu_cgroup(self) -> str:
        """The directory of this process's own cgroup in the cgroup v1 `cpu` hierarchy, where
        a CPU cap's cgroup is made beside nothing else of the host's. OSError saying why where
        there is none: cgroup v2 alone (a cap there needs a subtree delegated to vsup, which
        a service does not have by default), or no cpu controller mounted."""
        own = None
        with open(f"{self._proc}/self/cgroup", encoding="utf-8") as f:
            for line in f:
                _, ctrls, path = line.rstrip("\n").split(":", 2)
                if "cpu" in ctrls.split(","):
                    own = path
        if own is None:
            raise OSError("no cgroup v1 cpu controller (cgroup v2 only: a CPU cap needs a delegated subtree)")
        with open(f"{self._proc}/self/mountinfo", encoding="utf-8") as f:
            for line in f:
                pre, _, post = line.partition(" - ")
                fields, sup = pre.split(), post.split()
                if len(sup) >= 3 and sup[0] == "cgroup" and "cpu" in sup[2].split(","):
                    root, mnt = fields[3], fields[4]
                    rel = own[len(root) :] if own.startswith(root) else own
                    return mnt.rstrip("/") + "/" + rel.strip("/") if rel.strip("/") else mnt
        raise OSError("the cgroup v1 cpu controller is not mounted")

    def cpu_cap(self, name: str, pid: int, cores: float) -> str:
        """A cgroup `name` beside this process's own in the cpu hierarchy, its CFS bandwidth
        capped at `cores` CPUs, with `pid` moved into it (what it forks later is born there).
        Returns the cgroup's directory; OSError saying why it cannot be done (not root, cgroup
        v2 alone, ...), with nothing left behind."""
        d = f"{self.cpu_cgroup()}/{name}"
        os.mkdir(d, 0o755)
        try:
            with open(f"{d}/cpu.cfs_period_us", encoding="ascii") as f:
                period = int(f.read())
            with open(f"{d}/cpu.cfs_quota_us", "w", encoding="ascii") as f:
                f.write(str(max(1000, int(period * cores))))
            with open(f"{d}/cgroup.procs", "w", encoding="ascii") as f:
                f.write(str(pid))
        except (OSError, ValueError) as e:
            with contextlib.suppress(OSError):
                self._cgroup_empty(d)
                os.rmdir(d)
            raise OSError(f"cannot cap {d}: {e}") from e
        return d

    def cpu_uncap(self, name: str) -> str | None:
        """Every process of cgroup `name` (made by cpu_cap) back to this process's own cgroup,
        and the cgroup removed. Returns its directory, or None where there was none; OSError
        when it cannot be removed (a process could not be moved out)."""
        try:
            d = f"{self.cpu_cgroup()}/{name}"
        except OSError:
            return None
        if not os.path.isdir(d):
            return None
        self._cgroup_empty(d)
        os.rmdir(d)
        return d

    def _cgroup_empty(self, d: str) -> None:
        parent = os.path.dirname(d)
        for _ in range(3):  # a process forked while we moved the others is listed next round
            with open(f"{d}/cgroup.procs", encoding="ascii") as f:
                pids = f.read().split()
            if not pids:
                return
            for pid in pids:
                with (
                    contextlib.suppress(ProcessLookupError),
                    open(f"{parent}/cgroup.procs", "w", encoding="ascii") as f,
                ):
                    f.write(pid)

    def set_nice(self, pid: int, nice: int) -> int | None:
        """`pid`'s nice (its main thread; what it forks and starts later inherits it), set to
        `nice`. Returns the value before, or None where it cannot be set (gone; below 0 needs
        CAP_SYS_NICE)."""
        try:
            before = os.getpriority(os.PRIO_PROCESS, pid)
            os.setpriority(os.PRIO_PROCESS, pid, nice)
        except OSError:
            return None
        return before

    # ---- reaping -----------------------------------------------------------------------------
    def set_child_subreaper(self) -> bool:
        """Make this process the reaper of its orphaned descendants (PR_SET_CHILD_SUBREAPER)."""
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            rc: int = libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
            return rc == 0
        except (OSError, AttributeError):
            return False

    def reap_children(self) -> list[tuple[int, int]]:
        """waitpid(-1, WNOHANG) until nothing is left to reap: [(pid, raw status)]."""
        reaped: list[tuple[int, int]] = []
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return reaped
            if pid == 0:
                return reaped
            if not deliver_child(pid, status):
                reaped.append((pid, status))


def _with_cmdline(info: ProcInfo, cmdline: tuple[str, ...] | None) -> ProcInfo:
    return ProcInfo(
        info.pid,
        info.ppid,
        info.pgid,
        info.sid,
        info.create_time,
        info.comm,
        info.state,
        info.uid,
        cmdline if cmdline is not None else (),
    )


def _read_maps(base: str) -> bytes | None:
    """/proc/PID/maps (or a thread's) under `base`: None when gone, empty when unreadable."""
    try:
        with open(f"{base}/maps", "rb") as f:
            return f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    except PermissionError:
        return b""


def _read_wchan(path: str) -> str:
    try:
        with open(path) as f:
            w = f.read().strip()
    except OSError:
        return ""
    return "" if w == "0" else w


def same_process(a_create_time: float, b_create_time: float) -> bool:
    """Do two create times name the same process (see CREATE_TIME_TOLERANCE_S)?"""
    return abs(a_create_time - b_create_time) <= CREATE_TIME_TOLERANCE_S


def strip_deleted(path: str) -> str:
    """A maps/fd path without the kernel's " (deleted)" suffix."""
    return path[: -len(_DELETED)] if path.endswith(_DELETED) else path


def open_append(path: str | Path, mode: int, what: str, *, narrow: bool = False) -> tuple[int, int]:
    """`path` opened for append the way a root daemon may, as (fd, size now).

    Never through a symlink (a link planted at log_file once had vLLM's output appended to a
    0600 root file), only a regular file (O_NONBLOCK until checked: a FIFO planted there cannot
    hang the open), and only one that vsup's user or root owns. A new file gets `mode`; with
    `narrow`, an existing one whose group/other bits exceed `mode` is narrowed to it (a file from
    before it was private). PermissionError, naming `what`, says why not.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK
    try:
        fd = os.open(path, flags, mode)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise PermissionError(
                errno.ELOOP, f"{what} {path} is a symbolic link; not following it"
            ) from None
        raise
    try:
        st = os.fstat(fd)
        if not _stat.S_ISREG(st.st_mode):
            raise PermissionError(errno.EINVAL, f"{what} {path} is not a regular file; not writing to it")
        if st.st_uid not in (0, os.geteuid()):
            raise PermissionError(
                errno.EPERM, f"{what} {path} is owned by uid {st.st_uid}, not by vsup's user or root"
            )
        if narrow and st.st_mode & 0o077 & ~mode:
            os.fchmod(fd, mode)
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd, st.st_size
