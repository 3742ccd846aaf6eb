"""What every benchmark here times with: the best wall time of repeated calls.

Imported as ``from timing import best_of``: the benchmarks run as files, so this
folder is first on ``sys.path`` (``benchmarks`` itself is shadowed by opacus' package).
"""

from __future__ import annotations

import time
from collections.abc import Callable


def best_of(fn: Callable[[], object], reps: int) -> float:
    """Best wall time of ``reps`` calls after one warm-up call, in seconds."""
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)
