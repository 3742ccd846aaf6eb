"""What every benchmark here times with: the best wall time of repeated calls.

Imported as ``from timing import best_of``: the benchmarks run as files, so this
folder is first on ``sys.path`` (``benchmarks`` itself is shadowed by opacus' package).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping


def best_of(fn: Callable[[], object], reps: int) -> float:
    """Best wall time of ``reps`` calls after one warm-up call, in seconds."""
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def interleaved_best(fns: Mapping[str, Callable[[], object]], reps: int) -> dict[str, float]:
    """Best wall time of each of ``fns`` over ``reps`` rounds in which they take turns.

    One warm-up call each first. The starting function rotates from round to round, so
    a busy spell on a shared CPU hits every contender alike, and none always runs first.
    """
    names = list(fns)
    for name in names:
        fns[name]()
    best = {name: float("inf") for name in names}
    for i in range(reps):
        for name in names[i % len(names) :] + names[: i % len(names)]:
            start = time.perf_counter()
            fns[name]()
            best[name] = min(best[name], time.perf_counter() - start)
    return best
