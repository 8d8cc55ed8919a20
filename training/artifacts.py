"""Where a run's artifacts live, and loading the weights a run's numbers were measured on."""

from __future__ import annotations

from pathlib import Path

import torch

from parsimony.errors import InputFileError
from parsimony.files import validate
from parsimony.layout import COMPACT_DIR, CONFIG_FILE, MANIFEST_FILE, METRICS_FILE, ONNX_FILE
from training.checkpoint import BEST, FINAL, LAST, CheckpointError, load_checkpoint
from training.config import RunConfig
from training.inputs import build_model_from, check_state_dict, image_size_from_metrics, read_yaml
from training.models.multitask import MultiTaskModel

__all__ = ["COMPACT_DIR", "MANIFEST_FILE", "ONNX_FILE", "check_finite_outputs", "final_checkpoint", "load_run_config",
           "load_run_model", "run_image_size"]


def final_checkpoint(run_dir: Path) -> Path:
    """checkpoint-final.pt (the evaluated weights), else the best, else the last checkpoint."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"run directory {run_dir} does not exist")
    for name in (FINAL, BEST, LAST):
        if (run_dir / name).is_file():
            return run_dir / name
    raise CheckpointError(f"{run_dir} holds no checkpoint ({FINAL}, {BEST} or {LAST}); "
                          f"is it a training.run directory?")


def load_run_model(run_dir: Path) -> tuple[MultiTaskModel, Path]:
    """The model of ``run_dir`` with its final weights, in eval mode, and the checkpoint it came from."""
    path = final_checkpoint(run_dir)
    ckpt = load_checkpoint(path)
    model = build_model_from(ckpt["model_config"], path, "model_config")
    check_state_dict(model, ckpt["states"]["model"], path, "states.model")
    model.load_state_dict(ckpt["states"]["model"])
    return model.eval(), path


def run_image_size(run_dir: Path) -> tuple[int, int]:
    """The input size the run trained at (recorded in metrics.json; else from its data set)."""
    metrics = Path(run_dir) / METRICS_FILE
    if metrics.is_file():
        return image_size_from_metrics(metrics)
    cfg = load_run_config(run_dir)
    if cfg.dataset.image_size:
        return tuple(cfg.dataset.image_size)
    from training.trainer import build_datasets  # the data set's native size

    return build_datasets(cfg)[1].image_size


def load_run_config(run_dir: Path) -> RunConfig:
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist; is {run_dir} a training.run directory?")
    return validate(RunConfig, read_yaml(path, "run config"), path)


@torch.no_grad()
def check_finite_outputs(model: torch.nn.Module, image_size: tuple[int, int], source: Path) -> None:
    """Refuse weights that overflow to inf/NaN on an image in [0, 1] (finite but corrupt values)."""
    x = torch.rand(1, 3, *image_size, generator=torch.Generator().manual_seed(0))
    bad = sorted(k for k, v in model.eval()(x).items() if not bool(torch.isfinite(v).all()))
    if bad:
        raise InputFileError(f"{source}: the weights give inf or NaN for output(s) {bad} on an image in [0, 1]; "
                             f"the file is corrupt")
