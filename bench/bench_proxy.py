#!/usr/bin/env python3
"""The proxy's overhead (issue 15): a fast fake upstream reached directly, through vsup's proxy,
and through nginx (Debian's package, `proxy_buffering off`, upstream keep-alive), in one run.

The proxy (or nginx, one worker) is pinned to CPU 0 with `taskset`; the upstream and the load
generator (`wrk`, Debian's package) share CPU 1. Measured per path:
- added latency p50/p99: wrk with one connection, one request at a time (minus the direct row);
- requests/s: wrk, 32 connections;
- SSE chunks/s: wrk on a stream of 200 chunks per request, 8 connections (requests/s x 200);
- time to first token: 200 sequential streams from Python, first chunk's arrival;
- idle cost: the proxy process's CPU over 30 s with nothing to do (its own process here; inside
  vsup it shares the daemon's loop).
Goals (issue 15): added p50 <= 1 ms; >= 2000 requests/s and >= 50,000 SSE chunks/s on one core;
idle <= 0.05 % of a core. Prints a Markdown table. Needs: apt-get install wrk nginx-light.

  .venv/bin/python bench/bench_proxy.py [--seconds 10]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHUNKS = 200
BODY = b'{"id":"x","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":"ok"}}]}'
CHUNK = b'data: {"choices":[{"index":0,"delta":{"content":"tok "}}]}\n\n'


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ---- the processes: upstream, proxy ------------------------------------------------------------


def serve_upstream(port: int) -> None:
    from aiohttp import web

    async def chat(request: web.Request) -> web.StreamResponse:
        await request.read()
        return web.Response(body=BODY, content_type="application/json")

    async def stream(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        try:
            await resp.prepare(request)
            for _ in range(CHUNKS):
                await resp.write(CHUNK)
            await resp.write(b"data: [DONE]\n\n")
        except ConnectionResetError:
            pass  # wrk closes its connections mid-stream when its time is up
        return resp

    app = web.Application()
    app.router.add_route("*", "/v1/chat/completions", chat)
    app.router.add_route("*", "/stream", stream)
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None, handle_signals=True)


def serve_proxy(port: int, upstream: int) -> None:
    sys.path.insert(0, str(ROOT / "supervisor"))
    from vsup.config import ProxyConfig
    from vsup.gate import Gate, Route
    from vsup.proxy import Proxy

    async def main() -> None:
        gate = Gate(Route(state="ready", upstream=("127.0.0.1", upstream), gen=1))
        p = Proxy(
            ProxyConfig(listen=f"127.0.0.1:{port}"), gate, post=lambda o: None, emit=lambda n, **f: None
        )
        await p.start()
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()
        await p.stop()

    asyncio.run(main())


NGINX_CONF = """
worker_processes 1;
daemon off;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {tmp}/body; proxy_temp_path {tmp}/proxy; fastcgi_temp_path {tmp}/fcgi;
  uwsgi_temp_path {tmp}/uwsgi; scgi_temp_path {tmp}/scgi;
  upstream up {{ server 127.0.0.1:{upstream}; keepalive 64; }}
  server {{
    listen 127.0.0.1:{port};
    location / {{
      proxy_pass http://up;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffering off;
    }}
  }}
}}
"""


def wait_port(port: int, timeout: float = 20) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise SystemExit(f"nothing listens on {port}")


# ---- measurements ------------------------------------------------------------------------------


def wrk(port: int, path: str, conns: int, seconds: int) -> dict[str, float]:
    out = subprocess.run(
        [
            "taskset",
            "-c",
            "1",
            "wrk",
            "-t1",
            f"-c{conns}",
            f"-d{seconds}s",
            "--latency",
            f"http://127.0.0.1:{port}{path}",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]  # wrk always prints it
    lat = {}
    for pct in ("50", "99"):
        m = re.search(rf"^\s+{pct}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        if m:
            lat[pct] = float(m.group(1)) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[m.group(2)]
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)|Socket errors", out)
    return {
        "rps": rps,
        "p50_ms": lat.get("50", float("nan")),
        "p99_ms": lat.get("99", float("nan")),
        "errors": bool(errors),
    }


def ttft(port: int, n: int = 200) -> float:
    """Median seconds from sending a stream request to its first chunk (keep-alive connection)."""
    import http.client

    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        c.request("GET", "/stream")
        r = c.getresponse()
        r.read1(1)
        times.append(time.perf_counter() - t0)
        r.read()
    c.close()
    return statistics.median(times)


def cpu_s(pid: int) -> float:
    f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--idle-seconds", type=int, default=30)
    ap.add_argument("--_upstream", type=int)
    ap.add_argument("--_proxy", nargs=2, type=int)
    a = ap.parse_args()
    if a._upstream:
        serve_upstream(a._upstream)
        return 0
    if a._proxy:
        serve_proxy(*a._proxy)
        return 0
    for tool in ("wrk", "nginx", "taskset"):
        if not shutil.which(tool) and not Path(f"/usr/sbin/{tool}").exists():
            raise SystemExit(f"{tool} missing: apt-get install wrk nginx-light")
    up, px, ng = free_port(), free_port(), free_port()
    tmp = Path(tempfile.mkdtemp(prefix="vsup-bench-proxy-"))
    (tmp / "nginx.conf").write_text(NGINX_CONF.format(tmp=tmp, port=ng, upstream=up))
    me = [sys.executable, __file__]
    procs = [
        subprocess.Popen(["taskset", "-c", "1", *me, "--_upstream", str(up)]),
        subprocess.Popen(["taskset", "-c", "0", *me, "--_proxy", str(px), str(up)]),
        subprocess.Popen(
            ["taskset", "-c", "0", shutil.which("nginx") or "/usr/sbin/nginx", "-c", str(tmp / "nginx.conf")]
        ),
    ]
    rows = []
    try:
        for port in (up, px, ng):
            wait_port(port)
        for name, port in (("direct", up), ("vsup proxy", px), ("nginx", ng)):
            wrk(port, "/v1/chat/completions", 4, 2)  # warm-up
            one = wrk(port, "/v1/chat/completions", 1, a.seconds)
            many = wrk(port, "/v1/chat/completions", 32, a.seconds)
            sse = wrk(port, "/stream", 8, a.seconds)
            rows.append((name, one, many, sse, ttft(port)))
        pid = procs[1].pid
        c0 = cpu_s(pid)
        time.sleep(a.idle_seconds)
        idle = (cpu_s(pid) - c0) / a.idle_seconds * 100
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(tmp, ignore_errors=True)
    base = rows[0]
    print(
        f"\nProxy overhead, {a.seconds} s per measurement; proxy/nginx on CPU 0, upstream and wrk on CPU 1\n"
    )
    print(
        "| path | p50 (ms) | p99 (ms) | added p50 / p99 (ms) | requests/s (32 conns) | SSE chunks/s | time to first chunk (ms) |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, one, many, sse, t in rows:
        added = (
            "—"
            if name == "direct"
            else f"{one['p50_ms'] - base[1]['p50_ms']:+.3f} / {one['p99_ms'] - base[1]['p99_ms']:+.3f}"
        )
        err = " (errors)" if one["errors"] or many["errors"] or sse["errors"] else ""
        print(
            f"| {name}{err} | {one['p50_ms']:.3f} | {one['p99_ms']:.3f} | {added} | {many['rps']:,.0f} | "
            f"{sse['rps'] * CHUNKS:,.0f} | {t * 1000:.2f} |"
        )
    print(f"\nvsup proxy idle: {idle:.3f} % of a core over {a.idle_seconds} s (goal <= 0.05 %)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
