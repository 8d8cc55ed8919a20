"""torchvision ResNet weights -> our width-explicit encoders (random-init torchvision models, no
downloads): exact feature reproduction, including torchvision's dilation convention."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from torchvision.models import resnet18, resnet50

from training.models import (
    PretrainedMismatch,
    ResNetEncoder,
    StageConfig,
    create_model,
    encoder_config,
    load_torchvision_resnet,
)
from training.tasks import TaskSpec

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _randomise_bn(model: nn.Module) -> None:
    """Non-trivial BN affine and running statistics, so copying them is actually tested."""
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            for t in (m.weight.data, m.bias.data, m.running_mean):
                t.copy_(torch.randn(t.shape, generator=g) * 0.2 + (1.0 if t is m.weight.data else 0.0))
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)


def _save(model: nn.Module, path: Path) -> Path:
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if path.suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path)
    return path


@torch.no_grad()
def _layer4(tv: nn.Module, x: torch.Tensor) -> torch.Tensor:
    x = tv.maxpool(tv.relu(tv.bn1(tv.conv1(x))))
    return tv.layer4(tv.layer3(tv.layer2(tv.layer1(x))))


def _assert_same_features(tv: nn.Module, encoder: ResNetEncoder, size: tuple[int, int]) -> None:
    x = torch.rand(2, 3, *size)
    expected = _layer4(tv.eval(), x)
    with torch.no_grad():
        actual = encoder.eval()(x)
    assert actual.shape == expected.shape
    assert (actual - expected).abs().max().item() < 1e-5


@pytest.fixture(scope="module")
def tv_resnet18() -> nn.Module:
    torch.manual_seed(0)
    model = resnet18(weights=None)
    _randomise_bn(model)
    return model


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_resnet18_features(tv_resnet18: nn.Module, tmp_path: Path, suffix: str) -> None:
    path = _save(tv_resnet18, tmp_path / f"r18{suffix}")
    encoder = ResNetEncoder(encoder_config("resnet18"))
    loaded = load_torchvision_resnet(encoder, path)
    assert sorted(loaded) == sorted(encoder.state_dict())
    _assert_same_features(tv_resnet18, encoder, (64, 96))


def test_resnet50_dilated_features(tmp_path: Path) -> None:
    torch.manual_seed(0)
    tv = resnet50(weights=None, replace_stride_with_dilation=[False, True, True])
    _randomise_bn(tv)
    path = _save(tv, tmp_path / "r50.safetensors")
    model = create_model(
        encoder="resnet50-os8", tasks=(TaskSpec("d", "depth", 1),), head="light", head_width=8
    )
    loaded = load_torchvision_resnet(model, path)
    assert "encoder.stages.3.2.conv3.weight" in loaded and "encoder.stem.0.bn.running_var" in loaded
    _assert_same_features(tv, model.encoder, (48, 64))


def test_mismatched_width_names_the_key(tv_resnet18: nn.Module, tmp_path: Path) -> None:
    path = _save(tv_resnet18, tmp_path / "r18.pth")
    config = encoder_config("resnet18")
    stage = config.stages[1]
    narrow = StageConfig(out=stage.out, blocks=((96,), (128,)), stride=2, downsample=True)
    encoder = ResNetEncoder(encoder_config("resnet18", stages=(config.stages[0], narrow, *config.stages[2:])))
    with pytest.raises(
        PretrainedMismatch, match=r"layer2\.0\.conv1\.weight.*\(128, 64, 3, 3\).*\(96, 64, 3, 3\)"
    ):
        load_torchvision_resnet(encoder, path)


def test_missing_and_unexpected_keys(tv_resnet18: nn.Module, tmp_path: Path) -> None:
    state = dict(tv_resnet18.state_dict())
    del state["layer3.1.bn2.running_mean"]
    torch.save(state, tmp_path / "missing.pth")
    with pytest.raises(PretrainedMismatch, match=r"layer3\.1\.bn2\.running_mean"):
        load_torchvision_resnet(ResNetEncoder(encoder_config("resnet18")), tmp_path / "missing.pth")
    state = {**tv_resnet18.state_dict(), "layer1.2.conv1.weight": torch.zeros(64, 64, 3, 3)}
    torch.save(state, tmp_path / "extra.pth")
    with pytest.raises(PretrainedMismatch, match=r"layer1\.2\.conv1\.weight"):
        load_torchvision_resnet(ResNetEncoder(encoder_config("resnet18")), tmp_path / "extra.pth")


def test_refuses_deep_stem_and_avg_down(tv_resnet18: nn.Module, tmp_path: Path) -> None:
    path = _save(tv_resnet18, tmp_path / "r18.pth")
    deep = encoder_config("resnet18", stem=(32, 32, 64))
    with pytest.raises(PretrainedMismatch, match="deep stem"):
        load_torchvision_resnet(ResNetEncoder(deep), path)
    with pytest.raises(PretrainedMismatch, match="avg_down"):
        load_torchvision_resnet(ResNetEncoder(encoder_config("resnet18-os8", avg_down=True)), path)


def test_missing_file_is_not_downloaded(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        load_torchvision_resnet(ResNetEncoder(encoder_config("tiny")), tmp_path / "absent.pth")
