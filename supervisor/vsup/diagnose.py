"""Offline analysis of a vLLM log: what happened, why, and what to do (`vsup diagnose`).

`analyze(lines)` parses and matches every line (logparse + the signature catalog), follows
tracebacks per process, and reduces the log to a `Diagnosis`:

verdict (issue 5), the worst state any *run* in the log reached:
  startup_failed > engine_dead > stalled > healthy, or unknown when no line was recognised.

* A *run* is one start of the server. A log appended to across restarts holds several; a new run
  begins at a start-up line (config dump, version banner) once the current run has failed or shut
  down. Logs that begin mid-run are one run without start-up lines.
* A run was *up* if it shows a ready line (uvicorn "Application startup complete.") or serving
  signs: received/added requests, access-log lines, stats lines. Any up sign in the run counts,
  even after the failure: a 500 access line after "Engine loop has died" proves the server was
  serving, which matters for logs that begin mid-run.
* A failure (kinds startup_failed, oom, nccl_error, engine_dead, worker_died) in a run that was
  never up is `startup_failed`; in a run that was up, `engine_dead` (so a death at the first
  request is engine_dead: the server had reported ready).
* Generic failure lines (see below) after a requested stop (signature shutdown_requested, or
  uvicorn's "Shutting down") in a run with no failure yet are ignored: 0.32 logs "AsyncLLM
  output_handler failed." and EngineDeadError on every requested stop. Other shutdown lines do not
  count: 0.32 logs "[shutdown] Executor: waiting for worker exit" before "EngineCore failed to
  start.". A specific
  failure still counts (after SIGKILL of the engine core a worker first logs "Parent process
  exited", then the API server "engine core exited unexpectedly").
* A stall line (shm_stall) after an up sign is `stalled`. A stall before any up sign is start-up
  work (compilation, loading) if a ready line follows later in the run, so `healthy`; if the run
  ends without a ready line after it (nothing after it, or only serving signs of a log that began
  mid-run), it is `stalled`.

root_cause: the most specific message explaining the verdict. For a failure, with F the run's first
failure line:
  1. F's own traceback (same process, starting right after F: logger.exception prints the message
     and then the traceback), its last non-generic exception (a chain is read from its final
     exception back, so "RuntimeError: Engine core initialization failed" falls back to the
     ValueError that caused it). The seed: "RuntimeError: Engine loop has died"; a worker's
     "WorkerProc hit an exception." gives the worker's own error.
  2. else F itself if it is specific: a SIGKILLed worker leaves "Worker proc VllmWorker-1 died
     unexpectedly (exit code: -9)", and the engine core's later "RuntimeError: cancelled" is a
     consequence, not the cause;
  3. else the first non-generic exception of a traceback after F, or of one ending just before F;
  4. else the first specific failure line, else F.
"Generic" is a catalog flag: EngineDeadError, "EngineCore encountered a fatal error", "Executor
failed." and the like are consequences other processes report. For a stall: the first stall line
that decided the verdict. Messages are redacted (vsup.redact) like everything vsup prints.

advice: the root cause signature's action; then, for TP>1 (worker processes seen, or
tensor_parallel_size > 1 in the config dump) when the engine died or stalled before any inference
request had succeeded in that run, and the cause is a hang-type failure (catalog flag
suspect_collectives, or only generic lines): `--disable-custom-all-reduce`, then
`NCCL_P2P_DISABLE=1` (the seed's fix and the documented next step); then the actions of the other
specific failure signatures of that run; and `vsup cleanup` when leaked resources were reported.

findings: failures, stalls, ready lines, leaks and custom all-reduce lines as they occur (at most
`MAX_PER_SIGNATURE` per signature: a stall repeats every 60 s for hours), and only the first
serving, progress, start-up and shutdown line of each run (a busy log has millions).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from os import PathLike
from typing import Any

from vsup.logparse import LogLine, exception_text, parse_line
from vsup.redact import redact
from vsup.signatures import FAILURE_KINDS, Catalog, Signature, default_catalog

__all__ = [
    "Finding",
    "Diagnosis",
    "analyze",
    "diagnose_file",
    "render_text",
    "VERDICTS",
    "MAX_PER_SIGNATURE",
    "ADVICE_DISABLE_CUSTOM_AR",
    "ADVICE_NCCL_P2P",
    "StackVerdict",
    "analyze_stacks",
    "persistent_stuck",
    "diagnose_bundle",
    "render_stacks",
]

VERDICTS = ("startup_failed", "engine_dead", "stalled", "healthy", "unknown")
MAX_PER_SIGNATURE = 20
# A traceback that ends this many lines before the first failure line may still be its cause.
_LOOKBACK_LINES = 30
_UP_KINDS = frozenset({"ready", "serving", "progress"})
_FIRST_PER_RUN_KINDS = frozenset({"serving", "progress", "starting", "shutdown"})
# A new run starts with the config dump ("non-default args:", "args: Namespace(", "Initializing ...
# engine ... with config:"), printed once per start; progress lines would split runs mid-start.
_RUN_START_SIGS = frozenset({"engine_config"})
# Shutdown lines that mean someone asked for the stop (not "[shutdown] Executor: ..." which 0.32
# also logs on its way to reporting a start-up failure).
# vsup's own marker before a faulthandler stack dump counts too: the SIGABRT exits that follow
# are the forensics of a hang, not a second failure.
_REQUESTED_STOP_SIGS = frozenset({"shutdown_requested", "uvicorn_shutdown", "vsup_stack_dump"})
_WORKER_PROC = re.compile(r"Worker")
_TP_ARG = re.compile(r"(?:^|\s)(?:-tp|--tensor-parallel-size|--tensor_parallel_size)[ =](\d+)")
_INFERENCE_PATH = re.compile(r"^/(?:v1/(?:chat/)?completions|v1/responses|v1/messages|generate|inference/)")
_TB_START = "Traceback (most recent call last):"
_TB_CHAIN = ("During handling of the above exception", "The above exception was the direct cause")

ADVICE_DISABLE_CUSTOM_AR = (
    "TP>1 and the engine died or stalled at the first request: restart with --disable-custom-all-reduce "
    "(vLLM's custom all-reduce can hang on PCIe GPUs whose P2P is reported but broken; "
    "the seed incident's fix)."
)
ADVICE_NCCL_P2P = (
    "If that does not help: also set NCCL_P2P_DISABLE=1 (or NCCL_P2P_LEVEL=NVL), "
    "and check IOMMU/ACS settings."
)
_TP_ADVICE = (ADVICE_DISABLE_CUSTOM_AR, ADVICE_NCCL_P2P)


@dataclass(frozen=True, slots=True)
class Finding:
    kind: str
    line: int  # 1-based
    process: str | None
    pid: int | None
    message: str  # redacted
    signature: str = ""  # catalog id; not part of the JSON output

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "line": self.line,
            "process": self.process,
            "pid": self.pid,
            "message": self.message,
        }


@dataclass(slots=True)
class Diagnosis:
    verdict: str
    findings: list[Finding]
    root_cause: str | None
    advice: list[str]

    def to_json(self) -> dict[str, Any]:
        """Exactly {"verdict", "findings": [{"kind","line","process","pid","message"}], "root_cause",
        "advice"}."""
        return {
            "verdict": self.verdict,
            "findings": [f.to_json() for f in self.findings],
            "root_cause": self.root_cause,
            "advice": list(self.advice),
        }

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> Diagnosis:
        """Rebuild from `to_json()` output (e.g. a diagnosis the daemon sent over its socket)."""
        findings = [
            Finding(f["kind"], f["line"], f.get("process"), f.get("pid"), f["message"])
            for f in obj.get("findings", [])
        ]
        return cls(obj["verdict"], findings, obj.get("root_cause"), list(obj.get("advice", [])))


# ---------------------------------------------------------------------------- internal state


@dataclass(slots=True)
class _Exc:
    line: int
    text: str
    sig: Signature | None


@dataclass(slots=True)
class _Chain:
    """One traceback (with the chained ones after it) of one process."""

    key: tuple[str | None, int | None]
    start: int
    end: int
    excs: list[_Exc] = field(default_factory=list)
    state: str = "frames"  # "frames" until the exception line, then "after"
    expect_more: bool = False  # saw "The above exception was ..." : the next Traceback continues it


@dataclass(slots=True)
class _Event:
    line: int
    ll: LogLine
    sig: Signature
    own_chain: _Chain | None = None  # the traceback its process printed right after it

    @property
    def key(self) -> tuple[str | None, int | None]:
        return (self.ll.process, self.ll.pid)


@dataclass(slots=True)
class _Run:
    start: int
    up: bool = False  # an up sign so far
    up_any: bool = False  # an up sign anywhere in the run
    ended_clean: bool = False  # shutdown or failure seen: a start-up line now begins a new run
    stop_requested: bool = False  # a requested-stop line seen: generic failures after it are its noise
    failures: list[_Event] = field(default_factory=list)
    stall_up: _Event | None = None  # first stall after an up sign
    pending_stall: _Event | None = None  # first stall before any up sign, not yet explained by a ready
    unresolved_stall: _Event | None = None  # a pending stall that an up sign other than ready followed
    ok_inference: int = 0  # successful inference requests so far
    ok_before_failure: int | None = None
    ok_before_stall: int | None = None
    first_kinds: set[str] = field(default_factory=set)
    end: int = 0

    def stall_event(self) -> _Event | None:
        return self.stall_up or self.unresolved_stall or self.pending_stall


class _Analyzer:
    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog
        self.findings: list[Finding] = []
        self.per_sig: dict[str, int] = {}
        self.runs: list[_Run] = [_Run(start=1)]
        self.chains: list[_Chain] = []
        self.open_chains: dict[tuple[str | None, int | None], _Chain] = {}
        # Failure events whose process has not printed its next line yet (it may be their traceback).
        self.awaiting_own: dict[tuple[str | None, int | None], _Event] = {}
        self.workers_seen = False
        self.tp_size = 0
        self.leaks: list[Signature] = []
        self.recognised = False
        self.lineno = 0

    # -- per line
    def feed(self, raw: str) -> None:
        self.lineno += 1
        n = self.lineno
        ll = parse_line(raw)
        if ll.process is not None and not self.workers_seen and _WORKER_PROC.search(ll.process):
            self.workers_seen = True
        msg = ll.message
        indented = msg[:1] in (" ", "\t")
        m = None if indented else self.catalog.match(ll)
        key = (ll.process, ll.pid)
        self._track_traceback(n, key, msg, indented, m.sig if m else None)
        if self.awaiting_own:
            ev = self.awaiting_own.pop(key, None)
            if ev is not None and msg.endswith(_TB_START):
                ev.own_chain = self.open_chains.get(key)
        if m is None:
            if not self.tp_size and ("-tp" in msg or "tensor-parallel" in msg or "tensor_parallel" in msg):
                t = _TP_ARG.search(msg)
                if t:
                    self.tp_size = int(t.group(1))
            return
        self.recognised = True
        self._on_match(n, ll, m.sig, m.groups)

    def _track_traceback(
        self, n: int, key: tuple[str | None, int | None], msg: str, indented: bool, sig: Signature | None
    ) -> None:
        chain = self.open_chains.get(key)
        if msg.endswith(_TB_START):
            if chain is None or not chain.expect_more:
                chain = _Chain(key=key, start=n, end=n)
                self.chains.append(chain)
                self.open_chains[key] = chain
            chain.state, chain.expect_more, chain.end = "frames", False, n
            return
        if chain is None:
            return
        if msg.startswith(_TB_CHAIN):
            chain.expect_more, chain.end = True, n
        elif msg == "" or indented:
            chain.end = n  # frame, source or caret line, or a blank between chained tracebacks
        elif chain.state == "frames" and (exc := exception_text(msg)) is not None:
            chain.excs.append(_Exc(n, exc, sig))
            chain.state, chain.end = "after", n
        elif not chain.expect_more:
            del self.open_chains[key]

    def _on_match(self, n: int, ll: LogLine, sig: Signature, groups: dict[str, Any]) -> None:
        kind = sig.kind
        run = self.runs[-1]
        if sig.id in _RUN_START_SIGS and run.ended_clean:
            run.end = n - 1
            run = _Run(start=n)
            self.runs.append(run)
        if sig.id == "engine_config" and isinstance(groups.get("tp"), int):
            self.tp_size = max(self.tp_size, groups["tp"])
        ev = _Event(n, ll, sig)

        if kind in _UP_KINDS:
            if kind == "ready" and run.pending_stall is not None:
                run.pending_stall = None  # start-up work: it came up after the stall
            elif run.pending_stall is not None and run.unresolved_stall is None:
                run.unresolved_stall = run.pending_stall  # up without a ready: mid-run log
            run.up = run.up_any = True
            if (
                sig.id == "access_log"
                and 200 <= groups.get("status", 0) < 300
                and _INFERENCE_PATH.match(str(groups.get("path", "")))
            ):
                run.ok_inference += 1
        elif kind in FAILURE_KINDS:
            if sig.generic and run.stop_requested and not run.failures:
                return  # 0.32 logs EngineDeadError on every requested stop: noise, not a failure
            run.failures.append(ev)
            if ll.message.endswith(_TB_START):  # 0.7.x "EngineCore hit an exception: Traceback ..."
                ev.own_chain = self.open_chains.get((ll.process, ll.pid))
            else:
                self.awaiting_own[(ll.process, ll.pid)] = ev
            if run.ok_before_failure is None:
                run.ok_before_failure = run.ok_inference
            run.ended_clean = True
        elif kind == "shm_stall":
            if run.up:
                if run.stall_up is None:
                    run.stall_up = ev
                    run.ok_before_stall = run.ok_inference
            elif run.pending_stall is None:
                run.pending_stall = ev
                run.ok_before_stall = run.ok_inference
        elif kind == "shutdown":
            run.ended_clean = True
            if sig.id in _REQUESTED_STOP_SIGS:
                run.stop_requested = True
        elif kind == "leaked_resources":
            self.leaks.append(sig)

        if kind in _FIRST_PER_RUN_KINDS:
            if kind in run.first_kinds:
                return
            run.first_kinds.add(kind)
        count = self.per_sig.get(sig.id, 0)
        if count >= MAX_PER_SIGNATURE:
            return
        self.per_sig[sig.id] = count + 1
        self.findings.append(Finding(kind, n, ll.process, ll.pid, redact(ll.message), sig.id))

    # -- conclusions
    def result(self) -> Diagnosis:
        self.runs[-1].end = self.lineno
        if not self.recognised:
            return Diagnosis("unknown", [], None, [])
        verdict, run = "healthy", None
        for _rank, name in ((0, "startup_failed"), (1, "engine_dead"), (2, "stalled")):
            for r in self.runs:
                if (
                    (name == "startup_failed" and r.failures and not r.up_any)
                    or (name == "engine_dead" and r.failures and r.up_any)
                    or (name == "stalled" and r.stall_event() is not None)
                ):
                    verdict, run = name, r
                    break
            if run is not None:
                break
        root_cause, root_sig = (None, None) if run is None else self._root_cause(verdict, run)
        advice = self._advice(verdict, run, root_sig)
        return Diagnosis(verdict, self.findings, root_cause, advice)

    def _root_cause(self, verdict: str, run: _Run) -> tuple[str | None, Signature | None]:
        if verdict == "stalled":
            ev = run.stall_event()
            assert ev is not None  # noqa: S101 - narrows: the verdict stalled means a stall event
            return redact(ev.ll.message), ev.sig
        f = run.failures[0]
        in_run = [c for c in self.chains if run.start <= c.start <= run.end]
        # 1. The first failure's own traceback: logger.exception(msg) prints msg, then the traceback
        #    as the next lines of the same process ("WorkerProc hit an exception." + the worker's error).
        if f.own_chain is not None and (exc := _specific_exception(f.own_chain)) is not None:
            return redact(exc.text), exc.sig
        # 2. A specific first failure explains itself; later tracebacks of other processes are its
        #    consequences (a SIGKILLed worker makes the engine core raise "RuntimeError: cancelled").
        if not f.sig.generic:
            return redact(f.ll.message), f.sig
        # 3. A generic first failure: the first specific exception after it, else one that ended
        #    just before it (a worker can print its traceback before the engine notices).
        after = [c for c in in_run if c.start >= f.line]
        before = [c for c in reversed(in_run) if c.start < f.line and c.end >= f.line - _LOOKBACK_LINES]
        for chain in after + before:
            if (exc := _specific_exception(chain)) is not None:
                return redact(exc.text), exc.sig
        # 4. The first specific failure line, else the first failure line.
        ev = next((e for e in run.failures if not e.sig.generic), f)
        return redact(ev.ll.message), ev.sig

    def _advice(self, verdict: str, run: _Run | None, root_sig: Signature | None) -> list[str]:
        advice: list[str] = []

        def add(text: str) -> None:
            if text and text not in advice:
                advice.append(text)

        if root_sig is not None:
            add(root_sig.action)
        if run is not None and verdict in ("engine_dead", "stalled"):
            ok_before = run.ok_before_failure if verdict == "engine_dead" else run.ok_before_stall
            hang_type = root_sig is not None and (root_sig.generic or root_sig.suspect_collectives)
            tp_gt_1 = self.workers_seen or self.tp_size > 1
            if tp_gt_1 and hang_type and not ok_before:
                for text in _TP_ADVICE:
                    add(text)
        if run is not None:
            specific = [ev.sig for ev in run.failures if not ev.sig.generic]
            for sig in specific or [ev.sig for ev in run.failures[:1]]:
                add(sig.action)
        for sig in self.leaks:
            add(sig.action)
        return advice


# ---------------------------------------------------------------------------- public API


def analyze(lines: Iterable[str], catalog: Catalog | None = None) -> Diagnosis:
    """Diagnose a vLLM log given as lines (trailing newlines allowed). See the module docstring."""
    a = _Analyzer(catalog if catalog is not None else default_catalog())
    for raw in lines:
        a.feed(raw)
    return a.result()


def _specific_exception(chain: _Chain) -> _Exc | None:
    """The last non-generic exception of a traceback chain (read back from the final one)."""
    for exc in reversed(chain.excs):
        if exc.sig is None or not exc.sig.generic:
            return exc
    return None


def _read_lines(path: str | PathLike[str]) -> Iterator[str]:
    # Binary iteration splits on b"\n" only, so line numbers match grep -n even when tqdm wrote
    # bare "\r"; each line is decoded on its own, so invalid UTF-8 costs one replacement char.
    with open(path, "rb") as f:
        for b in f:
            yield b.decode("utf-8", errors="replace")


def diagnose_file(path: str | PathLike[str], catalog: Catalog | None = None) -> Diagnosis:
    """`analyze` a log file. Raises OSError if it cannot be opened or read."""
    return analyze(_read_lines(path), catalog)


def render_text(d: Diagnosis | dict[str, Any], *, max_findings: int = 25, width: int = 160) -> str:
    """A short human summary of a Diagnosis (or of its to_json() form)."""
    if isinstance(d, dict):
        d = Diagnosis.from_json(d)

    def cut(s: str) -> str:
        return s if len(s) <= width else s[: width - 1] + "…"

    out = [f"verdict: {d.verdict}"]
    if d.root_cause:
        out.append(f"root cause: {cut(d.root_cause)}")
    if d.advice:
        out.append("advice:")
        out.extend(f"  {i}. {a}" for i, a in enumerate(d.advice, 1))
    if d.findings:
        out.append(f"findings ({len(d.findings)}):")
        for f in d.findings[:max_findings]:
            who = f" [{f.process} {f.pid}]" if f.process else (f" [pid {f.pid}]" if f.pid else "")
            out.append(cut(f"  line {f.line:>6}  {f.kind:<16}{who} {f.message}"))
        if len(d.findings) > max_findings:
            out.append(f"  ... {len(d.findings) - max_findings} more (use --json for all)")
    elif d.verdict == "unknown":
        out.append("no vLLM log line was recognised")
    return "\n".join(out)


# ---- stacks: naming the stuck rank (issue 17) ------------------------------------------------------
#
# Input: the StacksReport vsup records before a hung tree's teardown (incident bundle stacks.json),
# or a live `vsup stacks --json`. Each process's threads are classified with the catalog's [[stack]]
# signatures (the main thread first; a thread in a collective anywhere in the process wins, as a
# worker's collective can run on a helper thread). Then, in this order:
#   1. a process in state T (stopped) or t (traced) is stuck: it runs no code at all;
#   2. a process in state D (uninterruptible sleep) is stuck in the kernel (its wchan names where);
#   3. workers in a collective wait for the ranks that are not in it: if some are and others are
#      not (and none is stopped), the others are the stuck ranks, at their innermost frame;
#   4. if every worker is inside the collective and none is stopped, the collective itself hangs
#      (the seed: custom all-reduce on PCIe GPUs): every rank is named, with the collective's frame.
# Everything else is listed as waiting, with the meaning of its signature (the engine core waiting
# for the workers' reply, an idle API server event loop), so the report reads as a chain.
_STOPPED_STATES = frozenset({"T", "t"})


@dataclass
class StackVerdict:
    stuck: list[dict[str, Any]] = field(default_factory=list)
    waiting: list[dict[str, Any]] = field(default_factory=list)
    summary: str = ""
    mechanism: str | None = None
    complete: bool = False

    def to_json(self) -> dict[str, Any]:
        return {
            "summary": self.summary,
            "stuck": self.stuck,
            "waiting": self.waiting,
            "mechanism": self.mechanism,
            "complete": self.complete,
        }


def _frame_text(f: Any) -> str:
    """A stored frame [func, file, line] as the signatures see it: `func (file:line)`."""
    func, file, line = f[0], f[1], f[2]
    return f"{func} ({file}:{line if line is not None else '?'})"


def _short_frame(f: Any) -> str:
    func, file, line = f[0], f[1], f[2]
    base = str(file).rsplit("/", 1)[-1]
    return f"{func} ({base}:{line if line is not None else '?'})"


_STDLIB_WAITS = frozenset(
    {"threading.py", "queue.py", "selectors.py", "contextlib.py", "connection.py", "poll.py"}
)


def _own_frame(frames: list[Any]) -> str | None:
    """The innermost frame that is not a generic wait helper (Condition.wait, Queue.get, select):
    where the program itself decided to wait."""
    for f in frames:
        if str(f[1]).rsplit("/", 1)[-1] not in _STDLIB_WAITS:
            return _short_frame(f)
    return _short_frame(frames[0]) if frames else None


def _classify(proc: dict[str, Any], catalog: Catalog) -> dict[str, Any]:
    """The process's signature: the main thread's, unless another thread is in a collective."""
    threads = proc.get("threads") or []
    main = next((t for t in threads if t.get("main")), threads[0] if threads else None)
    ordered = ([main] if main else []) + [t for t in threads if t is not main]
    best: dict[str, Any] | None = None
    for t in ordered:
        frames = t.get("frames") or []
        hit = catalog.match_stack([_frame_text(f) for f in frames])
        if hit is None:
            continue
        sig, i = hit
        found = {
            "signature": sig.id,
            "category": sig.category,
            "meaning": sig.meaning,
            "frame": _short_frame(frames[i]),
            "innermost": _own_frame(frames),
            "thread": t.get("name") or t.get("ident"),
        }
        if best is None:
            best = found
        if sig.category == "collective":
            return found
    if best is not None:
        return best
    frames = (main or {}).get("frames") or []
    return {
        "signature": None,
        "category": None,
        "meaning": "no stack signature matches",
        "frame": _own_frame(frames),
        "innermost": _own_frame(frames),
        "thread": (main or {}).get("name") or (main or {}).get("ident"),
    }


def analyze_stacks(report: dict[str, Any], catalog: Catalog | None = None) -> StackVerdict:
    """Name the stuck rank(s) of a stacks report and what every other process waits for."""
    catalog = catalog if catalog is not None else default_catalog()
    procs = [p for p in report.get("processes") or [] if p.get("role") != "resource_tracker"]
    rows: list[dict[str, Any]] = []
    for p in procs:
        c = _classify(p, catalog)
        rows.append(
            {
                "label": p.get("label") or p.get("title"),
                "pid": p.get("pid"),
                "role": p.get("role"),
                "rank": p.get("rank"),
                "state": p.get("state"),
                "wchan": p.get("wchan"),
                "cpu_pct": p.get("cpu_pct"),
                "error": p.get("error"),
                **c,
            }
        )
    stuck: dict[int, str] = {}
    for r in rows:
        if r["state"] in _STOPPED_STATES:
            stuck[r["pid"]] = "stopped (state T): it runs no code until it gets SIGCONT"
        elif r["state"] == "D":
            stuck[r["pid"]] = f"in uninterruptible sleep in the kernel (wchan {r['wchan'] or '?'})"
    workers = [r for r in rows if r["role"] == "worker"]
    in_coll = [r for r in workers if r["category"] == "collective"]
    collective = in_coll[0]["frame"] if in_coll else None
    if in_coll and not any(r["role"] == "worker" for r in rows if r["pid"] in stuck):
        others = [r for r in workers if r["category"] != "collective" and r["pid"] not in stuck]
        # A rank that runs (state R, or busy over the CPU window) is computing its way to the
        # collective, as every rank of a busy server does between two all-reduces: not stuck.
        blocked = [r for r in others if r["state"] != "R" and (r["cpu_pct"] or 0.0) < 20.0]
        if others:
            for r in blocked:
                stuck[r["pid"]] = (
                    f"not in the collective its peers wait in ({collective}): blocked at "
                    f"{r['innermost'] or 'an unknown frame'} "
                    f"(state {r['state'] or '?'}, wchan {r['wchan'] or '-'})"
                )
        elif len(in_coll) == len(workers) and len(workers) > 1:
            for r in in_coll:
                stuck[r["pid"]] = (
                    f"every rank is inside the collective ({r['frame']}) and none is missing: the collective "
                    "itself hangs if they stay there (on GPUs: custom all-reduce or NCCL P2P; try "
                    "--disable-custom-all-reduce, then NCCL_P2P_DISABLE=1); one sample of a busy server "
                    "can catch every rank here too"
                )
    v = StackVerdict(mechanism=report.get("mechanism"), complete=bool(report.get("complete")))
    for r in rows:
        entry = {
            k: r[k]
            for k in (
                "label",
                "pid",
                "role",
                "rank",
                "state",
                "wchan",
                "cpu_pct",
                "frame",
                "signature",
                "meaning",
            )
        }
        if r["pid"] in stuck:
            # Where it stopped (innermost frame), and the recognised frame around it, if another.
            entry["frame"] = r["innermost"] if r["category"] != "collective" else r["frame"]
            if r["signature"] and r["frame"] != entry["frame"]:
                entry["within"] = r["frame"]
            entry["why"] = stuck[r["pid"]]
            v.stuck.append(entry)
        else:
            if r["error"] and not r["frame"]:
                entry["meaning"] = f"no stacks: {r['error']}"
            v.waiting.append(entry)
    if v.stuck:
        names = ", ".join(
            f"{s['label']} (pid {s['pid']}, state {s['state'] or '?'}, at {s['frame'] or '?'})"
            for s in v.stuck
        )
        v.summary = f"stuck: {names}"
    elif not rows:
        v.summary = "no process stacks recorded" + (
            f" ({report.get('reason')})" if report.get("reason") else ""
        )
    else:
        v.summary = (
            "no rank stands out: no process is stopped or in D state, "
            "and no collective is waiting on a missing rank"
        )
    return v


def persistent_stuck(
    first: dict[str, Any], second: dict[str, Any], catalog: Catalog | None = None
) -> list[dict[str, Any]]:
    """Stack evidence for confirming a hang: the ranks named stuck in two reports taken some
    seconds apart, at the same frame in both, while the engine core waits for the workers'
    reply in both. Empty when anything moved.

    One sample is not proof: a busy engine core sits in that wait for most of every step, and
    every rank of a busy server passes through the all-reduce. The owner must still see no
    token progress (/metrics) between the samples before it tears the server down.
    """
    a, b = analyze_stacks(first, catalog), analyze_stacks(second, catalog)

    def engine_waits(v: StackVerdict) -> bool:
        return any(
            w["role"] == "engine_core" and w.get("signature") == "engine_waits_workers" for w in v.waiting
        )

    if not (engine_waits(a) and engine_waits(b)):
        return []
    earlier = {(s["pid"], s["frame"]) for s in a.stuck}
    return [s for s in b.stuck if (s["pid"], s["frame"]) in earlier]


def diagnose_bundle(path: str | PathLike[str], catalog: Catalog | None = None) -> dict[str, Any]:
    """`vsup diagnose <incident bundle dir>`: the incident's reason and findings, and the stack
    verdict from its stacks.json. Raises OSError if the directory cannot be read."""
    import json
    from pathlib import Path

    d = Path(path)
    out: dict[str, Any] = {"bundle": str(d)}
    inc = d / "incident.json"
    if inc.exists():
        summary = json.loads(inc.read_text())
        out["reason"] = summary.get("reason")
        out["kind"] = summary.get("kind")
        out["diagnosis"] = summary.get("findings") or None
    elif (d / "log_tail.txt").exists():
        out["diagnosis"] = diagnose_file(d / "log_tail.txt", catalog).to_json()
    st = d / "stacks.json"
    if st.exists():
        report = json.loads(st.read_text())
        out["stacks"] = analyze_stacks(report or {}, catalog).to_json()
    else:
        out["stacks"] = None
    if not inc.exists() and not st.exists() and not (d / "log_tail.txt").exists():
        raise FileNotFoundError(
            2, "not an incident bundle (no incident.json, stacks.json or log_tail.txt)", str(d)
        )
    return out


def render_stacks(v: dict[str, Any], *, width: int = 160) -> str:
    """The stack verdict for a human: who is stuck and where, then what everyone else waits for."""

    def cut(s: str) -> str:
        return s if len(s) <= width else s[: width - 1] + "…"

    out = [cut(f"stacks: {v.get('summary')}")]
    for s in v.get("stuck") or []:
        out.append(
            cut(
                f"  STUCK   {s['label']:<12} pid {s['pid']:<7} state {s.get('state') or '?'}  "
                f"at {s.get('frame')}"
            )
        )
        if s.get("within"):
            out.append(cut(f"          within {s['within']}: {s.get('meaning')}"))
        out.append(cut(f"          {s['why']}"))
    for w in v.get("waiting") or []:
        cpu = w.get("cpu_pct")
        out.append(
            cut(
                f"  waiting {w['label']:<12} pid {w['pid']:<7} state {w.get('state') or '?'}"
                f"{'' if cpu is None else f' cpu {cpu:.0f}%'}  at {w.get('frame') or '?'}: {w.get('meaning')}"
            )
        )
    if v.get("mechanism") is None:
        out.append("  (no stacks were recorded: see the report's reason)")
    return "\n".join(out)


def render_bundle(b: dict[str, Any]) -> str:
    out = [f"incident: {b.get('bundle')}"]
    if b.get("reason"):
        out.append(f"reason: {b['reason']} ({b.get('kind')})")
    if b.get("diagnosis"):
        out.append(render_text(b["diagnosis"]))
    if b.get("stacks"):
        out.append(render_stacks(b["stacks"]))
    else:
        out.append("stacks: none recorded in this bundle")
    return "\n".join(out)
