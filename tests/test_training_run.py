"""`python -m training.run` end to end on tiny synthetic data: run directory contents, kill-and-resume
equivalence, and a two-process DistributedDataParallel run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from training.checkpoint import load_checkpoint
from training.config import RunConfig
from training.distributed import DistInfo
from training.engine import evaluate
from training.run import main
from training.trainer import build_run, load_weights, loader

TINY = ["--dataset", "synthetic-scenes", "--encoder", "tiny", "--image-size", "32", "48",
        "--train-samples", "24", "--val-samples", "8", "--batch-size", "8", "--lr", "0.003", "--no-export"]


def _run_cli(args: list[str], env: dict | None = None, module: str = "training.run",
             launcher: list[str] | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, *(launcher or []), "-m", module, *args]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(cmd, capture_output=True, text=True, env=full_env, timeout=600,
                          cwd=Path(__file__).resolve().parents[1])


def test_run_directory_contents(tmp_path, capsys):
    out = tmp_path / "run"
    assert main([*TINY, "--epochs", "2", "--out", str(out), "--seed", "1"]) == 0
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert RunConfig.model_validate(cfg).train.epochs == 2  # the resolved config round-trips
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == [0, 1]
    for name in ("checkpoint-last.pt", "checkpoint-best.pt"):
        ck = load_checkpoint(out / name)  # weights_only load
        assert "encoder" in ck["model_config"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["tasks"]) == {"segmentation", "depth", "normal"}
    assert set(metrics["trivial"]) == set(metrics["tasks"])
    assert metrics["parameters"] > 0 and metrics["macs"] > 0
    printed = capsys.readouterr().out
    assert "beats trivial" in printed and "miou" in printed


def test_refuses_to_overwrite_and_reports_bad_input(tmp_path, capsys):
    out = tmp_path / "run"
    assert main([*TINY, "--epochs", "1", "--out", str(out)]) == 0
    assert main([*TINY, "--epochs", "1", "--out", str(out)]) == 2
    assert "--resume" in capsys.readouterr().err
    assert main([*TINY, "--tasks", "colour", "--out", str(tmp_path / "x")]) == 2
    assert "unknown task" in capsys.readouterr().err
    assert main(["--dataset", "nyuv2", "--data-root", str(tmp_path / "missing"), "--out", str(tmp_path / "y")]) == 2
    assert str(tmp_path / "missing") in capsys.readouterr().err


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(run_dir / "checkpoint-last.pt")["states"]["model"]


@pytest.mark.slow  # three training processes
def test_sigkill_mid_epoch_then_resume_matches_uninterrupted(tmp_path):
    common = [*TINY, "--epochs", "2", "--deterministic", "--checkpoint-every", "1", "--seed", "5",
              "--task-weighting", "uncertainty", "--lam", "2"]
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    assert _run_cli([*common, "--out", str(ref)]).returncode == 0
    # 3 batches per epoch, a checkpoint after every step: the kill right after step 5 (batch 2 of
    # epoch 1) loses that step; the run resumes from the checkpoint after batch 1 of epoch 1.
    proc = _run_cli([*common, "--out", str(killed)], env={"PARSIMONY_KILL_AT_STEP": "5"})
    assert proc.returncode == -signal.SIGKILL
    progress = load_checkpoint(killed / "checkpoint-last.pt")["progress"]
    assert (progress["epoch"], progress["batch"]) == (1, 1)
    resumed = _run_cli(["--resume", str(killed)])
    assert resumed.returncode == 0, resumed.stderr
    a, b = _weights(ref), _weights(killed)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ from the uninterrupted run"
    hist = (killed / "history.jsonl").read_text().splitlines()
    assert [json.loads(h)["epoch"] for h in hist] == [0, 1]


@pytest.mark.slow  # a two-process torchrun
def test_two_process_ddp_reduces_metrics_exactly(tmp_path):
    out = tmp_path / "ddp"
    proc = _run_cli([*TINY, "--epochs", "2", "--out", str(out), "--task-weighting", "uncertainty", "--lam", "30"],
                    launcher=["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    hist = (out / "history.jsonl").read_text().splitlines()
    assert len(hist) == 2
    assert json.loads((out / "sparsity.json").read_text())["groups_zero"] > 0  # ranks agreed on these zeros
    # Evaluate the same checkpoint in one process: the two-rank reduction must give the same numbers.
    cfg = RunConfig.model_validate(yaml.safe_load((out / "config.yaml").read_text()))
    run = build_run(cfg, out, DistInfo(), torch.device("cpu"))
    load_weights(run.model, out / "checkpoint-best.pt")
    single, _ = evaluate(run.model, run.loss, loader(run, "test"), run.tasks, run.device, run.ctx.autocast)
    for task, values in single.items():
        for name, value in values.items():
            assert metrics["tasks"][task][name] == pytest.approx(value, rel=1e-5, abs=1e-6), (task, name)


@pytest.mark.parametrize("dataset", ["synthetic-faces", "nyuv2", "celebamask-hq"])
def test_same_command_on_other_data_sets(tmp_path, dataset):
    from format_fixtures import write_celebamask, write_nyuv2

    args = ["--dataset", dataset, "--encoder", "tiny", "--image-size", "32", "32", "--epochs", "1",
            "--batch-size", "2", "--out", str(tmp_path / "run"), "--no-export"]
    if dataset == "nyuv2":
        args += ["--data-root", str(write_nyuv2(tmp_path / "nyu"))]
    elif dataset == "celebamask-hq":
        args += ["--data-root", str(write_celebamask(tmp_path / "celeba"))]
    else:
        args += ["--train-samples", "8", "--val-samples", "4"]
    assert main(args) == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    expected = {"nyuv2": {"segmentation", "depth", "normal"}}.get(dataset, {"segmentation", "attributes"})
    assert set(metrics["tasks"]) == expected
    if "attributes" in expected:  # the paper's selection: 3-class segmentation + Male + Smiling
        assert "Male_acc" in metrics["tasks"]["attributes"] and "Smiling_f1" in metrics["tasks"]["attributes"]


def test_pretrained_torchvision_weights_initialise_the_encoder(tmp_path):
    torchvision = pytest.importorskip("torchvision")
    reference = torchvision.models.resnet18()
    path = tmp_path / "resnet18.pth"
    torch.save(reference.state_dict(), path)
    out = tmp_path / "run"
    assert main([*TINY, "--encoder", "resnet18", "--epochs", "1", "--lr", "1e-12", "--optimizer", "sgd",
                 "--pretrained", str(path), "--out", str(out)]) == 0
    trained = load_checkpoint(out / "checkpoint-last.pt")["states"]["model"]
    # with a vanishing learning rate the stem conv is still the torchvision one
    assert torch.allclose(trained["encoder.stem.0.conv.weight"], reference.conv1.weight, atol=1e-6)


def test_delta_mtl_against_single_task_baselines(tmp_path):
    runs = {}
    for tasks in ("segmentation", "depth", "segmentation,depth"):
        runs[tasks] = tmp_path / tasks.replace(",", "+")
        extra = ["--baseline", str(runs["segmentation"]), str(runs["depth"])] if "," in tasks else []
        assert main([*TINY, "--epochs", "1", "--tasks", tasks, "--out", str(runs[tasks]), *extra]) == 0
    metrics = json.loads((runs["segmentation,depth"] / "metrics.json").read_text())
    from training.metrics import delta_mtl
    from training.tasks import TaskSpec

    tasks = [TaskSpec.from_dict(t) for t in metrics["task_specs"]]
    assert metrics["delta_mtl"] == pytest.approx(delta_mtl(metrics["tasks"], metrics["baseline"]["tasks"], tasks))
    assert metrics["baseline"]["tasks"]["depth"]["abs_err"] == json.loads(
        (runs["depth"] / "metrics.json").read_text())["tasks"]["depth"]["abs_err"]


@pytest.mark.parametrize("mode", ["proximal", "penalty"])
def test_group_sparsity_run_reports_zero_groups(tmp_path, mode):
    out = tmp_path / mode
    lam = {"proximal": "30", "penalty": "1"}[mode]
    # plain SGD on the penalty oscillates around zero within about lr·λ·sqrt(|g|): the tolerance
    # at the end decides which groups count as (and are set to) zero.
    extra = ["--optimizer", "sgd", "--lr", "0.01", "--set", "optim.momentum=0",
             "--set", "sparsity.tolerance=0.1"] if mode == "penalty" else []
    assert main([*TINY, "--epochs", "2", "--lam", lam, "--sparsity-mode", mode, "--out", str(out), *extra]) == 0
    report = json.loads((out / "sparsity.json").read_text())
    assert report["lambda"] == float(lam) and report["reg_mode"] == mode
    if mode == "penalty":
        assert report["finalized_groups"] == report["groups_zero"]  # none were exactly zero before
    assert 0 < report["groups_zero"] <= report["groups_total"]
    assert report["compact_macs"] < report["dense_macs"]
    assert (out / "sparsity.png").stat().st_size > 0
    # the zeros are real: the evaluated weights hold exactly-zero producer filters
    weights = load_checkpoint(out / "checkpoint-final.pt")["states"]["model"]
    convs = [w for k, w in weights.items() if k.startswith("encoder.") and k.endswith("weight") and w.dim() == 4]
    zero_filters = sum(int((w.flatten(1).abs().amax(1) == 0).sum()) for w in convs)
    assert zero_filters >= report["groups_zero"]  # every zero group has at least one exactly-zero filter
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert "pct_zero_groups" in history[-1]["sparsity"]


def test_warmup_keeps_the_model_dense(tmp_path):
    out = tmp_path / "warm"
    assert main([*TINY, "--epochs", "1", "--lam", "30", "--sparsity-warmup", "1", "--out", str(out)]) == 0
    assert json.loads((out / "sparsity.json").read_text())["groups_zero"] == 0
