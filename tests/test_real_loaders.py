"""The NYU-v2 and CelebAMask-HQ loaders against tiny fixtures in the exact on-disk layouts."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from format_fixtures import (
    ATTRIBUTE_FILE,
    CELEBA_PARTS,
    IMAGE_DIR,
    MAPPING_FILE,
    MASK_DIR,
    celeba_split_orig_idx,
    write_celebamask,
    write_nyuv2,
)
from PIL import Image

from training.data import DataError, DatasetSpec, available_datasets, build_dataset

NYU_HW = (24, 32)
FACE = 64


@pytest.fixture(scope="module")
def nyu_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_nyuv2(tmp_path_factory.mktemp("nyu"), n_train=4, n_val=3, size=NYU_HW)


@pytest.fixture
def nyu_copy(tmp_path: Path) -> Path:
    """A fresh root the test may break."""
    return write_nyuv2(tmp_path / "nyu", n_train=4, n_val=3, size=NYU_HW)


@pytest.fixture(scope="module")
def face_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_celebamask(tmp_path_factory.mktemp("faces"), n=6, size=FACE)


@pytest.fixture
def face_copy(tmp_path: Path) -> Path:
    return write_celebamask(tmp_path / "faces", n=6, size=FACE)


def nyu(root: Path, split: str = "train", **kw):
    return build_dataset("nyuv2", split, DatasetSpec(root=str(root), **kw))


def faces(root: Path, split: str = "train", **kw):
    kw.setdefault("image_size", (FACE, FACE))
    return build_dataset("celebamask-hq", split, DatasetSpec(root=str(root), **kw))


def test_both_loaders_are_registered() -> None:
    assert {"nyuv2", "celebamask-hq"} <= set(available_datasets())


# --------------------------------------------------------------------------------------- NYU-v2


def test_nyu_sample_layout_and_values(nyu_root: Path) -> None:
    ds, info = nyu(nyu_root)
    assert len(ds) == 4 and info.image_size == NYU_HW
    assert [t.name for t in info.tasks] == ["segmentation", "depth", "normal"]
    assert info.tasks[0].channels == 13 and info.tasks[0].labels[0] == "bed"
    s = ds[1]
    layout = {k: (tuple(v.shape), v.dtype) for k, v in s.items()}
    assert layout == {
        "image": ((3, *NYU_HW), torch.float32),
        "segmentation": (NYU_HW, torch.int64),
        "depth": ((1, *NYU_HW), torch.float32),
        "normal": ((3, *NYU_HW), torch.float32),
    }
    disk = {m: np.load(nyu_root / "train" / m / "1.npy") for m in ("image", "label", "depth", "normal")}
    assert torch.equal(s["image"][:, 5, 7], torch.from_numpy(disk["image"][5, 7]))
    assert torch.equal(s["segmentation"], torch.from_numpy(disk["label"].astype(np.int64)))
    assert (s["segmentation"] == -1).any()  # the ignore label survives
    assert torch.equal(s["depth"][0], torch.from_numpy(disk["depth"][..., 0]))
    assert torch.equal(s["normal"][:, 3, 4], torch.from_numpy(disk["normal"][3, 4]))


def test_nyu_val_and_test_read_the_val_folder(nyu_root: Path) -> None:
    val, _ = nyu(nyu_root, "val")
    test, _ = nyu(nyu_root, "test")
    assert len(val) == len(test) == 3
    assert torch.equal(val[2]["depth"], test[2]["depth"])
    assert torch.equal(test[2]["depth"][0], torch.from_numpy(np.load(nyu_root / "val/depth/2.npy")[..., 0]))


def test_nyu_indices_sort_numerically_and_num_samples_takes_the_first(tmp_path: Path) -> None:
    root = write_nyuv2(tmp_path, n_train=12, n_val=1, size=(4, 6))
    ds, _ = nyu(root)
    assert [p.stem for p in ds.files["image"]] == [str(i) for i in range(12)]
    first, _ = nyu(root, num_samples=3)
    assert len(first) == 3 and torch.equal(first[2]["image"], ds[2]["image"])


def test_nyu_task_selection_reads_only_selected_modalities(nyu_copy: Path) -> None:
    shutil.rmtree(nyu_copy / "train" / "label")
    shutil.rmtree(nyu_copy / "train" / "normal")
    ds, info = nyu(nyu_copy, tasks=("depth",))
    assert [t.name for t in info.tasks] == ["depth"] and set(ds[0]) == {"image", "depth"}


def test_nyu_image_size_resizes_everything(nyu_root: Path) -> None:
    ds, info = nyu(nyu_root, image_size=(12, 16))
    s = ds[0]
    assert info.image_size == (12, 16)
    assert s["image"].shape == (3, 12, 16) and s["segmentation"].shape == (12, 16)
    assert s["depth"].shape == (1, 12, 16) and s["normal"].shape == (3, 12, 16)


def test_nyu_0_255_images_and_hw_depth_are_accepted(nyu_copy: Path) -> None:
    image = np.load(nyu_copy / "train/image/0.npy")
    np.save(nyu_copy / "train/image/0.npy", (image * 255).astype(np.uint8))
    depth = np.load(nyu_copy / "train/depth/0.npy")
    np.save(nyu_copy / "train/depth/0.npy", depth[..., 0])
    s = nyu(nyu_copy)[0][0]
    torch.testing.assert_close(s["image"], torch.from_numpy(image.transpose(2, 0, 1)), atol=1 / 255, rtol=0)
    assert torch.equal(s["depth"][0], torch.from_numpy(depth[..., 0]))


def test_nyu_out_of_range_labels_become_ignore_with_one_warning(nyu_copy: Path) -> None:
    for i in (0, 1):
        label = np.load(nyu_copy / f"train/label/{i}.npy")
        label[0, :3] = [13, 255, 2.5]
        np.save(nyu_copy / f"train/label/{i}.npy", label)
    ds, _ = nyu(nyu_copy)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first, second = ds[0], ds[1]
    assert first["segmentation"][0, :3].tolist() == [-1, -1, -1]
    assert second["segmentation"][0, :3].tolist() == [-1, -1, -1]
    assert len(caught) == 1 and "0.npy" in str(caught[0].message)


def test_nyu_augment_is_reproducible_and_train_only(nyu_root: Path) -> None:
    ds, _ = nyu(nyu_root, augment=True, seed=3)
    again, _ = nyu(nyu_root, augment=True, seed=3)
    plain, _ = nyu(nyu_root)
    outcomes = set()
    for epoch in range(6):
        ds.set_epoch(epoch)
        again.set_epoch(epoch)
        a, b = ds[0], again[0]
        assert all(torch.equal(a[k], b[k]) for k in a)
        assert a["depth"].shape == plain[0]["depth"].shape
        outcomes.add(torch.equal(a["segmentation"], plain[0]["segmentation"]))
    assert False in outcomes
    val, _ = nyu(nyu_root, "val", augment=True)
    val_plain, _ = nyu(nyu_root, "val")
    val.set_epoch(5)
    assert torch.equal(val[0]["normal"], val_plain[0]["normal"])


def test_nyu_errors_missing_root_split_and_modality(nyu_copy: Path) -> None:
    with pytest.raises(DataError, match="nowhere"):
        nyu(nyu_copy / "nowhere")
    shutil.rmtree(nyu_copy / "val")
    with pytest.raises(DataError, match=str(nyu_copy / "val")):
        nyu(nyu_copy, "test")
    shutil.rmtree(nyu_copy / "train" / "normal")
    with pytest.raises(DataError, match=str(nyu_copy / "train" / "normal")):
        nyu(nyu_copy)
    nyu(nyu_copy, tasks=("segmentation", "depth"))  # normals not selected: fine


def test_nyu_error_mismatched_file_sets_names_missing_indices(nyu_copy: Path) -> None:
    (nyu_copy / "train/depth/2.npy").unlink()
    with pytest.raises(DataError, match="2.npy") as err:
        nyu(nyu_copy)
    assert str(nyu_copy / "train" / "depth") in str(err.value)


def test_nyu_error_empty_split(nyu_copy: Path) -> None:
    for folder in (nyu_copy / "val").iterdir():
        for f in folder.iterdir():
            f.unlink()
    with pytest.raises(DataError, match="no .npy files"):
        nyu(nyu_copy, "val")


def test_nyu_error_wrong_shape_names_file_and_shapes(nyu_copy: Path) -> None:
    path = nyu_copy / "train/normal/1.npy"
    np.save(path, np.zeros((24, 30, 3), np.float32))
    ds, _ = nyu(nyu_copy)
    with pytest.raises(DataError) as err:
        ds[1]
    message = str(err.value)
    assert str(path) in message and "(24, 30, 3)" in message and "(24, 32, 3)" in message


def test_nyu_errors_options_and_tasks(nyu_root: Path) -> None:
    with pytest.raises(DataError, match="no options"):
        nyu(nyu_root, options={"preset": "paper"})
    with pytest.raises(DataError, match="attributes"):
        nyu(nyu_root, tasks=("attributes",))


# -------------------------------------------------------------------------------- CelebAMask-HQ


def part_masks(root: Path, n: int) -> dict[str, np.ndarray]:
    """The part masks the fixture wrote for image ``n`` (channel 0 non-zero)."""
    out = {}
    for part in CELEBA_PARTS:
        path = root / MASK_DIR / str(n // 2000) / f"{n:05d}_{part}.png"
        if path.exists():
            array = np.asarray(Image.open(path))
            out[part] = (array[..., 0] if array.ndim == 3 else array) != 0
    return out


def attribute_row(root: Path, n: int) -> list[float]:
    for line in (root / ATTRIBUTE_FILE).read_text().splitlines()[2:]:
        fields = line.split()
        if fields[0] == f"{n}.jpg":
            return [1.0 if v == "1" else 0.0 for v in fields[1:]]
    raise KeyError(n)


def test_faces_split_assignment_by_orig_idx(face_root: Path) -> None:
    expected = {"train": [0, 3], "val": [1, 4], "test": [2, 5]}
    for split, indices in expected.items():
        ds, _ = faces(face_root, split)
        assert ds.indices == indices
    assert [celeba_split_orig_idx(i) for i in range(3)] == [162770, 162772, 182640]


def test_faces_full_preset_layout_and_overwrite_order(face_root: Path) -> None:
    ds, info = faces(face_root, "val", options={"preset": "full"})
    assert info.tasks[0].channels == 19 and info.tasks[0].labels[13] == "hair"
    assert info.tasks[1].channels == 40 and info.tasks[1].labels[20] == "Male"
    s = ds[0]  # image 1
    assert s["image"].shape == (3, FACE, FACE) and s["image"].dtype == torch.float32
    assert s["segmentation"].dtype == torch.int64 and s["attributes"].dtype == torch.float32
    masks = part_masks(face_root, 1)
    # class ids grow in overwrite order, so the winning part is the largest id present
    expected = np.max([(CELEBA_PARTS.index(p) + 1) * m for p, m in masks.items()], axis=0)
    assert torch.equal(s["segmentation"], torch.from_numpy(expected.astype(np.int64)))
    seg, c = s["segmentation"], FACE // 2
    assert (
        seg[c, c] == 2 and seg[1, c] == 13 and seg[0, 0] == 0 and seg[FACE - 1, 0] == 18 and seg[1, 1] == 14
    )
    assert s["attributes"].tolist() == attribute_row(face_root, 1)


def test_faces_paper_preset_merges_to_three_classes(face_root: Path) -> None:
    ds, info = faces(face_root)
    assert info.tasks[0].labels == ("background", "skin", "hair")
    assert info.tasks[1].labels == ("Male", "Smiling")
    seg, c = ds[0]["segmentation"], FACE // 2
    assert seg[c, c] == 1 and seg[1, c] == 2 and seg[1, 1] == 0 and seg[FACE - 1, 0] == 0 and seg[0, 0] == 0
    masks = part_masks(face_root, 0)
    later = [masks[p] for p in CELEBA_PARTS[CELEBA_PARTS.index("hair") + 1 :] if p in masks]
    hair_wins = masks["hair"] & ~np.any(later, axis=0)
    assert torch.equal(seg == 2, torch.from_numpy(hair_wins))
    assert set(seg.unique().tolist()) == {0, 1, 2}


def test_faces_male_and_smiling_map_to_one_and_zero(face_root: Path) -> None:
    train, _ = faces(face_root, "train")
    assert train[0]["attributes"].tolist() == [1.0, 0.0]  # image 0: Male, not smiling
    assert train[1]["attributes"].tolist() == [0.0, 1.0]  # image 3: smiling, not Male


def test_faces_attribute_override(face_root: Path) -> None:
    ds, info = faces(face_root, "test", options={"attributes": ["Young", "Smiling"]})
    assert info.tasks[1].labels == ("Young", "Smiling")
    row = attribute_row(face_root, 2)
    assert ds[0]["attributes"].tolist() == [row[39], row[31]]
    with pytest.raises(DataError, match="Wearing_Necktie") as err:
        faces(face_root, options={"attributes": ["Happy"]})
    assert "Happy" in str(err.value)


def test_faces_default_size_num_samples_and_task_selection(face_copy: Path) -> None:
    ds, info = faces(face_copy, "test", image_size=None, num_samples=1)
    assert len(ds) == 1 and info.image_size == (256, 256)
    s = ds[0]
    assert s["image"].shape == (3, 256, 256) and s["segmentation"].shape == (256, 256)
    assert 0 <= s["image"].min() and s["image"].max() <= 1
    (face_copy / ATTRIBUTE_FILE).unlink()
    seg_only, info = faces(face_copy, tasks=("segmentation",))
    assert [t.name for t in info.tasks] == ["segmentation"] and set(seg_only[0]) == {"image", "segmentation"}


def test_faces_attributes_only_needs_no_masks(face_copy: Path) -> None:
    shutil.rmtree(face_copy / MASK_DIR)
    ds, _ = faces(face_copy, tasks=("attributes",))
    assert set(ds[0]) == {"image", "attributes"}


def test_faces_augment_flips_and_swaps_left_right(face_root: Path) -> None:
    plain, _ = faces(face_root, options={"preset": "full"})
    aug, _ = faces(face_root, options={"preset": "full"}, augment=True)
    base = plain[0]["segmentation"]
    mirrored = base.flip(-1).clone()
    l_eye, r_eye = mirrored == 4, mirrored == 5
    mirrored[l_eye], mirrored[r_eye] = 5, 4
    seen = set()
    for epoch in range(8):
        aug.set_epoch(epoch)
        seg = aug[0]["segmentation"]
        seen.add("flip" if torch.equal(seg, mirrored) else "same" if torch.equal(seg, base) else "other")
    assert seen == {"flip", "same"}


def test_faces_errors_root_folders_and_files(face_copy: Path) -> None:
    with pytest.raises(DataError, match="nowhere"):
        faces(face_copy / "nowhere")
    (face_copy / IMAGE_DIR / "3.jpg").unlink()
    with pytest.raises(DataError, match="3.jpg"):
        faces(face_copy, "train")
    (face_copy / MAPPING_FILE).unlink()
    with pytest.raises(DataError, match=MAPPING_FILE):
        faces(face_copy, "val")
    shutil.rmtree(face_copy / IMAGE_DIR)
    with pytest.raises(DataError, match=IMAGE_DIR):
        faces(face_copy)


def test_faces_errors_mask_folder(face_copy: Path) -> None:
    shutil.rmtree(face_copy / MASK_DIR)
    with pytest.raises(DataError, match=MASK_DIR):
        faces(face_copy)


@pytest.mark.parametrize(
    "edit, where",
    [
        (lambda lines: ["30000"] + lines[1:], "line 1"),
        (lambda lines: ["many"] + lines[1:], "line 1"),
        (lambda lines: lines[:1] + ["Male Smiling"] + lines[2:], "line 2"),
        (lambda lines: lines[:3] + [lines[3] + " 1"] + lines[4:], "line 4"),
        (
            lambda lines: lines[:4] + [lines[4].replace(" -1", " 0", 1).replace(" 1", " 0", 1)] + lines[5:],
            "line 5",
        ),
    ],
    ids=["count-mismatch", "count-not-a-number", "names", "extra-value", "bad-value"],
)
def test_faces_malformed_attribute_file_names_the_line(face_copy: Path, edit, where: str) -> None:
    path = face_copy / ATTRIBUTE_FILE
    path.write_text("\n".join(edit(path.read_text().splitlines())) + "\n")
    with pytest.raises(DataError, match=where) as err:
        faces(face_copy)
    assert str(path) in str(err.value)


def test_faces_missing_attribute_file(face_copy: Path) -> None:
    (face_copy / ATTRIBUTE_FILE).unlink()
    with pytest.raises(DataError, match=ATTRIBUTE_FILE):
        faces(face_copy)


def test_faces_errors_options(face_root: Path) -> None:
    with pytest.raises(DataError, match="colour"):
        faces(face_root, options={"colour": True})
    with pytest.raises(DataError, match="tiny"):
        faces(face_root, options={"preset": "tiny"})
    with pytest.raises(DataError, match="depth"):
        faces(face_root, tasks=("depth",))
