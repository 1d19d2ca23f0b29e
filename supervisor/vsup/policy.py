"""Restart policy: backoff, the crash-loop window, stable serving, the remedy ladder.

Pure bookkeeping on an injected clock (`now` is passed in): no I/O, no state of the daemon, so
the tests walk a crash loop or a ladder in microseconds. The owner asks it questions and reports
failures; it never acts.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass

from .config import Config, Remedy, tensor_parallel_size

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
