"""ONNX export: the tensor spec, the self-checking export (ONNX Runtime vs PyTorch) and the manifest.

The export is the final graph (uint8 pixels in, each task's answer and its raw output ``TASK_raw``
out); the comparisons here feed it pixels ``p`` and compare ``TASK_raw`` with PyTorch on ``p / 255``
(the answer fields, the float-input and raw variants: tests/test_final_graph.py).

Small models only: the ``tiny`` encoder at 32x48 and the paper's resnet50d-os8 with 8-wide heads at
32x32. Each check here can fail: the comparisons against ONNX Runtime are recomputed in the tests
(not read back from the export report), and the failure paths are driven through the production
code by making the exported graph genuinely differ from the PyTorch model.
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from parsimony.manifest import Manifest
from training.export import (
    DEFAULT_ATOL,
    DEFAULT_RTOL,
    MANIFEST_FORMAT,
    ExportMismatch,
    ManifestError,
    ModelIOSpec,
    SpecError,
    SpecMismatch,
    TensorSpec,
    build_manifest,
    export_onnx,
    graph_spec,
    io_spec,
    load_manifest,
    onnx_export,
    write_manifest,
)
from training.models import (
    ModelConfig,
    MultiTaskModel,
    build_model,
    count_macs,
    count_parameters,
    create_model,
)
from training.models.registry import model_config
from training.tasks import TaskSpec

SEG = TaskSpec("seg", "segmentation", 5, ("floor", "wall", "table", "chair", "other"))
DEPTH = TaskSpec("depth", "depth", 1)
NORMAL = TaskSpec("normal", "normal", 3)
ATTR = TaskSpec("attr", "attributes", 2, ("Male", "Smiling"))
TASKS = (SEG, DEPTH, NORMAL, ATTR)
TINY_SIZE = (32, 48)
RESNET_SIZE = (32, 32)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _tiny(tasks: tuple[TaskSpec, ...] = TASKS, seed: int = 0) -> MultiTaskModel:
    torch.manual_seed(seed)
    return create_model(encoder="tiny", tasks=tasks)


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory):
    model = _tiny()
    path = tmp_path_factory.mktemp("tiny") / "model.onnx"
    report = export_onnx(model, path, image_size=TINY_SIZE)
    return model, path, report


def _ort(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _pixels(batch: int, size: tuple[int, int], seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (batch, *size, 3), dtype=np.uint8)


def _assert_ort_matches_torch(model, path: Path, spec: ModelIOSpec, batch: int) -> dict[str, float]:
    """Independent re-check on fresh pixels: each task's raw output ``TASK_raw`` against PyTorch on
    the pixels / 255; returns the scale-relative error per task."""
    pixels = _pixels(batch, spec.inputs[0].shape[1:3], 123)
    with torch.no_grad():
        expected = model.eval()(torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255)
    got = dict(zip(spec.output_names, _ort(path).run(None, {"image": pixels}), strict=True))
    errors = {}
    for task, value in expected.items():
        ref, out = value.numpy(), got[f"{task}_raw"]
        assert out.shape == ref.shape == spec.tensor(f"{task}_raw").concrete_shape(batch)
        scale = float(np.abs(ref).max())
        err = float(np.abs(out - ref).max())
        assert err <= DEFAULT_ATOL + DEFAULT_RTOL * scale, (task, err, scale)
        errors[task] = err / scale
    return errors


# --- spec ---------------------------------------------------------------------------------------


def test_io_spec_layout_per_task_kind() -> None:
    spec = io_spec(model_config(encoder="tiny", tasks=TASKS), (24, 40))
    assert spec.input_names == ("image",)
    assert spec.inputs[0] == TensorSpec("image", "float32", (-1, 3, 24, 40))
    assert {t.name: t.shape for t in spec.outputs} == {
        "seg": (-1, 5, 24, 40),
        "depth": (-1, 1, 24, 40),
        "normal": (-1, 3, 24, 40),
        "attr": (-1, 2),
    }
    assert spec.output_names == ("seg", "depth", "normal", "attr")  # config order
    assert all(t.dtype == "float32" for t in spec.outputs)
    assert spec.dynamic_axes() == {n: {0: "batch"} for n in ("image", "seg", "depth", "normal", "attr")}


def test_io_spec_json_round_trip() -> None:
    spec = io_spec(model_config(encoder="tiny", tasks=TASKS), TINY_SIZE)
    again = ModelIOSpec.from_dict(json.loads(json.dumps(spec.to_dict())))
    assert again == spec
    assert again.tensor("attr").concrete_shape(3) == (3, 2)


@pytest.mark.parametrize("name", ["seg-map", "1seg", "", "seg map", "tiefe_ü", "seg/1"])
def test_invalid_tensor_names_are_refused(name: str) -> None:
    with pytest.raises(SpecError, match="not valid for ONNX and Triton"):
        TensorSpec(name, "float32", (-1, 1))


def test_invalid_task_name_is_refused_by_io_spec() -> None:
    config = model_config(encoder="tiny", tasks=(TaskSpec("sem-seg", "segmentation", 3),))
    with pytest.raises(SpecError, match="'sem-seg'"):
        io_spec(config, TINY_SIZE)


def test_task_named_like_the_input_is_refused() -> None:
    config = model_config(encoder="tiny", tasks=(TaskSpec("image", "depth", 1),))
    with pytest.raises(SpecError, match="used twice"):
        io_spec(config, TINY_SIZE)


@pytest.mark.parametrize(
    ("dtype", "shape", "match"),
    [
        ("float", (-1, 3), "unknown dtype"),
        ("float32", (-1, 0), "positive"),
        ("float32", (-2, 3), "positive"),
        ("float32", (-1, 1.5), "tuple of ints"),
    ],
)
def test_invalid_dtype_or_shape_is_refused(dtype: str, shape: tuple, match: str) -> None:
    with pytest.raises(SpecError, match=match):
        TensorSpec("x", dtype, shape)


@pytest.mark.parametrize("size", [(0, 32), (32,), (32.0, 32), (-1, 32)])
def test_invalid_image_size_is_refused(size) -> None:
    with pytest.raises(SpecError, match="image_size"):
        io_spec(model_config(encoder="tiny", tasks=TASKS), size)


# --- export -------------------------------------------------------------------------------------


def test_graph_names_equal_the_spec_and_checker_passes(tiny_export) -> None:
    _, path, report = tiny_export
    graph = onnx.load(str(path))
    onnx.checker.check_model(graph, full_check=True)
    assert [v.name for v in graph.graph.input] == list(report.io_spec.input_names)
    assert [v.name for v in graph.graph.output] == list(report.io_spec.output_names)
    report.io_spec.check_against_onnx(graph)
    report.io_spec.check_against_onnx(path)  # paths too
    assert graph.opset_import[0].version == 17


def test_dynamic_batch_runs_in_onnx_runtime(tiny_export) -> None:
    _, path, report = tiny_export
    session = _ort(path)
    for batch in (1, 3):
        outputs = dict(zip(report.io_spec.output_names, session.run(None, {"image": _pixels(batch, TINY_SIZE, batch)}),
                           strict=True))
        for t in report.io_spec.outputs:
            assert outputs[t.name].shape == t.concrete_shape(batch)
    normals = outputs["normal"]
    np.testing.assert_allclose(np.linalg.norm(normals, axis=1), 1.0, atol=1e-5)


def test_tiny_export_matches_pytorch_within_the_bound(tiny_export) -> None:
    model, path, report = tiny_export
    assert report.batch_sizes == (1, 2)
    assert all(c.passed for c in report.checks)
    assert len(report.checks) == 2 * len(report.io_spec.outputs)
    assert set(report.max_abs_error()) >= {f"{t.name}_raw" for t in TASKS}
    _assert_ort_matches_torch(model, path, report.io_spec, batch=3)


@pytest.mark.slow  # the full-size encoder; the tiny one covers the same path
@pytest.mark.parametrize("head", ["light", "aspp"])
def test_resnet50d_os8_export_matches_pytorch(tmp_path: Path, head: str) -> None:
    torch.manual_seed(0)
    model = create_model(encoder="resnet50d-os8", tasks=TASKS, head=head, head_width=8)
    report = export_onnx(model, tmp_path / "model.onnx", image_size=RESNET_SIZE)
    assert all(c.passed for c in report.checks)
    rel = _assert_ort_matches_torch(model, tmp_path / "model.onnx", report.io_spec, batch=2)
    # Rounding only: well inside rtol for everything but the unit normals (see onnx_export's doc).
    assert max(rel[n] for n in ("seg", "depth", "attr")) < DEFAULT_RTOL / 5
    assert report.near_ties() == {"seg": 0}  # the class maps are exact on these inputs


def test_export_leaves_the_callers_model_alone(tmp_path: Path) -> None:
    model = _tiny().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    export_onnx(model, tmp_path / "m.onnx", image_size=TINY_SIZE, check_batch_sizes=(2,))
    assert model.training and all(m.training for m in model.modules())
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def _perturbed_trace(monkeypatch) -> None:
    """Make the exported graph genuinely differ from PyTorch: trace a copy with altered weights."""
    real = onnx_export.trace_to_onnx

    def trace_altered_copy(module, path, spec, opset):
        altered = copy.deepcopy(module)
        with torch.no_grad():
            altered.model.heads["depth"].classifier.bias.add_(0.5)
        real(altered, path, spec, opset)

    monkeypatch.setattr(onnx_export, "trace_to_onnx", trace_altered_copy)


def test_mismatch_raises_and_writes_nothing(tmp_path: Path, monkeypatch) -> None:
    _perturbed_trace(monkeypatch)
    path = tmp_path / "model.onnx"
    with pytest.raises(ExportMismatch) as info:
        export_onnx(_tiny(), path, image_size=TINY_SIZE)
    message = str(info.value)
    assert "'depth_raw'" in message and "bound" in message and "opset" in message
    assert "'seg" not in message  # only the altered head disagrees
    assert list(tmp_path.iterdir()) == []  # no file and no temporary left behind


def test_mismatch_keeps_an_existing_file(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "model.onnx"
    path.write_bytes(b"previous version")
    _perturbed_trace(monkeypatch)
    with pytest.raises(ExportMismatch):
        export_onnx(_tiny(), path, image_size=TINY_SIZE)
    assert path.read_bytes() == b"previous version"
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]


class _BatchDependent(MultiTaskModel):
    """Python control flow on the batch size: tracing (at batch 2) freezes the branch."""

    def forward(self, x):
        out = super().forward(x)
        if x.shape[0] == 1:
            out["depth"] = out["depth"] * 2
        return out


def test_frozen_control_flow_is_caught(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = _BatchDependent(model_config(encoder="tiny", tasks=TASKS))
    with (
        pytest.warns(torch.jit.TracerWarning),
        pytest.raises(ExportMismatch, match="'depth_raw' at batch size 1"),
    ):
        export_onnx(model, tmp_path / "model.onnx", image_size=TINY_SIZE)
    assert not (tmp_path / "model.onnx").exists()


def test_tight_bound_fails_on_rounding_alone(tmp_path: Path) -> None:
    """The bound is what decides: with no slack, float rounding between the runtimes fails."""
    with pytest.raises(ExportMismatch, match="atol 0 \\+ rtol 0"):
        export_onnx(_tiny(), tmp_path / "m.onnx", image_size=TINY_SIZE, atol=0.0, rtol=0.0)


# --- spec vs graph ------------------------------------------------------------------------------


def _rename_output(graph: onnx.ModelProto, old: str, new: str) -> None:
    for node in graph.graph.node:
        node.input[:] = [new if i == old else i for i in node.input]  # a final graph's float16 copy reads it
        node.output[:] = [new if o == old else o for o in node.output]
    for value in graph.graph.output:
        if value.name == old:
            value.name = new


def test_check_against_onnx_catches_a_renamed_output(tiny_export) -> None:
    _, path, report = tiny_export
    graph = onnx.load(str(path))
    _rename_output(graph, "depth", "depth_m")
    onnx.checker.check_model(graph)  # still a valid graph; only the spec disagrees
    with pytest.raises(
        SpecMismatch, match=r"\['depth'\] are in the spec.*\n.*\['depth_m'\] are not in the spec"
    ):
        report.io_spec.check_against_onnx(graph)


def test_check_against_onnx_catches_dims_and_types(tiny_export) -> None:
    _, path, report = tiny_export
    graph = onnx.load(str(path))
    seg = next(v for v in graph.graph.output if v.name == "seg_raw")
    seg.type.tensor_type.shape.dim[1].dim_value = 6
    batch = graph.graph.input[0].type.tensor_type.shape.dim[0]
    batch.dim_value = 1  # fixed batch where the spec says dynamic
    attr = next(v for v in graph.graph.output if v.name == "attr")
    attr.type.tensor_type.elem_type = onnx.TensorProto.FLOAT16
    with pytest.raises(SpecMismatch) as info:
        report.io_spec.check_against_onnx(graph)
    message = str(info.value)
    assert "output 'seg_raw': dim 1 is 6, spec says 5" in message
    assert "input 'image': dim 0 is fixed to 1, spec says dynamic" in message
    assert "output 'attr': element type FLOAT16" in message


def test_check_against_onnx_catches_another_image_size(tiny_export) -> None:
    _, path, _ = tiny_export
    other, _ = graph_spec(model_config(encoder="tiny", tasks=TASKS), (64, 48))
    with pytest.raises(SpecMismatch, match="dim 1 is 32, spec says 64"):
        other.check_against_onnx(path)


# --- manifest -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def manifest_and_checkpoint(tiny_export, tmp_path_factory):
    model, path, report = tiny_export
    checkpoint = tmp_path_factory.mktemp("ckpt") / "weights.pt"
    torch.save(model.state_dict(), checkpoint)  # > 1 MiB: hashed in several chunks
    manifest = build_manifest(
        model,
        report.io_spec,
        image_size=TINY_SIZE,
        report=report,
        source_checkpoint=checkpoint,
        extra={"run": "test"},
    )
    out = path.parent / "manifest.json"
    write_manifest(out, manifest)
    return load_manifest(out).to_dict(), checkpoint, report


def test_manifest_numbers_equal_the_rebuilt_model(manifest_and_checkpoint) -> None:
    manifest, _, _ = manifest_and_checkpoint
    config = ModelConfig.from_dict(manifest["model_config"])
    rebuilt = build_model(config)
    original = _tiny().config
    assert config == original
    assert [s["out"] for s in manifest["model_config"]["encoder"]["stages"]] == [32, 64, 96, 128]
    assert [h["widths"] for h in manifest["model_config"]["heads"]] == [[64], [64], [64], [64]]
    assert manifest["complexity"]["parameters"] == count_parameters(rebuilt)
    assert manifest["complexity"]["macs"] == count_macs(rebuilt, TINY_SIZE)
    assert "multiply-add once" in manifest["complexity"]["note"]


def test_manifest_checkpoint_hash_equals_hashlib(manifest_and_checkpoint) -> None:
    manifest, checkpoint, _ = manifest_and_checkpoint
    assert checkpoint.stat().st_size > 1 << 20
    assert manifest["source_checkpoint"]["sha256"] == hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    assert manifest["source_checkpoint"]["bytes"] == checkpoint.stat().st_size


def test_manifest_records_spec_semantics_and_export(manifest_and_checkpoint) -> None:
    manifest, _, report = manifest_and_checkpoint
    assert manifest["format_version"] == MANIFEST_FORMAT
    assert Manifest.parse(manifest).tensor_spec == report.io_spec
    tasks = {t["name"]: t for t in manifest["tasks"]}
    assert tasks["seg"]["class_names"] == list(SEG.labels)
    assert "argmax over dim 1" in tasks["seg"]["semantics"]
    assert tasks["depth"]["unit"] == "metres"
    assert "0 = invalid" in tasks["depth"]["value_range"]
    assert "x right, y down, z forward" in tasks["normal"]["semantics"]
    assert tasks["attr"]["attribute_names"] == ["Male", "Smiling"]
    assert "sigmoid" in tasks["attr"]["semantics"]
    norm = manifest["input"]["normalization"]
    assert norm["in_graph"] and norm["mean"] == list(_tiny().config.input_mean)
    assert manifest["input"]["value_range"] == [0.0, 255.0] and manifest["input"]["size"] == list(TINY_SIZE)
    assert manifest["input"]["dtype"] == "uint8" and manifest["input"]["layout"] == "NHWC"
    export = manifest["export"]
    assert export["opset"] == 17 and export["check"]["atol"] == DEFAULT_ATOL
    assert export["max_abs_error"] == report.max_abs_error()
    assert set(manifest["versions"]) >= {"torch", "onnx", "onnxruntime"}
    assert manifest["extra"] == {"run": "test"} and manifest["created"]


def test_manifest_refuses_a_spec_of_another_size(tiny_export) -> None:
    model, _, report = tiny_export
    other, _ = graph_spec(model.config, (64, 64))
    with pytest.raises(ManifestError, match="does not belong"):
        build_manifest(model, other, image_size=TINY_SIZE, report=report)
    with pytest.raises(ManifestError, match="export report"):
        build_manifest(model, other, image_size=(64, 64), report=report)


def test_manifest_missing_checkpoint_is_refused(tiny_export, tmp_path: Path) -> None:
    model, _, report = tiny_export
    with pytest.raises(ManifestError, match="does not exist"):
        build_manifest(
            model, report.io_spec, image_size=TINY_SIZE, report=report, source_checkpoint=tmp_path / "nope.pt"
        )


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (None, "does not exist"),
        ("{not json", "not readable JSON"),
        ("[1, 2]", "not an object"),
        ('{"format_version": 99}', "format_version 99"),
        ('{"format_version": true}', "format_version True"),  # equal to 1 in Python, still no version
        (f'{{"format_version": {MANIFEST_FORMAT}, "tasks": []}}', "lacks"),
    ],
)
def test_load_manifest_errors(tmp_path: Path, content: str | None, match: str) -> None:
    path = tmp_path / "manifest.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ManifestError, match=match):
        load_manifest(path)


def test_manifest_task_sections_keep_their_keys(manifest_and_checkpoint) -> None:
    """Readers written against earlier manifests find every key they used, for every kind."""
    manifest, _, _ = manifest_and_checkpoint
    base = {"name", "kind", "output", "channels", "semantics"}
    assert {t["name"]: set(t) for t in manifest["tasks"]} == {
        "seg": base | {"class_names"},
        "depth": base | {"unit", "value_range"},
        "normal": base,
        "attr": base | {"attribute_names"},
    }
    assert all(t["output"] == t["name"] for t in manifest["tasks"])


def test_an_edges_task_is_exported_with_its_kinds_section(tmp_path: Path) -> None:
    edges = TaskSpec("edges", "edges", 1)
    model = _tiny((SEG, edges))
    report = export_onnx(model, tmp_path / "model.onnx", image_size=TINY_SIZE, check_batch_sizes=(1,))
    assert report.io_spec.tensor("edges_raw") == TensorSpec("edges_raw", "float32", (-1, 1, *TINY_SIZE))
    assert report.io_spec.tensor("edges") == TensorSpec("edges", "uint8", (-1, *TINY_SIZE))
    write_manifest(tmp_path / "manifest.json", build_manifest(model, report.io_spec, image_size=TINY_SIZE,
                                                              report=report))
    section = next(t for t in load_manifest(tmp_path).to_dict()["tasks"] if t["kind"] == "edges")
    semantics = section.pop("semantics")
    assert section == {"name": "edges", "kind": "edges", "output": "edges", "channels": 1}
    assert "sigmoid" in semantics and "boundary" in semantics
