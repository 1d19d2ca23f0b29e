#!/usr/bin/env python3
"""`make demo`: vsup supervising a real TP=2 vLLM (CPU build) on the tiny model, with a reload.

Starts `vsup run` in the foreground on a demo config (.demo/), prints its events as they
happen, sends a chat completion through the served model, reloads to tiny-b and completes
again. Then it keeps serving until Ctrl-C (or, without a terminal, stops by itself). Ctrl-C
stops the daemon, which tears the tree down and cleans up; the demo then checks that nothing
of its trees is left (processes, /dev/shm, /tmp/vllm_dist_*).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / ".demo"
CACHE = Path(os.environ.get("VSUP_CACHE", Path.home() / ".cache" / "vsup"))
VLLM_PY = CACHE / "vllm-0.32.0" / "bin" / "python"
MODELS = CACHE / "models"
VSUP = [str(ROOT / ".venv" / "bin" / "vsup")]


def free_port(start: int = 8000) -> int:
    for port in range(start, start + 100):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
                return port
            except OSError:
                continue
    raise SystemExit("no free port in 8000-8099")


def write_config(port: int) -> Path:
    DEMO.mkdir(exist_ok=True)
    cfg = DEMO / "vsup.toml"
    cfg.write_text(f"""\
# Written by scripts/demo.py: vsup supervising the tiny random-weight Llama, TP=2 on 2 CPU cores.
[vllm]
python = "{VLLM_PY}"
model = "{MODELS / "tiny-a"}"
served_model_name = "tiny-a"
args = ["--dtype", "bfloat16", "--max-model-len", "256", "-tp", "2", "--enforce-eager"]
env = {{ VLLM_CPU_KVCACHE_SPACE = "1", VLLM_CPU_OMP_THREADS_BIND = "0|1" }}
port = {port}
log_file = "{DEMO / "vllm.log"}"

[daemon]
state_dir = "{DEMO / "state"}"
socket = "{DEMO / "run" / "vsup.sock"}"

[timeouts]
start_s = 300.0

[models.tiny-a]
model = "{MODELS / "tiny-a"}"
served_model_name = "tiny-a"

[models.tiny-b]
model = "{MODELS / "tiny-b"}"
served_model_name = "tiny-b"
""")
    return cfg


def show_events(stream) -> None:
    """Render vsup's JSON events (its stderr) as short lines."""
    skip = {"ts", "event", "state", "model", "pid", "reason"}
    for raw in stream:
        line = raw.decode(errors="replace").rstrip()
        try:
            ev = json.loads(line)
        except ValueError:
            print(f"  {line}", flush=True)
            continue
        t = ev.get("ts", "")[11:19]
        what = ev.get("event")
        extra = {k: v for k, v in ev.items() if k not in skip and v not in (None, [], {})}
        if what == "state":
            msg = f"state {ev.get('old')} -> {ev.get('state')}" + (
                f" ({ev['phase']})" if ev.get("phase") else ""
            )
            if ev.get("reason"):
                msg += f": {ev['reason']}"
        elif what == "spawned":
            msg = f"spawned pid {ev.get('pid')}: {' '.join(ev.get('argv', [])[2:8])} ..."
        else:
            msg = f"{what} " + " ".join(f"{k}={v}" for k, v in extra.items())
        print(f"\x1b[2m{t}\x1b[0m {msg[:160]}", flush=True)


def vsup(cfg: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*VSUP, *args, "--config", str(cfg)], text=True, capture_output=True)


def wait_ready(cfg: Path, timeout: float) -> dict:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        r = vsup(cfg, "status", "--json")
        if r.returncode == 0:
            s = json.loads(r.stdout)
            if s["state"] == "ready":
                return s
            if s["state"] == "failed":
                raise SystemExit(f"vsup says failed: {s['reason']}")
        time.sleep(1)
    raise SystemExit(f"not ready within {timeout:.0f}s")


def complete(port: int, model: str) -> str:
    import httpx

    r = httpx.post(
        f"http://127.0.0.1:{port}/v1/chat/completions",
        trust_env=False,
        timeout=60,
        json={"model": model, "messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 8},
    )
    r.raise_for_status()
    return r.json()["choices"][0]["message"]["content"]


def banner(text: str) -> None:
    print(f"\n\x1b[1m== {text}\x1b[0m", flush=True)


def main() -> int:
    for p in (VLLM_PY, MODELS / "tiny-a" / "config.json", MODELS / "tiny-b" / "config.json"):
        if not p.exists():
            raise SystemExit(f"{p} missing: run `make vllm` (scripts/setup_vllm.sh --models) first")
    port = free_port()
    cfg = write_config(port)
    banner(f"vsup run --config {cfg}  (vLLM on 127.0.0.1:{port}, events below)")
    daemon = subprocess.Popen([*VSUP, "run", "--config", str(cfg)], stderr=subprocess.PIPE)
    printer = threading.Thread(target=show_events, args=(daemon.stderr,), daemon=True)
    printer.start()
    interactive = sys.stdin.isatty()
    try:
        s = wait_ready(cfg, 400)
        banner(f"ready: {s['model']} (pid {s['pid']}); a chat completion through it:")
        print(f"  tiny-a says: {complete(port, 'tiny-a')!r}  (random weights: gibberish is expected)")
        banner("vsup reload tiny-b  (drain, stop, cleanup, start, ready)")
        r = subprocess.run([*VSUP, "reload", "tiny-b", "--config", str(cfg)], text=True)
        if r.returncode != 0:
            raise SystemExit("reload failed")
        print(f"  tiny-b says: {complete(port, 'tiny-b')!r}")
        print(vsup(cfg, "status").stdout)
        if interactive:
            banner(
                "serving; try `.venv/bin/vsup status --config .demo/vsup.toml` in another shell. "
                "Ctrl-C stops."
            )
            daemon.wait()
        else:
            banner("no terminal: stopping the demo now")
            daemon.send_signal(signal.SIGINT)
    except KeyboardInterrupt:
        pass
    finally:
        if daemon.poll() is None:
            daemon.send_signal(signal.SIGINT)
        try:
            daemon.wait(120)
        except (subprocess.TimeoutExpired, KeyboardInterrupt):
            daemon.kill()
        printer.join(5)
    return check_clean(cfg)


def check_clean(cfg: Path) -> int:
    sys.path.insert(0, str(ROOT / "supervisor"))
    from vsup import proctree

    left = proctree.Ledger(DEMO / "state").load()
    procs = [d.name for d in Path("/proc").iterdir() if d.name.isdigit() and _ours(d)]
    banner("after Ctrl-C")
    if left or procs:
        print(
            f"  NOT clean: ledger lists {len(left)} trees, processes {procs}; run "
            f"`.venv/bin/vsup cleanup --config {cfg}`"
        )
        return 1
    print("  clean: no process of the demo's trees, its /dev/shm segments and /tmp files are removed")
    return 0


def _ours(d: Path) -> bool:
    try:
        cmd = (d / "cmdline").read_bytes()
        stat = (d / "stat").read_text()
    except OSError:
        return False
    return str(DEMO).encode() in cmd and b"vllm" in cmd and stat.rsplit(")", 1)[1].split()[0] != "Z"


if __name__ == "__main__":
    raise SystemExit(main())
