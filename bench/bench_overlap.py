"""Clients' worst wait and failed requests during a reload: sequential (the proxy holds requests
while the old server stops and the new one loads) vs overlapped (issue 23: the new server loads
beside the old one, which keeps serving until the new one is proven), in the same run.

    flock /tmp/vsup-real.lock .venv/bin/python bench/bench_overlap.py [--quick] [--json PATH]

One vsup daemon (real vLLM 0.32 CPU, TP=2, the tiny models, [proxy] in front) serves both cases,
so they share the machine's state. A client sends one non-streaming and one streaming chat
completion per second through the proxy (httpx, no retries) from 5 s before the reload until 5 s
after it. Sequential: `vsup reload b` with `overlap = "never"`. Overlapped: the config is
rewritten with `overlap = "auto"` and `vsup reload --current` restarts b overlapped (a cold start
of the same tiny model; `reload --current` is how a running daemon takes a new config). Each row:
the reload's seconds, requests sent, failed, the slowest request (the worst wait), the median.
`quick`: one reload of each kind; otherwise two.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path.home() / ".cache" / "vsup"
VLLM_PY = CACHE / "vllm-0.32.0" / "bin" / "python"
MODELS = CACHE / "models"
ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "0|1"}
ARGS = ["--dtype", "bfloat16", "--max-model-len", "256", "-tp", "2", "--enforce-eager"]
BODY = {"model": "tiny", "messages": [{"role": "user", "content": "Count to ten."}], "max_tokens": 4}
READY_S = 300.0


def _toml(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {_toml(x)}" for k, x in v.items()) + "}"
    return json.dumps(str(v))


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Daemon:
    """`vsup run` on a config of its own, in its own session."""

    def __init__(self, work: Path) -> None:
        self.work, self.port, self.listen = work, _free_port(), _free_port()
        self.config = work / "vsup.toml"
        self.socket = work / "vsup.sock"
        self.state_dir = work / "state"
        self.proc: subprocess.Popen[bytes] | None = None

    def write(self, overlap: str) -> None:
        sections: dict[str, dict[str, Any]] = {
            "vllm": {
                "python": str(VLLM_PY),
                "model": str(MODELS / "tiny-a"),
                "served_model_name": "tiny",
                "port": self.port,
                "args": ARGS,
                "env": ENV,
                "log_file": str(self.work / "vllm.log"),
            },
            "daemon": {"state_dir": str(self.state_dir), "socket": str(self.socket)},
            "timeouts": {"start_s": 900.0, "stop_grace_s": 20.0, "first_canary_s": 60.0, "drain_s": 30.0},
            "models.a": {"model": str(MODELS / "tiny-a"), "served_model_name": "tiny"},
            "models.b": {"model": str(MODELS / "tiny-b"), "served_model_name": "tiny"},
            "proxy": {"listen": f"127.0.0.1:{self.listen}", "overlap": overlap, "hold_timeout_s": 600.0},
        }
        text = "".join(
            f"[{name}]\n" + "".join(f"{k} = {_toml(v)}\n" for k, v in table.items()) + "\n"
            for name, table in sections.items()
        )
        self.config.write_text(text)

    def vsup(self, *args: str, timeout: float = 1500) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "PYTHONPATH": str(ROOT / "supervisor")}
        return subprocess.run(
            [sys.executable, "-m", "vsup", *args, "--config", str(self.config)],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
        )

    def start(self) -> None:
        env = {**os.environ, "PYTHONPATH": str(ROOT / "supervisor")}
        env.pop("NOTIFY_SOCKET", None)
        self.err = open(self.work / "daemon.stderr", "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "vsup", "run", "--config", str(self.config)],
            stdout=self.err,
            stderr=self.err,
            env=env,
            start_new_session=True,
        )
        self.wait_ready()

    def status(self) -> dict[str, Any]:
        out = self.vsup("status", "--json", timeout=30)
        return dict(json.loads(out.stdout)) if out.returncode == 0 and out.stdout.strip() else {}

    def wait_ready(self) -> None:
        end = time.monotonic() + READY_S
        while time.monotonic() < end:
            assert self.proc is not None and self.proc.poll() is None, "vsup exited"
            if self.status().get("state") == "ready":
                return
            time.sleep(1)
        raise TimeoutError("vsup not ready")

    def events(self) -> list[dict[str, Any]]:
        p = self.state_dir / "events.jsonl"
        return [json.loads(x) for x in p.read_text().splitlines() if x.strip()] if p.exists() else []

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(120)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        if hasattr(self, "err"):
            self.err.close()
        sys.path.insert(0, str(ROOT / "supervisor"))
        from vsup import cleanup, proctree

        recs = proctree.Ledger(self.state_dir).load()
        if recs:  # a crashed daemon's trees: never left behind by a benchmark
            cleanup.cleanup(recs, grace_s=2.0)


class Load:
    """One non-streaming and one streaming completion per second, each in its own thread."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.results: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._gen = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> Load:
        self._gen.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _loop(self) -> None:
        while not self._stop.is_set():
            for stream in (False, True):
                t = threading.Thread(target=self._one, args=(stream,), daemon=True)
                t.start()
                self._threads.append(t)
            self._stop.wait(1.0)

    def _one(self, stream: bool) -> None:
        rec: dict[str, Any] = {"stream": stream, "t0": time.time(), "error": None}
        try:
            with httpx.Client(trust_env=False, timeout=660) as c:
                body = {**BODY, "stream": stream}
                with c.stream("POST", self.base + "/v1/chat/completions", json=body) as r:
                    text = r.read().decode(errors="replace")
                    if r.status_code != 200 or (stream and "[DONE]" not in text) or '"error"' in text:
                        rec["error"] = f"HTTP {r.status_code}: {text[:200]}"
        except httpx.HTTPError as e:
            rec["error"] = f"{type(e).__name__}: {e}"[:200]
        rec["t1"] = time.time()
        with self._lock:
            self.results.append(rec)

    def stop(self) -> list[dict[str, Any]]:
        self._stop.set()
        self._gen.join(5)
        for t in self._threads:
            t.join(700)
        return self.results


def one(d: Daemon, mode: str, args: list[str]) -> dict[str, Any]:
    """One reload under load; the clients' numbers for the requests begun from 5 s before it."""
    n0 = len(d.events())
    with Load(f"http://127.0.0.1:{d.listen}") as load:
        time.sleep(5)
        t0 = time.time()
        out = d.vsup("reload", *args)
        took = time.time() - t0
        time.sleep(5)
        res = load.stop()
    waits = sorted(r["t1"] - r["t0"] for r in res)
    failed = [r for r in res if r["error"]]
    evs = d.events()[n0:]
    return {
        "mode": mode,
        "reload": " ".join(args),
        "ok": out.returncode == 0,
        "reload_s": round(took, 1),
        "overlapped": any(e["event"] == "overlap_switch" for e in evs),
        "fallback": next((e["reason"] for e in evs if e["event"] == "overlap_fallback"), None),
        "requests": len(res),
        "failed": len(failed),
        "worst_wait_s": round(waits[-1], 2) if waits else None,
        "median_s": round(statistics.median(waits), 2) if waits else None,
        "held": sum(e.get("released", 0) for e in evs if e["event"] == "proxy_release"),
        "errors": [r["error"] for r in failed[:3]],
    }


def run(quick: bool) -> list[dict[str, Any]]:
    """Sequential and overlapped reloads under the same client load, one daemon; a row each."""
    rows: list[dict[str, Any]] = []
    # under /tmp: short paths for vLLM's ipc sockets (a long TMPDIR passes 107 bytes)
    with tempfile.TemporaryDirectory(prefix="bench-overlap-", dir="/tmp") as tmp:
        d = Daemon(Path(tmp))
        d.write("never")
        try:
            d.start()
            for i in range(1 if quick else 2):
                d.write("never")
                rows.append(one(d, "sequential", ["b"] if i == 0 else ["a"]))
                d.wait_ready()
                d.write("auto")
                rows.append(one(d, "overlapped", ["--current"]))
                d.wait_ready()
        finally:
            d.stop()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="one reload of each kind (else two)")
    ap.add_argument("--json", type=Path, help="also write the rows here")
    a = ap.parse_args()
    rows = run(a.quick)
    cols = (
        "mode",
        "reload",
        "ok",
        "reload_s",
        "overlapped",
        "requests",
        "failed",
        "worst_wait_s",
        "median_s",
    )
    print(" | ".join(cols))
    for r in rows:
        print(" | ".join(str(r[c]) for c in cols))
        if r["fallback"] or r["errors"]:
            print(f"    fallback: {r['fallback']}; errors: {r['errors']}")
    if a.json:
        a.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
