"""``manifest.json``: what an exported model computes and how it was made, next to its graph.

`Manifest` is the file as a versioned pydantic model; it is read (`Manifest.load`) and written
(`Manifest.write`, atomically) only through it. It records the tensor spec, each task's kind,
output and labels, the input convention (RGB in [0, 1]; the mean/std normalisation is inside the
graph), the width-explicit model config (opaque here: the training side rebuilds the model from
it), parameter and MAC counts, the SHA-256 of the graph it describes (``onnx_sha256``) and of the
source checkpoint, the export check (opset, tolerances, measured errors) and library versions.
`Manifest.verify_onnx` refuses a graph that is not the one described (a folder mixing two
exports). Every problem is a `ManifestError` naming the file and the field.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from parsimony.errors import InputFileError, ManifestError, SpecError, shown
from parsimony.files import PositiveInt, validate
from parsimony.io import atomic_write_json
from parsimony.layout import MANIFEST_FILE, ONNX_FILE
from parsimony.spec import INPUT_NAME, ModelIOSpec
from parsimony.tasks import TaskInfo, UnknownKind, kind

FORMAT_VERSION = 1
MACS_NOTE = (
    "MACs count one multiply-add once (FLOPs ~ 2 x MACs); Conv2d and Linear layers only, "
    "batch 1 at input.size"
)
_HASH_CHUNK = 1 << 20
REQUIRED_KEYS = ("format_version", "tasks", "io_spec", "input", "model_config", "complexity", "export")
_SECTION = ConfigDict(extra="allow", strict=True)


class TaskSection(BaseModel):
    """One task: kind, the output tensor holding it, its labels and what the output means."""

    model_config = _SECTION
    name: str = Field(min_length=1)
    kind: str
    output: str = Field(min_length=1)
    channels: PositiveInt
    class_names: list[str] = Field(default_factory=list)
    attribute_names: list[str] = Field(default_factory=list)
    unit: str = ""
    semantics: str = ""

    def info(self) -> TaskInfo:
        return TaskInfo.from_dict(self.model_dump())


class InputSection(BaseModel):
    model_config = _SECTION
    name: str = INPUT_NAME
    layout: str = "NCHW"
    size: list[PositiveInt] = Field(min_length=2, max_length=2)
    channels: str = "RGB"
    value_range: list[float] = Field(default=[0.0, 1.0])
    dtype: str = "float32"
    normalization: dict[str, Any] = Field(default_factory=dict)


class Complexity(BaseModel):
    model_config = _SECTION
    parameters: int = Field(ge=0)
    macs: int = Field(ge=0)
    note: str = MACS_NOTE


class GraphTensor(BaseModel):
    """One output of a final graph: which field of which task's answer, in which dtype."""

    model_config = ConfigDict(extra="forbid", strict=True)
    task: str
    field: str
    dtype: str
    name: str


class GraphSection(BaseModel):
    """Present when the graph computes final answers (pre- and post-processing inside): its image
    input's dtype (uint8 ``[N, H, W, C]`` or float32 ``[N, C, H, W]``) and what each output holds.
    A manifest without it describes a raw graph (float32 input, each task's head output)."""

    model_config = ConfigDict(extra="allow", strict=True)
    outputs: Literal["final"] = "final"
    input_dtype: Literal["uint8", "float32"]
    tensors: list[GraphTensor] = Field(min_length=1)


class Manifest(BaseModel):
    """The manifest of one exported graph (see the module doc); unknown keys pass through."""

    model_config = ConfigDict(extra="allow", strict=True, protected_namespaces=())
    format_version: Literal[1]
    created: str = ""
    model_name: str = ""
    onnx_file: str = Field(default=ONNX_FILE, pattern=r"^[A-Za-z0-9_.-]+\.onnx$")
    onnx_sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")
    input: InputSection
    tasks: list[TaskSection] = Field(min_length=1)
    io_spec: dict[str, Any]
    model_config_: dict[str, Any] = Field(alias="model_config")
    complexity: Complexity
    source_checkpoint: dict[str, Any] | None = None
    export: dict[str, Any]
    versions: dict[str, str] = Field(default_factory=dict)
    extra: dict[str, Any] = Field(default_factory=dict)
    graph: GraphSection | None = None

    # --- reading and writing -------------------------------------------------------------------

    @classmethod
    def load(cls, path: str | Path) -> Manifest:
        """The manifest in ``path`` (a file, or a folder holding ``manifest.json``)."""
        path = Path(path)
        if path.is_dir():
            path = path / MANIFEST_FILE
        if not path.is_file():
            raise ManifestError(f"manifest {path} does not exist; export the model first (training.export)")
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ManifestError(f"manifest {path} is not readable JSON ({exc}); re-export the model") from exc
        return cls.parse(data, path)

    @classmethod
    def parse(cls, data: Any, path: str | Path = "manifest") -> Manifest:
        if not isinstance(data, dict):
            raise ManifestError(f"manifest {path} holds a {type(data).__name__}, not an object; re-export the model")
        version = data.get("format_version")
        if isinstance(version, bool) or version != FORMAT_VERSION:  # True == 1 in Python, but not a version
            raise ManifestError(
                f"manifest {path} has format_version {version!r}; this code reads version {FORMAT_VERSION} "
                f"(re-export the model with this version of parsimony)")
        missing = [k for k in REQUIRED_KEYS if k not in data]
        if missing:
            raise ManifestError(f"manifest {path} lacks {missing}; it is truncated or hand-edited, re-export the model")
        try:
            manifest = validate(cls, data, path)
        except InputFileError as exc:
            raise ManifestError(f"manifest {exc}; re-export the model") from None
        manifest._check_consistent(path)
        return manifest

    def _check_consistent(self, path: str | Path) -> None:
        """An io spec that parses, tasks that name its outputs, kinds this version knows."""
        try:
            outputs = self.tensor_spec.output_names
        except SpecError as exc:
            raise ManifestError(f"manifest {path}: field 'io_spec': {exc}; re-export the model") from None
        for i, task in enumerate(self.tasks):
            if task.output not in outputs:
                raise ManifestError(f"manifest {path}: field 'tasks.{i}.output': {shown(task.output)} is not an "
                                    f"output of io_spec (it has {list(outputs)}); re-export the model")
            try:
                kind(task.kind, task=task.name)
            except UnknownKind as exc:
                raise ManifestError(f"manifest {path}: field 'tasks.{i}.kind': {exc}") from None
        if self.graph is not None:
            tasks = {t.name for t in self.tasks}
            for i, tensor in enumerate(self.graph.tensors):
                if tensor.name not in outputs or tensor.task not in tasks:
                    raise ManifestError(f"manifest {path}: field 'graph.tensors.{i}': tensor {shown(tensor.name)} of "
                                        f"task {shown(tensor.task)} is not an output of io_spec or not a task; "
                                        f"re-export the model")

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(by_alias=True, mode="json", exclude_unset=True)

    def write(self, path: str | Path) -> None:
        """Write atomically (temporary file, then rename): a reader never sees half a manifest."""
        if self.onnx_sha256 is None:
            raise ManifestError(f"refusing to write {path}: the manifest records no onnx_sha256 of its graph")
        atomic_write_json(Path(path), self.to_dict())

    # --- what readers use ----------------------------------------------------------------------

    @property
    def tensor_spec(self) -> ModelIOSpec:
        return ModelIOSpec.from_dict(self.io_spec)

    @property
    def task_infos(self) -> tuple[TaskInfo, ...]:
        return tuple(t.info() for t in self.tasks)

    @property
    def image_size(self) -> tuple[int, int]:
        h, w = self.input.size
        return h, w

    @property
    def final(self) -> bool:
        """Whether the graph returns final answers (else raw head outputs the reader post-processes)."""
        return self.graph is not None

    def output_tensor(self, task: str, field: str, dtype: str) -> str | None:
        """The name of the final graph's output holding ``field`` of ``task`` in ``dtype``; None
        when the graph has no such output (or is a raw graph)."""
        if self.graph is None:
            return None
        for t in self.graph.tensors:
            if t.task == task and t.field == field and t.dtype == dtype:
                return t.name
        return None

    def verify_onnx(self, onnx_path: str | Path) -> None:
        """Refuse ``onnx_path`` unless its SHA-256 is ``onnx_sha256`` (a manifest without the field,
        written before it existed, is refused too: its graph cannot be vouched for)."""
        onnx_path = Path(onnx_path)
        if self.onnx_sha256 is None:
            raise ManifestError(f"the manifest of {onnx_path} records no onnx_sha256; re-export the model "
                                f"(python -m training.export RUN_DIR)")
        if not onnx_path.is_file():
            raise ManifestError(f"{onnx_path} does not exist; its manifest describes it, re-export the model")
        actual = sha256_file(onnx_path)
        if actual != self.onnx_sha256:
            raise ManifestError(f"{onnx_path} is not the graph its manifest describes (SHA-256 {actual[:12]}..., "
                                f"the manifest's onnx_sha256 is {self.onnx_sha256[:12]}...): the folder mixes two "
                                f"exports, export the run again")


def load_manifest(path: str | Path) -> Manifest:
    return Manifest.load(path)


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(_HASH_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def checkpoint_section(path: str | Path | None) -> dict | None:
    """The source checkpoint's name, SHA-256 and size (hashed, never unpickled)."""
    if path is None:
        return None
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"source checkpoint {path} does not exist; pass the file the weights came from, or None")
    return {"file": path.name, "sha256": sha256_file(path), "bytes": path.stat().st_size}
