"""Issue 17's numbers on the real TP=2 tiny-model server (vLLM 0.32 CPU build) under vsup with its
shipped defaults and the proxy on:

- worker TP1 SIGSTOPped while idle, and while streams flow through the proxy: seconds from the
  SIGSTOP to vsup's first detection, to its teardown of the hung tree (the stack dump before it
  included), and to the first completion served again;
- a saturated, progressing server (long streamed generations back to back, more than the engine
  runs at once) for 5 minutes (1 with --quick): teardowns (false ones: there is no fault) and
  time spent `unhealthy`;
- vsup's own idle CPU (utime + stime of its process over 60 s, 30 s with --quick, ready server,
  no client).

    flock /tmp/vsup-real.lock .venv/bin/python bench/bench_hang.py [--quick] [--json PATH]

Its work directory (events, vLLM's log, incidents) is removed at the end unless BENCH_HANG_KEEP
is set. Self-contained (only the standard library and httpx): `run(quick) -> list[dict]` returns one row a
measurement, for the benchmark harness to call; `__main__` prints them as a table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from toml_writer import write_config
from vsup.starting import REFRESH_AFTER_READY_S

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("VSUP_CACHE", Path.home() / ".cache" / "vsup"))
VLLM_PY = CACHE / "vllm-0.32.0" / "bin" / "python"
MODELS = CACHE / "models"
VSUP_PY = ROOT / ".venv" / "bin" / "python"
VLLM_ARGS = ["--dtype", "bfloat16", "--max-model-len", "256", "-tp", "2", "--enforce-eager"]
VLLM_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "0|1"}
MODEL = "tiny-a"
READY_S = 300.0
# The tiny model's context is 256 tokens: a long generation is the most that fits a short prompt.
LONG_TOKENS = 160
SATURATING_STREAMS = 12  # more than the 2-core CPU engine steps at full speed at once


def _free_port(lo: int, hi: int) -> int:
    for port in range(lo, hi):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {lo}-{hi}")


def _ts(e: dict[str, Any]) -> float:
    return datetime.fromisoformat(str(e["ts"]).replace("Z", "+00:00")).timestamp()


class VsupRun:
    """One `vsup run` with the shipped defaults (paths, port, the proxy's listen address aside)."""

    def __init__(self, work: Path) -> None:
        self.dir = work
        work.mkdir(parents=True, exist_ok=True)
        self.port = _free_port(8000, 8049)
        self.listen = _free_port(8150, 8199)
        self.base = f"http://127.0.0.1:{self.listen}"
        cfg: dict[str, dict[str, Any]] = {
            "vllm": {
                "python": str(VLLM_PY),
                "model": str(MODELS / MODEL),
                "served_model_name": MODEL,
                "port": self.port,
                "args": VLLM_ARGS,
                "env": VLLM_ENV,
                "log_file": str(work / "vllm.log"),
            },
            "daemon": {"state_dir": str(work / "state"), "socket": str(work / "run" / "vsup.sock")},
            "proxy": {"listen": f"127.0.0.1:{self.listen}"},
        }
        self.config = write_config(work / "vsup.toml", cfg)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> VsupRun:
        env = {**os.environ, "PYTHONPATH": str(ROOT / "supervisor")}
        env.pop("NOTIFY_SOCKET", None)
        with open(self.dir / "vsup.stderr", "ab") as err:
            self.proc = subprocess.Popen(
                [str(VSUP_PY), "-m", "vsup", "run", "--config", str(self.config)],
                stdout=err,
                stderr=err,
                env=env,
                start_new_session=True,
            )
        return self

    def events(self) -> list[dict[str, Any]]:
        try:
            lines = (self.dir / "state" / "events.jsonl").read_text().splitlines()
        except OSError:
            return []
        out = []
        for line in lines:
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
        return out

    def wait_event(self, pred: Any, after: int, timeout: float) -> dict[str, Any] | None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            for e in self.events()[after:]:
                if pred(e):
                    return e
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"vsup exited {self.proc.returncode}")
            time.sleep(0.2)
        return None

    def wait_ready(self, after: int = 0) -> dict[str, Any]:
        e = self.wait_event(lambda e: e["event"] == "ready", after, READY_S)
        if e is None:
            raise RuntimeError(f"not ready within {READY_S:g}s")
        return e

    def worker_pid(self, rank: int) -> int:
        """Worker TP`rank` of the serving tree: the VLLM::Worker_TP<rank> in the API server's session."""
        spawned = [e for e in self.events() if e["event"] == "spawned"]
        sid = os.getsid(int(spawned[-1]["pid"]))
        for d in Path("/proc").iterdir():
            if not d.name.isdigit():
                continue
            try:
                cmd = (d / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
                if cmd.startswith(f"VLLM::Worker_TP{rank}") and os.getsid(int(d.name)) == sid:
                    return int(d.name)
            except OSError:
                continue
        raise RuntimeError(f"no VLLM::Worker_TP{rank} in session {sid}")

    def close(self) -> None:
        p = self.proc
        if p is None or p.poll() is not None:
            return
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(90)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(10)


def chat(
    base: str, max_tokens: int, timeout: float, stream: bool = True, on_chunk: Any = None
) -> tuple[bool, int]:
    """One chat completion; (ok, chunks received)."""
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Count from one to one hundred."}],
        "max_tokens": max_tokens,
        "stream": stream,
        "ignore_eos": True,
    }
    chunks = 0
    try:
        with httpx.Client(trust_env=False, timeout=timeout) as c:
            if not stream:
                return c.post(base + "/v1/chat/completions", json=body).status_code == 200, 0
            with c.stream("POST", base + "/v1/chat/completions", json=body) as r:
                if r.status_code != 200:
                    return False, 0
                for line in r.iter_lines():
                    if line.startswith("data: ") and line != "data: [DONE]":
                        chunks += 1
                        if on_chunk is not None:
                            on_chunk()
                        if '"error"' in line:
                            return False, chunks
                return True, chunks
    except httpx.HTTPError:
        return False, chunks


class Load:
    """`streams` clients, each streaming `max_tokens`-token completions back to back."""

    def __init__(self, base: str, streams: int, max_tokens: int) -> None:
        self.base, self.max_tokens = base, max_tokens
        self.stop = threading.Event()
        self.done = self.failed = self.chunks = 0
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._loop, daemon=True) for _ in range(streams)]

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(200)

    def _loop(self) -> None:
        while not self.stop.is_set():
            ok, _ = chat(self.base, self.max_tokens, 180.0, on_chunk=self._chunk)
            with self.lock:
                self.done += ok
                self.failed += not ok

    def _chunk(self) -> None:
        with self.lock:
            self.chunks += 1


def sigstop(run: VsupRun, traffic: bool) -> dict[str, Any]:
    """SIGSTOP worker TP1 (idle, or under streams through the proxy); when vsup saw, tore down, served again."""
    n = len(run.events())
    tp1 = run.worker_pid(1)
    load = Load(run.base, 2, 64) if traffic else None
    try:
        if load is not None:
            load.__enter__()
            end = time.monotonic() + 60  # tokens flowing: a just-restarted server is slow to its first
            while load.chunks < 20 and time.monotonic() < end:
                time.sleep(0.1)
            seen = load.chunks
            while load.chunks == seen and time.monotonic() < end:
                time.sleep(0.05)
        t0 = time.time()
        os.kill(tp1, signal.SIGSTOP)
        teardown = run.wait_event(lambda e: e["event"] == "teardown", n, 180)
        if teardown is None:
            raise RuntimeError("no teardown within 180 s of the SIGSTOP")
        served = None
        while served is None and time.time() - t0 < READY_S:
            if chat(run.base, 4, 60.0, stream=False)[0]:
                served = time.time()
        evs = run.events()[n:]
    finally:
        if load is not None:
            load.__exit__()
        try:
            os.kill(tp1, signal.SIGCONT)  # never leave a stopped process (the teardown killed it)
        except ProcessLookupError:
            pass
    det = next((e for e in evs if e["event"] == "detection"), None)
    stop = next((e for e in evs if e["event"] == "state" and e["state"] == "stopping"), None)
    stk = next((e for e in evs if e["event"] == "stacks"), None)
    return {
        "scenario": f"worker TP1 SIGSTOP, {'streams through the proxy' if traffic else 'idle'}",
        "detected_s": round(_ts(det) - t0, 1) if det else None,
        "detected_by": det.get("kind") if det else None,
        "teardown_s": round(_ts(teardown) - t0, 1),
        "goal_s": 10.0 if traffic else 15.0,
        "reason": (stop or {}).get("reason"),
        "stacks_in_incident": bool(stk and stk.get("complete"))
        or "stacks:" in str((stop or {}).get("reason")),
        "serves_again_s": round(served - t0, 1) if served else None,
    }


def saturation(run: VsupRun, seconds: float) -> dict[str, Any]:
    """Long streamed generations keep the engine saturated: any teardown is a false one."""
    n = len(run.events())
    t0 = time.time()
    with Load(run.base, SATURATING_STREAMS, LONG_TOKENS) as load:
        time.sleep(seconds)
    evs = run.events()[n:]
    teardowns = [e for e in evs if e["event"] == "teardown"]
    unhealthy, since = 0.0, None
    longest = 0.0
    for e in evs:
        if e["event"] != "state":
            continue
        if e["state"] == "unhealthy" and since is None:
            since = _ts(e)
        elif e["state"] != "unhealthy" and since is not None:
            unhealthy += _ts(e) - since
            longest = max(longest, _ts(e) - since)
            since = None
    if since is not None:
        unhealthy += time.time() - since
        longest = max(longest, time.time() - since)
    return {
        "scenario": f"saturated ({SATURATING_STREAMS} streams of {LONG_TOKENS} tokens back to back)",
        "seconds": round(time.time() - t0),
        "completions": load.done,
        "failed": load.failed,
        "tokens_per_s": round(load.chunks / max(1e-9, time.time() - t0), 1),
        "false_teardowns": len(teardowns),
        "checks": sum(1 for e in evs if e["event"] == "hang_check"),
        "canaries": sum(1 for e in evs if e["event"] == "probe" and e.get("probe") == "canary"),
        "unhealthy_s": round(unhealthy, 1),
        "longest_unhealthy_s": round(longest, 1),
    }


def idle_cpu(run: VsupRun, seconds: float) -> dict[str, Any]:
    """vsup's own CPU (its process only) over `seconds` while ready and idle."""
    assert run.proc is not None
    pid = run.proc.pid
    tick = os.sysconf("SC_CLK_TCK")

    def cpu() -> float:
        f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(f[11]) + int(f[12])) / tick

    c0, t0 = cpu(), time.monotonic()
    time.sleep(seconds)
    dt = time.monotonic() - t0
    return {
        "scenario": "vsup idle CPU (ready server, no client)",
        "seconds": round(dt),
        "cpu_pct": round((cpu() - c0) / dt * 100, 3),
        "goal_pct": 0.1,
    }


def run(quick: bool) -> list[dict[str, Any]]:
    """Every measurement on one vsup (one cold start, plus the restarts the faults cause)."""
    work = Path(os.environ.get("TMPDIR", "/tmp")) / f"bench-hang-{os.getpid()}"
    r = VsupRun(work).start()
    rows: list[dict[str, Any]] = []
    try:
        r.wait_ready()
        time.sleep(REFRESH_AFTER_READY_S + 15)  # past the refresher's 2 s looks at a forming tree
        rows.append(idle_cpu(r, 30 if quick else 60))
        rows.append(saturation(r, 60 if quick else 300))
        for traffic in (False, True):
            n = len(r.events())
            rows.append(sigstop(r, traffic))
            r.wait_ready(n)
            time.sleep(5)
    finally:
        r.close()
        if not os.environ.get("BENCH_HANG_KEEP"):  # its events, log and incidents, for a look
            shutil.rmtree(work, ignore_errors=True)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="30 s idle CPU, 60 s saturation")
    ap.add_argument("--json", type=Path, help="also write the rows here")
    a = ap.parse_args()
    rows = run(a.quick)
    for row in rows:
        print(" | ".join(f"{k}={v}" for k, v in row.items()))
    if a.json:
        a.json.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
