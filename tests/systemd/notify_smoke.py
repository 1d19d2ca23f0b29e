"""A trivial Type=notify service for the systemd harness: READY=1 via vsup.sdnotify, then
watchdog pings at the notifier's interval for $PING_S seconds, then silence (a wedged loop)."""

import os
import time

from vsup.sdnotify import Notifier

n = Notifier.from_env()
assert n.watchdog_interval_s is not None, "systemd gave no WATCHDOG_USEC for our pid"
n.ready(f"smoke: up, watchdog every {n.watchdog_interval_s:.1f} s")
end = time.monotonic() + float(os.environ["PING_S"])
while time.monotonic() < end:
    n.watchdog()
    time.sleep(n.watchdog_interval_s)
n.status("smoke: wedged, no more pings")
time.sleep(3600)
