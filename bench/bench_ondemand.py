"""Time to the first token of a request that arrives at an off-loaded server (vsup with [proxy]
idle_unload_s: the request is held, the model loads, the canary proves it, the request goes out)
next to a bare cold start of the same model in the same run (launch vLLM, send the same streaming
request every 0.25 s until one streams its first token). Issue 16's goal: <= 1.05x.

    flock /tmp/vsup-real.lock .venv/bin/python bench/bench_ondemand.py [--reps 3]

Both clocks start at the moment the load is asked for (the bare launch; the request sent to
the proxy) and stop at the first SSE data chunk with content. Prints a table; `--json PATH`
also writes the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
import procs
from episode import port_in_use
from supervisors import VLLM_ENV, Vsup, VsupProxy, _toml, vllm_argv

IDLE_S = 5.0
BODY = {"messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 4, "stream": True}


def first_token(base: str, model: str, timeout: float) -> float | None:
    """One streaming chat completion: the time its first content chunk arrived, or None."""
    try:
        with (
            httpx.Client(trust_env=False, timeout=timeout) as c,
            c.stream("POST", base + "/v1/chat/completions", json={**BODY, "model": model}) as r,
        ):
            if r.status_code != 200:
                return None
            for line in r.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]" and '"content"' in line:
                    return time.time()
    except httpx.HTTPError:
        return None
    return None


class IdleVsup(Vsup):
    """vsup with a proxy that off-loads after IDLE_S without a request."""

    def __init__(self, workdir: Path, port: int, listen: int) -> None:
        super().__init__(workdir, port)
        self.listen = listen

    def write_config(self) -> None:
        super().write_config()
        proxy = {"listen": f"127.0.0.1:{self.listen}", "idle_unload_s": IDLE_S}
        extra = "\n[proxy]\n" + "".join(f"{k} = {_toml(v)}\n" for k, v in proxy.items())
        with open(self.dir / "vsup.toml", "a") as f:
            f.write(extra)


def bare(work: Path, port: int, reps: int) -> list[float]:
    work.mkdir(parents=True, exist_ok=True)
    logf = work / "vllm.log"
    reg = procs.Registry(port, [logf]).start()
    out: list[float] = []
    base = f"http://127.0.0.1:{port}"
    try:
        for i in range(reps):
            with open(logf, "ab") as f:
                t0 = time.time()
                p = subprocess.Popen(
                    vllm_argv("tiny-a", port),
                    stdin=subprocess.DEVNULL,
                    stdout=f,
                    stderr=subprocess.STDOUT,
                    env={**os.environ, **VLLM_ENV},
                    start_new_session=True,
                )
            t1 = None
            while t1 is None and time.time() - t0 < 300 and p.poll() is None:
                t1 = first_token(base, "tiny-a", 30)
                if t1 is None:
                    time.sleep(0.25)
            if t1 is None:
                raise RuntimeError("bare vLLM did not stream a token within 300 s")
            out.append(t1 - t0)
            print(f"  bare cold start {i + 1}: first token after {t1 - t0:.1f}s", flush=True)
            reg.scan_holdings()
            tree = reg.tree_of(p.pid)
            p.send_signal(signal.SIGTERM)
            end = time.time() + 30
            while time.time() < end and tree is not None and tree.live_members():
                time.sleep(0.05)
            p.wait(10)
    finally:
        reg.scan()
        procs.kill_members([m for t in reg.trees for m in t.live_members()])
        procs.remove_objects(procs.debris(reg.trees))
        reg.stop()
    return out


def offloaded(work: Path, port: int, listen: int, reps: int) -> tuple[list[float], list[float]]:
    sup = IdleVsup(work, port, listen)
    reg = procs.Registry(port, sup.logs()).start()
    base = f"http://127.0.0.1:{listen}"
    waits: list[float] = []
    loads: list[float] = []
    try:
        sup.start()
        end = time.time() + 300
        while time.time() < end and (sup.status() or {}).get("state") != "ready":
            time.sleep(0.5)
        for i in range(reps):
            end = time.time() + 120
            while time.time() < end and (s := sup.status() or {}).get("reason") != "idle":
                time.sleep(0.25)
            if s.get("reason") != "idle":
                raise RuntimeError(f"not off-loaded: {s.get('state')} {s.get('reason')}")
            time.sleep(1.0)  # off-loaded and settled
            n = len(sup.events())
            t0 = time.time()
            t1 = first_token(base, "tiny-a", 300)
            if t1 is None:
                raise RuntimeError("the request after the off-load failed")
            waits.append(t1 - t0)
            ev = [e for e in sup.events()[n:] if e.get("event") == "loaded"]
            loads.append(ev[-1]["seconds"] if ev else float("nan"))
            print(
                f"  vsup off-loaded {i + 1}: first token after {t1 - t0:.1f}s (load {loads[-1]}s)", flush=True
            )
    finally:
        sup.shutdown()
        reg.scan()
        procs.kill_members([m for t in reg.trees for m in t.live_members()])
        procs.remove_objects(procs.debris(reg.trees))
        reg.stop()
    return waits, loads


def swap_vs_reload(work: Path, port: int, listen: int, reps: int) -> dict[str, list[float]]:
    """Time to the first token on the other model: `vsup reload` vs a request that swaps.

    One vsup with its proxy and `swap_on_request`, serving tiny-a. Each repetition: `vsup reload
    tiny-b` then a streaming request for tiny-b at the proxy (command to first token), then a
    streaming request for tiny-a at the proxy, which swaps back (request to first token)."""
    sup = VsupProxy(work, port, listen=listen, proxy={"swap_on_request": True})
    reg = procs.Registry(port, sup.logs()).start()
    base = f"http://127.0.0.1:{listen}"
    out: dict[str, list[float]] = {"reload_s": [], "swap_s": [], "swap_load_s": []}
    try:
        sup.start()
        end = time.time() + 300
        while time.time() < end and (sup.status() or {}).get("state") != "ready":
            time.sleep(0.5)
        if first_token(base, "tiny-a", 120) is None:
            raise RuntimeError("vsup with swap_on_request did not serve tiny-a")
        for i in range(reps):
            time.sleep(6.0)  # past min_resident_s's "a request arrived or ended in the last 5 s"
            t0 = time.time()
            sup.swap("tiny-b")
            t1 = first_token(base, "tiny-b", 300)
            if t1 is None:
                raise RuntimeError("tiny-b did not stream after vsup reload")
            out["reload_s"].append(t1 - t0)
            time.sleep(6.0)
            n = len(sup.events())
            t0 = time.time()
            t1 = first_token(base, "tiny-a", 300)
            if t1 is None:
                raise RuntimeError("the request for tiny-a did not swap back")
            out["swap_s"].append(t1 - t0)
            ev = [e for e in sup.events()[n:] if e.get("event") == "swapped"]
            out["swap_load_s"].append(ev[-1].get("seconds", float("nan")) if ev else float("nan"))
            print(
                f"  {i + 1}: vsup reload tiny-b to first token {out['reload_s'][-1]:.1f}s; "
                f"request for tiny-a (swap) to first token {out['swap_s'][-1]:.1f}s",
                flush=True,
            )
    finally:
        sup.shutdown()
        reg.scan()
        procs.kill_members([m for t in reg.trees for m in t.live_members()])
        procs.remove_objects(procs.debris(reg.trees))
        reg.stop()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--port", type=int, default=8041)
    ap.add_argument("--listen", type=int, default=8141)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    for p in (a.port, a.listen):
        if port_in_use(p):
            raise SystemExit(f"port {p} is in use")
    work = Path(os.environ.get("TMPDIR", "/tmp")) / f"vsup-bench-ondemand-{os.getpid()}"
    print(f"bare vLLM, {a.reps} cold starts ...", flush=True)
    cold = bare(work / "bare", a.port, a.reps)
    print(f"vsup, {a.reps} requests after an idle off-load ({IDLE_S:g} s) ...", flush=True)
    waits, loads = offloaded(work / "vsup", a.port, a.listen, a.reps)

    def row(name: str, xs: list[float]) -> str:
        return f"| {name} | {statistics.median(xs):.1f} ({min(xs):.1f}-{max(xs):.1f}, n={len(xs)}) |"

    ratio = statistics.median(waits) / statistics.median(cold)
    print("\n| time to the first token (s) | median (min-max, n) |\n| --- | --- |")
    print(row("bare vLLM cold start (launch, poll every 0.25 s)", cold))
    print(row("request arriving at vsup off-loaded (held through load + canary)", waits))
    print(row("- of which vsup's load on demand (request to ready)", loads))
    print(f"\nratio {ratio:.2f}x (goal <= 1.05x): {'met' if ratio <= 1.05 else 'missed'}")
    if a.json:
        a.json.write_text(json.dumps({"bare_s": cold, "offloaded_s": waits, "load_s": loads, "ratio": ratio}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
