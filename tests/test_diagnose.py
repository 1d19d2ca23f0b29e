"""Tests for vsup.diagnose: verdicts, root causes, advice and redaction on real and synthetic logs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vsup.diagnose import (
    ADVICE_DISABLE_CUSTOM_AR,
    ADVICE_NCCL_P2P,
    VERDICTS,
    Diagnosis,
    analyze,
    diagnose_file,
    render_text,
)

DATA = Path(__file__).parent / "data"
SYN = DATA / "synthetic"
LOGS = DATA / "logs"
SEED = SYN / "seed_0.6.3.log"


def has_hangul(text: str) -> bool:
    return any(
        "\uac00" <= ch <= "\ud7a3" or "\u1100" <= ch <= "\u11ff" or "\u3130" <= ch <= "\u318f" for ch in text
    )


# ---------------------------------------------------------------------- the seed (acceptance)


def test_seed_verdict_is_engine_dead():
    """The seed incident (0.6.3, TP=2, 'Engine loop has died') is an engine death."""
    assert diagnose_file(SEED).verdict == "engine_dead"


def test_seed_finds_the_063_stall_line():
    """The worker's 'No available block found in 60 second.' is a shm_stall finding with its prefix."""
    stalls = [f for f in diagnose_file(SEED).findings if f.kind == "shm_stall"]
    assert len(stalls) == 1
    s = stalls[0]
    assert (s.line, s.process, s.pid) == (17, "VllmWorkerProcess", 1064554)
    assert "No available block found in 60 second." in s.message


def test_seed_advises_disable_custom_all_reduce_then_nccl_p2p():
    """TP>1 engine death at the first request: --disable-custom-all-reduce comes before NCCL_P2P_DISABLE=1."""
    advice = diagnose_file(SEED).advice
    assert (
        "--disable-custom-all-reduce" in ADVICE_DISABLE_CUSTOM_AR and "NCCL_P2P_DISABLE=1" in ADVICE_NCCL_P2P
    )
    assert advice.index(ADVICE_DISABLE_CUSTOM_AR) < advice.index(ADVICE_NCCL_P2P)


def test_seed_root_cause_is_the_engine_loop_exception():
    """The root cause is the exception line, not the CRITICAL 'already dead' consequence."""
    assert diagnose_file(SEED).root_cause == "RuntimeError: Engine loop has died"


def test_seed_json_contains_no_prompt_text():
    """Neither the Korean prompt nor its token ids appear anywhere in the JSON output."""
    text = json.dumps(diagnose_file(SEED).to_json(), ensure_ascii=False)
    assert not has_hangul(text)
    assert "128000, 128006" not in text
    assert "begin_of_text" not in text
    assert "chat-8eee432560b948a88f57fe4114e19ab8" in text  # the request id stays readable


def test_seed_human_output_contains_no_prompt_text():
    """The text rendering is redacted too."""
    out = render_text(diagnose_file(SEED), max_findings=100, width=10_000)
    assert not has_hangul(out) and "engine_dead" in out


def test_json_shape_is_exact():
    """to_json has exactly the issue's keys, findings exactly kind/line/process/pid/message."""
    j = diagnose_file(SEED).to_json()
    assert set(j) == {"verdict", "findings", "root_cause", "advice"}
    assert j["findings"] and all(
        set(f) == {"kind", "line", "process", "pid", "message"} for f in j["findings"]
    )
    first = j["findings"][0]
    assert (first["kind"], first["line"], first["process"], first["pid"]) == ("serving", 1, None, None)
    json.dumps(j)  # serialisable


# ---------------------------------------------------------------------- real 0.32 captures

# file -> (verdict, substring of root cause or None). Captures of faults from vllm-facts.md.
REAL = {
    "clean_start_stop.log": ("healthy", None),
    "log_requests_debug.log": ("healthy", None),
    "sigkill_worker.log": ("engine_dead", "Worker proc VllmWorker-1 died unexpectedly (exit code: -9)"),
    "sigkill_engine.log": ("engine_dead", "engine core exited unexpectedly"),
    "sigkill_worker_inflight.log": (
        "engine_dead",
        "Worker proc VllmWorker-1 died unexpectedly (exit code: -9)",
    ),
    "sigkill_api.log": ("healthy", None),  # nothing in the log says so: the daemon sees the exit
    "sigstop_worker.log": ("stalled", "No available shared memory broadcast block found"),
    # SIGTERM 8 s into a hang, before the first 60 s stall line: the log shows only a requested stop.
    "sigterm_while_hung.log": ("healthy", None),
    "head_dim16.log": ("engine_dead", "Unsupported CPU attention configuration: head_dim=16"),
    "missing_bind_env.log": ("startup_failed", "AssertionError: Not enough allowed NUMA nodes"),
}
PRESENT = sorted(p.name for p in LOGS.glob("*.log"))


@pytest.mark.parametrize("name", [n for n in PRESENT if n in REAL])
def test_real_capture_verdict_and_root_cause(name):
    """Each real 0.32 capture gives the verdict its fault should give, with the specific root cause."""
    verdict, cause = REAL[name]
    d = diagnose_file(LOGS / name)
    assert d.verdict == verdict, render_text(d)
    if cause is None:
        assert d.root_cause is None
    else:
        assert d.root_cause is not None and cause in d.root_cause


@pytest.mark.parametrize("name", PRESENT)
def test_every_real_capture_is_recognised(name):
    """Every capture (also ones added later) yields a known verdict other than unknown."""
    d = diagnose_file(LOGS / name)
    assert d.verdict in VERDICTS and d.verdict != "unknown"


def test_requested_shutdown_noise_is_not_an_engine_death():
    """0.32 logs EngineDeadError on a requested stop; after the shutdown lines it is not a failure."""
    d = diagnose_file(LOGS / "log_requests_debug.log")
    assert d.verdict == "healthy"
    assert not [f for f in d.findings if f.kind == "engine_dead"]


def test_debug_capture_output_has_no_prompt():
    """The DEBUG capture logs prompts, token ids and outputs; none reach the diagnosis."""
    raw = (LOGS / "log_requests_debug.log").read_text(encoding="utf-8", errors="replace")
    assert "Say hi" in raw  # the capture does contain a prompt
    d = diagnose_file(LOGS / "log_requests_debug.log")
    out = json.dumps(d.to_json()) + render_text(d, max_findings=1000, width=100_000)
    assert "Say hi" not in out and "475, 308" not in out


def test_inflight_worker_kill_root_cause_is_not_the_engine_consequence():
    """With a request in flight the engine core then raises 'RuntimeError: cancelled': a consequence."""
    d = diagnose_file(LOGS / "sigkill_worker_inflight.log")
    assert d.root_cause is not None and d.root_cause.startswith("Worker proc VllmWorker-1 died unexpectedly")
    assert [f.kind for f in d.findings].count("engine_dead") >= 2  # the consequences are still listed


def test_startup_failure_after_executor_shutdown_line_is_kept():
    """0.32 logs '[shutdown] Executor: ...' before 'EngineCore failed to start.': still a failure."""
    d = diagnose_file(LOGS / "missing_bind_env.log")
    failed = [f for f in d.findings if f.message == "EngineCore failed to start."]
    assert failed and failed[0].kind == "startup_failed"
    assert any("VLLM_CPU_OMP_THREADS_BIND" in a for a in d.advice)


def test_head_dim16_root_cause_is_the_workers_error():
    """The model that dies at its first request names the worker's CPU attention error, not EngineDeadError."""
    d = diagnose_file(LOGS / "head_dim16.log")
    assert d.root_cause.startswith("RuntimeError: Unsupported CPU attention configuration: head_dim=16")
    assert ADVICE_DISABLE_CUSTOM_AR not in d.advice  # a model-shape error, not a hang


def test_sigkill_worker_root_cause_skips_generic_executor_failed():
    """A SIGKILLed worker leaves only generic tracebacks; the worker death line is the root cause."""
    d = diagnose_file(LOGS / "sigkill_worker.log")
    assert d.root_cause is not None and "RuntimeError: Executor failed." not in d.root_cause
    assert ADVICE_DISABLE_CUSTOM_AR not in d.advice  # a kill is not a hang


# ---------------------------------------------------------------------- synthetic: other versions


@pytest.mark.parametrize(
    "name,verdict,cause",
    [
        ("v0.6.3_stall_then_ready.log", "healthy", None),
        ("v0.6.3_ansi_colours.log", "healthy", None),
        ("v0.8.5_worker_oom.log", "engine_dead", "torch.OutOfMemoryError: CUDA out of memory"),
        (
            "v0.10.2_startup_no_kv_memory.log",
            "startup_failed",
            "ValueError: No available memory for the cache blocks",
        ),
        (
            "v0.11.0_stall_after_ready.log",
            "stalled",
            "No available shared memory broadcast block found in 60 seconds",
        ),
        ("v0.33_nccl_first_request.log", "engine_dead", "RuntimeError: NCCL error: unhandled system error"),
        ("midrun_stall_no_ready.log", "stalled", "No available shared memory broadcast block"),
        ("startup_stall_nothing_after.log", "stalled", "No available shared memory broadcast block"),
        ("two_runs_startup_failed_then_ok.log", "startup_failed", "Not enough allowed NUMA nodes"),
    ],
)
def test_synthetic_version_logs(name, verdict, cause):
    """Hand-built logs in each version's exact wording give the expected verdict and root cause."""
    d = diagnose_file(SYN / name)
    assert d.verdict == verdict, render_text(d)
    assert (d.root_cause is None) if cause is None else (cause in (d.root_cause or ""))


def test_stall_before_ready_is_startup_work():
    """A 0.6.3 stall line during start-up followed by ready is healthy, and still listed."""
    d = diagnose_file(SYN / "v0.6.3_stall_then_ready.log")
    assert d.verdict == "healthy" and any(f.kind == "shm_stall" for f in d.findings)


def test_worker_oom_root_cause_is_the_workers_exception_not_engine_dead_error():
    """The worker's own OOM beats 'EngineCore encountered a fatal error' and EngineDeadError."""
    d = diagnose_file(SYN / "v0.8.5_worker_oom.log")
    assert d.root_cause.startswith("torch.OutOfMemoryError")
    assert ADVICE_DISABLE_CUSTOM_AR not in d.advice  # an OOM is not a hang
    assert any("max-model-len" in a for a in d.advice)


def test_startup_failure_root_cause_follows_the_chain_past_generic_wrapper():
    """'Engine core initialization failed. See root cause above.' is passed over for the ValueError."""
    d = diagnose_file(SYN / "v0.10.2_startup_no_kv_memory.log")
    assert d.root_cause.startswith("ValueError: No available memory")


def test_nccl_error_at_first_request_with_tp2_gets_custom_allreduce_advice():
    """TP=2 (workers seen) NCCL failure before any successful request advises both steps."""
    advice = diagnose_file(SYN / "v0.33_nccl_first_request.log").advice
    assert ADVICE_DISABLE_CUSTOM_AR in advice and ADVICE_NCCL_P2P in advice


def test_stall_after_successful_requests_gets_no_first_request_advice():
    """A stall after requests succeeded (and no TP evidence) does not advise custom all-reduce."""
    d = diagnose_file(SYN / "midrun_stall_no_ready.log")
    assert d.verdict == "stalled" and ADVICE_DISABLE_CUSTOM_AR not in d.advice


def test_tp_from_command_line_in_log():
    """'-tp 2' in an echoed command line counts as TP>1."""
    lines = [
        "python -m vllm.entrypoints.openai.api_server --model m -tp 2 --enforce-eager",
        "INFO:     Application startup complete.",
        "ERROR 03-12 06:01:27 client.py:250] RuntimeError: Engine loop has died",
    ]
    assert ADVICE_DISABLE_CUSTOM_AR in analyze(lines).advice
    assert ADVICE_DISABLE_CUSTOM_AR not in analyze(lines[1:]).advice  # without it: no TP evidence


# ---------------------------------------------------------------------- rules in small


def test_unknown_when_nothing_is_recognised():
    """Text that is not a vLLM log gives unknown, no findings, no root cause."""
    d = analyze(["hello", "world"])
    assert (d.verdict, d.findings, d.root_cause, d.advice) == ("unknown", [], None, [])


def test_failure_with_no_up_sign_is_startup_failed():
    """A failure with nothing showing the server was up is a start-up failure."""
    d = analyze(["(EngineCore pid=1) ERROR 11-24 04:10:02 [core.py:1510] EngineCore failed to start."])
    assert d.verdict == "startup_failed"


def test_midrun_failure_with_later_500_is_engine_dead():
    """A log that begins at the failure, followed by a 500 access line, shows the server was up."""
    d = analyze(
        [
            "ERROR 03-12 06:01:27 client.py:250] RuntimeError: Engine loop has died",
            'INFO:     1.2.3.4:5 - "POST /v1/chat/completions HTTP/1.1" 500 Internal Server Error',
        ]
    )
    assert d.verdict == "engine_dead"


def test_stall_then_serving_without_ready_is_stalled():
    """A stall followed by serving lines but no ready line (mid-run log) is a stall, not start-up."""
    d = analyze(
        [
            "(EngineCore pid=1) INFO 11-24 03:53:10 [shm_broadcast.py:802] No available shared memory broadcast block found in 60 seconds.",
            'INFO:     1.2.3.4:5 - "GET /health HTTP/1.1" 200 OK',
        ]
    )
    assert d.verdict == "stalled"


def test_engine_dead_outranks_stall():
    """A stall and a death: the verdict is the worse, engine_dead."""
    d = analyze(
        [
            "INFO:     Application startup complete.",
            "(EngineCore pid=1) INFO 11-24 03:53:10 [shm_broadcast.py:802] No available shared memory broadcast block found in 60 seconds.",
            "(EngineCore pid=1) ERROR 11-24 03:55:10 [core.py:1512] EngineCore encountered a fatal error.",
        ]
    )
    assert d.verdict == "engine_dead"


def test_repeated_stalls_are_capped():
    """Hours of 60 s stall lines do not flood the findings."""
    stall = "(EngineCore pid=1) INFO 11-24 03:53:10 [shm_broadcast.py:802] No available shared memory broadcast block found in 60 seconds."
    d = analyze(["INFO:     Application startup complete."] + [stall] * 500)
    assert d.verdict == "stalled" and 1 <= sum(f.kind == "shm_stall" for f in d.findings) <= 20


def test_line_numbers_count_every_line():
    """Findings carry 1-based line numbers of the input, blank and unparsed lines included."""
    d = analyze(["", "garbage", "INFO:     Application startup complete."])
    assert [(f.kind, f.line) for f in d.findings] == [("ready", 3)]


def test_diagnose_file_handles_invalid_utf8_and_bare_cr(tmp_path):
    """Invalid bytes become U+FFFD, a bare CR (tqdm) does not split a line, numbers match grep -n."""
    p = tmp_path / "x.log"
    p.write_bytes(
        b"progress 10%\rprogress 100%\n\xff\xfe bad bytes\nINFO:     Application startup complete.\n"
    )
    d = diagnose_file(p)
    assert d.verdict == "healthy" and d.findings[0].line == 3


def test_diagnose_file_missing_raises_oserror(tmp_path):
    """An unreadable file raises OSError for the CLI to turn into exit status 2."""
    with pytest.raises(OSError):
        diagnose_file(tmp_path / "missing.log")


def test_render_text_summary():
    """The human summary names verdict, root cause and numbered advice."""
    d = Diagnosis("engine_dead", [], "RuntimeError: boom", ["do this", "then that"])
    assert (
        render_text(d)
        == "verdict: engine_dead\nroot cause: RuntimeError: boom\nadvice:\n  1. do this\n  2. then that"
    )


def test_render_text_accepts_the_json_form():
    """A diagnosis that travelled as JSON (daemon socket) renders the same as the object."""
    d = diagnose_file(SEED)
    assert render_text(d.to_json()) == render_text(d)
    assert Diagnosis.from_json(d.to_json()).to_json() == d.to_json()
