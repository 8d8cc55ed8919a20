"""Where things live on disk: a training run's directory, an export inside it, and a model
repository's versions. Every tool that reads or writes these names takes them from here.

A run directory (``python -m training.run``)::

    RUN/config.yaml            the run's configuration (as given, with defaults filled in)
    RUN/metrics.json           final metrics, the image size trained at, parameters, MACs
    RUN/history.jsonl          one line per epoch
    RUN/checkpoint-{last,best,final}.pt
    RUN/compact/               the compacted model (config.json, model.safetensors, plan.json)
    RUN/model.onnx             the exported graph of RUN/compact (``python -m training.export``)
    RUN/manifest.json          what that graph computes and how it was made

A model repository (``python -m serving.convert``), as Triton reads it::

    REPO/NAME/config.pbtxt
    REPO/NAME/VERSION/model.onnx  (or model.plan), manifest.json
"""

from __future__ import annotations

from pathlib import Path

# a run directory
CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.json"
HISTORY_FILE = "history.jsonl"
CHECKPOINT_LAST = "checkpoint-last.pt"
CHECKPOINT_BEST = "checkpoint-best.pt"
CHECKPOINT_FINAL = "checkpoint-final.pt"
COMPACT_DIR = "compact"

# a compact model folder
COMPACT_CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
PLAN_FILE = "plan.json"

# an export (in a compact folder or a model version)
ONNX_FILE = "model.onnx"
MANIFEST_FILE = "manifest.json"

# a model repository
MODEL_CONFIG_FILE = "config.pbtxt"
TENSORRT_FILE = "model.plan"


def version_numbers(model_dir: str | Path) -> list[int]:
    """The versions in a model's folder (sub-folders named by a positive integer), ascending;
    [] when the folder does not exist."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        return []
    found = (int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit())
    return sorted(v for v in found if v > 0)


def newest_version(model_dir: str | Path) -> int | None:
    """The highest version in a model's folder (what Triton's default ``latest`` policy serves)."""
    present = version_numbers(model_dir)
    return present[-1] if present else None


def export_files(folder: str | Path) -> tuple[Path, Path]:
    """``(model.onnx, manifest.json)`` of an export folder."""
    folder = Path(folder)
    return folder / ONNX_FILE, folder / MANIFEST_FILE
