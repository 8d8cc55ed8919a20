"""Export: the tensor spec (single source of names, dtypes, shapes), a self-checking ONNX export
and the manifest written next to it.

Typical use::

    from training.export import export_onnx, build_manifest, write_manifest
    report = export_onnx(model, out / "model.onnx", image_size=(288, 384))
    manifest = build_manifest(model, report.io_spec, image_size=(288, 384), report=report,
                              source_checkpoint=ckpt_path, extra=None)
    write_manifest(out / "manifest.json", manifest)
"""

from training._lazy import lazy_exports

_EXPORTS = {
    "DEFAULT_ATOL": ".onnx_export",
    "DEFAULT_OPSET": ".onnx_export",
    "DEFAULT_RTOL": ".onnx_export",
    "DTYPES": ".spec",
    "ExportMismatch": ".onnx_export",
    "ExportReport": ".onnx_export",
    "INPUT_NAME": ".spec",
    "MANIFEST_FORMAT": ".manifest",
    "MANIFEST_NAME": ".manifest",
    "ManifestError": ".manifest",
    "ModelIOSpec": ".spec",
    "OutputError": ".onnx_export",
    "SpecError": ".spec",
    "SpecMismatch": ".spec",
    "TensorSpec": ".spec",
    "build_manifest": ".manifest",
    "export_onnx": ".onnx_export",
    "io_spec": ".spec",
    "load_manifest": ".manifest",
    "manifest_io_spec": ".manifest",
    "sha256_file": ".manifest",
    "validate_name": ".spec",
    "write_manifest": ".manifest",
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(_EXPORTS)
