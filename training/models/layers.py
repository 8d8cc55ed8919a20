"""Small building blocks shared by the encoder and the heads.

Every conv that is followed by BatchNorm has ``bias=False``. `ConvBNAct` names its children
``conv``, ``bn`` and ``act`` so that channel-group code (sparsity, compaction) can address the
producer of a feature channel (the conv filter plus the BN scale and shift) by attribute.
"""

from __future__ import annotations

from collections import OrderedDict

from torch import nn


def conv2d(
    in_channels: int,
    out_channels: int,
    kernel_size: int,
    *,
    stride: int = 1,
    dilation: int = 1,
    bias: bool = False,
) -> nn.Conv2d:
    """A square conv with "same" padding (``dilation * (k - 1) // 2``), so only ``stride`` shrinks maps."""
    padding = dilation * (kernel_size - 1) // 2
    return nn.Conv2d(
        in_channels, out_channels, kernel_size, stride=stride, padding=padding, dilation=dilation, bias=bias
    )


class ConvBNAct(nn.Sequential):
    """conv (no bias) -> BatchNorm2d -> ReLU (or Identity when ``act`` is False)."""

    conv: nn.Conv2d
    bn: nn.BatchNorm2d
    act: nn.Module

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        *,
        stride: int = 1,
        dilation: int = 1,
        act: bool = True,
    ) -> None:
        super().__init__(
            OrderedDict(
                conv=conv2d(in_channels, out_channels, kernel_size, stride=stride, dilation=dilation),
                bn=nn.BatchNorm2d(out_channels),
                act=nn.ReLU(inplace=True) if act else nn.Identity(),
            )
        )


def init_weights(module: nn.Module) -> None:
    """torchvision's ResNet initialisation: Kaiming-normal (fan_out, ReLU) convs, BN at (1, 0).

    Linear layers and biases keep PyTorch's defaults.
    """
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
