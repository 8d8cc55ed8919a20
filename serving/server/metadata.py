"""What the gateway knows about a model, read from its export manifest (never from the graph).

The manifest (`training.export.manifest`) is the single source of task names, kinds, class and
attribute names, units and the input size; every backend, embedded or remote, describes its model
with the same `ModelMetadata`, so the API answers identically whichever backend runs it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from training.export.manifest import manifest_io_spec
from training.export.spec import INPUT_NAME, ModelIOSpec

TASK_KINDS = ("segmentation", "depth", "normal", "attributes")
ENCODINGS = ("png", "jpeg")


@dataclass(frozen=True)
class TaskInfo:
    name: str
    kind: str
    output: str  # the model output tensor holding this task
    channels: int
    class_names: tuple[str, ...] = ()
    attribute_names: tuple[str, ...] = ()
    unit: str = ""
    semantics: str = ""

    @classmethod
    def from_manifest(cls, section: dict) -> TaskInfo:
        if section.get("kind") not in TASK_KINDS:
            raise ValueError(
                f"task {section.get('name')!r} has kind {section.get('kind')!r}, which the gateway cannot "
                f"post-process (it knows {list(TASK_KINDS)}); re-export the model with this parsimony version"
            )
        return cls(
            name=section["name"],
            kind=section["kind"],
            output=section.get("output", section["name"]),
            channels=int(section["channels"]),
            class_names=tuple(section.get("class_names", ())),
            attribute_names=tuple(section.get("attribute_names", ())),
            unit=section.get("unit", ""),
            semantics=section.get("semantics", ""),
        )


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
    manifest: dict = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_manifest(cls, name: str, version: int, manifest: dict) -> ModelMetadata:
        spec = manifest_io_spec(manifest)
        image = spec.tensor(INPUT_NAME)
        _, channels, height, width = image.shape
        tasks = tuple(TaskInfo.from_manifest(t) for t in manifest["tasks"])
        missing = [t.output for t in tasks if t.output not in spec.output_names]
        if missing:
            raise ValueError(
                f"model {name!r} version {version}: tasks name outputs {missing} that the tensor spec lacks "
                f"(it has {list(spec.output_names)}); the manifest is inconsistent, re-export the model"
            )
        complexity = manifest.get("complexity", {})
        return cls(name=name, version=int(version), height=height, width=width, channels=channels, tasks=tasks,
                   io_spec=spec, parameters=int(complexity.get("parameters", 0)),
                   macs=int(complexity.get("macs", 0)), manifest=manifest)

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
