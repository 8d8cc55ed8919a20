"""The multi-task network: one shared encoder pass, one head per task.

Inputs are images in [0, 1]; the model normalises them itself (``config.input_mean`` /
``config.input_std``). The default export wraps it to take uint8 pixels and return final answers
(`training.export.final_graph`); a raw export takes [0, 1] images as the model does. The normalisation constants are
non-persistent buffers: they follow ``.to(device)`` but are not in the state dict, whose only
source of truth for them is the config.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from training.models.config import ConfigError, ModelConfig
from training.models.encoder import ResNetEncoder
from training.models.heads import build_head


def validate_model_config(config: ModelConfig) -> None:
    """Checks that span the encoder and heads (per-part checks live with the parts)."""
    if not config.heads:
        raise ConfigError("model config has no heads; list at least one task head")
    names = [h.task.name for h in config.heads]
    if len(set(names)) != len(names):
        raise ConfigError(f"task names must be unique, got {names}")
    bad = [n for n in names if not n or "." in n]
    if bad:
        raise ConfigError(f"task names {bad} cannot be module keys (empty or containing '.')")
    channels = config.encoder.in_channels
    if len(config.input_mean) != channels or len(config.input_std) != channels:
        raise ConfigError(
            f"input_mean/input_std need {channels} values (encoder in_channels), "
            f"got {len(config.input_mean)} and {len(config.input_std)}"
        )
    if min(config.input_std) <= 0:
        raise ConfigError(f"input_std must be positive, got {config.input_std}")


class MultiTaskModel(nn.Module):
    """``forward(x) -> {task name: output}`` with ``x`` float ``[N, C, H, W]`` in [0, 1].

    Output layouts per task kind are listed in `training.tasks`. ``heads`` is keyed by task name
    in ``config.heads`` order; a single-task model is a config with one head.
    """

    input_mean: Tensor
    input_std: Tensor

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        validate_model_config(config)
        self.config = config
        self.register_buffer("input_mean", _channel_vector(config.input_mean), persistent=False)
        self.register_buffer("input_std", _channel_vector(config.input_std), persistent=False)
        self.encoder = ResNetEncoder(config.encoder)
        self.heads = nn.ModuleDict(
            {
                h.task.name: build_head(h, self.encoder.out_channels, self.encoder.output_stride)
                for h in config.heads
            }
        )

    @property
    def task_names(self) -> tuple[str, ...]:
        return tuple(h.task.name for h in self.config.heads)

    def normalize(self, x: Tensor) -> Tensor:
        return (x - self.input_mean) / self.input_std

    def forward_features(self, x: Tensor) -> Tensor:
        """Normalise a [0, 1] image batch and run the shared encoder once."""
        return self.encoder(self.normalize(x))

    def forward_heads(self, features: Tensor, image_size: tuple[int, int]) -> dict[str, Tensor]:
        """Every task head on the shared features; dense outputs come back at ``image_size``."""
        return {name: head(features, image_size) for name, head in self.heads.items()}

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        image_size = (x.shape[-2], x.shape[-1])
        return self.forward_heads(self.forward_features(x), image_size)


def _channel_vector(values: tuple[float, ...]) -> Tensor:
    return torch.tensor(values, dtype=torch.float32).view(1, -1, 1, 1)
