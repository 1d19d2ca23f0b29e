"""Confirming a hang fast without confirming a slow server (issue 17): the pure decision logic
(policy.judge_hang, policy.Strikes) and the watchers that feed it (watchers.hang_check, the
canary skipped when real traffic proved the engine), on a fake clock, in-process.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from vsup import config as config_mod
from vsup import policy, stacks, watchers
from vsup.config import Config
from vsup.probes import ProbeResult

ENGINE_WAITS = [["get_response", "/v/vllm/v1/executor/multiproc_executor.py", 440]]
ENGINE_IDLE = [["_process_input_queue", "/v/vllm/v1/engine/core.py", 1588]]
COLL = [
    ["__call__", "/v/torch/_ops.py", 1279],
    ["all_reduce", "/v/vllm/distributed/device_communicators/cpu_communicator.py", 275],
]
BLOCKED = [["wait", "/p/threading.py", 327], ["blocked_outside", "/v/fake/worker.py", 10]]
SPIN = [
    ["sched_yield", "/v/vllm/distributed/utils.py", 46],
    ["worker_busy_loop", "/v/multiproc_executor.py", 9],
]


def _proc(rank: int | None, role: str, state: str, frames: list[list[Any]], pid: int) -> dict[str, Any]:
    p = stacks.ProcessStacks(pid=pid, create_time=0, title=role, role=role, rank=rank, state=state)
    p.threads = [
        stacks.ThreadStack(str(pid), "MainThread", None, True, [stacks.Frame.from_json(f) for f in frames])
    ]
    return p.to_json()


def report(
    tp1_state: str = "S", tp1: list[list[Any]] = BLOCKED, engine: list[list[Any]] = ENGINE_WAITS
) -> dict:
    return {
        "mechanism": "py-spy",
        "complete": True,
        "processes": [
            _proc(None, "engine_core", "S", engine, 9),
            _proc(0, "worker", "R", COLL, 10),
            _proc(1, "worker", tp1_state, tp1, 11),
        ],
    }


# ---- policy.judge_hang --------------------------------------------------------------------------


def test_a_worker_blocked_in_s_at_the_same_frame_twice_with_no_token_is_a_hang() -> None:
    """S, not T: the stuck rank is named from its frame in both samples and the frozen token counter."""
    j = policy.judge_hang(report(), report(), 120.0, 120.0, 1.0)
    assert j.verdict == "hang"
    assert [s["label"] for s in j.stuck] == ["TP1"] and "no token generated" in j.why


def test_tokens_generated_during_the_check_are_never_a_hang_whatever_the_stacks() -> None:
    """A busy server's samples can look stuck (every rank in the all-reduce, TP1 even stopped): one token proves it steps."""
    j = policy.judge_hang(report("T"), report("T"), 120.0, 121.0, 1.0)
    assert j.verdict == "progressing" and "1 tokens" in j.why


def test_state_t_alone_is_not_proof() -> None:
    """A worker stopped in the first sample and running in the second (a debugger, a brief SIGSTOP) moved: unproven."""
    running = report("R", SPIN)
    assert policy.judge_hang(report("T"), running, 5.0, 5.0, 1.0).verdict == "unproven"


def test_a_rank_that_moved_between_the_samples_is_not_stuck() -> None:
    """TP1 blocked at another frame in the second sample: nothing stayed, so nothing is proven."""
    moved = report(tp1=[["wait", "/p/threading.py", 327], ["elsewhere", "/v/fake/worker.py", 20]])
    assert policy.judge_hang(report(), moved, 5.0, 5.0, 1.0).verdict == "unproven"


def test_an_idle_engine_core_is_not_a_hang() -> None:
    """The engine core waiting for requests, not for its workers, in either sample: unproven."""
    assert policy.judge_hang(report(), report(engine=ENGINE_IDLE), 5.0, 5.0, 1.0).verdict == "unproven"


def test_no_stacks_is_unproven_and_says_why() -> None:
    """No sampler (or a failed sample): the judgement leaves the strike to the count."""
    none = {"mechanism": None, "reason": "py-spy not installed", "processes": []}
    j = policy.judge_hang(none, none, 5.0, 5.0, 1.0)
    assert j.verdict == "unproven" and "py-spy not installed" in j.why
    assert policy.judge_hang(None, report(), None, None, 1.0).verdict == "unproven"


def test_no_metrics_reading_still_lets_the_stacks_prove_a_hang() -> None:
    """A /metrics that does not answer is no progress shown: the stacks decide, and the reason says so."""
    j = policy.judge_hang(report(), report(), None, None, 1.0)
    assert j.verdict == "hang" and "no /metrics reading" in j.why


# ---- policy.Strikes ------------------------------------------------------------------------------


def test_first_strike_starts_a_check_and_a_proven_hang_confirms() -> None:
    """One strike, one check, its proof: confirmed, and the reason carries both."""
    s = policy.Strikes(confirm=2, can_sample=True)
    assert s.strike(0.0, "canary: no completion within 5s").action == "check"
    assert s.strike(1.0, "proxy: 2 stream(s) in flight, no byte for 4s").action == "wait"
    step = s.judged(2.0, policy.judge_hang(report(), report(), 1.0, 1.0, 1.0))
    assert step.action == "confirm"
    assert s.reason().startswith("hang confirmed: canary: no completion") and "stacks: TP1" in s.reason()


def test_a_progressing_check_clears_every_strike() -> None:
    """Tokens during the check: the strikes were a slow server; the next strike starts from nothing."""
    s = policy.Strikes(confirm=2, can_sample=True)
    s.strike(0.0, "canary: no completion within 5s")
    assert s.judged(2.0, policy.HangJudgement("progressing", "9 tokens")).action == "clear"
    assert s.strikes == [] and s.first_at is None
    assert s.strike(3.0, "canary: no completion within 5s").action == "check"


def test_unproven_strikes_confirm_by_count_only_after_unproven_confirm_s() -> None:
    """A hang the stacks cannot prove is still confirmed, by its strikes, once they have lasted long enough."""
    s = policy.Strikes(confirm=2, can_sample=True)
    unproven = policy.HangJudgement("unproven", "no rank stuck at the same frame in both samples")
    s.strike(0.0, "canary: a")
    assert s.judged(2.0, unproven).action == "wait"
    s.strike(7.0, "canary: b")
    assert s.judged(9.0, unproven).action == "wait"
    s.strike(policy.UNPROVEN_CONFIRM_S, "canary: c")
    assert s.judged(policy.UNPROVEN_CONFIRM_S + 2, unproven).action == "confirm"


def test_without_a_sampler_the_count_confirms_unless_only_canaries_failed_while_tokens_flowed() -> None:
    """No py-spy: the confirm count as before, canary timeouts alone never confirming a progressing engine."""
    s = policy.Strikes(confirm=2, can_sample=False)
    assert s.strike(0.0, "canary: a").action == "wait"
    s.progress()
    assert s.strike(5.0, "canary: b").action == "wait"
    assert s.strike(6.0, "proxy: stalled").action == "confirm"


# ---- watchers.hang_check -----------------------------------------------------------------------


class FakeClock(watchers.Clock):
    def __init__(self) -> None:
        self.t = 1000.0

    def monotonic(self) -> float:
        return self.t

    def time(self) -> float:
        return self.t

    async def sleep(self, seconds: float) -> None:
        self.t += max(0.0, seconds)
        await asyncio.sleep(0)


class ScriptedProber:
    """Answers /metrics from `tokens(now)` and `running(now)`; canaries from `canary_ok(now)`."""

    def __init__(self, clock: FakeClock, tokens: Any = lambda t: 0.0, running: Any = lambda t: 0.0) -> None:
        self.clock, self.tokens, self.running = clock, tokens, running
        self.canary_ok: Any = lambda t: True
        self.calls: list[tuple[str, float]] = []

    async def health(self) -> ProbeResult:
        return ProbeResult("health", True)

    async def models(self, name: str) -> ProbeResult:
        return ProbeResult("models", True)

    async def canary(self, model: str, prompt: str, max_tokens: int, timeout_s: float) -> ProbeResult:
        self.calls.append(("canary", self.clock.t))
        ok = self.canary_ok(self.clock.t)
        if not ok:
            self.clock.t += timeout_s
        return ProbeResult("canary", ok, "ok" if ok else f"no completion within {timeout_s:g}s")

    async def metrics(self) -> ProbeResult:
        self.calls.append(("metrics", self.clock.t))
        t = self.clock.t
        data = {"running": self.running(t), "waiting": 0.0, "generation_tokens": self.tokens(t)}
        return ProbeResult("metrics", True, "", data=data)

    async def aclose(self) -> None:
        return None


def test_hang_check_takes_two_samples_a_gap_apart_between_two_token_readings() -> None:
    """Counter, sample, sample `gap_s` after the first began, counter: one HangEvidence posted."""
    clock = FakeClock()
    prober = ScriptedProber(clock, tokens=lambda t: 42.0)
    taken: list[tuple[float, float]] = []

    async def sample(cpu_s: float) -> dict[str, Any]:
        taken.append((clock.t, cpu_s))
        clock.t += cpu_s + 0.1  # the CPU window, then py-spy
        return report()

    posted: list[Any] = []
    asyncio.run(watchers.hang_check(3, "canary: x", prober, sample, posted.append, clock))
    (ev,) = posted
    assert isinstance(ev, watchers.HangEvidence) and ev.gen == 3 and ev.strike == "canary: x"
    assert [c for c, _ in taken] == [1000.0, 1000.0 + watchers.CHECK_GAP_S]
    assert ev.tokens_before == ev.tokens_after == 42.0 and ev.gap_s == pytest.approx(watchers.CHECK_GAP_S)
    assert (
        policy.judge_hang(ev.first, ev.second, ev.tokens_before, ev.tokens_after, ev.gap_s).verdict == "hang"
    )


# ---- the canary, skipped when real traffic proved the engine ---------------------------------------


def _cfg() -> Config:
    data = {
        "vllm": {"python": "/bin/true", "model": "m"},
        "probes": {"canary_interval_s": 4.0, "interval_s": 2.0, "stall_s": 4.0},
        "timeouts": {"canary_s": 5.0},
    }
    return config_mod.parse(data, Path("/dev/null"), check_python=False)


def run_probe_loop(
    prober: ScriptedProber, clock: FakeClock, until: float, **kw: Any
) -> list[tuple[float, Any]]:
    """The probe loop until the fake clock reaches `until`; what it posted, with when."""
    cfg = _cfg()
    spec = cfg.model_spec()
    posted: list[tuple[float, Any]] = []

    async def main() -> None:
        task = asyncio.ensure_future(
            watchers.probe_loop(
                1, spec, cfg, prober, lambda o: posted.append((clock.t, o)), clock, False, **kw
            )
        )
        while clock.t < until:  # noqa: ASYNC110 - the fake clock moves only when the loop runs
            await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    return posted


def test_idle_server_gets_a_canary_every_canary_interval_s() -> None:
    """Idle, no traffic: a canary every 4 s, /metrics read once before each."""
    clock = FakeClock()
    prober = ScriptedProber(clock)
    run_probe_loop(prober, clock, 1000.0 + 4 * 5 - 1)
    canaries = [t - 1000.0 for c, t in prober.calls if c == "canary"]
    assert canaries == pytest.approx([4.0, 8.0, 12.0, 16.0])
    assert sum(c == "metrics" for c, _ in prober.calls) <= 2 * len(canaries) + 1


def test_a_request_served_through_the_proxy_since_the_last_canary_skips_it() -> None:
    """The proxy saw a real request succeed lately: no canary; once it stops, the canary is back."""
    clock = FakeClock()
    prober = ScriptedProber(clock)
    run_probe_loop(
        prober, clock, 1000.0 + 21, served_at=lambda: clock.t - 1.0 if clock.t < 1010.0 else 1009.0
    )
    canaries = [t - 1000.0 for c, t in prober.calls if c == "canary"]
    assert canaries and min(canaries) > 10.0, canaries


def test_tokens_generated_by_real_requests_skip_the_canary() -> None:
    """/metrics counting tokens that are not the canary's proves the engine: no canary while they flow."""
    clock = FakeClock()
    prober = ScriptedProber(clock, tokens=lambda t: (t - 1000.0) * 10.0, running=lambda t: 1.0)
    run_probe_loop(prober, clock, 1000.0 + 30)
    assert not [c for c, _ in prober.calls if c == "canary"]


def test_requests_running_with_no_token_for_stall_s_is_a_strike() -> None:
    """Running requests, a frozen counter: a progress strike within stall_s + interval_s."""
    clock = FakeClock()
    prober = ScriptedProber(clock, tokens=lambda t: min(t, 1010.0) * 10, running=lambda t: 2.0)
    posted = run_probe_loop(prober, clock, 1000.0 + 20)
    strikes = [t for t, p in posted if not p.result.ok and p.result.probe == "progress"]
    # the counter froze at t=10: the first strike at most stall_s + interval_s later
    assert strikes and 1010.0 + 4.0 <= strikes[0] <= 1010.0 + 4.0 + 2.0, strikes


def test_parse_metrics_sums_each_series_over_label_sets_and_skips_lookalikes() -> None:
    """The find-based parse: every label set summed, the first line read, NaN and longer names skipped."""
    from vsup.probes import parse_metrics

    buckets = "".join(f'vllm:e2e_seconds_bucket{{le="{b}"}} {b}.0\n' for b in range(500))
    text = (
        "vllm:num_requests_running 3\n"
        + buckets
        + 'vllm:num_requests_waiting{engine="0"} NaN\n'
        + 'vllm:num_requests_waiting{engine="1"} 2.0\n'
        + 'vllm:generation_tokens_total{engine="0",model_name="m"} 1234.0\n'
        + 'vllm:generation_tokens_total{engine="1",model_name="m"} 6\n'
        + 'vllm:generation_tokens_created{engine="1"} 1.7e9\n'
        + "vllm:generation_tokens_total_extra 99"
    )
    p = parse_metrics(text)
    assert p is not None and (p.running, p.waiting, p.generation_tokens) == (3.0, 2.0, 1240.0)
    assert parse_metrics(buckets) is None
