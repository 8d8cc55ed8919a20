"""What a task kind is, seen from outside training: the one object per kind that the export
manifest, the gateway (gRPC and HTTP), the codec and the clients dispatch through.

A `Kind` says
- what its graph output is (`output_spec`) and what that output means (`semantics`, `unit`),
- how one image's raw output becomes the answer the gateway returns (`postprocess`): a dict of
  *fields*, each an array or a ``{name: value}`` map; the fields are those of the kind's proto
  message and of its JSON object (`fields`), so both protocols encode and decode every kind the
  same generic way,
- which field a client shows as the task's result (`primary`) and which ones are optional
  probability maps sent only on request,
- what a client draws of the result (`picture`).

Adding a kind is one module in this package (found by `parsimony.tasks` on import), one on the
training side (loss, metrics, baseline, head, target augmentation), the proto message, and a data
set that renders its target.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import numpy as np

from parsimony.spec import DYNAMIC, TensorSpec

FieldValue = np.ndarray | dict[str, float]


@dataclass(frozen=True)
class Field:
    """One field of a kind's answer: a tensor or a ``{name: float}`` map; ``optional`` fields are
    probability maps computed only when the caller asks for probabilities. ``dtype`` is the
    element type: ``"float"`` for float32 or float16 as the caller asks (maps: always float32),
    ``"class"`` for class indices (uint8 up to 256 classes, else int32), else a fixed wire dtype."""

    name: str
    what: Literal["tensor", "map"]
    description: str
    optional: bool = False
    dtype: str = "float"


@dataclass(frozen=True)
class GraphOutput:
    """One output tensor of a graph that computes final answers (see `graph_output_name`): the
    ``field`` of ``task``'s answer in ``dtype``, ``shape`` with the dynamic batch dimension first;
    ``field`` is `RAW` for the head's raw output (logits), an opt-in output."""

    task: str
    field: str
    dtype: str
    shape: tuple[int, ...]
    name: str


RAW = "raw"  # the pseudo-field of a task's raw head output in a final graph


def graph_output_name(task: str, field: str, dtype: str, primary: str) -> str:
    """The tensor name of one answer field in a final graph: the task's name for its primary
    field, ``TASK_FIELD`` for the others, ``TASK_raw`` for the raw head output, and a ``_fp16``
    suffix for float16 copies of float fields. E.g. ``segmentation`` (class map),
    ``segmentation_probabilities``, ``segmentation_probabilities_fp16``, ``depth_fp16``."""
    name = task if field == primary else f"{task}_{field}"
    return f"{name}_fp16" if dtype == "float16" else name


@dataclass(frozen=True)
class Picture:
    """What a client shows of one task's result: ``style`` picks the renderer (``classes``: a
    palette colour per class with a legend of ``labels``; ``scalar``: a colour map with a bar in
    ``unit``; ``vector``: RGB = (v + 1) / 2; ``scores``: written as JSON), ``summary`` is one line
    for a terminal, ``text`` goes into the PNG's text chunks."""

    style: Literal["classes", "scalar", "vector", "scores"]
    data: Any
    summary: str
    labels: tuple[str, ...] = ()
    unit: str = ""
    text: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TaskInfo:
    """One task of an exported model as readers of its manifest and clients of the API see it."""

    name: str
    kind: str
    channels: int
    labels: tuple[str, ...] = ()
    output: str = ""  # the graph output holding it; the task's name when empty
    unit: str = ""
    semantics: str = ""

    @property
    def owner(self) -> Kind:
        from parsimony.tasks import kind

        return kind(self.kind)

    @property
    def output_name(self) -> str:
        return self.output or self.name

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.labels if self.owner.labels_key == "class_names" else ()

    @property
    def attribute_names(self) -> tuple[str, ...]:
        return self.labels if self.owner.labels_key == "attribute_names" else ()

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TaskInfo:
        """From a manifest's task section or the API's task object (``class_names`` /
        ``attribute_names`` as the kind names its labels)."""
        from parsimony.tasks import kind

        owner = kind(str(d.get("kind")), task=str(d.get("name")))
        labels = d.get(owner.labels_key, ()) if owner.labels_key else ()
        return cls(name=d["name"], kind=owner.name, channels=int(d.get("channels", 0)), labels=tuple(labels),
                   output=d.get("output", ""), unit=d.get("unit", ""), semantics=d.get("semantics", ""))


class Kind(abc.ABC):
    """One task kind; subclasses set the class attributes and implement `postprocess` and `picture`."""

    name: ClassVar[str]
    dense: ClassVar[bool]  # a per-pixel output [N, C, H, W] (else one vector per image [N, C])
    fixed_channels: ClassVar[int | None] = None  # channels every task of this kind has (None: per task)
    labels_key: ClassVar[str] = ""  # manifest/API key of the channel names ("class_names", ...), "" for none
    unit: ClassVar[str] = ""
    target: ClassVar[str]  # the target a data set sample carries, for docs and error messages
    semantics: ClassVar[str]  # what the graph output holds
    fields: ClassVar[tuple[Field, ...]]
    primary: ClassVar[str]  # the field shown as the task's result

    # --- the exported graph --------------------------------------------------------------------

    def output_spec(self, name: str, channels: int, image_size: tuple[int, int]) -> TensorSpec:
        """The graph output of a task of this kind: float32, ``[-1, C, H, W]`` dense, else ``[-1, C]``."""
        h, w = image_size
        shape = (DYNAMIC, channels, h, w) if self.dense else (DYNAMIC, channels)
        return TensorSpec(name, "float32", shape)

    def check_channels(self, name: str, channels: int, labels: Sequence[str]) -> None:
        if self.fixed_channels is not None and channels != self.fixed_channels:
            raise ValueError(f"task {name!r}: a {self.name} task has {self.fixed_channels} channel(s), got {channels}")
        if labels and not self.labels_key:
            raise ValueError(f"task {name!r}: a {self.name} task has no channel names, got {list(labels)[:3]}...")

    def manifest_section(self, task: TaskInfo) -> dict[str, Any]:
        """The task's section of ``manifest.json``: kind, output, channels, labels, semantics."""
        section: dict[str, Any] = {"name": task.name, "kind": self.name, "output": task.output_name,
                                   "channels": task.channels}
        if self.labels_key:
            section[self.labels_key] = list(task.labels)
        if self.unit:
            section["unit"] = self.unit
        section["semantics"] = self.semantics
        return section

    # --- the gateway's answer ------------------------------------------------------------------

    @abc.abstractmethod
    def postprocess(self, task: TaskInfo, raw: np.ndarray, dtype: np.dtype,
                    probabilities: bool) -> dict[str, FieldValue]:
        """One image's raw output (no batch dimension) -> the answer's fields; float maps in
        ``dtype``, optional fields only when ``probabilities``."""

    @property
    def field_names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.fields)

    def field(self, name: str) -> Field:
        for f in self.fields:
            if f.name == name:
                return f
        raise KeyError(f"a {self.name} answer has no field {name!r}; it has {list(self.field_names)}")

    @property
    def optional_fields(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.fields if f.optional)

    # --- final outputs computed in the graph ----------------------------------------------------

    def field_shape(self, task: TaskInfo, field: str, image_size: tuple[int, int]) -> tuple[int, ...]:
        """The per-image shape of ``field`` (tensor fields; maps are ``[channels]`` vectors in the graph)."""
        raise NotImplementedError(f"kind {self.name!r} does not say the shape of its field {field!r}")

    def field_dtypes(self, task: TaskInfo, field: str) -> tuple[str, ...]:
        """The dtypes a final graph offers ``field`` in: float32 and float16 for float tensors,
        float32 for maps, the class dtype for class maps, else the field's fixed dtype."""
        f = self.field(field)
        if f.dtype == "class":
            return (class_dtype_name(task.channels),)
        if f.dtype == "float":
            return ("float32", "float16") if f.what == "tensor" else ("float32",)
        return (f.dtype,)

    def graph_outputs(self, task: TaskInfo, image_size: tuple[int, int], raw: bool = True) -> tuple[GraphOutput, ...]:
        """Every output a final graph has for ``task``: each field in each of its dtypes, and (when
        ``raw``) the head's raw output as ``TASK_raw``."""
        out = []
        for f in self.fields:
            shape = (DYNAMIC, *self.field_shape(task, f.name, image_size))
            for dtype in self.field_dtypes(task, f.name):
                out.append(GraphOutput(task.name, f.name, dtype, shape,
                                       graph_output_name(task.name, f.name, dtype, self.primary)))
        if raw:
            spec = self.output_spec(f"{task.name}_{RAW}", task.channels, image_size)
            out.append(GraphOutput(task.name, RAW, spec.dtype, spec.shape, spec.name))
        return tuple(out)

    # --- what a client shows -------------------------------------------------------------------

    @abc.abstractmethod
    def picture(self, task: TaskInfo, value: FieldValue) -> Picture:
        """What a client draws (or writes) of the primary field ``value``."""


def class_dtype_name(classes: int) -> str:
    """The class map's dtype: uint8 up to 256 classes, else int32."""
    return "uint8" if classes <= 256 else "int32"


def sigmoid(x: np.ndarray, dtype=np.float32) -> np.ndarray:
    """The logistic function, computed without overflow warnings for large ``|x|``."""
    x = np.asarray(x, dtype=np.float64 if dtype == np.float64 else np.float32)
    out = np.empty_like(x)
    positive = x >= 0
    out[positive] = 1.0 / (1.0 + np.exp(-x[positive]))
    e = np.exp(x[~positive])
    out[~positive] = e / (1.0 + e)
    return out.astype(dtype, copy=False)


def class_shares(class_map: np.ndarray, labels: Sequence[str], top: int = 3) -> str:
    """``"floor 41%, wall 30%, bed 12%"``: the classes covering most pixels."""
    counts = np.bincount(class_map.ravel().astype(np.int64), minlength=len(labels)) / max(class_map.size, 1)
    return ", ".join(f"{labels[c] if c < len(labels) else c} {100 * counts[c]:.0f}%"
                     for c in np.argsort(-counts)[:top] if counts[c] > 0)
