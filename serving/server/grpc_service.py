"""gRPC front end: ``parsimony.v1.PredictionService`` (grpc.aio), plus the standard health service and
server reflection. The servicer is thin: proto -> `PredictCall`, `Gateway`, `Prediction` -> proto;
errors become status codes through `serving.server.errors.Code`.

``Predict`` takes the request as raw bytes and parses it itself, so that a message over
``--max-message-bytes`` gets INVALID_ARGUMENT with a message saying so, like over HTTP. gRPC's own
receive limit is set higher (`transport_limit`) as a hard stop: beyond it grpc refuses the message
with RESOURCE_EXHAUSTED before the gateway sees it.
"""

from __future__ import annotations

import functools
import time

import grpc
from google.protobuf import json_format
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from serving.proto.parsimony.v1 import gateway_pb2 as pb
from serving.server import codec
from serving.server.errors import GatewayError, InvalidInput
from serving.server.service import Gateway, PredictCall, Prediction, describe_model

SERVICE = pb.DESCRIPTOR.services_by_name["PredictionService"].full_name
_PB_DTYPES = {"float32": pb.FLOAT32, "float16": pb.FLOAT16, "uint8": pb.UINT8, "int32": pb.INT32}
_DTYPE_NAMES = {v: k for k, v in _PB_DTYPES.items()}


def transport_limit(max_message_bytes: int) -> int:
    """gRPC's hard receive limit: room above the gateway's own limit so the gateway can refuse politely."""
    return max(2 * max_message_bytes, max_message_bytes + (4 << 20))


def _rpc(method: str):
    """Count the call, map any failure to its status code, and abort the call with the message."""

    def wrap(handler):
        @functools.wraps(handler)
        async def rpc(self: PredictionServicer, request, context: grpc.aio.ServicerContext):
            try:
                with self.gateway.track("grpc", method) as tracked:
                    return await handler(self, request, context, tracked)
            except GatewayError as exc:
                await context.abort(exc.code.grpc, str(exc))

        return rpc

    return wrap


class PredictionServicer:
    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway

    @_rpc("Predict")
    async def predict(self, data: bytes, context, tracked) -> pb.PredictResponse:
        self.gateway.check_message_size(len(data))
        try:
            request = pb.PredictRequest.FromString(data)
        except DecodeError as exc:
            raise InvalidInput(f"the request is not a valid parsimony.v1.PredictRequest ({exc})") from exc
        tracked.model = request.model
        return prediction_to_proto(await self.gateway.predict(call_from_proto(request, context.time_remaining())))

    @_rpc("ListModels")
    async def list_models(self, request: pb.ListModelsRequest, context, tracked) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(models=[_model_info(m) for m in self.gateway.list_models()])

    @_rpc("GetModel")
    async def get_model(self, request: pb.GetModelRequest, context, tracked) -> pb.ModelInfo:
        tracked.model = request.name
        return _model_info(self.gateway.get_model(request.name))

    def handlers(self) -> grpc.GenericRpcHandler:
        unary = grpc.unary_unary_rpc_method_handler
        return grpc.method_handlers_generic_handler(SERVICE, {
            "Predict": unary(self.predict, request_deserializer=None,
                             response_serializer=pb.PredictResponse.SerializeToString),
            "ListModels": unary(self.list_models, request_deserializer=pb.ListModelsRequest.FromString,
                                response_serializer=pb.ListModelsResponse.SerializeToString),
            "GetModel": unary(self.get_model, request_deserializer=pb.GetModelRequest.FromString,
                              response_serializer=pb.ModelInfo.SerializeToString),
        })


def build_server(gateway: Gateway, health_servicer: health.aio.HealthServicer) -> grpc.aio.Server:
    limit = transport_limit(gateway.limits.max_message_bytes)
    server = grpc.aio.server(options=[
        ("grpc.max_receive_message_length", limit),
        ("grpc.max_send_message_length", -1),
        ("grpc.so_reuseport", 0),  # a second server on the same port must fail, not share it
    ])
    server.add_generic_rpc_handlers((PredictionServicer(gateway).handlers(),))
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        [SERVICE, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME], server)
    return server


# --- conversions --------------------------------------------------------------------------------


def _dtype_name(value: int, what: str) -> str:
    if value not in _DTYPE_NAMES:
        raise InvalidInput(f"{what} has data type {value}, which is not one of {list(_PB_DTYPES)}")
    return _DTYPE_NAMES[value]


def call_from_proto(request: pb.PredictRequest, time_remaining: float | None) -> PredictCall:
    which = request.WhichOneof("input")
    encoded = request.encoded_image if which == "encoded_image" else None
    tensor = None
    if which == "tensor":
        t = request.tensor
        tensor = codec.RawTensor(_dtype_name(t.dtype, "the input tensor"), tuple(t.shape), t.data)
    out = request.output_dtype
    return PredictCall(
        model=request.model, encoded=encoded, tensor=tensor, tasks=tuple(request.tasks),
        output_dtype="float32" if out == pb.DATA_TYPE_UNSPECIFIED else _dtype_name(out, "output_dtype"),
        probabilities=request.segmentation_probabilities,
        deadline=None if time_remaining is None else time.perf_counter() + time_remaining,
    )


def _fill(message: pb.Tensor, array) -> None:
    message.dtype = _PB_DTYPES[array.dtype.name]
    message.shape.extend(array.shape)
    message.data = array.tobytes()


def prediction_to_proto(p: Prediction) -> pb.PredictResponse:
    response = pb.PredictResponse(model=p.model, model_version=p.version)
    for name, out in p.outputs.items():
        slot = response.outputs[name]
        if isinstance(out, codec.SegmentationOutput):
            _fill(slot.segmentation.class_map, out.class_map)
            if out.probabilities is not None:
                _fill(slot.segmentation.probabilities, out.probabilities)
        elif isinstance(out, codec.DepthOutput):
            _fill(slot.depth.depth, out.depth)
        elif isinstance(out, codec.NormalOutput):
            _fill(slot.normal.normal, out.normal)
        else:
            slot.attributes.probabilities.update(out.probabilities)
    t, r = p.timings, response.timings
    r.decode_ms, r.preprocess_ms, r.queue_ms = t.decode * 1e3, t.preprocess * 1e3, t.queue * 1e3
    r.inference_ms, r.postprocess_ms, r.total_ms = t.inference * 1e3, t.postprocess * 1e3, t.total * 1e3
    r.batch_size = t.batch_size
    return response


def _model_info(model) -> pb.ModelInfo:
    return json_format.ParseDict(describe_model(model), pb.ModelInfo())
