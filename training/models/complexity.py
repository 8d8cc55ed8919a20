"""Parameter and multiply-accumulate (MAC) counts.

A MAC is one multiply-add, so MACs are half the FLOPs that
``torch.utils.flop_counter.FlopCounterMode`` reports (it counts a multiply-add as 2 FLOPs). Counted
with forward hooks on a real forward pass:

- ``nn.Conv2d``: output elements x (in_channels / groups) x kh x kw,
- ``nn.Linear``: output elements x in_features.

Biases, BatchNorm, activations, pooling, additions and upsampling are not counted (as in
FlopCounterMode, fvcore and thop); ``count_macs`` reports MACs, not FLOPs.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn


def count_parameters(module: nn.Module, *, trainable_only: bool = False) -> int:
    """Number of parameter elements (shared parameters counted once)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def _layer_macs(module: nn.Module, output: Tensor) -> int:
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        return output.numel() * (module.in_channels // module.groups) * kh * kw
    if isinstance(module, nn.Linear):
        return output.numel() * module.in_features
    return 0


def macs_by_module(
    model: nn.Module, image_size: tuple[int, int] = (224, 224), batch: int = 1, in_channels: int | None = None
) -> dict[str, int]:
    """MACs of every Conv2d and Linear module (by qualified name) for one forward pass.

    Runs ``model`` in eval mode under ``torch.no_grad`` on a zero image ``[batch, C, H, W]``
    (``C`` from ``model.config.encoder.in_channels`` when present, else 3) and restores the
    training flag afterwards.
    """
    counts: dict[str, int] = {}
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            handles.append(module.register_forward_hook(_make_hook(name, counts)))
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(_dummy_input(model, image_size, batch, in_channels))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return counts


def count_macs(
    model: nn.Module, image_size: tuple[int, int] = (224, 224), batch: int = 1, in_channels: int | None = None
) -> int:
    """Total multiply-accumulates of Conv2d and Linear layers for one forward pass (see module doc)."""
    return sum(macs_by_module(model, image_size, batch, in_channels).values())


def macs_by_prefix(counts: dict[str, int], depth: int = 1) -> dict[str, int]:
    """Aggregate ``macs_by_module`` by the first ``depth`` name components (e.g. 'encoder', 'heads.seg')."""
    out: dict[str, int] = {}
    for name, macs in counts.items():
        key = ".".join(name.split(".")[:depth])
        out[key] = out.get(key, 0) + macs
    return out


def _make_hook(name: str, counts: dict[str, int]) -> Any:
    def hook(module: nn.Module, inputs: Any, output: Tensor) -> None:
        counts[name] = counts.get(name, 0) + _layer_macs(module, output)

    return hook


def _dummy_input(
    model: nn.Module, image_size: tuple[int, int], batch: int, in_channels: int | None
) -> Tensor:
    if in_channels is None:
        config = getattr(model, "config", None)
        encoder = getattr(config, "encoder", config)
        in_channels = getattr(encoder, "in_channels", 3)
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    return torch.zeros(batch, in_channels, *image_size, device=device, dtype=dtype)
