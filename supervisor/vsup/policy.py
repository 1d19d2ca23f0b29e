"""Restart policy: backoff, the crash-loop window, stable serving, the remedy ladder; and what
confirms a hang (strikes, a stack check's judgement).

Pure bookkeeping on an injected clock (`now` is passed in): no I/O, no state of the daemon, so
the tests walk a crash loop or a ladder in microseconds. The owner asks it questions and reports
failures; it never acts.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .config import Config, Remedy, tensor_parallel_size
from .diagnose import persistent_stuck

if TYPE_CHECKING:
    from .signatures import Catalog

# A failure of these kinds within the first requests of a TP>1 server is what the remedy
# ladder (the seed's --disable-custom-all-reduce) addresses.
LADDER_KINDS = frozenset({"engine_dead", "worker_died", "hang", "exited"})
EARLY_REQUESTS = 3  # "at the first requests": this many completions served, or fewer


@dataclass(frozen=True)
class Verdict:
    """What to do after a failure: give up (`failed`), or wait `delay_s` and start again."""

    give_up: bool
    failures: int  # failures within the window, this one included
    delay_s: float
    remedy: Remedy | None = None  # a rung climbed because of this failure


class RestartPolicy:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self._failures: collections.deque[float] = collections.deque()
        self._kind_failures: collections.Counter[str] = collections.Counter()
        self.remedy_level = 0

    # -- the crash-loop window ------------------------------------------------------------------

    def failed(self, now: float, kind: str, *, served: int, tp_args: list[str]) -> Verdict:
        """Record one failure of the server at monotonic time `now`."""
        r = self.cfg.restart
        self._failures.append(now)
        while self._failures and now - self._failures[0] > r.window_s:
            self._failures.popleft()
        remedy = self._maybe_remedy(kind, served <= EARLY_REQUESTS, tp_args)
        n = len(self._failures)
        delay = min(r.backoff_max_s, r.backoff_initial_s * r.backoff_factor ** (n - 1))
        return Verdict(give_up=n >= r.max_failures, failures=n, delay_s=delay, remedy=remedy)

    def stable(self) -> int:
        """Served long enough: the next failure is a new story. Returns how many were forgotten."""
        n = len(self._failures)
        self._failures.clear()
        return n

    def operator_acted(self, *, start: bool = False) -> None:
        """An operator command resets the crash-loop count (a start also the ladder's counts)."""
        self._failures.clear()
        if start:
            self._kind_failures.clear()

    @property
    def failures(self) -> int:
        return len(self._failures)

    # -- the remedy ladder ----------------------------------------------------------------------

    def remedies(self) -> list[Remedy]:
        return list(self.cfg.remedies.ladder[: self.remedy_level])

    def new_model(self) -> None:
        """Remedies belong to a model: another model starts at the bottom of the ladder."""
        self.remedy_level = 0

    def _maybe_remedy(self, kind: str, early: bool, tp_args: list[str]) -> Remedy | None:
        rc = self.cfg.remedies
        if not rc.enabled or kind not in LADDER_KINDS or not early:
            return None
        if rc.only_tp and tensor_parallel_size(tp_args) <= 1:
            return None
        self._kind_failures[kind] += 1
        if self._kind_failures[kind] >= rc.after and self.remedy_level < len(rc.ladder):
            self.remedy_level += 1
            self._kind_failures.clear()
            return rc.ladder[self.remedy_level - 1]
        return None


# ---- swap on request (issue 16) -------------------------------------------------------------

# "Requests for it keep arriving": one arrived or ended this recently, or one is in flight. Longer
# than the gap between a steady client's requests (a client that stops asking frees the model
# before min_resident_s); short against a cold start, so an abandoned model is swapped away soon.
IN_USE_S = 5.0


@dataclass(frozen=True)
class SwapChoice:
    model: str | None  # the served name to swap to now, or None (wait, or nothing waits)
    why: str


def swap_target(
    *,
    now: float,
    loaded: str | None,
    ready_at: float,
    waiting: dict[str | None, float],
    models: frozenset[str] | set[str],
    last_use: float | None,
    in_flight: int,
    min_resident_s: float,
    blocked: frozenset[str] | set[str] = frozenset(),
) -> SwapChoice:
    """Which model to swap to, from the proxy's held requests (`waiting`: model -> when its oldest
    request began waiting). Anti-thrash: no swap away from `loaded` before it has been ready
    `min_resident_s`, while requests for it keep arriving (IN_USE_S). Fairness: once it may go,
    the model whose oldest request has waited longest goes first (FIFO by oldest waiting request),
    so a waiting model is never passed over by one asked for later, and no model waits more than
    (models - 1) x (min_resident_s + one swap). `blocked`: models whose swap just failed."""
    cands = {m: t for m, t in waiting.items() if m is not None and m != loaded and m in models}
    cands = {m: t for m, t in cands.items() if m not in blocked}
    if not cands:
        return SwapChoice(None, "no request waits for another model")
    resident = now - ready_at
    in_use = in_flight > 0 or (last_use is not None and now - last_use < IN_USE_S)
    if resident < min_resident_s and in_use:
        return SwapChoice(
            None, f"{loaded} ready {resident:.0f}s of min_resident_s {min_resident_s:g}s and still in use"
        )
    target = min(cands, key=lambda m: (cands[m], m))
    return SwapChoice(target, f"oldest waiting request: {now - cands[target]:.1f}s for {target}")


# ---- confirming a hang (issue 17) -----------------------------------------------------------


@dataclass(frozen=True)
class HangJudgement:
    """What a stack check found: `hang` (confirmed: tear down), `progressing` (the engine
    generated tokens meanwhile: the strikes were a slow server, not a stuck one) or `unproven`
    (no stack evidence either way: the strike stands and the count of strikes decides)."""

    verdict: str
    why: str
    stuck: tuple[dict[str, Any], ...] = ()


def judge_hang(
    first: dict[str, Any] | None,
    second: dict[str, Any] | None,
    tokens_before: float | None,
    tokens_after: float | None,
    gap_s: float,
    catalog: Catalog | None = None,
) -> HangJudgement:
    """Judge two stack samples of a tree taken `gap_s` apart after a strike, with the token
    counters (/metrics: generated plus prefilled) read before the first and after the second.

    Proof of a hang is all of: a rank stuck at the same frame in both samples while the engine
    core waits for the workers' reply in both (diagnose.persistent_stuck), and not one token
    generated between the two readings. A process's state alone is never proof: real hangs show
    R (a rank spinning in a collective) or S (a rank asleep on a futex) as often as a
    SIGSTOPped worker's T, and a T that goes away by the second sample (a debugger, a brief
    SIGSTOP) moved. One sample is not proof either: a busy engine core waits for its workers
    for most of every step, and every rank of a busy server passes through the all-reduce.
    Any token generated proves the engine still steps, whatever the stacks show."""
    if tokens_before is not None and tokens_after is not None and tokens_after > tokens_before:
        n = tokens_after - tokens_before
        return HangJudgement("progressing", f"{n:g} tokens generated during the {gap_s:.1f}s check")
    if not first or not second or first.get("mechanism") is None or second.get("mechanism") is None:
        why = (first or second or {}).get("reason") or "no stacks"
        return HangJudgement("unproven", f"no stack sample: {why}")
    stuck = persistent_stuck(first, second, catalog)
    if not stuck:
        return HangJudgement("unproven", "no rank stuck at the same frame in both samples")
    names = ", ".join(
        f"{s['label']} (state {s.get('state') or '?'}) at {s.get('frame') or '?'}" for s in stuck
    )
    tokens = "no token generated" if tokens_before is not None else "no /metrics reading"
    return HangJudgement(
        "hang", f"{names} in two samples {gap_s:.1f}s apart, the engine core waiting, {tokens}", tuple(stuck)
    )


@dataclass(frozen=True)
class Step:
    """What the owner does after a strike or a check: `check` (start a stack check), `confirm`
    (tear the hung tree down), `clear` (the server proved itself: ready again), `wait`."""

    action: str
    why: str = ""


# With a stack sampler, strikes whose checks prove nothing either way (a hang whose stacks match
# no signature: the API server's own event loop wedged, an engine core stuck outside the
# executor) still confirm by their count, once they have lasted this long with not one token
# generated during a check (a token would have cleared them): a server that answers no probe and
# generates nothing for 20 s is not serving. Under the ~24 s that canary-only confirmation took.
UNPROVEN_CONFIRM_S = 20.0


class Strikes:
    """Strikes against a ready server and what they lead to; the owner's serve loop reports to
    it (with monotonic `now`) and acts on the returned Step. Pure: no clock, no I/O.

    With a non-killing stack sampler (py-spy), each strike starts a check (two samples about a
    second apart and two /metrics readings) unless one runs, and the check's judgement decides:
    that is what makes confirmation fast (one strike, then ~2 s) without confirming a slow
    server. With no sampler, `confirm` strikes confirm; the same rule holds for strikes the
    checks cannot prove, once they have lasted UNPROVEN_CONFIRM_S. Tokens generated after the
    first strike (any check's, or /metrics') clear every strike: slow, not stuck."""

    def __init__(self, confirm: int, can_sample: bool) -> None:
        self.confirm = confirm
        self.can_sample = can_sample
        self.strikes: list[str] = []
        self.first_at: float | None = None
        self.progressed = False
        self.checking = False
        self.proof: HangJudgement | None = None

    def strike(self, now: float, what: str) -> Step:
        self.strikes.append(what)
        if self.first_at is None:
            # Only tokens generated from now on say "slow, not stuck" (earlier ones, the
            # canaries' own included, say nothing about the engine now).
            self.first_at, self.progressed = now, False
        if self.checking:
            return Step("wait", "a stack check is running")
        if self.can_sample:
            self.checking = True
            return Step("check", what)
        return self._count(now)

    def progress(self) -> Step:
        """/metrics counted tokens (not the canary's) generated since the first strike: the engine
        steps, so the strikes were a slow server. Cleared at once, unless a check runs (its
        judgement sees the same tokens)."""
        if not self.strikes:
            return Step("wait", "no strike")
        self.progressed = True
        if self.checking:
            return Step("wait", "a stack check is running")
        self.clear()
        return Step("clear", "tokens generated since the first strike")

    def judged(self, now: float, j: HangJudgement) -> Step:
        self.checking = False
        if j.verdict == "hang":
            self.proof = j
            return Step("confirm", j.why)
        if j.verdict == "progressing":
            self.clear()
            return Step("clear", j.why)
        return self._count(now)

    def clear(self) -> None:
        self.strikes, self.first_at, self.progressed, self.checking, self.proof = [], None, False, False, None

    def reason(self) -> str:
        head = "hang confirmed: " + "; ".join(self.strikes[-3:])
        return head + (f"; stacks: {self.proof.why}" if self.proof is not None else "")

    def _count(self, now: float) -> Step:
        if len(self.strikes) < self.confirm or self.progressed:
            return Step("wait", f"{len(self.strikes)} of {self.confirm} strikes")
        lasted = now - (self.first_at if self.first_at is not None else now)
        if self.can_sample and lasted < UNPROVEN_CONFIRM_S:
            return Step(
                "wait", f"strikes unproven by the stacks for {lasted:.0f}s of {UNPROVEN_CONFIRM_S:g}s"
            )
        return Step("confirm", f"{len(self.strikes)} strikes")
