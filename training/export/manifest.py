"""manifest.json: what an exported model computes and how it was made, next to the ONNX file.

It records the tensor spec, the meaning of every task output, the input convention (RGB in
[0, 1]; the mean/std normalisation is inside the graph), the width-explicit model config (so the
model can be rebuilt with ``build_model(ModelConfig.from_dict(manifest["model_config"]))``), the
parameter and MAC counts, the SHA-256 of the graph it describes (``onnx_sha256``) and of the
source checkpoint, the export check (opset, tolerances, measured errors) and the library versions.
`build_manifest` refuses a spec or report that does not belong to the model, so the manifest cannot
describe a different graph than the one exported; `verify_onnx_digest` lets a reader refuse a
``model.onnx`` that is not that graph (a folder mixing two exports). `load_manifest` checks every
field readers use and names the file and field of any problem.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import platform
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import Field

from training.export.spec import INPUT_NAME, ModelIOSpec, SpecError, io_spec
from training.inputs import InputFileError, PositiveInt, Schema, shown, validate
from training.io import atomic_write_json
from training.models.config import ModelConfig
from training.tasks import TaskSpec

if TYPE_CHECKING:
    from torch import nn

    from training.export.onnx_export import ExportReport

MANIFEST_FORMAT = 1
MANIFEST_NAME = "manifest.json"
REQUIRED_KEYS = ("format_version", "tasks", "io_spec", "input", "model_config", "complexity", "export")
WRITTEN_KEYS = (*REQUIRED_KEYS, "onnx_file", "onnx_sha256")  # manifests before the digest lack it
MACS_NOTE = (
    "MACs count one multiply-add once (FLOPs ~ 2 x MACs); Conv2d and Linear layers only, "
    "batch 1 at input.size"
)
_HASH_CHUNK = 1 << 20


class ManifestError(InputFileError):
    """A manifest is missing, unreadable or inconsistent; the message names the file and the fix."""


class _Task(Schema):
    model_config = {"extra": "allow", "strict": True}
    name: str = Field(min_length=1)
    kind: str
    output: str = Field(min_length=1)
    channels: PositiveInt
    class_names: list[str] = Field(default_factory=list)
    attribute_names: list[str] = Field(default_factory=list)


class _Input(Schema):
    model_config = {"extra": "allow", "strict": True}
    size: list[PositiveInt] = Field(min_length=2, max_length=2)


class _Complexity(Schema):
    model_config = {"extra": "allow", "strict": True}
    parameters: int = Field(ge=0)
    macs: int = Field(ge=0)


class _Manifest(Schema):
    """The fields readers of a manifest use; other sections are for people and pass through."""

    model_config = {"extra": "allow", "strict": True, "protected_namespaces": ()}
    tasks: list[_Task] = Field(min_length=1)
    io_spec: dict
    input: _Input
    model_config_: dict = Field(alias="model_config")
    complexity: _Complexity
    export: dict
    onnx_file: str = Field(default="model.onnx", pattern=r"^[A-Za-z0-9_.-]+\.onnx$")
    onnx_sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")


def build_manifest(
    model: nn.Module,
    io_spec_: ModelIOSpec,
    *,
    image_size: tuple[int, int],
    report: ExportReport,
    source_checkpoint: Path | None = None,
    extra: dict | None = None,
) -> dict:
    """The manifest of ``model`` exported at ``image_size`` (H, W), as a JSON-ready dict.

    ``io_spec_`` and ``report`` must be those of this model at this size (checked);
    ``source_checkpoint`` is the weights file the model was loaded from (hashed, not read as a
    checkpoint); ``extra`` is stored as is under ``"extra"`` (e.g. a run id or metrics).
    """
    # here, not at the top: this needs PyTorch, readers of manifests do not
    from training.models.complexity import count_macs, count_parameters

    config: ModelConfig = model.config
    _check_consistent(config, io_spec_, image_size, report)
    h, w = image_size
    return {
        "format_version": MANIFEST_FORMAT,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "model_name": config.name,
        "onnx_file": report.path.name,
        "onnx_sha256": sha256_file(report.path),
        "input": input_section(config, (h, w)),
        "tasks": [task_section(t) for t in config.tasks],
        "io_spec": io_spec_.to_dict(),
        "model_config": config.to_dict(),
        "complexity": {
            "parameters": count_parameters(model),
            "macs": count_macs(model, (h, w)),
            "note": MACS_NOTE,
        },
        "source_checkpoint": checkpoint_section(source_checkpoint),
        "export": report.to_dict(),
        "versions": versions(),
        "extra": dict(extra or {}),
    }


def write_manifest(path: str | Path, manifest: dict) -> None:
    """Write atomically (temporary file, then rename); a reader never sees half a manifest."""
    missing = [k for k in WRITTEN_KEYS if k not in manifest]
    if missing:
        raise ManifestError(
            f"refusing to write {path}: manifest lacks {missing}; build it with build_manifest"
        )
    atomic_write_json(Path(path), manifest)


def load_manifest(path: str | Path) -> dict:
    path = Path(path)
    if path.is_dir():
        path = path / MANIFEST_NAME
    if not path.is_file():
        raise ManifestError(f"manifest {path} does not exist; export the model first (training.export)")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ManifestError(f"manifest {path} is not readable JSON ({exc}); re-export the model") from exc
    if not isinstance(manifest, dict):
        raise ManifestError(
            f"manifest {path} holds a {type(manifest).__name__}, not an object; re-export the model"
        )
    version = manifest.get("format_version")
    if isinstance(version, bool) or version != MANIFEST_FORMAT:  # True == 1 in Python, but not a version
        raise ManifestError(
            f"manifest {path} has format_version {version!r}; this code reads version {MANIFEST_FORMAT} "
            f"(re-export the model with this version of parsimony)"
        )
    missing = [k for k in REQUIRED_KEYS if k not in manifest]
    if missing:
        raise ManifestError(
            f"manifest {path} lacks {missing}; it is truncated or hand-edited, re-export the model"
        )
    _check_fields(manifest, path)
    return manifest


def _check_fields(manifest: dict, path: Path) -> None:
    """Types of every field readers use, the io spec, and tasks that name outputs of that spec."""
    try:
        validate(_Manifest, manifest, path)
    except InputFileError as exc:
        raise ManifestError(f"manifest {exc}; re-export the model") from None
    try:
        outputs = ModelIOSpec.from_dict(manifest["io_spec"]).output_names
    except SpecError as exc:
        raise ManifestError(f"manifest {path}: field 'io_spec': {exc}; re-export the model") from None
    for i, task in enumerate(manifest["tasks"]):
        if task["output"] not in outputs:
            raise ManifestError(f"manifest {path}: field 'tasks.{i}.output': {shown(task['output'])} is not an "
                                f"output of io_spec (it has {list(outputs)}); re-export the model")


def verify_onnx_digest(manifest: dict, onnx_path: str | Path) -> None:
    """Refuse ``onnx_path`` unless its SHA-256 is the manifest's ``onnx_sha256`` (a manifest without
    the field, written before it existed, is refused too: its graph cannot be vouched for)."""
    onnx_path = Path(onnx_path)
    expected = manifest.get("onnx_sha256")
    if not isinstance(expected, str):
        raise ManifestError(f"the manifest of {onnx_path} records no onnx_sha256; re-export the model "
                            f"(python -m training.export RUN_DIR)")
    if not onnx_path.is_file():
        raise ManifestError(f"{onnx_path} does not exist; its manifest describes it, re-export the model")
    actual = sha256_file(onnx_path)
    if actual != expected:
        raise ManifestError(f"{onnx_path} is not the graph its manifest describes (SHA-256 {actual[:12]}..., "
                            f"the manifest's onnx_sha256 is {expected[:12]}...): the folder mixes two exports, "
                            f"export the run again")


def manifest_io_spec(manifest: dict) -> ModelIOSpec:
    """The tensor spec a manifest records (for config generators and clients)."""
    return ModelIOSpec.from_dict(manifest["io_spec"])


def input_section(config: ModelConfig, image_size: tuple[int, int]) -> dict:
    return {
        "name": INPUT_NAME,
        "layout": "NCHW",
        "size": list(image_size),
        "channels": "RGB" if config.encoder.in_channels == 3 else f"{config.encoder.in_channels} channels",
        "value_range": [0.0, 1.0],
        "dtype": "float32",
        "normalization": {
            "in_graph": True,
            "mean": list(config.input_mean),
            "std": list(config.input_std),
            "formula": "(image - mean) / std per channel, applied inside the graph: send [0, 1] images",
        },
    }


def task_section(task: TaskSpec) -> dict:
    """Kind, output tensor and output semantics of one task."""
    section: dict[str, Any] = {
        "name": task.name,
        "kind": task.kind,
        "output": task.name,
        "channels": task.channels,
    }
    if task.kind == "segmentation":
        section["class_names"] = list(task.labels)
        section["semantics"] = "logits, argmax over dim 1 gives the class index"
    elif task.kind == "depth":
        section["unit"] = "metres"
        section["value_range"] = (
            "non-negative metres expected (the head is unconstrained: clamp at 0); 0 = invalid in targets"
        )
        section["semantics"] = "depth in metres per pixel"
    elif task.kind == "normal":
        section["semantics"] = (
            "unit vectors (L2-normalised in the graph), camera frame x right, y down, z forward"
        )
    else:
        section["attribute_names"] = list(task.labels)
        section["semantics"] = "logits, sigmoid gives the probability"
    return section


def checkpoint_section(path: Path | None) -> dict | None:
    if path is None:
        return None
    path = Path(path)
    if not path.is_file():
        raise ManifestError(
            f"source checkpoint {path} does not exist; pass the file the weights came from, or None"
        )
    return {"file": path.name, "sha256": sha256_file(path), "bytes": path.stat().st_size}


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(_HASH_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def versions() -> dict[str, str]:
    import onnx
    import onnxruntime
    import torch

    try:
        parsimony = metadata.version("parsimony")
    except metadata.PackageNotFoundError:
        parsimony = "unknown"
    return {
        "parsimony": parsimony,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
    }


def _check_consistent(
    config: ModelConfig, spec: ModelIOSpec, image_size: tuple[int, int], report: ExportReport
) -> None:
    expected = io_spec(config, image_size)
    if spec != expected:
        raise ManifestError(
            f"the io spec does not belong to this model at image_size {tuple(image_size)}: got {spec.to_dict()}, "
            f"the model's is {expected.to_dict()}; pass io_spec(model.config, image_size)"
        )
    if report.io_spec != expected:
        raise ManifestError(
            "the export report is for another model or image size; pass the report export_onnx returned "
            "for this model"
        )
