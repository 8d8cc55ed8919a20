"""The gateway serving final graphs (pre- and post-processing inside the graph) with the embedded backend.

A final graph's outputs are the answers already: the gateway sends the image's pixels as they are,
asks ONNX Runtime for exactly the tensors a call needs (the requested tasks' primary fields in the
requested dtype, probability maps only on request) and puts them on the wire untouched. So every
answer must be byte for byte what ONNX Runtime returns for the same pixels, over gRPC and HTTP, and
a request for some tasks must move only their tensors. Models built by hand (`hand_built_export`,
all five kinds) with a uint8 ``[N, H, W, 3]`` input and with a float32 ``[N, 3, H, W]`` one.
"""

from __future__ import annotations

import base64
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from gateway_support import EVERY_KIND as TASKS
from gateway_support import RunningGateway, answers, decoded, hand_built_export, image_bytes

from parsimony import onnxrt
from parsimony.manifest import Manifest
from serving.proto.parsimony.v1 import gateway_pb2 as pb
from serving.server import codec
from serving.server.backend import BACKENDS, OnnxRuntimeBackend, register_backend
from serving.server.errors import InvalidInput
from serving.server.metadata import ModelMetadata

SIZE = (32, 48)
IMAGE = image_bytes(SIZE, seed=21)
PIXELS = decoded(IMAGE)


@register_backend("recording-onnxruntime")
class RecordingBackend(OnnxRuntimeBackend):
    """ONNX Runtime that records the output names of every forward pass it is asked for."""

    calls: list[list[str]] = []

    async def infer(self, batch, outputs, deadline=None):
        RecordingBackend.calls.append(list(outputs))
        return await super().infer(batch, outputs, deadline)


assert BACKENDS["recording-onnxruntime"] is RecordingBackend


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("final")
    return {"pixels": hand_built_export(root / "pixels", TASKS, SIZE, seed=7, final=True),
            "floats": hand_built_export(root / "floats", TASKS, SIZE, seed=7, final=True, input_dtype="float32")}


@pytest.fixture(scope="module")
def gw(models, tmp_path_factory):
    repo = tmp_path_factory.mktemp("final-repo")
    for name, folder in models.items():
        (repo / name / "1").mkdir(parents=True)
        for file in ("model.onnx", "manifest.json"):
            (repo / name / "1" / file).write_bytes((folder / file).read_bytes())
    with RunningGateway(repository=repo, models=tuple(models), backend="recording-onnxruntime") as running:
        yield running


def graph_outputs(folder, image: np.ndarray) -> dict[str, np.ndarray]:
    """Every output of the graph in ``folder`` for one image (as the graph takes it), by name."""
    session = onnxrt.session(folder / "model.onnx", threads=1)
    names = [o.name for o in session.get_outputs()]
    return {n: r[0] for n, r in zip(names, session.run(names, {"image": image[None]}), strict=True)}


def predict(gw, model: str = "pixels", **options) -> pb.PredictResponse:
    options.setdefault("encoded_image", IMAGE)
    return gw.stub.Predict(pb.PredictRequest(model=model, **options), timeout=30)


def expected(outputs: dict[str, np.ndarray], fp16: bool, probabilities: bool) -> dict[str, dict]:
    """The answer each task should get, read straight from the graph's outputs."""
    half = "_fp16" if fp16 else ""
    want = {"segmentation": {"class_map": outputs["segmentation"]}, "depth": {"depth": outputs[f"depth{half}"]},
            "normal": {"normal": outputs[f"normal{half}"]},
            "attributes": {"probabilities": dict(zip(("Male", "Smiling"), outputs["attributes"].tolist(), strict=True))},
            "edges": {"edge_map": outputs["edges"]}}
    if probabilities:
        want["segmentation"]["probabilities"] = outputs[f"segmentation_probabilities{half}"]
        want["edges"]["probabilities"] = outputs[f"edges_probabilities{half}"]
    return want


def assert_identical(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    for task, fields in want.items():
        assert set(got[task]) == set(fields), task
        for name, value in fields.items():
            if isinstance(value, dict):
                assert got[task][name] == pytest.approx(value, abs=0, rel=1e-7), f"{task}.{name}"  # proto float
            else:
                assert got[task][name].dtype == value.dtype and got[task][name].tobytes() == value.tobytes(), \
                    f"{task}.{name}"


@pytest.mark.parametrize("fp16", [False, True])
@pytest.mark.parametrize("probabilities", [False, True])
def test_every_answer_over_grpc_is_the_graphs_output_byte_for_byte(gw, models, fp16, probabilities):
    outputs = graph_outputs(models["pixels"], PIXELS)
    response = predict(gw, probabilities=probabilities, output_dtype=pb.FLOAT16 if fp16 else pb.FLOAT32)
    assert_identical(answers(response), expected(outputs, fp16, probabilities))
    assert outputs["segmentation"].dtype == np.uint8 and len(np.unique(outputs["segmentation"])) > 1  # the answers depend on pixels


def test_every_answer_over_http_is_the_graphs_output_byte_for_byte(gw, models):
    outputs = graph_outputs(models["pixels"], PIXELS)
    with gw.http() as http:
        body = http.post("/v1/models/pixels:predict?probabilities=true&output_dtype=float16", content=IMAGE,
                         headers={"Content-Type": "image/png"}).json()
    want = expected(outputs, fp16=True, probabilities=True)
    for task, fields in want.items():
        got = body["outputs"][task]
        for name, value in fields.items():
            if isinstance(value, dict):
                assert got[name] == value, f"{task}.{name}"  # JSON carries the float32 values exactly
            else:
                assert got[name]["dtype"] == str(value.dtype) and got[name]["shape"] == list(value.shape)
                assert base64.b64decode(got[name]["data"]) == value.tobytes(), f"{task}.{name}"


def test_uint8_tensors_go_in_as_they_are_and_float32_tensors_are_quantised(gw):
    from_png = answers(predict(gw))
    pixels = pb.Tensor(dtype=pb.UINT8, shape=PIXELS.shape, data=PIXELS.tobytes())
    assert_identical(answers(predict(gw, encoded_image=None, tensor=pixels)), from_png)
    unit = (PIXELS.transpose(2, 0, 1) / np.float32(255)).astype(np.float32)
    floats = pb.Tensor(dtype=pb.FLOAT32, shape=unit.shape, data=unit.tobytes())
    assert_identical(answers(predict(gw, encoded_image=None, tensor=floats)), from_png)  # round(x * 255) restores them


def test_quantisation_rounds_to_the_nearest_8_bit_value():
    unit = np.array([[[0.0, 0.49 / 255, 1.51 / 255, 200.5 / 255, 1.0]]], np.float32).repeat(3, axis=0)
    assert codec.quantise(unit).transpose(2, 0, 1)[:, 0].tolist() == [[0, 0, 2, 200, 255]] * 3  # half to even


def test_a_float_input_model_takes_float32_tensors_exactly(gw, models):
    unit = np.random.default_rng(5).random((3, *SIZE), dtype=np.float32)  # not 8-bit values: kept exactly
    outputs = graph_outputs(models["floats"], unit)
    response = predict(gw, "floats", encoded_image=None, tensor=pb.Tensor(dtype=pb.FLOAT32, shape=unit.shape,
                                                                           data=unit.tobytes()))
    assert_identical(answers(response), expected(outputs, fp16=False, probabilities=False))
    from_png = graph_outputs(models["floats"], codec.preprocess(PIXELS))  # 8-bit pixels become x / 255
    assert_identical(answers(predict(gw, "floats")), expected(from_png, fp16=False, probabilities=False))


@pytest.mark.parametrize("options, moved", [
    ({"tasks": ["depth"]}, ["depth"]),
    ({"tasks": ["depth"], "output_dtype": pb.FLOAT16}, ["depth_fp16"]),
    ({"tasks": ["segmentation", "normal"]}, ["segmentation", "normal"]),
    ({"tasks": ["segmentation"], "probabilities": True, "output_dtype": pb.FLOAT16}, ["segmentation", "segmentation_probabilities_fp16"]),
    ({"tasks": ["attributes", "edges"], "output_dtype": pb.FLOAT16}, ["attributes", "edges"]),
    ({}, ["segmentation", "depth", "normal", "attributes", "edges"]),
])
def test_a_request_moves_only_the_tensors_it_asks_for(gw, options, moved):
    RecordingBackend.calls.clear()
    response = predict(gw, **options)
    assert RecordingBackend.calls == [moved]
    session = gw.server.models.lease("pixels").backend._session_for(tuple(moved))  # made by the call above
    assert sorted(o.name for o in session.get_outputs()) == sorted(moved)  # ONNX Runtime computes nothing else
    assert sorted(response.outputs) == sorted(options.get("tasks", [t.name for t in TASKS]))


def test_concurrent_requests_for_different_tasks_each_get_their_own_answers(gw):
    """Requests batched together share forward passes asking for the union of their tensors (and
    nothing else); each gets its own tasks, the same bytes as alone."""
    alone = answers(predict(gw))
    asks = [["depth"], ["segmentation"], ["normal", "attributes"], ["edges"]] * 4
    RecordingBackend.calls.clear()
    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda tasks: answers(predict(gw, tasks=tasks)), asks))
    for tasks, got in zip(asks, responses, strict=True):
        assert_identical(got, {t: alone[t] for t in tasks})
    assert all(len(call) == len(set(call)) and set(call) <= {"depth", "segmentation", "normal", "attributes", "edges"}
               for call in RecordingBackend.calls)


def test_a_missing_float16_output_is_refused_at_load(models):
    manifest = Manifest.load(models["pixels"]).to_dict()
    manifest["graph"]["tensors"] = [t for t in manifest["graph"]["tensors"] if t["name"] != "depth_fp16"]
    manifest["io_spec"]["outputs"] = [t for t in manifest["io_spec"]["outputs"] if t["name"] != "depth_fp16"]
    with pytest.raises(ValueError, match=r"lists no output for \['depth.depth \(float16\)'\]"):
        ModelMetadata.from_manifest("pixels", 1, manifest)


def test_metadata_of_a_final_graph(models):
    meta = ModelMetadata.from_manifest("pixels", 1, Manifest.load(models["pixels"]))
    assert (meta.final, meta.input_dtype, meta.input_shape, meta.height, meta.width) == (True, "uint8", (*SIZE, 3), *SIZE)
    assert meta.blank_batch(2).dtype == np.uint8 and meta.blank_batch(2).shape == (2, *SIZE, 3)
    seg = meta.task("segmentation")
    assert meta.outputs_for(seg, "float16", True) == (("class_map", "segmentation"), ("probabilities", "segmentation_probabilities_fp16"))
    floats = ModelMetadata.from_manifest("floats", 1, Manifest.load(models["floats"]))
    assert (floats.input_dtype, floats.input_shape) == ("float32", (3, *SIZE))
    with pytest.raises(InvalidInput, match="must be finite RGB values in"):
        codec.tensor_input(codec.RawTensor("float32", (3, *SIZE), np.full((3, *SIZE), 2, np.float32).tobytes()),
                           meta, 10_000)
