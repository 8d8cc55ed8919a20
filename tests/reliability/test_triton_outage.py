"""Triton killed under load (``slow``; needs ``.venv-triton``): while clients send predictions through a
gateway with ``--backend triton``, Triton is killed (SIGKILL) and started again on the same ports.
The gateway must notice within 2 s (``/readyz`` 503, calls refused with UNAVAILABLE at once, never
INTERNAL, UNKNOWN or CANCELLED), and serve again by itself within 10 s of Triton being back; the
project's client, retrying UNAVAILABLE, loses no call."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
from gateway_support import RunningGateway, image_bytes, predict_until
from triton_server import require_triton, start_tritonserver

from clients import RetryPolicy
from serving.convert import convert
from serving.triton_config import ServingOptions

pytestmark = pytest.mark.slow
PNG = image_bytes((32, 48), seed=6)


def _until(condition, timeout: float) -> float:
    started = time.perf_counter()
    while not condition():
        assert time.perf_counter() - started < timeout, f"not within {timeout} s"
        time.sleep(0.02)
    return time.perf_counter() - started


def test_triton_killed_under_load_is_noticed_and_recovered_without_losing_calls(exported_run, tmp_path):
    require_triton()
    repo = tmp_path / "repo"
    convert(exported_run, repo, "scenes", ServingOptions(format="python", max_batch=8))
    triton = start_tritonserver(repo, extra_args=("--disable-auto-complete-config",))
    ports = tuple(int(u.rsplit(":", 1)[1].split("/")[0]) for u in (triton.grpc_url, triton.http_url,
                                                                     triton.metrics_url))
    stop, done, failures, seen = threading.Event(), [], [], set()
    policy = RetryPolicy(max_attempts=None, initial_backoff=0.05, max_backoff=0.5,
                         on_retry=lambda attempt, error, wait: seen.add(error.code))
    try:
        with RunningGateway(repository=repo, backend="triton", triton_url=f"dns:///{triton.grpc_url}") as gw:
            def loop(server: str) -> None:
                predict_until(stop, server, policy, PNG, lambda p: done.append(p.version), failures)

            threads = [threading.Thread(target=loop, args=(s,)) for s in (gw.grpc_target, gw.http_url) * 2]
            for t in threads:
                t.start()
            _until(lambda: len(done) > 20, 30)
            os.kill(triton.pid, signal.SIGKILL)
            with gw.http() as http:
                noticed = _until(lambda: http.get("/readyz").status_code == 503, 2)
                triton = start_tritonserver(repo, extra_args=("--disable-auto-complete-config",), ports=ports)
                recovered = _until(lambda: http.get("/readyz").status_code == 200, 10)
            count = len(done)
            _until(lambda: len(done) > count + 20, 30)
            stop.set()
            for t in threads:
                t.join(60)
    finally:
        stop.set()
        triton.stop()
    assert failures == [], failures[:5]
    assert seen <= {"UNAVAILABLE"}, seen  # refused while Triton was away: never INTERNAL, UNKNOWN, CANCELLED
    print(f"noticed in {noticed:.2f} s, recovered {recovered:.2f} s after Triton was started again")
