"""Triton directly, a first-class path: a final graph converted by ``serving.convert`` and served by
the real Triton server (bundled in nvidia-pytriton) answers ``tritonclient`` calls, over gRPC and
HTTP, with the same class map, depth and normals as the gateway, byte for byte; and the gateway in
front of Triton answers byte-identically to the gateway running ONNX Runtime in process, asking
Triton only for the tensors each call needs.

Two models: one built by hand (`hand_built_export`: all five kinds, a uint8 ``[N, H, W, 3]``
input) and one trained and exported by the real ``training.run`` / ``training.export`` (its weights
redrawn so that every answer depends on its image). Requests are sent one at a time, so both backends run the
same batch of one (ONNX Runtime's results can depend on the batch size in the last bit).

Needs ``.venv-triton`` (``make triton-venv``); skips only with ``PARSIMONY_SKIP_TRITON=1``.
"""

from __future__ import annotations

import base64
import re
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from gateway_support import EVERY_KIND as TASKS
from gateway_support import RunningGateway, answers, decoded, hand_built_export, image_bytes
from test_gateway_final import assert_identical
from triton_server import randomised_copy, require_triton, start_tritonserver

from parsimony.tasks import kind
from serving.convert import convert
from serving.proto.parsimony.v1 import gateway_pb2 as pb
from serving.triton_config import ServingOptions

SIZE = (32, 48)
IMAGE = image_bytes(SIZE, seed=31)
PIXELS = decoded(IMAGE)
MODEL = "scenes"  # hand-built, every kind
TRAINED = "trained"  # segmentation, depth, normal
README = Path(__file__).resolve().parent.parent / "README.md"


@pytest.fixture(scope="module", autouse=True)
def triton_install():
    return require_triton()


@pytest.fixture(scope="module")
def repository(exported_run, tmp_path_factory):
    root = tmp_path_factory.mktemp("triton-direct")
    options = ServingOptions(format="python", max_batch=4)
    convert(hand_built_export(root / "export", TASKS, SIZE, seed=9, final=True), root / "model_repository", MODEL,
            options)
    convert(randomised_copy(exported_run, root / "trained", seed=12), root / "model_repository", TRAINED, options)
    return root / "model_repository"


@pytest.fixture(scope="module")
def server(repository):
    handle = start_tritonserver(repository, extra_args=("--disable-auto-complete-config",))
    yield handle
    handle.stop()


@pytest.fixture(scope="module")
def clients(server):
    made = {"grpc": grpcclient.InferenceServerClient(server.grpc_url),
            "http": httpclient.InferenceServerClient(server.http_url)}
    yield made
    for client in made.values():
        client.close()  # before the server stops: an open HTTP connection holds its shutdown


@pytest.fixture(scope="module")
def embedded(repository):
    with RunningGateway(repository=repository, models=(MODEL, TRAINED)) as gw:
        yield gw


@pytest.fixture(scope="module")
def fronted(repository, server):
    with RunningGateway(repository=repository, models=(MODEL, TRAINED), backend="triton", triton_url=server.grpc_url,
                        max_batch=4) as gw:
        yield gw


def gateway_answers(gw, protocol: str, model: str = MODEL, **options) -> dict:
    """``{task: {field: value}}`` of one prediction of `IMAGE` over ``protocol``."""
    if protocol == "grpc":
        return answers(gw.stub.Predict(pb.PredictRequest(model=model, encoded_image=IMAGE, **options), timeout=30))
    query = {"probabilities": str(options.get("probabilities", False)).lower(),
             "output_dtype": "float16" if options.get("output_dtype") == pb.FLOAT16 else "float32"}
    with gw.http() as http:
        body = http.post(f"/v1/models/{model}:predict", params=query, content=IMAGE,
                         headers={"Content-Type": "image/png"}).json()
    return {task: {name: value if kind(out["kind"]).field(name).what == "map" else _array(value)
                   for name, value in out.items() if name != "kind" and value is not None}
            for task, out in body["outputs"].items()}


def _array(tensor: dict) -> np.ndarray:
    return np.frombuffer(base64.b64decode(tensor["data"]), tensor["dtype"]).reshape(tensor["shape"])


def infer(client, outputs: list[str], model: str = MODEL) -> dict[str, np.ndarray]:
    """One tritonclient call with `PIXELS` (uint8 ``[H, W, 3]``), reading ``outputs`` back."""
    module = grpcclient if isinstance(client, grpcclient.InferenceServerClient) else httpclient
    image = module.InferInput("image", [1, *PIXELS.shape], "UINT8")
    image.set_data_from_numpy(PIXELS[None])
    result = client.infer(model, [image], outputs=[module.InferRequestedOutput(n) for n in outputs])
    return {n: result.as_numpy(n)[0] for n in outputs}


def test_the_served_config_describes_the_final_graph(clients):
    config = clients["grpc"].get_model_config(MODEL).config
    assert [(i.name, grpcclient.model_config_pb2.DataType.Name(i.data_type), list(i.dims)) for i in config.input] == \
        [("image", "TYPE_UINT8", [*SIZE, 3])]
    types = {o.name: grpcclient.model_config_pb2.DataType.Name(o.data_type) for o in config.output}
    assert types["segmentation"] == types["edges"] == "TYPE_UINT8"
    assert types["depth"] == types["normal"] == types["attributes"] == types["segmentation_probabilities"] == "TYPE_FP32"
    assert types["depth_fp16"] == types["segmentation_probabilities_fp16"] == types["edges_probabilities_fp16"] \
        == "TYPE_FP16"
    labels = {"segmentation_probabilities": "segmentation_labels.txt", "segmentation_raw": "segmentation_labels.txt",
              "segmentation_probabilities_fp16": "segmentation_labels.txt", "attributes": "attributes_labels.txt",
              "attributes_raw": "attributes_labels.txt"}
    assert {o.name: o.label_filename for o in config.output if o.label_filename} == labels


@pytest.mark.parametrize("protocol", ["grpc", "http"])
@pytest.mark.parametrize("options", [{}, {"probabilities": True, "output_dtype": pb.FLOAT16},
                                     {"probabilities": True}], ids=["plain", "fp16-probabilities", "probabilities"])
def test_the_gateway_through_triton_answers_byte_identically_to_the_embedded_backend(fronted, embedded, protocol,
                                                                                      options):
    via_triton = gateway_answers(fronted, protocol, **options)
    in_process = gateway_answers(embedded, protocol, **options)
    assert set(in_process) == {t.name for t in TASKS}
    assert_identical(via_triton, in_process)
    if options.get("probabilities"):
        assert "probabilities" in in_process["segmentation"] and "probabilities" in in_process["edges"]


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_tritonclient_gets_the_class_map_depth_and_normals_the_gateway_returns(clients, embedded, protocol):
    direct = infer(clients[protocol], ["segmentation", "depth", "normal", "attributes",
                                       "segmentation_probabilities_fp16"])
    gateway = gateway_answers(embedded, "grpc", probabilities=True, output_dtype=pb.FLOAT16)
    float32 = gateway_answers(embedded, "grpc")
    class_map = direct["segmentation"]
    assert class_map.dtype == np.uint8 and class_map.tobytes() == gateway["segmentation"]["class_map"].tobytes()
    assert direct["depth"].dtype == np.float32 and direct["depth"].tobytes() == float32["depth"]["depth"].tobytes()
    assert direct["normal"].tobytes() == float32["normal"]["normal"].tobytes()
    assert direct["segmentation_probabilities_fp16"].tobytes() == gateway["segmentation"]["probabilities"].tobytes()
    assert dict(zip(("Male", "Smiling"), direct["attributes"].tolist(), strict=True)) == \
        pytest.approx(float32["attributes"]["probabilities"], abs=0, rel=1e-7)
    assert len(np.unique(class_map)) > 1 and np.ptp(direct["depth"]) > 0  # answers that depend on the pixels


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_a_trained_export_answers_alike_through_tritonclient_the_gateway_and_triton(clients, embedded, fronted,
                                                                                    protocol):
    """The real export's final graph: tritonclient's class map, depth, normals and FP16 probabilities
    are the gateway's bytes, and the gateway answers alike through Triton and in process."""
    direct = infer(clients[protocol], ["segmentation", "depth", "normal", "segmentation_probabilities_fp16"], TRAINED)
    in_process = gateway_answers(embedded, protocol, TRAINED, probabilities=True)
    half = gateway_answers(embedded, protocol, TRAINED, probabilities=True, output_dtype=pb.FLOAT16)
    for name, value in (("segmentation", in_process["segmentation"]["class_map"]),
                        ("depth", in_process["depth"]["depth"]), ("normal", in_process["normal"]["normal"]),
                        ("segmentation_probabilities_fp16", half["segmentation"]["probabilities"])):
        assert direct[name].dtype == value.dtype and direct[name].tobytes() == value.tobytes(), name
    assert_identical(gateway_answers(fronted, protocol, TRAINED, probabilities=True), in_process)
    assert len(np.unique(direct["segmentation"])) > 1 and np.ptp(direct["depth"]) > 0


def test_a_request_for_some_tasks_asks_triton_for_only_their_tensors(fronted):
    backend = fronted.server.models.lease(MODEL).backend
    client, asked, returned = backend._client, [], []

    async def recording_infer(model_name, inputs, outputs=None, **kw):
        asked.append([o.name() for o in outputs])
        result = await client_infer(model_name, inputs, outputs=outputs, **kw)
        returned.append([o.name for o in result.get_response().outputs])
        return result

    client_infer = client.infer
    client.infer = recording_infer
    try:
        depth = fronted.stub.Predict(pb.PredictRequest(model=MODEL, encoded_image=IMAGE, tasks=["depth"],
                                                       output_dtype=pb.FLOAT16), timeout=30)
        both = fronted.stub.Predict(pb.PredictRequest(model=MODEL, encoded_image=IMAGE,
                                                      tasks=["segmentation", "edges"], probabilities=True), timeout=30)
    finally:
        client.infer = client_infer
    assert asked == returned == [["depth_fp16"], ["segmentation", "segmentation_probabilities", "edges",
                                                  "edges_probabilities"]]
    assert list(depth.outputs) == ["depth"] and sorted(both.outputs) == ["edges", "segmentation"]


def test_the_readme_example_runs_against_the_server(server, embedded, tmp_path):
    """README's tritonclient example, run as written but for the server's address and the image file."""
    block = re.search(r"```python\n(# Triton directly.*?)```", README.read_text(), re.S)
    assert block, "README has no tritonclient example starting with '# Triton directly'"
    (tmp_path / "image.png").write_bytes(IMAGE)
    code = block.group(1).replace("localhost:8001", server.grpc_url).replace('"image.png"',
                                                                           repr(str(tmp_path / "image.png")))
    scope: dict = {}
    exec(compile(code, str(README), "exec"), scope)  # noqa: S102 - the project's own README
    want = gateway_answers(embedded, "grpc")
    assert scope["class_map"].tobytes() == want["segmentation"]["class_map"].tobytes()
    assert scope["depth"].tobytes() == want["depth"]["depth"].tobytes()
    assert scope["normal"].tobytes() == want["normal"]["normal"].tobytes()
