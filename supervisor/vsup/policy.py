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
