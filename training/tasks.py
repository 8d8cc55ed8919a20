"""Task vocabulary shared by data sets, models, losses, metrics and export.

A task is identified by its name (the key in a sample dict and in a model's output dict) and has a
kind, which fixes its target layout, loss, metrics and output semantics:

| kind           | target in a sample                         | model output            |
|----------------|--------------------------------------------|-------------------------|
| `segmentation` | int64 ``[H, W]`` class index, -1 = ignore   | logits ``[N, C, H, W]`` |
| `depth`        | float32 ``[1, H, W]`` metres, 0 = invalid   | ``[N, 1, H, W]`` metres |
| `normal`       | float32 ``[3, H, W]`` unit, all-0 = invalid | unit ``[N, 3, H, W]``   |
| `attributes`   | float32 ``[A]`` in {0, 1}                   | logits ``[N, A]``       |

Every sample also carries ``"image"``: float32 ``[3, H, W]`` with values in [0, 1]; the model
normalises internally.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

TaskKind = Literal["segmentation", "depth", "normal", "attributes"]
TASK_KINDS: tuple[str, ...] = ("segmentation", "depth", "normal", "attributes")
DENSE_KINDS: frozenset[str] = frozenset({"segmentation", "depth", "normal"})


@dataclass(frozen=True)
class TaskSpec:
    """One task of a data set: its name, kind, output channels and the names of those channels.

    ``labels`` holds class names (segmentation) or attribute names (attributes); it is empty for
    depth and normal. ``channels`` equals ``len(labels)`` whenever labels are given.
    """

    name: str
    kind: TaskKind
    channels: int
    labels: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        if self.kind not in TASK_KINDS:
            raise ValueError(f"task {self.name!r}: unknown kind {self.kind!r}; choose one of {TASK_KINDS}")
        if self.labels and len(self.labels) != self.channels:
            raise ValueError(
                f"task {self.name!r}: {len(self.labels)} labels for {self.channels} channels"
            )
        expected = {"depth": 1, "normal": 3}.get(self.kind)
        if expected is not None and self.channels != expected:
            raise ValueError(f"task {self.name!r}: a {self.kind} task has {expected} channels")

    @property
    def dense(self) -> bool:
        return self.kind in DENSE_KINDS

    def to_dict(self) -> dict:
        return {"name": self.name, "kind": self.kind, "channels": self.channels, "labels": list(self.labels)}

    @classmethod
    def from_dict(cls, d: dict) -> TaskSpec:
        return cls(name=d["name"], kind=d["kind"], channels=int(d["channels"]), labels=tuple(d.get("labels", ())))


def select_tasks(available: tuple[TaskSpec, ...], names: list[str] | tuple[str, ...] | None) -> tuple[TaskSpec, ...]:
    """The tasks named in ``names`` (all of ``available`` when None), in the order given."""
    if not names:
        return tuple(available)
    by_name = {t.name: t for t in available}
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; this data set has {sorted(by_name)}")
    if len(set(names)) != len(names):
        raise ValueError(f"task list {list(names)} names a task twice")
    return tuple(by_name[n] for n in names)
