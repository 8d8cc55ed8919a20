"""Load torchvision ResNet weights into a width-explicit `ResNetEncoder` (never downloads).

Key mapping (torchvision -> ours)::

    conv1.*, bn1.*                      -> stem.0.conv.*, stem.0.bn.*
    layerK.I.{conv,bn}J.*               -> stages.{K-1}.I.{conv,bn}J.*
    layerK.I.downsample.{0,1}.*         -> stages.{K-1}.I.downsample.{0,1}.*
    fc.*                                -> ignored

BatchNorm running statistics are copied too. Encoders with a deep stem or ResNet-D shortcuts have
no torchvision counterpart and are refused.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from training.models.encoder import ResNetEncoder


class PretrainedMismatch(ValueError):
    """A weights file does not fit the encoder; the message names the key and how to fix it."""


def load_torchvision_resnet(model_or_encoder: nn.Module, path: str | Path) -> list[str]:
    """Copy a torchvision ResNet state dict (.pth/.pt or .safetensors) into the encoder.

    ``model_or_encoder`` is a `ResNetEncoder` or a model with an ``encoder`` attribute. Returns the
    names (relative to ``model_or_encoder``) of every parameter and buffer that was loaded.
    """
    encoder = _find_encoder(model_or_encoder)
    _check_compatible(encoder)
    source = read_state_dict(path)
    state = _map_state(encoder, source, str(path))
    encoder.load_state_dict(state, strict=True)
    prefix = "" if encoder is model_or_encoder else "encoder."
    return [prefix + k for k in state]


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """A plain tensor dict from ``.safetensors`` or a pickle-free ``torch.load`` (weights_only)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"weights file {path} does not exist (nothing is downloaded; pass a local file)"
        )
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    obj = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):  # common checkpoint wrappers
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise PretrainedMismatch(f"{path} holds a {type(obj).__name__}, expected a state dict of tensors")
    return obj


def torchvision_key(key: str) -> str:
    """Our encoder state-dict key -> the torchvision ResNet key holding the same tensor."""
    if key.startswith("stem.0.conv."):
        return "conv1." + key[len("stem.0.conv.") :]
    if key.startswith("stem.0.bn."):
        return "bn1." + key[len("stem.0.bn.") :]
    if key.startswith("stages."):
        _, k, rest = key.split(".", 2)
        return f"layer{int(k) + 1}.{rest}"
    raise KeyError(f"no torchvision counterpart for encoder key {key!r}")


def _find_encoder(module: nn.Module) -> ResNetEncoder:
    if isinstance(module, ResNetEncoder):
        return module
    encoder = getattr(module, "encoder", None)
    if isinstance(encoder, ResNetEncoder):
        return encoder
    raise TypeError(
        f"expected a ResNetEncoder or a model with an `encoder` attribute, got {type(module).__name__}"
    )


def _check_compatible(encoder: ResNetEncoder) -> None:
    cfg = encoder.config
    if len(cfg.stem) != 1:
        raise PretrainedMismatch(
            f"the encoder has a deep stem {cfg.stem}; torchvision ResNets have a single 7x7 stem conv, "
            "so there are no weights for it: train from scratch or use a 7x7-stem encoder (e.g. 'resnet50-os8')"
        )
    if cfg.avg_down:
        raise PretrainedMismatch(
            "the encoder uses ResNet-D (avg_down) shortcuts, which torchvision ResNets lack: "
            "train from scratch or use an encoder with avg_down=False"
        )
    if len(cfg.stages) != 4:
        raise PretrainedMismatch(f"torchvision ResNets have 4 stages, the encoder has {len(cfg.stages)}")


def _map_state(encoder: ResNetEncoder, source: dict[str, Tensor], where: str) -> dict[str, Tensor]:
    state: dict[str, Tensor] = {}
    missing: list[str] = []
    for key, target in encoder.state_dict().items():
        tv_key = torchvision_key(key)
        if tv_key not in source:
            missing.append(tv_key)
            continue
        value = source[tv_key]
        if tuple(value.shape) != tuple(target.shape):
            raise PretrainedMismatch(
                f"{where}: {tv_key} (our {key}) has shape {tuple(value.shape)} in the file but "
                f"{tuple(target.shape)} in the encoder; build the encoder with the checkpoint's widths "
                "(e.g. the matching registered torchvision-width encoder) or do not load these weights"
            )
        state[key] = value.to(target.dtype)
    if missing:
        raise PretrainedMismatch(
            f"{where} lacks {len(missing)} key(s) the encoder needs, e.g. {missing[:5]}; "
            "is it a torchvision ResNet state dict with the same depth?"
        )
    _check_unexpected(source, {torchvision_key(k) for k in state}, where)
    return state


def _check_unexpected(source: dict[str, Tensor], used: set[str], where: str) -> None:
    extra = sorted(k for k in source if k not in used and not k.startswith("fc."))
    if extra:
        raise PretrainedMismatch(
            f"{where} has {len(extra)} key(s) the encoder lacks, e.g. {extra[:5]}; "
            "the file has more blocks than the encoder: build an encoder of the same depth"
        )
