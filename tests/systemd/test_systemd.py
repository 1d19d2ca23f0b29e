"""Real systemd (252, booted in private namespaces by harness.py) running our units."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import harness
from harness import Systemd

REPO = Path(__file__).resolve().parents[2]
# notify-test.service: WatchdogSec=2s, pings for PING_S=6 s, then none.
SMOKE_WATCHDOG_S = 2.0
SMOKE_PING_S = 6.0


def wait_for(
    what: str, predicate: Callable[[], bool], timeout: float, sd: Systemd, step: float = 0.2
) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}\n{sd.logs()}")
        time.sleep(step)


@pytest.fixture(scope="module")
def sd() -> Iterator[Systemd]:
    with harness.booted({"vsup.service": (REPO / "deploy" / "vsup.service").read_text()}) as booted:
        yield booted


def test_boot_and_teardown_leave_the_host_unchanged() -> None:
    """A boot/teardown cycle leaves no cgroup, mount option or sysctl of the host changed."""
    before = harness.host_fingerprint()
    with harness.booted() as booted:
        assert booted.run("systemctl is-system-running", check=False).stdout.strip() == "running"
        cgroup = booted.run("cat /proc/1/cgroup").stdout
    name = next(line.split(":")[2].split("/")[1] for line in cgroup.splitlines() if ":name=systemd:" in line)
    assert name.startswith("vsup-systemd-test-")
    assert not any((harness.CGROUP_ROOT / h / name).exists() for h in harness.CGROUP_HIERARCHIES)
    assert harness.host_changes(before, harness.host_fingerprint()) == []


def test_only_harness_units_exist(sd: Systemd) -> None:
    """The booted systemd knows none of the host's services: only the harness's unit files."""
    listed = sd.run("systemctl list-unit-files --no-legend --type=service").stdout.split()
    services = {w for w in listed if w.endswith(".service")}
    assert services == {"notify-test.service", "systemd-journald.service", "vsup.service"}


def test_shipped_unit_loads_without_warnings(sd: Systemd) -> None:
    """deploy/vsup.service loads in a live systemd 252 with no parse warning in the journal."""
    assert sd.show("vsup.service", "LoadState") == "loaded"
    assert sd.show("vsup.service", "Type") == "notify"
    assert sd.show("vsup.service", "KillMode") == "mixed"
    assert sd.show("vsup.service", "NotifyAccess") == "main"
    assert sd.show("vsup.service", "TimeoutStopUSec") == "2min"
    journal = sd.run("journalctl --no-pager -o cat _PID=1").stdout
    assert [line for line in journal.splitlines() if "vsup.service" in line] == []


def test_notify_unit_is_active_with_its_status(sd: Systemd) -> None:
    """A Type=notify unit using vsup.sdnotify becomes active only on READY=1 and shows STATUS=."""
    sd.run("systemctl start notify-test.service")  # returns once READY=1 arrived
    try:
        assert sd.show("notify-test.service", "ActiveState") == "active"
        assert sd.show("notify-test.service", "StatusText") == "smoke: up, watchdog every 1.0 s"
        assert 'Status: "smoke: up' in sd.run("systemctl status --no-pager notify-test.service").stdout
    finally:
        sd.run("systemctl stop notify-test.service; systemctl reset-failed notify-test.service", check=False)


def test_watchdog_pings_keep_unit_alive_and_silence_kills_it(sd: Systemd) -> None:
    """Pings at half of WatchdogSec keep the unit alive for 6 s; 2 s after they stop systemd aborts it."""
    sd.run("systemctl start notify-test.service")
    try:
        wait_for(
            "watchdog kill",
            lambda: sd.show("notify-test.service", "ActiveState") == "failed",
            SMOKE_PING_S + 4 * SMOKE_WATCHDOG_S + 5,
            sd,
        )
        assert sd.show("notify-test.service", "Result") == "watchdog"
        assert sd.show("notify-test.service", "StatusText") == "smoke: wedged, no more pings"
        start = int(sd.show("notify-test.service", "ExecMainStartTimestampMonotonic"))
        end = int(sd.show("notify-test.service", "ExecMainExitTimestampMonotonic"))
        lived_s = (end - start) / 1e6
        # Alive through the pings (3x longer than WatchdogSec), dead within one deadline after.
        assert SMOKE_PING_S <= lived_s <= SMOKE_PING_S + SMOKE_WATCHDOG_S + 1.0
    finally:
        sd.run("systemctl stop notify-test.service; systemctl reset-failed notify-test.service", check=False)
