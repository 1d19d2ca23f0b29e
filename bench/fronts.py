"""What stands in front of each peer: HAProxy (Debian's package) with an active health check.

The best plain setup a user would give supervisord, circus or a bash loop: a load balancer in
front that stops sending to a server that fails its health check and retries a request whose
connection failed. Debian's nginx has no active health checks (`proxy_next_upstream` and
`max_fails` act on failures of real requests, and with one upstream server nginx never marks it
down), so the peers get HAProxy; `SETUP` says exactly what it has. vsup's own proxy takes this
place for vsup. One HAProxy per episode, started by the harness in its own session.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import procs

HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"
SETUP = (
    "HAProxy {version} (Debian package) in front of the server: `option httpchk GET /health`, "
    "`http-check expect status 200`, `check inter 2s fall 2 rise 1`, `retries 3`, `option redispatch`, "
    "`retry-on conn-failure empty-response`, `timeout connect 5s`, `timeout server 60s` (the clients' "
    "own timeout), `timeout client 65s`"
)

CONF = """global
  maxconn 2048
defaults
  mode http
  timeout connect 5s
  timeout client 65s
  timeout server 60s
  timeout queue 60s
  retries 3
  option redispatch
  retry-on conn-failure empty-response
frontend clients
  bind 127.0.0.1:{port}
  default_backend vllm
backend vllm
  option httpchk GET /health
  http-check expect status 200
  default-server inter 2s fall 2 rise 1
  server vllm 127.0.0.1:{upstream} check
"""


def version() -> str:
    try:
        out = subprocess.run([HAPROXY, "-v"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return "?"
    parts = out.split()
    return parts[2] if len(parts) > 2 else "?"


def setup() -> str:
    return SETUP.format(version=version())


class HAProxy:
    """One HAProxy listening on `port`, forwarding to vLLM on `upstream`."""

    name = "HAProxy"

    def __init__(self, workdir: Path, port: int, upstream: int) -> None:
        self.dir, self.port, self.upstream = workdir, port, upstream
        self.dir.mkdir(parents=True, exist_ok=True)
        self.proc: subprocess.Popen[bytes] | None = None
        self.member: procs.Member | None = None

    def start(self) -> None:
        conf = self.dir / "haproxy.cfg"
        conf.write_text(CONF.format(port=self.port, upstream=self.upstream))
        with open(self.dir / "haproxy.out", "ab") as out:
            self.proc = subprocess.Popen(
                [HAPROXY, "-db", "-f", str(conf)],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.dir,
                start_new_session=True,
            )
        st = None
        for _ in range(100):
            st = procs.read_stat(self.proc.pid)
            if st is not None:
                break
            time.sleep(0.01)
        self.member = procs.Member(self.proc.pid, st.start if st else 0, "haproxy", time.time())

    def pids(self) -> list[procs.Member]:
        return [self.member] if self.member and self.proc and self.proc.poll() is None else []

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
