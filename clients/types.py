"""What client calls return: plain dataclasses of numpy arrays, dicts and strings, never protobuf.

A `Prediction` holds one output per returned task in ``outputs``: the primary field of the task's
kind (``kinds[task]``; `parsimony.tasks` describes every kind), e.g. a segmentation task's
``[H, W]`` class indices into `TaskInfo.class_names`, a depth task's ``[H, W]`` metres, an
attributes task's ``{attribute name: probability}``. ``probabilities[task]`` holds the kind's
optional probability map when it was asked for (``probabilities=True``), ``fields[task]`` every
field the server sent for the task, and ``timings`` the server's milliseconds per stage
(``decode_ms`` ... ``total_ms``, `parsimony.wire.STAGE_FIELDS`) with the ``batch_size`` the
request rode in. The same types come back over gRPC and HTTP.

Both protocols carry a task's answer as the fields of its kind (the proto's ``TaskOutput`` message
of that kind; the JSON object with ``"kind"``), each a tensor or a ``{name: float}`` map, so one
generic decoder here reads every kind, including ones added after this module was written.
"""

from __future__ import annotations

import base64
import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from google.protobuf import json_format

from clients.errors import ClientError
from parsimony.tasks import Kind, TaskInfo, UnknownKind, kind
from parsimony.wire import STAGE_FIELDS, from_wire
from serving.proto.parsimony.v1 import gateway_pb2 as pb

__all__ = ["ModelInfo", "Output", "Prediction", "TaskInfo", "model_from_dict", "model_from_proto",
           "prediction_from_json", "prediction_from_proto"]

Output = np.ndarray | dict[str, float]


@dataclass(frozen=True)
class Prediction:
    model: str
    version: int
    outputs: dict[str, Output]
    kinds: dict[str, str]
    timings: dict[str, float]
    batch_size: int
    probabilities: dict[str, np.ndarray] = field(default_factory=dict)
    fields: dict[str, dict[str, Output]] = field(default_factory=dict)


@dataclass(frozen=True)
class ModelInfo:
    name: str
    version: int
    ready: bool
    backend: str
    height: int
    width: int
    channels: int
    encodings: tuple[str, ...]
    tasks: tuple[TaskInfo, ...]
    max_batch_size: int
    parameters: int
    macs: int

    @property
    def input_size(self) -> tuple[int, int]:
        """(height, width): every image sent to this model must have exactly this size."""
        return self.height, self.width

    def task(self, name: str) -> TaskInfo:
        for task in self.tasks:
            if task.name == name:
                return task
        raise KeyError(f"model {self.name!r} has no task {name!r}; its tasks: {[t.name for t in self.tasks]}")


# --- model descriptions ---------------------------------------------------------------------------


def task_from_dict(d: Mapping[str, Any]) -> TaskInfo:
    """A task of the API's model description; one of a kind this version does not know is kept
    (name, kind, channels, whichever labels it has), so listing a newer server's models works."""
    try:
        return TaskInfo.from_dict(d)
    except UnknownKind:
        labels = d.get("class_names") or d.get("attribute_names") or ()
        return TaskInfo(name=d["name"], kind=str(d.get("kind")), channels=int(d.get("channels", 0)),
                        labels=tuple(labels), unit=d.get("unit", ""), semantics=d.get("semantics", ""))


def model_from_dict(d: dict) -> ModelInfo:
    """A `ModelInfo` from the gateway's JSON (HTTP) or from `MessageToDict` of the proto (gRPC)."""
    inp = d.get("input", {})
    return ModelInfo(name=d["name"], version=int(d.get("version", 0)), ready=bool(d.get("ready", False)),
                     backend=d.get("backend", ""), height=int(inp.get("height", 0)), width=int(inp.get("width", 0)),
                     channels=int(inp.get("channels", 0)), encodings=tuple(inp.get("encodings", ())),
                     tasks=tuple(task_from_dict(t) for t in d.get("tasks", ())),
                     max_batch_size=int(d.get("max_batch_size", 0)), parameters=int(d.get("parameters", 0)),
                     macs=int(d.get("macs", 0)))


def model_from_proto(message: pb.ModelInfo) -> ModelInfo:
    return model_from_dict(json_format.MessageToDict(message, preserving_proto_field_name=True,
                                                     always_print_fields_with_no_presence=True))


# --- predictions ----------------------------------------------------------------------------------


def _owner(task: str, name: str | None) -> Kind:
    try:
        return kind(str(name), task=task)
    except UnknownKind:
        raise ClientError("UNIMPLEMENTED", f"the server answered task {task!r} with a kind this client does not "
                          f"know ({name or 'not in its proto'}); upgrade the client, or leave the task out "
                          f"with tasks=[...]") from None


def _fields(task: str, owner: Kind, read: Callable[[str, str], Output | None]) -> dict[str, Output]:
    """Every field of the kind that the answer holds (``read(name, what)``: its value or None)."""
    values = {f.name: value for f in owner.fields if (value := read(f.name, f.what)) is not None}
    if owner.primary not in values:
        raise ClientError("INTERNAL", f"the server's answer for task {task!r} ({owner.name}) lacks its "
                          f"{owner.primary!r} field; the server does not speak this client's API version")
    return values


def _assemble(model: str, version: int, answers: dict[str, tuple[Kind, dict[str, Output]]],
              timings: Mapping[str, Any]) -> Prediction:
    """The prediction of every task's fields: the primary one as its output, an optional (probability)
    tensor, when sent, as its probabilities."""
    probs = {task: next((values[f] for f in owner.optional_fields if isinstance(values.get(f), np.ndarray)), None)
             for task, (owner, values) in answers.items()}
    return Prediction(model=model, version=int(version),
                      outputs={task: values[owner.primary] for task, (owner, values) in answers.items()},
                      kinds={task: owner.name for task, (owner, _) in answers.items()},
                      timings={s: float(timings[s]) for s in STAGE_FIELDS}, batch_size=int(timings["batch_size"]),
                      probabilities={task: p for task, p in probs.items() if p is not None},
                      fields={task: values for task, (_, values) in answers.items()})


def _proto_field(message, name: str, what: str) -> Output | None:
    if what == "map":
        return {k: float(v) for k, v in getattr(message, name).items()}
    if not message.HasField(name):
        return None
    t = getattr(message, name)
    return from_wire(pb.DataType.Name(t.dtype).lower(), t.shape, t.data)  # FLOAT32 -> "float32"


def _json_field(out: dict, name: str, what: str) -> Output | None:
    value = out.get(name)
    if value is None:
        return None
    if what == "map":
        return {k: float(v) for k, v in value.items()}
    return from_wire(value["dtype"], value["shape"], base64.b64decode(value["data"]))


def prediction_from_proto(r: pb.PredictResponse) -> Prediction:
    answers = {}
    for task, slot in r.outputs.items():
        owner = _owner(task, slot.WhichOneof("output"))
        answers[task] = (owner, _fields(task, owner, functools.partial(_proto_field, getattr(slot, owner.name))))
    timings = {s: getattr(r.timings, s) for s in STAGE_FIELDS} | {"batch_size": r.timings.batch_size}
    return _assemble(r.model, r.model_version, answers, timings)


def prediction_from_json(body: dict) -> Prediction:
    answers = {}
    for task, out in body["outputs"].items():
        owner = _owner(task, out.get("kind"))
        answers[task] = (owner, _fields(task, owner, functools.partial(_json_field, out)))
    return _assemble(body["model"], body["model_version"], answers, body["timings"])
