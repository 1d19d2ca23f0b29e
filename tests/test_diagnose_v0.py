"""`vsup diagnose` on real vLLM V0 captures (vLLM 0.8.5 CPU build, VLLM_USE_V1=0, TP=2).

The captures are described in tests/data/logs/README.md ("V0 engine"). V0 logs every request
with its prompt at INFO (`Received request ...: prompt: '...'`): none of it may reach the output.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vsup.diagnose import diagnose_file, render_text

LOGS = Path(__file__).parent / "data" / "logs"

# file -> (verdict, substring of the root cause or None)
V0 = {
    "v0_clean_start_stop.log": ("healthy", None),
    # the killed API server writes nothing; the tracker's leak warnings when the orphans die are noise
    "v0_sigkill_api.log": ("healthy", None),
    # the engine's line, not the API server's 'Worker processes are not running' 10 s later
    "v0_sigkill_worker.log": ("engine_dead", "Worker VllmWorkerProcess pid 28948 died, exit code: -9"),
    "v0_sigkill_engine.log": ("engine_dead", "Engine process (pid 30101) died"),
    # DEBUG level, 75 s stopped: no stall line at all (only the canary sees this hang)
    "v0_sigstop_worker.log": ("healthy", None),
}


@pytest.mark.parametrize("name", sorted(V0))
def test_v0_capture_verdict_and_root_cause(name: str) -> None:
    verdict, cause = V0[name]
    d = diagnose_file(LOGS / name)
    assert d.verdict == verdict, render_text(d)
    if cause is None:
        assert d.root_cause is None, d.root_cause
    else:
        assert d.root_cause is not None and cause in d.root_cause, render_text(d)


def test_every_v0_capture_is_listed() -> None:
    assert sorted(p.name for p in LOGS.glob("v0_*.log")) == sorted(V0)


@pytest.mark.parametrize("name", sorted(V0))
def test_v0_prompts_never_reach_the_output(name: str) -> None:
    raw = (LOGS / name).read_text(encoding="utf-8", errors="replace")
    prompts = {"user: hi", "user: Say hi", "user: Say OK"}
    present = {p for p in prompts if p in raw}
    assert present, "V0 logs each request's prompt at INFO"
    d = diagnose_file(LOGS / name)
    out = json.dumps(d.to_json()) + render_text(d, max_findings=1000, width=100_000)
    assert not {p for p in present if p in out}


def test_v0_worker_death_consequence_is_recognised_but_not_the_cause() -> None:
    """The API server's 'Worker processes are not running' (heartbeat, ~10 s after the death) is
    an engine_dead finding of its own, and the worker's exit stays the root cause."""
    d = diagnose_file(LOGS / "v0_sigkill_worker.log")
    kinds = {(f.kind, f.signature) for f in d.findings}
    assert ("engine_dead", "v0_workers_not_running") in kinds, render_text(d, max_findings=100)
    assert d.root_cause is not None and d.root_cause.startswith("Worker VllmWorkerProcess pid 28948 died")


def test_v0_stall_capture_is_at_debug_and_has_no_stall_line() -> None:
    """Why the hang test relies on the canary: the 75 s stopped-worker capture, at DEBUG, has no
    shm_broadcast line, and /health answered 200 throughout (tests/data/logs/README.md)."""
    raw = (LOGS / "v0_sigstop_worker.log").read_text(encoding="utf-8", errors="replace")
    assert "DEBUG" in raw and "No available" not in raw
