"""The long checks (``slow``; `benchmarks.soak` with its full settings): 32 clients for 60 s, 10,000
malformed requests, a hot swap and a SIGTERM under load; the soak's verdict must hold entirely."""

from __future__ import annotations

import pytest

from benchmarks import soak

pytestmark = pytest.mark.slow


def test_the_soak_verdict_holds(exported_run):
    report = soak.run(exported_run, clients=32, seconds=60, fuzz_count=10_000, swap_seconds=12)
    assert all(report["verdict"].values()), {k: v for k, v in report.items() if k != "fuzz"}
    assert report["fuzz"]["sent"] >= 10_000
