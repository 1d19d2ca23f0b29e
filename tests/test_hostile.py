"""Issue 20: vsup against a hostile local user and bad luck. Each `test_finding<N>_...` replays
one numbered finding of the issue (it failed on the code that landed before the fix); the rest
pin what the fix promises: never kill what cannot be ours, refuse to trust a directory others
can write, serve the socket's owners first.

The hostile user is real: `vsuptest` (conftest.py's `other_user`, created if missing), who
plants files, holds connections and sends requests from processes of its own. Every process a
test starts is killed in a finalizer; every directory it makes is removed.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

import vsup
from fakes.fake_host import FakeHost, add_vllm_tree
from support import OTHER_USER, Gates, OtherUser, alive, wait_for, write_config
from vsup import cleanup as cleanup_mod
from vsup import incidents, proctree
from vsup.control import Acl, ControlClient
from vsup.events import EventLog
from vsup.host import Host
from vsup.proctree import Ledger, ProcRef, TreeRecord

# The vsup package the tests import (the fixed one, or an older one on PYTHONPATH when checking
# that these tests fail without the fix): subprocesses get the same.
PKG_ROOT = str(Path(vsup.__file__).resolve().parent.parent)
VSUP_CMD = [sys.executable, "-m", "vsup"]


def vsup_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": PKG_ROOT}
    env.pop("VSUP_CONFIG", None)
    return subprocess.run(
        [*VSUP_CMD, *args], capture_output=True, text=True, timeout=timeout, env=env, cwd="/"
    )


@pytest.fixture
def sleepers() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Processes of the test's own (root's) that vsup must not kill; killed at the end."""
    made: list[subprocess.Popen[bytes]] = []
    yield made
    for p in made:
        if p.poll() is None:
            p.kill()
            p.wait(10)


def start_sleeper(made: list[subprocess.Popen[bytes]]) -> tuple[int, float]:
    p = subprocess.Popen(["sleep", "600"], start_new_session=True)
    made.append(p)
    info = wait_for(lambda: Host().process(p.pid), 5, "the sleeper in /proc")
    return p.pid, info.create_time


def config(path: Path, **daemon: str) -> Path:
    sections: dict[str, dict[str, Any]] = {
        "vllm": {"python": sys.executable, "model": "m", "log_file": str(path.parent / "vllm.log")},
        "daemon": {"socket": str(path.parent / "run" / "vsup.sock"), **daemon},
    }
    if "log_file" in daemon:
        sections["vllm"]["log_file"] = sections["daemon"].pop("log_file")
    return write_config(path, sections)


def record(leader_pid: int, leader_ct: float, started_at: float, **kw: Any) -> TreeRecord:
    leader = ProcRef(leader_pid, leader_ct, "python", ["python", "-m", "vllm.entrypoints.openai.api_server"])
    fields: dict[str, Any] = dict(
        id="planted",
        model="m",
        port=8000,
        started_at=started_at,
        leader=leader,
        sid=leader_pid,
        pgid=leader_pid,
    )
    fields.update(kw)
    fields.setdefault("procs", [leader])
    return TreeRecord(**fields)


# ---- finding 1: a ledger naming pid 1 ----------------------------------------------------------


def test_finding1_ledger_naming_pid_1_would_kill_nothing() -> None:
    """A record of pid 1 (its real create time) once made `vsup cleanup --dry-run` list every
    process of the machine: now it is refused, and nothing would be signalled."""
    init = Host().process(1)
    assert init is not None
    rec = record(1, init.create_time, time.time() - 10, sid=1, pgid=1)
    rep = cleanup_mod.cleanup([rec], dry_run=True)
    assert rep.killed == []
    assert any("refused" in s["reason"] for s in rep.skipped), rep.skipped


def test_finding1_no_expansion_below_a_protected_process_whatever_the_record() -> None:
    """Even a record that passes for pid 1's tree (started before it) yields pid 1 alone, to be
    reported, never its descendants."""
    snap = Host().processes()
    init = snap[1]
    rec = record(1, init.create_time, init.create_time - 5, sid=1, pgid=1)
    assert [p.pid for p in proctree.tree_members(rec, snap)] == [1]


def test_processes_older_than_the_tree_are_never_members() -> None:
    """A process that started before the tree is not its member, even in its session, and a
    record that lists one is refused whole."""
    h = FakeHost()
    pids, rec = add_vllm_tree(h, 500, api_alive=False)
    h.add_proc(901, 1, 500, ("bash",), ct=rec.started_at - 1000)  # in the session, but older
    cleanup_mod.cleanup([rec], host=h, grace_s=0.1)
    assert 901 in h.procs and not {pids["engine"], pids["w0"]} & set(h.procs)
    h2 = FakeHost()
    pids2, rec2 = add_vllm_tree(h2, 500, api_alive=False)
    h2.add_proc(900, 1, 900, ("sshd",), ct=rec2.started_at - 1000)
    rec2.procs.append(ProcRef(900, rec2.started_at - 1000, "sshd", ["sshd"]))
    rep = cleanup_mod.cleanup([rec2], host=h2, grace_s=0.1)
    assert h2.signals == [] and 900 in h2.procs
    assert any("started before the tree" in s["reason"] for s in rep.skipped), rep.skipped


def test_tree_is_still_ours_after_a_clock_step() -> None:
    """The daemon's create times come from the btime it read at start: after the clock was
    stepped forward they precede started_at by the step, and the tree is still found whole."""
    h = FakeHost()
    pids, rec = add_vllm_tree(h, 500, api_alive=False)
    rec.started_at += 30.0
    rep = cleanup_mod.cleanup([rec], host=h, grace_s=0.1)
    assert not set(pids.values()) & set(h.procs), rep.skipped


def test_record_of_another_uid_is_refused() -> None:
    """A record of a tree another user started is not acted on by root without all_users."""
    h = FakeHost()
    h.users[1000] = "alice"
    pids, rec = add_vllm_tree(h, 500, api_alive=False)
    rec.uid = 1000
    for p in pids.values():
        if p in h.procs:
            h.procs[p].uid = 1000
    rep = cleanup_mod.cleanup([rec], host=h, grace_s=0.1)
    assert set(pids.values()) - {500} <= set(h.procs) and h.signals == []
    assert any("uid 1000" in s["reason"] for s in rep.skipped)


def test_record_of_another_boot_matches_no_process(sleepers: list[subprocess.Popen[bytes]]) -> None:
    """Pids and create times mean nothing across a reboot: a record of another boot kills nothing."""
    pid, ct = start_sleeper(sleepers)
    rec = record(pid, ct, ct - 1, boot_id="00000000-0000-0000-0000-000000000000")
    rep = cleanup_mod.cleanup([rec], grace_s=0.5, kill_wait_s=1.0)
    assert alive(pid) and rep.killed == []


def test_recorded_inode_of_another_boot_is_no_proof() -> None:
    """An object recorded by inode before a reboot is not ours now: a non-vLLM name that got
    that inode is left alone (it was unlinked as ours before boots were recorded)."""
    h = FakeHost()
    _, rec = add_vllm_tree(h, 500, api_alive=False)
    for p in list(h.procs):
        del h.procs[p]
    first = rec.ipc[0]
    del h.files[f"{h.shm_root}/{first.name}"]
    h.files[f"{h.shm_root}/postgres-seg"] = proctree_fake_file(first.dev, first.ino)
    rec.ipc = [proctree.IpcRef("postgres-seg", "shm", first.dev, first.ino, 4096)]
    rec.boot_id = "another-boot"
    cleanup_mod.cleanup([rec], host=h, grace_s=0.1)
    assert "postgres-seg" in h.shm_names()


def proctree_fake_file(dev: int, ino: int) -> Any:
    from fakes.fake_host import FakeFile

    return FakeFile(dev, ino, 4096, 4096, 0, 0.0)


# ---- finding 2: directories others can write ---------------------------------------------------


def test_finding2_planted_ledger_in_another_users_state_dir_kills_nothing(
    public_dir: Path, other_user: OtherUser, sleepers: list[subprocess.Popen[bytes]]
) -> None:
    """vsuptest owns state_dir and plants a ledger naming root's process: root's `vsup cleanup`
    once killed it; now the ledger is not read, and check-config (so `vsup run`) refuses the
    directory, naming the key and the owner."""
    pid, ct = start_sleeper(sleepers)
    state = public_dir / "state"
    state.mkdir()
    os.chown(state, other_user.uid, other_user.primary_gid)
    body = json.dumps({"version": 1, "trees": [record(pid, ct, ct - 1).to_json()]})
    planter = other_user.popen("open(sys.argv[2], 'w').write(sys.argv[3])", str(state / "ledger.json"), body)
    assert planter.wait(30) == 0, planter.stderr.read() if planter.stderr else ""
    cfg = config(public_dir / "vsup.toml", state_dir=str(state))
    done = vsup_cli("cleanup", "--config", str(cfg), "--json")
    assert alive(pid), done.stderr
    assert (state / "ledger.json").exists()  # not ours to move aside either
    check = vsup_cli("check-config", str(cfg))
    assert check.returncode == 2
    assert "daemon.state_dir" in check.stderr and f"owned by {OTHER_USER}" in check.stderr


@pytest.mark.parametrize("mode", [0o777, 0o1777, 0o775])
def test_finding2_state_dir_writable_by_others_is_refused(public_dir: Path, mode: int) -> None:
    """A state_dir others (or its group) can write, sticky or not, fails check-config with exit 2."""
    state = public_dir / "state"
    state.mkdir()
    os.chmod(state, mode)
    r = vsup_cli("check-config", str(config(public_dir / "vsup.toml", state_dir=str(state))))
    assert r.returncode == 2 and "daemon.state_dir" in r.stderr and "writable by" in r.stderr, r.stderr


def test_finding2_tmp_itself_refused_private_dir_inside_accepted(public_dir: Path) -> None:
    """/tmp itself is refused as state_dir; a private `mktemp -d` inside it is accepted."""
    refused = vsup_cli("check-config", str(config(public_dir / "a.toml", state_dir="/tmp")))
    assert refused.returncode == 2 and "daemon.state_dir" in refused.stderr and "/tmp" in refused.stderr
    private = tempfile.mkdtemp()
    try:
        ok = vsup_cli("check-config", str(config(public_dir / "b.toml", state_dir=private)))
        assert ok.returncode == 0, ok.stderr
    finally:
        os.rmdir(private)


def test_finding2_log_and_socket_directories_are_checked_too(public_dir: Path, other_user: OtherUser) -> None:
    """The log's and the socket's directories follow the same rule, each named by its key."""
    theirs = public_dir / "theirs"
    theirs.mkdir()
    os.chown(theirs, other_user.uid, other_user.primary_gid)
    r = vsup_cli(
        "check-config",
        str(config(public_dir / "a.toml", state_dir=str(public_dir), log_file=str(theirs / "v.log"))),
    )
    assert r.returncode == 2 and "vllm.log_file" in r.stderr and OTHER_USER in r.stderr, r.stderr
    r = vsup_cli(
        "check-config",
        str(config(public_dir / "b.toml", state_dir=str(public_dir), socket=str(theirs / "s.sock"))),
    )
    assert r.returncode == 2 and "daemon.socket" in r.stderr, r.stderr


def test_finding2_relative_paths_are_refused(public_dir: Path) -> None:
    """A relative state_dir would be another ledger for every working directory: exit 2."""
    r = vsup_cli("check-config", str(config(public_dir / "vsup.toml", state_dir="state")))
    assert r.returncode == 2 and "daemon.state_dir" in r.stderr and "absolute" in r.stderr, r.stderr


def test_finding2_incidents_symlink_is_not_followed_by_the_pruning(public_dir: Path) -> None:
    """state_dir/incidents as a link to root's directories once made the pruning delete them."""
    elsewhere = public_dir / "elsewhere"
    elsewhere.mkdir()
    names = [f"20260101T0000{i:02d}Z-x" for i in range(60)]
    for n in names:
        (elsewhere / n).mkdir()
    state = public_dir / "state"
    state.mkdir(mode=0o750)
    (state / "incidents").symlink_to(elsewhere)
    cfg = SimpleNamespace(state_dir=str(state), path=str(public_dir / "vsup.toml"))
    out = incidents.write_bundle(
        cfg, reason="r", kind="k", lines=["x"], tree=None, events=[], cleanup=None, vllm_version=None
    )
    assert out is None
    assert sorted(os.listdir(elsewhere)) == names


def test_finding2_log_file_symlink_is_not_followed(public_dir: Path) -> None:
    """A symlink planted at log_file once had vLLM's output appended to a 0600 root file."""
    target = public_dir / "root-only"
    target.write_text("secret\n")
    os.chmod(target, 0o600)
    link = public_dir / "vllm.log"
    link.symlink_to(target)
    with pytest.raises(OSError, match="symbolic link"):
        popen, _ = proctree.spawn(["echo", "appended"], {}, link, model="m", port=1)
        popen.wait(10)
    assert target.read_text() == "secret\n"


def test_log_file_of_another_user_or_not_a_file_is_refused(public_dir: Path, other_user: OtherUser) -> None:
    """Only a regular file of vsup's user or root is vLLM's log."""
    theirs = public_dir / "theirs.log"
    theirs.write_text("")
    os.chown(theirs, other_user.uid, other_user.primary_gid)
    with pytest.raises(OSError, match="owned by uid"):
        proctree.open_log(theirs)
    os.mkfifo(public_dir / "fifo.log")
    with pytest.raises(OSError):
        proctree.open_log(public_dir / "fifo.log")


def test_events_file_and_ledger_are_never_opened_through_a_link(public_dir: Path) -> None:
    """A link at events.jsonl is refused at start; a link at ledger.json is moved aside unread."""
    state = public_dir / "state"
    state.mkdir(mode=0o750)
    target = public_dir / "target"
    target.write_text("")
    (state / "events.jsonl").symlink_to(target)
    with pytest.raises(PermissionError, match="symbolic link"):
        EventLog(state, stream=None)
    (state / "events.jsonl").unlink()
    (state / "ledger.json").symlink_to(target)
    led = Ledger(state)
    assert led.load() == [] and led.problems
    assert not (state / "ledger.json").exists() and target.exists()


# ---- finding 3: a stale session id -------------------------------------------------------------


def test_finding3_stale_session_id_matches_nobody_elses_session() -> None:
    """`setsid bash -c 'sleep & exit'` leaves a session with no leader; yesterday's record of
    a tree whose session had that number once made cleanup SIGTERM the sleep."""
    p = subprocess.Popen(["setsid", "bash", "-c", "sleep 600 & echo $!"], stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None
    sleep_pid = int(p.stdout.readline())
    p.wait(10)
    try:
        info = Host().process(sleep_pid)
        assert info is not None
        sid = info.sid
        assert Host().process(sid) is None  # the session's leader is gone
        yesterday = time.time() - 86400
        rec = record(sid, yesterday, yesterday)
        rep = cleanup_mod.cleanup([rec], grace_s=0.5, kill_wait_s=1.0)
        assert alive(sleep_pid), rep.killed
    finally:
        os.kill(sleep_pid, signal.SIGKILL)


def test_own_unrecorded_members_still_found_in_a_leaderless_session() -> None:
    """The tree's own session, leader dead and workers never recorded, is still the tree's
    (they were born right after it started)."""
    h = FakeHost()
    pids, rec = add_vllm_tree(h, 500, api_alive=False, record=False)
    cleanup_mod.cleanup([rec], host=h, grace_s=0.1)
    assert not set(pids.values()) & set(h.procs)


# ---- finding 4: the socket serves its owners first ---------------------------------------------

HOLD_SCRIPT = """
import json, socket, time
path, n, line = sys.argv[2], int(sys.argv[3]), sys.argv[4]
conns = []
for _ in range(n):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    if line:
        try:
            s.sendall(line.encode() + b"\\n")
        except OSError:
            pass
    conns.append(s)
print("ready", flush=True)
time.sleep(60)
"""


@contextlib.contextmanager
def hold(other: OtherUser, path: Path, n: int, line: str) -> Iterator[None]:
    """`n` connections of `other` to `path`, each having sent `line`, open until the block ends."""
    p = other.popen(HOLD_SCRIPT, str(path), str(n), line)
    try:
        assert p.stdout is not None
        assert p.stdout.readline().strip() == "ready", p.stderr.read() if p.stderr else ""
        yield
    finally:
        p.kill()
        p.wait(10)


def test_finding4_user_without_rights_cannot_hold_the_slots(
    public_dir: Path, gates: Gates, other_user: OtherUser
) -> None:
    """64 connections of a user with no rights once made root's `vsup status` busy."""
    with (
        other_user.server(public_dir, gates, Acl()) as srv,
        hold(other_user, srv.server.path, 64, '{"id": 1, "cmd": "status"}'),
    ):
        reply = ControlClient(srv.server.path).call("status")
        assert reply["ok"] is True, reply


def test_finding4_read_only_follows_leave_room_for_admins(
    public_dir: Path, gates: Gates, other_user: OtherUser
) -> None:
    """64 `events --follow` of a read-only user once locked root out; now one uid holds 8."""
    acl = Acl(read_gids=frozenset({other_user.group_gid}))
    with (
        other_user.server(public_dir, gates, acl) as srv,
        hold(other_user, srv.server.path, 64, '{"id": 1, "cmd": "events", "args": {"follow": true}}'),
    ):
        assert ControlClient(srv.server.path).call("status")["ok"] is True
        assert ControlClient(srv.server.path).call("echo", {"x": 1})["ok"] is True  # an admin command
        assert sum(1 for c in srv.server._connections.values() if c.uid == other_user.uid) <= 8


def test_slots_kept_for_admins_whatever_the_per_uid_cap(
    public_dir: Path, gates: Gates, other_user: OtherUser
) -> None:
    """Read-only connections together never take the admin_slots."""
    acl = Acl(read_gids=frozenset({other_user.group_gid}))
    with (
        other_user.server(public_dir, gates, acl, max_clients=12, admin_slots=4, max_per_uid=100) as srv,
        hold(other_user, srv.server.path, 12, '{"id": 1, "cmd": "events", "args": {"follow": true}}'),
    ):
        wait_for(lambda: len(srv.server._connections) == 8, 10, "8 read-only connections")
        assert ControlClient(srv.server.path).call("status")["ok"] is True


def test_read_only_follow_of_a_non_admin_times_out(
    public_dir: Path, gates: Gates, other_user: OtherUser
) -> None:
    """A non-admin's `events --follow` ends after long_request_s with a timeout reply."""
    acl = Acl(read_gids=frozenset({other_user.group_gid}))
    with other_user.server(public_dir, gates, acl, long_request_s=0.5) as srv:
        reply = other_user.call(srv.server.path, "events")["reply"]
        assert reply["ok"] is False and reply["error"]["code"] == "timeout", reply
        assert "control_request_timeout" in srv.event_names()


REFUSED_SCRIPT = """
import json, socket
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(10)
s.connect(sys.argv[2])
s.sendall(b"".join(b'{"id": %d, "cmd": "reload"}\\n' % i for i in range(int(sys.argv[3]))))
data = b""
try:
    while chunk := s.recv(65536):
        data += chunk
except ConnectionResetError:  # the server closed with our unread requests queued: after the data
    pass
print(json.dumps([json.loads(l)["error"]["code"] for l in data.splitlines()]))
"""


def test_finding5_repeated_refusals_end_the_connection_with_one_event(
    public_dir: Path, gates: Gates, other_user: OtherUser
) -> None:
    """A read-only user looping `reload` on one connection once wrote an event per request."""
    acl = Acl(read_gids=frozenset({other_user.group_gid}))
    with other_user.server(public_dir, gates, acl) as srv:
        p = other_user.popen(REFUSED_SCRIPT, str(srv.server.path), "200")
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
        assert json.loads(out) == ["forbidden"] * 3
        assert srv.event_names().count("control_forbidden") == 1


CONNECT_SCRIPT = """
import socket
for _ in range(200):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(sys.argv[2])
    try:
        s.sendall(b'{"id": 1, "cmd": "status"}\\n')
        s.recv(4096)
    except OSError:  # refused and closed at accept, maybe before our request arrived
        pass
    s.close()
"""


def test_finding5_refused_connections_are_one_event_per_window(
    public_dir: Path, gates: Gates, other_user: OtherUser
) -> None:
    """200 connections of a user with no rights make one event, not 200."""
    with other_user.server(public_dir, gates, Acl()) as srv:
        p = other_user.popen(CONNECT_SCRIPT, str(srv.server.path))
        _, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
        assert srv.event_names().count("control_forbidden") == 1


def test_finding5_events_file_is_size_bounded(tmp_path: Path) -> None:
    """events.jsonl once grew without end; now it rotates to events.jsonl.1 at max_bytes."""
    ev = EventLog(tmp_path, stream=None, max_bytes=64 * 1024)
    for i in range(5000):
        ev.emit("control_forbidden", uid=1000, n=i)
    ev.close()
    sizes = {p.name: p.stat().st_size for p in tmp_path.iterdir()}
    assert set(sizes) == {"events.jsonl", "events.jsonl.1"} and max(sizes.values()) <= 64 * 1024, sizes
    from vsup.events import read_events

    assert read_events(tmp_path, 5)[-1]["n"] == 4999


# ---- finding 6 (primitive): a failed ledger write ----------------------------------------------


def test_finding6_failed_ledger_write_is_one_named_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ENOSPC while saving raises LedgerWriteError (an OSError naming the ledger); the old
    ledger stays whole and no temp file is left."""
    h = FakeHost()
    _, a = add_vllm_tree(h, 500)
    led = Ledger(tmp_path)
    led.save([a])

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(proctree.LedgerWriteError) as info:
        led.save([a, a])
    assert isinstance(info.value, OSError) and info.value.errno == errno.ENOSPC
    assert str(led.path) in str(info.value)
    monkeypatch.undo()
    assert [r.id for r in led.load()] == [a.id] and os.listdir(tmp_path) == ["ledger.json"]


# ---- finding 7: a corrupt ledger ---------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        "[" * 200_000,
        '{"version": 1, "trees": [{"id": "x", "model": "m", "port": 1, "started_at": 1, "sid": 5, "pgid": 5,'
        ' "leader": {"pid": 1e400, "create_time": 1, "name": "x", "cmdline": []}}]}',
        '{"version": 1, "trees": [{"id": "x", "model": "m", "port": 1, "started_at": NaN, "sid": 5, "pgid": 5,'
        ' "leader": {"pid": 7, "create_time": 1, "name": "x", "cmdline": []}}]}',
    ],
    ids=["deep", "1e400", "nan"],
)
def test_finding7_corrupt_ledger_is_moved_aside_not_a_crash_loop(public_dir: Path, body: str) -> None:
    """Deep nesting or `"pid": 1e400` once made every `vsup cleanup` (and `vsup run`) die with a
    traceback, leaving the file in place; now it is moved aside and the command succeeds."""
    state = public_dir / "state"
    state.mkdir(mode=0o750)
    (state / "ledger.json").write_text(body)
    os.chmod(state / "ledger.json", 0o600)
    r = vsup_cli("cleanup", "--config", str(config(public_dir / "vsup.toml", state_dir=str(state))), "--json")
    assert "Traceback" not in r.stderr and r.returncode == 0, r.stderr
    assert not (state / "ledger.json").exists()
    assert [n for n in os.listdir(state) if n.startswith("ledger.json.corrupt-")]


# ---- finding 9: the tree's TMPDIR under another $TMPDIR ----------------------------------------


def test_finding9_tree_tmpdir_is_made_where_cleanup_removes_it(
    public_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With vsup's own TMPDIR elsewhere the tree's dir was made there, never removed, and its
    ledger entry dropped as clean; now it is made under /tmp and goes with the tree."""
    monkeypatch.setattr(tempfile, "tempdir", str(public_dir))
    path = proctree.make_tree_tmpdir()
    try:
        assert path.startswith("/tmp/vsup-tree-")
        Path(path, "vllm_dist_" + "0" * 32).write_text("store")
        gone = time.time() - 100
        rec = record(4_000_000, gone, gone - 1, files=[path])  # a leader long gone
        rep = cleanup_mod.cleanup([rec], grace_s=0.1)
        assert not os.path.exists(path) and path in rep.removed_files
    finally:
        shutil.rmtree(path, ignore_errors=True)


# ---- finding 10: smaller ------------------------------------------------------------------------


def test_finding10_events_file_is_private(public_dir: Path) -> None:
    """events.jsonl holds argv (an --api-key included): 0600 whatever the umask, and an older
    0644 one is made 0600."""
    state = public_dir / "state"
    state.mkdir(mode=0o755)
    old = os.umask(0o022)
    try:
        EventLog(state, stream=None).close()
        assert stat.S_IMODE((state / "events.jsonl").stat().st_mode) == 0o600
        os.chmod(state / "events.jsonl", 0o644)
        EventLog(state, stream=None).close()
        assert stat.S_IMODE((state / "events.jsonl").stat().st_mode) == 0o600
    finally:
        os.umask(old)


def test_finding10_control_events_keep_the_servers_pid(
    public_dir: Path, gates: Gates, other_user: OtherUser
) -> None:
    """A control event once replaced the event's pid (the API server's) with the client's."""
    log = EventLog(None, stream=None)
    log.bind(pid=4242)
    with other_user.server(public_dir, gates, Acl()) as srv:
        other_user.call(srv.server.path, "status")
    name, fields = next((n, f) for n, f in srv.events if n == "control_forbidden")
    log.emit(name, **fields)
    assert log.recent[-1]["pid"] == 4242 and log.recent[-1]["client_pid"] > 0


def test_finding10_torch_cache_is_never_named_after_another_user(
    tmp_path: Path, other_user: OtherUser
) -> None:
    """A root daemon whose environment says USER=vsuptest once made a root-owned
    torchinductor_vsuptest in /tmp, locking that user out of their own torch cache."""
    tree = proctree.make_tree_tmpdir(str(tmp_path))
    shared = proctree.share_torch_caches(tree, {"USER": OTHER_USER})
    assert not (tmp_path / f"torchinductor_{OTHER_USER}").exists()
    assert shared is not None and os.readlink(os.path.join(tree, f"torchinductor_{OTHER_USER}")) == shared
