"""Tests of the control socket: protocol, error codes, socket safety, access control, load."""

from __future__ import annotations

import grp
import json
import os
import pwd
import select
import socket
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from support import ControlServerThread, Gates, OtherUser, make_handlers, wait_for
from vsup.control import (
    ERROR_CODES,
    Acl,
    ControlClient,
    ControlSocketError,
    ControlSocketInUse,
    DaemonUnreachable,
    Peer,
    Request,
)

WAIT_S = 10.0  # upper bound for anything the tests await; never a sleep


def wait_until(predicate: Callable[[], Any], timeout: float = WAIT_S, what: str = "condition") -> Any:
    return wait_for(predicate, timeout, what, interval=0.005)


ServerThread = ControlServerThread


class Conn:
    """A raw client connection speaking lines, for protocol-level tests."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(WAIT_S)
        self.sock.connect(str(path))
        self.buf = b""

    def send(self, data: bytes | dict[str, Any]) -> None:
        if isinstance(data, dict):
            data = json.dumps(data).encode() + b"\n"
        self.sock.sendall(data)

    def line(self) -> dict[str, Any]:
        """The next line as JSON; fails if the server closes first."""
        while b"\n" not in self.buf:
            chunk = self.sock.recv(65536)
            assert chunk, f"connection closed; pending bytes {self.buf!r}"
            self.buf += chunk
        raw, self.buf = self.buf.split(b"\n", 1)
        return json.loads(raw)

    def at_eof(self) -> bool:
        """True when the server closed the connection with nothing more to read."""
        chunk = self.sock.recv(65536)
        self.buf += chunk
        return chunk == b"" and self.buf == b""

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def server(public_dir: Path, gates: Gates) -> Iterator[ServerThread]:
    with ServerThread(public_dir / "vsup.sock", make_handlers(gates)) as srv:
        yield srv


# --- protocol -----------------------------------------------------------------------------------


def test_status_reply_echoes_id(server: ServerThread) -> None:
    """A status request is answered ok with its result and the request's own id."""
    reply = ControlClient(server.server.path).call("status")
    assert reply == {"id": 1, "ok": True, "result": {"state": "ready", "uid": os.geteuid()}}


def test_string_ids_are_echoed(server: ServerThread) -> None:
    """A string id comes back unchanged."""
    conn = Conn(server.server.path)
    try:
        conn.send({"id": "abc-1", "cmd": "status"})
        assert conn.line()["id"] == "abc-1"
    finally:
        conn.close()


def test_progress_lines_precede_result(server: ServerThread) -> None:
    """Progress lines arrive in order before the final reply."""
    seen: list[dict[str, Any]] = []
    reply = ControlClient(server.server.path).call("phases", on_progress=seen.append)
    assert [p["phase"] for p in seen] == ["drain", "stop", "start"]
    assert reply["ok"] is True and reply["result"] == {"phases": 3}


def test_sequential_requests_on_one_connection(server: ServerThread) -> None:
    """Three pipelined requests on one connection are answered in order."""
    conn = Conn(server.server.path)
    try:
        conn.send(
            b"".join(
                json.dumps({"id": i, "cmd": "echo", "args": {"n": i}}).encode() + b"\n" for i in (1, 2, 3)
            )
        )
        replies = [conn.line() for _ in range(3)]
        assert [(r["id"], r["result"]["n"]) for r in replies] == [(1, 1), (2, 2), (3, 3)]
    finally:
        conn.close()


def test_request_without_trailing_newline_before_eof(server: ServerThread) -> None:
    """A last request cut off by the client's half-close (printf | socat) is still answered."""
    conn = Conn(server.server.path)
    try:
        conn.send(b'{"id": 7, "cmd": "status"}')
        conn.sock.shutdown(socket.SHUT_WR)
        assert conn.line()["ok"] is True
        assert conn.at_eof()
    finally:
        conn.close()


def test_error_codes_constant_is_the_documented_set() -> None:
    """ERROR_CODES holds exactly the documented codes, each with a one-line meaning."""
    assert set(ERROR_CODES) == {
        "bad_request",
        "unknown_command",
        "busy",
        "forbidden",
        "failed",
        "too_large",
        "timeout",
        "internal",
    }
    assert all(text and "\n" not in text for text in ERROR_CODES.values())


@pytest.mark.parametrize(
    ("line", "echoed_id"),
    [
        (b"{not json", None),
        (b"\xff\xfe", None),
        (b"[1, 2]", None),
        (b'"status"', None),
        (b'{"cmd": "status"}', None),
        (b'{"id": true, "cmd": "status"}', None),
        (b'{"id": 1.5, "cmd": "status"}', None),
        (b'{"id": 4}', 4),
        (b'{"id": 4, "cmd": 17}', 4),
        (b'{"id": 4, "cmd": "echo", "args": [1]}', 4),
        (b'{"id": 4, "cmd": "echo", "arg": {}}', 4),
        (b'{"id": 4, "cmd": "echo", "args": {"x": NaN}}', None),
        (b"[" * 30000 + b"]" * 30000, None),
        (b"", None),
    ],
)
def test_bad_request_keeps_connection_open(server: ServerThread, line: bytes, echoed_id: Any) -> None:
    """Each malformed line gets bad_request (with its id where readable); the next request works."""
    conn = Conn(server.server.path)
    try:
        conn.send(line + b"\n")
        reply = conn.line()
        assert reply["ok"] is False and reply["error"]["code"] == "bad_request"
        assert reply["id"] == echoed_id
        conn.send({"id": 99, "cmd": "status"})
        assert conn.line() == {"id": 99, "ok": True, "result": {"state": "ready", "uid": os.geteuid()}}
    finally:
        conn.close()
    assert "control_bad_request" in server.event_names()


def test_bad_line_flood_is_summarised_in_events(server: ServerThread) -> None:
    """Ten bad lines on one connection give three single events and one summary, not ten."""
    conn = Conn(server.server.path)
    try:
        conn.send(b"nope\n" * 10)
        assert [conn.line()["error"]["code"] for _ in range(10)] == ["bad_request"] * 10
    finally:
        conn.close()
    wait_until(lambda: any("7 more" in f.get("reason", "") for _, f in server.events), what="summary event")
    assert server.event_names().count("control_bad_request") == 4


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ({}, "missing argument 'model'"),
        ({"model": 3}, "'model' must be str"),
        ({"model": "b", "wait_s": True}, "must be float"),
    ],
)
def test_wrong_args_are_bad_request(server: ServerThread, args: dict[str, Any], message: str) -> None:
    """Missing or wrong-typed command args, checked with Request.arg, are bad_request."""
    reply = ControlClient(server.server.path).call("needs_model", args)
    assert reply["error"]["code"] == "bad_request"
    assert message in reply["error"]["message"]


def test_request_arg_accepts_int_for_float(server: ServerThread) -> None:
    """An integer where a float is wanted is accepted as a float."""
    reply = ControlClient(server.server.path).call("needs_model", {"model": "b", "wait_s": 2})
    assert reply["result"] == {"model": "b", "wait_s": 2.0}


def test_unknown_command(server: ServerThread) -> None:
    """An unknown cmd is unknown_command and lists the known ones."""
    reply = ControlClient(server.server.path).call("relaod")
    assert reply["error"]["code"] == "unknown_command"
    assert "reload" in reply["error"]["message"]


@pytest.mark.parametrize(
    ("cmd", "code", "text"), [("busy", "busy", "reload of 'b'"), ("fail", "failed", "CUDA out of memory")]
)
def test_command_errors_pass_through(server: ServerThread, cmd: str, code: str, text: str) -> None:
    """A CommandError raised by a handler is the reply's code and message."""
    reply = ControlClient(server.server.path).call(cmd)
    assert reply["ok"] is False and reply["error"]["code"] == code and text in reply["error"]["message"]


@pytest.mark.parametrize(
    ("cmd", "text"),
    [("crash", "RuntimeError: boom"), ("not_json", "not JSON"), ("bad_code", "unknown control error code")],
)
def test_handler_bug_is_internal_and_daemon_survives(server: ServerThread, cmd: str, text: str) -> None:
    """A handler bug answers internal, is reported as an event, and status still works."""
    reply = ControlClient(server.server.path).call(cmd)
    assert reply["error"]["code"] == "internal" and text in reply["error"]["message"]
    internal = [fields for name, fields in server.events if name == "control_internal_error"]
    assert internal and internal[0]["cmd"] == cmd
    assert ControlClient(server.server.path).call("status")["ok"] is True


def test_line_over_limit_is_too_large_and_closes(public_dir: Path, gates: Gates) -> None:
    """A line one byte over max_line gets too_large and the connection is closed."""
    with ServerThread(public_dir / "s.sock", make_handlers(gates), max_line=1024) as srv:
        conn = Conn(srv.server.path)
        try:
            conn.send(b"x" * 1025 + b"\n")
            reply = conn.line()
            assert reply == {
                "id": None,
                "ok": False,
                "error": {"code": "too_large", "message": reply["error"]["message"]},
            }
            assert conn.at_eof()
        finally:
            conn.close()


def test_line_at_limit_is_accepted(public_dir: Path, gates: Gates) -> None:
    """A request line of exactly max_line bytes is served."""
    with ServerThread(public_dir / "s.sock", make_handlers(gates), max_line=1024) as srv:
        request = b'{"id": 1, "cmd": "status"}'
        conn = Conn(srv.server.path)
        try:
            conn.send(request + b" " * (1024 - len(request)) + b"\n")
            assert conn.line()["ok"] is True
        finally:
            conn.close()


def test_unbounded_line_is_too_large(server: ServerThread) -> None:
    """A megabyte without a newline is cut off at the default 64 KiB limit."""
    conn = Conn(server.server.path)
    try:
        try:
            conn.send(b"y" * (1024 * 1024))
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server closed once it had seen enough
        assert conn.line()["error"]["code"] == "too_large"
    finally:
        conn.close()


def test_no_newline_times_out(public_dir: Path, gates: Gates) -> None:
    """A client that never finishes its line gets timeout after read_timeout_s, then EOF."""
    with ServerThread(public_dir / "s.sock", make_handlers(gates), read_timeout_s=0.2) as srv:
        conn = Conn(srv.server.path)
        try:
            conn.send(b'{"id": 1, "cmd": "sta')
            reply = conn.line()
            assert reply["id"] is None and reply["error"]["code"] == "timeout"
            assert conn.at_eof()
        finally:
            conn.close()
        assert ControlClient(srv.server.path).call("status")["ok"] is True


# --- socket file ---------------------------------------------------------------------------------


def test_socket_mode_and_created_parent(public_dir: Path, gates: Gates) -> None:
    """A missing parent is created 0750 with the socket group; the socket is 0660 with that group."""
    group = os.getgid() if os.getgid() != 0 else grp.getgrnam("daemon").gr_gid
    path = public_dir / "run" / "vsup" / "vsup.sock"
    with ServerThread(path, make_handlers(gates), socket_group=group):
        st = os.stat(path)
        assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o660 and st.st_gid == group
        dir_st = os.stat(path.parent)
        assert stat.S_IMODE(dir_st.st_mode) == 0o750 and dir_st.st_gid == group
    assert not path.exists() and not Path(f"{path}.lock").exists()


def test_existing_directory_left_alone(public_dir: Path, gates: Gates) -> None:
    """An existing parent directory keeps its mode."""
    os.chmod(public_dir, 0o711)
    with ServerThread(public_dir / "vsup.sock", make_handlers(gates)):
        assert stat.S_IMODE(os.stat(public_dir).st_mode) == 0o711


def test_stale_socket_is_replaced(public_dir: Path, gates: Gates) -> None:
    """A socket file nobody listens on (a crashed daemon's) is removed and bound anew."""
    path = public_dir / "vsup.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()
    os.chmod(path, 0o700)
    with ServerThread(path, make_handlers(gates)) as srv:
        assert stat.S_IMODE(os.lstat(path).st_mode) == 0o660  # ours, not the stale 0700 one
        assert ControlClient(srv.server.path).call("status")["ok"] is True


def test_non_socket_at_path_is_refused(public_dir: Path, gates: Gates) -> None:
    """A regular file at the socket path is neither removed nor replaced."""
    path = public_dir / "vsup.sock"
    path.write_text("precious")
    srv = ServerThread(path, make_handlers(gates))
    with pytest.raises(ControlSocketError, match="not a socket"):
        srv.__enter__()
    assert path.read_text() == "precious"
    assert sorted(p.name for p in public_dir.iterdir()) == ["vsup.sock"]


def test_second_server_on_live_path_is_refused(server: ServerThread, gates: Gates) -> None:
    """A second daemon on the same path fails clearly; the first keeps its socket and serves."""
    inode = os.lstat(server.server.path).st_ino
    second = ServerThread(server.server.path, make_handlers(gates))
    with pytest.raises(ControlSocketInUse, match=f"another vsup daemon \\(pid {os.getpid()}\\)"):
        second.__enter__()
    assert os.lstat(server.server.path).st_ino == inode
    assert ControlClient(server.server.path).call("status")["ok"] is True


def test_foreign_listener_is_refused(public_dir: Path, gates: Gates) -> None:
    """A live listener on the path without vsup's lock (another program) is not replaced."""
    path = public_dir / "vsup.sock"
    other = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        other.bind(str(path))
        other.listen(1)
        srv = ServerThread(path, make_handlers(gates))
        with pytest.raises(ControlSocketInUse, match="is listening"):
            srv.__enter__()
        assert stat.S_ISSOCK(os.lstat(path).st_mode)
        assert not Path(f"{path}.lock").exists()
    finally:
        other.close()


def test_failed_start_leaves_nothing_and_can_retry(public_dir: Path, gates: Gates) -> None:
    """A bind failure (path too long) leaves no file behind and releases the lock."""
    path = public_dir / ("s" * 120)
    srv = ServerThread(path, make_handlers(gates))
    with pytest.raises(ControlSocketError, match="cannot create control socket"):
        srv.__enter__()
    assert list(public_dir.iterdir()) == []
    with ServerThread(public_dir / "vsup.sock", make_handlers(gates)) as ok:
        assert ControlClient(ok.server.path).call("status")["ok"] is True


def test_failed_start_removes_directory_it_created(public_dir: Path, gates: Gates) -> None:
    """A directory created by a start that then failed is removed again."""
    srv = ServerThread(public_dir / "new" / ("s" * 120), make_handlers(gates))
    with pytest.raises(ControlSocketError):
        srv.__enter__()
    assert list(public_dir.iterdir()) == []


def test_close_is_idempotent_and_spares_a_successor(public_dir: Path, gates: Gates) -> None:
    """close() twice is fine and does not unlink a socket another process bound meanwhile."""
    path = public_dir / "vsup.sock"
    srv = ServerThread(path, make_handlers(gates)).__enter__()
    successor = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        os.unlink(path)
        successor.bind(str(path))
        inode = os.lstat(path).st_ino
        srv.run(srv.server.close())
        srv.run(srv.server.close())
        assert os.lstat(path).st_ino == inode
    finally:
        srv.__exit__(None, None, None)
        successor.close()


def test_close_cancels_stuck_handler_after_grace(public_dir: Path, gates: Gates) -> None:
    """close() waits handler_grace_s for a running handler, then cancels it; the client gets failed."""
    with ServerThread(public_dir / "s.sock", make_handlers(gates), handler_grace_s=0.1) as srv:
        conn = Conn(srv.server.path)
        try:
            conn.send({"id": 1, "cmd": "reload"})
            srv.wait(gates["reload_started"])
            srv.run(srv.server.close())
            reply = conn.line()
            assert reply["error"]["code"] == "failed" and "closing" in reply["error"]["message"]
            assert not gates["reload_done"].is_set()
        finally:
            conn.close()


# --- disconnects and slow clients ---------------------------------------------------------------


def test_disconnect_mid_command_does_not_cancel_it(server: ServerThread, gates: Gates) -> None:
    """A client that goes away mid-reload does not stop the reload; its result becomes an event."""
    conn = Conn(server.server.path)
    conn.send({"id": 5, "cmd": "reload"})
    server.wait(gates["reload_started"])
    conn.close()
    wait_until(
        lambda: "control_client_gone" in server.event_names(), what="the server to see the client leave"
    )
    server.set(gates["reload_go"])
    server.wait(gates["reload_done"])
    wait_until(lambda: "control_reply_undelivered" in server.event_names(), what="undelivered event")
    undelivered = dict(server.events)["control_reply_undelivered"]
    assert undelivered["cmd"] == "reload" and undelivered["id"] == 5 and undelivered["ok"] is True


def test_half_closed_client_still_gets_progress_and_reply(server: ServerThread, gates: Gates) -> None:
    """A client that shuts down only its sending side (socat -t) still receives the reply."""
    from vsup.control import _EOF

    conn = Conn(server.server.path)
    try:
        conn.send({"id": 3, "cmd": "reload"})
        server.wait(gates["reload_started"])
        conn.sock.shutdown(socket.SHUT_WR)

        def server_saw_eof() -> bool:
            conns = list(server.server._connections.values())
            return bool(conns) and conns[0]._ahead is _EOF

        wait_until(server_saw_eof, what="the server to read the EOF")
        server.set(gates["reload_go"])
        assert conn.line() == {"id": 3, "progress": {"phase": "stop", "elapsed_s": 1.0}}
        assert conn.line() == {"id": 3, "ok": True, "result": {"model": "b"}}
        assert conn.at_eof()
    finally:
        conn.close()
    assert "control_client_gone" not in server.event_names()


def test_follow_handler_is_cancelled_when_client_leaves(server: ServerThread, gates: Gates) -> None:
    """A read-only follow (events) stops when its client is gone instead of streaming forever."""
    conn = Conn(server.server.path)
    conn.send({"id": 1, "cmd": "events", "args": {"follow": True}})
    assert conn.line() == {"id": 1, "event": {"event": "state_changed", "state": "ready"}}
    conn.close()
    server.wait(gates["events_cancelled"])
    assert "control_client_gone" in server.event_names()


def test_slow_reader_is_dropped_and_daemon_stays_responsive(public_dir: Path, gates: Gates) -> None:
    """A client that never reads a flood of events is dropped; status is answered meanwhile."""
    with ServerThread(public_dir / "s.sock", make_handlers(gates), max_write_buffer=256 * 1024) as srv:
        conn = Conn(srv.server.path)
        try:
            conn.send({"id": 1, "cmd": "flood"})
            srv.wait(gates["flood_dropped"])
            assert ControlClient(srv.server.path).call("status")["ok"] is True
            dropped = [f for n, f in srv.events if n == "control_client_dropped"]
            assert dropped and "does not read" in dropped[0]["reason"]
        finally:
            conn.close()


def test_many_connections_extra_refused_then_status_answers(public_dir: Path, gates: Gates) -> None:
    """300 concurrent connections: max_clients are served, the rest get busy; then status works."""
    with ServerThread(public_dir / "s.sock", make_handlers(gates), max_clients=64) as srv:
        conns: list[socket.socket] = []
        try:
            for _ in range(300):
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.settimeout(WAIT_S)
                s.connect(str(srv.server.path))
                conns.append(s)
            refused: set[int] = set()

            def collect() -> bool:
                readable, _, _ = select.select([s for s in conns if s.fileno() not in refused], [], [], 0.05)
                for s in readable:
                    reply = json.loads(s.makefile("rb").readline())
                    assert reply["error"]["code"] == "busy"
                    refused.add(s.fileno())
                return len(refused) >= 300 - 64

            wait_until(collect, what="busy replies")
            assert len(refused) == 300 - 64
            assert "control_overloaded" in srv.event_names()
            # The served ones still work while the refused ones are still open.
            held = [s for s in conns if s.fileno() not in refused]
            held[0].sendall(b'{"id": 1, "cmd": "status"}\n')
            assert json.loads(held[0].makefile("rb").readline())["ok"] is True
        finally:
            for s in conns:
                s.close()

        def status_ok() -> bool:
            return ControlClient(srv.server.path).call("status")["ok"] is True

        wait_until(status_ok, what="status after the load dropped")


# --- client errors ---------------------------------------------------------------------------------


def test_client_without_daemon_says_not_running(public_dir: Path) -> None:
    """No socket file: DaemonUnreachable says the daemon is not running."""
    with pytest.raises(DaemonUnreachable, match="not running"):
        ControlClient(public_dir / "absent.sock").call("status")


def test_client_on_stale_socket_says_not_running(public_dir: Path) -> None:
    """A socket file nobody listens on: DaemonUnreachable calls it stale."""
    path = public_dir / "stale.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()
    with pytest.raises(DaemonUnreachable, match="stale socket file"):
        ControlClient(path).call("status")


def test_client_sees_busy_reply_when_overloaded(public_dir: Path, gates: Gates) -> None:
    """With every slot taken, ControlClient returns the busy reply instead of failing."""
    with ServerThread(public_dir / "s.sock", make_handlers(gates), max_clients=1) as srv:
        holder = Conn(srv.server.path)
        try:
            holder.send({"id": 1, "cmd": "status"})
            holder.line()  # the slot is now surely taken
            reply = ControlClient(srv.server.path).call("status")
            assert reply["ok"] is False and reply["error"]["code"] == "busy" and reply["id"] is None
        finally:
            holder.close()


# --- access control ---------------------------------------------------------------------------------


def _peer(uid: int, *groups: int) -> Peer:
    return Peer(pid=1, uid=uid, gid=groups[0] if groups else uid, groups=frozenset(groups))


def test_acl_root_and_daemon_uid_are_admin() -> None:
    """Root and the daemon's own uid are admin even with an empty Acl."""
    acl = Acl()
    assert acl.is_admin(_peer(0), daemon_uid=990)
    assert acl.is_admin(_peer(990), daemon_uid=990)
    assert not acl.can_read(_peer(1000, 1000), daemon_uid=990)


def test_acl_read_and_admin_by_supplementary_group() -> None:
    """A supplementary group grants what the Acl gives that group, and no more."""
    acl = Acl(read_gids=frozenset({50}), admin_gids=frozenset({60}))
    reader, admin = _peer(1000, 1000, 50), _peer(1001, 1001, 60)
    assert acl.can_read(reader, daemon_uid=990) and not acl.is_admin(reader, daemon_uid=990)
    assert acl.can_read(admin, daemon_uid=990) and acl.is_admin(admin, daemon_uid=990)


def test_acl_from_names_resolves_and_rejects_unknown() -> None:
    """Names resolve through the user database; an unknown name is a ValueError naming it."""
    acl = Acl.from_names(read_users=["root"], admin_groups=["root", 4242])
    assert acl.read_uids == {0} and acl.admin_gids == {0, 4242}
    with pytest.raises(ValueError, match="unknown group 'no-such-group-vsup'"):
        Acl.from_names(read_groups=["no-such-group-vsup"])


def test_peer_groups_are_looked_up(server: ServerThread) -> None:
    """The handler's Peer carries the connecting uid's groups from the user database."""
    seen: list[Peer] = []

    async def whoami(req: Request) -> Any:
        seen.append(req.peer)
        return None

    server.server.handlers["whoami"] = whoami
    assert ControlClient(server.server.path).call("whoami")["ok"] is True
    me = pwd.getpwuid(os.geteuid())
    assert seen[0].uid == os.geteuid() and seen[0].pid == os.getpid()
    assert set(os.getgrouplist(me.pw_name, me.pw_gid)) <= seen[0].groups


# --- another user, for real ---------------------------------------------------------------------


def test_other_user_reader_may_read_but_not_reload(
    public_dir: Path, gates: Gates, other_user: OtherUser
) -> None:
    """A user with read rights through a supplementary group gets status but forbidden for reload."""
    acl = Acl(read_gids=frozenset({other_user.group_gid}))
    with other_user.server(public_dir, gates, acl) as srv:
        status = other_user.call(srv.server.path, "status")["reply"]
        assert status["ok"] is True and status["result"]["uid"] == other_user.uid
        reload = other_user.call(srv.server.path, "reload")["reply"]
        assert reload["error"]["code"] == "forbidden" and "admin" in reload["error"]["message"]
        forbidden = [f for n, f in srv.events if n == "control_forbidden"]
        assert (
            forbidden[0]["uid"] == other_user.uid
            and forbidden[0]["cmd"] == "reload"
            and forbidden[0]["client_pid"] > 0
        )
        assert not gates["reload_started"].is_set()


def test_other_user_outside_acl_is_forbidden(public_dir: Path, gates: Gates, other_user: OtherUser) -> None:
    """A user who can connect but is in no Acl list is refused even status, as forbidden."""
    with other_user.server(public_dir, gates, Acl()) as srv:
        reply = other_user.call(srv.server.path, "status")["reply"]
        assert reply["error"]["code"] == "forbidden"
        assert f"uid {other_user.uid} may not use" in reply["error"]["message"]


def test_other_user_admin_may_reload(public_dir: Path, gates: Gates, other_user: OtherUser) -> None:
    """A user listed as admin may run a lifecycle command."""
    acl = Acl(admin_uids=frozenset({other_user.uid}))
    with other_user.server(public_dir, gates, acl) as srv:
        srv.set(gates["reload_go"])
        assert other_user.call(srv.server.path, "reload")["reply"]["ok"] is True


def test_user_outside_socket_group_cannot_connect(
    public_dir: Path, gates: Gates, other_user: OtherUser
) -> None:
    """With the socket 0660 root:root, another user gets EACCES explained as a group problem."""
    acl = Acl(read_uids=frozenset({other_user.uid}))  # the Acl would allow; the file mode does not
    with ServerThread(public_dir / "s.sock", make_handlers(gates), acl=acl, socket_group=0) as srv:
        result = other_user.call(srv.server.path, "status")
        assert "permission denied: you are not in group root" in result["unreachable"]
        assert "mode 0660 root:root" in result["unreachable"]
    assert not any(name == "control_forbidden" for name, _ in srv.events)


def test_user_outside_directory_group_is_told_so(
    public_dir: Path, gates: Gates, other_user: OtherUser
) -> None:
    """A created 0750 directory keeps non-members out; the message names the directory."""
    path = public_dir / "run" / "s.sock"
    with ServerThread(path, make_handlers(gates), socket_group=0):
        result = other_user.call(path, "status")
        assert f"its directory {path.parent} is mode 0750 root:root" in result["unreachable"]
