"""Tests for vsup.sdnotify: exact datagrams on a socket the test owns."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from vsup import sdnotify
from vsup.sdnotify import Notifier


class Receiver:
    """A datagram socket standing in for systemd's notify socket."""

    def __init__(self, sock: socket.socket, env_value: str) -> None:
        self.sock = sock
        self.env_value = env_value

    def recv(self, timeout: float = 2.0) -> str:
        self.sock.settimeout(timeout)
        return self.sock.recv(4096).decode()

    def assert_empty(self) -> None:
        self.sock.setblocking(False)
        with pytest.raises(BlockingIOError):
            self.sock.recv(4096)


@pytest.fixture
def path_receiver(tmp_path: Path) -> Iterator[Receiver]:
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        sock.bind(str(path))
        yield Receiver(sock, str(path))
    finally:
        sock.close()


@pytest.fixture
def abstract_receiver() -> Iterator[Receiver]:
    name = f"vsup-test-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        sock.bind(b"\0" + name.encode())
        yield Receiver(sock, "@" + name)
    finally:
        sock.close()


def notifier_for(rx: Receiver, **extra: str) -> Notifier:
    return Notifier.from_env({"NOTIFY_SOCKET": rx.env_value, **extra})


def test_ready_with_status_is_one_datagram_on_path_socket(path_receiver: Receiver) -> None:
    """READY=1 and STATUS= arrive together in one datagram on a path socket."""
    n = notifier_for(path_receiver)
    n.ready("ready: tiny-a, 2 workers, 0 restarts")
    assert path_receiver.recv() == "READY=1\nSTATUS=ready: tiny-a, 2 workers, 0 restarts"
    n.close()


def test_abstract_socket_is_reached_through_at_sign(abstract_receiver: Receiver) -> None:
    """An '@name' NOTIFY_SOCKET reaches the abstract-namespace socket of that name."""
    n = notifier_for(abstract_receiver)
    n.ready()
    assert abstract_receiver.recv() == "READY=1"
    n.close()


def test_each_method_sends_its_exact_message(path_receiver: Receiver) -> None:
    """status, stopping, extend_timeout and watchdog send exactly their documented fields."""
    n = notifier_for(path_receiver, WATCHDOG_USEC="4000000")
    n.status("starting: loading tiny-a")
    n.extend_timeout(90_000_000)
    n.watchdog()
    n.stopping()
    got = [path_receiver.recv() for _ in range(4)]
    assert got == [
        "STATUS=starting: loading tiny-a",
        "EXTEND_TIMEOUT_USEC=90000000",
        "WATCHDOG=1",
        "STOPPING=1",
    ]
    n.close()


def test_reloading_carries_current_monotonic_usec(path_receiver: Receiver) -> None:
    """RELOADING=1 comes with MONOTONIC_USEC read from CLOCK_MONOTONIC at send time."""
    n = notifier_for(path_receiver)
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    n.reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    first, second = path_receiver.recv().split("\n")
    assert first == "RELOADING=1"
    key, value = second.split("=")
    assert key == "MONOTONIC_USEC"
    assert before <= int(value) <= after
    n.close()


def test_newline_in_status_cannot_inject_a_field(path_receiver: Receiver) -> None:
    """A newline inside a value is flattened so it cannot smuggle in READY=1."""
    n = notifier_for(path_receiver)
    n.status("model failed\nREADY=1")
    assert path_receiver.recv() == "STATUS=model failed READY=1"
    n.close()


def test_unset_notify_socket_gives_a_silent_noop() -> None:
    """Without NOTIFY_SOCKET the notifier is disabled and every call does nothing."""
    n = Notifier.from_env({"WATCHDOG_USEC": "1000000"})
    assert not n.enabled
    assert n.watchdog_interval_s is None
    n.ready("x")
    n.watchdog()
    n.reloading()
    n.stopping()
    n.close()


def test_watchdog_interval_is_half_of_watchdog_usec(path_receiver: Receiver) -> None:
    """WATCHDOG_USEC=10 s gives a ping interval of 5 s."""
    n = notifier_for(path_receiver, WATCHDOG_USEC="10000000")
    assert n.watchdog_interval_s == 5.0


def test_watchdog_pid_of_another_process_disables_watchdog(path_receiver: Receiver) -> None:
    """A WATCHDOG_PID naming another pid is not our deadline: no interval, no pings."""
    n = notifier_for(path_receiver, WATCHDOG_USEC="10000000", WATCHDOG_PID=str(os.getpid() + 1))
    assert n.watchdog_interval_s is None
    n.watchdog()
    n.status("still sent")
    assert path_receiver.recv() == "STATUS=still sent"
    n.close()


def test_watchdog_pid_matching_ours_keeps_watchdog(path_receiver: Receiver) -> None:
    """A WATCHDOG_PID equal to our pid keeps the watchdog enabled."""
    n = notifier_for(path_receiver, WATCHDOG_USEC="3000000", WATCHDOG_PID=str(os.getpid()))
    assert n.watchdog_interval_s == 1.5


def test_from_env_leaves_the_environment_alone(path_receiver: Receiver) -> None:
    """from_env reads NOTIFY_SOCKET and WATCHDOG_* without removing them."""
    env = {"NOTIFY_SOCKET": path_receiver.env_value, "WATCHDOG_USEC": "1000", "WATCHDOG_PID": "1"}
    snapshot = dict(env)
    Notifier.from_env(env)
    assert env == snapshot


def test_send_failure_never_raises_and_logs_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A socket that does not exist costs one warning, however many messages fail."""
    n = Notifier.from_env({"NOTIFY_SOCKET": str(tmp_path / "nobody-listens")})
    with caplog.at_level(logging.WARNING, logger="vsup.sdnotify"):
        n.ready()
        n.status("a")
        n.stopping()
    assert len([r for r in caplog.records if "failed" in r.getMessage()]) == 1
    n.close()


def test_receiver_that_never_reads_costs_one_timeout(tmp_path: Path) -> None:
    """A receiver that never reads stalls the sender once (SEND_TIMEOUT_S), not once per message."""
    path = tmp_path / "slow.sock"
    rx = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        rx.bind(str(path))
        n = Notifier.from_env({"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "1000000"})
        t0 = time.monotonic()
        for _ in range(1000):  # far beyond net.unix.max_dgram_qlen
            n.watchdog()
        assert time.monotonic() - t0 < 2 * sdnotify.SEND_TIMEOUT_S + 1.0
        n.close()
    finally:
        rx.close()


def test_burst_beyond_queue_length_is_delivered_to_a_reader(path_receiver: Receiver) -> None:
    """A burst longer than the receiver's queue (a reload's dozen messages) loses nothing while it reads."""
    got: list[str] = []

    def read() -> None:
        path_receiver.sock.settimeout(5)
        while len(got) < 200:
            got.append(path_receiver.sock.recv(4096).decode())
            time.sleep(0.001)  # a reader slower than the sender: the queue fills

    reader = threading.Thread(target=read)
    reader.start()
    n = notifier_for(path_receiver)
    for i in range(199):
        n.status(f"step {i}")
    n.ready("done")
    reader.join(10)
    assert got == [f"STATUS=step {i}" for i in range(199)] + ["READY=1\nSTATUS=done"]
    n.close()


def test_unsupported_socket_form_disables_notifier() -> None:
    """A vsock: NOTIFY_SOCKET (systemd >= 254 in VMs) disables notifications instead of failing."""
    n = Notifier.from_env({"NOTIFY_SOCKET": "vsock:2:1234"})
    assert not n.enabled
    n.ready()
