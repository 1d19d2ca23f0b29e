"""Hang forensics: the Python stacks of every thread of every process of a tree, with what the
kernel says each process is doing (state R/S/D/T, CPU use over the last second, wchan, threads).

A hung TP tree is torn down to recover, and the evidence of where each rank waited dies with it.
`collect()` records it first (into the incident bundle), within a total budget
(`timeouts.stacks_s`): the teardown never waits on a stuck dumper. `vsup stacks` asks the same of a
live server, read-only.

Two mechanisms, chosen by `choose()`:

* **py-spy** (`py-spy dump --pid P`, never `--locals`: locals hold prompts). It reads the
  target's memory with ptrace rights: same user, no capability, where Yama is absent or
  `ptrace_scope=0`. Under `ptrace_scope=1` only an *ancestor* may attach: vsup is the tree's
  ancestor (parent of the API server, and subreaper of the rest), but the dumper it spawns is a
  sibling of the API server, never its ancestor; without CAP_SYS_PTRACE (the shipped unit drops
  every capability) every attach fails with EPERM. Scopes 2 and 3 need the capability or forbid
  attaching at all. It changes nothing in the target: the only non-killing mechanism, so the one
  `vsup stacks` uses. A stopped (T) or D-state process is read with `--nonblocking` (attaching
  would wait for a stop that never comes).
* **faulthandler** (vLLM started with `PYTHONFAULTHANDLER=1`): SIGABRT makes a process write
  every thread's stack to its stderr (the log vsup tails) and die. Needs no ptrace at all, so it
  is the fallback for a tree that is being torn down anyway; never for `vsup stacks`. The facts
  are read first (a SIGSTOPped worker must be reported as T, not as the R it becomes after
  SIGCONT); then every process is frozen (SIGSTOP) so that one death cannot set the others
  moving (a worker watches the engine core through a death pipe), and each in turn gets
  RLIMIT_CORE=0 (no core of a 10 GB worker), SIGABRT, SIGCONT, and is waited for alone: its lines
  interleave with nothing, and faulthandler prints no pid. A marker line in the log says that the
  exits that follow are vsup's (signature `vsup_stack_dump`), so `vsup diagnose` does not take
  them for the failure.

Nothing here decides anything about the server; `vsup.diagnose.analyze_stacks` reads a report
and names the stuck rank(s).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import sys
import time
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .host import Helper, Host, ProcFacts, ProcInfo, SignalResult

__all__ = [
    "Frame",
    "ThreadStack",
    "ProcessStacks",
    "StacksReport",
    "Choice",
    "choose",
    "collect",
    "collect_pids",
    "find_py_spy",
    "parse_py_spy",
    "parse_faulthandler",
    "make_handler",
    "role_of",
    "MARKER",
]

PY_SPY = "py-spy"
FAULTHANDLER = "faulthandler"
MECHANISMS = (PY_SPY, FAULTHANDLER)
# The log line written before a faulthandler dump (matched by the catalog's `vsup_stack_dump`).
MARKER = "vsup: stack dump by SIGABRT (faulthandler) of the hung tree"
# CPU use is measured over this window before the dumps, at most a third of the budget.
CPU_WINDOW_S = 1.0
# A faulthandler dump of a few threads is written in milliseconds; the process then dies of the
# re-raised SIGABRT. Its lines are read once it is gone (or this long after its SIGCONT).
FH_SETTLE_S = 0.05
PY_SPY_PARALLEL = 4  # dumpers at once: a TP=8 tree (11 processes) fits a 3 s budget on 2 cores
_RANK = re.compile(r"TP(\d+)")


# ---- the report --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Frame:
    func: str
    file: str
    line: int | None

    def text(self) -> str:
        """`func (file:line)`, as py-spy prints it: what stack signatures match."""
        return f"{self.func} ({self.file}:{self.line if self.line is not None else '?'})"

    def short(self) -> str:
        return f"{self.func} ({os.path.basename(self.file)}:{self.line if self.line is not None else '?'})"

    def to_json(self) -> list[Any]:
        return [self.func, self.file, self.line]

    @classmethod
    def from_json(cls, v: Any) -> Frame:
        return cls(str(v[0]), str(v[1]), v[2] if isinstance(v[2], int) else None)


@dataclass
class ThreadStack:
    """One thread; frames innermost first (where it waits is frames[0])."""

    ident: str  # py-spy: the native tid; faulthandler: the pthread id in hex
    name: str | None = None  # "MainThread" (py-spy names threads; faulthandler does not)
    status: str | None = None  # py-spy: idle / active / gil; faulthandler: "current" for one thread
    main: bool = False
    frames: list[Frame] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "ident": self.ident,
            "name": self.name,
            "status": self.status,
            "main": self.main,
            "frames": [f.to_json() for f in self.frames],
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ThreadStack:
        return cls(
            str(d.get("ident")),
            d.get("name"),
            d.get("status"),
            bool(d.get("main")),
            [Frame.from_json(f) for f in d.get("frames") or []],
        )


@dataclass
class ProcessStacks:
    pid: int
    create_time: float
    title: str
    role: str  # api_server, engine_core, worker, resource_tracker, other
    rank: int | None = None  # the TP rank of a worker
    state: str | None = None  # before anything was done to it
    wchan: str | None = None
    cpu_pct: float | None = None  # % of one core over the window before the dump
    threads_total: int | None = None
    thread_states: dict[str, int] = field(default_factory=dict)
    threads: list[ThreadStack] = field(default_factory=list)
    mechanism: str | None = None
    error: str | None = None  # why there are no stacks
    seconds: float | None = None  # what its dump took

    @property
    def label(self) -> str:
        if self.role == "worker" and self.rank is not None:
            return f"TP{self.rank}"
        return {"api_server": "API server", "engine_core": "engine core"}.get(self.role, self.title)

    def main_thread(self) -> ThreadStack | None:
        for t in self.threads:
            if t.main:
                return t
        return self.threads[0] if self.threads else None

    def to_json(self) -> dict[str, Any]:
        return {
            "pid": self.pid,
            "create_time": self.create_time,
            "title": self.title,
            "role": self.role,
            "rank": self.rank,
            "label": self.label,
            "state": self.state,
            "wchan": self.wchan,
            "cpu_pct": self.cpu_pct,
            "threads_total": self.threads_total,
            "thread_states": self.thread_states,
            "mechanism": self.mechanism,
            "error": self.error,
            "seconds": self.seconds,
            "threads": [t.to_json() for t in self.threads],
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ProcessStacks:
        return cls(
            pid=int(d["pid"]),
            create_time=float(d.get("create_time") or 0.0),
            title=str(d.get("title") or ""),
            role=str(d.get("role") or "other"),
            rank=d.get("rank"),
            state=d.get("state"),
            wchan=d.get("wchan"),
            cpu_pct=d.get("cpu_pct"),
            threads_total=d.get("threads_total"),
            thread_states=dict(d.get("thread_states") or {}),
            threads=[ThreadStack.from_json(t) for t in d.get("threads") or []],
            mechanism=d.get("mechanism"),
            error=d.get("error"),
            seconds=d.get("seconds"),
        )


@dataclass
class StacksReport:
    mechanism: str | None
    reason: str  # why this mechanism, or why none
    at: float  # wall clock when collection began
    budget_s: float
    elapsed_s: float = 0.0
    processes: list[ProcessStacks] = field(default_factory=list)
    complete: bool = False  # every process has stacks

    def to_json(self) -> dict[str, Any]:
        return {
            "mechanism": self.mechanism,
            "reason": self.reason,
            "at": self.at,
            "budget_s": self.budget_s,
            "elapsed_s": round(self.elapsed_s, 3),
            "complete": self.complete,
            "processes": [p.to_json() for p in self.processes],
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> StacksReport:
        return cls(
            mechanism=d.get("mechanism"),
            reason=str(d.get("reason") or ""),
            at=float(d.get("at") or 0.0),
            budget_s=float(d.get("budget_s") or 0.0),
            elapsed_s=float(d.get("elapsed_s") or 0.0),
            processes=[ProcessStacks.from_json(p) for p in d.get("processes") or []],
            complete=bool(d.get("complete")),
        )

    def render_text(self, *, max_frames: int = 40) -> str:
        return render_text(self.to_json(), max_frames=max_frames)


def render_text(r: dict[str, Any], *, max_frames: int = 40) -> str:
    """The report as an operator reads it: a header per process, then each thread's frames."""
    out = [
        f"stacks: {r.get('mechanism') or 'none'} ({r.get('reason')}); "
        f"{len(r.get('processes') or [])} processes in {r.get('elapsed_s', 0):.2f}s"
        + ("" if r.get("complete") else " (incomplete)")
    ]
    for p in r.get("processes") or []:
        states = ",".join(f"{k}{v}" for k, v in sorted((p.get("thread_states") or {}).items()))
        cpu = p.get("cpu_pct")
        out.append("")
        out.append(
            f"== {p.get('label') or p.get('title')}  pid {p['pid']}  {p.get('title')}  "
            f"state {p.get('state') or '?'}"
            f"  cpu {'?' if cpu is None else f'{cpu:.0f}%'}  wchan {p.get('wchan') or '-'}"
            f"  threads {p.get('threads_total') or '?'} ({states or '?'})"
        )
        if p.get("error"):
            out.append(f"   no stacks: {p['error']}")
        for t in p.get("threads") or []:
            name = f' "{t["name"]}"' if t.get("name") else ""
            status = f" ({t['status']})" if t.get("status") else ""
            out.append(f"   Thread {t['ident']}{name}{status}{' [main]' if t.get('main') else ''}")
            frames = t.get("frames") or []
            for f in frames[:max_frames]:
                out.append(f"     {Frame.from_json(f).short()}")
            if len(frames) > max_frames:
                out.append(f"     ... {len(frames) - max_frames} more")
    return "\n".join(out)


# ---- roles ---------------------------------------------------------------------------------------
def role_of(info: ProcInfo, leader_pid: int | None) -> tuple[str, int | None]:
    """(role, TP rank) from the process title: VLLM::EngineCore, VLLM::Worker_TP1, ..."""
    cmd = " ".join(info.cmdline or ()) or info.comm
    if cmd.startswith("VLLM::Worker") or "VllmWorkerProcess" in cmd:
        m = _RANK.search(cmd.split()[0])
        return "worker", int(m.group(1)) if m else None
    if cmd.startswith("VLLM::EngineCore"):
        return "engine_core", None
    if "multiprocessing.resource_tracker" in cmd:
        return "resource_tracker", None
    if info.pid == leader_pid or cmd.startswith("VLLM::APIServer") or "api_server" in cmd:
        return "api_server", None
    return "other", None


_ROLE_ORDER = {"worker": 0, "engine_core": 1, "api_server": 2, "other": 3, "resource_tracker": 4}


# ---- choosing a mechanism ----------------------------------------------------------------------
@dataclass(frozen=True)
class Choice:
    mechanism: str | None
    reason: str
    py_spy: str | None = None


def find_py_spy(configured: str | None = None) -> str | None:
    """The py-spy binary: the configured path, else beside vsup's interpreter (a venv's bin/, where
    `pip install 'vsup[stacks]'` puts it), else on PATH."""
    if configured:
        return configured if os.access(configured, os.X_OK) else None
    beside = Path(sys.executable).parent / "py-spy"
    if os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which("py-spy")


def ptrace_refusal(host: Host) -> str | None:
    """Why a dumper spawned by vsup cannot read the tree's memory here, or None if it can."""
    scope = host.ptrace_scope()
    if scope is None or scope == 0:
        return None  # classic rules: same uid, target dumpable
    if host.has_cap_sys_ptrace():
        return None if scope < 3 else "kernel.yama.ptrace_scope=3: ptrace is disabled on this host"
    if scope == 1:
        return (
            "kernel.yama.ptrace_scope=1: only a process's ancestors may trace it, and the dumper vsup "
            "spawns is the tree's sibling, not its ancestor (and vsup holds no CAP_SYS_PTRACE)"
        )
    return f"kernel.yama.ptrace_scope={scope}: ptrace needs CAP_SYS_PTRACE, which vsup does not hold"


def choose(
    host: Host,
    *,
    preference: str = "auto",
    may_kill: bool = False,
    faulthandler_env: bool = False,
    py_spy: str | None = None,
) -> Choice:
    """Pick the mechanism for one collection.

    `may_kill`: the tree is about to be torn down, so SIGABRT is acceptable (never for `vsup
    stacks`). `faulthandler_env`: the tree was started with PYTHONFAULTHANDLER=1.
    """
    if preference == "off":
        return Choice(None, "stack dumps are off (daemon.stacks = off)")
    spy = find_py_spy(py_spy)
    refusal = ptrace_refusal(host)
    notes = []
    if preference in ("auto", PY_SPY):
        if spy is None:
            notes.append("py-spy not installed (pip install 'vsup[stacks]')")
        elif refusal is not None:
            notes.append(refusal)
        else:
            return Choice(PY_SPY, "py-spy: same-user ptrace is allowed here", spy)
    if preference in ("auto", FAULTHANDLER):
        if not may_kill:
            notes.append("faulthandler kills each process it dumps: only before a teardown, never on demand")
        elif not faulthandler_env:
            notes.append("the tree was not started with PYTHONFAULTHANDLER=1")
        else:
            why = "; ".join(notes) or "configured"
            return Choice(FAULTHANDLER, f"faulthandler (SIGABRT): {why}")
    return Choice(None, "; ".join(notes) or f"unknown mechanism {preference!r}")


# ---- parsing -----------------------------------------------------------------------------------
_SPY_THREAD = re.compile(r'^Thread (0x[0-9A-Fa-f]+|\d+)(?: \((\w+)\))?(?:: "(.*)")?\s*$')
_SPY_FRAME = re.compile(r"^\s+(.+?) \((.*):(\d+|\?)\)\s*$")
_SPY_FRAME_NOLINE = re.compile(r"^\s+(.+?) \((.*)\)\s*$")


def parse_py_spy(text: str, pid: int) -> list[ThreadStack]:
    """`py-spy dump` output -> threads (frames innermost first, as printed)."""
    threads: list[ThreadStack] = []
    cur: ThreadStack | None = None
    for line in text.splitlines():
        m = _SPY_THREAD.match(line)
        if m:
            ident, status, name = m.group(1), m.group(2), m.group(3)
            cur = ThreadStack(
                ident=ident, name=name, status=status, main=(ident == str(pid) or name == "MainThread")
            )
            threads.append(cur)
            continue
        if cur is None or not line.startswith(" "):
            continue
        fm = _SPY_FRAME.match(line)
        if fm:
            lineno = fm.group(3)
            cur.frames.append(Frame(fm.group(1), fm.group(2), int(lineno) if lineno.isdigit() else None))
        elif (fm2 := _SPY_FRAME_NOLINE.match(line)) is not None:
            cur.frames.append(Frame(fm2.group(1), fm2.group(2), None))
    if threads and not any(t.main for t in threads):
        threads[0].main = True
    return threads


_FH_START = "Fatal Python error:"
_FH_THREAD = re.compile(r"^(Current thread|Thread) (0x[0-9A-Fa-f]+) \(most recent call first\):\s*$")
_FH_FRAME = re.compile(r'^\s+File "(.*)", line (\d+|\?\?\?) in (.+?)\s*$')
_PREFIX = re.compile(r"^\(\w+ pid=\d+\) ")


def parse_faulthandler(text: str) -> list[ThreadStack]:
    """faulthandler's dump (from the first "Fatal Python error:" on) -> threads.

    A vLLM worker's log prefix is stripped if a line carries one.
    """
    start = text.find(_FH_START)
    if start < 0:
        return []
    threads: list[ThreadStack] = []
    cur: ThreadStack | None = None
    for raw in text[start:].splitlines():
        line = _PREFIX.sub("", raw.rstrip("\r"))
        m = _FH_THREAD.match(line)
        if m:
            current = m.group(1) == "Current thread"
            cur = ThreadStack(ident=m.group(2), status="current" if current else None, main=current)
            threads.append(cur)
            continue
        fm = _FH_FRAME.match(line)
        if fm and cur is not None:
            ln = fm.group(2)
            cur.frames.append(Frame(fm.group(3), fm.group(1), int(ln) if ln.isdigit() else None))
        elif line.startswith("Extension modules:") or (threads and line.startswith(_FH_START)):
            break  # the end of this dump
    # faulthandler's handler runs on whichever thread the kernel picked, so "Current thread" is
    # not necessarily the main one: the main thread is the one not started by threading.
    started = [t for t in threads if t.frames and not t.frames[-1].file.endswith("threading.py")]
    if started:
        for t in threads:
            t.main = t is started[0]
    elif threads and not any(t.main for t in threads):
        threads[-1].main = True
    return threads


# ---- collecting ----------------------------------------------------------------------------------
def _facts_summary(
    p: ProcessStacks, before: ProcFacts | None, after: ProcFacts | None, window: float
) -> None:
    f = after or before
    if f is None:
        return
    p.state = f.state
    p.wchan = f.wchan
    p.threads_total = len(f.threads)
    counts: dict[str, int] = {}
    for t in f.threads:
        counts[t.state] = counts.get(t.state, 0) + 1
    p.thread_states = counts
    if before is not None and after is not None and window > 0:
        p.cpu_pct = round(max(0.0, after.cpu_s - before.cpu_s) / window * 100.0, 1)


async def collect(
    tree: Any,
    host: Host | None = None,
    *,
    budget_s: float = 3.0,
    mechanism: str | Choice = "auto",
    may_kill: bool = False,
    faulthandler_env: bool = False,
    log_path: str | Path | None = None,
    py_spy: str | None = None,
    cpu_window_s: float = CPU_WINDOW_S,
) -> StacksReport:
    """Stacks and facts of every live process of `tree` (a proctree.TreeRecord), within budget_s.

    Returns by the budget whatever happens: a dumper that overruns is killed and left to the
    reaper, a process whose stacks did not come in time has `error` set. `mechanism` is
    "auto" / "py-spy" / "faulthandler" / "off" (what `choose` decides from), or a Choice.
    Faulthandler needs `may_kill` (the tree is being torn down), `faulthandler_env` and the
    `log_path` the tree writes its stderr to. Never raises for an OS error: it is reported.
    """
    from .proctree import tree_members

    host = host or Host()
    snap = host.processes(cmdline=True)
    members = [m for m in tree_members(tree, snap) if not m.zombie]
    return await collect_pids(
        members,
        host,
        leader_pid=tree.leader.pid,
        budget_s=budget_s,
        mechanism=mechanism,
        may_kill=may_kill,
        faulthandler_env=faulthandler_env,
        log_path=log_path,
        py_spy=py_spy,
        cpu_window_s=cpu_window_s,
    )


async def collect_pids(
    members: Iterable[ProcInfo],
    host: Host,
    *,
    leader_pid: int | None,
    budget_s: float,
    mechanism: str | Choice = "auto",
    may_kill: bool = False,
    faulthandler_env: bool = False,
    log_path: str | Path | None = None,
    py_spy: str | None = None,
    cpu_window_s: float = CPU_WINDOW_S,
) -> StacksReport:
    """collect() for given processes. `cpu_window_s`: how long CPU use is measured before the
    dumps (a hang confirmation that samples twice can afford less than the incident's 1 s)."""
    t0 = time.monotonic()
    deadline = t0 + max(0.1, budget_s)
    choice = (
        mechanism
        if isinstance(mechanism, Choice)
        else choose(
            host, preference=mechanism, may_kill=may_kill, faulthandler_env=faulthandler_env, py_spy=py_spy
        )
    )
    if choice.mechanism == FAULTHANDLER and log_path is None:
        choice = Choice(None, "faulthandler needs the tree's log file")
    report = StacksReport(mechanism=choice.mechanism, reason=choice.reason, at=time.time(), budget_s=budget_s)
    procs: list[ProcessStacks] = []
    for m in sorted(
        members, key=lambda m: (_ROLE_ORDER[role_of(m, leader_pid)[0]], role_of(m, leader_pid)[1] or 0, m.pid)
    ):
        role, rank = role_of(m, leader_pid)
        procs.append(ProcessStacks(pid=m.pid, create_time=m.create_time, title=m.title, role=role, rank=rank))
    report.processes = procs
    try:
        # Facts: two samples CPU_WINDOW_S apart (a third of the budget at most), before anything
        # is done to the processes, so a SIGSTOPped worker is reported as T and a spinning rank
        # shows its 100 %.
        window = min(max(0.0, cpu_window_s), budget_s / 3)
        before = {p.pid: host.proc_facts(p.pid) for p in procs}
        await asyncio.sleep(window)
        t_window = window
        after = {p.pid: host.proc_facts(p.pid) for p in procs}
        for p in procs:
            b, a = before.get(p.pid), after.get(p.pid)
            if a is not None and b is not None and abs(a.create_time - b.create_time) > 1.0:
                b = None
            _facts_summary(p, b, a, t_window)
            if a is None:
                p.error = "gone before its stacks were read"
        live = [p for p in procs if p.error is None]
        if choice.mechanism == PY_SPY and choice.py_spy:
            await _by_py_spy(live, host, choice.py_spy, deadline)
        elif choice.mechanism == FAULTHANDLER and log_path is not None:
            await _by_faulthandler(live, host, Path(log_path), deadline)
        else:
            for p in live:
                p.error = f"no mechanism: {choice.reason}"
    except Exception as e:  # noqa: BLE001 - forensics must never break the recovery it serves
        for p in procs:
            if not p.threads and p.error is None:
                p.error = f"collection failed: {type(e).__name__}: {e}"
    report.elapsed_s = time.monotonic() - t0
    report.complete = bool(procs) and all(p.threads for p in procs)
    return report


async def _by_py_spy(procs: list[ProcessStacks], host: Host, spy: str, deadline: float) -> None:
    sem = asyncio.Semaphore(PY_SPY_PARALLEL)

    async def one(p: ProcessStacks) -> None:
        async with sem:
            if time.monotonic() >= deadline:
                p.error = "budget spent before its turn"
                return
            argv = [spy, "dump", "--pid", str(p.pid), "--full-filenames"]
            if p.state in ("T", "t", "D"):
                argv.append("--nonblocking")  # attaching would wait for a stop that never comes
            t = time.monotonic()
            code, out, err = await run_helper(host, argv, deadline)
            p.seconds = round(time.monotonic() - t, 3)
            p.mechanism = PY_SPY
            threads = parse_py_spy(out, p.pid) if code == 0 else []
            if threads:
                p.threads = threads
            elif code is None:
                p.error = "py-spy did not finish within the budget (killed)"
            else:
                msg = " ".join(err.strip().splitlines()[:3]) or out.strip()[:200]
                p.error = f"py-spy exited {code}: {msg[:300]}"

    await asyncio.gather(*(one(p) for p in procs))


async def run_helper(host: Host, argv: list[str], deadline: float) -> tuple[int | None, str, str]:
    """Run a helper through the host seam until it exits or `deadline`: (exit code or None if
    it was killed for overrunning, stdout, stderr). Its status is never lost to waitpid(-1)."""
    try:
        h = host.spawn_helper(argv)
    except OSError as e:
        return 127, "", f"cannot run {argv[0]}: {e.strerror or e}"
    out, err = bytearray(), bytearray()
    try:
        for fd in (h.stdout, h.stderr):
            os.set_blocking(fd, False)
        while True:
            _drain(h.stdout, out)
            _drain(h.stderr, err)
            code = host.poll_helper(h)
            if code is not None:
                _drain(h.stdout, out)
                _drain(h.stderr, err)
                return code, out.decode("utf-8", "replace"), err.decode("utf-8", "replace")
            if time.monotonic() >= deadline:
                host.kill_helper(h)
                await asyncio.sleep(0.02)
                host.poll_helper(h)  # usually reaped now; else the reaper files it later
                return None, out.decode("utf-8", "replace"), err.decode("utf-8", "replace")
            await _readable(h, min(0.05, max(0.001, deadline - time.monotonic())))
    finally:
        host.close_helper(h)


async def _readable(h: Helper, timeout: float) -> None:
    """Wait until the helper's pipes or pidfd have something, or `timeout`."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[None] = loop.create_future()
    fds = [fd for fd in (h.stdout, h.stderr, h.pidfd) if fd >= 0]

    def wake() -> None:
        if not fut.done():
            fut.set_result(None)

    added = []
    try:
        for fd in fds:
            try:
                loop.add_reader(fd, wake)
                added.append(fd)
            except (ValueError, OSError, NotImplementedError):
                pass
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(fut, timeout)
    finally:
        for fd in added:
            loop.remove_reader(fd)


def _drain(fd: int, buf: bytearray) -> None:
    while True:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            return
        except OSError:
            return
        if not chunk:
            return
        buf += chunk


async def _by_faulthandler(procs: list[ProcessStacks], host: Host, log: Path, deadline: float) -> None:
    targets = [p for p in procs if p.role != "resource_tracker"]
    # The tracker is left alone (and running): it unlinks the tree's segments once the others
    # are gone, which is what the teardown relies on.
    for p in procs:
        if p.role == "resource_tracker":
            p.error = "not dumped: the resource tracker must outlive the tree to unlink its segments"
    with contextlib.suppress(OSError):
        host.append_line(log, f"{MARKER}: pids {' '.join(str(p.pid) for p in targets)}")
    stopped: list[ProcessStacks] = []
    for p in targets:
        if host.signal(p.pid, p.create_time, signal.SIGSTOP) is SignalResult.SENT:
            stopped.append(p)
        else:
            p.error = "gone before its stacks were read"
    for i, p in enumerate(stopped):
        left = deadline - time.monotonic()
        if left <= 0.02:
            p.error = "budget spent before its turn"
            continue
        per = left / (len(stopped) - i)
        t = time.monotonic()
        p.mechanism = FAULTHANDLER
        offset = host.file_size(log)
        host.disable_core(p.pid, p.create_time)
        sent = host.signal(p.pid, p.create_time, signal.SIGABRT)
        host.signal(p.pid, p.create_time, signal.SIGCONT)
        if sent is not SignalResult.SENT:
            p.error = f"SIGABRT not delivered ({sent.value})"
            continue
        end = t + per
        while time.monotonic() < end:
            info = host.process(p.pid, cmdline=False)
            if info is None or info.zombie or abs(info.create_time - p.create_time) > 1.0:
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(FH_SETTLE_S if time.monotonic() < deadline else 0)
        text = host.read_from(log, offset).decode("utf-8", "replace")
        p.seconds = round(time.monotonic() - t, 3)
        p.threads = parse_faulthandler(text)
        if not p.threads:
            p.error = "no faulthandler dump in the log (PYTHONFAULTHANDLER unset, or not a Python process?)"
    # Whatever was not dumped (budget spent) is let go again: the teardown kills it anyway, and a
    # frozen process must not look like a second fault to anything that reads states later.
    for p in stopped:
        if not p.threads:
            host.signal(p.pid, p.create_time, signal.SIGCONT)


# ---- the socket command --------------------------------------------------------------------------
def make_handler(
    current_tree: Callable[[], Any],
    *,
    budget_s: Callable[[], float] | float = 3.0,
    preference: Callable[[], str] | str = "auto",
    py_spy: Callable[[], str | None] | str | None = None,
    host_factory: Callable[[], Host] = Host,
) -> Callable[[Any], Coroutine[Any, Any, dict[str, Any]]]:
    """The `stacks` socket command (read permission): the live tree's stacks and facts.

    `current_tree()` returns the owner's TreeRecord of the serving tree, or None. Never kills:
    where py-spy is not allowed, the reply says why (and holds the facts, which need no ptrace).
    """

    def val(x: Any) -> Any:
        return x() if callable(x) else x

    async def handler(req: Any) -> dict[str, Any]:
        from .control import CommandError

        tree = current_tree()
        if tree is None:
            raise CommandError("failed", "no vLLM server is running (nothing to dump)")
        pref = val(preference)
        if pref == FAULTHANDLER:
            pref = "auto"  # an on-demand dump never kills; choose() then explains what is missing
        report = await collect(
            tree,
            host_factory(),
            budget_s=float(val(budget_s)),
            mechanism=pref,
            may_kill=False,
            py_spy=val(py_spy),
        )
        return report.to_json()

    return handler
