"""Models: every registered encoder x task set, config round trips, compacted widths, registry
errors and MAC counting. Big encoders run at tiny spatial sizes in eval mode."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from training.models import (
    ConfigError,
    EncoderConfig,
    HeadConfig,
    ModelConfig,
    ResNetEncoder,
    StageConfig,
    available_encoders,
    build_head,
    build_model,
    count_macs,
    count_parameters,
    create_model,
    encoder_config,
    macs_by_module,
    register_encoder,
)
from training.models.registry import model_config
from training.tasks import TaskSpec

SEG = TaskSpec("seg", "segmentation", 5)
DEPTH = TaskSpec("depth", "depth", 1)
NORMAL = TaskSpec("normal", "normal", 3)
ATTR = TaskSpec("attr", "attributes", 2, ("Male", "Smiling"))
TASK_SETS = {
    "seg+depth+normal": (SEG, DEPTH, NORMAL),
    "seg+attributes": (SEG, ATTR),
    "single": (DEPTH,),
}

# Declared per encoder: output stride, output channels, encoder parameters (torchvision's ResNet
# counts without the fc layer; timm's resnet50d likewise).
DECLARED = {
    "tiny": (8, 128, 497_120),
    "tiny-wide": (8, 256, 1_975_232),
    "resnet18": (32, 512, 11_176_512),
    "resnet34": (32, 512, 21_284_672),
    "resnet50": (32, 2048, 23_508_032),
    "resnet18-os8": (8, 512, 11_176_512),
    "resnet50-os8": (8, 2048, 23_508_032),
    "resnet50d-os8": (8, 2048, 23_527_264),
}


BIG = {"resnet50", "resnet50-os8", "resnet50d-os8"}  # narrow heads keep these tests fast


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _size(encoder: str) -> tuple[int, int]:
    return (32, 48) if encoder == "tiny" else (32, 32)


@torch.no_grad()
def _run(model: torch.nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    return model.eval()(x)


def test_every_encoder_is_declared() -> None:
    assert set(available_encoders()) == set(DECLARED)


@pytest.mark.parametrize("task_set", list(TASK_SETS))
@pytest.mark.parametrize("encoder", list(DECLARED))
def test_outputs(encoder: str, task_set: str) -> None:
    torch.manual_seed(0)
    tasks = TASK_SETS[task_set]
    model = create_model(encoder=encoder, tasks=tasks, head_width=16 if encoder in BIG else None)
    h, w = _size(encoder)
    out = _run(model, torch.rand(2, 3, h, w))
    assert list(out) == [t.name for t in tasks]
    for task in tasks:
        y = out[task.name]
        expected = (2, task.channels, h, w) if task.dense else (2, task.channels)
        assert y.shape == expected and torch.isfinite(y).all()
        if task.kind == "normal":
            torch.testing.assert_close(y.norm(dim=1), torch.ones(2, h, w))


@pytest.mark.parametrize("encoder", list(DECLARED))
def test_encoder_declared_stride_width_params(encoder: str) -> None:
    stride, channels, params = DECLARED[encoder]
    model = ResNetEncoder(encoder_config(encoder))
    with torch.no_grad():
        feats = model.eval()(torch.rand(2, 3, 64, 96))
    assert feats.shape == (2, channels, 64 // stride, 96 // stride)
    assert model.output_stride == stride and model.out_channels == channels
    assert count_parameters(model) == params


def test_default_aspp_head_builds() -> None:
    model = create_model(encoder="resnet50-os8", tasks=(SEG,))
    assert _run(model, torch.rand(1, 3, 32, 32))["seg"].shape == (1, 5, 32, 32)


def test_default_heads() -> None:
    big = model_config(encoder="resnet50d-os8", tasks=(SEG, ATTR))
    assert big.heads[0] == HeadConfig(SEG, "aspp", (256, 256), (12, 24, 36))
    assert big.heads[1] == HeadConfig(ATTR, "pool_linear", (128,))
    assert model_config(encoder="resnet50", tasks=(SEG,)).heads[0].rates == (3, 6, 9)
    assert model_config(encoder="resnet18", tasks=(SEG,)).heads[0].widths == (128,)
    small = model_config(encoder="tiny", tasks=(SEG, ATTR))
    assert [(h.arch, h.widths) for h in small.heads] == [("light", (64,)), ("pool_linear", (64,))]
    custom = model_config(encoder="tiny", tasks=(SEG, ATTR), head="aspp", head_width=24, name="x")
    assert [(h.arch, h.widths) for h in custom.heads] == [("aspp", (24, 24)), ("pool_linear", (24,))]
    assert custom.heads[0].rates == (12, 24, 36) and custom.name == "x"


def test_resnet50_os8_uses_torchvision_dilation() -> None:
    stages = encoder_config("resnet50-os8").stages
    assert [(s.stride, s.dilation, s.first_dilation) for s in stages] == [
        (1, 1, None),
        (2, 1, None),
        (1, 2, 1),
        (1, 4, 2),
    ]
    assert all(s.downsample for s in stages)


@pytest.mark.parametrize("encoder", ["tiny", "resnet50d-os8"])
def test_config_round_trip_gives_identical_outputs(encoder: str) -> None:
    torch.manual_seed(0)
    model = create_model(encoder=encoder, tasks=(SEG, DEPTH, NORMAL, ATTR), head="aspp", head_width=16)
    config = ModelConfig.from_dict(json.loads(json.dumps(model.config.to_dict())))
    assert config == model.config
    rebuilt = build_model(config)
    rebuilt.load_state_dict(model.state_dict())
    x = torch.rand(2, 3, 32, 32)
    a, b = _run(model, x), _run(rebuilt, x)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0)


def test_from_dict_without_first_dilation() -> None:
    d = model_config(encoder="tiny", tasks=(SEG,)).to_dict()
    for stage in d["encoder"]["stages"]:
        stage.pop("first_dilation")
    stages = ModelConfig.from_dict(d).encoder.stages
    assert all(s.first_dilation is None for s in stages)


def _compacted_config() -> ModelConfig:
    """Odd, compacted-looking widths everywhere, bottleneck blocks and a deep stem."""
    encoder = EncoderConfig(
        block="bottleneck",
        stem=(7, 11, 13),
        stages=(
            StageConfig(out=13, blocks=((5, 3), (1, 9)), stride=1),
            StageConfig(out=21, blocks=((6, 10), (2, 3)), stride=2, downsample=True),
            StageConfig(out=19, blocks=((4, 4),), stride=1, dilation=2, first_dilation=1, downsample=True),
        ),
        avg_down=True,
    )
    heads = (
        HeadConfig(SEG, "aspp", (9, 5), (2, 3, 5)),
        HeadConfig(NORMAL, "light", (3,)),
        HeadConfig(ATTR, "pool_linear", (1,)),
    )
    return ModelConfig(encoder=encoder, heads=heads, name="compacted")


def test_build_compacted_widths() -> None:
    model = build_model(_compacted_config())
    out = _run(model, torch.rand(2, 3, 33, 47))
    assert out["seg"].shape == (2, 5, 33, 47) and out["normal"].shape == (2, 3, 33, 47)
    assert out["attr"].shape == (2, 2)
    assert model.forward_features(torch.rand(1, 3, 32, 32)).shape == (1, 19, 4, 4)


def test_basic_compacted_widths_and_basic_dilation() -> None:
    cfg = dataclasses.replace(
        encoder_config("tiny"),
        stem=(17,),
        stages=(
            StageConfig(out=17, blocks=((3,),)),
            StageConfig(out=23, blocks=((5,), (1,)), stride=2, downsample=True),
            StageConfig(out=23, blocks=((6,),), dilation=2, first_dilation=1),
        ),
    )
    model = build_model(ModelConfig(encoder=cfg, heads=(HeadConfig(DEPTH, "light", (7,)),)))
    block = model.encoder.stages[2][0]
    assert block.conv1.dilation == (1, 1) and block.conv2.dilation == (2, 2)
    assert _run(model, torch.rand(2, 3, 32, 48))["depth"].shape == (2, 1, 32, 48)


def test_aspp_trains_with_batch_one() -> None:
    """The image-pool branch sees one value per channel at batch 1; it must still train every head
    parameter (BatchNorm there would raise in training mode or zero the branch)."""
    model = create_model(encoder="tiny", tasks=(SEG,), head="aspp", head_width=8).train()
    out = model(torch.rand(1, 3, 32, 32))["seg"]
    assert out.shape == (1, SEG.channels, 32, 32) and torch.isfinite(out).all()
    out.square().mean().backward()
    head = dict(model.heads.named_parameters())
    missing = [n for n, p in head.items() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, missing
    pool = [n for n in head if "pool" in n and n.endswith("weight")]
    assert pool and all(head[n].grad.abs().sum() > 0 for n in pool), pool


def test_normalisation_buffers_follow_config_not_state_dict() -> None:
    model = create_model(encoder="tiny", tasks=(SEG,))
    assert "input_mean" not in model.state_dict()
    torch.testing.assert_close(model.input_mean.flatten(), torch.tensor(model.config.input_mean))


# --- registry errors ---------------------------------------------------------------------------


def test_unknown_encoder_lists_valid_names() -> None:
    with pytest.raises(ConfigError, match="resnet50d-os8"):
        create_model(encoder="resnet9000", tasks=(SEG,))


def test_unknown_encoder_override() -> None:
    with pytest.raises(ConfigError, match="stem_pool"):
        encoder_config("tiny", widths=3)
    assert encoder_config("tiny", stem_pool=False).output_stride == 4


def test_duplicate_registration_raises() -> None:
    with pytest.raises(ValueError, match="registered twice"):
        register_encoder("tiny")(lambda: encoder_config("tiny"))


def test_unknown_head_lists_valid_names() -> None:
    with pytest.raises(ConfigError, match="aspp"):
        create_model(encoder="tiny", tasks=(SEG,), head="unet")
    with pytest.raises(ConfigError, match="light"):
        build_head(HeadConfig(SEG, "fpn", (8,)), 16, 8)


def test_head_kind_mismatch() -> None:
    with pytest.raises(ConfigError, match="pool_linear"):
        build_head(HeadConfig(ATTR, "light", (8,)), 16, 8)
    with pytest.raises(ConfigError, match="cannot use head"):
        build_head(HeadConfig(SEG, "pool_linear", (8,)), 16, 8)
    with pytest.raises(ConfigError, match="dense"):
        create_model(encoder="tiny", tasks=(SEG, ATTR), head="pool_linear")
    with pytest.raises(ConfigError, match="2 positive width"):
        build_head(HeadConfig(SEG, "aspp", (8,)), 16, 8)


def test_invalid_stage_without_downsample() -> None:
    with pytest.raises(ConfigError, match="stage 1.*downsample"):
        EncoderConfig(
            block="basic",
            stem=(16,),
            stages=(StageConfig(out=16, blocks=((16,),)), StageConfig(out=32, blocks=((32,),), stride=2)),
        )


def test_block_width_count_checked() -> None:
    with pytest.raises(ConfigError, match="bottleneck block lists 2"):
        EncoderConfig(block="bottleneck", stem=(8,), stages=(StageConfig(out=8, blocks=((4,),)),))


def test_duplicate_task_names() -> None:
    with pytest.raises(ConfigError, match="unique"):
        create_model(encoder="tiny", tasks=(SEG, SEG))


# --- complexity --------------------------------------------------------------------------------


def _flop_counter_flops(model: torch.nn.Module, x: torch.Tensor) -> int:
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model.eval()(x)
    counts = counter.get_flop_counts()["Global"]
    return sum(v for op, v in counts.items() if "conv" in str(op) or "mm" in str(op))


@pytest.mark.parametrize(
    ("encoder", "tasks", "size"),
    [("tiny", (SEG, DEPTH, NORMAL, ATTR), (48, 64)), ("resnet18", (SEG, ATTR), (64, 64))],
)
def test_count_macs_matches_flop_counter(encoder: str, tasks: tuple, size: tuple[int, int]) -> None:
    model = create_model(encoder=encoder, tasks=tasks)
    macs = count_macs(model, image_size=size, batch=2)
    assert model.training  # restored
    assert macs > 0 and 2 * macs == _flop_counter_flops(model, torch.zeros(2, 3, *size))
    per_module = macs_by_module(model, image_size=size, batch=2)
    assert sum(per_module.values()) == macs and "encoder.stem.0.conv" in per_module
