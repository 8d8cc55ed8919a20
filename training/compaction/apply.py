"""Phase two of compaction: rewrite the config, rebuild, and copy the kept channels' weights.

`apply_plan` is pure: it builds a new `MultiTaskModel` from the rewritten config (the config is
the architecture) and fills it by slicing the source's state dict; the source
model is never modified. Encoder conv weights become ``W[out_kept][:, in_kept]``, conv biases and
BN weight/bias/running stats ``[kept]`` (``num_batches_tracked`` is copied), the heads' input
convs (``input_convs()``) ``W[:, kept of the encoder output]``; every other tensor is copied as is.

Config rewriting maps each producer conv to the width it sets (encoder module layout, see
`training.models.encoder`): ``stem.i.conv`` -> ``stem[i]``, a block's ``conv{n}`` -> its n-th inner
width, the block's last conv and the projection shortcut -> the stage's ``out``. A stream space that
includes the stem's last conv therefore sets both ``stem[-1]`` and that stage's ``out``.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from training.compaction.plan import CompactionPlan, SpacePlan, config_hash, plan_compaction
from training.models.config import EncoderConfig, ModelConfig
from training.models.multitask import MultiTaskModel
from training.models.registry import build_model
from training.sparsity.trace import unwrap

Slot = tuple  # ("stem", i) | ("inner", stage, block, n) | ("out", stage)
_STEM = re.compile(r"encoder\.stem\.(\d+)\.conv")
_BLOCK_CONV = re.compile(r"encoder\.stages\.(\d+)\.(\d+)\.conv(\d+)")
_SHORTCUT = re.compile(r"encoder\.stages\.(\d+)\.0\.downsample\.\d+")
_BN_LEAVES = ("weight", "bias", "running_mean", "running_var")


def compact(
    model: nn.Module, *, mode: str = "channel", round_to: int = 8
) -> tuple[MultiTaskModel, CompactionPlan]:
    """Plan and apply in one call: ``(compacted model, plan)``; ``model`` is left untouched."""
    plan = plan_compaction(model, mode=mode, round_to=round_to)
    return apply_plan(model, plan), plan


def apply_plan(model: nn.Module, plan: CompactionPlan) -> MultiTaskModel:
    """A new, narrower model computing what ``model`` computes (``model`` is not modified).

    Raises ValueError when the plan was made for another config or does not fit the model's
    modules. The new model has the source's device, float dtype and train/eval mode.
    """
    model = unwrap(model)
    check_plan(model, plan)
    param = next(model.parameters())
    new = build_model(compacted_config(plan)).to(device=param.device, dtype=param.dtype)
    new.load_state_dict(sliced_state_dict(model, plan), strict=True)
    new.train(model.training)
    return new


def compacted_config(plan: CompactionPlan) -> ModelConfig:
    """The source config with every encoder width replaced by its space's new width."""
    source = ModelConfig.from_dict(plan.source_config)
    enc = source.encoder
    widths: dict[Slot, int] = {}
    for space in plan.spaces:
        for conv, _ in space.producers:
            slot = _slot(conv, enc)
            if widths.setdefault(slot, space.width) != space.width:
                raise ValueError(
                    f"compaction plan: {conv} gets two widths ({widths[slot]} and {space.width})"
                )
    missing = [s for s in _all_slots(enc) if s not in widths]
    if missing:
        raise ValueError(f"compaction plan sets no width for encoder slot(s) {missing}; re-plan the model")
    stem = tuple(widths[("stem", i)] for i in range(len(enc.stem)))
    stages = tuple(
        dataclasses.replace(
            st,
            out=widths[("out", k)],
            blocks=tuple(
                tuple(widths[("inner", k, j, n)] for n in range(len(b))) for j, b in enumerate(st.blocks)
            ),
        )
        for k, st in enumerate(enc.stages)
    )
    return dataclasses.replace(source, encoder=dataclasses.replace(enc, stem=stem, stages=stages))


def _slot(conv: str, enc: EncoderConfig) -> Slot:
    """The config width written by encoder conv ``conv`` (a qualified module name)."""
    if m := _STEM.fullmatch(conv):
        slot: Slot = ("stem", int(m[1]))
    elif m := _SHORTCUT.fullmatch(conv):
        slot = ("out", int(m[1]))
    elif m := _BLOCK_CONV.fullmatch(conv):
        k, j, n = int(m[1]), int(m[2]), int(m[3]) - 1
        inner = len(enc.stages[k].blocks[j]) if k < len(enc.stages) and j < len(enc.stages[k].blocks) else -1
        slot = ("out", k) if n == inner else ("inner", k, j, n)
    else:
        raise ValueError(f"compaction plan: {conv} is not an encoder conv of the documented layout")
    if slot not in _all_slots(enc):
        raise ValueError(f"compaction plan: {conv} has no width in the encoder config")
    return slot


def _all_slots(enc: EncoderConfig) -> set[Slot]:
    slots: set[Slot] = {("stem", i) for i in range(len(enc.stem))}
    for k, st in enumerate(enc.stages):
        slots.add(("out", k))
        slots |= {("inner", k, j, n) for j, b in enumerate(st.blocks) for n in range(len(b))}
    return slots


# --- checks -----------------------------------------------------------------------------------


def check_plan(model: nn.Module, plan: CompactionPlan) -> None:
    """Refuse a plan made for another config, or whose modules and widths do not fit ``model``."""
    if not isinstance(plan, CompactionPlan):
        raise TypeError(f"expected a CompactionPlan, got {type(plan).__name__}")
    config = getattr(model, "config", None)
    if config is None:
        raise TypeError("apply_plan needs a MultiTaskModel (a model with a width-explicit .config)")
    digest = config_hash(config.to_dict())
    if digest != plan.source_hash:
        raise ValueError(
            f"compaction plan was made for another model config (sha256 {plan.source_hash[:12]}, this model "
            f"{digest[:12]}, name {config.name!r}); re-plan with plan_compaction(model)"
        )
    modules = dict(model.named_modules())
    for space in plan.spaces:
        _check_space(space, modules)
    _check_coverage(model, plan)


def _check_space(space: SpacePlan, modules: Mapping[str, nn.Module]) -> None:
    def get(name: str, kind: type[nn.Module]) -> nn.Module:
        module = modules.get(name)
        if not isinstance(module, kind):
            raise ValueError(
                f"compaction plan space {space.name!r}: the model has no {kind.__name__} {name!r}"
            )
        return module

    widths = []
    for conv, bn in space.producers:
        widths.append((conv, get(conv, nn.Conv2d).out_channels))
        if bn is not None:
            widths.append((bn, get(bn, nn.BatchNorm2d).num_features))
    widths += [(c, get(c, nn.Conv2d).in_channels) for c in space.consumers + space.head_consumers]
    wrong = [(n, w) for n, w in widths if w != space.original_width]
    if wrong:
        raise ValueError(
            f"compaction plan space {space.name!r} has {space.original_width} channels but the model's "
            f"{wrong} disagree; re-plan with plan_compaction(model)"
        )


def _check_coverage(model: nn.Module, plan: CompactionPlan) -> None:
    """Every encoder conv/BN is produced by one space; the head input convs are all listed."""
    names = {id(m): n for n, m in model.named_modules()}
    produced = [m for s in plan.spaces for p in s.producers for m in p if m is not None]
    encoder = [
        f"encoder.{n}" for n, m in model.encoder.named_modules() if isinstance(m, (nn.Conv2d, nn.BatchNorm2d))
    ]
    if sorted(produced) != sorted(encoder):
        extra, missing = sorted(set(produced) - set(encoder)), sorted(set(encoder) - set(produced))
        raise ValueError(
            f"compaction plan does not cover the encoder once: missing {missing}, unknown or repeated {extra}"
        )
    heads = sorted(names[id(c)] for head in model.heads.values() for c in head.input_convs())
    listed = sorted(c for s in plan.spaces for c in s.head_consumers)
    if heads != listed:
        raise ValueError(f"compaction plan lists head input convs {listed}, the model has {heads}")


# --- weights ----------------------------------------------------------------------------------


def sliced_state_dict(model: nn.Module, plan: CompactionPlan) -> dict[str, Tensor]:
    """The source state dict with every tensor cut down to the kept channels (new tensors)."""
    out_of: dict[str, list[int]] = {}  # conv/BN -> kept output channels
    in_of: dict[str, list[int]] = {}  # conv -> kept input channels
    for space in plan.spaces:
        for conv, bn in space.producers:
            out_of[conv] = list(space.kept)
            if bn is not None:
                out_of[bn] = list(space.kept)
        for conv in space.consumers + space.head_consumers:
            in_of[conv] = list(space.kept)
    state = {}
    for key, value in model.state_dict().items():
        module, _, leaf = key.rpartition(".")
        source = value = value.detach()
        if module in out_of and leaf in _BN_LEAVES:
            value = value.index_select(0, _index(out_of[module], value))
        if module in in_of and leaf == "weight":
            value = value.index_select(1, _index(in_of[module], value))
        state[key] = value.clone() if value is source else value
    return state


def _index(kept: list[int], like: Tensor) -> Tensor:
    return torch.tensor(kept, dtype=torch.long, device=like.device)
