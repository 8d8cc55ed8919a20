"""Task heads, built from a `HeadConfig` through a small registry of head architectures.

Every head is called as ``head(features, image_size)``. Dense heads compute a low-resolution map,
upsample it bilinearly (align_corners=False) to ``image_size`` and pass it through the task kind's
`head_output` (``normal`` L2-normalises per pixel; the other kinds leave it as it is: logits or
raw values). The attributes head returns logits ``[N, A]`` and ignores ``image_size``. The task
kind is a Python constant fixed at construction, so the forward pass has no control flow on
tensor values (ONNX-friendly). Which archs a kind may use, the kind says (`TrainingKind.heads`).

Each head lists, in ``input_convs()``, the convs that read the encoder features: compaction of
the encoder's output channels must slice their input channels.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from training import kinds as task_kinds
from training.kinds.normal import unit_vectors
from training.models.config import ConfigError, HeadConfig
from training.models.layers import ConvBNAct, conv2d, init_weights

__all__ = ["ASPPHead", "DenseHead", "HeadArch", "LightHead", "PoolLinearHead", "available_heads", "build_head",
           "default_aspp_rates", "head_arch", "register_head", "unit_vectors", "validate_head_config"]


class DenseHead(nn.Module):
    """Base of dense heads: subclasses implement ``predict`` (features -> low-res map)."""

    def __init__(self, task_kind: str) -> None:
        super().__init__()
        self.task_kind = task_kind

    def predict(self, features: Tensor) -> Tensor:
        raise NotImplementedError

    def input_convs(self) -> list[nn.Conv2d]:
        raise NotImplementedError

    def forward(self, features: Tensor, image_size: tuple[int, int]) -> Tensor:
        out = F.interpolate(self.predict(features), size=image_size, mode="bilinear", align_corners=False)
        return task_kinds.kind(self.task_kind).head_output(out)


class LightHead(DenseHead):
    """``widths = (hidden,)``: 3x3 ConvBNAct, then a 1x1 conv (with bias) to the task channels."""

    def __init__(self, config: HeadConfig, in_channels: int, output_stride: int) -> None:
        super().__init__(config.task.kind)
        (hidden,) = config.widths
        self.conv = ConvBNAct(in_channels, hidden, 3)
        self.classifier = conv2d(hidden, config.task.channels, 1, bias=True)

    def predict(self, features: Tensor) -> Tensor:
        return self.classifier(self.conv(features))

    def input_convs(self) -> list[nn.Conv2d]:
        return [self.conv.conv]


class ImagePool(nn.Module):
    """ASPP image-pooling branch: global average pool, 1x1 conv (with bias) + ReLU, broadcast back.

    Unlike torchvision's DeepLab-v3 it has no BatchNorm: BN over a 1x1 map fails in training
    with batch size 1 (a single value per channel). Broadcasting a 1x1 map equals bilinear
    upsampling of it, and exports as a plain Expand.
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = conv2d(in_channels, out_channels, 1, bias=True)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        pooled = self.act(self.conv(F.adaptive_avg_pool2d(x, 1)))
        return pooled.expand(-1, -1, x.shape[-2], x.shape[-1])


class ASPP(nn.Module):
    """DeepLab-v3 atrous spatial pyramid pooling: 1x1 + three atrous 3x3 + image pool, then project."""

    def __init__(self, in_channels: int, branch: int, project: int, rates: tuple[int, ...]) -> None:
        super().__init__()
        self.branches = nn.ModuleList(
            [ConvBNAct(in_channels, branch, 1)]
            + [ConvBNAct(in_channels, branch, 3, dilation=r) for r in rates]
        )
        self.image_pool = ImagePool(in_channels, branch)
        self.project = ConvBNAct(branch * (len(rates) + 2), project, 1)

    def forward(self, x: Tensor) -> Tensor:
        outs = [b(x) for b in self.branches] + [self.image_pool(x)]
        return self.project(torch.cat(outs, dim=1))


class ASPPHead(DenseHead):
    """``widths = (branch, project)``: ASPP -> 3x3 ConvBNAct(project) -> 1x1 conv to the task channels.

    torchvision's DeepLabHead also drops out (p=0.5) after the projection; we do not.
    """

    def __init__(self, config: HeadConfig, in_channels: int, output_stride: int) -> None:
        super().__init__(config.task.kind)
        branch, project = config.widths
        rates = config.rates or default_aspp_rates(output_stride)
        self.aspp = ASPP(in_channels, branch, project, tuple(rates))
        self.conv = ConvBNAct(project, project, 3)
        self.classifier = conv2d(project, config.task.channels, 1, bias=True)

    def predict(self, features: Tensor) -> Tensor:
        return self.classifier(self.conv(self.aspp(features)))

    def input_convs(self) -> list[nn.Conv2d]:
        return [b.conv for b in self.aspp.branches] + [self.aspp.image_pool.conv]


class PoolLinearHead(nn.Module):
    """``widths = (hidden,)``: 3x3 ConvBNAct, global average pool, linear to the attribute logits."""

    def __init__(self, config: HeadConfig, in_channels: int, output_stride: int) -> None:
        super().__init__()
        (hidden,) = config.widths
        self.task_kind = config.task.kind
        self.conv = ConvBNAct(in_channels, hidden, 3)
        self.fc = nn.Linear(hidden, config.task.channels)

    def input_convs(self) -> list[nn.Conv2d]:
        return [self.conv.conv]

    def forward(self, features: Tensor, image_size: tuple[int, int]) -> Tensor:
        del image_size  # attribute logits do not depend on the image size
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.conv(features), 1), 1))


def default_aspp_rates(output_stride: int) -> tuple[int, int, int]:
    """DeepLab-v3 rates: (6, 12, 18) at output stride 16, doubled at 8, halved at 32."""
    return tuple(max(1, r * 16 // output_stride) for r in (6, 12, 18))  # type: ignore[return-value]


# --- registry ---------------------------------------------------------------------------------

HeadBuilder = Callable[[HeadConfig, int, int], nn.Module]


@dataclass(frozen=True)
class HeadArch:
    """A registered head architecture: builder, how many widths and rates it takes, and the task
    kinds it serves: those whose `TrainingKind.heads` name it, plus any given at registration."""

    name: str
    builder: HeadBuilder
    num_widths: int
    num_rates: tuple[int, ...] = (0,)  # allowed lengths of HeadConfig.rates
    extra_kinds: frozenset[str] = frozenset()

    @property
    def kinds(self) -> frozenset[str]:
        return frozenset(k for k in task_kinds.names() if self.name in task_kinds.kind(k).heads) | self.extra_kinds

    @property
    def dense(self) -> bool:
        return all(task_kinds.kind(k).dense for k in self.kinds)


_HEADS: dict[str, HeadArch] = {}


def register_head(
    name: str, *, num_widths: int, num_rates: tuple[int, ...] = (0,), kinds: frozenset[str] = frozenset()
) -> Callable[[HeadBuilder], HeadBuilder]:
    """Register a head builder ``builder(config, in_channels, output_stride) -> nn.Module``. The
    kinds listing ``name`` in their `TrainingKind.heads` may use it; ``kinds`` adds others."""

    def wrap(builder: HeadBuilder) -> HeadBuilder:
        if name in _HEADS:
            raise ValueError(f"head arch {name!r} is registered twice")
        _HEADS[name] = HeadArch(name, builder, num_widths, num_rates, frozenset(kinds))
        return builder

    return wrap


register_head("light", num_widths=1)(LightHead)
register_head("aspp", num_widths=2, num_rates=(0, 3))(ASPPHead)
register_head("pool_linear", num_widths=1)(PoolLinearHead)


def available_heads(kind: str | None = None) -> tuple[str, ...]:
    """Registered head archs, optionally only those serving task ``kind``."""
    return tuple(sorted(n for n, a in _HEADS.items() if kind is None or kind in a.kinds))


def head_arch(name: str) -> HeadArch:
    if name not in _HEADS:
        raise ConfigError(f"unknown head arch {name!r}; choose one of {available_heads()}")
    return _HEADS[name]


def validate_head_config(config: HeadConfig) -> HeadArch:
    """Check arch, task kind, number of widths and rates; returns the arch."""
    arch = head_arch(config.arch)
    task = config.task
    if task.kind not in arch.kinds:
        raise ConfigError(
            f"task {task.name!r} ({task.kind}) cannot use head {arch.name!r}; "
            f"choose one of {available_heads(task.kind)}"
        )
    if len(config.widths) != arch.num_widths or min(config.widths, default=0) < 1:
        raise ConfigError(
            f"head {arch.name!r} of task {task.name!r} takes {arch.num_widths} positive width(s), got {config.widths}"
        )
    if len(config.rates) not in arch.num_rates or any(r < 1 for r in config.rates):
        raise ConfigError(
            f"head {arch.name!r} of task {task.name!r} takes {arch.num_rates} positive rate(s), got {config.rates}"
        )
    return arch


def build_head(config: HeadConfig, in_channels: int, output_stride: int) -> nn.Module:
    """Build the head of one task on features with ``in_channels`` channels at ``output_stride``."""
    head = validate_head_config(config).builder(config, in_channels, output_stride)
    init_weights(head)
    return head
