"""Wall-clock timing shared by the speed table and the benchmarks (no torch import: benchmark workers
that time ONNX Runtime stay free of it)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def median_ms(fn: Callable[[], object], *, repeats: int = 10, warmup: int = 2, min_time: float = 0.0) -> float:
    """Median wall time of ``fn`` in ms over at least ``repeats`` calls and ``min_time`` seconds."""
    for _ in range(warmup):
        fn()
    times: list[float] = []
    while len(times) < repeats or sum(times) < min_time:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)
