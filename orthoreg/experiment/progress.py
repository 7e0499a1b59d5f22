"""The run's overall progress: "fine-tune 17/48 · ~6 min left".

Each fine-tune has its own step bar (:mod:`orthoreg.training`), but a benchmark is dozens
of them plus searches, and a user wants the whole: how far, and how long still. The clock
counts fine-tunes against the run's plan (cached ones count as done at once) and estimates
the rest from the mean wall time of the fine-tunes *this* process ran, which includes the
searches between them — so the estimate covers the whole remaining run, not only training.
"""

from __future__ import annotations

import time
from collections.abc import Callable


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


class StageClock:
    """Counts planned fine-tunes and prints the position and an estimate before each one."""

    def __init__(self, log: Callable[[str], None],
                 now: Callable[[], float] = time.perf_counter) -> None:
        self.log = log
        self.now = now
        self.total = 0
        self.done = 0
        self.fresh = 0  # fine-tunes run by this process
        self.started: float | None = None

    def plan(self, total: int, cached: int = 0) -> None:
        """``total`` fine-tunes are planned, ``cached`` of them already finished on disk."""
        self.total, self.done, self.fresh = total, cached, 0
        self.started = self.now()
        if cached:
            self.log(f"{cached} of {total} fine-tunes already done (cached); resuming")

    def estimate(self) -> float | None:
        """Seconds left, from the mean time per fine-tune run so far (None before the first)."""
        if not self.fresh or self.started is None:
            return None
        per_stage = (self.now() - self.started) / self.fresh
        return per_stage * max(self.total - self.done, 0)

    def start(self, label: str) -> None:
        position = f"{self.done + 1}/{self.total}" if self.total else f"{self.done + 1}"
        left = self.estimate()
        eta = f" · ~{_duration(left)} left" if left is not None else ""
        self.log(f"  [{position}{eta}] {label}")

    def finish(self) -> None:
        self.done += 1
        self.fresh += 1
