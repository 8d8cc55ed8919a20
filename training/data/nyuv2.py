"""NYU-v2 as preprocessed for multi-task benchmarks (the MTAN / LibMTL layout, docs/DATA.md).

```
root/train/{image,label,depth,normal}/{i}.npy     795 samples
root/val/{image,label,depth,normal}/{i}.npy       654 samples
```

The benchmark has no separate validation set: the 654 official test images live in ``val/`` and
serve as the test set of every published number. Split ``"train"`` reads ``train/``; splits
``"val"`` and ``"test"`` both read ``val/`` (hold out part of ``train/`` yourself if early stopping
must not see test images).

On disk: image H x W x 3 float in [0, 1] (0..255 is detected and rescaled), label H x W with
classes 0..12 and -1 = ignore, depth H x W x 1 (or H x W) in metres with 0 = invalid, normal
H x W x 3 unit vectors with all-zero = invalid. Only the modalities of the selected tasks are
read. Shapes are checked when a sample is loaded and reported with the file's path.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from training.data.registry import DataError, DatasetInfo, DatasetSpec, register_dataset
from training.data.transforms import augment_sample, resize_sample, sample_generator
from training.tasks import TaskSpec, select_tasks

NYU_CLASSES: tuple[str, ...] = (
    "bed", "books", "ceiling", "chair", "floor", "furniture", "objects", "painting", "sofa",
    "table", "tv", "wall", "window",
)  # fmt: skip
TASKS: tuple[TaskSpec, ...] = (
    TaskSpec("segmentation", "segmentation", len(NYU_CLASSES), NYU_CLASSES),
    TaskSpec("depth", "depth", 1),
    TaskSpec("normal", "normal", 3),
)
MODALITY: dict[str, str] = {"segmentation": "label", "depth": "depth", "normal": "normal"}
"""Folder holding each task's targets; the image folder is always read."""
SPLIT_DIRS: dict[str, str] = {"train": "train", "val": "val", "test": "val"}
NATIVE_SIZE: tuple[int, int] = (288, 384)


# ----------------------------------------------------------------------------- file discovery


def _indices(folder: Path) -> dict[int, Path]:
    """``{i: folder/i.npy}`` for every ``.npy`` file; a non-integer stem is a layout error."""
    found: dict[int, Path] = {}
    for path in folder.glob("*.npy"):
        if not path.stem.isdigit():
            raise DataError(f"{path}: expected files named <integer>.npy (MTAN layout)")
        found[int(path.stem)] = path
    return found


def _check_same_indices(files: dict[str, dict[int, Path]], split_dir: Path) -> list[int]:
    """The common sorted index list; raise naming a few indices a modality lacks."""
    union = set().union(*(set(f) for f in files.values()))
    for modality, found in files.items():
        missing = sorted(union - set(found))
        if missing:
            shown = ", ".join(f"{i}.npy" for i in missing[:5]) + (" ..." if len(missing) > 5 else "")
            raise DataError(
                f"{split_dir / modality}: {len(missing)} file(s) present in other modalities are "
                f"missing here: {shown}"
            )
    return sorted(union)


def _discover(root: Path, split: str, modalities: list[str]) -> dict[str, list[Path]]:
    """Validate the layout of one split and list its files per modality, in index order."""
    if not root.is_dir():
        raise DataError(f"NYU-v2 root {root} does not exist; expected {root}/{{train,val}}/image/0.npy ...")
    split_dir = root / SPLIT_DIRS[split]
    if not split_dir.is_dir():
        raise DataError(f"NYU-v2 split folder {split_dir} is missing (split {split!r} reads it)")
    files = {}
    for modality in modalities:
        folder = split_dir / modality
        if not folder.is_dir():
            raise DataError(f"NYU-v2 folder {folder} is missing; it holds the {modality!r} files")
        files[modality] = _indices(folder)
    indices = _check_same_indices(files, split_dir)
    if not indices:
        raise DataError(f"NYU-v2 split folder {split_dir} holds no .npy files")
    return {m: [files[m][i] for i in indices] for m in modalities}


# ------------------------------------------------------------------------------- conversions


def _load(path: Path) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: cannot be read as a .npy array ({err})") from err


def _shape_error(path: Path, array: np.ndarray, expected: str) -> DataError:
    return DataError(f"{path} has shape {tuple(array.shape)}; expected {expected}")


def _to_image(path: Path, array: np.ndarray) -> torch.Tensor:
    """H x W x 3 -> float32 [3, H, W] in [0, 1]; a max above 1.5 means 0..255 storage."""
    if array.ndim != 3 or array.shape[2] != 3:
        raise _shape_error(path, array, "(H, W, 3)")
    image = array.astype(np.float32)
    if image.size and image.max() > 1.5:
        image = image / 255.0
    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))


def _to_label(path: Path, array: np.ndarray, hw: tuple[int, int]) -> tuple[torch.Tensor, int]:
    """H x W -> int64 [H, W]; values that are not -1 or an integer in [0, 13) become -1.

    Returns the label map and how many pixels were replaced, so the caller can warn once.
    """
    if array.shape != hw:
        raise _shape_error(path, array, str(hw))
    valid = (array == -1) | ((array >= 0) & (array < len(NYU_CLASSES)) & (np.floor(array) == array))
    label = np.where(valid, array, -1).astype(np.int64)
    return torch.from_numpy(label), int((~valid).sum())


def _to_depth(path: Path, array: np.ndarray, hw: tuple[int, int]) -> torch.Tensor:
    """H x W x 1 or H x W metres -> float32 [1, H, W]."""
    if array.shape not in (hw + (1,), hw):
        raise _shape_error(path, array, f"{hw + (1,)} or {hw}")
    return torch.from_numpy(np.ascontiguousarray(array.reshape((1,) + hw), dtype=np.float32))


def _to_normal(path: Path, array: np.ndarray, hw: tuple[int, int]) -> torch.Tensor:
    """H x W x 3 -> float32 [3, H, W]."""
    if array.shape != hw + (3,):
        raise _shape_error(path, array, str(hw + (3,)))
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1), dtype=np.float32))


# ------------------------------------------------------------------------------------ dataset


class NYUv2Dataset(Dataset):
    """Reads one split lazily; resizes to ``image_size`` and augments (train only) on load."""

    def __init__(
        self,
        files: dict[str, list[Path]],
        tasks: tuple[TaskSpec, ...],
        image_size: tuple[int, int] | None,
        augment: bool,
        seed: int,
    ) -> None:
        self.files = files
        self.tasks = tasks
        self.image_size = image_size
        self.augment = augment
        self.seed = seed
        self.epoch = 0
        self._warned_labels = False

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation stream; call before each epoch so resumed runs replay it."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.files["image"])

    def _warn_labels(self, path: Path, count: int) -> None:
        if count and not self._warned_labels:
            self._warned_labels = True
            warnings.warn(
                f"{path}: {count} label value(s) outside 0..{len(NYU_CLASSES) - 1} and not -1 were "
                "set to -1 (ignore); further occurrences in this data set are not reported",
                stacklevel=3,
            )

    def _target(self, task: TaskSpec, index: int, hw: tuple[int, int]) -> torch.Tensor:
        path = self.files[MODALITY[task.name]][index]
        array = _load(path)
        if task.kind == "segmentation":
            label, bad = _to_label(path, array, hw)
            self._warn_labels(path, bad)
            return label
        if task.kind == "depth":
            return _to_depth(path, array, hw)
        return _to_normal(path, array, hw)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        image_path = self.files["image"][index]
        image = _to_image(image_path, _load(image_path))
        hw = (int(image.shape[1]), int(image.shape[2]))
        sample = {"image": image}
        for task in self.tasks:
            sample[task.name] = self._target(task, index, hw)
        if self.image_size is not None:
            sample = resize_sample(sample, self.tasks, self.image_size)
        if self.augment:
            sample = augment_sample(sample, self.tasks, sample_generator(self.seed, self.epoch, index))
        return sample


def _native_size(path: Path) -> tuple[int, int]:
    """Height and width of the first image, read from the .npy header only (memory-mapped)."""
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: cannot be read as a .npy array ({err})") from err
    if array.ndim != 3 or array.shape[2] != 3:
        raise _shape_error(path, array, "(H, W, 3)")
    return int(array.shape[0]), int(array.shape[1])


def _check_spec(spec: DatasetSpec) -> tuple[TaskSpec, ...]:
    if spec.root is None:
        raise DataError(
            "nyuv2 needs a data root (spec.root); expected root/{train,val}/{image,label,depth,normal}/"
        )
    if spec.options:
        raise DataError(f"nyuv2 takes no options, got {sorted(spec.options)}")
    if spec.num_samples is not None and spec.num_samples < 1:
        raise DataError(f"num_samples must be >= 1, got {spec.num_samples}")
    try:
        return select_tasks(TASKS, spec.tasks)
    except ValueError as err:
        raise DataError(f"nyuv2: {err}") from err


@register_dataset("nyuv2")
def build_nyuv2(split: str, spec: DatasetSpec) -> tuple[NYUv2Dataset, DatasetInfo]:
    """Build one split. ``num_samples`` keeps the first N indices (all when fewer exist);
    ``augment`` applies to the train split only."""
    tasks = _check_spec(spec)
    modalities = ["image"] + [MODALITY[t.name] for t in tasks]
    files = _discover(Path(spec.root), split, modalities)
    if spec.num_samples is not None:
        files = {m: paths[: spec.num_samples] for m, paths in files.items()}
    resize = (int(spec.image_size[0]), int(spec.image_size[1])) if spec.image_size is not None else None
    augment = spec.augment and split == "train"
    dataset = NYUv2Dataset(files, tasks, resize, augment, spec.seed)
    size = resize or _native_size(files["image"][0])
    return dataset, DatasetInfo(name="nyuv2", tasks=tasks, image_size=size)
