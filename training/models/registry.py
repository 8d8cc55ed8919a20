"""timm-style registry of encoders (with their default heads) and the model builders.

``create_model(encoder="resnet50d-os8", tasks=...)`` resolves a registered encoder config and its
default head archs and widths into a width-explicit `ModelConfig` and builds it;
``build_model(config)`` rebuilds any config (for example a compacted one) as is. Keyword
arguments left at None never override a registry default.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from training.kinds import kind_of
from training.models.config import ConfigError, EncoderConfig, HeadConfig, ModelConfig, StageConfig
from training.models.heads import available_heads, default_aspp_rates, head_arch
from training.models.multitask import MultiTaskModel
from training.tasks import TaskSpec

EncoderFactory = Callable[[], EncoderConfig]


@dataclass(frozen=True)
class EncoderEntry:
    """A registered encoder and the heads that suit it (arch and widths per head kind)."""

    name: str
    factory: EncoderFactory
    dense_head: str = "light"
    dense_widths: dict[str, tuple[int, ...]] = dataclasses.field(default_factory=dict)
    attribute_width: int = 128


_ENCODERS: dict[str, EncoderEntry] = {}
_DEFAULT_DENSE_WIDTHS = {"light": (128,), "aspp": (256, 256)}


def register_encoder(
    name: str,
    *,
    dense_head: str = "light",
    dense_widths: dict[str, tuple[int, ...]] | None = None,
    attribute_width: int = 128,
) -> Callable[[EncoderFactory], EncoderFactory]:
    """Register ``factory() -> EncoderConfig`` under ``name``; duplicate names raise.

    ``dense_head`` is the default arch of dense-task heads; ``dense_widths`` maps dense archs to
    their default widths (missing archs fall back to light (128,) / aspp (256, 256));
    ``attribute_width`` is the hidden width of the ``pool_linear`` attributes head.
    """

    def wrap(factory: EncoderFactory) -> EncoderFactory:
        if name in _ENCODERS:
            raise ValueError(f"encoder {name!r} is registered twice")
        widths = {**_DEFAULT_DENSE_WIDTHS, **(dense_widths or {})}
        _ENCODERS[name] = EncoderEntry(name, factory, dense_head, widths, attribute_width)
        return factory

    return wrap


def available_encoders() -> tuple[str, ...]:
    return tuple(_ENCODERS)


def encoder_entry(name: str) -> EncoderEntry:
    if name not in _ENCODERS:
        raise ConfigError(f"unknown encoder {name!r}; choose one of {available_encoders()}")
    return _ENCODERS[name]


def encoder_config(name: str, **overrides: object) -> EncoderConfig:
    """The registered encoder's config, with ``EncoderConfig`` fields replaced by ``overrides``."""
    config = encoder_entry(name).factory()
    fields = {f.name for f in dataclasses.fields(EncoderConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ConfigError(f"unknown encoder override(s) {unknown}; EncoderConfig fields are {sorted(fields)}")
    return dataclasses.replace(config, **overrides) if overrides else config


def create_model(
    *,
    encoder: str | EncoderConfig,
    tasks: Sequence[TaskSpec],
    head: str | None = None,
    head_width: int | None = None,
    name: str = "",
) -> MultiTaskModel:
    """Build a model from a registered encoder name (or an explicit config) and the task list."""
    return build_model(
        model_config(encoder=encoder, tasks=tasks, head=head, head_width=head_width, name=name)
    )


def model_config(
    *,
    encoder: str | EncoderConfig,
    tasks: Sequence[TaskSpec],
    head: str | None = None,
    head_width: int | None = None,
    name: str = "",
) -> ModelConfig:
    """The `ModelConfig` `create_model` builds: every head width and rate spelled out.

    ``head`` picks the arch of the dense-task heads (default: the encoder's); a task whose kind
    cannot use it gets its kind's default head (attributes: ``pool_linear``). ``head_width`` sets
    the hidden width(s) of every head. Unregistered ``EncoderConfig``s get ``light`` (128) dense
    heads and 128-wide attribute heads.
    """
    if not tasks:
        raise ConfigError("create_model needs at least one task")
    if isinstance(encoder, EncoderConfig):
        entry, enc = EncoderEntry("", lambda: encoder, "light", dict(_DEFAULT_DENSE_WIDTHS)), encoder
    else:
        entry, enc = encoder_entry(encoder), encoder_config(encoder)
    dense_arch = _resolve_dense_arch(head, entry, tasks)
    heads = tuple(_head_config(t, dense_arch, entry, head_width, enc.output_stride) for t in tasks)
    return ModelConfig(encoder=enc, heads=heads, name=name or entry.name)


def build_model(config: ModelConfig) -> MultiTaskModel:
    """Rebuild a model exactly as ``config`` describes it (registry defaults play no part)."""
    return MultiTaskModel(config)


def _resolve_dense_arch(head: str | None, entry: EncoderEntry, tasks: Sequence[TaskSpec]) -> str:
    if head is None:
        return entry.dense_head
    arch = head_arch(head)  # unknown names raise with the valid list
    if arch.dense:
        return head
    if any(t.dense for t in tasks):
        dense = [n for n in available_heads() if head_arch(n).dense]
        raise ConfigError(
            f"head={head!r} cannot serve dense tasks; `head` picks the dense-task arch, one of {dense} "
            f"(tasks of other kinds use their kind's own head, e.g. attributes 'pool_linear')"
        )
    return entry.dense_head


def _head_config(
    task: TaskSpec, dense_arch: str, entry: EncoderEntry, head_width: int | None, output_stride: int
) -> HeadConfig:
    allowed = kind_of(task).heads
    arch = dense_arch if dense_arch in allowed else allowed[0]  # the kind's default when it cannot use it
    if not head_arch(arch).dense:
        width = head_width if head_width is not None else entry.attribute_width
        return HeadConfig(task=task, arch=arch, widths=(width,))
    default = entry.dense_widths.get(arch, _DEFAULT_DENSE_WIDTHS.get(arch))
    if default is None:
        raise ConfigError(f"no default widths for head {arch!r}; pass head_width")
    widths = default if head_width is None else (head_width,) * len(default)
    rates = default_aspp_rates(output_stride) if arch == "aspp" else ()
    return HeadConfig(task=task, arch=arch, widths=tuple(widths), rates=rates)


# --- registered encoders ----------------------------------------------------------------------


def resnet_stages(
    block: str,
    depths: Sequence[int],
    inner: Sequence[int],
    outs: Sequence[int],
    strides: Sequence[int],
    dilations: Sequence[int],
    stem_out: int,
) -> tuple[StageConfig, ...]:
    """Stages of a standard ResNet layout, with torchvision's dilation convention.

    A projection shortcut is added where the stride or the width changes; a stage whose dilation
    grows starts with the previous stage's dilation (``first_dilation``), as torchvision's
    ``replace_stride_with_dilation`` does.
    """
    stages, c_in, prev_dilation = [], stem_out, 1
    for depth, w, out, s, d in zip(depths, inner, outs, strides, dilations, strict=True):
        widths = (w,) if block == "basic" else (w, w)
        stages.append(
            StageConfig(
                out=out,
                blocks=(widths,) * depth,
                stride=s,
                dilation=d,
                downsample=s != 1 or c_in != out,
                first_dilation=prev_dilation if prev_dilation != d else None,
            )
        )
        c_in, prev_dilation = out, d
    return tuple(stages)


_BASIC = (64, 128, 256, 512)
_BOTTLENECK_OUT = (256, 512, 1024, 2048)
_OS32 = ((1, 2, 2, 2), (1, 1, 1, 1))
_OS8 = ((1, 2, 1, 1), (1, 1, 2, 4))


def _resnet(
    block: str, depths: Sequence[int], layout: tuple, stem: tuple[int, ...] = (64,), **kw: bool
) -> EncoderConfig:
    outs = _BASIC if block == "basic" else _BOTTLENECK_OUT
    stages = resnet_stages(block, depths, _BASIC, outs, layout[0], layout[1], stem[-1])
    return EncoderConfig(block=block, stem=stem, stages=stages, **kw)  # type: ignore[arg-type]


@register_encoder("tiny", dense_widths={"light": (64,)}, attribute_width=64)
def tiny() -> EncoderConfig:
    """CPU demo encoder: one basic block per stage, widths 32/64/96/128, output stride 8."""
    outs = (32, 64, 96, 128)
    return EncoderConfig(
        block="basic", stem=(32,), stages=resnet_stages("basic", (1, 1, 1, 1), outs, outs, *_OS8, 32)
    )


@register_encoder("tiny-wide", dense_widths={"light": (64,)}, attribute_width=64)
def tiny_wide() -> EncoderConfig:
    """``tiny`` at twice the width (64/128/192/256): the CPU sweep's over-parameterised encoder,
    with room for channel sparsity to remove."""
    outs = (64, 128, 192, 256)
    return EncoderConfig(
        block="basic", stem=(64,), stages=resnet_stages("basic", (1, 1, 1, 1), outs, outs, *_OS8, 64)
    )


@register_encoder("resnet18")
def resnet18() -> EncoderConfig:
    return _resnet("basic", (2, 2, 2, 2), _OS32)


@register_encoder("resnet34")
def resnet34() -> EncoderConfig:
    return _resnet("basic", (3, 4, 6, 3), _OS32)


@register_encoder("resnet50", dense_head="aspp")
def resnet50() -> EncoderConfig:
    return _resnet("bottleneck", (3, 4, 6, 3), _OS32)


@register_encoder("resnet18-os8")
def resnet18_os8() -> EncoderConfig:
    """ResNet-18 with stages 3 and 4 dilated (2, 4) instead of strided: output stride 8."""
    return _resnet("basic", (2, 2, 2, 2), _OS8)


@register_encoder("resnet50-os8", dense_head="aspp")
def resnet50_os8() -> EncoderConfig:
    """torchvision ``resnet50(replace_stride_with_dilation=[False, True, True])``."""
    return _resnet("bottleneck", (3, 4, 6, 3), _OS8)


@register_encoder("resnet50d-os8", dense_head="aspp")
def resnet50d_os8() -> EncoderConfig:
    """The paper's encoder: ResNet-D-50 (deep stem 32/32/64, avg-pool shortcuts), output stride 8."""
    return _resnet("bottleneck", (3, 4, 6, 3), _OS8, stem=(32, 32, 64), avg_down=True)
