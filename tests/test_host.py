"""Host: the thin OS seam, checked against the real OS (no fakes here)."""

from __future__ import annotations

import contextlib
import mmap
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import posix_ipc
import psutil
import pytest

import vsup
from fakes.trees import rand_name, unlink_quiet, wait_for
from support import readable_copy
from vsup.host import Host, SignalResult

TITLE_SCRIPT = "import setproctitle, sys, time; setproctitle.setproctitle(sys.argv[1]); print('up', flush=True); time.sleep(60)"


@pytest.fixture
def titled():
    procs: list[subprocess.Popen] = []

    def start(title: str) -> subprocess.Popen:
        p = subprocess.Popen([sys.executable, "-c", TITLE_SCRIPT, title], stdout=subprocess.PIPE, text=True)
        procs.append(p)
        assert p.stdout is not None
        assert p.stdout.readline().strip() == "up"
        return p

    try:
        yield start
    finally:
        for p in procs:
            p.kill()
            p.wait()


def test_create_time_agrees_with_psutil():
    """Create times equal psutil's, so records made with either compare."""
    h = Host()
    snap = h.processes()
    for pid in (os.getpid(), os.getppid(), 1):
        assert snap[pid].create_time == pytest.approx(psutil.Process(pid).create_time(), abs=1e-6)


def test_title_read_from_cmdline_not_comm(titled):
    """A setproctitle title comes back whole from cmdline while comm is cut at 15 characters."""
    p = titled("VLLM::EngineCore")
    info = Host().process(p.pid)
    assert info.cmdline == ("VLLM::EngineCore",)
    assert info.comm == "VLLM::EngineCor"
    assert info.title == "VLLM::EngineCore"
    assert info.sid == os.getsid(0) and info.ppid == os.getpid()


def test_zombie_is_seen_and_cannot_be_signalled():
    """An exited, unreaped child reads as a zombie; signalling it reports GONE."""
    p = subprocess.Popen(["true"])
    h = Host()
    try:
        info = wait_for(lambda: (i := h.process(p.pid)) and i.zombie and i, 10, "zombie")
        assert h.signal(p.pid, info.create_time, signal.SIGTERM) is SignalResult.GONE
    finally:
        p.wait()
    assert h.process(p.pid) is None
    assert h.signal(p.pid, info.create_time, signal.SIGTERM) is SignalResult.GONE


def test_exit_facts_see_a_sigkilled_process_dying_before_it_is_gone():
    """Issue 18: a SIGKILLed process pinned to a core beside busy threads spends a while tearing
    its memory down. exit_facts says it is dying (SIGKILL pending or in do_exit) with its CPU
    time moving, until it is a zombie (None); a live one is not dying; another create time is
    another process (None)."""
    cpu = min(os.sched_getaffinity(0))
    pin = ["taskset", "-c", str(cpu)]
    victim = subprocess.Popen(
        [
            *pin,
            sys.executable,
            "-c",
            "b = bytearray(768 << 20); b[::4096] = b'x' * len(b[::4096]); "
            "print('up', flush=True); import time; time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        start_new_session=True,
    )
    busy: list[subprocess.Popen[bytes]] = []
    h = Host()
    try:
        assert victim.stdout is not None and victim.stdout.readline() == b"up\n"
        ct = h.process(victim.pid).create_time
        # "up" is printed just before the sleep: wait for the sleep (S), not the print's last steps (R)
        live = wait_for(
            lambda: f if (f := h.exit_facts(victim.pid, ct)) is not None and f.state == "S" else None,
            10,
            "the victim asleep",
            0.01,
        )
        assert not live.dying
        assert h.exit_facts(victim.pid, ct - 5) is None
        # its exit competes with these for the one core (each its own session: its own share)
        busy = [
            subprocess.Popen([*pin, sys.executable, "-c", "while True: pass"], start_new_session=True)
            for _ in range(6)
        ]
        time.sleep(0.3)
        os.kill(victim.pid, signal.SIGKILL)
        seen = []
        while (f := h.exit_facts(victim.pid, ct)) is not None:
            seen.append(f)
        assert victim.wait(timeout=30) == -signal.SIGKILL
        assert seen, "the exit was over before one look: nothing to judge"
        assert all(f.dying for f in seen), seen[:3]
        assert h.exit_facts(victim.pid, ct) is None
    finally:
        for p in [victim, *busy]:
            p.kill()
            p.wait()


def test_hasten_exit_raises_a_dying_process_and_never_a_live_one():
    """hasten_exit sets nice -20 on a SIGKILLed process's threads and its session's autogroup
    (as root) while it is exiting beside busy threads on its core; on a live process it does
    nothing (False, nice and autogroup as they were)."""
    cpu = min(os.sched_getaffinity(0))
    pin = ["taskset", "-c", str(cpu)]
    code = (
        "import os, threading, time; b = bytearray(768 << 20); b[::4096] = b'x' * len(b[::4096]); "
        "[threading.Thread(target=time.sleep, args=(60,), daemon=True).start() for _ in range(3)]; "
        "print('up', flush=True); time.sleep(60)"
    )
    victim = subprocess.Popen(
        [*pin, sys.executable, "-c", code], stdout=subprocess.PIPE, start_new_session=True
    )
    busy: list[subprocess.Popen[bytes]] = []
    h = Host()

    def nices(pid: int) -> set[int]:
        out = set()
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError):
                out.add(os.getpriority(os.PRIO_PROCESS, int(tid)))
        return out

    try:
        assert victim.stdout is not None and victim.stdout.readline() == b"up\n"
        ct = h.process(victim.pid).create_time
        assert not h.hasten_exit(victim.pid, ct, session=True)
        assert nices(victim.pid) == {0} and h.autogroup_nice(victim.pid) == 0
        busy = [
            subprocess.Popen([*pin, sys.executable, "-c", "while True: pass"], start_new_session=True)
            for _ in range(6)
        ]
        time.sleep(0.3)  # the hogs running (nothing to await: they only spin)
        os.kill(victim.pid, signal.SIGKILL)
        assert h.hasten_exit(victim.pid, ct, session=True) is (os.geteuid() == 0)
        assert victim.wait(timeout=30) == -signal.SIGKILL
        assert not h.hasten_exit(victim.pid, ct, session=True)  # gone: nothing to do
    finally:
        for p in [victim, *busy]:
            p.kill()
            p.wait()


def test_signal_rechecks_create_time():
    """A signal aimed at a recorded create time that no longer matches is not sent (pid reuse)."""
    p = subprocess.Popen(["sleep", "30"])
    h = Host()
    try:
        ct = h.process(p.pid).create_time
        assert h.signal(p.pid, ct - 5, signal.SIGKILL) is SignalResult.REUSED
        assert p.poll() is None
        assert h.signal(p.pid, ct, signal.SIGKILL) is SignalResult.SENT
        assert p.wait(timeout=10) == -signal.SIGKILL
    finally:
        p.kill()
        p.wait()


def test_signal_permission_denied_is_reported(tmp_path):
    """An unprivileged caller signalling root's process gets DENIED, not an exception."""
    if os.geteuid() != 0:
        pytest.skip("needs root to run a second user")
    import pwd

    created = False
    try:
        pwd.getpwnam("vsuptest")
    except KeyError:
        subprocess.run(["useradd", "--no-create-home", "vsuptest"], check=True)
        created = True
    target = subprocess.Popen(["sleep", "30"])
    try:
        ct = Host().process(target.pid).create_time
        with readable_copy(vsup, psutil, posix_ipc) as path:
            code = textwrap.dedent(f"""
                import sys, signal
                sys.path[:0] = [{path!r}]
                from vsup.host import Host
                print(Host().signal({target.pid}, {ct!r}, signal.SIGTERM).value)
            """)
            out = subprocess.run(
                [
                    "setpriv",
                    "--reuid=vsuptest",
                    "--regid=vsuptest",
                    "--clear-groups",
                    "/usr/bin/python3",
                    "-c",
                    code,
                ],
                capture_output=True,
                text=True,
                timeout=30,
                cwd="/",
            )
        assert out.stdout.strip() == "denied", out.stderr
        assert target.poll() is None
    finally:
        target.kill()
        target.wait()
        if created:
            subprocess.run(["userdel", "vsuptest"], check=False)


def test_holdings_match_by_inode_including_temporary_semaphore_name():
    """Mapped segments, a semaphore mapped under glibc's `sem.XXXXXX (deleted)` name, files held
    open under the tmp root and socket inodes are all reported."""
    h = Host()
    shm_name, sem_name = rand_name("psm_vsuptest"), rand_name("mp-vsuptest")
    shm = posix_ipc.SharedMemory("/" + shm_name, posix_ipc.O_CREX, size=8192)
    sem = posix_ipc.Semaphore("/" + sem_name, posix_ipc.O_CREX)
    m = mmap.mmap(shm.fd, 8192)
    sock = socket.socket(socket.AF_UNIX)
    try:
        held = h.holdings(os.getpid())
        st_shm, st_sem = os.stat(f"/dev/shm/{shm_name}"), os.stat(f"/dev/shm/sem.{sem_name}")
        assert held.files[(st_shm.st_dev, st_shm.st_ino)] == f"/dev/shm/{shm_name}"
        sem_path = held.files[(st_sem.st_dev, st_sem.st_ino)]
        assert sem_path.startswith("/dev/shm/sem.") and sem_path.endswith(" (deleted)")
        ino = int(os.readlink(f"/proc/self/fd/{sock.fileno()}")[8:-1])
        assert ino in held.sockets
    finally:
        m.close()
        shm.close_fd()
        sem.close()
        sock.close()
        unlink_quiet(f"/dev/shm/{shm_name}")
        unlink_quiet(f"/dev/shm/sem.{sem_name}")


def test_holdings_of_tmp_root_file_held_open(tmp_path):
    """A file under the tmp root held open is reported with its device and inode."""
    h = Host(tmp_root=tmp_path)
    f = open(tmp_path / "vllm_dist_x", "wb")  # noqa: SIM115 - held open across the check
    try:
        st = os.stat(tmp_path / "vllm_dist_x")
        assert h.holdings(os.getpid()).files[(st.st_dev, st.st_ino)] == str(tmp_path / "vllm_dist_x")
    finally:
        f.close()


def test_unix_sockets_lists_bound_paths_under_tmp_root(tmp_path):
    """A listening unix socket under the tmp root appears by inode; once closed it does not."""
    h = Host(tmp_root=tmp_path)
    path = str(tmp_path / "9a1b2c3d-0000-4000-8000-000000000000")
    s = socket.socket(socket.AF_UNIX)
    s.bind(path)
    s.listen(1)
    ino = int(os.readlink(f"/proc/self/fd/{s.fileno()}")[8:-1])
    assert h.unix_sockets()[ino] == path
    s.close()
    assert ino not in h.unix_sockets() and os.path.exists(path)


def test_unlink_ipc_uses_posix_names():
    """unlink_ipc removes a segment and a semaphore by their /dev/shm names; a second time raises
    FileNotFoundError."""
    h = Host()
    shm_name, sem_name = rand_name("psm_vsuptest"), rand_name("mp-vsuptest")
    posix_ipc.SharedMemory("/" + shm_name, posix_ipc.O_CREX, size=4096).close_fd()
    posix_ipc.Semaphore("/" + sem_name, posix_ipc.O_CREX).close()
    try:
        h.unlink_ipc(shm_name, "shm")
        h.unlink_ipc(f"sem.{sem_name}", "sem")
        assert not os.path.exists(f"/dev/shm/{shm_name}") and not os.path.exists(f"/dev/shm/sem.{sem_name}")
        with pytest.raises(FileNotFoundError):
            h.unlink_ipc(shm_name, "shm")
        with pytest.raises(FileNotFoundError):
            h.unlink_ipc(f"sem.{sem_name}", "sem")
    finally:
        unlink_quiet(f"/dev/shm/{shm_name}")
        unlink_quiet(f"/dev/shm/sem.{sem_name}")


def test_unlink_ipc_under_another_shm_root(tmp_path):
    """With a test shm root, objects are plain files removed directly."""
    h = Host(shm_root=tmp_path)
    (tmp_path / "psm_a").write_bytes(b"x")
    h.unlink_ipc("psm_a", "shm")
    assert not (tmp_path / "psm_a").exists()


def test_stat_and_list_names(tmp_path):
    """stat gives sizes, allocation, owner, a birth bound and socket-ness; list_names skips dirs."""
    h = Host(tmp_root=tmp_path)
    t0 = time.time()
    (tmp_path / "a").write_bytes(b"x" * 10000)
    (tmp_path / "d").mkdir()
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(tmp_path / "s"))
    try:
        st = h.stat(tmp_path / "a")
        assert st.size == 10000 and st.alloc >= 8192 and st.uid == os.geteuid()
        assert t0 - 1 <= st.born <= time.time() + 1
        assert h.stat(tmp_path / "s").is_socket and not st.is_socket
        assert h.stat(tmp_path / "missing") is None
        assert sorted(h.list_names(tmp_path)) == ["a", "s"]
    finally:
        s.close()


def test_tcp_listeners_ipv4_and_ipv6():
    """tcp_listeners names this process for an IPv4 and an IPv6 listener on ports 8210/8211."""
    h = Host()
    s4 = socket.socket(socket.AF_INET)
    s6 = socket.socket(socket.AF_INET6)
    try:
        s4.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s4.bind(("127.0.0.1", 8210))
        s4.listen(1)
        s6.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s6.bind(("::1", 8211))
        s6.listen(1)
        assert h.tcp_listeners(8210) == [os.getpid()]
        assert h.tcp_listeners(8211) == [os.getpid()]
    finally:
        s4.close()
        s6.close()
    assert h.tcp_listeners(8210) == []


def test_child_subreaper_adopts_orphans_and_reaps_them():
    """After set_child_subreaper, an orphaned grandchild is reparented to us; reap_children
    collects it once it exits. Runs in a subprocess so pytest itself never becomes a subreaper."""
    code = textwrap.dedent("""
        import os, subprocess, sys, time
        from vsup.host import Host
        h = Host()
        assert h.set_child_subreaper()
        mid = subprocess.Popen(["bash", "-c", "sleep 30 & echo $!"], stdout=subprocess.PIPE, text=True)
        grand = int(mid.stdout.readline())
        mid.wait()
        deadline = time.monotonic() + 10
        while h.process(grand).ppid != os.getpid():
            assert time.monotonic() < deadline, "not adopted"
            time.sleep(0.02)
        os.kill(grand, 9)
        reaped = []
        while grand not in [p for p, _ in reaped]:
            assert time.monotonic() < deadline, "not reaped"
            reaped += h.reap_children()
            time.sleep(0.02)
        print("ok", grand)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.startswith("ok"), out.stderr


LEADER_GONE_SCRIPT = textwrap.dedent(
    """
    import ctypes, socket, sys, threading, time
    s = socket.socket(socket.AF_UNIX)
    s.bind(sys.argv[1])
    s.listen(1)
    f = open(sys.argv[1] + ".held", "wb")
    def hold():
        while True:
            time.sleep(0.05)
    threading.Thread(target=hold).start()
    print("up", flush=True)
    ctypes.CDLL(None).pthread_exit(None)  # the leader thread ends; the process goes on
    """
)


def test_a_process_whose_leader_thread_ended_is_not_a_zombie_while_a_thread_lives(tmp_path):
    """The leader thread can end before the others (pthread_exit, or exit_group reaching it
    first while the last thread still frees the address space): /proc/PID/stat then reads Z and
    its maps and fds read empty, yet the process holds every file and socket. CI saw a forced
    exit take such a vLLM worker for gone and leave the tree's TMPDIR "in use" by nobody. The
    host sees the process alive, its holdings through the live thread, and its exit waited for."""
    h = Host(tmp_root=tmp_path)
    path = str(tmp_path / "9a1b2c3d-0000-4000-8000-000000000001")
    p = subprocess.Popen([sys.executable, "-c", LEADER_GONE_SCRIPT, path], stdout=subprocess.PIPE)
    try:
        assert p.stdout is not None and p.stdout.readline() == b"up\n"
        stat = Path(f"/proc/{p.pid}/stat")
        wait_for(
            lambda: stat.read_bytes().rsplit(b") ", 1)[1][:1] == b"Z", 10, "the leader thread ended", 0.01
        )
        info = h.process(p.pid)
        assert info is not None and not info.zombie and info.state in ("S", "R"), info
        ino = next(i for i, sp in h.unix_sockets().items() if sp == path)
        held = h.holdings(p.pid)
        assert held is not None and ino in held.sockets, held
        st = os.stat(path + ".held")
        assert held.files[(st.st_dev, st.st_ino)] == path + ".held"
        facts = h.exit_facts(p.pid, info.create_time)
        assert facts is not None and not facts.dying, facts
        assert h.signal(p.pid, info.create_time, signal.SIGKILL) is SignalResult.SENT
        wait_for(lambda: h.exit_facts(p.pid, info.create_time) is None, 10, "the exit", 0.01)
        assert ino not in h.unix_sockets()  # gone with its last thread, not before
        assert (z := h.process(p.pid)) is None or z.zombie
    finally:
        p.kill()
        p.wait()


def test_cpu_cap_moves_a_process_into_a_capped_cgroup_and_uncap_removes_it():
    """cpu_cap makes a cpu cgroup beside vsup's own, capped at the cores asked, with the process
    in it (and what it forks later); cpu_uncap moves them back and removes it; a second uncap
    finds none. Needs the cgroup v1 cpu controller writable (root here): otherwise it must
    refuse with OSError, leaving nothing."""
    h = Host()
    name = f"vsup-cap-test{os.getpid()}"
    p = subprocess.Popen(["sleep", "60"])
    try:
        try:
            own = h.cpu_cgroup()
        except OSError as e:
            with pytest.raises(OSError):
                h.cpu_cap(name, p.pid, 1.0)
            pytest.skip(f"no cgroup v1 cpu controller here: {e}")
        if os.geteuid() != 0:
            with pytest.raises(OSError):
                h.cpu_cap(name, p.pid, 1.0)
            assert not os.path.exists(f"{own}/{name}")
            return
        d = h.cpu_cap(name, p.pid, 1.5)
        assert d == f"{own}/{name}"
        period = int(Path(f"{d}/cpu.cfs_period_us").read_text())
        assert int(Path(f"{d}/cpu.cfs_quota_us").read_text()) == int(period * 1.5)
        assert Path(f"{d}/cgroup.procs").read_text().split() == [str(p.pid)]
        with pytest.raises(FileExistsError):
            h.cpu_cap(name, p.pid, 1.0)
        assert h.cpu_uncap(name) == d and not os.path.exists(d)

        def cpu_path(pid: int | str) -> str:
            lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
            return next(x.split(":", 2)[2] for x in lines if "cpu" in x.split(":")[1].split(","))

        assert cpu_path(p.pid) == cpu_path("self")  # back beside vsup
        assert h.cpu_uncap(name) is None
    finally:
        p.kill()
        p.wait()
        with contextlib.suppress(OSError):
            h.cpu_uncap(name)
