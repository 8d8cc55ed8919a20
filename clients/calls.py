"""Each operation described once, in both protocols' terms, without doing any I/O.

A `Call` says which gRPC method to invoke with which request message and how to read its answer,
and which HTTP request to send and how to read its answer. The four transports (gRPC and HTTP,
sync and async: `clients.transport`) only execute calls, and the retry loop (`clients.retry`) only
repeats them, so request building and answer parsing exist once whatever the protocol or the
concurrency model.

Images: a path (read as PNG/JPEG bytes), encoded bytes, a PIL image, or a numpy array sent as a
raw tensor, either ``uint8 [H, W, 3]`` (as decoders return images) or ``float32 [3, H, W]`` in
[0, 1]. Nothing is resized: the gateway refuses an image whose size differs from the model's
input (`ModelInfo.input_size`) with INVALID_ARGUMENT.
"""

from __future__ import annotations

import base64
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import numpy as np
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2
from PIL import Image

from clients.errors import ClientError
from clients.types import model_from_dict, model_from_proto, prediction_from_json, prediction_from_proto
from parsimony.wire import OUTPUT_DTYPES, proto_dtype_name, sniff_encoding, to_wire, wire_dtype_of
from serving.proto.parsimony.v1 import gateway_pb2 as pb

ImageInput = str | os.PathLike | bytes | np.ndarray | Image.Image
SERVICE = "/parsimony.v1.PredictionService/"
HEALTH = "/grpc.health.v1.Health/Check"


@dataclass(frozen=True)
class Call:
    """One operation: gRPC method, request and reader; HTTP request and reader."""

    name: str
    grpc_method: str
    grpc_request: Message
    grpc_response: type[Message]
    from_grpc: Callable[[Any], Any]
    http_method: str
    http_path: str
    from_http: Callable[[httpx.Response], Any] = lambda r: r.json()
    http_ok: tuple[int, ...] = (200,)  # statuses handed to from_http; any other is a ClientError
    http_args: dict = field(default_factory=dict)  # params, content, json, headers for httpx
    idempotent: bool = True  # repeating it is harmless (every call of this API: predictions are pure functions)


@dataclass(frozen=True)
class RawImage:
    """An image as it goes on the wire: encoded bytes, or a raw little-endian tensor."""

    encoded: bytes | None = None
    tensor: np.ndarray | None = None

    @property
    def mime(self) -> str:
        encoding = sniff_encoding(self.encoded)
        return f"image/{encoding}" if encoding else "application/octet-stream"


def raw_image(image: ImageInput) -> RawImage:
    """Accept a path, encoded bytes, a PIL image or a numpy array; refuse anything else with a hint."""
    if isinstance(image, str | os.PathLike):
        return RawImage(encoded=Path(image).read_bytes())
    if isinstance(image, bytes | bytearray | memoryview):
        return RawImage(encoded=bytes(image))
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    if isinstance(image, np.ndarray):
        hwc = image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
        chw = image.dtype == np.float32 and image.ndim == 3 and image.shape[0] == 3
        if not (hwc or chw):
            raise ValueError(f"an image array must be uint8 [H, W, 3] or float32 [3, H, W] in [0, 1]; "
                             f"got {image.dtype} {list(image.shape)}")
        return RawImage(tensor=np.ascontiguousarray(image, image.dtype.newbyteorder("<")))
    raise TypeError(f"an image is a path, PNG/JPEG bytes, a PIL image or a numpy array, not {type(image).__name__}")


def predict(model: str, image: ImageInput, tasks: Sequence[str] | None = None, output_dtype: str = "float32",
            probabilities: bool = False) -> Call:
    """``probabilities``: also return every task's optional probability map (segmentation softmax,
    edge probabilities, ...). The older segmentation-only flag is sent along with it, so a gateway
    that predates the general flag still returns segmentation probabilities."""
    if output_dtype not in OUTPUT_DTYPES:
        raise ValueError(f"output_dtype must be one of {list(OUTPUT_DTYPES)}, got {output_dtype!r}")
    if isinstance(tasks, str):
        tasks = [t for t in tasks.split(",") if t]
    tasks = list(tasks or ())
    raw = raw_image(image)
    request = pb.PredictRequest(model=model, tasks=tasks, output_dtype=_proto_dtype(output_dtype),
                                probabilities=probabilities, segmentation_probabilities=probabilities)
    flags = {"segmentation_probabilities": probabilities} | ({"probabilities": True} if probabilities else {})
    if raw.encoded is not None:
        request.encoded_image = raw.encoded
        options = {"output_dtype": output_dtype} | {k: str(v).lower() for k, v in flags.items()}
        http_args = {"content": raw.encoded, "headers": {"Content-Type": raw.mime},
                     "params": options | ({"tasks": ",".join(tasks)} if tasks else {})}
    else:
        t, data = raw.tensor, to_wire(raw.tensor)
        request.tensor.CopyFrom(pb.Tensor(dtype=_proto_dtype(wire_dtype_of(t)), shape=t.shape, data=data))
        wire = {"dtype": wire_dtype_of(t), "shape": list(t.shape), "data": base64.b64encode(data).decode()}
        http_args = {"json": {"tensor": wire, "tasks": tasks, "output_dtype": output_dtype} | flags}
    return Call("Predict", SERVICE + "Predict", request, pb.PredictResponse, prediction_from_proto,
                "POST", f"/v1/models/{quote(model, safe='')}:predict", lambda r: prediction_from_json(r.json()),
                http_args=http_args)


def _proto_dtype(dtype: str) -> int:
    return pb.DataType.Value(proto_dtype_name(dtype))


def list_models() -> Call:
    return Call("ListModels", SERVICE + "ListModels", pb.ListModelsRequest(), pb.ListModelsResponse,
                lambda r: [model_from_proto(m) for m in r.models], "GET", "/v1/models",
                lambda r: [model_from_dict(m) for m in r.json()["models"]])


def get_model(name: str) -> Call:
    return Call("GetModel", SERVICE + "GetModel", pb.GetModelRequest(name=name), pb.ModelInfo, model_from_proto,
                "GET", f"/v1/models/{quote(name, safe='')}", lambda r: model_from_dict(r.json()))


def ready(require: bool = False) -> Call:
    """Readiness (gRPC health service, HTTP ``/readyz``): True/False, or with ``require`` an UNAVAILABLE
    error while not ready, which the retry loop repeats until the server is ready or the deadline passes."""

    def answer(is_ready: bool, detail: str) -> bool:
        if require and not is_ready:
            raise ClientError("UNAVAILABLE", f"the server is not ready yet ({detail})")
        return is_ready

    serving = health_pb2.HealthCheckResponse.SERVING
    return Call("Ready", HEALTH, health_pb2.HealthCheckRequest(), health_pb2.HealthCheckResponse,
                lambda r: answer(r.status == serving, health_pb2.HealthCheckResponse.ServingStatus.Name(r.status)),
                "GET", "/readyz", lambda r: answer(r.status_code == 200, r.text), http_ok=(200, 503))
