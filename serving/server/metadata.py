"""What the gateway knows about a model, read from its export manifest (never from the graph).

The manifest (`parsimony.manifest.Manifest`) is the single source of task names, kinds, class and
attribute names, units and the input size; every backend, embedded or remote, describes its model
with the same `ModelMetadata`, so the API answers identically whichever backend runs it. A task is
the contract's `parsimony.tasks.TaskInfo`: its kind object (``task.owner``) names the fields of
its answer.

Two kinds of graph are served:

- a **final graph** (the manifest has a ``graph`` section) computes the answers itself: its image
  input is ``uint8 [N, H, W, C]`` (or, exported with ``--float-input``, ``float32 [N, C, H, W]``)
  and each field of each task's answer is an output tensor, in each dtype it is offered in
  (``tensors``: ``(task, field, dtype) -> output name``). `outputs_for` says which tensors one call
  needs: the primary field in the requested dtype, the optional probability fields only when asked;
- a **raw graph** (no ``graph`` section: ``--raw-outputs`` exports and every earlier export) takes
  ``float32 [N, C, H, W]`` in [0, 1] and returns each task's head output, which the gateway
  post-processes through the task's kind.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from parsimony.layout import ONNX_FILE
from parsimony.manifest import Manifest
from parsimony.spec import INPUT_NAME, ModelIOSpec
from parsimony.tasks import RAW, TaskInfo

__all__ = ["RAW", "ModelMetadata", "TaskInfo"]

TensorKey = tuple[str, str, str]  # (task, field, dtype) of one output of a final graph


@dataclass(frozen=True)
class ModelMetadata:
    """One loaded model version: name, version, input size and tasks (in manifest order), and for a
    final graph its input dtype and what each output holds."""

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
    input_dtype: str = "float32"
    tensors: Mapping[TensorKey, str] = field(default_factory=dict, hash=False)  # empty: a raw graph
    _plans: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    @classmethod
    def from_manifest(cls, name: str, version: int, manifest: Manifest | Mapping[str, Any]) -> ModelMetadata:
        """From a loaded `Manifest` (or a manifest's JSON object, parsed and checked here)."""
        if not isinstance(manifest, Manifest):
            manifest = Manifest.parse(dict(manifest), f"of model {name!r} version {version}")
        spec = manifest.tensor_spec
        image = spec.tensor(INPUT_NAME)
        if image.dtype == "uint8":  # [N, H, W, C]: pixels as decoders return them
            _, height, width, channels = image.shape
        else:
            _, channels, height, width = image.shape
        tensors = {}
        if manifest.graph is not None:
            tensors = {(t.task, t.field, t.dtype): t.name for t in manifest.graph.tensors}
            _check_final(name, manifest.task_infos, tensors)
        return cls(name=name, version=int(version), height=height, width=width, channels=channels,
                   tasks=manifest.task_infos, io_spec=spec, parameters=manifest.complexity.parameters,
                   macs=manifest.complexity.macs, manifest=manifest, input_dtype=image.dtype, tensors=tensors)

    @property
    def onnx_file(self) -> str:
        """The graph's file name in the version folder (``model.onnx`` unless the manifest says otherwise)."""
        return self.manifest.onnx_file if self.manifest is not None else ONNX_FILE

    @property
    def final(self) -> bool:
        """Whether the graph returns final answers (else raw head outputs, post-processed here)."""
        return bool(self.tensors)

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
        """One image as the graph takes it: (H, W, C) for a uint8 input, (C, H, W) for a float32 one."""
        if self.input_dtype == "uint8":
            return self.height, self.width, self.channels
        return self.channels, self.height, self.width

    def blank_batch(self, batch: int) -> np.ndarray:
        """``batch`` black images as the graph takes them (warm-up requests)."""
        return np.zeros((batch, *self.input_shape), self.input_dtype)

    def outputs_for(self, task: TaskInfo, dtype: str, probabilities: bool) -> tuple[tuple[str, str], ...]:
        """``((field, output name), ...)``: the tensors a call for ``task`` needs. A final graph: the
        primary field in ``dtype`` (fields offered in one dtype only, such as class maps, in that one)
        and, when ``probabilities``, the optional fields; a raw graph: the task's head output (`RAW`)."""
        key = (task.name, dtype, probabilities)
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plans[key] = self._plan(task, dtype, probabilities)
        return plan

    def _plan(self, task: TaskInfo, dtype: str, probabilities: bool) -> tuple[tuple[str, str], ...]:
        if not self.final:
            return ((RAW, task.output_name),)
        owner = task.owner
        fields = [owner.primary, *(owner.optional_fields if probabilities else ())]
        return tuple((name, self._tensor(task, name, dtype)) for name in fields)

    def _tensor(self, task: TaskInfo, field_name: str, dtype: str) -> str:
        offered = task.owner.field_dtypes(task, field_name)
        return self.tensors[(task.name, field_name, dtype if dtype in offered else offered[0])]


def _check_final(name: str, tasks: tuple[TaskInfo, ...], tensors: Mapping[TensorKey, str]) -> None:
    """A final graph must offer every field of every task in every dtype its kind offers it in."""
    missing = [f"{t.name}.{f.name} ({dtype})" for t in tasks for f in t.owner.fields
               for dtype in t.owner.field_dtypes(t, f.name) if (t.name, f.name, dtype) not in tensors]
    if missing:
        raise ValueError(f"the manifest's graph section of model {name!r} lists no output for {missing}; the graph "
                         f"cannot answer every request: re-export the model with this version of parsimony")
