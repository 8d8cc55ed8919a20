"""Files a user hands to the offline tools, checked at the boundary before anything is computed.

`training.compact` and `training.export` read a run directory's ``config.yaml``, ``metrics.json``
and checkpoint, and a compact model's ``config.json``, ``model.safetensors`` and ``plan.json``.
Any of them can be missing, truncated or hand-edited. Every reader here refuses such a file with
an `InputFileError` whose message names the file, the field and what was expected, e.g.::

    runs/demo/metrics.json: field 'image_size': expected a list of two positive integers [H, W], got '32x48'

so the commands can print one line and exit with status 2, writing nothing. Anything else that
escapes is a bug and keeps its traceback.

The generic pieces (the error, `read_json`, `validate`, the strict `Schema`) are `parsimony.errors`
and `parsimony.files`; this module holds the schemas of a run's files and the checks that need the
model (PyTorch is imported only inside the functions that check tensors).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from parsimony.errors import ConfigError, InputFileError, field_error, shown
from parsimony.files import PositiveInt, Schema, read_json, read_mapping, validate
from parsimony.tasks import kind_names

if TYPE_CHECKING:
    from torch import nn

    from training.models.config import ModelConfig
    from training.models.multitask import MultiTaskModel

__all__ = ["InputFileError", "build_model_from", "check_state_dict", "image_size_from_metrics", "parse_model_config",
           "read_yaml"]


def read_yaml(path: str | Path, what: str) -> dict:
    """The YAML mapping in ``path`` (safe loader: plain values only)."""
    import yaml

    return read_mapping(Path(path), what, "YAML", yaml.safe_load, (yaml.YAMLError,))


# --- schemas of the files a run holds ------------------------------------------------------------


class TaskFile(Schema):
    name: str = Field(min_length=1)
    kind: str
    channels: PositiveInt
    labels: list[str] = Field(default_factory=list)

    @field_validator("kind")
    @classmethod
    def _registered(cls, value: str) -> str:
        if value not in kind_names():
            raise ValueError(f"unknown task kind {value!r}; use one of {list(kind_names())}")
        return value


class StageFile(Schema):
    out: PositiveInt
    blocks: list[Annotated[list[PositiveInt], Field(min_length=1)]] = Field(min_length=1)
    stride: PositiveInt = 1
    dilation: PositiveInt = 1
    downsample: bool = False
    first_dilation: PositiveInt | None = None


class EncoderFile(Schema):
    block: Literal["basic", "bottleneck"]
    stem: list[PositiveInt] = Field(min_length=1)
    stages: list[StageFile] = Field(min_length=1)
    stem_pool: bool = True
    avg_down: bool = False
    in_channels: PositiveInt = 3


class HeadFile(Schema):
    task: TaskFile
    arch: str
    widths: list[PositiveInt] = Field(min_length=1)
    rates: list[PositiveInt] = Field(default_factory=list)


class ModelConfigFile(Schema):
    """A width-explicit model config as ``ModelConfig.to_dict`` writes it."""

    encoder: EncoderFile
    heads: list[HeadFile] = Field(min_length=1)
    input_mean: list[float] = Field(default=[0.485, 0.456, 0.406], min_length=3, max_length=3)
    input_std: list[Annotated[float, Field(gt=0)]] = Field(default=[0.229, 0.224, 0.225], min_length=3, max_length=3)
    name: str = ""


class MetricsFile(BaseModel):
    """The part of ``metrics.json`` the offline tools read (the rest is for people)."""

    model_config = ConfigDict(strict=True, extra="allow")
    image_size: Annotated[list[PositiveInt], Field(min_length=2, max_length=2)]


def parse_model_config(data: Any, path: str | Path, field: str = "") -> ModelConfig:
    """A `ModelConfig` from a plain dict read from ``path`` (``field``: where in the file it sits)."""
    from training.models.config import ModelConfig

    validate(ModelConfigFile, data, path, field)
    try:
        return ModelConfig.from_dict(data)
    except ValueError as exc:  # consistent types, inconsistent widths or labels
        raise field_error(path, field or None, f"not a valid model config: {exc}") from None


def build_model_from(data: Any, path: str | Path, field: str = "") -> MultiTaskModel:
    """`parse_model_config`, then build the model (which refuses e.g. an unknown head arch)."""
    from training.models.registry import build_model

    config = parse_model_config(data, path, field)
    try:
        return build_model(config)
    except ConfigError as exc:
        raise field_error(path, field or None, f"not a valid model config: {exc}") from None


def image_size_from_metrics(path: Path) -> tuple[int, int]:
    """The ``[H, W]`` a run trained at, from its ``metrics.json``."""
    data = read_json(path, "metrics file")
    try:
        h, w = MetricsFile.model_validate(data).image_size
    except ValidationError:
        raise field_error(path, "image_size", f"expected a list of two positive integers [H, W], got "
                                              f"{shown(data.get('image_size', '(missing)'))}") from None
    return h, w


def check_state_dict(model: nn.Module, state: Mapping, path: str | Path, field: str = "",
                     config_path: str | Path | None = None) -> None:
    """Refuse tensors that ``model.load_state_dict(state, strict=True)`` would refuse, would convert
    silently (another dtype), or that hold inf/NaN; errors name ``path`` and the tensor (and
    ``config_path``, the file the model was built from, when that is another file)."""
    import torch

    prefix = f"{field}." if field else ""
    config = f"the model config in {config_path}" if config_path else "the model config"
    expected = model.state_dict()
    not_tensors = sorted(str(k) for k, v in state.items() if not torch.is_tensor(v))
    if not_tensors:
        raise field_error(path, prefix + not_tensors[0], "expected a tensor")
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    if missing or unexpected:
        raise field_error(path, field or None, f"the tensors do not match {config}: missing {missing[:5]}, "
                                               f"unexpected {unexpected[:5]}")
    for key, want in expected.items():
        got = state[key]
        if tuple(got.shape) != tuple(want.shape) or got.dtype != want.dtype:
            raise field_error(path, prefix + key, f"{config} expects a {want.dtype} tensor of shape "
                                                  f"{tuple(want.shape)}, got {got.dtype} {tuple(got.shape)}")
        if got.is_floating_point() and not bool(torch.isfinite(got).all()):
            raise field_error(path, prefix + key, "holds inf or NaN values; the file is corrupt")
