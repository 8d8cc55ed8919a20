"""Lifecycle of the gateway: readiness while loading and draining, graceful drain of a real server
process on SIGTERM, hot swaps of new versions under load without a failed request, and the CLI."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import httpx
import pytest
from gateway_support import (
    RunningGateway,
    SlowBackend,
    free_port,
    image_bytes,
    predict_until,
    publish_version,
)
from grpc_health.v1 import health_pb2, health_pb2_grpc

from benchmarks.soak import wait_http_ready
from serving.proto.parsimony.v1 import gateway_pb2 as pb
from serving.proto.parsimony.v1 import gateway_pb2_grpc as pb_grpc
from serving.server.__main__ import main as server_main
from serving.server.lifecycle import State

ROOT = Path(__file__).resolve().parents[1]
PNG = image_bytes((32, 48))
SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


def health_status(channel) -> int:
    return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status


def test_not_ready_until_loaded_and_warmed_then_not_ready_while_draining(exported_run):
    SlowBackend.load_delay = 2.0
    try:
        with RunningGateway(run=exported_run, backend="slow-onnxruntime", wait_ready=False, drain_delay_s=1.0) as gw, \
                gw.http() as client:
            assert client.get("/healthz").status_code == 200
            loading = client.get("/readyz")
            assert loading.status_code == 503 and loading.json()["status"] == "starting"
            assert health_status(gw.channel) == NOT_SERVING
            with pytest.raises(grpc.RpcError) as info:
                gw.stub.Predict(pb.PredictRequest(model=exported_run.name, encoded_image=PNG), timeout=5)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE and "still loading" in info.value.details()
            gw.started.result(30)
            assert client.get("/readyz").json() == {"status": "ready", "models": {exported_run.name: 1}}
            assert health_status(gw.channel) == SERVING

            stopping = gw.call_soon(gw.server.stop())
            time.sleep(0.2)  # within the drain delay: still listening, reporting not ready
            draining = client.get("/readyz")
            assert draining.status_code == 503 and draining.json()["status"] == "draining"
            assert health_status(gw.channel) == NOT_SERVING
            stopping.result(30)
            assert gw.server.state is State.STOPPED
            with pytest.raises(httpx.TransportError):
                httpx.get(f"{gw.http_url}/healthz", timeout=2)
    finally:
        SlowBackend.load_delay = 0.0


def test_sigterm_drains_in_flight_requests_of_a_real_server_process(exported_run):
    grpc_port, http_port = free_port(), free_port()
    cmd = [sys.executable, "-m", "serving.server", "--run", str(exported_run), "--model", "scenes", "--host", "127.0.0.1",
           "--grpc-port", str(grpc_port), "--http-port", str(http_port), "--threads", "1", "--max-batch", "64",
           "--max-queue-delay-ms", "8000", "--grace-period-s", "20"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{http_port}"
    try:
        wait_http_ready(url, proc)
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel, httpx.Client(base_url=url, timeout=30) as http:
            stub = pb_grpc.PredictionServiceStub(channel)
            request = pb.PredictRequest(model="scenes", encoded_image=PNG)
            in_flight = [stub.Predict.future(request, timeout=30) for _ in range(5)]
            http_results: list = []
            posting = threading.Thread(target=lambda: http_results.append(http.post(
                "/v1/models/scenes:predict", content=PNG, headers={"Content-Type": "image/png"})))
            posting.start()
            _wait_queued(url, 6)  # all six wait for a batch to fill (8 s queue delay)
            sent = time.perf_counter()
            proc.send_signal(signal.SIGTERM)
            responses = [f.result() for f in in_flight]
            posting.join(30)
            assert time.perf_counter() - sent < 5, "draining must run queued requests at once, not after the delay"
            assert all(r.model == "scenes" and r.timings.batch_size == 6 for r in responses)
            assert http_results and http_results[0].status_code == 200
            assert proc.wait(timeout=30) == 0
        assert "received SIGTERM: draining" in proc.stderr.read()
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{url}/healthz", timeout=2)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def _wait_queued(url: str, n: int, timeout: float = 20) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if f'parsimony_gateway_queue_depth{{model="scenes"}} {float(n)}' in httpx.get(f"{url}/metrics").text:
            return
        time.sleep(0.05)
    raise TimeoutError(f"{n} requests never queued")


class Load:
    """Client threads sending predictions back to back over gRPC and HTTP, recording versions and failures."""

    def __init__(self, gw: RunningGateway, grpc_threads: int = 3) -> None:
        self.gw, self.stop, self.versions, self.failures, self.count = gw, threading.Event(), set(), [], 0
        self.threads = [threading.Thread(target=self._grpc) for _ in range(grpc_threads)]
        self.threads.append(threading.Thread(target=self._http))
        self.lock = threading.Lock()

    def _record(self, version: int) -> None:
        with self.lock:
            self.versions.add(version)
            self.count += 1

    def _grpc(self) -> None:
        stub = pb_grpc.PredictionServiceStub(self.gw.channel)
        while not self.stop.is_set():
            try:
                self._record(stub.Predict(pb.PredictRequest(model="scenes", encoded_image=PNG), timeout=30).model_version)
            except grpc.RpcError as exc:
                self.failures.append(f"grpc {exc.code()}: {exc.details()}")

    def _http(self) -> None:
        with self.gw.http() as client:
            while not self.stop.is_set():
                r = client.post("/v1/models/scenes:predict", content=PNG, headers={"Content-Type": "image/png"})
                if r.status_code != 200:
                    self.failures.append(f"http {r.status_code}: {r.text}")
                else:
                    self._record(r.json()["model_version"])

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(30)

    def until(self, condition, timeout: float = 30) -> None:
        deadline = time.time() + timeout
        while not condition():
            assert time.time() < deadline, f"timed out; versions seen {self.versions}, failures {self.failures[:3]}"
            time.sleep(0.05)


def test_new_versions_are_hot_swapped_under_load_without_a_failed_request(exported_run, tmp_path):
    repo = tmp_path / "repo"
    publish_version(repo, "scenes", exported_run, 1)
    with RunningGateway(repository=repo, poll_interval_s=0.1) as gw, Load(gw) as load:
        load.until(lambda: load.count > 20)
        publish_version(repo, "scenes", exported_run, 2)
        load.until(lambda: 2 in load.versions)
        seen_at_swap = load.count
        load.until(lambda: load.count > seen_at_swap + 20)  # keep serving on the new version for a while

        publish_version(repo, "scenes", exported_run, 3, corrupt=True)  # fails to load: version 2 stays
        load.until(lambda: 'model_loads_total{model="scenes",outcome="failure"} 1.0' in gw.http().get("/metrics").text)
        after_failure = load.count
        load.until(lambda: load.count > after_failure + 10)

        shutil.rmtree(repo / "scenes" / "3")
        shutil.rmtree(repo / "scenes" / "2")  # roll back by deleting: the highest remaining version is served
        load.until(lambda: gw.stub.GetModel(pb.GetModelRequest(name="scenes")).version == 1)
        info = {s.labels["version"] for s in gw.server.metrics.model_info.collect()[0].samples}
        assert info == {"1"}  # one info series: the served version
    assert load.failures == [], load.failures[:5]
    assert load.versions == {1, 2} and load.count > 60


def test_cli_reports_bad_setups_with_exit_code_2(tmp_path, capsys, exported_run):
    assert server_main(["--repository", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert server_main(["--repository", str(tmp_path / "empty")]) == 2
    assert "holds no model" in capsys.readouterr().err
    assert server_main(["--run", str(exported_run), "--max-batch", "0"]) == 2
    assert "max_batch" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        server_main(["--run", str(exported_run), "--repository", str(tmp_path)])
    assert info.value.code == 2


def test_a_busy_port_is_a_clear_error(exported_run):
    with RunningGateway(run=exported_run) as first:
        busy = first.server.http_port
        assert server_main(["--run", str(exported_run), "--host", "127.0.0.1", "--grpc-port", "0",
                            "--http-port", str(busy)]) == 2


def test_the_gateway_and_the_client_start_without_pytorch():
    """The server and the clients read manifests and tensor specs from the contract (`parsimony`),
    never PyTorch nor the training package: importing them must not load torch (seconds of start-up,
    hundreds of MB per replica)."""
    code = ("import sys, serving.server.__main__, serving.repository, serving.convert, clients.predict, clients.load; "
            "import parsimony.manifest, parsimony.spec; parsimony.manifest.Manifest, parsimony.spec.ModelIOSpec; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'training')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_draining_refuses_new_calls_with_a_retry_hint_and_finishes_those_in_flight(exported_run):
    SlowBackend.infer_delay = 1.0
    try:
        with RunningGateway(run=exported_run, backend="slow-onnxruntime", grace_period_s=10) as gw, \
                gw.http() as http:
            request = pb.PredictRequest(model="scenes", encoded_image=PNG)
            in_flight = gw.stub.Predict.future(request, timeout=30)
            gw.wait_for_queue("scenes", running=1, queued=0)
            # the moment between the drain's start and the listeners' close, held open for the test
            gw.loop.call_soon_threadsafe(setattr, gw.server.gateway, "accepting", False)
            with pytest.raises(grpc.RpcError) as info:
                gw.stub.Predict(request, timeout=5)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE and "retry" in info.value.details()
            assert "grpc-retry-pushback-ms" in dict(info.value.trailing_metadata())
            refused = http.post("/v1/models/scenes:predict", content=PNG, headers={"Content-Type": "image/png"})
            assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
            stopping = gw.call_soon(gw.server.stop())
            assert in_flight.result().model == "scenes"  # the call in flight ran to its end
            stopping.result(30)
    finally:
        SlowBackend.infer_delay = 0.0


def _server_process(exported_run, grpc_port: int, http_port: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "serving.server", "--run", str(exported_run), "--model", "scenes", "--host",
           "127.0.0.1", "--grpc-port", str(grpc_port), "--http-port", str(http_port), "--threads", "1",
           "--grace-period-s", "10", "--log-level", "WARNING"]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def test_calls_in_a_tight_loop_across_sigterm_are_never_cancelled_or_lost(exported_run):
    """A replica receives SIGTERM under load and a successor starts on the same ports (a rolling
    update): with the project's client, every call succeeds; none ends CANCELLED or is lost."""
    from clients import RetryPolicy

    grpc_port, http_port = free_port(), free_port()
    first = _server_process(exported_run, grpc_port, http_port)
    second = None
    stop, done, failures, retried = threading.Event(), [], [], []
    policy = RetryPolicy(max_attempts=None, initial_backoff=0.02, max_backoff=0.25,
                         on_retry=lambda attempt, error, wait: retried.append(error.code))

    def loop(server: str) -> None:
        predict_until(stop, server, policy, PNG, lambda p: done.append(p.model), failures)

    try:
        wait_http_ready(f"http://127.0.0.1:{http_port}", first)
        threads = [threading.Thread(target=loop, args=(f"127.0.0.1:{grpc_port}",)) for _ in range(3)]
        threads.append(threading.Thread(target=loop, args=(f"http://127.0.0.1:{http_port}",)))
        for t in threads:
            t.start()
        _until(lambda: len(done) > 30)
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=30) == 0
        before_restart = len(done)
        second = _server_process(exported_run, grpc_port, http_port)
        _until(lambda: len(done) > before_restart + 30, timeout=60)
        stop.set()
        for t in threads:
            t.join(60)
    finally:
        stop.set()
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
    assert failures == [], failures[:5]
    assert len(done) > 60 and "CANCELLED" not in [f.split(":")[0] for f in failures]
    assert retried, "the calls sent while no server listened were retried"


def _until(condition, timeout: float = 30) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, "timed out"
        time.sleep(0.02)


# --- loading: digests and clean-up of failed loads ------------------------------------------------


def _with_manifest(repo: Path, version: int, **fields) -> None:
    import json

    path = repo / "scenes" / str(version) / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest.update(fields)
    path.write_text(json.dumps(manifest))


def test_a_version_whose_graph_does_not_match_its_manifest_digest_is_refused(exported_run, tmp_path):
    import hashlib

    from serving.server.errors import ModelLoadError

    repo = tmp_path / "repo"
    folder = publish_version(repo, "scenes", exported_run, 1)
    digest = hashlib.sha256((folder / "model.onnx").read_bytes()).hexdigest()
    _with_manifest(repo, 1, onnx_sha256="0" * 64)
    with pytest.raises(ModelLoadError, match="does not match its manifest.*onnx_sha256"):
        with RunningGateway(repository=repo):
            pass
    _with_manifest(repo, 1, onnx_sha256=digest)  # the right digest loads; so does a manifest without one
    with RunningGateway(repository=repo) as gw:
        assert gw.stub.GetModel(pb.GetModelRequest(name="scenes")).version == 1
        publish_version(repo, "scenes", exported_run, 2)
        _with_manifest(repo, 2, onnx_sha256="f" * 64)
        gw.call(gw.server.models._refresh(gw.server.models.sources[0]))  # one poll
        assert gw.stub.GetModel(pb.GetModelRequest(name="scenes")).version == 1  # refused: version 1 stays


def test_a_version_that_fails_to_load_leaves_no_worker_thread_behind(exported_run, tmp_path):
    import asyncio

    from serving.server.errors import ModelLoadError
    from serving.server.metrics import GatewayMetrics
    from serving.server.models import ModelManager, RepositorySource

    repo = tmp_path / "repo"
    publish_version(repo, "scenes", exported_run, 1, corrupt=True)
    _with_manifest(repo, 1, onnx_sha256=None)  # no digest to check: ONNX Runtime itself fails to load it

    def workers() -> list[str]:
        return [t.name for t in threading.enumerate() if t.name.startswith("ort-scenes")]

    kept = []  # the errors stay referenced (as a log record or an error report keeps them), and with
    # them, through their tracebacks, the failed backend: its worker thread must be gone all the same

    async def load_broken() -> None:
        manager = ModelManager([RepositorySource(repo, "scenes")], GatewayMetrics(), poll_interval_s=0)
        with pytest.raises(ModelLoadError, match="cannot load") as info:
            await manager.start()
        kept.append(info)

    before = len(workers())
    for _ in range(3):
        asyncio.run(load_broken())
    deadline = time.time() + 5
    while len(workers()) > before and time.time() < deadline:
        time.sleep(0.05)
    assert len(workers()) == before, workers()
