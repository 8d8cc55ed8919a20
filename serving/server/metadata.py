"""What the gateway knows about a model, read from its export manifest (never from the graph).

The manifest (`parsimony.manifest.Manifest`) is the single source of task names, kinds, class and
attribute names, units and the input size; every backend, embedded or remote, describes its model
with the same `ModelMetadata`, so the API answers identically whichever backend runs it. A task is
the contract's `parsimony.tasks.TaskInfo`: its kind object (``task.owner``) post-processes it and
names the fields of its answer.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from parsimony.layout import ONNX_FILE
from parsimony.manifest import Manifest
from parsimony.spec import INPUT_NAME, ModelIOSpec
from parsimony.tasks import TaskInfo

__all__ = ["ModelMetadata", "TaskInfo"]


@dataclass(frozen=True)
class ModelMetadata:
    """One loaded model version: name, version, input size and tasks (in manifest order)."""

    name: str
    version: int
    height: int
    width: int
    channels: int
    tasks: tuple[TaskInfo, ...]
    io_spec: ModelIOSpec
    parameters: int = 0
    macs: int = 0
    manifest: Manifest | None = field(default=None, repr=False, compare=False)

    @classmethod
    def from_manifest(cls, name: str, version: int, manifest: Manifest | Mapping[str, Any]) -> ModelMetadata:
        """From a loaded `Manifest` (or a manifest's JSON object, parsed and checked here)."""
        if not isinstance(manifest, Manifest):
            manifest = Manifest.parse(dict(manifest), f"of model {name!r} version {version}")
        spec = manifest.tensor_spec
        _, channels, height, width = spec.tensor(INPUT_NAME).shape
        return cls(name=name, version=int(version), height=height, width=width, channels=channels,
                   tasks=manifest.task_infos, io_spec=spec, parameters=manifest.complexity.parameters,
                   macs=manifest.complexity.macs, manifest=manifest)

    @property
    def onnx_file(self) -> str:
        """The graph's file name in the version folder (``model.onnx`` unless the manifest says otherwise)."""
        return self.manifest.onnx_file if self.manifest is not None else ONNX_FILE

    @property
    def task_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.tasks)

    def task(self, name: str) -> TaskInfo:
        for t in self.tasks:
            if t.name == name:
                return t
        raise KeyError(name)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image as the graph takes it."""
        return self.channels, self.height, self.width
