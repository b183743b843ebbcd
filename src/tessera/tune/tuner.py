"""What every tuner shares: timing candidates interleaved, so that drifts in clock speed
or machine load hit all of them alike, and reducing per-problem rates to one score."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence

__all__ = ["geomean", "time_interleaved"]


def time_interleaved(calls: Sequence[Callable[[], object]], repeats: int, budget_s: float
                     ) -> list[list[float]]:
    """Seconds of each run of each call. After one untimed warm-up round, every round runs
    each call once (the order rotated per round); fewer rounds (at least 3) are run when
    `repeats` of them would take longer than `budget_s`."""
    warm = []
    for call in calls:
        start = time.perf_counter()
        call()
        warm.append(time.perf_counter() - start)
    rounds = max(3, min(repeats, int(budget_s / max(sum(warm), 1e-9))))
    times: list[list[float]] = [[] for _ in calls]
    for r in range(rounds):
        for i in range(len(calls)):
            j = (i + r) % len(calls)
            start = time.perf_counter()
            calls[j]()
            times[j].append(time.perf_counter() - start)
    return times


def geomean(values: Sequence[float]) -> float:
    """The geometric mean: one score for rates over problems of very different sizes."""
    return math.exp(sum(math.log(v) for v in values) / len(values))
