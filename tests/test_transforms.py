"""Tests for the sample transforms: flips, scale-crops and resizes keep every target's meaning."""

from __future__ import annotations

import pytest
import torch

from training.data.transforms import (
    SCALES,
    augment_sample,
    hflip_sample,
    resize_nearest,
    resize_sample,
    sample_generator,
    scale_crop_sample,
)
from training.tasks import TaskSpec

H, W = 24, 30
TASKS = (
    TaskSpec("seg", "segmentation", 5),
    TaskSpec("depth", "depth", 1),
    TaskSpec("normal", "normal", 3),
    TaskSpec("attrs", "attributes", 2),
)


def make_sample(seed: int = 0, depth_value: float | None = None) -> dict:
    """A random sample with some ignore labels, invalid depth and invalid (all-zero) normals."""
    g = torch.Generator().manual_seed(seed)
    seg = torch.randint(-1, 5, (H, W), generator=g)
    invalid = torch.rand(H, W, generator=g) < 0.2
    depth = (
        torch.rand(1, H, W, generator=g) * 5 + 0.5
        if depth_value is None
        else torch.full((1, H, W), depth_value)
    )
    depth[0][invalid] = 0.0
    normal = torch.nn.functional.normalize(torch.randn(3, H, W, generator=g), dim=0)
    normal[:, invalid] = 0.0
    return {
        "image": torch.rand(3, H, W, generator=g),
        "seg": seg,
        "depth": depth,
        "normal": normal,
        "attrs": torch.tensor([1.0, 0.0]),
    }


def test_flip_negates_normal_x_and_mirrors_maps() -> None:
    s = make_sample()
    f = hflip_sample(s, TASKS)
    assert torch.equal(f["normal"][0], -s["normal"][0].flip(-1))
    assert torch.equal(f["normal"][1:], s["normal"][1:].flip(-1))
    assert torch.equal(f["seg"], s["seg"].flip(-1))
    assert torch.equal(f["depth"], s["depth"].flip(-1))
    assert torch.equal(f["image"], s["image"].flip(-1))
    assert f["attrs"] is s["attrs"]


def test_flip_is_an_involution_and_keeps_invalid_normals_zero() -> None:
    s = make_sample()
    twice = hflip_sample(hflip_sample(s, TASKS), TASKS)
    for key in s:
        assert torch.equal(twice[key], s[key]), key
    once = hflip_sample(s, TASKS)
    zero = (once["normal"] == 0).all(0)
    assert torch.equal(zero, (s["normal"] == 0).all(0).flip(-1))
    assert not torch.signbit(once["normal"][:, zero]).any()  # +0.0, never -0.0


def test_flip_does_not_modify_the_input() -> None:
    s = make_sample()
    before = s["normal"].clone()
    hflip_sample(s, TASKS)
    assert torch.equal(s["normal"], before)


@pytest.mark.parametrize("scale", [1.2, 1.5])
def test_scale_crop_divides_constant_depth_by_scale(scale: float) -> None:
    s = make_sample(depth_value=3.0)
    s["depth"] = torch.full((1, H, W), 3.0)
    out = scale_crop_sample(s, TASKS, scale, 0.3, 0.7)
    torch.testing.assert_close(out["depth"], torch.full((1, H, W), 3.0 / scale))


@pytest.mark.parametrize("scale", SCALES)
def test_scale_crop_keeps_invalid_pixels_consistent(scale: float) -> None:
    s = make_sample(seed=3)
    invalid = s["depth"][0] == 0  # make_sample marks the same pixels invalid in depth and normal
    s["seg"][invalid] = -1
    out = scale_crop_sample(s, TASKS, scale, 0.9, 0.1)
    ignore = out["seg"] == -1
    assert torch.equal(out["depth"][0] == 0, (out["normal"] == 0).all(0))
    assert (out["depth"][0][ignore] == 0).any() and (out["depth"][0] == 0).sum() <= ignore.sum()
    assert (ignore | ~(out["depth"][0] == 0)).all()  # every invalid depth pixel is also ignored
    valid = ~(out["normal"] == 0).all(0)
    torch.testing.assert_close(out["normal"][:, valid].norm(dim=0), torch.ones(int(valid.sum())))
    assert set(out["seg"].unique().tolist()) <= set(s["seg"].unique().tolist())


def test_scale_crop_is_a_zoom_of_the_chosen_window() -> None:
    s = make_sample()
    out = scale_crop_sample(s, TASKS, 1.5, 0.0, 0.0)  # top-left window of 16 x 20
    assert torch.equal(out["seg"], resize_nearest(s["seg"][:16, :20], (H, W)))


def test_augment_is_deterministic_per_seed_epoch_index() -> None:
    s = make_sample()
    a = augment_sample(s, TASKS, sample_generator(1, 2, 3))
    b = augment_sample(s, TASKS, sample_generator(1, 2, 3))
    for key in s:
        assert torch.equal(a[key], b[key]), key
    outcomes = {
        tuple(augment_sample(s, TASKS, sample_generator(1, epoch, 3))["seg"].flatten()[:40].tolist())
        for epoch in range(12)
    }
    assert len(outcomes) > 1  # different epochs give different augmentations


def test_augment_does_not_depend_on_which_tasks_are_present() -> None:
    s = make_sample()
    full = augment_sample(s, TASKS, sample_generator(0, 0, 5))
    seg_only = augment_sample({"image": s["image"], "seg": s["seg"]}, TASKS, sample_generator(0, 0, 5))
    assert torch.equal(full["seg"], seg_only["seg"])
    assert set(seg_only) == {"image", "seg"}


def test_sample_generator_differs_between_indices() -> None:
    draws = {tuple(torch.rand(4, generator=sample_generator(0, 0, i)).tolist()) for i in range(50)}
    assert len(draws) == 50


def test_augment_preserves_shapes_dtypes_and_attributes() -> None:
    s = make_sample()
    for index in range(10):
        out = augment_sample(s, TASKS, sample_generator(0, 0, index))
        for key in s:
            assert out[key].shape == s[key].shape and out[key].dtype == s[key].dtype, key
        assert torch.equal(out["attrs"], s["attrs"])
        assert out["image"].min() >= 0 and out["image"].max() <= 1


def test_resize_sample_shapes_and_values() -> None:
    s = make_sample()
    out = resize_sample(s, TASKS, (12, 15))
    assert out["image"].shape == (3, 12, 15)
    assert out["seg"].shape == (12, 15) and out["seg"].dtype == torch.int64
    assert out["depth"].shape == (1, 12, 15) and out["normal"].shape == (3, 12, 15)
    assert set(out["seg"].unique().tolist()) <= set(s["seg"].unique().tolist())
    assert set(out["depth"].unique().tolist()) <= set(s["depth"].unique().tolist())  # not rescaled
    assert torch.equal(out["attrs"], s["attrs"])
    same = resize_sample(s, TASKS, (H, W))
    assert torch.equal(same["image"], s["image"]) and torch.equal(same["seg"], s["seg"])


def test_resize_upsamples_by_an_integer_factor_exactly() -> None:
    seg = torch.arange(6).reshape(2, 3)
    assert torch.equal(resize_nearest(seg, (4, 6)), seg.repeat_interleave(2, 0).repeat_interleave(2, 1))
