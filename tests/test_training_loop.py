"""The training loop's control logic: early stopping, learning-rate schedules, which checkpoint is
evaluated and exported (``train.select``), gradient clipping, grad-scaler skipped steps, the fault
injection hook, the command's error handling; and a GPU smoke run (one epoch of the demo config with
AMP, then the export) wherever CUDA is present."""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import training.trainer as trainer
from training.checkpoint import BEST, LAST, load_checkpoint
from training.compact import main as compact_main
from training.config import resolve_config
from training.distributed import DistInfo
from training.engine import StepContext, TrainStep, _optimizer_step
from training.export.__main__ import main as export_main
from training.export.manifest import load_manifest, verify_onnx_digest
from training.finish import _selected_checkpoint
from training.run import main
from training.sparsity import GroupLasso

TINY = ["--dataset", "synthetic-scenes", "--encoder", "tiny", "--image-size", "32", "48",
        "--train-samples", "24", "--val-samples", "8", "--batch-size", "8", "--lr", "0.003"]


def _scripted_validation(monkeypatch, losses: list[float]) -> list[int]:
    """Replace the validation loss of epoch i by ``losses[i]`` (metrics stay real); returns the
    list of epochs validated."""
    real = trainer.evaluate
    seen: list[int] = []

    def scripted(*args, **kwargs):
        metrics, _ = real(*args, **kwargs)
        seen.append(len(seen))
        return metrics, losses[len(seen) - 1]

    monkeypatch.setattr(trainer, "evaluate", scripted)
    return seen


def _model_state(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path)["states"]["model"]


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --- early stopping and train.select -----------------------------------------------------------


@pytest.mark.parametrize("select", ["best", "last"])
def test_early_stopping_stops_at_the_right_epoch_and_uses_the_selected_weights(tmp_path, monkeypatch, select):
    # best at epoch 1; epochs 2 and 3 do not improve: patience 2 stops after epoch 3 (of 10)
    seen = _scripted_validation(monkeypatch, [1.0, 0.5, 0.7, 0.6, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1])
    out = tmp_path / select
    assert main([*TINY, "--epochs", "10", "--patience", "2", "--set", f"train.select={select}", "--no-export",
                 "--out", str(out)]) == 0
    assert seen == [0, 1, 2, 3]
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == [0, 1, 2, 3]
    assert history[-1].get("early_stop") is True and not any(h.get("early_stop") for h in history[:-1])
    progress = load_checkpoint(out / LAST)["progress"]
    assert (progress["best_epoch"], progress["epoch"], progress["bad_epochs"]) == (1, 4, 2)
    metrics = json.loads((out / "metrics.json").read_text())
    assert (metrics["checkpoint"], metrics["best_epoch"], metrics["epochs_trained"]) == (select, 1, 4)
    final, best, last = (_model_state(out / n) for n in ("checkpoint-final.pt", BEST, LAST))
    assert not _same(best, last)
    assert _same(final, best if select == "best" else last)
    if select == "best":  # the export is of the selected weights (what `--export` runs, less the speed table)
        assert compact_main([str(out)]) == 0 and export_main([str(out)]) == 0
        manifest = load_manifest(out)
        verify_onnx_digest(manifest, out / "model.onnx")
        assert manifest.source_checkpoint["sha256"] == hashlib.sha256(
            (out / "checkpoint-final.pt").read_bytes()).hexdigest()


@pytest.mark.parametrize(("select", "lam", "target", "best_exists", "expected"), [
    ("auto", 0.0, None, True, "best"),   # dense: the best validation loss
    ("auto", 0.1, None, True, "last"),   # sparsifying: earlier epochs are less sparse
    ("auto", 0.0, "zero_groups=0.5", True, "last"),  # a sparsity target sets λ itself
    ("best", 0.1, None, True, "best"),
    ("last", 0.0, None, True, "last"),
    ("best", 0.0, None, False, "last"),  # no best checkpoint written (e.g. a NaN validation loss)
])
def test_select_picks_the_checkpoint(tmp_path, select, lam, target, best_exists, expected):
    if best_exists:
        (tmp_path / BEST).write_bytes(b"")
    run = SimpleNamespace(run_dir=tmp_path, config=SimpleNamespace(
        train=SimpleNamespace(select=select), sparsity=SimpleNamespace(lam=lam, target=target)))
    assert _selected_checkpoint(run) == expected


# --- learning-rate schedules -------------------------------------------------------------------


def _formula(schedule: str, step: int, *, spe: int, epochs: int, warmup_epochs: float, step_epochs: int,
             gamma: float) -> float:
    warmup = int(warmup_epochs * spe)
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    if schedule == "step":
        return gamma ** ((step // spe) // step_epochs)
    total = epochs * spe - warmup
    return 0.5 * (1 + math.cos(math.pi * min(step - warmup, total) / total))


@pytest.mark.parametrize("schedule", ["cosine", "step", "constant"])
@pytest.mark.parametrize("warmup", [0.0, 1.5])
def test_learning_rate_per_step_follows_the_formula(tmp_path, schedule, warmup):
    epochs, lr = 5, 0.01
    cfg = resolve_config({}, {"dataset": {"image_size": [32, 48], "train_samples": 32, "val_samples": 4},
                              "model": {"encoder": "tiny"}, "train": {"epochs": epochs, "batch_size": 8},
                              "optim": {"lr": lr, "schedule": schedule, "warmup_epochs": warmup, "step_epochs": 2,
                                        "step_gamma": 0.5}, "out": str(tmp_path)})
    run = trainer.build_run(cfg, tmp_path, DistInfo(), torch.device("cpu"))
    spe = run.batches_per_epoch
    assert spe == 4
    for step in range(epochs * spe + 2):  # two steps past the end: cosine stays at 0
        expected = lr * _formula(schedule, step, spe=spe, epochs=epochs, warmup_epochs=warmup, step_epochs=2,
                                 gamma=0.5)
        assert run.ctx.optimizer.param_groups[0]["lr"] == pytest.approx(expected, rel=1e-9, abs=1e-15), step
        run.ctx.optimizer.step()
        run.ctx.scheduler.step()


def test_the_loop_steps_the_schedule_once_per_optimizer_step(tmp_path):
    out = tmp_path / "run"
    assert main([*TINY, "--epochs", "2", "--no-export", "--out", str(out)]) == 0
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    spe, epochs = 3, 2  # 24 samples, batch 8
    for h in history:  # the lr logged at the end of an epoch is the schedule's at global step `step`
        assert h["step"] == (h["epoch"] + 1) * spe
        expected = 0.003 * 0.5 * (1 + math.cos(math.pi * min(h["step"], epochs * spe) / (epochs * spe)))
        assert h["lr"] == pytest.approx(expected, abs=1e-12)


# --- one optimizer step: clipping and skipped steps ---------------------------------------------


class _Quadratic(torch.nn.Module):
    """loss = scale * sum(w^2): gradients as large as wanted, and inf on request."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.arange(1.0, 9.0))

    def forward(self, batch):
        loss = batch["scale"] * (self.w ** 2).sum()
        return loss, {"quadratic": loss.detach()}


def _context(model: torch.nn.Module, *, scaler: torch.amp.GradScaler | None = None, grad_clip=None,
             regularizer=None) -> StepContext:
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    return StepContext(optimizer=optimizer, scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0),
                       scaler=scaler or torch.amp.GradScaler("cpu", enabled=False),
                       autocast=contextlib.nullcontext,
                       grad_clip=grad_clip, regularizer=regularizer)


@pytest.mark.parametrize("clip", [0.5, 3.0])
def test_clipping_bounds_the_gradient_norm(clip):
    model = _Quadratic()
    ctx = _context(model, grad_clip=clip)
    _optimizer_step(model, {"scale": torch.tensor(100.0)}, ctx)
    norm = torch.linalg.vector_norm(model.w.grad)
    assert norm <= clip * (1 + 1e-6)
    assert norm == pytest.approx(clip, rel=1e-5)  # the raw norm (about 2e3) was scaled down to the bound
    unclipped = _Quadratic()
    _optimizer_step(unclipped, {"scale": torch.tensor(100.0)}, _context(unclipped))
    assert torch.linalg.vector_norm(unclipped.w.grad) > 1000


def test_a_skipped_scaler_step_leaves_weights_regulariser_and_counters_consistent():
    """inf gradients: the grad scaler skips the optimizer step and halves its scale; the weights
    (and the proximal step of the regulariser) stay put; the schedule still advances, one step per
    batch, so it stays in line with the loop's global step; the next finite step trains."""
    from training.models import create_model
    from training.sparsity import build_groups
    from training.tasks import TaskSpec

    model = create_model(encoder="tiny", tasks=(TaskSpec("depth", "depth", 1),))
    loss = _DepthLoss()
    step = TrainStep(model, loss)
    reg = GroupLasso(build_groups(model), lam=1.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    ctx = _context(model, scaler=scaler, regularizer=reg)
    image = torch.rand(2, 3, 32, 32)
    batch = {"image": image, "depth": torch.rand(2, 1, 32, 32)}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    bad = {**batch, "image": image.clone().index_put_((torch.tensor(0),), torch.tensor(float("inf")))}
    _optimizer_step(step, bad, ctx)
    assert scaler.get_scale() == 2.0**9
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items() if k.endswith("weight"))
    assert all(not s for s in ctx.optimizer.state.values())  # AdamW took no step: no moments, no count
    assert ctx.scheduler.last_epoch == 1
    _optimizer_step(step, batch, ctx)
    assert scaler.get_scale() == 2.0**9
    assert ctx.scheduler.last_epoch == 2
    moved = [k for k, v in model.state_dict().items() if k.endswith("weight") and not torch.equal(v, before[k])]
    assert moved
    steps = {float(s["step"]) for s in ctx.optimizer.state.values()}
    assert steps == {1.0}  # exactly one real optimizer step


class _DepthLoss(torch.nn.Module):
    def forward(self, outputs, batch):
        loss = (outputs["depth"] - batch["depth"]).abs().mean()
        return loss, {"depth": loss.detach()}


# --- the fault-injection hook and the command's errors -------------------------------------------


def test_kill_hook_reads_the_environment_once_not_every_step(tmp_path, monkeypatch):
    trainer._kill_step.cache_clear()
    reads = []
    real = trainer.os.environ.get

    def counting(key, default=None):
        if key == "PARSIMONY_KILL_AT_STEP":
            reads.append(key)
        return real(key, default)

    monkeypatch.setattr(trainer.os.environ, "get", counting)
    assert main([*TINY, "--epochs", "2", "--no-export", "--out", str(tmp_path / "run")]) == 0
    assert len(reads) == 1  # 6 steps, one read
    trainer._kill_step.cache_clear()


def test_a_bug_keeps_its_traceback(tmp_path, monkeypatch):
    """Only the project's error types become one-line exits; a KeyError from a bug propagates."""
    def buggy(*args, **kwargs):
        return {}["missing"]

    monkeypatch.setattr("training.run.fit", buggy)
    with pytest.raises(KeyError, match="missing"):
        main([*TINY, "--epochs", "1", "--no-export", "--out", str(tmp_path / "run")])


def test_user_errors_are_one_line_exits(tmp_path, capsys):
    bad = tmp_path / "metrics.json"
    bad.write_text('{"tasks": "not a mapping"}')
    assert main([*TINY, "--epochs", "1", "--no-export", "--out", str(tmp_path / "run"), "--baseline", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {bad}: field 'tasks'") and "Traceback" not in err
    if not torch.cuda.is_available():  # a device this machine lacks is a flag error
        assert main([*TINY, "--device", "cuda", "--out", str(tmp_path / "x")]) == 2
        assert capsys.readouterr().err.startswith("error: --device cuda was asked for")


# --- GPU --------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_smoke_one_epoch_of_the_demo_with_amp_then_export(tmp_path):
    out = tmp_path / "demo"
    assert main(["--config", "configs/demo.yaml", "--epochs", "1", "--sparsity-cooldown", "0", "--device", "cuda",
                 "--amp", "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["epochs_trained"] == 1
    assert all(math.isfinite(v) for task in metrics["tasks"].values() for v in task.values())
    manifest = load_manifest(out)
    verify_onnx_digest(manifest, out / "model.onnx")
    assert manifest.input.size == [64, 96]
