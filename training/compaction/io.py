"""A compacted model on disk: ``config.json`` + ``model.safetensors`` + ``plan.json``, no pickle.

The config is the architecture: `load_compact` rebuilds the model from
``config.json`` with `build_model` and fills it from ``model.safetensors`` (a plain tensor file,
read with safetensors, never ``torch.load``). ``plan.json`` records how the model was derived
from its dense source. Each file is written to a temporary name and renamed into place;
`training.compact` builds the whole folder aside and swaps it in. Readers check every field.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from parsimony.errors import InputFileError
from parsimony.files import Index, PositiveInt, Schema, read_json, validate
from parsimony.io import atomic_write_json, staged
from parsimony.layout import COMPACT_CONFIG_FILE as CONFIG_FILE
from parsimony.layout import PLAN_FILE, WEIGHTS_FILE
from training.compaction.apply import compacted_config
from training.compaction.plan import CompactionPlan
from training.inputs import build_model_from, check_state_dict, parse_model_config
from training.models.config import ModelConfig
from training.models.multitask import MultiTaskModel
from training.sparsity.trace import unwrap

__all__ = ["CONFIG_FILE", "PLAN_FILE", "WEIGHTS_FILE", "check_plan_describes", "load_compact", "load_config",
           "load_plan", "save_compact"]


class SpaceFile(Schema):
    name: str
    original_width: PositiveInt
    width: PositiveInt | None = None
    kept: list[Index] = Field(min_length=1)
    padding: list[Index] = Field(default_factory=list)
    producers: list[Annotated[list[str | None], Field(min_length=2, max_length=2)]] = Field(min_length=1)
    consumers: list[str] = Field(default_factory=list)
    head_consumers: list[str] = Field(default_factory=list)


class PlanFile(Schema):
    format: Literal["parsimony.compaction-plan/1"]
    mode: str
    round_to: PositiveInt
    source_config_sha256: str = ""
    source_config: dict
    spaces: list[SpaceFile] = Field(min_length=1)


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
    """Rebuild the model from ``config.json`` and load ``model.safetensors`` (eval mode, CPU).

    Both files are checked at the boundary: errors are `InputFileError` exceptions naming the file and field.
    """
    directory = Path(directory)
    config_path, path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    model = build_model_from(read_json(config_path, "compact model config"), config_path)
    if not path.is_file():
        raise InputFileError(f"{path}: compacted weights not found")
    try:
        state = load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise InputFileError(f"{path}: not a readable safetensors file ({e}); the file is truncated or corrupt") from None
    check_state_dict(model, state, path, config_path=config_path)
    model.load_state_dict(state, strict=True)
    return model.eval()


def load_config(path: Path) -> ModelConfig:
    """A `ModelConfig` from a JSON file; errors name the file and field."""
    return parse_model_config(read_json(path, "model config"), path)


def load_plan(directory: str | Path) -> CompactionPlan:
    """The `CompactionPlan` saved next to a compacted model."""
    path = Path(directory) / PLAN_FILE
    data = read_json(path, "compaction plan")
    validate(PlanFile, data, path)
    parse_model_config(data["source_config"], path, "source_config")
    try:
        return CompactionPlan.from_dict(data)
    except ValueError as e:
        raise InputFileError(f"{path}: {e}") from None


def check_plan_describes(plan: CompactionPlan, config: ModelConfig, directory: str | Path) -> None:
    """Refuse a ``plan.json`` that does not produce the ``config.json`` next to it."""
    path = Path(directory) / PLAN_FILE
    try:
        produced = compacted_config(plan)
    except (ValueError, KeyError) as e:
        raise InputFileError(f"{path}: field 'spaces': {e}") from None
    if produced != config:
        raise InputFileError(f"{path}: the plan does not produce {Path(directory) / CONFIG_FILE} (other widths, "
                             f"tasks or source config); the two files come from different compactions, "
                             f"re-run training.compact")
