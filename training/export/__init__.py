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

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    ".manifest": (
        "MANIFEST_FORMAT", "MANIFEST_NAME", "ManifestError", "build_manifest", "load_manifest",
        "manifest_io_spec", "sha256_file", "write_manifest",
    ),
    ".onnx_export": (
        "DEFAULT_ATOL", "DEFAULT_OPSET", "DEFAULT_RTOL", "ExportMismatch", "ExportReport", "OutputError",
        "export_onnx",
    ),
    ".spec": (
        "DTYPES", "INPUT_NAME", "ModelIOSpec", "SpecError", "SpecMismatch", "TensorSpec", "io_spec",
        "validate_name",
    ),
})
