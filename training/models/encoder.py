"""Width-explicit ResNet encoder (ResNet, dilated ResNet, ResNet-D) built from an `EncoderConfig`.

Module layout (channel-group code walks it; keep it regular)::

    encoder.stem      nn.Sequential of ConvBNAct (children .conv/.bn/.act): one 7x7/2 conv, or a
                      deep stem of 3x3 convs, the first with stride 2 (ResNet-D)
    encoder.pool      MaxPool2d(3, 2, 1), or Identity when stem_pool is False
    encoder.stages    nn.ModuleList; stages[k] is an nn.Sequential of blocks
      BasicBlock      conv1/bn1 (3x3, stride), conv2/bn2 (3x3), relu, downsample
      Bottleneck      conv1/bn1 (1x1), conv2/bn2 (3x3, stride), conv3/bn3 (1x1), relu, downsample
      downsample      None, or nn.Sequential [conv1x1(stride), BN]; with avg_down (ResNet-D)
                      [AvgPool2d(s, s) or Identity, conv1x1, BN]: its conv is ``downsample[-2]``,
                      its BN ``downsample[-1]``.

Every block of a stage writes the stage's residual stream (``StageConfig.out`` channels): the
last BN of each block and the shortcut BN of the first block all produce those channels.

Dilation: a block's first 3x3 conv uses ``StageConfig.block_dilation(i)`` (``first_dilation`` for
block 0), later 3x3 convs use the stage's ``dilation``. For bottlenecks this is exactly
torchvision's ``replace_stride_with_dilation``; for basic blocks (which torchvision refuses to
dilate) the second 3x3 conv of the first block is dilated like the rest of the stage, as in the
dilated ResNets of semantic-segmentation code (CSAIL, MTAN).
"""

from __future__ import annotations

from torch import Tensor, nn

from training.models.config import EncoderConfig, StageConfig
from training.models.layers import ConvBNAct, conv2d, init_weights


class BasicBlock(nn.Module):
    """Two 3x3 convs; ``widths = (w1,)`` is the width between them."""

    def __init__(
        self,
        in_channels: int,
        widths: tuple[int, ...],
        out_channels: int,
        *,
        stride: int = 1,
        dilation: int = 1,
        stage_dilation: int = 1,
        downsample: nn.Sequential | None = None,
    ) -> None:
        super().__init__()
        (w1,) = widths
        self.conv1 = conv2d(in_channels, w1, 3, stride=stride, dilation=dilation)
        self.bn1 = nn.BatchNorm2d(w1)
        self.conv2 = conv2d(w1, out_channels, 3, dilation=stage_dilation)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (stride, dilation) -> 1x1; ``widths = (w1, w2)`` are the conv1 and conv2 outputs."""

    def __init__(
        self,
        in_channels: int,
        widths: tuple[int, ...],
        out_channels: int,
        *,
        stride: int = 1,
        dilation: int = 1,
        stage_dilation: int = 1,
        downsample: nn.Sequential | None = None,
    ) -> None:
        super().__init__()
        del stage_dilation  # a bottleneck has a single 3x3 conv
        w1, w2 = widths
        self.conv1 = conv2d(in_channels, w1, 1)
        self.bn1 = nn.BatchNorm2d(w1)
        self.conv2 = conv2d(w1, w2, 3, stride=stride, dilation=dilation)
        self.bn2 = nn.BatchNorm2d(w2)
        self.conv3 = conv2d(w2, out_channels, 1)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


BLOCKS: dict[str, type[nn.Module]] = {"basic": BasicBlock, "bottleneck": Bottleneck}


def make_downsample(in_channels: int, out_channels: int, stride: int, avg_down: bool) -> nn.Sequential:
    """Projection shortcut: [conv1x1(stride), BN], or ResNet-D [avg-pool or Identity, conv1x1, BN]."""
    if not avg_down:
        return nn.Sequential(
            conv2d(in_channels, out_channels, 1, stride=stride), nn.BatchNorm2d(out_channels)
        )
    pool: nn.Module = (
        nn.AvgPool2d(stride, stride, ceil_mode=True, count_include_pad=False) if stride > 1 else nn.Identity()
    )
    return nn.Sequential(pool, conv2d(in_channels, out_channels, 1), nn.BatchNorm2d(out_channels))


def make_stem(config: EncoderConfig) -> nn.Sequential:
    """One 7x7/2 ConvBNAct, or a deep stem of 3x3 ConvBNActs with the first at stride 2."""
    if len(config.stem) == 1:
        return nn.Sequential(ConvBNAct(config.in_channels, config.stem[0], 7, stride=2))
    widths = (config.in_channels,) + tuple(config.stem)
    return nn.Sequential(
        *(
            ConvBNAct(c_in, c_out, 3, stride=2 if i == 0 else 1)
            for i, (c_in, c_out) in enumerate(zip(widths, widths[1:], strict=False))
        )
    )


def make_stage(block: str, stage: StageConfig, in_channels: int, avg_down: bool) -> nn.Sequential:
    """The blocks of one stage; only the first block strides and carries the projection shortcut."""
    block_cls = BLOCKS[block]
    layers = []
    for i, widths in enumerate(stage.blocks):
        first = i == 0
        downsample = (
            make_downsample(in_channels, stage.out, stage.stride, avg_down)
            if first and stage.downsample
            else None
        )
        layers.append(
            block_cls(
                in_channels if first else stage.out,
                tuple(widths),
                stage.out,
                stride=stage.stride if first else 1,
                dilation=stage.block_dilation(i),
                stage_dilation=stage.dilation,
                downsample=downsample,
            )
        )
    return nn.Sequential(*layers)


class ResNetEncoder(nn.Module):
    """The shared trunk: stem -> pool -> stages; ``forward`` returns the last stage's output."""

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        self.config = config
        self.stem = make_stem(config)
        self.pool: nn.Module = nn.MaxPool2d(3, 2, 1) if config.stem_pool else nn.Identity()
        self.stages = nn.ModuleList(
            make_stage(config.block, st, c_in, config.avg_down)
            for st, c_in in zip(config.stages, config.stage_in_channels, strict=True)
        )
        init_weights(self)

    @property
    def out_channels(self) -> int:
        return self.config.out_channels

    @property
    def output_stride(self) -> int:
        return self.config.output_stride

    def forward_stages(self, x: Tensor) -> list[Tensor]:
        """The output of every stage (for multi-scale heads and feature inspection)."""
        x = self.pool(self.stem(x))
        outs = []
        for stage in self.stages:
            x = stage(x)
            outs.append(x)
        return outs

    def forward(self, x: Tensor) -> Tensor:
        x = self.pool(self.stem(x))
        for stage in self.stages:
            x = stage(x)
        return x
