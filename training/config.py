"""Run configuration: pydantic models validated at the boundary (YAML file and command-line flags).

Precedence: code defaults, then the YAML file (``--config``), then flags. Unknown keys are
rejected everywhere. The resolved configuration is written to the run directory as
``config.yaml`` and is what ``--resume`` reads back.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from parsimony.errors import ConfigError  # invalid file or flags; importable from here too
from parsimony.io import atomic_write_text


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Strict):
    name: str = "synthetic-scenes"
    root: str | None = None
    image_size: tuple[int, int] | None = None
    train_samples: int | None = Field(default=None, ge=1)
    val_samples: int | None = Field(default=None, ge=1)
    test_samples: int | None = Field(default=None, ge=1)
    augment: bool = False
    options: dict[str, Any] = Field(default_factory=dict)
    num_workers: int = Field(default=0, ge=0)


class ModelSection(_Strict):
    encoder: str = "tiny"
    head: str | None = None
    head_width: int | None = Field(default=None, ge=1)
    pretrained: str | None = None
    init_from: str | None = Field(default=None, description="a compact model directory to start from (fine-tuning)")


class OptimConfig(_Strict):
    name: Literal["adam", "adamw", "sgd"] = "adamw"
    lr: float = Field(default=1e-3, gt=0)
    weight_decay: float = Field(default=1e-4, ge=0)
    momentum: float = Field(default=0.9, ge=0, lt=1)
    schedule: Literal["cosine", "step", "constant"] = "cosine"
    warmup_epochs: float = Field(default=0.0, ge=0)
    step_epochs: int = Field(default=10, ge=1)
    step_gamma: float = Field(default=0.1, gt=0, le=1)
    grad_clip: float | None = Field(default=None, gt=0)


class TrainConfig(_Strict):
    epochs: int = Field(default=10, ge=1)
    batch_size: int = Field(default=16, ge=1)
    eval_batch_size: int | None = Field(default=None, ge=1)
    task_weighting: Literal["equal", "uncertainty"] = "equal"
    early_stopping_patience: int | None = Field(default=None, ge=1)
    select: Literal["auto", "best", "last"] = Field(
        default="auto", description="weights evaluated at the end: best validation loss, the last epoch, or "
        "auto (best when dense, last when sparsifying, since earlier epochs are less sparse)")
    checkpoint_every: int = Field(default=0, ge=0, description="steps between mid-epoch checkpoints; 0: epoch ends only")
    log_every: int = Field(default=20, ge=1)
    export: bool = Field(default=True, description="compact and export ONNX at the end of the run")
    export_graph: Literal["final", "float-input", "raw"] = Field(
        default="final", description="the exported graph: final (uint8 pixels in, each task's answer out), "
        "float-input (the same on float32 [0, 1] images) or raw (float32 images in, head outputs out)")


class SparsityConfig(_Strict):
    """Channel group lasso on the shared encoder (``lam`` 0 disables it)."""

    lam: float = Field(default=0.0, ge=0, description="λ of λ·Σ_g sqrt(|g|)·‖W_g‖₂")
    mode: Literal["proximal", "penalty"] = "proximal"
    groups: Literal["channel", "paper"] = "channel"
    warmup_epochs: int = Field(default=0, ge=0, description="epochs trained densely before sparsifying")
    tolerance: float = Field(default=1e-6, ge=0, description="penalty mode: groups with ‖W_g‖₂ below count as zero")
    cooldown_epochs: int = Field(
        default=0, ge=0,
        description="last epochs trained without the regulariser, zero groups held at zero (prune, then fine-tune)",
    )
    target: str | None = Field(
        default=None, description="zero_groups=F, macs=R or latency_ms=T: reach it in one run, λ adapted "
        "by a controller (lam, if set, is the starting λ)")
    target_batch: int = Field(default=8, ge=1, description="batch of a latency_ms target's ONNX Runtime timing")
    target_threads: int | None = Field(default=None, ge=1, description="ONNX Runtime threads for latency_ms "
                                       "(default: ONNX Runtime's)")
    group_weight: Literal["size", "macs", "latency"] | None = Field(
        default=None, description="group-lasso weight: size (sqrt|g|), macs or latency saved per weight; "
        "default: the target's (macs for macs, latency for latency_ms), else size")

    @field_validator("target")
    @classmethod
    def _target_parses(cls, v: str | None) -> str | None:
        if v is None:
            return v
        from training.sparsity.targets import parse_target

        return str(parse_target(v))


class RunConfig(_Strict):
    dataset: DataConfig = Field(default_factory=DataConfig)
    tasks: list[str] | None = None
    model: ModelSection = Field(default_factory=ModelSection)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    sparsity: SparsityConfig = Field(default_factory=SparsityConfig)
    baseline: list[str] = Field(default_factory=list, description="single-task metrics.json files or run dirs for ΔMTL")
    seed: int = 0
    deterministic: bool = False
    device: str = "auto"
    amp: bool = True
    out: str = "runs/latest"

    @field_validator("tasks")
    @classmethod
    def _tasks_unique(cls, v: list[str] | None) -> list[str] | None:
        if v is not None and len(set(v)) != len(v):
            raise ValueError(f"task list {v} names a task twice")
        return v or None


def _deep_update(base: dict, update: dict) -> dict:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key != "options":
            out[key] = _deep_update(out[key], value)
        else:
            out[key] = value
    return out


def set_dotted(tree: dict, dotted: str, value: Any) -> None:
    """``set_dotted(d, "optim.lr", 0.1)`` sets ``d["optim"]["lr"]``, creating sections as needed."""
    *parents, leaf = dotted.split(".")
    node = tree
    for key in parents:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"cannot set {dotted!r}: {key!r} is not a section")
    node[leaf] = value


def apply_set_items(tree: dict, items: list[str], example: str = "train.epochs=4") -> dict:
    """Apply ``--set KEY=VALUE`` items (VALUE parsed as YAML) to ``tree`` in place."""
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set {example}")
        key, raw = item.split("=", 1)
        set_dotted(tree, key.strip(), yaml.safe_load(raw))
    return tree


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level, got {type(data).__name__}")
    return data


def resolve_config(file_values: dict | None = None, overrides: dict | None = None) -> RunConfig:
    """Defaults, then ``file_values``, then ``overrides`` (both nested dicts)."""
    merged = _deep_update(file_values or {}, overrides or {})
    try:
        return RunConfig.model_validate(merged)
    except ValidationError as exc:
        raise ConfigError(_explain(exc)) from None


def _explain(exc: ValidationError) -> str:
    lines = ["invalid configuration:"]
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; see `python -m training.run --help`)"
        lines.append(f"  {where}: {msg}")
    return "\n".join(lines)


def dump_config(config: RunConfig, path: str | Path) -> None:
    atomic_write_text(Path(path), yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
