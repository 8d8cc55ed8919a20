"""The converter's python-backend models in the real Triton server (bundled in nvidia-pytriton).

One server per module serves three models converted by ``serving.convert``: the scenes run
(segmentation, depth, normal), the faces run (segmentation, attributes) and the faces run again
with a long queue delay so concurrent requests are provably batched together. Every task output
that Triton returns over gRPC and HTTP must equal ONNX Runtime (same graph, in-process) and
PyTorch (the compact model) within tolerance.

The session fixtures' strong λ leaves input-independent outputs, which would let a server that
mixed up batch rows pass; the runs are therefore copied and their compact weights randomised
(then exported again by the real ``training.export``, as raw graphs, whose outputs PyTorch's
compact model gives directly), so every output depends on its image. `test_triton_direct` serves
final graphs.

Needs ``.venv-triton`` (``make triton-venv``); fails with that instruction when it is missing,
and skips only with ``PARSIMONY_SKIP_TRITON=1``.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from triton_server import TritonUnavailable, randomised_copy, require_triton, start_tritonserver
from tritonclient.utils import InferenceServerException

from serving.convert import convert
from serving.repository import read_version
from serving.triton_config import ServingOptions
from training.compaction import load_compact

MODELS = {  # Triton name -> (fixture run, options)
    "scenes": ("scenes", ServingOptions(format="python", max_batch=8)),
    "faces": ("faces", ServingOptions(format="python", max_batch=4)),
    "faces_batched": ("faces", ServingOptions(format="python", max_batch=4, queue_delay_us=2_000_000)),
}
PROTOCOLS = ("grpc", "http")


@pytest.fixture(scope="session", autouse=True)
def triton_install():
    """First, so a missing server fails (or skips) before any model is trained or exported."""
    return require_triton()


@pytest.fixture(scope="module")
def runs(exported_run, exported_faces_run, tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("varied")
    return {"scenes": randomised_copy(exported_run, base / "scenes", 1, raw_outputs=True),
            "faces": randomised_copy(exported_faces_run, base / "faces", 2, raw_outputs=True)}


@pytest.fixture(scope="module")
def repository(runs, tmp_path_factory) -> Path:
    repo = tmp_path_factory.mktemp("triton") / "model_repository"
    for name, (run, options) in MODELS.items():
        convert(runs[run], repo, name, options)
    return repo


@pytest.fixture(scope="module")
def server(repository):
    handle = start_tritonserver(repository, extra_args=("--disable-auto-complete-config",))
    yield handle
    assert handle.stop() is not None and handle.process.poll() is not None


@pytest.fixture(scope="module")
def clients(server):
    """One client per protocol, closed before the server stops (an open HTTP keep-alive connection
    holds Triton's shutdown for its whole exit timeout)."""
    made = {"grpc": grpcclient.InferenceServerClient(server.grpc_url),
            "http": httpclient.InferenceServerClient(server.http_url)}
    yield made
    for client in made.values():
        client.close()


def infer(client, model: str, images: np.ndarray, outputs: list[str]) -> dict[str, np.ndarray]:
    module = grpcclient if isinstance(client, grpcclient.InferenceServerClient) else httpclient
    tensor = module.InferInput("image", list(images.shape), "FP32")
    tensor.set_data_from_numpy(images)
    requested = [module.InferRequestedOutput(name) for name in outputs]
    result = client.infer(model, [tensor], outputs=requested)
    return {name: result.as_numpy(name) for name in outputs}


def references(run: Path, images: np.ndarray) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(ONNX Runtime, PyTorch) outputs of the run's export for ``images``."""
    session = ort.InferenceSession(str(run / "model.onnx"), providers=["CPUExecutionProvider"])
    onnx_out = dict(zip([o.name for o in session.get_outputs()], session.run(None, {"image": images}), strict=True))
    with torch.no_grad():
        torch_out = {k: v.numpy() for k, v in load_compact(run / "compact")(torch.from_numpy(images)).items()}
    return onnx_out, torch_out


def assert_close(actual: np.ndarray, expected: np.ndarray, *, atol: float, rtol: float, what: str) -> None:
    assert actual.shape == expected.shape and actual.dtype == np.float32, what
    bound = atol + rtol * float(np.abs(expected).max())
    error = float(np.abs(actual - expected).max())
    assert error <= bound, f"{what}: max error {error:.3g} > {bound:.3g}"


def images(batch: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).random((batch, 3, 32, 48), dtype=np.float32)


def test_every_model_is_ready(clients):
    client = clients["grpc"]
    assert client.is_server_ready()
    assert all(client.is_model_ready(name, "1") for name in MODELS)
    assert {m.name for m in client.get_model_repository_index().models} == set(MODELS)


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("model", ["scenes", "faces"])
def test_metadata_lists_every_task_output(clients, repository, protocol, model):
    version = read_version(repository, model)
    metadata = clients[protocol].get_model_metadata(model)
    outputs = metadata.outputs if protocol == "grpc" else metadata["outputs"]
    listed = {(o["name"], o["datatype"], tuple(map(int, o["shape"]))) if protocol == "http"
              else (o.name, o.datatype, tuple(o.shape)) for o in outputs}
    assert listed == {(t.name, "FP32", t.shape) for t in version.io_spec.outputs}
    assert {t.output for t in version.manifest.tasks} == {name for name, _, _ in listed}


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("model", ["scenes", "faces"])
def test_inference_equals_onnx_runtime_and_pytorch(clients, repository, runs, protocol, model):
    batch = images(3, seed=len(model))
    outputs = list(read_version(repository, model).io_spec.output_names)
    served = infer(clients[protocol], model, batch, outputs)
    onnx_out, torch_out = references(runs[MODELS[model][0]], batch)
    assert set(served) == set(onnx_out) == set(torch_out)
    for name in outputs:
        assert np.abs(served[name][0] - served[name][1]).max() > 1e-4, f"{name} does not depend on its input"
        assert_close(served[name], onnx_out[name], atol=1e-5, rtol=1e-5, what=f"{name} vs ONNX Runtime")
        assert_close(served[name], torch_out[name], atol=1e-3, rtol=1e-4, what=f"{name} vs PyTorch")


def test_concurrent_requests_are_batched_and_split_back(clients, runs):
    """Four batch-1 requests reach the preferred batch (4) inside the 2 s queue delay, run as fewer
    executions, and each caller gets the rows of its own image."""
    client = clients["grpc"]
    before = client.get_inference_statistics("faces_batched").model_stats[0]
    inputs = [images(1, seed=100 + i) for i in range(4)]
    with ThreadPoolExecutor(4) as pool:
        served = list(pool.map(lambda x: infer(client, "faces_batched", x, ["segmentation", "attributes"]), inputs))
    after = client.get_inference_statistics("faces_batched").model_stats[0]
    assert after.inference_count - before.inference_count == 4
    assert after.execution_count - before.execution_count < 4
    onnx_out, _ = references(runs["faces"], np.concatenate(inputs))
    for i, result in enumerate(served):
        for name, value in result.items():
            assert_close(value, onnx_out[name][i : i + 1], atol=1e-5, rtol=1e-5, what=f"request {i} {name}")


def test_served_config_is_the_generated_one(clients):
    served = clients["grpc"].get_model_config("faces").config
    assert served.max_batch_size == 4
    assert list(served.dynamic_batching.preferred_batch_size) == [2, 4]
    assert {o.name: o.label_filename for o in served.output} == {
        "segmentation": "segmentation_labels.txt", "attributes": "attributes_labels.txt"}


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_wrong_input_shape_is_refused(clients, protocol):
    with pytest.raises(InferenceServerException, match="image"):
        infer(clients[protocol], "scenes", np.zeros((1, 3, 16, 16), np.float32), ["depth"])


def test_server_that_cannot_load_a_model_reports_its_log(tmp_path):
    broken = tmp_path / "repo" / "broken"
    (broken / "1").mkdir(parents=True)
    (broken / "config.pbtxt").write_text('name: "broken"\nbackend: "no_such_backend"\nmax_batch_size: 1\n')
    with pytest.raises(TritonUnavailable, match="no_such_backend"):
        start_tritonserver(tmp_path / "repo", ready_timeout=60)
