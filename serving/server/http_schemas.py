"""Pydantic models of the HTTP API's JSON: they validate JSON requests (unknown keys are refused)
and document requests and responses in the OpenAPI schema. Responses are built as plain dicts of
the same shape on the hot path (see `serving.server.http_app`), not validated on the way out.

Tensors travel as ``{"dtype": "uint8", "shape": [H, W], "data": "<base64 of the raw little-endian
C-order bytes>"}``; in numpy: ``np.frombuffer(base64.b64decode(t["data"]), t["dtype"]).reshape(t["shape"])``.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, create_model, model_validator

from parsimony import tasks
from parsimony.wire import DEFAULT_OUTPUT_DTYPE, OUTPUT_DTYPES, STAGE_FIELDS, WIRE_DTYPES

DTypeName = Literal[tuple(WIRE_DTYPES)]
OutputDTypeName = Literal[OUTPUT_DTYPES]
PROBABILITIES = "also return the probability maps of every task whose kind has them"


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
        None, description="uint8 [H, W, 3] (HWC, 0..255) or float32 [3, H, W] (CHW, RGB in [0, 1]; "
                          "quantised to 8 bits, round(x * 255), for a model that takes uint8 pixels)")
    tasks: list[str] = Field(default_factory=list, description="tasks to return; empty returns every task")
    output_dtype: OutputDTypeName = DEFAULT_OUTPUT_DTYPE
    probabilities: bool = Field(False, description=PROBABILITIES)
    segmentation_probabilities: bool = Field(False, description="the older spelling of probabilities (either "
                                                                "set returns them)")

    @model_validator(mode="after")
    def _one_input(self) -> PredictJSON:
        if (self.image is None) == (self.tensor is None):
            raise ValueError("set exactly one of 'image' (base64 PNG/JPEG) and 'tensor'")
        return self


def _answer_field(field: tasks.Field) -> tuple[Any, Any]:
    value = dict[str, float] if field.what == "map" else TensorJSON
    if field.optional:
        return value | None, Field(None, description=f"{field.description}; null unless probabilities was set")
    return value, Field(description=field.description)


def _kind_model(owner: tasks.Kind) -> type[BaseModel]:
    """The JSON object of one kind's answer: ``kind`` and the kind's fields, as its proto message has them."""
    return create_model(f"{owner.name.title()}JSON", __doc__=f"The answer of a {owner.name} task",
                        kind=(Literal[owner.name], ...), **{f.name: _answer_field(f) for f in owner.fields})


TASK_OUTPUT_MODELS: dict[str, type[BaseModel]] = {name: _kind_model(tasks.kind(name)) for name in tasks.kind_names()}
TaskOutputJSON = Annotated[Union[tuple(TASK_OUTPUT_MODELS.values())], Field(discriminator="kind")]  # noqa: UP007
_STAGE_NOTES = {"inference_ms": "the forward pass of the whole batch"}
TimingsJSON = create_model("TimingsJSON", **{f: (float, Field(description=_STAGE_NOTES.get(f))) for f in STAGE_FIELDS},
                           batch_size=(int, ...))


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
