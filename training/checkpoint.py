"""Checkpoints: written atomically, loaded without pickle (``weights_only=True``).

A checkpoint holds only tensors and plain Python values: the model's config (so it can be
rebuilt), model / loss / optimizer / scheduler / grad-scaler states, the position in training
(epoch, batch within the epoch, global step), early-stopping state and the epoch history.
A run keeps `LAST`, `BEST` and `FINAL` (the evaluated weights: the selected checkpoint with
penalty-mode groups finalised); their file names are `parsimony.layout`'s.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from parsimony.errors import InputFileError, field_error
from parsimony.layout import CHECKPOINT_BEST as BEST
from parsimony.layout import CHECKPOINT_FINAL as FINAL
from parsimony.layout import CHECKPOINT_LAST as LAST
from training.io import atomic_torch_save

__all__ = ["BEST", "FINAL", "LAST", "CheckpointError", "TrainProgress", "load_checkpoint", "save_checkpoint"]


class CheckpointError(InputFileError):
    """A checkpoint is missing, unreadable or lacks a field; the message names the file and field."""


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
    """A checkpoint with its format marker, ``model_config`` (a dict) and ``states.model`` (a dict
    of tensors) checked; what a caller reads beyond that it checks itself."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt or not a weights-only file: torch raises many types here
        raise CheckpointError(f"checkpoint {path} cannot be loaded safely: {exc}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != 1:
        raise CheckpointError(f"{path} is not a parsimony checkpoint (missing format marker)")
    _require(path, ckpt, "model_config", dict, "a dict (the model's config)")
    states = _require(path, ckpt, "states", dict, "a dict of state dicts")
    model = _require(path, states, "model", dict, "a dict of tensors (the model's state dict)", "states.")
    bad = [k for k, v in model.items() if not isinstance(k, str) or not torch.is_tensor(v)]
    if bad:
        raise _field_error(path, f"states.model.{bad[0]}", "expected a tensor")
    return ckpt


def _require(path: Path, d: dict, key: str, kind: type, expected: str, prefix: str = "") -> Any:
    if key not in d:
        raise _field_error(path, prefix + key, f"missing, expected {expected}")
    if not isinstance(d[key], kind):
        raise _field_error(path, prefix + key, f"expected {expected}, got a {type(d[key]).__name__}")
    return d[key]


def _field_error(path: Path, field: str, problem: str) -> CheckpointError:
    return CheckpointError(str(field_error(path, field, problem)))
