"""The gateway in front of the real Triton server (``--backend triton``), against the embedded backend.

One Triton server (bundled in nvidia-pytriton) serves the converter's python-backend models of two
runs whose weights were randomised so that every output depends on its image; two gateways read
the same repository, one running ONNX Runtime in process, one sending batches to Triton. Every
task's output must be the same through both. Then Triton is stopped: the Triton gateway must
report not-ready (HTTP and gRPC health) and answer UNAVAILABLE at once; Triton is started again on
the same ports and the gateway must serve again by itself, with the same outputs.

Needs ``.venv-triton`` (``make triton-venv``); skips only with ``PARSIMONY_SKIP_TRITON=1``.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
from gateway_support import RunningGateway, answers, image_bytes
from grpc_health.v1 import health_pb2, health_pb2_grpc
from triton_server import randomised_copy, require_triton, start_tritonserver
from tritonclient.utils import InferenceServerException

from parsimony.manifest import load_manifest
from parsimony.tasks import kind
from serving.convert import convert
from serving.proto.parsimony.v1 import gateway_pb2 as pb
from serving.server.errors import BackendUnavailable, DeadlineExceeded
from serving.server.metadata import ModelMetadata
from serving.server.triton_backend import TritonBackend
from serving.triton_config import ServingOptions

SIZE = (32, 48)
MODELS = {  # Triton name -> (run, options); "faces_slow" holds batches 2 s to fill (the deadline case)
    "scenes": ("scenes", ServingOptions(format="python", max_batch=8)),
    "faces": ("faces", ServingOptions(format="python", max_batch=4)),
    "faces_slow": ("faces", ServingOptions(format="python", max_batch=4, queue_delay_us=2_000_000)),
}
SERVED = ("scenes", "faces")


@pytest.fixture(scope="module", autouse=True)
def triton_install():
    return require_triton()


@pytest.fixture(scope="module")
def runs(exported_run, exported_faces_run, tmp_path_factory):
    base = tmp_path_factory.mktemp("gateway-triton-runs")
    return {"scenes": randomised_copy(exported_run, base / "scenes", 3),
            "faces": randomised_copy(exported_faces_run, base / "faces", 4)}


@pytest.fixture(scope="module")
def repository(runs, tmp_path_factory):
    repo = tmp_path_factory.mktemp("gateway-triton") / "model_repository"
    for name, (run, options) in MODELS.items():
        convert(runs[run], repo, name, options)
    return repo


class Triton:
    """The module's Triton server; `restart` stops it and starts it again on the same ports."""

    def __init__(self, repository) -> None:
        self.repository = repository
        self.server = start_tritonserver(repository, extra_args=("--disable-auto-complete-config",))
        self.ports = tuple(int(url.rsplit(":", 1)[1].split("/")[0])
                           for url in (self.server.grpc_url, self.server.http_url, self.server.metrics_url))

    def start(self) -> None:
        self.server = start_tritonserver(self.repository, extra_args=("--disable-auto-complete-config",),
                                         ports=self.ports)


@pytest.fixture(scope="module")
def triton(repository):
    handle = Triton(repository)
    yield handle
    handle.server.stop()


@pytest.fixture(scope="module")
def embedded(repository):
    with RunningGateway(repository=repository, models=SERVED) as gw:
        yield gw


@pytest.fixture(scope="module")
def fronted(repository, triton):
    with RunningGateway(repository=repository, models=SERVED, backend="triton", triton_url=f"dns:///{triton.server.grpc_url}",
                        max_batch=8) as gw:
        yield gw


def predict(gw, model: str, data: bytes, timeout: float = 30) -> pb.PredictResponse:
    return gw.stub.Predict(pb.PredictRequest(model=model, encoded_image=data), timeout=timeout)


def outputs_of(response: pb.PredictResponse) -> dict[str, np.ndarray | dict]:
    """Each task's primary field (class map, metres, ...), as its kind names it."""
    return {task: fields[kind(response.outputs[task].WhichOneof("output")).primary]
            for task, fields in answers(response).items()}


def assert_same_outputs(got: dict, want: dict, what: str) -> None:
    assert set(got) == set(want), what
    for task, expected in want.items():
        actual = got[task]
        if isinstance(expected, dict):
            assert set(actual) == set(expected), f"{what}: {task}"
            assert np.allclose(list(actual.values()), [expected[k] for k in actual], atol=1e-5), f"{what}: {task}"
        elif expected.dtype == np.uint8:  # class maps: argmax of the same logits
            assert np.mean(actual != expected) <= 1e-3, f"{what}: {task} differs at {np.mean(actual != expected):.2%}"
        else:
            assert actual.shape == expected.shape and np.allclose(actual, expected, atol=1e-4, rtol=1e-4), \
                f"{what}: {task} max error {np.abs(actual - expected).max():.3g}"


def assert_equivalent(fronted, embedded, count: int = 12) -> None:
    """``count`` images per model, sent concurrently (so both gateways batch them), agree task by task."""
    images = [image_bytes(SIZE, seed=seed) for seed in range(count)]
    with ThreadPoolExecutor(8) as pool:
        for model in SERVED:
            via_triton = list(pool.map(lambda d, m=model: predict(fronted, m, d), images))
            in_process = list(pool.map(lambda d, m=model: predict(embedded, m, d), images))
            for k, (a, b) in enumerate(zip(via_triton, in_process, strict=True)):
                assert a.model_version == b.model_version == 1
                assert_same_outputs(outputs_of(a), outputs_of(b), f"{model} image {k}")
            first, second = (outputs_of(r) for r in via_triton[:2])
            assert any(not np.array_equal(first[t], second[t]) for t in first if not isinstance(first[t], dict)), \
                f"{model}: outputs do not depend on the image, the comparison would prove nothing"


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} within {timeout:.0f} s")
        time.sleep(0.1)


def health(gw) -> int:
    return health_pb2_grpc.HealthStub(gw.channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status


def test_model_info_names_the_triton_backend(fronted):
    info = fronted.stub.GetModel(pb.GetModelRequest(name="scenes"), timeout=10)
    assert (info.backend, info.ready, info.version) == ("triton", True, 1)
    assert info.max_batch_size == 8  # the gateway's --max-batch, within Triton's max_batch_size (8)
    assert fronted.stub.GetModel(pb.GetModelRequest(name="faces"), timeout=10).max_batch_size == 4  # Triton's cap


def test_every_task_through_triton_equals_the_embedded_backend(fronted, embedded):
    assert_equivalent(fronted, embedded)


def test_requested_tasks_and_timings_come_back(fronted):
    response = fronted.stub.Predict(pb.PredictRequest(model="faces", encoded_image=image_bytes(SIZE), tasks=["attributes"],
                                                      output_dtype=pb.FLOAT16), timeout=30)
    assert list(response.outputs) == ["attributes"]
    t = response.timings
    assert t.inference_ms > 0 and t.batch_size >= 1
    assert abs(t.decode_ms + t.preprocess_ms + t.queue_ms + t.inference_ms + t.postprocess_ms - t.total_ms) < 0.01


def test_backend_honours_the_deadline_of_a_batch(repository, triton, fronted):
    """Triton holds a lone request of ``faces_slow`` 2 s for its batch to fill; a 0.3 s deadline ends the call."""
    version_dir = repository / "faces_slow" / "1"
    metadata = ModelMetadata.from_manifest("faces_slow", 1, load_manifest(version_dir / "manifest.json"))

    async def scenario():
        backend = TritonBackend(version_dir, metadata, url=triton.server.grpc_url, max_batch_size=4,
                                warmup_batch_sizes=())
        await backend.load()
        try:
            batch = metadata.blank_batch(1)
            started = time.perf_counter()
            with pytest.raises(DeadlineExceeded, match="deadline"):
                await backend.infer(batch, metadata.io_spec.output_names, deadline=started + 0.3)
            return time.perf_counter() - started
        finally:
            await backend.close()

    assert fronted.call(scenario()) < 1.5  # gave up at the deadline, not after Triton's 2 s queue delay


def test_unavailable_is_retried_with_backoff_then_reported(repository, fronted):
    """Transient UNAVAILABLE answers are retried (bounded); persistent ones fail the batch as UNAVAILABLE."""
    version_dir = repository / "faces" / "1"
    metadata = ModelMetadata.from_manifest("faces", 1, load_manifest(version_dir / "manifest.json"))

    class Answers:
        def __init__(self, failures: int) -> None:
            self.failures, self.calls = failures, 0

        async def infer(self, name, inputs, outputs, client_timeout):
            self.calls += 1
            if self.calls <= self.failures:
                raise InferenceServerException("connection reset", status="StatusCode.UNAVAILABLE")
            return _Result({o.name(): np.ones((1, 2), np.float32) for o in outputs})

    async def scenario(failures: int):
        backend = TritonBackend(version_dir, metadata, url="127.0.0.1:1", retries=3, retry_backoff_s=0.001)
        backend._client, backend._loaded, backend._healthy = Answers(failures), True, True
        try:
            out = await backend.infer(metadata.blank_batch(1), ["attributes"])
        except BackendUnavailable as exc:
            return backend._client.calls, str(exc), backend.ready
        return backend._client.calls, sorted(out), backend.ready

    assert fronted.call(scenario(2)) == (3, ["attributes"], True)
    calls, message, ready = fronted.call(scenario(10))
    assert calls == 4 and "after 4 attempts" in message and not ready


class _Result:
    def __init__(self, arrays: dict) -> None:
        self.arrays = arrays

    def as_numpy(self, name: str) -> np.ndarray:
        return self.arrays[name]


def test_triton_down_means_not_ready_and_unavailable_then_recovers_by_itself(triton, fronted, embedded):
    """Last in the module: it stops the shared Triton server (and starts it again)."""
    assert predict(fronted, "scenes", image_bytes(SIZE)).model == "scenes"
    triton.server.stop()
    with fronted.http() as http:
        wait_for(lambda: http.get("/readyz").status_code == 503, 15, "the gateway did not report not-ready")
        body = http.get("/readyz").json()
        assert body["status"] == "backend-unavailable" and set(body["not_ready"]) == set(SERVED)
        assert "Triton" in body["not_ready"]["scenes"]
        wait_for(lambda: health(fronted) == health_pb2.HealthCheckResponse.NOT_SERVING, 5, "gRPC health still SERVING")
        metrics = http.get("/metrics").text
        assert 'parsimony_gateway_backend_ready{model="scenes"} 0.0' in metrics
        started = time.perf_counter()
        with pytest.raises(grpc.RpcError) as info:
            predict(fronted, "scenes", image_bytes(SIZE))
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE and "Triton" in info.value.details()
        assert time.perf_counter() - started < 2  # refused at once, not queued behind a dead server
        response = http.post("/v1/models/scenes:predict", content=image_bytes(SIZE),
                             headers={"Content-Type": "image/png"})
        assert response.status_code == 503 and "retry" in response.json()["error"]["message"]
        assert http.get("/healthz").status_code == 200  # alive: restarting the gateway would not help

        triton.start()
        wait_for(lambda: http.get("/readyz").status_code == 200, 30, "the gateway did not recover")
        wait_for(lambda: health(fronted) == health_pb2.HealthCheckResponse.SERVING, 5, "gRPC health not SERVING")
        assert 'parsimony_gateway_backend_ready{model="scenes"} 1.0' in http.get("/metrics").text
    assert_equivalent(fronted, embedded, count=4)


def test_a_new_version_is_followed_once_triton_serves_it_without_failing_requests(runs, tmp_path):
    """Triton polls the repository; the gateway polls it too but swaps only when Triton reports the
    new version ready. A client keeps predicting throughout: every request succeeds."""
    repo = tmp_path / "model_repository"
    options = ServingOptions(format="python", max_batch=4)
    convert(runs["scenes"], repo, "scenes", options)
    poll = ("--disable-auto-complete-config", "--model-control-mode=poll", "--repository-poll-secs=1")
    with start_tritonserver(repo, extra_args=poll) as server, \
            RunningGateway(repository=repo, models=("scenes",), backend="triton", triton_url=server.grpc_url,
                           poll_interval_s=0.2) as gw:
        versions, failures, stop = [], [], threading.Event()

        def keep_predicting():
            data = image_bytes(SIZE)
            while not stop.is_set():
                try:
                    versions.append(predict(gw, "scenes", data, timeout=10).model_version)
                except grpc.RpcError as exc:
                    failures.append(f"{exc.code()}: {exc.details()}")

        client = threading.Thread(target=keep_predicting)
        client.start()
        try:
            wait_for(lambda: len(versions) > 20, 30, "no predictions on version 1")
            convert(runs["scenes"], repo, "scenes", options)  # version 2, written as the converter always does
            wait_for(lambda: versions and versions[-1] == 2, 60, "the gateway did not move to version 2")
            moved = len(versions)
            wait_for(lambda: len(versions) > moved + 20, 30, "no predictions on version 2")
        finally:
            stop.set()
            client.join(30)
    assert not failures, failures[:3]
    assert versions[0] == 1 and set(versions) == {1, 2}
    assert versions == sorted(versions)  # once on version 2, never back


def test_startup_waits_for_triton_and_gives_up_with_a_clear_error(repository):
    with pytest.raises(Exception, match="did not report model 'scenes' version 1 ready within 1 s"):
        with RunningGateway(repository=repository, models=("scenes",), backend="triton",
                            triton_url="127.0.0.1:1", triton_load_timeout_s=1):
            pass
