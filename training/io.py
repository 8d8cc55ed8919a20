"""Atomic writes of PyTorch objects; every other atomic write lives in `parsimony.io`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from parsimony.io import staged


def atomic_torch_save(path: Path, obj: Any) -> None:
    """``torch.save(obj, path)`` through a staged file: a resumed run never reads half a checkpoint."""
    import torch

    with staged(Path(path)) as tmp:
        torch.save(obj, tmp)
