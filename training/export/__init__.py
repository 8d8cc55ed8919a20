"""Export: the tensor spec (single source of names, dtypes, shapes), a self-checking ONNX export
and the manifest written next to it.

Typical use::

    from training.export import export_onnx, build_manifest, write_manifest
    report = export_onnx(model, out / "model.onnx", image_size=(288, 384))
    manifest = build_manifest(model, report.io_spec, image_size=(288, 384), report=report,
                              source_checkpoint=ckpt_path, extra=None)
    write_manifest(out / "manifest.json", manifest)
"""

from training.export.manifest import (
    MANIFEST_FORMAT,
    MANIFEST_NAME,
    ManifestError,
    build_manifest,
    load_manifest,
    manifest_io_spec,
    sha256_file,
    write_manifest,
)
from training.export.onnx_export import (
    DEFAULT_ATOL,
    DEFAULT_OPSET,
    DEFAULT_RTOL,
    ExportMismatch,
    ExportReport,
    OutputError,
    export_onnx,
)
from training.export.spec import (
    DTYPES,
    INPUT_NAME,
    ModelIOSpec,
    SpecError,
    SpecMismatch,
    TensorSpec,
    io_spec,
    validate_name,
)

__all__ = [
    "DEFAULT_ATOL",
    "DEFAULT_OPSET",
    "DEFAULT_RTOL",
    "DTYPES",
    "INPUT_NAME",
    "MANIFEST_FORMAT",
    "MANIFEST_NAME",
    "ExportMismatch",
    "ExportReport",
    "ManifestError",
    "ModelIOSpec",
    "OutputError",
    "SpecError",
    "SpecMismatch",
    "TensorSpec",
    "build_manifest",
    "export_onnx",
    "io_spec",
    "load_manifest",
    "manifest_io_spec",
    "sha256_file",
    "validate_name",
    "write_manifest",
]
