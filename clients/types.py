"""What client calls return: plain dataclasses of numpy arrays, dicts and strings, never protobuf.

A `Prediction` holds one output per returned task in ``outputs``, typed by the task's kind
(``kinds[task]``):

| kind           | ``outputs[task]``                                  |
|----------------|----------------------------------------------------|
| segmentation   | ``[H, W]`` class indices (uint8; int32 beyond 256 classes) into `TaskInfo.class_names` |
| depth          | ``[H, W]`` metres, float32 (float16 when asked for) |
| normal         | ``[3, H, W]`` unit vectors, camera frame (x right, y down, z forward) |
| attributes     | ``{attribute name: probability}``                  |

plus ``probabilities[task]`` (``[C, H, W]`` softmax) for segmentation tasks when
``segmentation_probabilities=True``, and the server's ``timings`` (milliseconds per stage:
``decode_ms``, ``preprocess_ms``, ``queue_ms``, ``inference_ms``, ``postprocess_ms``, ``total_ms``)
with the ``batch_size`` the request rode in. The same types come back over gRPC and HTTP; the
converters from each protocol's answer live here so that sync and async clients share them.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field

import numpy as np
from google.protobuf import json_format

from serving.proto.parsimony.v1 import gateway_pb2 as pb

STAGES = ("decode_ms", "preprocess_ms", "queue_ms", "inference_ms", "postprocess_ms", "total_ms")
DTYPES = {"float32": np.dtype("<f4"), "float16": np.dtype("<f2"), "uint8": np.dtype("u1"), "int32": np.dtype("<i4")}
PB_DTYPES = {"float32": pb.FLOAT32, "float16": pb.FLOAT16, "uint8": pb.UINT8, "int32": pb.INT32}
_PB_NAMES = {v: k for k, v in PB_DTYPES.items()}
_TENSOR_FIELDS = {"segmentation": "class_map", "depth": "depth", "normal": "normal"}

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


@dataclass(frozen=True)
class TaskInfo:
    name: str
    kind: str  # segmentation | depth | normal | attributes
    channels: int
    class_names: tuple[str, ...] = ()
    attribute_names: tuple[str, ...] = ()
    unit: str = ""
    semantics: str = ""


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


# --- conversions ----------------------------------------------------------------------------------


def array(dtype: str, shape, data: bytes) -> np.ndarray:
    """A tensor from its wire form (little-endian C-order bytes); a read-only view of ``data``."""
    return np.frombuffer(data, DTYPES[dtype]).reshape(tuple(int(n) for n in shape))


def model_from_dict(d: dict) -> ModelInfo:
    """A `ModelInfo` from the gateway's JSON (HTTP) or from `MessageToDict` of the proto (gRPC)."""
    inp = d.get("input", {})
    tasks = tuple(TaskInfo(name=t["name"], kind=t["kind"], channels=int(t.get("channels", 0)),
                           class_names=tuple(t.get("class_names", ())),
                           attribute_names=tuple(t.get("attribute_names", ())),
                           unit=t.get("unit", ""), semantics=t.get("semantics", ""))
                  for t in d.get("tasks", ()))
    return ModelInfo(name=d["name"], version=int(d.get("version", 0)), ready=bool(d.get("ready", False)),
                     backend=d.get("backend", ""), height=int(inp.get("height", 0)), width=int(inp.get("width", 0)),
                     channels=int(inp.get("channels", 0)), encodings=tuple(inp.get("encodings", ())), tasks=tasks,
                     max_batch_size=int(d.get("max_batch_size", 0)), parameters=int(d.get("parameters", 0)),
                     macs=int(d.get("macs", 0)))


def model_from_proto(message: pb.ModelInfo) -> ModelInfo:
    return model_from_dict(json_format.MessageToDict(message, preserving_proto_field_name=True,
                                                     always_print_fields_with_no_presence=True))


def _assemble(model: str, version: int, tasks: dict[str, tuple[str, Output, np.ndarray | None]],
              timings: dict) -> Prediction:
    return Prediction(model=model, version=int(version), outputs={n: t[1] for n, t in tasks.items()},
                      kinds={n: t[0] for n, t in tasks.items()}, timings={s: float(timings[s]) for s in STAGES},
                      batch_size=int(timings["batch_size"]),
                      probabilities={n: t[2] for n, t in tasks.items() if t[2] is not None})


def prediction_from_proto(r: pb.PredictResponse) -> Prediction:
    def tensor(t: pb.Tensor) -> np.ndarray:
        return array(_PB_NAMES[t.dtype], t.shape, t.data)

    tasks = {}
    for name, slot in r.outputs.items():
        kind = slot.WhichOneof("output")
        message = getattr(slot, kind)
        if kind == "attributes":
            tasks[name] = (kind, dict(message.probabilities), None)
            continue
        probs = tensor(message.probabilities) if kind == "segmentation" and message.HasField("probabilities") else None
        tasks[name] = (kind, tensor(getattr(message, _TENSOR_FIELDS[kind])), probs)
    t = r.timings
    timings = {s: getattr(t, s) for s in STAGES} | {"batch_size": t.batch_size}
    return _assemble(r.model, r.model_version, tasks, timings)


def prediction_from_json(body: dict) -> Prediction:
    def tensor(t: dict) -> np.ndarray:
        return array(t["dtype"], t["shape"], base64.b64decode(t["data"]))

    tasks = {}
    for name, out in body["outputs"].items():
        kind = out["kind"]
        if kind == "attributes":
            tasks[name] = (kind, {k: float(v) for k, v in out["probabilities"].items()}, None)
            continue
        probs = out.get("probabilities") if kind == "segmentation" else None
        tasks[name] = (kind, tensor(out[_TENSOR_FIELDS[kind]]), None if probs is None else tensor(probs))
    return _assemble(body["model"], body["model_version"], tasks, body["timings"])
