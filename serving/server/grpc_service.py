"""gRPC front end: ``parsimony.v1.PredictionService`` (grpc.aio), plus the standard health service and
server reflection. The servicer is thin: proto -> `PredictCall`, `Gateway`, `Prediction` -> proto;
errors become status codes through `serving.server.errors.Code`.

Every method, the health and reflection services' included, takes its request as raw bytes and
parses it itself: bytes that are not the method's message get INVALID_ARGUMENT saying so (and one
rate-limited log line), where grpc's own deserializer would answer UNKNOWN and log a traceback per
call. A message over ``--max-message-bytes`` gets INVALID_ARGUMENT with a message saying so, like
over HTTP; gRPC's own receive limit is set higher (`transport_limit`) as a hard stop: beyond it grpc
refuses the message with RESOURCE_EXHAUSTED before the gateway sees it.

A call's deadline is capped at ``--max-deadline-s`` (a call without one gets it); when that happens
the trailing metadata ``x-deadline-capped-ms`` gives the time the server allowed. A call refused
because the server is draining carries ``grpc-retry-pushback-ms`` (gRPC's retry hint).
"""

from __future__ import annotations

import functools
import inspect
import logging

import grpc
from google.protobuf import json_format
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc

from parsimony.tasks import kind
from parsimony.wire import DEFAULT_OUTPUT_DTYPE, WIRE_DTYPES, proto_dtype_name, to_wire, wire_dtype_of
from serving.proto.parsimony.v1 import gateway_pb2 as pb
from serving.server import codec
from serving.server.config import ServerConfig
from serving.server.errors import GatewayError, InvalidInput, RateLimitedLog, ShuttingDown
from serving.server.service import Deadline, Gateway, PredictCall, Prediction, describe_model

SERVICE = pb.DESCRIPTOR.services_by_name["PredictionService"].full_name
HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
CAPPED_KEY = "x-deadline-capped-ms"
_DTYPE_NAMES = {pb.DataType.Value(proto_dtype_name(name)): name for name in WIRE_DTYPES}
log = logging.getLogger("serving.server")
_undecodable = RateLimitedLog(log)


def transport_limit(max_message_bytes: int) -> int:
    """gRPC's hard receive limit: room above the gateway's own limit so the gateway can refuse politely."""
    return max(2 * max_message_bytes, max_message_bytes + (4 << 20))


def parse(data: bytes, parser, method: str):
    """``parser(data)`` (a message's ``FromString``), or `InvalidInput` naming the method's message."""
    try:
        return parser(data)
    except Exception as exc:  # protobuf raises DecodeError, and RuntimeError or ValueError for some inputs
        message = getattr(parser, "__self__", None)
        name = message.DESCRIPTOR.full_name if message is not None else "request"
        _undecodable.warning(f"gRPC {method}: refused {len(data)} bytes that are not a {name} ({exc})")
        raise InvalidInput(f"the request is not a valid {name} ({exc}); send the message the "
                           f"{method} method takes, serialised by a protobuf library") from None


async def abort(context: grpc.aio.ServicerContext, error: GatewayError) -> None:
    metadata = tuple(context.trailing_metadata() or ())  # keeps x-deadline-capped-ms when it was set
    if isinstance(error, ShuttingDown):
        metadata += (("grpc-retry-pushback-ms", str(round(error.retry_after_s * 1e3))),)
    await context.abort(error.code.grpc, str(error), trailing_metadata=metadata)


def _rpc(method: str, request_type):
    """Parse the request bytes, count the call, map any failure to its status code and abort with the message."""

    def wrap(handler):
        @functools.wraps(handler)
        async def rpc(self: PredictionServicer, data: bytes, context: grpc.aio.ServicerContext):
            try:
                with self.gateway.track("grpc", method) as tracked:
                    self.gateway.check_message_size(len(data))
                    request = parse(data, request_type.FromString, method)
                    return await handler(self, request, context, tracked)
            except GatewayError as exc:
                await abort(context, exc)

        return rpc

    return wrap


class PredictionServicer:
    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway

    @_rpc("Predict", pb.PredictRequest)
    async def predict(self, request: pb.PredictRequest, context, tracked) -> pb.PredictResponse:
        tracked.model = request.model
        self.gateway.admit()
        deadline = self.gateway.deadline(context.time_remaining())
        if deadline.capped_ms is not None:
            context.set_trailing_metadata(((CAPPED_KEY, str(deadline.capped_ms)),))
        return prediction_to_proto(await self.gateway.predict(call_from_proto(request, deadline)))

    @_rpc("ListModels", pb.ListModelsRequest)
    async def list_models(self, request: pb.ListModelsRequest, context, tracked) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(models=[_model_info(m) for m in self.gateway.list_models()])

    @_rpc("GetModel", pb.GetModelRequest)
    async def get_model(self, request: pb.GetModelRequest, context, tracked) -> pb.ModelInfo:
        tracked.model = request.name
        return _model_info(self.gateway.get_model(request.name))

    def handlers(self) -> grpc.GenericRpcHandler:
        unary = grpc.unary_unary_rpc_method_handler
        return grpc.method_handlers_generic_handler(SERVICE, {
            "Predict": unary(self.predict, response_serializer=pb.PredictResponse.SerializeToString),
            "ListModels": unary(self.list_models, response_serializer=pb.ListModelsResponse.SerializeToString),
            "GetModel": unary(self.get_model, response_serializer=pb.ModelInfo.SerializeToString),
        })


def server_options(config: ServerConfig) -> list[tuple[str, int]]:
    """grpc core's channel arguments for the limits and timeouts of ``config``."""

    def ms(seconds: float) -> int:
        return max(1, round(seconds * 1e3))

    options = [
        ("grpc.max_receive_message_length", transport_limit(config.max_message_bytes)),
        ("grpc.max_send_message_length", -1),
        ("grpc.so_reuseport", 0),  # a second server on the same port must fail, not share it
        ("grpc.max_metadata_size", config.max_header_bytes),
        ("grpc.absolute_max_metadata_size", config.max_header_bytes),
        ("grpc.server_handshake_timeout_ms", ms(config.header_timeout_s)),
        ("grpc.max_connection_idle_ms", ms(config.idle_timeout_s)),
        ("grpc.keepalive_time_ms", ms(config.keepalive_time_s)),
        ("grpc.keepalive_timeout_ms", ms(config.keepalive_timeout_s)),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", ms(config.min_ping_interval_s)),
        ("grpc.http2.max_ping_strikes", 2),
        ("grpc.max_concurrent_streams", config.max_concurrent_streams),
        ("grpc.max_allowed_incoming_connections", config.max_connections),
    ]
    if config.max_connection_age_s > 0:
        options += [("grpc.max_connection_age_ms", ms(config.max_connection_age_s)),
                    ("grpc.max_connection_age_grace_ms", ms(config.max_connection_age_grace_s))]
    return options


def build_server(gateway: Gateway, health_servicer: health.aio.HealthServicer,
                 config: ServerConfig | None = None) -> grpc.aio.Server:
    """The gRPC server with the prediction, health and reflection services (no port added yet)."""
    if config is None:
        config = ServerConfig.model_construct(max_message_bytes=gateway.limits.max_message_bytes)
    server = grpc.aio.server(options=server_options(config))
    server.add_generic_rpc_handlers((PredictionServicer(gateway).handlers(),))
    reflected = [SERVICE, HEALTH_SERVICE, reflection.SERVICE_NAME]
    for name, handlers in (
        (HEALTH_SERVICE, _handlers_of(health_pb2_grpc.add_HealthServicer_to_server, health_servicer)),
        (reflection.SERVICE_NAME, _handlers_of(reflection_pb2_grpc.add_ServerReflectionServicer_to_server,
                                               reflection.aio.ReflectionServicer(reflected))),
    ):
        raw = {method: _parsing_itself(handler, f"{name.rsplit('.', 1)[-1]}.{method}")
               for method, handler in handlers.items()}
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(name, raw),))
    return server


# --- the standard services, parsing their own requests ------------------------------------------


class _Collect:
    """Stands in for a server to collect the method handlers that generated ``add_*_to_server`` registers."""

    def __init__(self) -> None:
        self.handlers: dict[str, grpc.RpcMethodHandler] = {}

    def add_generic_rpc_handlers(self, handlers) -> None:
        pass

    def add_registered_method_handlers(self, service: str, handlers: dict) -> None:
        self.handlers.update(handlers)


def _handlers_of(add_to_server, servicer) -> dict[str, grpc.RpcMethodHandler]:
    collect = _Collect()
    add_to_server(servicer, collect)
    return collect.handlers


def _parsing_itself(handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
    """``handler`` registered for raw request bytes: it parses them itself and answers INVALID_ARGUMENT
    for bytes that are not its message."""
    parser = handler.request_deserializer

    async def parsed(data: bytes, context):
        try:
            return parse(data, parser, method)
        except InvalidInput as exc:
            await abort(context, exc)

    serializer = handler.response_serializer
    if handler.unary_unary is not None:
        behaviour = handler.unary_unary

        async def unary_unary(data, context):
            return await behaviour(await parsed(data, context), context)

        return grpc.unary_unary_rpc_method_handler(unary_unary, response_serializer=serializer)
    if handler.unary_stream is not None:
        behaviour = handler.unary_stream

        async def unary_stream(data, context):
            answer = behaviour(await parsed(data, context), context)
            if inspect.isasyncgen(answer):
                async for response in answer:
                    yield response
            else:  # a coroutine that writes with context.write
                await answer

        return grpc.unary_stream_rpc_method_handler(unary_stream, response_serializer=serializer)
    if handler.stream_stream is not None:
        behaviour = handler.stream_stream

        async def stream_stream(requests, context):
            async def each():
                async for data in requests:
                    yield await parsed(data, context)

            async for response in behaviour(each(), context):
                yield response

        return grpc.stream_stream_rpc_method_handler(stream_stream, response_serializer=serializer)
    raise TypeError(f"{method}: client-streaming methods are not wrapped")  # the standard services have none


# --- conversions --------------------------------------------------------------------------------


def _dtype_name(value: int, what: str) -> str:
    if value not in _DTYPE_NAMES:
        raise InvalidInput(f"{what} has data type {value}, which is not one of {list(map(proto_dtype_name, WIRE_DTYPES))}")
    return _DTYPE_NAMES[value]


def call_from_proto(request: pb.PredictRequest, deadline: Deadline | None = None) -> PredictCall:
    which = request.WhichOneof("input")
    encoded = request.encoded_image if which == "encoded_image" else None
    tensor = None
    if which == "tensor":
        t = request.tensor
        tensor = codec.RawTensor(_dtype_name(t.dtype, "the input tensor"), tuple(t.shape), t.data)
    out = request.output_dtype
    return PredictCall(
        model=request.model, encoded=encoded, tensor=tensor, tasks=tuple(request.tasks),
        output_dtype=DEFAULT_OUTPUT_DTYPE if out == pb.DATA_TYPE_UNSPECIFIED else _dtype_name(out, "output_dtype"),
        probabilities=request.probabilities or request.segmentation_probabilities,  # the older spelling
        deadline=None if deadline is None else deadline.at,
    )


def _fill(message: pb.Tensor, array) -> None:
    message.dtype = pb.DataType.Value(proto_dtype_name(wire_dtype_of(array)))
    message.shape.extend(array.shape)
    message.data = to_wire(array)


def _task_to_proto(slot: pb.TaskOutput, result: codec.TaskResult) -> None:
    """The kind's message in the ``output`` oneof (named as the kind), one proto field per answer field."""
    message = getattr(slot, result.kind)
    message.SetInParent()  # selects the kind even when it has nothing to fill
    owner = kind(result.kind)
    for name, value in result.fields.items():
        if owner.field(name).what == "map":
            getattr(message, name).update(value)
        else:
            _fill(getattr(message, name), value)


def prediction_to_proto(p: Prediction) -> pb.PredictResponse:
    response = pb.PredictResponse(model=p.model, model_version=p.version)
    for name, result in p.outputs.items():
        _task_to_proto(response.outputs[name], result)
    timings = response.timings
    for field, ms in p.timings.milliseconds().items():
        setattr(timings, field, ms)
    timings.batch_size = p.timings.batch_size
    return response


def _model_info(model) -> pb.ModelInfo:
    return json_format.ParseDict(describe_model(model), pb.ModelInfo())
