"""The systemd notify protocol (sd_notify(3)) over ``$NOTIFY_SOCKET``.

Why our own 100 lines and not a library: ``sdnotify`` (PyPI 0.3.2) is tiny but unmaintained
since 2018, blocks on send, and knows neither abstract sockets' ``@`` form nor the watchdog
variables; ``systemd-python`` builds from source against ``libsystemd-dev`` (a C toolchain and
headers on every install); ``cysystemd`` is the same with Cython. The protocol is one datagram
of ``KEY=VALUE`` lines to a Unix socket, so a small module we can test byte for byte wins.

Invariants:
- Never raises, and never blocks the event loop for long: a send waits at most
  ``SEND_TIMEOUT_S`` for room in the receiver's queue. The queue holds only
  ``net.unix.max_dgram_qlen`` datagrams (10 on hosts without systemd's sysctl defaults), and a
  reload emits a dozen messages in a millisecond: with a non-blocking send the READY=1 that ends
  the reload was the one dropped (seen in tests). A receiver that does not read at all costs one
  timeout; later sends fail at once until one gets through. Failures are logged once (a failing
  watchdog ping every few seconds would flood the journal) and the message is dropped.
- One datagram per call, so systemd sees ``READY=1`` and its ``STATUS=`` atomically.
- The environment is read, never changed: vsup passes vLLM an explicit environment, from which
  the daemon removes ``NOTIFY_SOCKET``/``WATCHDOG_*`` so vLLM cannot speak for us.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import socket
import struct
import time
from collections.abc import Mapping

log = logging.getLogger(__name__)

# How long one send may wait for systemd to make room in its queue. systemd reads the notify
# socket on every loop iteration: microseconds when healthy; a manager that does not read for
# this long is wedged or gone, and waiting longer would only stall vsup's own loop.
SEND_TIMEOUT_S = 0.25

_KEY = re.compile(r"^[A-Z][A-Z0-9_]*$")


def _address(value: str) -> str | bytes | None:
    """Map ``$NOTIFY_SOCKET`` to a ``sendto`` address; None for forms we do not speak."""
    if value.startswith("@"):
        # Abstract namespace: systemd writes the leading NUL as '@'.
        return b"\0" + value[1:].encode()
    if value.startswith("/"):
        return value
    # systemd >= 254 may hand a service "vsock:CID:PORT" (VMs); not on our targets.
    return None


class Notifier:
    """Sends sd_notify messages; every method is a no-op when not started by systemd."""

    def __init__(self, address: str | bytes | None, watchdog_usec: int | None = None) -> None:
        self._address = address
        self.enabled: bool = address is not None
        # Ping at half the deadline, as sd_watchdog_enabled(3) recommends: one late ping
        # (a slow event-loop iteration) must not be enough to kill the service.
        self.watchdog_interval_s: float | None = (
            watchdog_usec / 2 / 1_000_000 if self.enabled and watchdog_usec else None
        )
        self._sock: socket.socket | None = None
        self._failed_logged = False
        self._stalled = False  # the last send timed out: don't wait again until one succeeds

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ, pid: int | None = None) -> Notifier:
        """Build from ``NOTIFY_SOCKET``, ``WATCHDOG_USEC`` and ``WATCHDOG_PID`` (ours only)."""
        raw = environ.get("NOTIFY_SOCKET", "")
        address = _address(raw) if raw else None
        if raw and address is None:
            log.warning("sdnotify: unsupported NOTIFY_SOCKET %r, notifications disabled", raw)
        watchdog_usec: int | None = None
        wd_pid = environ.get("WATCHDOG_PID")
        # WATCHDOG_PID names the process the watchdog is meant for; an inherited one
        # (we were started by a service's child) is someone else's deadline.
        if not wd_pid or wd_pid == str(os.getpid() if pid is None else pid):
            try:
                watchdog_usec = int(environ.get("WATCHDOG_USEC", "")) or None
            except ValueError:
                watchdog_usec = None
        return cls(address, watchdog_usec)

    def notify(self, **fields: object) -> None:
        """Send ``KEY=VALUE`` lines as one datagram; never raises."""
        if not self.enabled or not fields:
            return
        lines = []
        for key, value in fields.items():
            if not _KEY.match(key):
                # A caller's bug, but raising here would take the daemon down with it.
                log.error("sdnotify: invalid key %r, message dropped", key)
                return
            # A newline inside a value would start a new assignment: flatten it.
            text = str(value).replace("\n", " ")
            lines.append(f"{key}={text}")
        self._send("\n".join(lines).encode())

    def ready(self, status: str | None = None) -> None:
        if status is None:
            self.notify(READY=1)
        else:
            self.notify(READY=1, STATUS=status)

    def status(self, text: str) -> None:
        self.notify(STATUS=text)

    def watchdog(self) -> None:
        """Ping the watchdog; a no-op unless systemd set one for this pid."""
        if self.watchdog_interval_s is not None:
            self.notify(WATCHDOG=1)

    def reloading(self) -> None:
        # systemd (>= 253 for notify-reload, harmless before) matches MONOTONIC_USEC
        # against its own clock to tell this reload from an earlier one.
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.notify(RELOADING=1, MONOTONIC_USEC=usec)

    def stopping(self) -> None:
        self.notify(STOPPING=1)

    def extend_timeout(self, usec: int) -> None:
        self.notify(EXTEND_TIMEOUT_USEC=int(usec))

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _send(self, payload: bytes) -> None:
        try:
            if self._sock is None:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                # A kernel-side bound on the wait for queue room (the socket stays blocking,
                # so no busy polling): the send returns EAGAIN after SEND_TIMEOUT_S.
                sec = int(SEND_TIMEOUT_S)
                sock.setsockopt(
                    socket.SOL_SOCKET,
                    socket.SO_SNDTIMEO,
                    struct.pack("ll", sec, int((SEND_TIMEOUT_S - sec) * 1_000_000)),
                )
                self._sock = sock
            assert self._address is not None  # noqa: S101 - narrows: notify() sends only when enabled
            flags = socket.MSG_NOSIGNAL | (socket.MSG_DONTWAIT if self._stalled else 0)
            self._sock.sendto(payload, flags, self._address)
            self._stalled = False
        except OSError as exc:
            if exc.errno == errno.EAGAIN:
                self._stalled = True
            if not self._failed_logged:
                self._failed_logged = True
                reason = "receiver queue full" if exc.errno == errno.EAGAIN else str(exc)
                log.warning("sdnotify: send to NOTIFY_SOCKET failed (%s); further failures silent", reason)
