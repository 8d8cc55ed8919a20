"""Export: a self-checking ONNX export and the manifest written next to it (the tensor spec and
the manifest format themselves are `parsimony.spec` and `parsimony.manifest`). The default graph
is the final one (`final_graph`: uint8 pixels in, each task's answer out); ``raw_outputs=True``
exports the raw graph (float32 images in, head outputs out).

Typical use::

    from parsimony.layout import MANIFEST_FILE, ONNX_FILE
    from training.export import build_manifest, export_onnx
    report = export_onnx(model, out / ONNX_FILE, image_size=(288, 384))
    manifest = build_manifest(model, report.io_spec, image_size=(288, 384), report=report,
                              source_checkpoint=ckpt_path, extra=None)
    manifest.write(out / MANIFEST_FILE)
"""

from training.export.checks import FINAL_RTOL, FLIP_FRACTION, ExactCheck
from training.export.final_graph import FinalOutputs, graph_spec
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

__all__ = ["DEFAULT_ATOL", "DEFAULT_OPSET", "DEFAULT_RTOL", "DTYPES", "FINAL_RTOL", "FLIP_FRACTION", "INPUT_NAME",
           "MANIFEST_FORMAT", "MANIFEST_NAME", "ExactCheck", "ExportMismatch", "ExportReport", "FinalOutputs",
           "ManifestError", "ModelIOSpec", "OutputError", "SpecError", "SpecMismatch", "TensorSpec", "build_manifest",
           "export_onnx", "graph_spec", "io_spec", "load_manifest", "manifest_io_spec", "sha256_file",
           "validate_name", "write_manifest"]
