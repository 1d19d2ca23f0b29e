#!/usr/bin/env python3
"""`make demo`: vsup supervising a real TP=2 vLLM (CPU build) on the tiny model, with a reload.

Starts `vsup run` on a demo config (.demo/), in its own session, prints its events as they
happen, sends a chat completion through vsup's proxy ([proxy] listen), reloads to tiny-b and
completes again. Then it keeps serving until Ctrl-C (or, without a terminal, stops by itself). Each
Ctrl-C is forwarded to the daemon as exactly one SIGINT: the first stops it (teardown and
cleanup), a second one stops it at once (SIGKILL of the tree, then its segments and files
unlinked). The demo then checks that nothing of its trees is left: the processes, /dev/shm
objects and /tmp paths the daemon's ledger recorded while it ran. VSUP_DEMO_RELOAD=0 skips
the reload.
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
SHM_ROOT = Path("/dev/shm")  # noqa: S108 - the POSIX shm root itself, only looked at


def free_port(start: int = 8000) -> int:
    for port in range(start, start + 100):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
                return port
            except OSError:
                continue
    raise SystemExit("no free port in 8000-8099")


def write_config(port: int, proxy_port: int) -> Path:
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

# Clients connect here: vsup's proxy holds requests while a server loads or reloads and replays
# those a dying server never answered (issue 15); vLLM itself stays on the loopback port above.
[proxy]
listen = "127.0.0.1:{proxy_port}"

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


class TreeWatch(threading.Thread):
    """Remembers what the daemon's ledger records of the demo's trees (pids, /dev/shm objects,
    /tmp files), polled while the demo runs: after the daemon is gone, that is what the closing
    check looks for."""

    def __init__(self, state_dir: Path) -> None:
        super().__init__(daemon=True)
        self.state_dir = state_dir
        self.pids: set[tuple[int, float]] = set()
        self.shm: set[str] = set()
        self.files: set[str] = set()
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.2):
            self.poll()

    def poll(self) -> None:
        try:
            data = json.loads((self.state_dir / "ledger.json").read_text())
        except (OSError, ValueError):
            return
        for t in data.get("trees", []) if isinstance(data, dict) else []:
            self.pids |= {(p["pid"], p["create_time"]) for p in t.get("procs", [])}
            self.shm |= {i["name"] for i in t.get("ipc", [])}
            self.files |= set(t.get("files", []))


def main() -> int:
    for p in (VLLM_PY, MODELS / "tiny-a" / "config.json", MODELS / "tiny-b" / "config.json"):
        if not p.exists():
            raise SystemExit(f"{p} missing: run `make vllm` (scripts/setup_vllm.sh --models) first")
    reload = os.environ.get("VSUP_DEMO_RELOAD", "1") != "0"  # the tests' short run skips it
    port = free_port()
    proxy_port = free_port(port + 1)
    cfg = write_config(port, proxy_port)
    banner(
        f"vsup run --config {cfg}  (clients: 127.0.0.1:{proxy_port}; vLLM on 127.0.0.1:{port}; events below)"
    )
    # Its own session: the terminal's Ctrl-C reaches the demo only, which forwards exactly one
    # SIGINT per Ctrl-C. (In the demo's process group the daemon got the terminal's SIGINT and
    # the demo's forwarded one: a second signal, "force exit", on a single Ctrl-C.)
    daemon = subprocess.Popen(
        [*VSUP, "run", "--config", str(cfg)], stderr=subprocess.PIPE, start_new_session=True
    )
    printer = threading.Thread(target=show_events, args=(daemon.stderr,), daemon=True)
    printer.start()
    watch = TreeWatch(DEMO / "state")
    watch.start()
    interactive = sys.stdin.isatty()
    forwarded = 0

    def on_sigint(signum: int, frame: object) -> None:
        nonlocal forwarded
        forwarded += 1
        if daemon.poll() is None:
            daemon.send_signal(signal.SIGINT)  # one Ctrl-C, one signal: a second one forces
        if forwarded == 1:
            raise KeyboardInterrupt  # leave whatever the demo was doing; later ones only forward

    signal.signal(signal.SIGINT, on_sigint)
    try:
        s = wait_ready(cfg, 400)
        banner(f"ready: {s['model']} (pid {s['pid']}); a chat completion through vsup's proxy:")
        print(f"  tiny-a says: {complete(proxy_port, 'tiny-a')!r}  (random weights: gibberish is expected)")
        if reload:
            banner("vsup reload tiny-b  (drain, stop, cleanup, start, ready)")
            r = subprocess.run([*VSUP, "reload", "tiny-b", "--config", str(cfg)], text=True)
            if r.returncode != 0:
                raise SystemExit("reload failed")
            print(f"  tiny-b says: {complete(proxy_port, 'tiny-b')!r}")
        print(vsup(cfg, "status").stdout)
        if interactive:
            banner(
                "serving; try `.venv/bin/vsup status --config .demo/vsup.toml` in another shell. "
                "Ctrl-C stops (a second Ctrl-C: stop at once, still clean)."
            )
            daemon.wait()
        else:
            banner("no terminal: stopping the demo now")
            forwarded += 1
            daemon.send_signal(signal.SIGINT)
    except KeyboardInterrupt:
        pass
    finally:
        try:
            daemon.wait(120)
        except subprocess.TimeoutExpired:
            daemon.kill()
        printer.join(5)
        watch.stop.set()
        watch.join(2)
    watch.poll()
    return check_clean(cfg, watch)


def check_clean(cfg: Path, watch: TreeWatch) -> int:
    """What is left of the demo's trees: processes, /dev/shm objects, /tmp files, ledger."""
    sys.path.insert(0, str(ROOT / "supervisor"))
    from vsup import proctree

    left = proctree.Ledger(DEMO / "state").load()
    procs = sorted(pid for pid, ct in watch.pids if _same_process(pid, ct))
    procs += [int(d.name) for d in Path("/proc").iterdir() if d.name.isdigit() and _ours(d)]
    shm = sorted(n for n in watch.shm if os.path.lexists(SHM_ROOT / n))
    files = sorted(f for f in watch.files if os.path.lexists(f))
    banner("after Ctrl-C")
    seen = f"{len(watch.shm)} /dev/shm objects and {len(watch.files)} /tmp paths recorded for its trees"
    if left or procs or shm or files:
        print(f"  NOT clean ({seen}):")
        print(f"    processes: {sorted(set(procs))}")
        print(f"    /dev/shm:  {shm}")
        print(f"    /tmp:      {files}")
        print(f"    ledger:    {len(left)} trees; run `.venv/bin/vsup cleanup --config {cfg}`")
        return 1
    print(f"  clean: no process of the demo's trees is left, and none of the {seen} remains")
    return 0


def _same_process(pid: int, create_time: float) -> bool:
    """pid is alive (no zombie) and still the process born at create_time."""
    try:
        import psutil

        p = psutil.Process(pid)
        return abs(p.create_time() - create_time) < 1.0 and p.status() != psutil.STATUS_ZOMBIE
    except Exception:  # noqa: BLE001 - gone, or not ours to look at: not a leftover of the demo
        return False


def _ours(d: Path) -> bool:
    try:
        cmd = (d / "cmdline").read_bytes()
        stat = (d / "stat").read_text()
    except OSError:
        return False
    return str(DEMO).encode() in cmd and b"vllm" in cmd and stat.rsplit(")", 1)[1].split()[0] != "Z"


if __name__ == "__main__":
    raise SystemExit(main())
