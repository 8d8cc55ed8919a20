"""The gateway over real gRPC sockets: every RPC, typed outputs checked against ONNX Runtime, health,
reflection, and every error case with its status code (the server keeps serving after each).

The models are raw graphs (each task's head output), so the outputs check the gateway's own
post-processing against ONNX Runtime's logits; `test_gateway_final` covers final graphs."""

from __future__ import annotations

import time

import grpc
import numpy as np
import onnxruntime as ort
import pytest
from gateway_support import RunningGateway, SlowBackend, decoded, image_bytes, publish_version, tensor_of
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from parsimony.manifest import load_manifest
from parsimony.tasks import kind, kind_names
from parsimony.wire import STAGE_FIELDS, WIRE_DTYPES, proto_dtype_name
from serving.proto.parsimony.v1 import gateway_pb2 as pb
from serving.server.codec import preprocess
from serving.server.grpc_service import PredictionServicer

SIZE = (32, 48)
LIMIT = 64 << 10


@pytest.fixture(scope="module")
def repo(tmp_path_factory, exported_raw_run, exported_raw_faces_run):
    root = tmp_path_factory.mktemp("repo")
    publish_version(root, "scenes", exported_raw_run, 1)
    publish_version(root, "faces", exported_raw_faces_run, 1)
    return root


@pytest.fixture(scope="module")
def gw(repo):
    with RunningGateway(repository=repo, max_message_bytes=LIMIT, max_image_pixels=SIZE[0] * SIZE[1] * 2) as gw:
        yield gw


def reference(run_dir, pixels: np.ndarray) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(str(run_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, (r[0] for r in session.run(names, {"image": preprocess(pixels)[None]})), strict=True))


def predict(gw, **fields) -> pb.PredictResponse:
    return gw.stub.Predict(pb.PredictRequest(**fields), timeout=30)


def code_of(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code(), info.value.details()


def test_predict_png_returns_every_task_typed_and_matches_onnxruntime(gw, exported_raw_run):
    data = image_bytes(SIZE, "PNG")
    response = predict(gw, model="scenes", encoded_image=data)
    want = reference(exported_raw_run, decoded(data))
    assert (response.model, response.model_version) == ("scenes", 1)
    assert set(response.outputs) == {"segmentation", "depth", "normal"}
    seg = response.outputs["segmentation"].segmentation
    assert seg.class_map.dtype == pb.UINT8 and not seg.HasField("probabilities")
    np.testing.assert_array_equal(tensor_of(seg.class_map), want["segmentation"].argmax(0))
    depth = tensor_of(response.outputs["depth"].depth.depth)
    assert depth.shape == SIZE and depth.dtype == np.float32
    np.testing.assert_allclose(depth, np.maximum(want["depth"][0], 0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(tensor_of(response.outputs["normal"].normal.normal), want["normal"], rtol=1e-5, atol=1e-5)
    t = response.timings
    assert t.batch_size == 1 and t.decode_ms > 0 and t.inference_ms > 0
    assert t.total_ms >= t.decode_ms + t.preprocess_ms + t.queue_ms + t.inference_ms + t.postprocess_ms - 1e-6


def test_jpeg_and_raw_tensors_give_the_same_answer_as_their_pixels(gw):
    jpeg = image_bytes(SIZE, "JPEG", seed=3)
    pixels = decoded(jpeg)
    by_jpeg = predict(gw, model="scenes", encoded_image=jpeg, tasks=["depth"])
    by_uint8 = predict(gw, model="scenes", tasks=["depth"],
                       tensor=pb.Tensor(dtype=pb.UINT8, shape=pixels.shape, data=pixels.tobytes()))
    chw = preprocess(pixels)
    by_float = predict(gw, model="scenes", tasks=["depth"],
                       tensor=pb.Tensor(dtype=pb.FLOAT32, shape=chw.shape, data=chw.tobytes()))
    depths = [tensor_of(r.outputs["depth"].depth.depth) for r in (by_jpeg, by_uint8, by_float)]
    np.testing.assert_array_equal(depths[0], depths[1])
    np.testing.assert_array_equal(depths[1], depths[2])
    assert by_uint8.timings.decode_ms == 0


def test_subset_float16_and_probabilities(gw):
    response = predict(gw, model="scenes", encoded_image=image_bytes(SIZE), tasks=["normal", "segmentation"],
                       output_dtype=pb.FLOAT16, segmentation_probabilities=True)
    assert set(response.outputs) == {"segmentation", "normal"}
    probs = tensor_of(response.outputs["segmentation"].segmentation.probabilities)
    assert probs.dtype == np.float16 and probs.shape == (7, *SIZE)
    np.testing.assert_allclose(probs.astype(np.float32).sum(0), 1, atol=5e-3)
    assert tensor_of(response.outputs["normal"].normal.normal).dtype == np.float16


def test_attributes_come_back_by_name(gw, exported_raw_faces_run):
    data = image_bytes(SIZE, seed=5)
    response = predict(gw, model="faces", encoded_image=data)
    task = next(t for t in load_manifest(exported_raw_faces_run).to_dict()["tasks"] if t["kind"] == "attributes")
    probabilities = dict(response.outputs[task["name"]].attributes.probabilities)
    assert list(probabilities) == task["attribute_names"] or set(probabilities) == set(task["attribute_names"])
    logits = reference(exported_raw_faces_run, decoded(data))[task["name"]]
    want = 1 / (1 + np.exp(-logits.astype(np.float64)))
    np.testing.assert_allclose([probabilities[n] for n in task["attribute_names"]], want, rtol=1e-5, atol=1e-6)


def test_list_and_get_model(gw, exported_raw_run):
    listed = gw.stub.ListModels(pb.ListModelsRequest())
    assert sorted(m.name for m in listed.models) == ["faces", "scenes"]
    info = gw.stub.GetModel(pb.GetModelRequest(name="scenes"))
    manifest = load_manifest(exported_raw_run).to_dict()
    assert (info.version, info.ready, info.backend) == (1, True, "onnxruntime")
    assert (info.input.height, info.input.width, info.input.channels, info.input.color) == (32, 48, 3, "RGB")
    assert list(info.input.encodings) == ["png", "jpeg"]
    assert [(t.name, t.kind) for t in info.tasks] == [(t["name"], t["kind"]) for t in manifest["tasks"]]
    assert list(info.tasks[0].class_names) == manifest["tasks"][0]["class_names"]
    assert info.tasks[1].unit == "metres" and info.parameters == manifest["complexity"]["parameters"]


def test_health_and_reflection(gw):
    health = health_pb2_grpc.HealthStub(gw.channel)
    for service in ("", "parsimony.v1.PredictionService"):
        assert health.Check(health_pb2.HealthCheckRequest(service=service)).status == health_pb2.HealthCheckResponse.SERVING
    stub = reflection_pb2_grpc.ServerReflectionStub(gw.channel)
    replies = list(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
    services = {s.name for s in replies[0].list_services_response.service}
    assert {"parsimony.v1.PredictionService", "grpc.health.v1.Health"} <= services
    file_reply = list(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(
        file_containing_symbol="parsimony.v1.PredictionService")])))
    assert file_reply[0].file_descriptor_response.file_descriptor_proto


BAD = image_bytes(SIZE)
ERRORS = {
    "undecodable": (dict(model="scenes", encoded_image=b"definitely not an image"), "neither PNG nor JPEG"),
    "truncated": (dict(model="scenes", encoded_image=BAD[: len(BAD) // 2]), "cannot be decoded"),
    "wrong size": (dict(model="scenes", encoded_image=image_bytes((32, 40))), "takes exactly 48x32"),
    "cmyk": (dict(model="scenes", encoded_image=image_bytes(SIZE, "JPEG", mode="CMYK")), "colour profile"),
    "tensor channels": (dict(model="scenes", tensor=pb.Tensor(dtype=pb.UINT8, shape=[32, 48, 1], data=b"\0" * 1536)),
                        "has 1 channel"),
    "no input": (dict(model="scenes"), "no image"),
    "unknown task": (dict(model="scenes", encoded_image=BAD, tasks=["sky"]), "no task 'sky'"),
    "bad dtype": (dict(model="scenes", encoded_image=BAD, output_dtype=pb.UINT8), "output dtype 'uint8'"),
    "over size limit": (dict(model="scenes", encoded_image=b"\x89PNG" + b"\0" * LIMIT), "over the server's limit"),
    "over pixel limit": (dict(model="scenes", encoded_image=image_bytes((64, 96))), "pixels, over the server's limit"),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_bad_requests_are_invalid_argument_and_serving_goes_on(gw, case):
    fields, message = ERRORS[case]
    code, details = code_of(lambda: predict(gw, **fields))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and message in details
    assert predict(gw, model="scenes", encoded_image=BAD, tasks=["depth"]).outputs["depth"]


def test_unknown_model_is_not_found_and_names_the_served_ones(gw):
    code, details = code_of(lambda: predict(gw, model="nope", encoded_image=BAD))
    assert code == grpc.StatusCode.NOT_FOUND and "faces" in details and "scenes" in details
    code, _ = code_of(lambda: gw.stub.GetModel(pb.GetModelRequest(name="nope")))
    assert code == grpc.StatusCode.NOT_FOUND


def test_messages_over_the_transport_limit_are_cut_by_grpc(gw):
    code, _ = code_of(lambda: predict(gw, model="scenes", encoded_image=b"\0" * (LIMIT + (5 << 20))))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert predict(gw, model="scenes", encoded_image=BAD).model == "scenes"


def test_errors_are_counted_by_code(gw):
    code_of(lambda: predict(gw, model="scenes", encoded_image=b"garbage"))
    metrics = gw.http().get("/metrics").text
    assert 'parsimony_gateway_errors_total{code="INVALID_ARGUMENT",method="Predict",model="scenes",protocol="grpc"}' in metrics
    assert 'parsimony_gateway_errors_total{code="NOT_FOUND",method="Predict",model="",protocol="grpc"}' in metrics


def test_the_proto_has_one_message_per_kind_with_the_kinds_fields():
    """The proto is written by hand (it is the public API), the kinds in `parsimony.tasks`: the gateway
    encodes a kind's answer as the ``TaskOutput`` field named after the kind, one message field per
    answer field, so the two must agree; so must the dtypes and the timing stages."""
    oneof = pb.TaskOutput.DESCRIPTOR.oneofs_by_name["output"]
    assert {f.name for f in oneof.fields} == set(kind_names())
    for slot in oneof.fields:
        owner = kind(slot.name)
        message = slot.message_type
        assert [f.name for f in message.fields] == list(owner.field_names), slot.name
        for field in owner.fields:
            proto = message.fields_by_name[field.name].message_type
            if field.what == "map":
                assert proto.GetOptions().map_entry and proto.fields_by_name["value"].type == proto.fields_by_name[
                    "value"].TYPE_FLOAT, f"{slot.name}.{field.name}"
            else:
                assert proto is pb.Tensor.DESCRIPTOR, f"{slot.name}.{field.name}"
    assert set(pb.DataType.keys()) - {"DATA_TYPE_UNSPECIFIED"} == {proto_dtype_name(d) for d in WIRE_DTYPES}
    assert [f.name for f in pb.Timings.DESCRIPTOR.fields] == [*STAGE_FIELDS, "batch_size"]


# --- queue, deadlines, backend failures: a slowed-down backend makes them deterministic -----------


@pytest.fixture
def slow_gw(repo):
    SlowBackend.infer_delay = 0.4
    try:
        with RunningGateway(repository=repo, models=("scenes",), backend="slow-onnxruntime", max_batch=1,
                            max_queue=1) as gw:
            yield gw
    finally:
        SlowBackend.infer_delay, SlowBackend.fail_infer = 0.0, False


def test_full_queue_is_resource_exhausted_at_once(slow_gw):
    request = pb.PredictRequest(model="scenes", encoded_image=BAD)
    running = slow_gw.stub.Predict.future(request, timeout=30)
    slow_gw.wait_for_queue("scenes", running=1, queued=0)
    queued = slow_gw.stub.Predict.future(request, timeout=30)
    slow_gw.wait_for_queue("scenes", running=1, queued=1)
    start = time.perf_counter()
    code, details = code_of(lambda: slow_gw.stub.Predict(request, timeout=30))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "retry with backoff" in details
    assert time.perf_counter() - start < 0.3  # refused without waiting for the running batch
    assert running.result().model == "scenes" and queued.result().model == "scenes"


def test_deadline_is_honoured_and_serving_goes_on(slow_gw):
    request = pb.PredictRequest(model="scenes", encoded_image=BAD)
    running = slow_gw.stub.Predict.future(request, timeout=30)
    slow_gw.wait_for_queue("scenes", running=1, queued=0)
    code, _ = code_of(lambda: slow_gw.stub.Predict(request, timeout=0.15))
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    running.result()
    assert slow_gw.stub.Predict(request, timeout=30).model == "scenes"


def test_backend_failure_is_internal_and_serving_goes_on(slow_gw):
    SlowBackend.fail_infer = True
    code, details = code_of(lambda: predict(slow_gw, model="scenes", encoded_image=BAD))
    assert code == grpc.StatusCode.INTERNAL and "injected backend failure" in details
    SlowBackend.fail_infer = False
    assert predict(slow_gw, model="scenes", encoded_image=BAD).model == "scenes"


class _Context:
    """The parts of grpc.aio.ServicerContext the servicer uses, for calls without a socket."""

    def __init__(self) -> None:
        self.status = None
        self.trailing = ()

    def time_remaining(self):
        return None

    def set_trailing_metadata(self, metadata):
        self.trailing = tuple(metadata)

    def trailing_metadata(self):
        return self.trailing

    async def abort(self, code, details, trailing_metadata=()):
        self.status = (code, details)
        raise grpc.aio.AbortError()


def test_servicer_in_process_without_a_socket(gw):
    servicer = PredictionServicer(gw.server.gateway)
    data = pb.PredictRequest(model="scenes", encoded_image=BAD, tasks=["depth"]).SerializeToString()
    response = gw.call(servicer.predict(data, _Context()))
    assert set(response.outputs) == {"depth"} and response.model_version == 1
    assert len(gw.call(servicer.list_models(b"", _Context())).models) == 2
    context = _Context()
    with pytest.raises(grpc.aio.AbortError):
        gw.call(servicer.get_model(pb.GetModelRequest(name="nope").SerializeToString(), context))
    assert context.status[0] == grpc.StatusCode.NOT_FOUND
    context = _Context()
    with pytest.raises(grpc.aio.AbortError):
        gw.call(servicer.predict(b"\xff\xff not a protobuf", context))
    assert context.status[0] == grpc.StatusCode.INVALID_ARGUMENT and "not a valid" in context.status[1]


# --- every method parses its own bytes; deadlines are capped; names are not echoed in full --------

GARBAGE = b"\xff\xff\xff\xff not a protobuf message"
RAW_METHODS = {
    "/parsimony.v1.PredictionService/Predict": "unary",
    "/parsimony.v1.PredictionService/ListModels": "unary",
    "/parsimony.v1.PredictionService/GetModel": "unary",
    "/grpc.health.v1.Health/Check": "unary",
    "/grpc.health.v1.Health/Watch": "stream",
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo": "bidi",
}


@pytest.mark.parametrize("method", list(RAW_METHODS))
def test_undecodable_bytes_are_invalid_argument_on_every_method_without_a_traceback(gw, method, caplog):
    kind = RAW_METHODS[method]
    with caplog.at_level("WARNING"):
        for _ in range(20):
            with pytest.raises(grpc.RpcError) as info:
                if kind == "unary":
                    gw.channel.unary_unary(method)(GARBAGE, timeout=10)
                elif kind == "stream":
                    list(gw.channel.unary_stream(method)(GARBAGE, timeout=10))
                else:
                    list(gw.channel.stream_stream(method)(iter([GARBAGE]), timeout=10))
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
            assert "is not a valid" in info.value.details()
    assert not [r for r in caplog.records if r.exc_info or r.levelname == "ERROR"]
    assert len([r for r in caplog.records if "refused" in r.getMessage()]) <= 1  # rate-limited: one line
    assert predict(gw, model="scenes", encoded_image=BAD).model == "scenes"


def test_a_missing_or_long_deadline_is_capped_and_the_metadata_says_so(repo):
    with RunningGateway(repository=repo, models=("scenes",), max_deadline_s=2.5) as gw:
        request = pb.PredictRequest(model="scenes", encoded_image=BAD)
        for timeout in (None, 1e6):
            _, call = gw.stub.Predict.with_call(request, timeout=timeout)
            assert dict(call.trailing_metadata())["x-deadline-capped-ms"] == "2500"
        _, call = gw.stub.Predict.with_call(request, timeout=2)
        assert "x-deadline-capped-ms" not in dict(call.trailing_metadata())


def test_unknown_names_are_echoed_cut_to_64_characters(gw):
    name = "n" * 5000
    for call in (lambda: predict(gw, model=name, encoded_image=BAD),
                 lambda: gw.stub.GetModel(pb.GetModelRequest(name=name))):
        code, details = code_of(call)
        assert code == grpc.StatusCode.NOT_FOUND and "n" * 65 not in details and "(5000 characters)" in details
    code, details = code_of(lambda: predict(gw, model="scenes", encoded_image=BAD, tasks=["t" * 5000]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "t" * 65 not in details


@pytest.mark.parametrize("value", [float("nan"), float("inf"), 1e30, -1.0])
def test_non_finite_or_out_of_range_float_tensors_are_refused(gw, value):
    x = np.full((3, *SIZE), 0.25, np.float32)
    x[0, 1, 2] = value
    tensor = pb.Tensor(dtype=pb.FLOAT32, shape=x.shape, data=x.tobytes())
    code, details = code_of(lambda: predict(gw, model="scenes", tensor=tensor))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "element [0, 1, 2]" in details


def test_palette_and_alpha_images_are_converted_to_rgb(gw):
    rgba = image_bytes(SIZE, mode="RGBA", seed=4)
    want = predict(gw, model="scenes", tensor=pb.Tensor(dtype=pb.UINT8, shape=[*SIZE, 3], data=decoded(rgba).tobytes()))
    got = predict(gw, model="scenes", encoded_image=rgba)
    np.testing.assert_array_equal(tensor_of(got.outputs["depth"].depth.depth), tensor_of(want.outputs["depth"].depth.depth))
