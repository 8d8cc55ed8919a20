"""The final graph: uint8 pixels in, each task's answer out (training.export.final_graph), checked
against the PyTorch model and the contract's reference post-processing.

One tiny model with every kind (segmentation, depth, normal, attributes, edges) at 32x48, exported
as the final graph, its float-input variant and the raw graph. The comparisons are recomputed here
on fresh inputs (not read from the export report); the failure paths make the graph genuinely
compute something else than the reference.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from parsimony import onnxrt
from parsimony.manifest import Manifest
from parsimony.spec import TensorSpec
from parsimony.tasks import RAW, final_io_spec, kind_names
from parsimony.tasks import kind as contract_kind
from training.export import (
    ExactCheck,
    ExportMismatch,
    build_manifest,
    export_onnx,
    graph_spec,
    io_spec,
)
from training.export.checks import FINAL_ATOL, FINAL_RTOL, reference_fields, task_checks
from training.kinds import kind as training_kind
from training.models import create_model
from training.tasks import TaskSpec

SEG = TaskSpec("seg", "segmentation", 5, ("floor", "wall", "table", "chair", "other"))
DEPTH = TaskSpec("depth", "depth", 1)
NORMAL = TaskSpec("normal", "normal", 3)
ATTR = TaskSpec("attr", "attributes", 2, ("Male", "Smiling"))
EDGES = TaskSpec("edges", "edges", 1)
TASKS = (SEG, DEPTH, NORMAL, ATTR, EDGES)
SIZE = (32, 48)
FP16_ULPS = 2.0**-10, 2.0**-24  # two float16 roundings, relative and in the subnormal range


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _model(tasks=TASKS, seed: int = 0):
    torch.manual_seed(seed)
    return create_model(encoder="tiny", tasks=tasks).eval()


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """``{variant: (model, path, report)}`` for the final graph, its float-input variant and the raw graph."""
    model, folder = _model(), tmp_path_factory.mktemp("final")
    options = {"final": {}, "float": {"float_input": True}, "raw": {"raw_outputs": True}}
    return {name: (model, folder / f"{name}.onnx", export_onnx(model, folder / f"{name}.onnx", image_size=SIZE, **kw))
            for name, kw in options.items()}


def _pixels(batch: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (batch, *SIZE, 3), dtype=np.uint8)


def _floats(pixels: np.ndarray) -> np.ndarray:
    return pixels.transpose(0, 3, 1, 2).astype(np.float32) / np.float32(255)


def _run(path: Path, image: np.ndarray, names=None) -> dict[str, np.ndarray]:
    session = onnxrt.session(path, threads=1)
    names = names or [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, {"image": image}), strict=True))


def _torch_raw(model, pixels: np.ndarray) -> dict[str, np.ndarray]:
    with torch.no_grad():
        return {k: v.numpy() for k, v in model(torch.from_numpy(_floats(pixels))).items()}


# --- the graph ------------------------------------------------------------------------------------


def test_graph_has_the_contracts_outputs_and_passes_the_checks(exports) -> None:
    _, path, report = exports["final"]
    spec, outputs = final_io_spec(TASKS, SIZE)
    assert report.io_spec == spec and report.outputs == outputs and report.final
    assert spec.inputs[0] == TensorSpec("image", "uint8", (-1, *SIZE, 3))
    graph = onnx.load(str(path))
    assert graph.opset_import[0].version == 17
    onnx.checker.check_model(graph, full_check=True)  # strict shape inference included
    spec.check_against_onnx(graph)  # names, element types (uint8, int32, float16) and fixed dims
    types = {v.name: v.type.tensor_type.elem_type for v in graph.graph.output}
    assert types["seg"] == types["edges"] == onnx.TensorProto.UINT8
    assert types["depth_fp16"] == onnx.TensorProto.FLOAT16 and types["seg_raw"] == onnx.TensorProto.FLOAT
    assert list(spec.output_names) == [
        "seg", "seg_probabilities", "seg_probabilities_fp16", "seg_raw", "depth", "depth_fp16", "depth_raw",
        "normal", "normal_fp16", "normal_raw", "attr", "attr_raw", "edges", "edges_probabilities",
        "edges_probabilities_fp16", "edges_raw"]


def test_every_training_kind_computes_its_contracts_fields() -> None:
    raw = {"segmentation": torch.randn(2, 5, 4, 6), "depth": torch.randn(2, 1, 4, 6),
           "normal": torch.nn.functional.normalize(torch.randn(2, 3, 4, 6), dim=1),
           "attributes": torch.randn(2, 2), "edges": torch.randn(2, 1, 4, 6)}
    assert set(raw) == set(kind_names())
    for task in TASKS:
        fields = training_kind(task.kind).final_outputs(task, raw[task.kind])
        assert set(fields) == set(contract_kind(task.kind).field_names), task.kind
        for name, value in fields.items():
            assert tuple(value.shape[1:]) == contract_kind(task.kind).field_shape(task.info(), name, (4, 6))


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("batch", [1, 3])
def test_class_and_edge_maps_equal_the_pytorch_reference(exports, seed: int, batch: int) -> None:
    """Exact, but where ONNX Runtime's and PyTorch's logits order the top two classes (or an edge
    logit and 0) differently: near ties within float rounding, none on these inputs."""
    model, path, _ = exports["final"]
    pixels = _pixels(batch, 100 + seed)
    got, raw = _run(path, pixels), _torch_raw(model, pixels)
    seg_ref = raw["seg"].argmax(axis=1)
    edge_ref = np.where(raw["edges"][:, 0] >= 0, 255, 0)
    assert got["seg"].dtype == np.uint8 and got["edges"].dtype == np.uint8
    np.testing.assert_array_equal(got["seg"], seg_ref)
    np.testing.assert_array_equal(got["edges"], edge_ref)
    assert set(np.unique(got["edges"])) <= {0, 255}


def test_more_than_256_classes_give_an_int32_class_map(tmp_path: Path) -> None:
    seg = TaskSpec("seg", "segmentation", 300)
    model = _model((seg,))
    report = export_onnx(model, tmp_path / "m.onnx", image_size=SIZE, check_batch_sizes=(2,))
    assert report.io_spec.tensor("seg") == TensorSpec("seg", "int32", (-1, *SIZE))
    pixels = _pixels(2, 7)
    got = _run(tmp_path / "m.onnx", pixels, ["seg"])["seg"]
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, _torch_raw(model, pixels)["seg"].argmax(axis=1))


@pytest.mark.parametrize("batch", [1, 3])
def test_float_fields_match_the_reference_post_processing(exports, batch: int) -> None:
    model, path, _ = exports["final"]
    pixels = _pixels(batch, 11)
    got, raw = _run(path, pixels), _torch_raw(model, pixels)
    for task in TASKS:
        delta = float(np.abs(got[f"{task.name}_raw"] - raw[task.name]).max())
        reference = reference_fields(task.info(), raw[task.name])
        for out in contract_kind(task.kind).graph_outputs(task.info(), SIZE, raw=False):
            if out.dtype != "float32":
                continue
            ref, value = reference[out.field], got[out.name]
            assert value.shape == ref.shape
            bound = FINAL_ATOL + FINAL_RTOL * float(np.abs(ref).max()) + delta
            assert float(np.abs(value - ref).max()) <= bound, out.name
    assert (got["depth"] >= 0).all() and np.allclose(got["depth"], np.maximum(got["depth_raw"][:, 0], 0))
    np.testing.assert_allclose(np.linalg.norm(got["normal"], axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(got["seg_probabilities"].sum(axis=1), 1.0, atol=1e-5)
    assert ((got["attr"] > 0) & (got["attr"] < 1)).all()


@pytest.mark.parametrize("batch", [1, 3])
def test_fp16_outputs_are_within_fp16_rounding(exports, batch: int) -> None:
    model, path, _ = exports["final"]
    pixels = _pixels(batch, 21)
    got, raw = _run(path, pixels), _torch_raw(model, pixels)
    halves = [n for n in got if n.endswith("_fp16")]
    assert sorted(halves) == ["depth_fp16", "edges_probabilities_fp16", "normal_fp16", "seg_probabilities_fp16"]
    for name in halves:
        assert got[name].dtype == np.float16
        full = got[name.removesuffix("_fp16")]
        np.testing.assert_array_equal(got[name], full.astype(np.float16))  # a Cast of the float32 output
        task = next(t for t in TASKS if name.startswith(t.name))
        field = "probabilities" if "probabilities" in name else contract_kind(task.kind).primary
        ref32 = reference_fields(task.info(), raw[task.name])[field]
        delta = float(np.abs(got[f"{task.name}_raw"] - raw[task.name]).max())
        slack = FINAL_ATOL + FINAL_RTOL * float(np.abs(ref32).max()) + delta
        error = np.abs(got[name].astype(np.float64) - ref32.astype(np.float16).astype(np.float64))
        assert (error <= FP16_ULPS[0] * np.abs(ref32) + FP16_ULPS[1] + slack).all(), name


def test_raw_outputs_equal_pytorch_on_pixels_over_255(exports) -> None:
    model, path, report = exports["final"]
    pixels = _pixels(3, 31)
    got, raw = _run(path, pixels), _torch_raw(model, pixels)
    for task in TASKS:
        ref = raw[task.name]
        assert got[f"{task.name}_raw"].shape == ref.shape
        assert np.abs(got[f"{task.name}_raw"] - ref).max() <= report.atol + report.rtol * np.abs(ref).max()


# --- variants ---------------------------------------------------------------------------------------


def test_float_input_variant_computes_the_same_answers(exports) -> None:
    _, final_path, final = exports["final"]
    _, path, report = exports["float"]
    assert report.io_spec.inputs[0] == TensorSpec("image", "float32", (-1, 3, *SIZE))
    assert report.io_spec.outputs == final.io_spec.outputs and report.outputs == final.outputs
    pixels = _pixels(2, 41)
    a, b = _run(final_path, pixels), _run(path, _floats(pixels))
    for name in a:  # the graph's p / 255 is numpy's, bit for bit
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def test_raw_outputs_variant_is_the_raw_graph(exports) -> None:
    model, path, report = exports["raw"]
    assert not report.final and report.outputs == ()
    assert report.io_spec == io_spec(model.config, SIZE) == graph_spec(model.config, SIZE, raw_outputs=True)[0]
    assert report.io_spec.output_names == tuple(t.name for t in TASKS)
    assert all(t.dtype == "float32" for t in report.io_spec.outputs)
    graph = onnx.load(str(path))
    assert not {"ArgMax", "Softmax", "Sigmoid"} & {n.op_type for n in graph.graph.node}  # no post-processing
    image = _floats(_pixels(2, 51))
    got = _run(path, image)
    with torch.no_grad():
        want = {k: v.numpy() for k, v in model(torch.from_numpy(image)).items()}
    for task in TASKS:
        assert np.abs(got[task.name] - want[task.name]).max() <= report.atol + report.rtol * np.abs(want[task.name]).max()
    manifest = build_manifest(model, report.io_spec, image_size=SIZE, report=report)
    assert manifest.graph is None and not manifest.final
    assert manifest.input.dtype == "float32" and manifest.input.layout == "NCHW"
    assert manifest.input.value_range == [0.0, 1.0]
    assert "near_ties" not in manifest.export and "final_rules" not in manifest.export["check"]


# --- the manifest ------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["final", "float"])
def test_manifest_describes_the_final_graph(exports, tmp_path: Path, variant: str) -> None:
    model, path, report = exports[variant]
    (tmp_path / "model.onnx").write_bytes(path.read_bytes())
    report = dataclasses.replace(report, path=tmp_path / "model.onnx")
    build_manifest(model, report.io_spec, image_size=SIZE, report=report).write(tmp_path / "manifest.json")
    manifest = Manifest.load(tmp_path)
    manifest.verify_onnx(tmp_path / "model.onnx")
    assert Manifest.parse(json.loads((tmp_path / "manifest.json").read_text())) == manifest
    assert manifest.final and manifest.tensor_spec == report.io_spec
    assert manifest.graph.input_dtype == report.input_dtype == ("uint8" if variant == "final" else "float32")
    assert [(t.task, t.field, t.dtype, t.name) for t in manifest.graph.tensors] == [
        (o.task, o.field, o.dtype, o.name) for o in report.outputs]
    assert manifest.output_tensor("seg", "class_map", "uint8") == "seg"
    assert manifest.output_tensor("seg", "probabilities", "float16") == "seg_probabilities_fp16"
    assert manifest.output_tensor("attr", "probabilities", "float32") == "attr"
    assert manifest.output_tensor("edges", RAW, "float32") == "edges_raw"
    assert manifest.output_tensor("attr", "probabilities", "float16") is None
    assert [t.output for t in manifest.tasks] == [t.name for t in TASKS]  # each task's primary field
    assert manifest.task_infos[0].class_names == SEG.labels and manifest.task_infos[3].attribute_names == ATTR.labels
    pixels = variant == "final"
    assert manifest.input.layout == ("NHWC" if pixels else "NCHW")
    assert manifest.input.value_range == ([0.0, 255.0] if pixels else [0.0, 1.0])
    assert manifest.input.normalization["in_graph"]
    export = manifest.export
    assert export["near_ties"] == {"seg": 0, "edges": 0} and export["check"]["final_rtol"] == FINAL_RTOL
    assert set(export["max_abs_error"]) == {o.name for o in report.outputs if o.dtype.startswith("float")}


# --- requesting a subset ------------------------------------------------------------------------------


def test_a_subset_of_outputs_runs_only_what_it_needs(exports, tmp_path: Path) -> None:
    """ONNX Runtime runs every node whatever a run asks for; a session pruned to ``depth``
    (parsimony.onnxrt) runs no segmentation or edge post-processing and answers the same bytes."""
    _, path, _ = exports["final"]
    pixels = _pixels(2, 61)
    full = _run(path, pixels)
    assert set(_run(path, pixels, ["depth"])) == {"depth"}
    session = onnxrt.session(path, threads=1, outputs=["depth"], profile=tmp_path / "ort")
    assert [o.name for o in session.get_outputs()] == ["depth"]
    (depth,) = session.run(None, {"image": pixels})
    trace = json.loads(Path(session.end_profiling()).read_text())
    ops = {e["args"]["op_name"] for e in trace if e.get("cat") == "Node" and "op_name" in e.get("args", {})}
    assert "Clip" in ops and not ops & {"ArgMax", "Exp", "ReduceSum", "Sigmoid", "GreaterOrEqual", "Where"}
    np.testing.assert_array_equal(depth, full["depth"])
    two = onnxrt.session(path, threads=1, outputs=["seg_probabilities_fp16", "attr"])
    got = dict(zip(["seg_probabilities_fp16", "attr"], two.run(None, {"image": pixels}), strict=True))
    for name, value in got.items():
        np.testing.assert_array_equal(value, full[name])
    with pytest.raises(ValueError, match="'depth_fp32'.*'depth_fp16'"):
        onnxrt.prune(path, ["depth_fp32"])


# --- the self-check fails where the graph computes something else ---------------------------------------


def _with_final_outputs(monkeypatch, kind_name: str, change) -> None:
    owner = training_kind(kind_name)
    real = type(owner).final_outputs
    monkeypatch.setattr(type(owner), "final_outputs", lambda self, task, raw: change(real(self, task, raw), raw))


@pytest.mark.parametrize(("kind_name", "change", "output"), [
    ("depth", lambda f, raw: {"depth": raw[:, 0]}, "'depth'"),  # no clamp
    ("segmentation", lambda f, raw: f | {"class_map": (-raw).argmax(dim=1)}, "'seg'"),
    ("segmentation", lambda f, raw: f | {"probabilities": torch.softmax(raw, dim=2)}, "'seg_probabilities'"),
    ("edges", lambda f, raw: f | {"edge_map": torch.where(raw[:, 0] > 1, 255.0, 0.0)}, "'edges'"),
])
def test_wrong_post_processing_fails_the_export(tmp_path: Path, monkeypatch, kind_name, change, output) -> None:
    _with_final_outputs(monkeypatch, kind_name, change)
    with pytest.raises(ExportMismatch) as info:
        export_onnx(_model(), tmp_path / "model.onnx", image_size=SIZE, check_batch_sizes=(1,))
    assert f"output {output} at batch size 1" in str(info.value)
    assert "_raw'" not in str(info.value)  # the forward pass itself agrees
    assert list(tmp_path.iterdir()) == []


def test_near_ties_are_counted_and_bounded() -> None:
    """A class map may differ from the reference on PyTorch's logits only where ONNX Runtime's own
    logits decide the other way (a near tie), and only at a tiny fraction of the pixels."""
    task = TaskSpec("seg", "segmentation", 2).info()
    outputs = contract_kind("segmentation").graph_outputs(task, (10, 100))
    torch_raw = np.zeros((1, 2, 10, 100), np.float32)
    torch_raw[:, 0] = 1.0  # class 0 everywhere
    ort_raw = torch_raw.copy()
    ort_raw[0, 1, 0, 0] = 1.0 + 1e-6  # one pixel: a tie broken the other way by rounding
    got = {o.name: reference_fields(task, ort_raw)[o.field] if o.field != RAW else ort_raw for o in outputs}
    got["seg_probabilities_fp16"] = got["seg_probabilities_fp16"].astype(np.float16)
    (check,) = [c for c in task_checks(task, outputs, got, torch_raw, 1, atol=1e-3, rtol=1e-4)
                if isinstance(c, ExactCheck)]
    assert (check.wrong, check.flipped, check.allowed, check.passed) == (0, 1, 1, True)
    many = copy.deepcopy(got)
    many["seg_raw"][0, 1, :2] = 1.0 + 1e-6  # 200 flips: far more than float rounding explains
    many.update({o.name: reference_fields(task, many["seg_raw"])[o.field] for o in outputs if o.name == "seg"})
    (check,) = [c for c in task_checks(task, outputs, many, torch_raw, 1, atol=1e-3, rtol=1e-4)
                if isinstance(c, ExactCheck)]
    assert check.flipped == 200 and not check.passed
    wrong = copy.deepcopy(got)
    wrong["seg"] = wrong["seg"].copy()
    wrong["seg"][0, 5, 5] = 1  # the graph decides otherwise than the reference on its own logits
    (check,) = [c for c in task_checks(task, outputs, wrong, torch_raw, 1, atol=1e-3, rtol=1e-4)
                if isinstance(c, ExactCheck)]
    assert check.wrong == 1 and not check.passed
