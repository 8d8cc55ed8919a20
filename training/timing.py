"""Wall-clock timing shared by the speed table and the benchmarks (no torch import: benchmark workers
that time ONNX Runtime stay free of it)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def sample_ms(fn: Callable[[], object], *, repeats: int = 10, warmup: int = 2, min_time: float = 0.0) -> list[float]:
    """Wall times of ``fn`` in ms, one per call, over at least ``repeats`` calls and ``min_time`` seconds."""
    for _ in range(warmup):
        fn()
    times: list[float] = []
    while len(times) < repeats or sum(times) < min_time * 1e3:
        t0 = time.perf_counter()
        fn()
        times.append(1e3 * (time.perf_counter() - t0))
    return times


def median_ms(fn: Callable[[], object], *, repeats: int = 10, warmup: int = 2, min_time: float = 0.0) -> float:
    """Median wall time of ``fn`` in ms over at least ``repeats`` calls and ``min_time`` seconds."""
    return statistics.median(sample_ms(fn, repeats=repeats, warmup=warmup, min_time=min_time))
