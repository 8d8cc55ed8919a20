"""Building the manifest of an exported model (what it computes and how it was made).

The manifest itself, its reading, writing and checks are `parsimony.manifest.Manifest`; this module
adds what needs the model: `build_manifest` fills one in from a `MultiTaskModel`, its export report
and the source checkpoint (each task's section comes from its kind), and refuses a spec or report
that does not belong to the model, so the manifest cannot describe another graph than the one
exported. The model config it records rebuilds the model:
``build_model(ModelConfig.from_dict(manifest.model_config_))``.

A final graph's manifest (the default export) also has the ``graph`` section: the image input's
dtype and, for every output, which field of which task's answer it holds in which dtype
(`parsimony.manifest.GraphSection`); its ``input`` section describes uint8 ``[N, H, W, 3]`` pixels
in [0, 255] or float32 ``[N, 3, H, W]`` images in [0, 1], normalised inside the graph either way.
Each task's section is the same in both graph kinds: its ``output`` names the tensor holding its
primary field (a final graph: the answer, e.g. the class map; a raw graph: the head output) and
``semantics`` says what the head computes (a final graph's ``TASK_raw``).

The thin functions below (`load_manifest`, `write_manifest`, `verify_onnx_digest`,
`manifest_io_spec`) keep the names the export and its tests use; each is one call into the contract.
"""

from __future__ import annotations

import datetime as _dt
import platform
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING

from parsimony.errors import ManifestError
from parsimony.layout import MANIFEST_FILE
from parsimony.manifest import (
    FORMAT_VERSION,
    MACS_NOTE,
    REQUIRED_KEYS,
    Manifest,
    checkpoint_section,
    load_manifest,
    sha256_file,
)
from parsimony.spec import INPUT_NAME, ModelIOSpec
from parsimony.tasks import kind
from training.export.final_graph import PIXEL_MAX, graph_spec
from training.models.config import ModelConfig

if TYPE_CHECKING:
    from torch import nn

    from training.export.onnx_export import ExportReport

__all__ = ["MACS_NOTE", "MANIFEST_FORMAT", "MANIFEST_NAME", "REQUIRED_KEYS", "Manifest", "ManifestError",
           "build_manifest", "checkpoint_section", "graph_section", "input_section", "load_manifest", "manifest_io_spec",
           "sha256_file", "verify_onnx_digest", "versions", "write_manifest"]

MANIFEST_FORMAT = FORMAT_VERSION
MANIFEST_NAME = MANIFEST_FILE


def build_manifest(
    model: nn.Module,
    io_spec_: ModelIOSpec,
    *,
    image_size: tuple[int, int],
    report: ExportReport,
    source_checkpoint: Path | None = None,
    extra: dict | None = None,
) -> Manifest:
    """The manifest of ``model`` exported at ``image_size`` (H, W).

    ``io_spec_`` and ``report`` must be those of this model at this size (checked);
    ``source_checkpoint`` is the weights file the model was loaded from (hashed, not read as a
    checkpoint); ``extra`` is stored as is under ``"extra"`` (e.g. a run id or metrics).
    """
    # here, not at the top: counting needs PyTorch
    from training.models.complexity import count_macs, count_parameters

    config: ModelConfig = model.config
    _check_consistent(config, io_spec_, image_size, report)
    h, w = image_size
    graph = {"graph": graph_section(report)} if report.final else {}
    return Manifest.parse(graph | {
        "format_version": FORMAT_VERSION,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "model_name": config.name,
        "onnx_file": report.path.name,
        "onnx_sha256": sha256_file(report.path),
        "input": input_section(config, (h, w), report.input_dtype),
        "tasks": [kind(t.kind, task=t.name).manifest_section(t.info()) for t in config.tasks],
        "io_spec": io_spec_.to_dict(),
        "model_config": config.to_dict(),
        "complexity": {"parameters": count_parameters(model), "macs": count_macs(model, (h, w)), "note": MACS_NOTE},
        "source_checkpoint": checkpoint_section(source_checkpoint),
        "export": report.to_dict(),
        "versions": versions(),
        "extra": dict(extra or {}),
    }, f"of {report.path}")


def write_manifest(path: str | Path, manifest: Manifest) -> None:
    """`Manifest.write`: atomically, and only a manifest that records the digest of its graph."""
    manifest.write(path)


def verify_onnx_digest(manifest: Manifest, onnx_path: str | Path) -> None:
    """`Manifest.verify_onnx`: refuse a graph that is not the one the manifest describes."""
    manifest.verify_onnx(onnx_path)


def manifest_io_spec(manifest: Manifest) -> ModelIOSpec:
    """The tensor spec a manifest records (`Manifest.tensor_spec`)."""
    return manifest.tensor_spec


def input_section(config: ModelConfig, image_size: tuple[int, int], dtype: str = "float32") -> dict:
    """The ``input`` section: float32 ``[N, C, H, W]`` in [0, 1], or uint8 ``[N, H, W, C]`` pixels."""
    pixels = dtype == "uint8"
    formula = ("image / 255 (transposed to NCHW), then (x - mean) / std per channel, applied inside the graph: "
               "send uint8 pixels" if pixels else
               "(image - mean) / std per channel, applied inside the graph: send [0, 1] images")
    return {
        "name": INPUT_NAME,
        "layout": "NHWC" if pixels else "NCHW",
        "size": list(image_size),
        "channels": "RGB" if config.encoder.in_channels == 3 else f"{config.encoder.in_channels} channels",
        "value_range": [0.0, PIXEL_MAX] if pixels else [0.0, 1.0],
        "dtype": dtype,
        "normalization": {
            "in_graph": True,
            "mean": list(config.input_mean),
            "std": list(config.input_std),
            "formula": formula,
        },
    }


def graph_section(report: ExportReport) -> dict:
    """The ``graph`` section of a final graph: its input dtype and what each output holds."""
    return {"outputs": "final", "input_dtype": report.input_dtype,
            "tensors": [{"task": o.task, "field": o.field, "dtype": o.dtype, "name": o.name} for o in report.outputs]}


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
    expected, _ = graph_spec(config, image_size, raw_outputs=not report.final,
                             float_input=report.input_dtype == "float32")
    if spec != expected:
        raise ManifestError(
            f"the io spec does not belong to this model at image_size {tuple(image_size)}: got {spec.to_dict()}, "
            f"the model's {'final' if report.final else 'raw'} graph has {expected.to_dict()}; pass the "
            f"export report's io_spec"
        )
    if report.io_spec != expected:
        raise ManifestError(
            "the export report is for another model or image size; pass the report export_onnx returned "
            "for this model"
        )
