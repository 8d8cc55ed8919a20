"""The gateway's HTTP API over a real socket (httpx) and in process (ASGI): every route, every body
type, the OpenAPI schema, and every error case with the status code the gRPC side maps to as well."""

from __future__ import annotations

import base64
import concurrent.futures

import grpc
import numpy as np
import pytest
from gateway_support import RunningGateway, SlowBackend, decoded, image_bytes, publish_version
from test_gateway_grpc import LIMIT, SIZE

from serving.server.codec import preprocess
from serving.server.errors import Code

PNG = image_bytes(SIZE, "PNG", seed=7)


@pytest.fixture(scope="module")
def gw(tmp_path_factory, exported_run, exported_faces_run):
    root = tmp_path_factory.mktemp("repo")
    publish_version(root, "scenes", exported_run, 1)
    publish_version(root, "faces", exported_faces_run, 1)
    with RunningGateway(repository=root, max_message_bytes=LIMIT) as gw:
        yield gw


@pytest.fixture(scope="module")
def client(gw):
    with gw.http() as c:
        yield c


def array(t: dict) -> np.ndarray:
    return np.frombuffer(base64.b64decode(t["data"]), t["dtype"]).reshape(t["shape"])


def depth_of(body: dict) -> np.ndarray:
    return array(body["outputs"]["depth"]["depth"])


def test_connections_are_accepted_with_nagle_off(gw):
    """Without TCP_NODELAY the second write of each response on a kept-alive connection waits for the
    client's delayed ACK (measured: 52 ms per request instead of 9 ms)."""
    import socket

    listening = [s for server in gw.server._http.servers for s in server.sockets]
    assert listening and all(s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) for s in listening)


def test_raw_png_body_returns_every_task(client):
    r = client.post("/v1/models/scenes:predict", content=PNG, headers={"Content-Type": "image/png"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["model"], body["model_version"]) == ("scenes", 1)
    assert {k: v["kind"] for k, v in body["outputs"].items()} == {
        "segmentation": "segmentation", "depth": "depth", "normal": "normal"}
    seg = body["outputs"]["segmentation"]
    assert array(seg["class_map"]).shape == SIZE and seg["probabilities"] is None
    assert array(body["outputs"]["normal"]["normal"]).shape == (3, *SIZE)
    assert body["timings"]["batch_size"] == 1 and body["timings"]["total_ms"] > 0


def test_every_body_type_gives_the_same_prediction(client):
    pixels = decoded(PNG)
    chw = preprocess(pixels)
    jpeg_free = [
        client.post("/v1/models/scenes:predict?tasks=depth", content=PNG, headers={"Content-Type": "image/png"}),
        client.post("/v1/models/scenes:predict", files={"image": ("x.png", PNG, "image/png")}, data={"tasks": "depth"}),
        client.post("/v1/models/scenes:predict", json={"image": base64.b64encode(PNG).decode(), "tasks": ["depth"]}),
        client.post("/v1/models/scenes:predict", json={"tensor": {"dtype": "uint8", "shape": list(pixels.shape),
                    "data": base64.b64encode(pixels.tobytes()).decode()}, "tasks": ["depth"]}),
        client.post("/v1/models/scenes:predict", json={"tensor": {"dtype": "float32", "shape": list(chw.shape),
                    "data": base64.b64encode(chw.tobytes()).decode()}, "tasks": ["depth"]}),
    ]
    assert [r.status_code for r in jpeg_free] == [200] * 5, [r.text for r in jpeg_free]
    depths = [depth_of(r.json()) for r in jpeg_free]
    for d in depths[1:]:
        np.testing.assert_array_equal(d, depths[0])
    assert all(set(r.json()["outputs"]) == {"depth"} for r in jpeg_free)


def test_jpeg_body_and_options_in_query_form_and_json(client):
    jpeg = image_bytes(SIZE, "JPEG")
    r = client.post("/v1/models/scenes:predict?tasks=segmentation,normal&output_dtype=float16"
                    "&segmentation_probabilities=true", content=jpeg, headers={"Content-Type": "image/jpeg"})
    out = r.json()["outputs"]
    assert set(out) == {"segmentation", "normal"}
    assert array(out["segmentation"]["probabilities"]).dtype == np.float16
    assert array(out["normal"]["normal"]).dtype == np.float16
    r = client.post("/v1/models/scenes:predict", files={"image": ("x.jpg", jpeg, "image/jpeg")},
                    data={"tasks": ["depth", "normal"], "output_dtype": "float16"})
    assert set(r.json()["outputs"]) == {"depth", "normal"} and array(r.json()["outputs"]["depth"]["depth"]).dtype == np.float16
    r = client.post("/v1/models/scenes:predict", json={"image": base64.b64encode(jpeg).decode(),
                                                       "segmentation_probabilities": True, "tasks": ["segmentation"]})
    assert array(r.json()["outputs"]["segmentation"]["probabilities"]).shape == (7, *SIZE)


def test_attributes_by_name(client):
    r = client.post("/v1/models/faces:predict", content=PNG, headers={"Content-Type": "image/png"})
    attributes = [v for v in r.json()["outputs"].values() if v["kind"] == "attributes"]
    assert len(attributes) == 1
    assert all(0 <= p <= 1 for p in attributes[0]["probabilities"].values()) and attributes[0]["probabilities"]


def test_list_and_get_models(client):
    listed = client.get("/v1/models").json()["models"]
    assert sorted(m["name"] for m in listed) == ["faces", "scenes"]
    info = client.get("/v1/models/scenes").json()
    assert info["input"] == {"height": 32, "width": 48, "channels": 3, "color": "RGB", "encodings": ["png", "jpeg"]}
    assert [t["kind"] for t in info["tasks"]] == ["segmentation", "depth", "normal"] and info["ready"] is True


def test_health_readiness_metrics_and_openapi(client):
    assert client.get("/healthz").json() == {"status": "alive"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json() == {"status": "ready", "models": {"faces": 1, "scenes": 1}}
    metrics = client.get("/metrics")
    assert metrics.headers["content-type"].startswith("text/plain")
    for name in ("parsimony_gateway_stage_seconds_bucket", "parsimony_gateway_batch_size_bucket",
                 "parsimony_gateway_in_flight_requests", 'parsimony_gateway_model_info{backend="onnxruntime"'):
        assert name in metrics.text
    schema = client.get("/openapi.json").json()
    assert {"/v1/models/{name}:predict", "/v1/models", "/v1/models/{name}", "/healthz", "/readyz", "/metrics"} <= set(
        schema["paths"])
    body = schema["paths"]["/v1/models/{name}:predict"]["post"]["requestBody"]["content"]
    assert {"image/png", "image/jpeg", "multipart/form-data", "application/json"} <= set(body)
    assert "PredictJSON" in schema["components"]["schemas"]
    assert client.get("/docs").status_code == 404  # off unless --docs: its page loads Swagger UI from a CDN
    assert "server" not in {k.lower() for k in metrics.headers}  # no software banner


def test_docs_only_with_the_flag(exported_run):
    with RunningGateway(run=exported_run, docs=True) as gw, gw.http() as client:
        page = client.get("/docs")
        assert page.status_code == 200 and "/openapi.json" in page.text


ERRORS = [
    ("undecodable", dict(content=b"garbage", headers={"Content-Type": "image/png"}), 400, "neither PNG nor JPEG"),
    ("wrong size", dict(content=image_bytes((16, 16)), headers={"Content-Type": "image/png"}), 400, "takes exactly"),
    ("cmyk", dict(content=image_bytes(SIZE, "JPEG", mode="CMYK"), headers={"Content-Type": "image/jpeg"}), 400,
     "colour profile"),
    ("nan tensor", dict(json={"tensor": {"dtype": "float32", "shape": [3, *SIZE], "data": base64.b64encode(
        np.full((3, *SIZE), np.nan, np.float32).tobytes()).decode()}}), 400, "element [0, 0, 0] (channel, row, column) is nan"),
    ("unknown task", dict(content=PNG, headers={"Content-Type": "image/png"}, params={"tasks": "sky"}), 400,
     "no task 'sky'"),
    ("bad option", dict(content=PNG, headers={"Content-Type": "image/png"},
                        params={"segmentation_probabilities": "maybe"}), 400, "true or false"),
    ("bad json", dict(json={"image": "x", "tensor": None, "color": "red"}), 400, "color: Extra inputs"),
    ("two inputs", dict(json={"image": "eA==", "tensor": {"dtype": "uint8", "shape": [1], "data": ""}}), 400,
     "exactly one of"),
    ("bad base64", dict(json={"image": "not base64!"}), 400, "not valid base64"),
    ("no image field", dict(files={"picture": ("x.png", PNG, "image/png")}), 400, "no file field 'image'"),
    ("media type", dict(content=b"hello", headers={"Content-Type": "text/plain"}), 415, "is not accepted"),
    ("too large", dict(content=b"\0" * (LIMIT + 1), headers={"Content-Type": "image/png"}), 413,
     "over the server's limit"),
]


@pytest.mark.parametrize("case, request_kw, status, message", ERRORS, ids=[e[0] for e in ERRORS])
def test_errors_have_a_status_and_a_message(client, case, request_kw, status, message):
    r = client.post("/v1/models/scenes:predict", **request_kw)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert message in error["message"] and Code[error["code"]].http == status
    assert client.post("/v1/models/scenes:predict", content=PNG, headers={"Content-Type": "image/png"}).status_code == 200


def test_error_metrics_carry_grpc_code_names_only(client):
    """HTTP-only refusals (413 payload too large, 415 unsupported media) count as INVALID_ARGUMENT:
    one code vocabulary for both protocols, in which the server's own faults are told apart by name."""
    for _, request_kw, status, _ in ERRORS:
        assert client.post("/v1/models/scenes:predict", **request_kw).status_code == status
    codes = {line.split('code="', 1)[1].split('"', 1)[0] for line in client.get("/metrics").text.splitlines()
             if line.startswith("parsimony_gateway_errors_total{")}
    assert "INVALID_ARGUMENT" in codes and codes <= set(grpc.StatusCode.__members__), codes
    assert all(code.grpc_name in grpc.StatusCode.__members__ for code in Code)


def test_unknown_model_is_404(client):
    assert client.post("/v1/models/nope:predict", content=PNG, headers={"Content-Type": "image/png"}).status_code == 404
    r = client.get("/v1/models/nope")
    assert r.status_code == 404 and r.json()["error"]["code"] == "NOT_FOUND"


def test_in_process_asgi_calls(gw):
    r = gw.asgi("POST", "/v1/models/scenes:predict", content=PNG, headers={"Content-Type": "image/png"})
    assert r.status_code == 200 and set(r.json()["outputs"]) == {"segmentation", "depth", "normal"}
    assert gw.asgi("GET", "/v1/models").status_code == 200
    assert gw.asgi("GET", "/v1/models/faces").json()["name"] == "faces"
    assert gw.asgi("GET", "/readyz").status_code == 200
    assert gw.asgi("POST", "/v1/models/scenes:predict", content=b"x", headers={"Content-Type": "image/png"}
                   ).status_code == 400
    assert 'protocol="http"' in gw.asgi("GET", "/metrics").text


def test_queue_full_is_429_and_deadline_is_504(exported_run, tmp_path):
    publish_version(tmp_path, "scenes", exported_run, 1)
    SlowBackend.infer_delay = 0.4
    try:
        with RunningGateway(repository=tmp_path, backend="slow-onnxruntime", max_batch=1, max_queue=1) as gw, \
                gw.http() as first, gw.http() as second, gw.http() as third:
            headers = {"Content-Type": "image/png"}
            with concurrent.futures.ThreadPoolExecutor(2) as pool:
                running = pool.submit(first.post, "/v1/models/scenes:predict", content=PNG, headers=headers)
                gw.wait_for_queue("scenes", running=1, queued=0)
                queued = pool.submit(second.post, "/v1/models/scenes:predict", content=PNG, headers=headers)
                gw.wait_for_queue("scenes", running=1, queued=1)
                full = third.post("/v1/models/scenes:predict", content=PNG, headers=headers)
                assert full.status_code == 429 and full.json()["error"]["code"] == "RESOURCE_EXHAUSTED"
                assert running.result().status_code == 200 and queued.result().status_code == 200
                running = pool.submit(first.post, "/v1/models/scenes:predict", content=PNG, headers=headers)
                gw.wait_for_queue("scenes", running=1, queued=0)
                late = third.post("/v1/models/scenes:predict", content=PNG, headers={**headers, "X-Timeout-Ms": "100"})
                assert late.status_code == 504 and late.json()["error"]["code"] == "DEADLINE_EXCEEDED"
                assert running.result().status_code == 200
            assert third.post("/v1/models/scenes:predict", content=PNG, headers=headers).status_code == 200
            for value in ("soon", "0", "-1", "nan", "inf", ""):
                bad = third.post("/v1/models/scenes:predict", content=PNG, headers={**headers, "X-Timeout-Ms": value})
                assert bad.status_code == 400 and "positive number of milliseconds" in bad.text, value
    finally:
        SlowBackend.infer_delay = 0.0
