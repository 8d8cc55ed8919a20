"""The built-in synthetic data sets: layouts, determinism, geometric consistency of the scene
targets, visibility and balance of the face attributes, options and previews."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from training.data import DataError, DatasetSpec, available_datasets, build_dataset
from training.data.synthetic import preview
from training.data.synthetic_faces import GLASSES, HAIR, MOUTH, SKIN, render_face
from training.data.synthetic_scenes import CLASSES, FLOOR, render_scene, sample_scene
from training.tasks import TaskSpec

CONFIGS = {
    "scenes": ("synthetic-scenes", {}),
    "faces-paper": ("synthetic-faces", {"preset": "paper"}),
    "faces-full": ("synthetic-faces", {"preset": "full"}),
}
EXPECTED_TASKS = {
    "scenes": ["segmentation", "depth", "normal"],
    "faces-paper": ["segmentation", "attributes"],
    "faces-full": ["segmentation", "attributes"],
}


def build(config: str, split: str = "train", **spec_kw):
    name, options = CONFIGS[config]
    spec_kw.setdefault("num_samples", 8)
    spec_kw["options"] = {"cache": False, **options, **spec_kw.get("options", {})}
    return build_dataset(name, split, DatasetSpec(**spec_kw))


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def scene_arrays(seed: int, size: tuple[int, int] = (96, 128)) -> dict[str, np.ndarray]:
    return render_scene(np.random.default_rng(seed), size)


def check_target(task: TaskSpec, target: torch.Tensor, size: tuple[int, int]) -> None:
    if task.kind == "segmentation":
        assert target.dtype == torch.int64 and tuple(target.shape) == size
        assert target.min() >= -1 and target.max() < task.channels
    elif task.kind == "depth":
        assert target.dtype == torch.float32 and tuple(target.shape) == (1, *size)
        assert target.min() >= 0 and target.max() < 12
    elif task.kind == "normal":
        assert target.dtype == torch.float32 and tuple(target.shape) == (3, *size)
    else:
        assert target.dtype == torch.float32 and tuple(target.shape) == (task.channels,)
        assert set(target.tolist()) <= {0.0, 1.0}


def test_both_sets_are_registered():
    assert {"synthetic-scenes", "synthetic-faces"} <= set(available_datasets())


@pytest.mark.parametrize("config", sorted(CONFIGS))
@pytest.mark.parametrize("size", [None, (64, 80)])
def test_sample_layout(config, size):
    dataset, info = build(config, image_size=size, num_samples=3)
    expected_size = size or ((96, 128) if config == "scenes" else (96, 96))
    assert info.image_size == expected_size and len(dataset) == 3
    assert [t.name for t in info.tasks] == EXPECTED_TASKS[config]
    for index in range(len(dataset)):
        sample = dataset[index]
        assert set(sample) == {"image"} | {t.name for t in info.tasks}
        image = sample["image"]
        assert image.dtype == torch.float32 and tuple(image.shape) == (3, *expected_size)
        assert image.min() >= 0 and image.max() <= 1 and image.std() > 0.05
        for task in info.tasks:
            check_target(task, sample[task.name], expected_size)


def test_presets_and_class_lists():
    _, paper = build("faces-paper")
    _, full = build("faces-full")
    assert paper.tasks[0].labels == ("background", "skin", "hair")
    assert paper.tasks[1].labels == ("Male", "Smiling")
    assert full.tasks[0].labels[:7] == ("background", "skin", "nose", "eye", "brow", "mouth", "hair")
    assert full.tasks[1].labels == ("Male", "Smiling", "Eyeglasses")
    _, scenes = build("scenes")
    assert scenes.tasks[0].labels == CLASSES and len(CLASSES) >= 6


def test_default_lengths():
    for split, n in (("train", 800), ("val", 200), ("test", 200)):
        for name in ("synthetic-scenes", "synthetic-faces"):
            assert len(build_dataset(name, split, DatasetSpec())[0]) == n


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_deterministic_per_seed_split_and_index(config):
    first, _ = build(config, seed=3)
    again, _ = build(config, seed=3, options={"cache": True})
    assert_same(first[2], again[2])
    assert_same(again[2], again[2])  # served from the cache, unchanged
    other_seed, _ = build(config, seed=4)
    other_split, _ = build(config, "val", seed=3)
    assert not torch.equal(first[2]["image"], other_seed[2]["image"])
    assert not torch.equal(first[2]["image"], other_split[2]["image"])
    assert not torch.equal(first[2]["image"], first[1]["image"])


def test_cache_returns_copies():
    dataset, _ = build("faces-paper", options={"cache": True})
    dataset[0]["image"].zero_()
    assert dataset[0]["image"].max() > 0


def test_index_out_of_range():
    dataset, _ = build("scenes", num_samples=2)
    assert torch.equal(dataset[-1]["depth"], dataset[1]["depth"])
    with pytest.raises(IndexError):
        dataset[2]


def test_invalid_pixels_marked_alike_in_every_task():
    for seed in range(6):
        out = scene_arrays(seed)
        invalid = out["segmentation"] == -1
        assert np.array_equal(invalid, out["depth"][0] == 0)
        assert np.array_equal(invalid, np.all(out["normal"] == 0, axis=0))
        assert 0.03 <= invalid.mean() <= 0.08
        assert out["image"][:, invalid].std() > 0  # the image is rendered there


def test_invalid_pixels_can_be_switched_off():
    dataset, _ = build("scenes", options={"invalid_pixels": False}, num_samples=2)
    assert (dataset[0]["segmentation"] >= 0).all() and (dataset[0]["depth"] > 0).all()


def test_normals_are_unit_face_the_camera_and_agree_with_depth():
    """Back-projecting depth along each pixel's ray must put every floor pixel on the plane
    n . P = -camera height, with n the (constant) floor normal: depth and normals agree."""
    h, w = 96, 128
    for seed in range(4):
        out, scene = scene_arrays(seed, (h, w)), sample_scene(np.random.default_rng(seed), w)
        valid = out["segmentation"] >= 0
        normal = out["normal"][:, valid]
        np.testing.assert_allclose(np.linalg.norm(normal, axis=0), 1, atol=1e-4)
        v, u = np.mgrid[0:h, 0:w] + 0.5
        ray = np.stack([(u - w / 2) / scene.camera.focal, (v - h / 2) / scene.camera.focal, np.ones_like(u)])
        assert ((normal * ray[:, valid]).sum(0) < 0).all()
        floor = out["segmentation"] == FLOOR
        floor_normal = out["normal"][:, floor]
        np.testing.assert_allclose(floor_normal, floor_normal[:, :1].repeat(floor.sum(), 1), atol=1e-5)
        points = out["depth"][0][floor] * ray[:, floor]
        np.testing.assert_allclose(floor_normal[:, 0] @ points, -scene.camera.origin[1], atol=2e-3)


def test_scenes_show_all_classes_and_plausible_depth():
    counts = np.zeros(len(CLASSES))
    for seed in range(12):
        out = scene_arrays(seed)
        seg = out["segmentation"]
        counts += np.bincount(seg[seg >= 0], minlength=len(CLASSES))
        depth = out["depth"][0][seg >= 0]
        assert depth.min() > 0.05 and depth.max() < 10
    assert (counts > 0).sum() >= 6
    assert counts[FLOOR] / counts.sum() > 0.1


def face_stats(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[bool]]:
    attributes, teeth, hair, dark_frames = [], [], [], []
    for i in range(n):
        out = render_face(np.random.default_rng([0, 0, i]), (96, 96), preset="full")
        image, seg = out["image"], out["segmentation"]
        attributes.append(out["attributes"])
        whiteness = image.min(axis=0)  # teeth are bright in every channel, lips are not
        teeth.append((whiteness[seg == MOUTH] > np.percentile(whiteness[seg == SKIN], 90) + 0.05).mean())
        hair.append((seg == HAIR).mean())
        luminance = image.mean(axis=0)
        if (seg == GLASSES).any():
            dark_frames.append(luminance[seg == GLASSES].mean() < np.median(luminance[seg == SKIN]))
    return np.array(attributes), np.array(teeth), np.array(hair), dark_frames


def test_face_attributes_are_balanced_and_visible():
    attributes, teeth, hair, dark_frames = face_stats(200)
    assert ((attributes.mean(0) > 0.3) & (attributes.mean(0) < 0.7)).all(), attributes.mean(0)
    male, smiling, glasses = (attributes[:, k] == 1 for k in range(3))
    assert ((teeth > 0.1) == smiling).mean() > 0.9  # smiles show teeth
    assert hair[male].mean() < 0.7 * hair[~male].mean()  # men mostly have short hair
    assert len(dark_frames) == glasses.sum() and np.mean(dark_frames) > 0.8


def test_paper_preset_merges_face_parts_into_skin():
    full = render_face(np.random.default_rng(7), (96, 96), preset="full")
    paper = render_face(np.random.default_rng(7), (96, 96), preset="paper")
    np.testing.assert_array_equal(full["image"], paper["image"])
    assert set(np.unique(paper["segmentation"])) <= {0, 1, 2}
    np.testing.assert_array_equal(paper["segmentation"] == 2, full["segmentation"] == HAIR)
    np.testing.assert_array_equal(paper["attributes"], full["attributes"][:2])


def test_task_selection():
    dataset, info = build("scenes", tasks=("normal", "segmentation"))
    assert [t.name for t in info.tasks] == ["normal", "segmentation"]
    assert set(dataset[0]) == {"image", "normal", "segmentation"}
    dataset, info = build("faces-full", tasks=("attributes",))
    assert set(dataset[0]) == {"image", "attributes"} and info.tasks[0].channels == 3
    with pytest.raises(DataError, match="surface"):
        build("scenes", tasks=("surface",))


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_unknown_option_names_the_key_and_the_valid_ones(config):
    with pytest.raises(DataError, match=r"'colour'.*cache"):
        build(config, options={"colour": True})


@pytest.mark.parametrize(
    "config, options, match",
    [
        ("faces-paper", {"preset": "celeb"}, "preset"),
        ("scenes", {"cache": "yes"}, "cache"),
        ("scenes", {"invalid_pixels": 1}, "invalid_pixels"),
    ],
)
def test_bad_option_values(config, options, match):
    with pytest.raises(DataError, match=match):
        build(config, options=options)


def test_bad_sizes():
    with pytest.raises(DataError, match="image_size"):
        build("scenes", image_size=(8, 8))
    with pytest.raises(DataError, match="num_samples"):
        build("faces-paper", num_samples=0)


def test_augmentation_on_train_only_and_replayable():
    plain, _ = build("scenes", num_samples=6)
    augmented, _ = build("scenes", num_samples=6, augment=True)
    validation, _ = build("scenes", "val", num_samples=6, augment=True)
    plain_val, _ = build("scenes", "val", num_samples=6)
    assert_same(validation[0], plain_val[0])
    assert augmented.epoch == 0
    changed = [not torch.equal(augmented[i]["image"], plain[i]["image"]) for i in range(6)]
    assert any(changed)
    assert_same(augmented[1], augmented[1])
    epoch0 = [augmented[i]["image"] for i in range(6)]
    augmented.set_epoch(1)
    assert any(not torch.equal(a, augmented[i]["image"]) for i, a in enumerate(epoch0))
    sample = augmented[0]
    assert set(sample) == set(plain[0]) and sample["segmentation"].dtype == torch.int64


def test_preview_writes_a_png(tmp_path):
    dataset, _ = build("scenes", num_samples=2)
    path = tmp_path / "scenes.png"
    preview(dataset, 2, str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
