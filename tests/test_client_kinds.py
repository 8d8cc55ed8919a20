"""The client's side of the task kinds, without a server: answers of every kind (edges included)
decoded alike from both protocols' wire forms (built here by hand), the probabilities flag on the
wire, the file `clients.predict` writes for each kind, the colour tables, and the HTTP status ->
gRPC code map."""

from __future__ import annotations

import base64
import json

import httpx
import numpy as np
import pytest
from PIL import Image

from clients import Client, ClientError, calls
from clients import visualize as vis
from clients.errors import from_http
from clients.predict import write_outputs
from clients.types import ModelInfo, TaskInfo, model_from_dict, prediction_from_json, prediction_from_proto
from parsimony.tasks import kind, kind_names
from parsimony.tasks.edges import EDGE
from parsimony.wire import STAGE_FIELDS, STATUSES, proto_dtype_name, to_wire, wire_dtype_of
from serving.proto.parsimony.v1 import gateway_pb2 as pb

SIZE = (6, 8)
TIMINGS = {s: float(i + 1) for i, s in enumerate(STAGE_FIELDS)} | {"batch_size": 2}
TASKS = {
    "segmentation": TaskInfo("seg", "segmentation", 3, labels=("floor", "wall", "sky")),
    "depth": TaskInfo("depth", "depth", 1, unit="metres"),
    "normal": TaskInfo("normal", "normal", 3),
    "attributes": TaskInfo("attrs", "attributes", 2, labels=("smiling", "glasses")),
    "edges": TaskInfo("edges", "edges", 1),
}


def raw_output(task: TaskInfo, seed: int = 0) -> np.ndarray:
    """One image's graph output of ``task`` (no batch dimension)."""
    shape = (task.channels, *SIZE) if task.owner.dense else (task.channels,)
    return np.random.default_rng(seed).normal(0, 2, shape).astype(np.float32)


def answer(task: TaskInfo, probabilities: bool) -> dict:
    return task.owner.postprocess(task, raw_output(task), np.dtype(np.float32), probabilities)


def proto_response(answers: dict[str, tuple[str, dict]]) -> pb.PredictResponse:
    """A PredictResponse as a gateway builds it: each field of each kind's message set from its value."""
    r = pb.PredictResponse(model="m", model_version=3, timings=pb.Timings(**TIMINGS))
    for task, (kind_name, fields) in answers.items():
        message = getattr(r.outputs[task], kind_name)
        for name, value in fields.items():
            if isinstance(value, dict):
                getattr(message, name).update(value)
            else:
                getattr(message, name).CopyFrom(pb.Tensor(
                    dtype=pb.DataType.Value(proto_dtype_name(wire_dtype_of(value))), shape=value.shape,
                    data=to_wire(value)))
    return r


def json_body(answers: dict[str, tuple[str, dict]]) -> dict:
    """The HTTP API's JSON answer: each task an object with ``kind`` and its fields."""
    def encode(value):
        if isinstance(value, dict):
            return value
        return {"dtype": wire_dtype_of(value), "shape": list(value.shape),
                "data": base64.b64encode(to_wire(value)).decode()}

    outputs = {task: {"kind": k} | {name: encode(v) for name, v in fields.items()} for task, (k, fields) in answers.items()}
    return json.loads(json.dumps({"model": "m", "model_version": 3, "outputs": outputs, "timings": TIMINGS}))


def both(answers):
    return prediction_from_proto(proto_response(answers)), prediction_from_json(json_body(answers))


def test_every_kind_is_known_to_the_test():
    assert set(TASKS) == set(kind_names())  # a new kind: add a task of it above


@pytest.mark.parametrize("probabilities", [False, True])
def test_every_kind_decodes_alike_from_both_protocols(probabilities):
    answers = {t.name: (k, answer(t, probabilities)) for k, t in TASKS.items()}
    for p in both(answers):
        assert (p.model, p.version, p.batch_size) == ("m", 3, 2)
        assert p.timings == {s: TIMINGS[s] for s in STAGE_FIELDS}
        assert p.kinds == {t.name: k for k, t in TASKS.items()}
        for name, (k, fields) in answers.items():
            primary, got = fields[kind(k).primary], p.outputs[name]
            if isinstance(primary, dict):
                assert got == pytest.approx(primary, abs=1e-6) and all(isinstance(v, float) for v in got.values())
            else:
                np.testing.assert_array_equal(got, primary)
                assert got.dtype == primary.dtype
            assert set(p.fields[name]) == set(fields)
        with_probabilities = {"seg", "edges"} if probabilities else set()
        assert set(p.probabilities) == with_probabilities
        for name in with_probabilities:
            np.testing.assert_array_equal(p.probabilities[name], answers[name][1]["probabilities"])


def test_an_edges_answer_decodes_to_its_edge_map_and_probabilities():
    task = TASKS["edges"]
    logits = raw_output(task)
    fields = task.owner.postprocess(task, logits, np.dtype(np.float16), True)
    for p in both({"edges": ("edges", fields)}):
        edge_map = p.outputs["edges"]
        assert edge_map.shape == SIZE and edge_map.dtype == np.uint8 and set(np.unique(edge_map)) <= {0, EDGE}
        np.testing.assert_array_equal(edge_map == EDGE, logits[0] >= 0)
        probs = p.probabilities["edges"]
        assert probs.shape == SIZE and probs.dtype == np.float16
        np.testing.assert_allclose(probs, 1 / (1 + np.exp(-logits[0])), atol=1e-3)
    plain = task.owner.postprocess(task, logits, np.dtype(np.float32), False)
    for p in both({"edges": ("edges", plain)}):
        assert p.probabilities == {} and set(p.fields["edges"]) == {"edge_map"}


def test_answers_the_client_cannot_read_are_errors_that_say_why():
    unknown = proto_response({})
    unknown.outputs["x"].SetInParent()  # a kind this client's proto does not have arrives as an empty slot
    with pytest.raises(ClientError, match="upgrade the client") as info:
        prediction_from_proto(unknown)
    assert info.value.code == "UNIMPLEMENTED"
    body = json_body({"x": ("edges", {})})
    body["outputs"]["x"]["kind"] = "contours"
    with pytest.raises(ClientError, match="kind this client does not know"):
        prediction_from_json(body)
    with pytest.raises(ClientError, match="lacks its 'edge_map' field") as info:
        prediction_from_json(json_body({"x": ("edges", {})}))
    assert info.value.code == "INTERNAL"


def test_model_descriptions_keep_labels_and_tolerate_newer_kinds():
    info = model_from_dict({"name": "m", "tasks": [
        {"name": "seg", "kind": "segmentation", "channels": 2, "class_names": ["a", "b"], "attribute_names": []},
        {"name": "attrs", "kind": "attributes", "channels": 1, "class_names": [], "attribute_names": ["x"]},
        {"name": "edges", "kind": "edges", "channels": 1, "class_names": [], "attribute_names": []},
        {"name": "new", "kind": "contours", "channels": 1},
    ]})
    assert info.task("seg").class_names == ("a", "b") and info.task("seg").attribute_names == ()
    assert info.task("attrs").attribute_names == ("x",) and info.task("attrs").class_names == ()
    assert info.task("edges").labels == () and info.task("new").kind == "contours"


def sent(client_call) -> calls.Call:
    """The Call a `Client` method would send (the transport is never used)."""
    with Client("127.0.0.1:1") as client:
        client._call = lambda call, timeout, retry=None: call
        return client_call(client)


@pytest.mark.parametrize("image", [b"\x89PNG\r\n\x1a\n...", np.zeros((*SIZE, 3), np.uint8)], ids=["png", "tensor"])
@pytest.mark.parametrize("option", ["probabilities", "segmentation_probabilities"])
def test_probabilities_flag_goes_on_the_wire(image, option):
    call = sent(lambda c: c.predict("m", image, **{option: True}))
    assert call.grpc_request.probabilities and call.grpc_request.segmentation_probabilities
    http = call.http_args.get("params") or call.http_args["json"]
    assert str(http["segmentation_probabilities"]).lower() == "true"
    plain = sent(lambda c: c.predict("m", image))
    assert not plain.grpc_request.probabilities and not plain.grpc_request.segmentation_probabilities
    assert "probabilities" not in (plain.http_args.get("params") or plain.http_args["json"])


def test_tensors_go_on_the_wire_with_the_contract_dtypes():
    pixels = np.arange(2 * 3 * 3, dtype=np.float32).reshape(3, 2, 3) / 20
    call = sent(lambda c: c.predict("m", pixels, output_dtype="float16"))
    t = call.grpc_request.tensor
    assert (t.dtype, list(t.shape), t.data) == (pb.FLOAT32, [3, 2, 3], pixels.astype("<f4").tobytes())
    assert call.grpc_request.output_dtype == pb.FLOAT16
    body = call.http_args["json"]
    assert (body["tensor"]["dtype"], body["output_dtype"]) == ("float32", "float16")
    assert sent(lambda c: c.predict("m", b"\xff\xd8\xff...")).http_args["headers"]["Content-Type"] == "image/jpeg"


def model_of(tasks) -> ModelInfo:
    return ModelInfo("m", 1, True, "test", *SIZE, 3, ("png",), tuple(tasks), 4, 0, 0)


def test_predict_writes_an_edges_result_as_a_png_of_its_picture(tmp_path):
    task = TASKS["edges"]
    fields = answer(task, False)
    p = prediction_from_proto(proto_response({"edges": ("edges", fields)}))
    written = write_outputs(p, model_of([task]), "img", tmp_path)
    assert [f.name for f in tmp_path.iterdir()] == ["img.edges.png"]
    image = Image.open(tmp_path / "img.edges.png")
    scale = vis.scale_for(SIZE[0])
    pixels = np.asarray(image.convert("RGB"))[:SIZE[0] * scale:scale, :SIZE[1] * scale:scale]
    np.testing.assert_array_equal(pixels, vis.palette(2)[(fields["edge_map"] == EDGE).astype(int)])
    assert json.loads(image.text["classes"]) == ["background", "boundary"] and image.text["kind"] == "edges"
    assert image.text["scale"] == str(scale) and image.width > SIZE[1] * scale  # the legend to the right
    assert "boundary" in written["edges"] and written["edges"].startswith(str(tmp_path / "img.edges.png"))


def test_predict_writes_one_file_per_task_of_every_kind(tmp_path):
    answers = {t.name: (k, answer(t, True)) for k, t in TASKS.items()}
    p = prediction_from_json(json_body(answers))
    written = write_outputs(p, model_of(TASKS.values()), "img", tmp_path)
    want = {f"img.{t.name}.{'json' if k == 'attributes' else 'png'}" for k, t in TASKS.items()}
    assert {f.name for f in tmp_path.iterdir()} == want and set(written) == {t.name for t in TASKS.values()}
    scores = json.loads((tmp_path / "img.attrs.json").read_text())
    assert list(scores) == ["smiling", "glasses"] and scores == pytest.approx(p.outputs["attrs"])
    depth = Image.open(tmp_path / "img.depth.png")
    d = p.outputs["depth"]
    assert (float(depth.text["depth_min_m"]), float(depth.text["depth_max_m"])) == pytest.approx((d.min(), d.max()))


def test_colour_tables_are_matplotlibs():
    matplotlib = pytest.importorskip("matplotlib")
    for n in (2, 7, 10, 13, 20):
        name = "tab10" if n <= 10 else "tab20"
        want = np.round(np.asarray(matplotlib.colormaps[name].colors[:n]) * 255)
        np.testing.assert_array_equal(vis.palette(n), want)
    want = np.round(matplotlib.colormaps["viridis"](np.linspace(0, 1, 256))[:, :3] * 255)
    assert np.abs(vis.viridis().astype(int) - want).max() <= 6


def test_palette_beyond_twenty_classes_stays_distinct():
    colours = vis.palette(40)
    assert colours.shape == (40, 3) and len({tuple(c) for c in colours}) == 40


def http_error(status: int, body: object = None, text: str = "") -> ClientError:
    content = json.dumps(body).encode() if body is not None else text.encode()
    return from_http(httpx.Response(status, content=content, request=httpx.Request("POST", "http://gw/x")))


def test_http_statuses_map_to_the_gateways_grpc_codes():
    for status in STATUSES:
        if status.name != "OK":
            error = http_error(status.http, text="<html>proxy page</html>")
            assert (error.code, error.http_status) == (status.grpc, status.http)
            assert "proxy page" in str(error)
    assert [http_error(s).code for s in (401, 403, 501, 502, 418)] == [
        "UNAUTHENTICATED", "PERMISSION_DENIED", "UNIMPLEMENTED", "UNAVAILABLE", "UNKNOWN"]
    assert http_error(413).code == http_error(415).code == http_error(422).code == "INVALID_ARGUMENT"
    error = http_error(400, {"error": {"code": "NOT_FOUND", "message": "no model 'x'"}})
    assert (error.code, str(error)) == ("NOT_FOUND", "no model 'x'")  # the gateway's own code wins
    assert http_error(503, {"error": {"code": "SOMETHING", "message": "m"}}).code == "UNAVAILABLE"
