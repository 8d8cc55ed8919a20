"""Atomic writes of PyTorch objects. Everything else about atomic writes lives in `parsimony.io`
(re-exported here for the modules and benchmarks that still import it from this one)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from parsimony.io import (
    append_jsonl,
    atomic_write_json,
    atomic_write_text,
    fsync_dir,
    readable_mode,
    replace_dir,
    staged,
    staging_dir,
)

__all__ = ["append_jsonl", "atomic_torch_save", "atomic_write_json", "atomic_write_text", "fsync_dir",
           "readable_mode", "replace_dir", "staged", "staging_dir"]


def atomic_torch_save(path: Path, obj: Any) -> None:
    """``torch.save(obj, path)`` through a staged file: a resumed run never reads half a checkpoint."""
    import torch

    with staged(Path(path)) as tmp:
        torch.save(obj, tmp)
