"""Checkpoints: written atomically, loaded without pickle (``weights_only=True``).

A checkpoint holds only tensors and plain Python values: the model's config (so it can be
rebuilt), model / loss / optimizer / scheduler / grad-scaler states, the position in training
(epoch, batch within the epoch, global step), early-stopping state and the epoch history.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from training.io import atomic_torch_save

LAST = "checkpoint-last.pt"
BEST = "checkpoint-best.pt"
FINAL = "checkpoint-final.pt"  # the evaluated weights (best, with penalty-mode groups finalised)


class CheckpointError(ValueError):
    """A checkpoint is missing or unreadable; the message names the file."""


@dataclass
class TrainProgress:
    """Where training stands. ``batch`` counts the batches of ``epoch`` already trained."""

    epoch: int = 0
    batch: int = 0
    global_step: int = 0
    best_val_loss: float = float("inf")
    best_epoch: int = -1
    bad_epochs: int = 0
    history: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return dict(self.__dict__)

    @classmethod
    def from_dict(cls, d: dict) -> TrainProgress:
        return cls(**d)


def save_checkpoint(path: Path, *, model_config: dict, states: dict[str, Any], progress: TrainProgress) -> None:
    atomic_torch_save(path, {"format": 1, "model_config": model_config, "states": states,
                             "progress": progress.to_dict()})


def load_checkpoint(path: Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt or not a weights-only file
        raise CheckpointError(f"checkpoint {path} cannot be loaded safely: {exc}") from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") != 1:
        raise CheckpointError(f"{path} is not a parsimony checkpoint (missing format marker)")
    return ckpt
