"""The task kinds, one module each in this package, and the task spec every side shares.

`kind(name)` returns the `Kind` object of a kind name; `KINDS` maps every known name to it. Kinds
register themselves by subclassing `Kind` in a module of this package: every module here is
imported on first use, so a new kind is one new file.

| kind           | target in a sample                          | graph output (float32)  | the gateway returns                      |
|----------------|---------------------------------------------|-------------------------|------------------------------------------|
| `segmentation` | int64 ``[H, W]`` class index, -1 = ignore    | logits ``[N, C, H, W]`` | class map ``[H, W]`` (+ softmax ``[C, H, W]``) |
| `depth`        | float32 ``[1, H, W]`` metres, 0 = invalid    | metres ``[N, 1, H, W]`` | ``[H, W]`` metres clamped at 0           |
| `normal`       | float32 ``[3, H, W]`` unit, all-0 = invalid  | unit ``[N, 3, H, W]``   | ``[3, H, W]`` unit vectors               |
| `attributes`   | float32 ``[A]`` in {0, 1}                    | logits ``[N, A]``       | ``{attribute: probability}``             |
| `edges`        | float32 ``[1, H, W]`` in {0, 1}, -1 = ignore | logits ``[N, 1, H, W]`` | edge map ``[H, W]`` 0/255 (+ probabilities) |
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from parsimony.spec import ModelIOSpec, TensorSpec, image_input_spec, image_spec, validate_name
from parsimony.tasks.base import (
    RAW,
    Field,
    FieldValue,
    GraphOutput,
    Kind,
    Picture,
    TaskInfo,
    graph_output_name,
)

__all__ = ["KINDS", "RAW", "GraphOutput", "final_io_spec", "graph_output_name", "Field", "FieldValue", "Kind", "Picture", "TaskInfo", "TaskSpec", "UnknownKind", "discover", "kind",
           "kind_names", "model_io_spec", "select_tasks"]

KINDS: dict[str, Kind] = {}


class UnknownKind(ValueError):
    """A task kind nobody registered (a manifest or config from a newer version, or a typo)."""


def _discover() -> dict[str, Kind]:
    if not KINDS:
        found = {name: cls() for name, cls in discover(__name__, __path__, Kind).items()}
        KINDS.update(sorted(found.items(), key=lambda kv: (_ORDER.get(kv[0], len(_ORDER)), kv[0])))
    return KINDS


_ORDER = {"segmentation": 0, "depth": 1, "normal": 2, "attributes": 3}  # the order docs list them in


def discover(package: str, path: Iterable[str], base: type) -> dict[str, type]:
    """Import every module of ``package`` (found on ``path``) but ``base``, and return the concrete
    subclasses of ``base`` that set ``name``, by name; a name defined twice is refused. The
    training side finds its kind objects the same way."""
    for module in pkgutil.iter_modules(path):
        if module.name != "base":
            importlib.import_module(f"{package}.{module.name}")
    found: dict[str, type] = {}
    for cls in _subclasses(base):
        if not getattr(cls, "__abstractmethods__", None) and "name" in cls.__dict__:
            if cls.name in found:
                raise RuntimeError(f"kind {cls.name!r} is defined twice ({found[cls.name]} and {cls})")
            found[cls.name] = cls
    return found


def _subclasses(cls: type) -> list[type]:
    out = []
    for sub in cls.__subclasses__():
        out += [sub, *_subclasses(sub)]
    return out


def kind_names() -> tuple[str, ...]:
    return tuple(_discover())


def kind(name: str, *, task: str | None = None) -> Kind:
    """The `Kind` called ``name``; `UnknownKind` (naming the task, when given) otherwise."""
    kinds = _discover()
    if name not in kinds:
        which = f"task {task!r} has kind {name!r}" if task else f"unknown task kind {name!r}"
        raise UnknownKind(f"{which}, which this version of parsimony does not know (it knows {list(kinds)}); "
                          f"use one of those, or upgrade parsimony")
    return kinds[name]


@dataclass(frozen=True)
class TaskSpec:
    """One task of a data set or model: its name, kind, output channels and the names of those
    channels (class names, attribute names; empty for kinds without them)."""

    name: str
    kind: str
    channels: int
    labels: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        owner = kind(self.kind, task=self.name)
        if self.labels and len(self.labels) != self.channels:
            raise ValueError(f"task {self.name!r}: {len(self.labels)} labels for {self.channels} channels")
        owner.check_channels(self.name, self.channels, self.labels)

    @property
    def owner(self) -> Kind:
        return kind(self.kind)

    @property
    def dense(self) -> bool:
        return self.owner.dense

    def info(self) -> TaskInfo:
        return TaskInfo(name=self.name, kind=self.kind, channels=self.channels, labels=self.labels,
                        unit=self.owner.unit, semantics=self.owner.semantics)

    def to_dict(self) -> dict:
        return {"name": self.name, "kind": self.kind, "channels": self.channels, "labels": list(self.labels)}

    @classmethod
    def from_dict(cls, d: dict) -> TaskSpec:
        return cls(name=d["name"], kind=d["kind"], channels=int(d["channels"]), labels=tuple(d.get("labels", ())))


def select_tasks(available: Sequence[TaskSpec], names: Sequence[str] | None) -> tuple[TaskSpec, ...]:
    """The tasks named in ``names`` (all of ``available`` when None or empty), in the order given."""
    if not names:
        return tuple(available)
    by_name = {t.name: t for t in available}
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; this data set has {sorted(by_name)}")
    if len(set(names)) != len(names):
        raise ValueError(f"task list {list(names)} names a task twice")
    return tuple(by_name[n] for n in names)


def model_io_spec(tasks: Sequence[TaskSpec], image_size: tuple[int, int], channels: int = 3) -> ModelIOSpec:
    """The tensor spec of a model with ``tasks`` exported at ``image_size`` (H, W): the ``image``
    input and one output per task, named by the task, as its kind says."""
    image = image_spec(channels, image_size)
    size = image.shape[2:]
    outputs = []
    for task in tasks:
        validate_name(task.name, f"task ({task.kind})")
        outputs.append(kind(task.kind, task=task.name).output_spec(task.name, task.channels, size))
    return ModelIOSpec(inputs=(image,), outputs=tuple(outputs))


def final_io_spec(tasks: Sequence[TaskSpec], image_size: tuple[int, int], channels: int = 3, *,
                  input_dtype: str = "uint8", raw: bool = True) -> tuple[ModelIOSpec, tuple[GraphOutput, ...]]:
    """The tensor spec of a graph that computes final answers (pre- and post-processing inside),
    and what each of its outputs is: the ``image`` input as `image_input_spec` says, then for each
    task every field of its answer in every dtype it is offered in (`Kind.graph_outputs`), plus
    the raw head output ``TASK_raw`` when ``raw``."""
    image = image_input_spec(channels, image_size, input_dtype)
    size = (image.shape[1], image.shape[2]) if input_dtype == "uint8" else (image.shape[2], image.shape[3])
    outputs: list[GraphOutput] = []
    for task in tasks:
        validate_name(task.name, f"task ({task.kind})")
        info = task.info() if isinstance(task, TaskSpec) else task
        outputs += kind(task.kind, task=task.name).graph_outputs(info, size, raw=raw)
    spec = ModelIOSpec(inputs=(image,), outputs=tuple(TensorSpec(o.name, o.dtype, o.shape) for o in outputs))
    return spec, tuple(outputs)
