"""A compacted model on disk: ``config.json`` + ``model.safetensors`` + ``plan.json``, no pickle.

The config is the architecture (STYLE habit 2): `load_compact` rebuilds the model from
``config.json`` with `build_model` and fills it from ``model.safetensors`` (a plain tensor file,
read with safetensors, never ``torch.load``). ``plan.json`` records how the model was derived
from its dense source. Each file is written to a temporary name and renamed into place.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from training.compaction.apply import compacted_config
from training.compaction.plan import CompactionPlan
from training.io import atomic_write_json, staged
from training.models.config import ModelConfig
from training.models.multitask import MultiTaskModel
from training.models.registry import build_model
from training.sparsity.trace import unwrap

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
PLAN_FILE = "plan.json"


def save_compact(model: nn.Module, plan: CompactionPlan, directory: str | Path) -> Path:
    """Write ``model`` (the result of ``apply_plan(source, plan)``) and ``plan`` to ``directory``.

    Refuses a model whose config is not the one ``plan`` produces. Returns the directory.
    """
    model = unwrap(model)
    expected = compacted_config(plan)
    if model.config != expected:
        raise ValueError(
            "save_compact: the model's config is not the one this plan produces; "
            "pass the model returned by apply_plan(source, plan)"
        )
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with staged(directory / WEIGHTS_FILE) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    atomic_write_json(directory / PLAN_FILE, plan.to_dict())
    atomic_write_json(directory / CONFIG_FILE, model.config.to_dict())
    return directory


def load_compact(directory: str | Path) -> MultiTaskModel:
    """Rebuild the model from ``config.json`` and load ``model.safetensors`` (eval mode, CPU)."""
    directory = Path(directory)
    config = load_config(directory / CONFIG_FILE)
    model = build_model(config)
    path = directory / WEIGHTS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"compacted weights not found: {path}")
    try:
        state = load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{path} is not a readable safetensors file: {e}") from e
    _check_state(model, state, path)
    model.load_state_dict(state, strict=True)
    return model.eval()


def load_config(path: Path) -> ModelConfig:
    """A `ModelConfig` from a JSON file; errors name the file."""
    data = _read_json(path, "model config")
    try:
        return ModelConfig.from_dict(data)
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path} is not a valid model config: {e!r}") from e


def load_plan(directory: str | Path) -> CompactionPlan:
    """The `CompactionPlan` saved next to a compacted model."""
    path = Path(directory) / PLAN_FILE
    try:
        return CompactionPlan.from_dict(_read_json(path, "compaction plan"))
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from e


def _read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def _check_state(model: nn.Module, state: dict, path: Path) -> None:
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in state.items()}
    missing, unexpected = sorted(expected.keys() - found.keys()), sorted(found.keys() - expected.keys())
    shapes = sorted(k for k in expected.keys() & found.keys() if expected[k] != found[k])
    if missing or unexpected or shapes:
        raise ValueError(
            f"{path} does not match the config next to it: missing {missing[:5]}, unexpected "
            f"{unexpected[:5]}, wrong shapes {[(k, found[k], expected[k]) for k in shapes[:5]]}"
        )
