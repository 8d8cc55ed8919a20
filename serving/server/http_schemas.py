"""Pydantic models of the HTTP API's JSON: they validate JSON requests (unknown keys are refused)
and document requests and responses in the OpenAPI schema. Responses are built as plain dicts of
the same shape on the hot path (see `serving.server.http_app`), not validated on the way out.

Tensors travel as ``{"dtype": "uint8", "shape": [H, W], "data": "<base64 of the raw little-endian
C-order bytes>"}``; in numpy: ``np.frombuffer(base64.b64decode(t["data"]), t["dtype"]).reshape(t["shape"])``.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

DTypeName = Literal["float32", "float16", "uint8", "int32"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TensorJSON(_Strict):
    dtype: DTypeName
    shape: list[int]
    data: str = Field(description="base64 of the raw little-endian bytes in C (row-major) order")


class PredictJSON(_Strict):
    """A JSON prediction request: exactly one of ``image`` and ``tensor``."""

    image: str | None = Field(None, description="base64 of PNG or JPEG bytes (RGB, the model's input size)")
    tensor: TensorJSON | None = Field(
        None, description="uint8 [H, W, 3] (HWC, 0..255) or float32 [3, H, W] (CHW, RGB in [0, 1])")
    tasks: list[str] = Field(default_factory=list, description="tasks to return; empty returns every task")
    output_dtype: Literal["float32", "float16"] = "float32"
    segmentation_probabilities: bool = False

    @model_validator(mode="after")
    def _one_input(self) -> PredictJSON:
        if (self.image is None) == (self.tensor is None):
            raise ValueError("set exactly one of 'image' (base64 PNG/JPEG) and 'tensor'")
        return self


class SegmentationJSON(BaseModel):
    kind: Literal["segmentation"]
    class_map: TensorJSON = Field(description="[H, W] class indices (uint8; int32 beyond 256 classes)")
    probabilities: TensorJSON | None = Field(None, description="[C, H, W] softmax, when requested")


class DepthJSON(BaseModel):
    kind: Literal["depth"]
    depth: TensorJSON = Field(description="[H, W] metres, clamped at 0")


class NormalJSON(BaseModel):
    kind: Literal["normal"]
    normal: TensorJSON = Field(description="[3, H, W] unit vectors (x right, y down, z forward)")


class AttributesJSON(BaseModel):
    kind: Literal["attributes"]
    probabilities: dict[str, float] = Field(description="attribute name -> probability")


TaskOutputJSON = Annotated[SegmentationJSON | DepthJSON | NormalJSON | AttributesJSON, Field(discriminator="kind")]


class TimingsJSON(BaseModel):
    decode_ms: float
    preprocess_ms: float
    queue_ms: float
    inference_ms: float = Field(description="the forward pass of the whole batch")
    postprocess_ms: float
    total_ms: float
    batch_size: int


class PredictResponseJSON(BaseModel):
    model: str
    model_version: int
    outputs: dict[str, TaskOutputJSON]
    timings: TimingsJSON


class InputInfoJSON(BaseModel):
    height: int
    width: int
    channels: int
    color: str
    encodings: list[str]


class TaskInfoJSON(BaseModel):
    name: str
    kind: str
    channels: int
    class_names: list[str]
    attribute_names: list[str]
    unit: str
    semantics: str


class ModelInfoJSON(BaseModel):
    name: str
    version: int
    ready: bool
    backend: str
    input: InputInfoJSON
    tasks: list[TaskInfoJSON]
    max_batch_size: int
    parameters: int
    macs: int


class ListModelsJSON(BaseModel):
    models: list[ModelInfoJSON]


class ErrorBody(BaseModel):
    code: str = Field(description="the status name, as in gRPC (INVALID_ARGUMENT, NOT_FOUND, ...)")
    message: str


class ErrorJSON(BaseModel):
    error: ErrorBody
