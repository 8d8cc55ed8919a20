"""Width-explicit model configuration.

The config *is* the architecture: every channel width of the encoder and the heads is listed, so a
compacted network (docs/METHOD.md §4) is described by rewriting widths here and rebuilding.
Configs are frozen dataclasses that round-trip through plain dicts (JSON/YAML friendly).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Literal

from parsimony.errors import ConfigError  # raised for an inconsistent model config; importable from here too
from training.tasks import TaskSpec

BlockKind = Literal["basic", "bottleneck"]
BLOCK_WIDTHS: dict[str, int] = {"basic": 1, "bottleneck": 2}  # inner widths per block of each kind
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class StageConfig:
    """One ResNet stage.

    ``out`` is the width of the stage's residual stream (the output of every block in the stage).
    ``blocks`` lists, per block, the inner widths: one for a BasicBlock (conv1 output), two for a
    Bottleneck (conv1 and conv2 outputs). The first block applies ``stride`` and, when
    ``downsample`` is true, a projection shortcut (1x1 conv + BN; avg-pool first when the encoder
    uses ResNet-D shortcuts). Without a projection the stage's input width must equal ``out``.

    ``dilation`` is the dilation of the stage's 3x3 convs. ``first_dilation`` (None: same as
    ``dilation``) is that of the first block's first 3x3 conv; torchvision's
    ``replace_stride_with_dilation`` gives it the previous stage's dilation, and the registry
    encodes that convention explicitly here.
    """

    out: int
    blocks: tuple[tuple[int, ...], ...]
    stride: int = 1
    dilation: int = 1
    downsample: bool = False
    first_dilation: int | None = None

    def block_dilation(self, index: int) -> int:
        """Dilation of the (first) 3x3 conv of block ``index``."""
        if index == 0 and self.first_dilation is not None:
            return self.first_dilation
        return self.dilation


@dataclass(frozen=True)
class EncoderConfig:
    """A ResNet-family encoder.

    ``stem`` lists the stem conv widths: one entry is the classic 7x7/2 conv, several entries a
    deep stem of 3x3 convs (the first with stride 2), each followed by BN + ReLU. ``stem_pool``
    adds the 3x3/2 max-pool. ``avg_down`` selects ResNet-D projection shortcuts (avg-pool, then a
    stride-1 1x1 conv).
    """

    block: BlockKind
    stem: tuple[int, ...]
    stages: tuple[StageConfig, ...]
    stem_pool: bool = True
    avg_down: bool = False
    in_channels: int = 3

    def __post_init__(self) -> None:
        _validate_encoder(self)

    @property
    def out_channels(self) -> int:
        return self.stages[-1].out

    @property
    def stage_in_channels(self) -> tuple[int, ...]:
        """Input width of each stage (the stem's last width, then the previous stage's ``out``)."""
        return (self.stem[-1],) + tuple(st.out for st in self.stages[:-1])

    @property
    def output_stride(self) -> int:
        s = 2 * (2 if self.stem_pool else 1)
        for st in self.stages:
            s *= st.stride
        return s


@dataclass(frozen=True)
class HeadConfig:
    """The head of one task. ``widths`` lists the head's hidden widths (meaning depends on arch):

    - ``light`` (dense): ``(hidden,)``: 3x3 conv-BN-ReLU, then a 1x1 conv to the task channels.
    - ``aspp`` (dense): ``(branch, project)``: DeepLab-v3 ASPP with 1x1, three atrous 3x3 and an
      image-pool branch of width ``branch`` each, a 1x1 projection to ``project``, a 3x3
      conv-BN-ReLU and a 1x1 classifier. ``rates`` gives the atrous rates.
    - ``pool_linear`` (attributes): ``(hidden,)``: 3x3 conv-BN-ReLU, global average pool, linear.
    """

    task: TaskSpec
    arch: str
    widths: tuple[int, ...]
    rates: tuple[int, ...] = ()


@dataclass(frozen=True)
class ModelConfig:
    encoder: EncoderConfig
    heads: tuple[HeadConfig, ...]
    input_mean: tuple[float, float, float] = IMAGENET_MEAN
    input_std: tuple[float, float, float] = IMAGENET_STD
    name: str = field(default="")

    @property
    def tasks(self) -> tuple[TaskSpec, ...]:
        return tuple(h.task for h in self.heads)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["heads"] = [{**asdict(h), "task": h.task.to_dict()} for h in self.heads]
        return _lists(d)

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        enc = d["encoder"]
        encoder = EncoderConfig(
            block=enc["block"],
            stem=tuple(enc["stem"]),
            stages=tuple(
                StageConfig(
                    out=int(s["out"]),
                    blocks=tuple(tuple(int(w) for w in b) for b in s["blocks"]),
                    stride=int(s.get("stride", 1)),
                    dilation=int(s.get("dilation", 1)),
                    downsample=bool(s.get("downsample", False)),
                    first_dilation=None if s.get("first_dilation") is None else int(s["first_dilation"]),
                )
                for s in enc["stages"]
            ),
            stem_pool=bool(enc.get("stem_pool", True)),
            avg_down=bool(enc.get("avg_down", False)),
            in_channels=int(enc.get("in_channels", 3)),
        )
        heads = tuple(
            HeadConfig(
                task=TaskSpec.from_dict(h["task"]),
                arch=h["arch"],
                widths=tuple(int(w) for w in h["widths"]),
                rates=tuple(int(r) for r in h.get("rates", ())),
            )
            for h in d["heads"]
        )
        return cls(
            encoder=encoder,
            heads=heads,
            input_mean=tuple(d.get("input_mean", IMAGENET_MEAN)),
            input_std=tuple(d.get("input_std", IMAGENET_STD)),
            name=d.get("name", ""),
        )


def _validate_encoder(cfg: EncoderConfig) -> None:
    if cfg.block not in BLOCK_WIDTHS:
        raise ConfigError(f"encoder block {cfg.block!r} is unknown; choose one of {sorted(BLOCK_WIDTHS)}")
    if not cfg.stem or min(cfg.stem) < 1:
        raise ConfigError(f"encoder stem {cfg.stem!r} must list at least one positive width")
    if not cfg.stages:
        raise ConfigError("encoder has no stages; list at least one StageConfig")
    for i, (st, c_in) in enumerate(zip(cfg.stages, cfg.stage_in_channels, strict=True)):
        _validate_stage(i, st, c_in, BLOCK_WIDTHS[cfg.block], cfg.block)


def _validate_stage(i: int, st: StageConfig, c_in: int, n_widths: int, block: str) -> None:
    where = f"stage {i}"
    if st.out < 1 or not st.blocks:
        raise ConfigError(
            f"{where}: needs a positive `out` and at least one block (got {st.out}, {st.blocks})"
        )
    for j, widths in enumerate(st.blocks):
        if len(widths) != n_widths or min(widths) < 1:
            raise ConfigError(
                f"{where} block {j}: a {block} block lists {n_widths} positive inner width(s), got {tuple(widths)}"
            )
    if st.stride < 1 or st.dilation < 1 or (st.first_dilation is not None and st.first_dilation < 1):
        raise ConfigError(
            f"{where}: stride and dilations must be >= 1 (got {st.stride}, {st.dilation}, {st.first_dilation})"
        )
    if not st.downsample and (c_in != st.out or st.stride != 1):
        raise ConfigError(
            f"{where}: without `downsample` the shortcut is the identity, so the input width ({c_in}) must "
            f"equal out ({st.out}) and stride ({st.stride}) must be 1; set downsample=True or fix the widths"
        )


def _lists(obj):
    """Tuples to lists, recursively, so the dict is plain JSON/YAML."""
    if isinstance(obj, dict):
        return {k: _lists(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_lists(v) for v in obj]
    return obj
