"""A run ends with a compact model, model.onnx and manifest.json; the compact/export commands redo
that for an existing run; --finetune trains the compact model without the regulariser."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnxruntime as ort
import pytest
import torch

from training.artifacts import load_run_model
from training.compact import main as compact_main
from training.compaction import load_compact
from training.export.__main__ import main as export_main
from training.run import main as run_main

ARGS = ["--dataset", "synthetic-scenes", "--encoder", "tiny", "--image-size", "32", "48", "--train-samples", "24",
        "--val-samples", "8", "--batch-size", "8", "--lr", "0.003", "--epochs", "2", "--lam", "8"]


@pytest.fixture(scope="module")
def sparse_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "sparse"
    assert run_main([*ARGS, "--out", str(out)]) == 0
    return out


def test_run_ends_with_compact_onnx_and_manifest(sparse_run, capsys):
    for name in ("compact/config.json", "compact/model.safetensors", "compact/plan.json", "model.onnx",
                 "manifest.json"):
        assert (sparse_run / name).is_file(), name
    manifest = json.loads((sparse_run / "manifest.json").read_text())
    sparsity = json.loads((sparse_run / "sparsity.json").read_text())
    assert sparsity["groups_zero"] > 0
    assert manifest["complexity"]["parameters"] < sparsity["dense_parameters"]  # channels were removed
    # ONNX Runtime on the exported file (the final graph: uint8 pixels in, each task's raw output as
    # TASK_raw) computes what the sparse (uncompacted) PyTorch model computes on the pixels / 255
    dense, _ = load_run_model(sparse_run)
    pixels = torch.randint(0, 256, (3, 32, 48, 3), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    x = pixels.permute(0, 3, 1, 2).float() / 255
    session = ort.InferenceSession(str(sparse_run / "model.onnx"), providers=["CPUExecutionProvider"])
    got = dict(zip([o.name for o in session.get_outputs()], session.run(None, {"image": pixels.numpy()}),
                   strict=True))
    with torch.no_grad():
        want = dense(x)
    for task, value in want.items():
        assert np.abs(got[f"{task}_raw"] - value.numpy()).max() <= 1e-4 * max(1.0, float(value.abs().max())), task
    assert manifest["graph"]["input_dtype"] == "uint8"


def test_run_exports_the_graph_its_config_names(sparse_run, tmp_path):
    """--export-graph raw writes the raw graph (float32 images in, head outputs named by task) and
    a manifest without a graph section; the export command's --float-input the final graph on floats."""
    run = tmp_path / "copy"
    shutil.copytree(sparse_run, run)
    assert run_main(["--resume", str(run), "--export-graph", "raw"]) == 0
    manifest = json.loads((run / "manifest.json").read_text())
    assert "graph" not in manifest and manifest["input"]["dtype"] == "float32"
    assert [o["name"] for o in manifest["io_spec"]["outputs"]] == [t["name"] for t in manifest["tasks"]]
    assert export_main([str(run), "--float-input"]) == 0
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["graph"]["input_dtype"] == "float32" and manifest["input"]["layout"] == "NCHW"
    with pytest.raises(SystemExit):  # one graph at a time
        export_main([str(run), "--float-input", "--raw-outputs"])


def test_compact_and_export_commands_rebuild_the_artifacts(sparse_run, tmp_path):
    run = tmp_path / "copy"
    shutil.copytree(sparse_run, run)
    shutil.rmtree(run / "compact")
    (run / "model.onnx").unlink()
    assert compact_main([str(run), "--round-to", "1"]) == 0
    plan = json.loads((run / "compact" / "plan.json").read_text())
    assert plan["round_to"] == 1
    assert export_main([str(run)]) == 0
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["model_config"] == load_compact(run / "compact").config.to_dict()


def test_commands_explain_a_missing_run(tmp_path, capsys):
    assert compact_main([str(tmp_path / "nope")]) == 2
    assert f"run directory {tmp_path / 'nope'} does not exist" in capsys.readouterr().err
    assert export_main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {tmp_path} holds no checkpoint") and "training.run directory" in err
    assert not list(tmp_path.iterdir())  # nothing written, not even a staging folder


def test_finetune_starts_from_the_compact_model(sparse_run, tmp_path):
    out = tmp_path / "ft"
    assert run_main(["--finetune", str(sparse_run), "--epochs", "1", "--out", str(out), "--no-export"]) == 0
    config = json.loads((sparse_run / "compact" / "config.json").read_text())
    from training.checkpoint import load_checkpoint

    ck = load_checkpoint(out / "checkpoint-final.pt")
    assert ck["model_config"]["encoder"] == config["encoder"]  # the compact widths
    assert json.loads((out / "sparsity.json").read_text())["lambda"] == 0.0
    assert run_main(["--finetune", str(sparse_run), "--encoder", "resnet18", "--out", str(tmp_path / "x")]) == 2
