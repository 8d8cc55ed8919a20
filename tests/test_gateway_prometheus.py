"""A real Prometheus server (Debian's ``prometheus`` package; `.ci/run` installs it) scrapes the gateway,
and a latency quantile is queried back through Prometheus's HTTP API.

The test runs its own Prometheus process with its own config, on a free port, with a temporary
storage folder; the Debian service, if any, is not involved.
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from gateway_support import RunningGateway, free_port, image_bytes, publish_version

from serving.proto.parsimony.v1 import gateway_pb2 as pb

PROMETHEUS = shutil.which("prometheus")
QUANTILE = ('histogram_quantile(0.9, sum by (le) (rate(parsimony_gateway_stage_seconds_bucket'
            '{model="scenes",stage="%s"}[1m])))')


class Prometheus:
    """One Prometheus process scraping ``target`` every 0.5 s, with its own config and storage."""

    def __init__(self, target: str, workdir: Path) -> None:
        config = workdir / "prometheus.yml"
        config.write_text("global:\n  scrape_interval: 500ms\n  evaluation_interval: 500ms\nscrape_configs:\n"
                          f"  - job_name: gateway\n    static_configs:\n      - targets: ['{target}']\n")
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.proc = subprocess.Popen(
            [PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={workdir / 'data'}",
             f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.poll(lambda: _status(f"{self.url}/-/ready") == 200, "Prometheus did not become ready")

    def poll(self, condition, message: str, timeout: float = 60):
        deadline = time.time() + timeout
        while time.time() < deadline:
            assert self.proc.poll() is None, f"prometheus exited: {self.proc.stderr.read()}"
            value = condition()
            if value:
                return value
            time.sleep(0.25)
        raise TimeoutError(message)

    def query(self, promql: str) -> list:
        body = httpx.get(f"{self.url}/api/v1/query", params={"query": promql}, timeout=5).json()
        assert body["status"] == "success", body
        return body["data"]["result"]

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


def _status(url: str) -> int | None:
    try:
        return httpx.get(url, timeout=2).status_code
    except httpx.TransportError:
        return None


@pytest.fixture
def prometheus(tmp_path):
    """``prometheus(target)`` starts a `Prometheus` scraping ``target``; stopped after the test."""
    if PROMETHEUS is None:
        if os.environ.get("CI"):
            pytest.fail("prometheus is not installed; .ci/run installs Debian's prometheus package")
        pytest.skip("prometheus is not installed (apt-get install prometheus)")
    started: list[Prometheus] = []
    yield lambda target: started.append(Prometheus(target, tmp_path)) or started[-1]
    for server in started:
        server.stop()


def test_prometheus_scrapes_the_gateway_and_answers_a_latency_quantile(exported_run, tmp_path, prometheus):
    publish_version(tmp_path / "repo", "scenes", exported_run, 1)
    png = image_bytes((32, 48))
    with RunningGateway(repository=tmp_path / "repo") as gw:
        prom = prometheus(f"127.0.0.1:{gw.server.http_port}")
        prom.poll(lambda: prom.query('up{job="gateway"} == 1'), "Prometheus never scraped the gateway")

        def send_and_measure() -> list:
            for _ in range(10):
                gw.stub.Predict(pb.PredictRequest(model="scenes", encoded_image=png), timeout=30)
            return [r for r in prom.query(QUANTILE % "total") if math.isfinite(float(r["value"][1]))]

        p90 = float(prom.poll(send_and_measure, "no latency quantile from Prometheus")[0]["value"][1])
        assert 0 < p90 < 5.0
        for stage in ("decode", "preprocess", "queue", "inference", "postprocess"):
            assert prom.query(QUANTILE % stage), stage
        requests = prom.query('sum(parsimony_gateway_requests_total{code="OK",method="Predict",model="scenes"})')
        assert float(requests[0]["value"][1]) >= 10
        info = prom.query("parsimony_gateway_model_info")
        assert info[0]["metric"]["version"] == "1" and info[0]["metric"]["backend"] == "onnxruntime"
