"""Where a run's artifacts live, and loading the weights a run's numbers were measured on."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from training.checkpoint import BEST, FINAL, LAST, CheckpointError, load_checkpoint
from training.config import RunConfig
from training.models import build_model
from training.models.config import ModelConfig
from training.models.multitask import MultiTaskModel

COMPACT_DIR = "compact"
ONNX_FILE = "model.onnx"
MANIFEST_FILE = "manifest.json"


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
    model = build_model(ModelConfig.from_dict(ckpt["model_config"]))
    model.load_state_dict(ckpt["states"]["model"])
    return model.eval(), path


def run_image_size(run_dir: Path) -> tuple[int, int]:
    """The input size the run trained at (recorded in metrics.json; else from its data set)."""
    metrics = Path(run_dir) / "metrics.json"
    if metrics.is_file():
        h, w = json.loads(metrics.read_text())["image_size"]
        return int(h), int(w)
    cfg = load_run_config(run_dir)
    if cfg.dataset.image_size:
        return tuple(cfg.dataset.image_size)
    from training.trainer import build_datasets  # the data set's native size

    return build_datasets(cfg)[1].image_size


def load_run_config(run_dir: Path) -> RunConfig:
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist; is {run_dir} a training.run directory?")
    return RunConfig.model_validate(yaml.safe_load(path.read_text()))
