"""Unix control socket: the JSON-lines protocol between the daemon and its clients.

The CLI, scripts and systemd drive vsup through one Unix stream socket. This module owns that
socket and nothing of the daemon: the daemon plugs in one async handler per command.

Protocol (UTF-8, one JSON object per line, several requests per connection, answered in order):

    request   {"id": <str|int>, "cmd": <str>, "args": <object, optional>}
    progress  {"id": ..., "progress": {"phase": <str>, "elapsed_s": <float>, ...}}   zero or more
    event     {"id": ..., "event": {...}}                                 `events` with follow
    reply     {"id": ..., "ok": true, "result": <any>}
              {"id": ..., "ok": false, "error": {"code": <ERROR_CODES key>, "message": <str>}}

A reply that answers no request (line too long, read timeout, too many connections, a line
whose id could not be read) carries `"id": null`. Output is strict JSON (no NaN, ASCII only), and
so must input be: NaN/Infinity are `bad_request`.

Example with socat (`-t` keeps socat reading after its stdin ends; reload can take minutes):

    $ echo '{"id": 1, "cmd": "status"}' | socat -t 600 - UNIX-CONNECT:/run/vsup/vsup.sock
    {"id":1,"ok":true,"result":{"state":"ready", ...}}

Security, in two layers. The socket file is mode 0660 in a directory only the service can write,
so users outside its group cannot connect at all (EACCES). Every request of those who can is then
checked against an `Acl` using the peer's SO_PEERCRED uid/gid plus the uid's supplementary groups
looked up in the user database (SO_PEERCRED carries none). Read-only commands need read rights,
every other command admin rights; root and the daemon's own uid are always admin.

Handlers are tasks owned by the server, not by the connection: a client that disconnects in the
middle of a reload does not stop the reload (the daemon logs its result). Only handlers of
read-only commands, which have no effect but their output, are cancelled when their client is
known to be gone, so that an `events` follow does not stream into nothing forever.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import functools
import grp
import itertools
import json
import logging
import os
import pwd
import select
import socket
import stat
import struct
import traceback
from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

__all__ = [
    "ERROR_CODES",
    "Acl",
    "CommandError",
    "ControlClient",
    "ControlServer",
    "ControlSocketError",
    "ControlSocketInUse",
    "DaemonUnreachable",
    "Handler",
    "Peer",
    "Request",
]

log = logging.getLogger(__name__)

# The whole set of error codes a reply can carry; handlers may raise only these.
ERROR_CODES: Mapping[str, str] = MappingProxyType(
    {
        "bad_request": "not a JSON object with an int/str id, a str cmd and object args, "
        "or the command's args are missing or of the wrong type",
        "unknown_command": "cmd names no command of this daemon",
        "busy": "another lifecycle operation runs (the message names it), "
        "or too many control connections are open (in all, of this uid, or of read-only users)",
        "forbidden": "the connecting user may not run this command (no rights at all: closed at accept; "
        "the third on one connection closes it)",
        "failed": "the operation ran and failed; the message carries the root cause",
        "too_large": "the request line is longer than the limit; the connection is closed",
        "timeout": "no complete line arrived within the read timeout, or a non-admin's read-only "
        "request (events follow) reached its limit; the connection is closed",
        "internal": "a bug in the daemon's handler; it was logged and the daemon keeps running",
    }
)

# Longest request line accepted, newline excluded. Requests are small; this bounds the memory
# one connection can make the daemon buffer.
DEFAULT_MAX_LINE = 64 * 1024
# Measured from the moment the server waits for a request (connection accepted, or the previous
# reply sent) to a complete line. Bounds half-sent lines and idle connections, which would
# otherwise hold one of the max_clients slots forever.
DEFAULT_READ_TIMEOUT_S = 10.0
# A final reply must leave the user-space buffer within this long, measured from the write;
# a client that does not read is dropped, so it never holds its connection task.
DEFAULT_WRITE_TIMEOUT_S = 5.0
# Progress and event lines are never awaited by the handler (a slow reader must not slow a
# reload): they are buffered, and a client with more than this many unread bytes in our buffer
# (beyond what the kernel socket buffer holds) is dropped.
DEFAULT_MAX_WRITE_BUFFER = 1024 * 1024
# close() lets running handlers finish for this long before it cancels them.
DEFAULT_HANDLER_GRACE_S = 2.0
DEFAULT_MAX_CLIENTS = 64
# Of those, this many are kept for admins (root, the daemon's user, admin users and groups):
# read-only users together get at most max_clients - admin_slots, so `vsup stop` always gets
# through (64 `events --follow` of one read-only user once locked root out).
DEFAULT_ADMIN_SLOTS = 8
# Connections one uid may hold at once (root and the daemon's uid excepted).
DEFAULT_MAX_PER_UID = 8
# A read-only request of a non-admin (an `events` follow, a diagnose) ends after this long,
# measured from its start, with a `timeout` reply: it holds a slot, so it must not hold it
# forever. Admins' requests are not bounded here (a reload takes what it takes).
DEFAULT_LONG_REQUEST_S = 900.0
# Forbidden requests one connection may make; the last one's reply ends it. A loop of refused
# requests on one connection once wrote 15,000 events in 3.5 s.
REFUSALS_PER_CONNECTION = 3
# Refusals are events once per uid per this window; the rest are counted into the next one.
REFUSAL_EVENT_WINDOW_S = 60.0
# Group lookups (getgrouplist may ask LDAP) are reused this long per (uid, gid).
GROUPS_TTL_S = 10.0
DEFAULT_READ_ONLY_COMMANDS = frozenset({"status", "events", "diagnose", "stacks"})
# Bad lines of one connection reported as single events; the rest are summed up at its end.
BAD_LINE_EVENTS = 3
# Kernel accept queue. Connections beyond max_clients are accepted and refused with `busy`,
# so the queue only has to absorb a burst between two turns of the event loop.
LISTEN_BACKLOG = 512

_UCRED = struct.Struct("3i")  # struct ucred {pid_t pid; uid_t uid; gid_t gid;}
_EOF = object()  # sentinel outcomes of reading one line
_TOO_LARGE = object()
_MISSING = object()


# --- Identity and access ----------------------------------------------------------------------


@dataclass(frozen=True)
class Peer:
    """The process at the other end of a connection, as the kernel reports it (SO_PEERCRED)."""

    pid: int
    uid: int
    gid: int
    groups: frozenset[int]  # gid plus the uid's groups from the user database


def lookup_groups(uid: int, gid: int) -> frozenset[int]:
    """The effective gid plus every group the user database gives `uid` (may block on NSS)."""
    try:
        entry = pwd.getpwuid(uid)
    except KeyError:  # a uid with no passwd entry (a container, a deleted user): gid only
        return frozenset({gid})
    return frozenset(os.getgrouplist(entry.pw_name, entry.pw_gid)) | {gid}


@dataclass(frozen=True)
class Acl:
    """Who may read (status, events, diagnose) and who may run lifecycle commands."""

    read_uids: frozenset[int] = frozenset()
    read_gids: frozenset[int] = frozenset()
    admin_uids: frozenset[int] = frozenset()
    admin_gids: frozenset[int] = frozenset()

    def is_admin(self, peer: Peer, *, daemon_uid: int) -> bool:
        """True for root, the daemon's own uid, and listed admin users and groups."""
        return (
            peer.uid in (0, daemon_uid)
            or peer.uid in self.admin_uids
            or not self.admin_gids.isdisjoint(peer.groups)
        )

    def can_read(self, peer: Peer, *, daemon_uid: int) -> bool:
        """True for admins and listed read users and groups."""
        return (
            self.is_admin(peer, daemon_uid=daemon_uid)
            or peer.uid in self.read_uids
            or not self.read_gids.isdisjoint(peer.groups)
        )

    @classmethod
    def from_names(
        cls,
        *,
        read_users: Iterable[str | int] = (),
        read_groups: Iterable[str | int] = (),
        admin_users: Iterable[str | int] = (),
        admin_groups: Iterable[str | int] = (),
    ) -> Acl:
        """Resolve user and group names (or numeric ids) now; ValueError names an unknown one."""
        return cls(
            read_uids=_resolve(read_users, _uid_of, "user"),
            read_gids=_resolve(read_groups, _gid_of, "group"),
            admin_uids=_resolve(admin_users, _uid_of, "user"),
            admin_gids=_resolve(admin_groups, _gid_of, "group"),
        )


def _uid_of(name: str) -> int:
    return pwd.getpwnam(name).pw_uid


def _gid_of(name: str) -> int:
    return grp.getgrnam(name).gr_gid


def _resolve(names: Iterable[str | int], lookup: Callable[[str], int], kind: str) -> frozenset[int]:
    ids = set()
    for name in names:
        if isinstance(name, int) and not isinstance(name, bool):
            ids.add(name)
            continue
        try:
            ids.add(lookup(str(name)))
        except KeyError:
            if str(name).isdigit():  # a numeric id with no database entry is still an id
                ids.add(int(name))
            else:
                raise ValueError(f"unknown {kind} {name!r}") from None
    return frozenset(ids)


# --- Handler side -----------------------------------------------------------------------------


class CommandError(Exception):
    """Raised by a handler to answer `{"ok": false, "error": {"code", "message"}}`."""

    def __init__(self, code: str, message: str) -> None:
        if code not in ERROR_CODES:
            # A typo in a handler must not widen the documented set; the ValueError surfaces
            # as an `internal` reply naming the bad code.
            raise ValueError(f"unknown control error code {code!r} (message: {message})")
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class Request:
    """One request as a handler sees it; progress() and event() stream lines before the reply."""

    __slots__ = ("id", "cmd", "args", "peer", "_conn", "_finished", "_detached")

    def __init__(self, id: str | int, cmd: str, args: dict[str, Any], peer: Peer, conn: _Connection):
        self.id = id
        self.cmd = cmd
        self.args = args
        self.peer = peer
        self._conn = conn
        self._finished = False  # the final reply is built: later lines would break the protocol
        self._detached = False  # the client went away while the handler ran

    @property
    def disconnected(self) -> asyncio.Event:
        """Set once the client is gone: it closed both directions, reset, a write failed, or it
        was dropped for not reading. A half-close (shutdown of its sending side) is not gone."""
        return self._conn.gone

    async def progress(self, **fields: Any) -> None:
        """Send `{"id", "progress": fields}`; never raises because the client went away."""
        if not self._finished:
            self._conn.send_nowait({"id": self.id, "progress": fields})

    async def event(self, event: Mapping[str, Any]) -> bool:
        """Send `{"id", "event": event}`; False once the client is gone (stop following then)."""
        if self._finished:
            return False
        return self._conn.send_nowait({"id": self.id, "event": dict(event)})

    def arg(self, name: str, kind: type | tuple[type, ...], default: Any = _MISSING) -> Any:
        """args[name] checked against `kind`; a missing or wrong-typed value is `bad_request`."""
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if name not in self.args:
            if default is _MISSING:
                raise CommandError("bad_request", f"{self.cmd}: missing argument {name!r}")
            return default
        value = self.args[name]
        if isinstance(value, kinds) and (bool in kinds or not isinstance(value, bool)):
            return value  # (bool is an int to isinstance: true is no count)
        if float in kinds and type(value) is int:
            return float(value)
        wanted = " or ".join(k.__name__ for k in kinds)
        raise CommandError(
            "bad_request",
            f"{self.cmd}: argument {name!r} must be {wanted}, got {type(value).__name__}",
        )


Handler = Callable[[Request], Awaitable[Any]]


# --- Server -----------------------------------------------------------------------------------


class ControlSocketError(Exception):
    """The control socket could not be set up; the message says why and what to do."""


class ControlSocketInUse(ControlSocketError):
    """Another live daemon owns the socket path."""


def _encode(obj: Any) -> bytes:
    return (json.dumps(obj, ensure_ascii=True, allow_nan=False, separators=(",", ":")) + "\n").encode("ascii")


def _error(id: Any, code: str, message: str) -> dict[str, Any]:
    return {"id": id, "ok": False, "error": {"code": code, "message": message}}


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _log_id(rid: str | int) -> str | int:
    """A request id fit for an event: ids are echoed whole, but logged at most 64 characters."""
    return rid if isinstance(rid, int) or len(rid) <= 64 else rid[:61] + "..."


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class _BadRequest(Exception):
    def __init__(self, id: Any, message: str) -> None:
        super().__init__(message)
        self.id = id
        self.message = message


def parse_request(line: bytes) -> tuple[str | int, str, dict[str, Any]]:
    """(id, cmd, args) of one request line; raises _BadRequest with the id when it was readable."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _BadRequest(None, f"request is not UTF-8 (byte {exc.start})") from None
    try:
        obj = json.loads(text, parse_constant=_reject_constant)
    except RecursionError:
        raise _BadRequest(None, "malformed JSON: nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, NaN/Infinity, an int too long to convert
        raise _BadRequest(None, f"malformed JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise _BadRequest(None, f"request must be a JSON object, not {type(obj).__name__}")
    rid = obj.get("id", _MISSING)
    if rid is _MISSING:
        raise _BadRequest(None, 'request has no "id"')
    if isinstance(rid, bool) or not isinstance(rid, (str, int)):
        raise _BadRequest(None, f'"id" must be a string or an integer, not {type(rid).__name__}')
    unknown = sorted(set(obj) - {"id", "cmd", "args"})
    if unknown:
        raise _BadRequest(rid, f"unknown request field(s): {_short(unknown)}")
    cmd = obj.get("cmd", _MISSING)
    if cmd is _MISSING:
        raise _BadRequest(rid, 'request has no "cmd"')
    if not isinstance(cmd, str):
        raise _BadRequest(rid, f'"cmd" must be a string, not {type(cmd).__name__}')
    args = obj.get("args")
    if args is None:
        args = {}
    if not isinstance(args, dict):
        raise _BadRequest(rid, f'"args" must be a JSON object, not {type(args).__name__}')
    return rid, cmd, args


class _Connection:
    """One accepted client: reads requests, runs them one at a time, writes their lines."""

    def __init__(
        self,
        server: ControlServer,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        creds: tuple[int, int, int],
    ) -> None:
        self.server = server
        self.reader = reader
        self.writer = writer
        self.pid, self.uid, self.gid = creds
        self.gone = asyncio.Event()
        self._gone_watch = asyncio.ensure_future(self.gone.wait())
        self._peer: Peer | None = None
        self._line_task: asyncio.Task[Any] | None = None  # the pending read of the next line
        self._ahead: Any = None  # a line (or _EOF/_TOO_LARGE) read while a handler ran
        self._bad_lines = 0
        self.admin = False  # set at accept, from the peer's rights
        self._refusals = 0
        self._ending = False  # the reply being sent is the connection's last
        # The transport calls connection_lost for every way a connection ends (peer reset,
        # failed write, our abort); wait_closed() is the public view of that.
        self._closed_watch = asyncio.ensure_future(writer.wait_closed())
        self._closed_watch.add_done_callback(self._on_closed)

    def _on_closed(self, task: asyncio.Future[None]) -> None:
        if not task.cancelled():
            task.exception()  # a reset arrives as an exception here: retrieve it, it means gone
        self.gone.set()

    def fields(self) -> dict[str, Any]:
        # client_pid, not pid: an event's `pid` is the API server's (a fixed key of every event).
        return {"uid": self.uid, "client_pid": self.pid, "gid": self.gid}

    async def peer(self) -> Peer:
        if self._peer is None:
            groups = await self.server._groups(self.uid, self.gid)
            self._peer = Peer(pid=self.pid, uid=self.uid, gid=self.gid, groups=groups)
        return self._peer

    def abort(self, reason: str | None = None) -> None:
        if reason is not None and not self.gone.is_set():
            self.server._emit("control_client_dropped", **self.fields(), reason=reason)
        self.writer.transport.abort()
        self.gone.set()

    def send_nowait(self, obj: Mapping[str, Any] | bytes) -> bool:
        """Buffer one line without waiting; False (and nothing sent) once the client is gone.

        Serialization errors propagate: they are bugs of the caller, not of the client.
        """
        data = obj if isinstance(obj, bytes) else _encode(obj)
        transport = self.writer.transport
        if self.gone.is_set() or transport.is_closing():
            return False
        if transport.get_write_buffer_size() > self.server.max_write_buffer:
            self.abort("client does not read its replies")
            return False
        self.writer.write(data)
        return True

    async def send(self, obj: Mapping[str, Any] | bytes) -> bool:
        """Send one line and wait, bounded, until it left our buffer."""
        if not self.send_nowait(obj):
            return False
        try:
            await asyncio.wait_for(self.writer.drain(), self.server.write_timeout_s)
        except TimeoutError:
            self.abort(f"reply not read within {self.server.write_timeout_s} s")
            return False
        except OSError:  # ConnectionResetError/BrokenPipeError: the client went away
            self.gone.set()
            return False
        return True

    async def _read_line(self) -> Any:
        """One raw line (newline excluded), _EOF or _TOO_LARGE. Bytes left at EOF count as a line,
        so `printf '{...}' | socat` works without a trailing newline."""
        try:
            return (await self.reader.readuntil(b"\n"))[:-1]
        except asyncio.IncompleteReadError as exc:
            if exc.partial:
                return exc.partial
            if self._peer_closed():
                self.abort()
            return _EOF
        except asyncio.LimitOverrunError:
            return _TOO_LARGE
        except OSError:
            return _EOF

    def _peer_closed(self) -> bool:
        """After a read EOF: True if the client closed both directions, False for a half-close.

        Only a full close shows POLLHUP on a Unix stream socket. Without this, an `events`
        follow whose client left would be noticed only at its next event, which may be hours.
        """
        try:
            poller = select.poll()
            poller.register(self.writer.get_extra_info("socket").fileno(), 0)  # HUP/ERR always
            return any(ev & (select.POLLHUP | select.POLLERR) for _, ev in poller.poll(0))
        except (OSError, ValueError):
            return True

    async def serve(self) -> None:
        """Answer requests in order until EOF, a fatal input error, or the client is gone."""
        try:
            while (line := await self._next_line()) is not None:
                reply = await self._answer(line)
                if reply is None or not await self.send(reply) or self._ending:
                    return
        finally:
            for pending in (self._line_task, self._gone_watch):
                if pending is not None:
                    pending.cancel()
            if self._bad_lines > BAD_LINE_EVENTS:
                self.server._emit(
                    "control_bad_request",
                    **self.fields(),
                    code="bad_request",
                    reason=f"{self._bad_lines - BAD_LINE_EVENTS} more bad lines not reported singly",
                )
            await self._close()

    async def _next_line(self) -> bytes | None:
        """The next request line, or None after answering too_large/timeout, at EOF or gone."""
        server = self.server
        if self._ahead is None:
            if self._line_task is None:
                self._line_task = asyncio.ensure_future(self._read_line())
            done, _ = await asyncio.wait(
                {self._line_task, self._gone_watch},
                timeout=server.read_timeout_s,
                return_when=asyncio.FIRST_COMPLETED,
            )
            if self._line_task not in done:
                if self._gone_watch not in done:
                    server._emit("control_bad_request", **self.fields(), code="timeout")
                    message = f"no complete request line within {server.read_timeout_s} s"
                    await self.send(_error(None, "timeout", message))
                return None
            self._ahead, self._line_task = self._line_task.result(), None
        item, self._ahead = self._ahead, None
        if item is _TOO_LARGE:
            server._emit("control_bad_request", **self.fields(), code="too_large")
            await self.send(_error(None, "too_large", f"request line longer than {server.max_line} bytes"))
            return None
        return None if item is _EOF else item

    async def _answer(self, line: bytes) -> dict[str, Any] | bytes | None:
        """The reply to one line; None if the client went away while its handler ran."""
        server = self.server
        try:
            rid, cmd, args = parse_request(line)
        except _BadRequest as exc:
            self._bad_lines += 1
            if self._bad_lines <= BAD_LINE_EVENTS:  # one client must not flood the event log
                server._emit("control_bad_request", **self.fields(), code="bad_request", reason=exc.message)
            return _error(exc.id, "bad_request", exc.message)
        request = await self._admit(rid, cmd, args)
        if not isinstance(request, Request):
            return request  # the refusal
        task = server._spawn(request)
        loop = asyncio.get_running_loop()
        bounded = request.cmd in server.read_only_commands and not self.admin
        deadline = loop.time() + server.long_request_s if bounded else None
        # While the handler runs, keep one line of read-ahead pending: it notices a full close
        # and keeps a pipelined request for after this reply. A read EOF alone does not mean
        # gone: `socat -t` half-closes after sending and still reads the reply.
        while not task.done():
            waits: set[asyncio.Future[Any]] = {task, self._gone_watch}
            if self._ahead is None and self._line_task is None:
                self._line_task = asyncio.ensure_future(self._read_line())
            if self._line_task is not None:
                waits.add(self._line_task)
            left = None if deadline is None else max(0.0, deadline - loop.time())
            done, _ = await asyncio.wait(waits, timeout=left, return_when=asyncio.FIRST_COMPLETED)
            if not done:
                # A read-only request of a non-admin past its bound: it holds a slot that
                # others need. Its output so far was delivered; the reply says why it ended.
                task.cancel()
                request._finished = True
                server._emit(
                    "control_request_timeout", **self.fields(), cmd=request.cmd, id=_log_id(request.id)
                )
                self._ending = True
                limit = f"{server.long_request_s:g} s"
                message = f"{request.cmd} ended after {limit} (the limit for non-admins); reconnect"
                return _error(request.id, "timeout", message)
            if self._line_task is not None and self._line_task in done:
                self._ahead, self._line_task = self._line_task.result(), None
            if self._gone_watch in done and not task.done():
                request._detached = True
                server._emit("control_client_gone", **self.fields(), cmd=request.cmd, id=_log_id(request.id))
                if request.cmd in server.read_only_commands:
                    task.cancel()  # output only: nobody is left to read it
                return None
        return server._reply_for(request, task)

    async def _admit(self, rid: str | int, cmd: str, args: dict[str, Any]) -> Request | dict[str, Any]:
        """The request to run, or the refusal to send instead (forbidden, unknown_command).

        A user with no rights at all learns nothing, not even which commands exist.
        """
        server = self.server
        peer = await self.peer()
        can_read = server.acl.can_read(peer, daemon_uid=server.daemon_uid)
        if can_read and cmd not in server.handlers:
            known = ", ".join(sorted(server.handlers))
            return _error(rid, "unknown_command", f"unknown command {_short(cmd)}; known: {known}")
        if can_read and (
            cmd in server.read_only_commands or server.acl.is_admin(peer, daemon_uid=server.daemon_uid)
        ):
            return Request(rid, cmd, args, peer, self)
        self._refused(cmd)
        if can_read:
            message = f"{cmd!r} needs admin rights; uid {peer.uid} may only read"
        else:
            message = f"uid {peer.uid} may not use the vsup control socket"
        return _error(rid, "forbidden", message)

    def _refused(self, cmd: str) -> None:
        """Count one forbidden request: the REFUSALS_PER_CONNECTION-th reply ends the
        connection, and the server makes an event of it at most once a window per uid."""
        self._refusals += 1
        if self._refusals >= REFUSALS_PER_CONNECTION:
            self._ending = True
        self.server._refusal_event("control_forbidden", self.uid, {**self.fields(), "cmd": cmd[:64]})

    async def _close(self) -> None:
        transport = self.writer.transport
        transport.close()  # flushes what is buffered first, then closes
        if not self._closed_watch.done():
            # Bounded: a client that does not read must not keep its fd open forever.
            try:
                await asyncio.wait_for(asyncio.shield(self._closed_watch), self.server.write_timeout_s)
            except (TimeoutError, OSError):
                transport.abort()
        self.gone.set()


class ControlServer:
    """The daemon's control socket: create it safely, serve requests to handlers, remove it.

    Next to the socket lives `<socket>.lock` (flock, holding the daemon's pid) for as long as
    the server runs.

    Slots (issue 20: users with no or few rights once held every slot): a peer with no rights
    at all is answered `forbidden` and closed at accept; no uid but root and the daemon's holds
    more than max_per_uid connections; read-only users together hold at most
    max_clients - admin_slots; a non-admin's read-only request (an `events` follow) ends after
    long_request_s; the REFUSALS_PER_CONNECTION-th refused request ends its connection.

    Events passed to on_event(name, fields), for the daemon to log (`client_pid` is the
    client's pid, never `pid`: that key of every event is the API server's):
      control_forbidden        uid, client_pid, gid, cmd, suppressed: a refused request or
                               connection; at most one per uid per REFUSAL_EVENT_WINDOW_S,
                               `suppressed` counting those not reported since the last one
      control_bad_request      uid, client_pid, gid, code (bad_request, too_large, timeout), reason
      control_overloaded       active, max_clients, uid, reason: the first refusal of an overload
      control_overload_ended   refused: how many were refused during it
      control_request_timeout  uid, client_pid, gid, cmd, id: a non-admin's request hit long_request_s
      control_internal_error   uid, client_pid, cmd, id, error, traceback: a handler bug
      control_client_gone      uid, client_pid, gid, cmd, id: the client left while its handler ran
      control_reply_undelivered  uid, client_pid, cmd, id, ok, code, message: that handler's outcome
      control_client_dropped   uid, client_pid, gid, reason: a client that did not read its replies
    """

    def __init__(
        self,
        path: Path,
        handlers: Mapping[str, Handler],
        *,
        acl: Acl,
        socket_group: int | None = None,
        mode: int = 0o660,
        max_line: int = DEFAULT_MAX_LINE,
        read_timeout_s: float = DEFAULT_READ_TIMEOUT_S,
        max_clients: int = DEFAULT_MAX_CLIENTS,
        on_event: Callable[[str, dict[str, Any]], None] | None = None,
        read_only_commands: frozenset[str] = DEFAULT_READ_ONLY_COMMANDS,
        write_timeout_s: float = DEFAULT_WRITE_TIMEOUT_S,
        max_write_buffer: int = DEFAULT_MAX_WRITE_BUFFER,
        handler_grace_s: float = DEFAULT_HANDLER_GRACE_S,
        admin_slots: int = DEFAULT_ADMIN_SLOTS,
        max_per_uid: int = DEFAULT_MAX_PER_UID,
        long_request_s: float = DEFAULT_LONG_REQUEST_S,
    ) -> None:
        self.path = Path(path)
        self.lock_path = self.path.with_name(self.path.name + ".lock")
        self.handlers = dict(handlers)
        self.acl = acl
        self.socket_group = socket_group
        self.mode = mode
        self.max_line = max_line
        self.read_timeout_s = read_timeout_s
        self.max_clients = max_clients
        self.on_event = on_event
        self.read_only_commands = frozenset(read_only_commands)
        self.write_timeout_s = write_timeout_s
        self.max_write_buffer = max_write_buffer
        self.handler_grace_s = handler_grace_s
        self.admin_slots = min(admin_slots, max_clients)
        self.max_per_uid = max_per_uid
        self.long_request_s = long_request_s
        self.daemon_uid = os.geteuid()
        self._per_uid: dict[int, int] = {}  # open connections by uid
        self._pending = 0  # accepted connections whose rights are being looked up
        self._group_cache: dict[tuple[int, int], tuple[float, frozenset[int]]] = {}
        self._refusals: dict[int, tuple[float, int]] = {}  # uid -> (last event time, suppressed since)
        self._state = "new"  # new -> starting -> serving -> closing -> closed
        self._server: asyncio.AbstractServer | None = None
        self._lock_fd: int | None = None
        self._socket_id: tuple[int, int] | None = None  # (st_dev, st_ino) of the file we bound
        self._created_dir: Path | None = None
        self._connections: dict[asyncio.Task[Any], _Connection] = {}
        self._handler_tasks: set[asyncio.Task[Any]] = set()
        self._refused = 0  # connections refused in the current overload episode
        self._closed = asyncio.Event()

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        """Create the socket and serve; ControlSocketError says why not (state then as before)."""
        if self._state != "new":
            raise RuntimeError(f"ControlServer.start() in state {self._state}")
        self._state = "starting"
        try:
            self._prepare_directory()
            self._acquire_lock()
            self._clear_path()
            sock = self._bind()
            try:
                self._server = await asyncio.start_unix_server(
                    self._on_connect, sock=sock, limit=self.max_line, backlog=LISTEN_BACKLOG
                )
            except BaseException:
                sock.close()
                raise
        except BaseException:
            await self._teardown(failed_start=True)
            raise
        self._state = "serving"

    async def close(self) -> None:
        """Stop accepting, give handlers a grace, cancel the rest, remove our socket. Idempotent."""
        if self._state == "new":
            self._state = "closed"
        if self._state == "closed":
            return
        if self._state == "closing":
            await self._closed.wait()
            return
        self._state = "closing"
        try:
            await self._teardown(failed_start=False)
        finally:
            self._state = "closed"
            self._closed.set()

    async def _teardown(self, *, failed_start: bool) -> None:
        if self._server is not None:
            self._server.close()
        self._unlink_socket()  # first, so new clients get ENOENT instead of waiting on a dead queue
        await _end_tasks(self._handler_tasks, self.handler_grace_s)
        # Aborting the transports ends every connection loop by itself (gone); cancel stragglers.
        for conn in list(self._connections.values()):
            conn.abort()
        await _end_tasks(self._connections, self.write_timeout_s)
        self._release_lock()
        if failed_start and self._created_dir is not None:
            try:
                self._created_dir.rmdir()
            except OSError:
                pass
            self._created_dir = None
        self._server = None

    # -- start phases --------------------------------------------------------------------------

    def _prepare_directory(self) -> None:
        parent = self.path.parent
        if parent.is_dir():
            return  # never chmod a directory we did not create (e.g. systemd's RuntimeDirectory)
        try:
            parent.mkdir(parents=True, mode=0o750)
        except FileExistsError:
            if parent.is_dir():
                return
            raise ControlSocketError(f"{parent} exists and is not a directory") from None
        except OSError as exc:
            raise ControlSocketError(f"cannot create socket directory {parent}: {exc.strerror}") from None
        self._created_dir = parent
        try:
            os.chmod(parent, 0o750)  # noqa: S103 - group traverses to connect; mkdir's mode went through the umask
            if self.socket_group is not None:
                os.chown(parent, -1, self.socket_group)  # members must traverse to connect
        except OSError as exc:
            raise ControlSocketError(f"cannot set owner/mode of {parent}: {exc.strerror}") from None

    def _acquire_lock(self) -> None:
        # The lock makes check-stale -> unlink -> bind atomic against a second daemon starting
        # at the same moment, which a connect test alone cannot: both would see a stale file.
        for _ in range(10):
            try:
                fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
            except OSError as exc:
                raise ControlSocketError(f"cannot open lock file {self.lock_path}: {exc.strerror}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_pid(fd)
                os.close(fd)
                raise ControlSocketInUse(
                    f"another vsup daemon{holder} holds {self.lock_path}: it owns the control "
                    f"socket {self.path}; stop it first or configure another [daemon].socket"
                ) from None
            # A closing daemon unlinks the lock file: if we locked that unlinked inode, retry.
            try:
                same = _file_id(os.fstat(fd)) == _file_id(os.stat(self.lock_path))
            except FileNotFoundError:
                same = False
            if same:
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n".encode())
                self._lock_fd = fd
                return
            os.close(fd)
        raise ControlSocketError(f"cannot lock {self.lock_path}: it keeps being replaced")

    def _release_lock(self) -> None:
        if self._lock_fd is None:
            return
        try:
            if _file_id(os.fstat(self._lock_fd)) == _file_id(os.stat(self.lock_path)):
                os.unlink(self.lock_path)  # still locked by us: no one else can be using it
        except OSError:
            pass
        os.close(self._lock_fd)
        self._lock_fd = None

    def _clear_path(self) -> None:
        """Remove a stale socket file; refuse if a live process listens or it is no socket."""
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise ControlSocketError(f"{self.path} exists and is not a socket; refusing to remove it")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        probe.setblocking(False)  # never wait on a wedged listener
        try:
            probe.connect(str(self.path))
        except ConnectionRefusedError:
            pass  # stale: nobody listens
        except BlockingIOError:
            raise ControlSocketInUse(
                f"a process listens on {self.path} (its accept queue is full); not replacing it"
            ) from None
        except OSError as exc:
            raise ControlSocketError(f"cannot probe {self.path}: {exc.strerror}") from None
        else:
            holder = ""
            try:
                pid = _UCRED.unpack(probe.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))[0]
                holder = f" (pid {pid})"
            except OSError:
                pass
            raise ControlSocketInUse(
                f"another process{holder} is listening on {self.path}; stop it first or "
                "configure another [daemon].socket"
            )
        finally:
            probe.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    def _bind(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.bind(str(self.path))
            self._socket_id = _file_id(os.lstat(self.path))
            # Not listening yet, so connect() is refused until listen(): the file's mode before
            # this chmod is never usable. We rejected a temporary umask instead: the umask is
            # process-wide and would change files other threads create meanwhile.
            os.chmod(self.path, self.mode)
            if self.socket_group is not None:
                os.chown(self.path, -1, self.socket_group)
        except OSError as exc:
            sock.close()
            reason = exc.strerror or str(exc)
            raise ControlSocketError(f"cannot create control socket {self.path}: {reason}") from None
        return sock

    def abandon(self) -> None:
        """The process exits now (a forced exit): remove our socket and lock file, no waiting."""
        self._unlink_socket()
        self._release_lock()

    def _unlink_socket(self) -> None:
        if self._socket_id is None:
            return
        try:
            if _file_id(os.lstat(self.path)) == self._socket_id:
                os.unlink(self.path)  # only our own: a successor may have bound the path since
        except FileNotFoundError:
            pass
        self._socket_id = None

    # -- serving -------------------------------------------------------------------------------

    async def _on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._state != "serving":
            writer.transport.abort()
            return
        try:
            sock = writer.get_extra_info("socket")
            creds = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
        except OSError:
            writer.transport.abort()
            return
        pid, uid, gid = creds
        owner = uid in (0, self.daemon_uid)
        # Refused at once with one line: a flood of clients must not queue up behind the
        # slots, and `status` must get through again as soon as they leave.
        if len(self._connections) + self._pending >= self.max_clients:
            self._refuse_busy(writer, uid, f"too many control connections ({self.max_clients}); try again")
            return
        if not owner and self._per_uid.get(uid, 0) >= self.max_per_uid:
            self._refuse_busy(
                writer, uid, f"uid {uid} has {self.max_per_uid} control connections open; close one"
            )
            return
        self._per_uid[uid] = self._per_uid.get(uid, 0) + 1
        try:
            await self._serve_peer(reader, writer, pid, uid, gid)
        except asyncio.CancelledError:
            # Only close() cancels a connection, and asyncio's stream callback would report a
            # cancelled client task as an unhandled error.
            pass
        finally:
            left = self._per_uid.pop(uid) - 1
            if left:
                self._per_uid[uid] = left

    async def _serve_peer(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, pid: int, uid: int, gid: int
    ) -> None:
        self._pending += 1  # holds a slot while its groups are looked up
        try:
            groups = await self._groups(uid, gid)
        finally:
            self._pending -= 1
        peer = Peer(pid=pid, uid=uid, gid=gid, groups=groups)
        admin = self.acl.is_admin(peer, daemon_uid=self.daemon_uid)
        if not admin and not self.acl.can_read(peer, daemon_uid=self.daemon_uid):
            # No rights at all: answered and closed before it may send or hold anything.
            self._refusal_event(
                "control_forbidden", uid, {"uid": uid, "client_pid": pid, "gid": gid, "cmd": None}
            )
            writer.write(_encode(_error(None, "forbidden", f"uid {uid} may not use the vsup control socket")))
            writer.transport.close()
            return
        if not admin and sum(1 for c in self._connections.values() if not c.admin) >= (
            self.max_clients - self.admin_slots
        ):
            message = f"too many read-only control connections; {self.admin_slots} are kept for admins"
            self._refuse_busy(writer, uid, message)
            return
        if self._refused:
            self._emit("control_overload_ended", refused=self._refused)
            self._refused = 0
        task = asyncio.current_task()
        assert task is not None  # noqa: S101 - narrows: a connection handler runs as a task
        conn = _Connection(self, reader, writer, (pid, uid, gid))
        conn._peer, conn.admin = peer, admin
        self._connections[task] = conn
        try:
            await conn.serve()
        finally:
            del self._connections[task]

    def _refuse_busy(self, writer: asyncio.StreamWriter, uid: int, message: str) -> None:
        if self._refused == 0:
            self._emit(
                "control_overloaded",
                active=len(self._connections),
                max_clients=self.max_clients,
                uid=uid,
                reason=message,
            )
        self._refused += 1
        writer.write(_encode(_error(None, "busy", message)))
        writer.transport.close()

    def _refusal_event(self, name: str, uid: int, fields: dict[str, Any]) -> None:
        """One event per uid per REFUSAL_EVENT_WINDOW_S; the refusals in between are counted
        into the next (15,000 refused requests once made events.jsonl grow 2.7 MB, and left
        nothing but them in the 500 recent events that `vsup events` and incidents show)."""
        now = asyncio.get_running_loop().time()
        last, suppressed = self._refusals.get(uid, (None, 0))
        if last is not None and now - last < REFUSAL_EVENT_WINDOW_S:
            self._refusals[uid] = (last, suppressed + 1)
            return
        self._refusals[uid] = (now, 0)
        if len(self._refusals) > 4096:  # bounded whatever the number of uids
            self._refusals = {k: v for k, v in self._refusals.items() if now - v[0] < REFUSAL_EVENT_WINDOW_S}
        self._emit(name, **fields, suppressed=suppressed)

    async def _groups(self, uid: int, gid: int) -> frozenset[int]:
        """The peer's groups, looked up off the loop (getgrouplist may ask LDAP/sssd and must
        not stall the daemon), reused for GROUPS_TTL_S."""
        now = asyncio.get_running_loop().time()
        hit = self._group_cache.get((uid, gid))
        if hit is not None and now - hit[0] < GROUPS_TTL_S:
            return hit[1]
        groups = await asyncio.to_thread(lookup_groups, uid, gid)
        if len(self._group_cache) > 1024:
            self._group_cache.clear()
        self._group_cache[(uid, gid)] = (now, groups)
        return groups

    def _spawn(self, request: Request) -> asyncio.Task[Any]:
        handler = self.handlers[request.cmd]
        task = asyncio.get_running_loop().create_task(
            _run_handler(handler, request), name=f"vsup-control {request.cmd[:64]} {_log_id(request.id)}"
        )
        self._handler_tasks.add(task)
        task.add_done_callback(functools.partial(self._handler_done, request))
        return task

    def _handler_done(self, request: Request, task: asyncio.Task[Any]) -> None:
        self._handler_tasks.discard(task)
        fields = _request_fields(request)
        if task.cancelled():
            exc: BaseException | None = None
        else:
            exc = task.exception()
        if exc is not None and not isinstance(exc, CommandError):
            self._emit(
                "control_internal_error",
                **fields,
                error=f"{type(exc).__name__}: {exc}",
                traceback="".join(traceback.format_exception(exc)),
            )
        if request._detached:
            if task.cancelled():
                outcome: dict[str, Any] = {"ok": False, "code": "cancelled"}
            elif exc is None:
                outcome = {"ok": True}
            else:
                code = exc.code if isinstance(exc, CommandError) else "internal"
                outcome = {"ok": False, "code": code, "message": str(exc)}
            self._emit("control_reply_undelivered", **fields, **outcome)

    def _reply_for(self, request: Request, task: asyncio.Task[Any]) -> dict[str, Any] | bytes:
        request._finished = True
        if task.cancelled():
            why = ": the control server is closing" if self._state == "closing" else ""
            return _error(request.id, "failed", f"{request.cmd} was cancelled before it finished{why}")
        exc = task.exception()
        if isinstance(exc, CommandError):
            return _error(request.id, exc.code, exc.message)
        if exc is not None:
            message = f"{request.cmd}: internal error (logged): {type(exc).__name__}: {exc}"
            return _error(request.id, "internal", message)
        try:
            return _encode({"id": request.id, "ok": True, "result": task.result()})
        except (TypeError, ValueError) as err:
            message = f"{request.cmd}: internal error (logged): result is not JSON: {err}"
            self._emit("control_internal_error", **_request_fields(request), error=message)
            return _error(request.id, "internal", message)

    def _emit(self, name: str, **fields: Any) -> None:
        if self.on_event is None:
            return
        try:
            self.on_event(name, fields)
        except Exception:  # the event sink must never take the control socket down with it
            log.exception("control on_event(%s) failed", name)


def _request_fields(request: Request) -> dict[str, Any]:
    return {
        "uid": request.peer.uid,
        "client_pid": request.peer.pid,
        "cmd": request.cmd,
        "id": _log_id(request.id),
    }


async def _end_tasks(live: Collection[asyncio.Task[Any]], timeout: float) -> None:
    """Give the tasks in `live` (a collection they leave when done) `timeout` to end, cancel the
    ones left, and give those `timeout` again."""
    if live:
        await asyncio.wait(set(live), timeout=timeout)
    for task in list(live):
        task.cancel()
    if live:
        await asyncio.wait(set(live), timeout=timeout)


async def _run_handler(handler: Handler, request: Request) -> Any:
    return await handler(request)


def _file_id(st: os.stat_result) -> tuple[int, int]:
    return (st.st_dev, st.st_ino)


def _read_pid(fd: int) -> str:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return ""
    return f" (pid {text})" if text.isdigit() else ""


# --- Client -----------------------------------------------------------------------------------


class DaemonUnreachable(Exception):
    """No daemon answers on the socket; `reason` tells the operator what that means."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"cannot reach the vsup daemon at {path}: {reason}")
        self.path = path
        self.reason = reason


# Longest reply line the client reads (a `diagnose` log excerpt can be large, not unbounded).
MAX_REPLY_LINE = 64 * 1024 * 1024


class ControlClient:
    """Blocking client for the CLI: one connection per call."""

    def __init__(self, path: Path, timeout_s: float | None = 30.0) -> None:
        # timeout_s bounds each silence: connecting, and the wait for every next line. None for
        # commands that may run long without progress (reload's ready phase can take minutes).
        self.path = Path(path)
        self.timeout_s = timeout_s
        self._ids = itertools.count(1)

    def call(
        self,
        cmd: str,
        args: dict[str, Any] | None = None,
        *,
        on_progress: Callable[[dict[str, Any]], None] | None = None,
        on_event: Callable[[dict[str, Any]], None] | None = None,
    ) -> dict[str, Any]:
        """Send one request; return the final reply dict (ok true or false)."""
        rid = next(self._ids)
        line = _encode({"id": rid, "cmd": cmd, "args": args or {}})
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        with sock:
            sock.settimeout(self.timeout_s)
            try:
                sock.connect(str(self.path))
            except TimeoutError:
                reason = f"the daemon did not accept the connection within {self.timeout_s} s (hung?)"
                raise DaemonUnreachable(self.path, reason) from None
            except OSError as exc:
                raise DaemonUnreachable(self.path, _explain_connect_error(self.path, exc)) from None
            try:
                sock.sendall(line)
            except (BrokenPipeError, ConnectionResetError):
                pass  # refused at once (busy): its reply may still be waiting to be read
            except TimeoutError:
                reason = f"the daemon did not take the request within {self.timeout_s} s (hung?)"
                raise DaemonUnreachable(self.path, reason) from None
            with sock.makefile("rb") as stream:
                while True:
                    try:
                        raw = stream.readline(MAX_REPLY_LINE)
                    except TimeoutError:
                        raise DaemonUnreachable(self.path, f"no reply within {self.timeout_s} s") from None
                    except OSError as exc:
                        reason = f"connection lost: {exc.strerror or exc}"
                        raise DaemonUnreachable(self.path, reason) from None
                    if not raw:
                        reason = "the daemon closed the connection before replying (did it stop?)"
                        raise DaemonUnreachable(self.path, reason)
                    try:
                        msg = json.loads(raw)
                    except ValueError:
                        raise DaemonUnreachable(self.path, f"malformed reply line: {_short(raw)}") from None
                    if not isinstance(msg, dict) or msg.get("id") not in (rid, None):
                        raise DaemonUnreachable(self.path, f"unexpected reply line: {_short(raw)}")
                    if "progress" in msg:
                        if on_progress is not None:
                            on_progress(msg["progress"])
                    elif "event" in msg:
                        if on_event is not None:
                            on_event(msg["event"])
                    elif "ok" in msg:
                        return msg
                    else:
                        raise DaemonUnreachable(self.path, f"unexpected reply line: {_short(raw)}")


def _explain_connect_error(path: Path, exc: OSError) -> str:
    code = exc.errno
    if code == errno.ENOENT:
        return f"no socket at {path}: the daemon is not running (or [daemon].socket names another path)"
    if code == errno.ECONNREFUSED:
        return f"nothing listens on {path} (a stale socket file): the daemon is not running"
    if code in (errno.EACCES, errno.EPERM):
        return _explain_permission(path)
    if code == errno.EAGAIN:
        return "the daemon's connection queue is full; try again"
    return f"{exc.strerror or exc}"


def _explain_permission(path: Path) -> str:
    hint = "ask an administrator to add you to it (then log in again), or use sudo"
    try:
        st = os.stat(path)
        where = f"the socket {path} is {_describe(st)}"
    except PermissionError:
        try:
            st = os.stat(path.parent)
            where = f"its directory {path.parent} is {_describe(st)}"
        except OSError:
            return f"permission denied: you may not reach {path}; {hint}"
    except OSError:
        return f"permission denied on {path}; {hint}"
    return f"permission denied: you are not in group {_group_name(st.st_gid)} ({where}); {hint}"


def _describe(st: os.stat_result) -> str:
    try:
        owner = pwd.getpwuid(st.st_uid).pw_name
    except KeyError:
        owner = str(st.st_uid)
    return f"mode {stat.S_IMODE(st.st_mode):04o} {owner}:{_group_name(st.st_gid)}"


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)
