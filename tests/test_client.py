"""The client library against a real gateway over gRPC and HTTP: every method on both protocols and
both clients (sync, asyncio), identical answers whatever the protocol or the image's form, what the
raw stub returns decoded right, and every error mapped to one `ClientError` code."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from gateway_support import RunningGateway, decoded, image_bytes, publish_version, tensor_of
from PIL import Image

from clients import AsyncClient, Client, ClientError, RetryPolicy
from clients.transport import TLS, endpoint
from serving.proto.parsimony.v1 import gateway_pb2 as pb

SIZE = (32, 48)
PNG = image_bytes(SIZE, "PNG", seed=11)
PROTOCOLS = ("grpc", "http")


def serve_scenes_and_faces(tmp_path_factory, scenes_run, faces_run):
    """A gateway serving both exported runs (models "scenes" and "faces", version 1); a fixture body."""
    root = tmp_path_factory.mktemp("repo")
    publish_version(root, "scenes", scenes_run, 1)
    publish_version(root, "faces", faces_run, 1)
    with RunningGateway(repository=root) as gw:
        yield gw


@pytest.fixture(scope="module")
def gw(tmp_path_factory, exported_run, exported_faces_run):
    yield from serve_scenes_and_faces(tmp_path_factory, exported_run, exported_faces_run)


def address(gw, protocol: str) -> str:
    return gw.grpc_target if protocol == "grpc" else gw.http_url


@pytest.fixture(scope="module", params=PROTOCOLS)
def client(request, gw):
    with Client(address(gw, request.param), timeout=30) as client:
        yield client


def test_list_and_get_model_describe_tasks_and_input(client):
    assert client.ready() is True
    models = {m.name: m for m in client.list_models()}
    assert set(models) == {"scenes", "faces"}
    scenes = client.get_model("scenes")
    assert scenes == models["scenes"]
    assert (scenes.version, scenes.ready, scenes.input_size, scenes.channels) == (1, True, SIZE, 3)
    assert {t.name: t.kind for t in scenes.tasks} == {"segmentation": "segmentation", "depth": "depth", "normal": "normal"}
    assert len(scenes.task("segmentation").class_names) == 7 and scenes.task("depth").unit == "metres"
    assert scenes.parameters > 0 and scenes.max_batch_size >= 1 and "png" in scenes.encodings
    faces = models["faces"]
    assert faces.task("attributes").attribute_names and faces.task("attributes").kind == "attributes"
    with pytest.raises(KeyError, match="its tasks"):
        scenes.task("attributes")


def test_predict_returns_numpy_outputs_and_timings(client):
    p = client.predict("scenes", PNG)
    assert (p.model, p.version, p.batch_size) == ("scenes", 1, 1)
    assert p.kinds == {"segmentation": "segmentation", "depth": "depth", "normal": "normal"}
    seg, depth, normal = p.outputs["segmentation"], p.outputs["depth"], p.outputs["normal"]
    assert seg.shape == SIZE and seg.dtype == np.uint8 and seg.max() < 7
    assert depth.shape == SIZE and depth.dtype == np.float32 and depth.min() >= 0
    assert normal.shape == (3, *SIZE) and normal.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(normal, axis=0), 1, atol=1e-3)
    assert p.probabilities == {}
    assert set(p.timings) == {"decode_ms", "preprocess_ms", "queue_ms", "inference_ms", "postprocess_ms", "total_ms"}
    assert p.timings["inference_ms"] > 0 and p.timings["total_ms"] >= p.timings["inference_ms"]


def test_every_image_form_gives_the_same_answer(client, tmp_path):
    path = tmp_path / "image.png"
    path.write_bytes(PNG)
    pixels = decoded(PNG)
    forms = [PNG, path, str(path), Image.open(path), pixels, pixels.astype(np.float32).transpose(2, 0, 1) / 255]
    depths = [client.predict("scenes", image, tasks=["depth"]).outputs["depth"] for image in forms]
    for depth in depths[1:]:
        np.testing.assert_allclose(depth, depths[0], rtol=1e-5, atol=1e-6)


def test_options_select_tasks_dtype_and_probabilities(client):
    p = client.predict("scenes", PNG, tasks=["depth", "segmentation"], segmentation_probabilities=True)
    assert set(p.outputs) == {"depth", "segmentation"}
    probs = p.probabilities["segmentation"]
    assert probs.shape == (7, *SIZE) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(0), 1, atol=1e-4)
    np.testing.assert_array_equal(probs.argmax(0), p.outputs["segmentation"])
    half = client.predict("scenes", PNG, output_dtype="float16", segmentation_probabilities=True)
    assert half.outputs["depth"].dtype == half.outputs["normal"].dtype == half.probabilities["segmentation"].dtype == np.float16
    np.testing.assert_allclose(half.outputs["depth"], p.outputs["depth"], rtol=1e-3, atol=1e-3)
    assert set(client.predict("scenes", PNG, tasks="normal").outputs) == {"normal"}  # "a,b" strings work too


def test_attributes_come_back_as_name_to_probability(client):
    info = client.get_model("faces")
    p = client.predict("faces", image_bytes(SIZE, seed=2))
    attributes = p.outputs["attributes"]
    assert p.kinds["attributes"] == "attributes"
    assert set(attributes) == set(info.task("attributes").attribute_names)  # a proto map: no order
    assert all(isinstance(v, float) and 0 <= v <= 1 for v in attributes.values())


def test_grpc_and_http_answers_are_identical(gw):
    with Client(gw.grpc_target) as g, Client(gw.http_url) as h:
        for model, image in (("scenes", PNG), ("faces", image_bytes(SIZE, seed=4))):
            a, b = (c.predict(model, image, segmentation_probabilities=True) for c in (g, h))
            assert (a.model, a.version, a.kinds) == (b.model, b.version, b.kinds)
            assert a.outputs.keys() == b.outputs.keys() and a.probabilities.keys() == b.probabilities.keys()
            for task, value in a.outputs.items():
                if isinstance(value, dict):
                    assert value == pytest.approx(b.outputs[task], abs=1e-6)
                else:
                    np.testing.assert_array_equal(value, b.outputs[task])
            for task, value in a.probabilities.items():
                np.testing.assert_array_equal(value, b.probabilities[task])
        assert g.get_model("faces") == h.get_model("faces")
        assert g.list_models() == h.list_models()


def test_client_decodes_exactly_what_the_stub_receives(gw):
    reply = gw.stub.Predict(pb.PredictRequest(model="scenes", encoded_image=PNG), timeout=30)
    with Client(gw.grpc_target) as client:
        p = client.predict("scenes", PNG)
    np.testing.assert_array_equal(p.outputs["segmentation"], tensor_of(reply.outputs["segmentation"].segmentation.class_map))
    np.testing.assert_array_equal(p.outputs["depth"], tensor_of(reply.outputs["depth"].depth.depth))
    np.testing.assert_array_equal(p.outputs["normal"], tensor_of(reply.outputs["normal"].normal.normal))


@pytest.mark.parametrize("call, code, status, words", [
    (lambda c: c.predict("nope", PNG), "NOT_FOUND", 404, "served models"),
    (lambda c: c.get_model("nope"), "NOT_FOUND", 404, "served models"),
    (lambda c: c.predict("scenes", image_bytes((10, 10))), "INVALID_ARGUMENT", 400, "takes exactly 48x32"),
    (lambda c: c.predict("scenes", PNG, tasks=["colour"]), "INVALID_ARGUMENT", 400, "no task 'colour'"),
    (lambda c: c.predict("scenes", b"\x89PNG\r\n\x1a\n broken"), "INVALID_ARGUMENT", 400, "PNG"),
    (lambda c: c.predict("scenes", np.zeros((16, 16, 3), np.uint8)), "INVALID_ARGUMENT", 400, "48"),
], ids=["unknown-model", "unknown-model-info", "wrong-size", "unknown-task", "broken-png", "wrong-tensor-size"])
def test_server_errors_are_client_errors_with_the_grpc_code(client, call, code, status, words):
    retried = []
    client.retry = RetryPolicy(on_retry=lambda *event: retried.append(event))
    try:
        with pytest.raises(ClientError) as info:
            call(client)
    finally:
        client.retry = RetryPolicy()
    error = info.value
    assert error.code == code and words in str(error), repr(error)
    assert error.http_status == (status if client.protocol == "http" else None)
    assert error.attempts == 1 and not retried  # only UNAVAILABLE is retried
    assert client.predict("scenes", PNG).model == "scenes"  # the server keeps serving


def test_bad_arguments_are_refused_before_sending(client):
    with pytest.raises(ValueError, match=r"uint8 \[H, W, 3\]"):
        client.predict("scenes", np.zeros((32, 48), np.uint8))
    with pytest.raises(ValueError, match="output_dtype"):
        client.predict("scenes", PNG, output_dtype="int8")
    with pytest.raises(TypeError, match="path, PNG/JPEG bytes"):
        client.predict("scenes", 42)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_async_client_has_the_same_methods_and_answers(gw, protocol):
    with Client(address(gw, protocol)) as sync:
        want = sync.predict("scenes", PNG)

    async def go():
        async with AsyncClient(address(gw, protocol)) as client:
            assert await client.ready() and await client.wait_ready(5)
            assert [m.name for m in await client.list_models()] == [m.name for m in sync_models]
            assert (await client.get_model("scenes")).input_size == SIZE
            answers = await asyncio.gather(*(client.predict("scenes", PNG) for _ in range(8)))
            with pytest.raises(ClientError) as info:
                await client.predict("nope", PNG)
            return answers, info.value

    with Client(address(gw, protocol)) as sync:
        sync_models = sync.list_models()
    answers, error = asyncio.run(go())
    for p in answers:
        np.testing.assert_array_equal(p.outputs["segmentation"], want.outputs["segmentation"])
        np.testing.assert_allclose(p.outputs["depth"], want.outputs["depth"], rtol=1e-5, atol=1e-6)
    assert error.code == "NOT_FOUND"


@pytest.mark.parametrize("server, protocol, tls, want", [
    ("localhost:50051", None, None, ("grpc", "localhost:50051", False)),
    ("localhost:8080", "http", None, ("http", "http://localhost:8080", False)),
    ("http://localhost:8080/", None, None, ("http", "http://localhost:8080", False)),
    ("https://gateway:443", None, None, ("http", "https://gateway:443", True)),
    ("grpcs://gateway:443", None, None, ("grpc", "gateway:443", True)),
    ("grpc://[::1]:50051", "grpc", None, ("grpc", "[::1]:50051", False)),
    ("gateway:8443", "http", True, ("http", "https://gateway:8443", True)),
    ("gateway:50051", None, TLS(), ("grpc", "gateway:50051", True)),
])
def test_addresses_choose_protocol_and_tls(server, protocol, tls, want):
    end = endpoint(server, protocol, tls)
    assert (end.protocol, end.url, end.tls is not None) == want


@pytest.mark.parametrize("server, protocol, tls, words", [
    ("http://localhost:8080", "grpc", None, "is a http address"),
    ("http://localhost:8080", None, True, "plaintext"),
    ("ftp://localhost:21", None, None, "unknown scheme"),
    ("localhost", None, None, "host:port"),
    ("localhost:1", "soap", None, "protocol must be"),
])
def test_contradictory_addresses_are_refused(server, protocol, tls, words):
    with pytest.raises(ValueError, match=words):
        endpoint(server, protocol, tls)
    with pytest.raises(ValueError, match="both cert and key"):
        TLS(cert="client.pem")
