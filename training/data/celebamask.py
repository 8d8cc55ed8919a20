"""CelebAMask-HQ in its original release layout (docs/DATA.md).

```
root/CelebA-HQ-img/<n>.jpg                                  1024 x 1024 RGB
root/CelebAMask-HQ-mask-anno/<n // 2000>/<n:05d>_<part>.png 512 x 512, one file per part present
root/CelebAMask-HQ-attribute-anno.txt                       count, 40 names, "<n>.jpg" + 40 x ±1
root/CelebA-HQ-to-CelebA-mapping.txt                        "idx orig_idx orig_file" + rows
```

Part masks are combined into 19 classes in the documented order, later parts overwriting earlier
ones (`FULL_CLASSES`); a mask pixel belongs to its part when channel 0 is non-zero. The split
follows CelebA's by ``orig_idx``: < 162771 train, < 182638 val, otherwise test.

Options (``spec.options``):

- ``preset``: ``"paper"`` (default) reproduces the source paper's tasks: segmentation reduced to
  3 classes (background, skin, hair) and the attributes Male and Smiling. ``"full"`` keeps the 19
  classes and all 40 attributes.
- ``attributes``: a list of attribute names replacing the preset's.

The paper does not publish its 3-class merge. We use: hair = {hair}; skin = every part of the
face and neck surface {skin, nose, eye_g, l_eye, r_eye, l_brow, r_brow, l_ear, r_ear, mouth,
u_lip, l_lip, neck}; background = everything else {background, hat, ear_r (earring), neck_l
(necklace), cloth}, i.e. accessories and clothing count as background.

Images and masks have different native sizes, so both are always resized to ``spec.image_size``
(default 256 x 256, the paper's input): images bilinearly with antialiasing, masks with nearest
neighbour. ``augment`` (train split only) is a horizontal flip with probability 0.5; in the
19-class preset it also swaps the left/right classes (l_eye/r_eye, l_brow/r_brow, l_ear/r_ear),
which a mirror exchanges. No scale-crop: the faces are aligned, and the paper uses none.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from training.data.registry import DataError, DatasetInfo, DatasetSpec, register_dataset
from training.data.transforms import hflip_sample, resize_image, resize_nearest, sample_generator
from training.tasks import TaskSpec, select_tasks

FULL_CLASSES: tuple[str, ...] = (
    "background", "skin", "nose", "eye_g", "l_eye", "r_eye", "l_brow", "r_brow", "l_ear",
    "r_ear", "mouth", "u_lip", "l_lip", "hair", "hat", "ear_r", "neck_l", "neck", "cloth",
)  # fmt: skip
PAPER_CLASSES: tuple[str, ...] = ("background", "skin", "hair")
_SKIN_PARTS = frozenset(FULL_CLASSES[1:13]) | {"neck"}
PAPER_LUT = torch.tensor(
    [2 if c == "hair" else 1 if c in _SKIN_PARTS else 0 for c in FULL_CLASSES], dtype=torch.int64
)
"""19-class index -> 3-class index (0 background, 1 skin, 2 hair)."""
_MIRROR_PAIRS = (("l_eye", "r_eye"), ("l_brow", "r_brow"), ("l_ear", "r_ear"))  # l_lip is "lower"
_MIRROR = {a: b for pair in _MIRROR_PAIRS for a, b in (pair, pair[::-1])}
FLIP_LUT = torch.tensor([FULL_CLASSES.index(_MIRROR.get(c, c)) for c in FULL_CLASSES], dtype=torch.int64)
"""19-class index -> the class a horizontal mirror turns it into (left and right parts swap)."""
PRESETS: dict[str, tuple[str, ...] | None] = {"paper": ("Male", "Smiling"), "full": None}
"""Attributes of each preset (None: all the attribute file lists)."""
OPTION_KEYS = frozenset({"preset", "attributes"})
TRAIN_END, VAL_END = 162771, 182638
DEFAULT_SIZE: tuple[int, int] = (256, 256)
IMAGE_DIR = "CelebA-HQ-img"
MASK_DIR = "CelebAMask-HQ-mask-anno"
ATTRIBUTE_FILE = "CelebAMask-HQ-attribute-anno.txt"
MAPPING_FILE = "CelebA-HQ-to-CelebA-mapping.txt"


# ---------------------------------------------------------------------------- annotation files


@dataclass(frozen=True)
class AttributeTable:
    """The parsed attribute file: names in file order and one {0, 1} row per image index."""

    names: tuple[str, ...]
    rows: dict[int, np.ndarray]


def _read_lines(path: Path, what: str) -> list[str]:
    if not path.is_file():
        raise DataError(f"CelebAMask-HQ {what} {path} is missing")
    return path.read_text().splitlines()


def _parse_image_name(path: Path, lineno: int, field: str) -> int:
    stem, dot, ext = field.partition(".")
    if not (stem.isdigit() and dot and ext.lower() == "jpg"):
        raise DataError(f"{path} line {lineno}: expected '<n>.jpg' as the first field, got {field!r}")
    return int(stem)


def _parse_attribute_row(path: Path, lineno: int, line: str, width: int) -> tuple[int, np.ndarray]:
    fields = line.split()
    if len(fields) != width + 1:
        raise DataError(
            f"{path} line {lineno}: expected '<n>.jpg' and {width} values, got {len(fields) - 1} values"
        )
    bad = [v for v in fields[1:] if v not in ("1", "-1")]
    if bad:
        raise DataError(f"{path} line {lineno}: attribute values must be 1 or -1, got {bad[0]!r}")
    return _parse_image_name(path, lineno, fields[0]), np.array([v == "1" for v in fields[1:]], np.float32)


def read_attributes(path: Path) -> AttributeTable:
    """Parse the attribute file; ±1 becomes 1/0. Errors name the line."""
    lines = [line for line in _read_lines(path, "attribute file") if line.strip()]
    if len(lines) < 2:
        raise DataError(f"{path}: expected a count line and a line of attribute names")
    count = lines[0].strip()
    if not count.isdigit():
        raise DataError(f"{path} line 1: expected the number of images, got {count!r}")
    names = tuple(lines[1].split())
    if len(names) != 40:
        raise DataError(f"{path} line 2: expected the 40 CelebA attribute names, got {len(names)} names")
    rows = dict(_parse_attribute_row(path, no, line, len(names)) for no, line in enumerate(lines[2:], 3))
    if len(rows) != int(count):
        raise DataError(f"{path} line 1: says {count} images but the file has {len(rows)} distinct rows")
    return AttributeTable(names, rows)


def split_of(orig_idx: int) -> str:
    """CelebA's standard partition of its original image index."""
    return "train" if orig_idx < TRAIN_END else "val" if orig_idx < VAL_END else "test"


def read_split(path: Path, split: str) -> list[int]:
    """CelebA-HQ indices whose CelebA ``orig_idx`` falls in ``split``, sorted."""
    lines = _read_lines(path, "mapping file")
    if not lines or lines[0].split()[:2] != ["idx", "orig_idx"]:
        raise DataError(f"{path} line 1: expected the header 'idx orig_idx orig_file'")
    chosen = []
    for lineno, line in enumerate(lines[1:], 2):
        fields = line.split()
        if not fields:
            continue
        if len(fields) < 2 or not (fields[0].isdigit() and fields[1].isdigit()):
            raise DataError(f"{path} line {lineno}: expected 'idx orig_idx orig_file', got {line.strip()!r}")
        if split_of(int(fields[1])) == split:
            chosen.append(int(fields[0]))
    return sorted(chosen)


# ------------------------------------------------------------------------------------ options


def _check_options(options: dict[str, Any]) -> tuple[str, tuple[str, ...] | None]:
    """Validate ``spec.options``; return the preset and the attribute override (None: preset's)."""
    unknown = sorted(set(options) - OPTION_KEYS)
    if unknown:
        raise DataError(
            f"celebamask-hq: unknown option(s) {unknown}; valid options are {sorted(OPTION_KEYS)}"
        )
    preset = options.get("preset", "paper")
    if preset not in PRESETS:
        raise DataError(f"celebamask-hq: unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    override = options.get("attributes")
    if override is not None:
        if isinstance(override, str) or not override or not all(isinstance(a, str) for a in override):
            raise DataError(
                f"celebamask-hq: option 'attributes' must be a non-empty list of names, got {override!r}"
            )
        if len(set(override)) != len(override):
            raise DataError(f"celebamask-hq: option 'attributes' names an attribute twice: {list(override)}")
        override = tuple(override)
    return preset, override


def _attribute_columns(wanted: tuple[str, ...], table: AttributeTable, path: Path) -> list[int]:
    unknown = [a for a in wanted if a not in table.names]
    if unknown:
        raise DataError(
            f"celebamask-hq: unknown attribute(s) {unknown} (from {path}); valid names: {list(table.names)}"
        )
    return [table.names.index(a) for a in wanted]


# ------------------------------------------------------------------------------------ samples


def mask_paths(root: Path, index: int) -> list[tuple[int, Path]]:
    """``(class, path)`` for every part, in overwrite order (files may be absent)."""
    folder = root / MASK_DIR / str(index // 2000)
    return [(c, folder / f"{index:05d}_{part}.png") for c, part in enumerate(FULL_CLASSES) if c > 0]


def load_label(root: Path, index: int) -> torch.Tensor:
    """Combine the part PNGs of one image into an int64 [H, W] map of the 19 classes."""
    folder = root / MASK_DIR / str(index // 2000)
    if not folder.is_dir():
        raise DataError(
            f"CelebAMask-HQ mask folder {folder} is missing (it holds the masks of image {index})"
        )
    label: np.ndarray | None = None
    for cls, path in mask_paths(root, index):
        if not path.is_file():
            continue
        part = np.asarray(Image.open(path))
        part = part[..., 0] if part.ndim == 3 else part
        if label is None:
            label = np.zeros(part.shape, np.int64)
        if part.shape != label.shape:
            raise DataError(f"{path} has shape {part.shape}; expected {label.shape} like the other parts")
        label[part != 0] = cls
    if label is None:
        raise DataError(f"{folder}: no part mask for image {index} (expected {index:05d}_<part>.png files)")
    return torch.from_numpy(label)


def load_image(path: Path) -> torch.Tensor:
    """RGB image -> float32 [3, H, W] in [0, 1]."""
    try:
        with Image.open(path) as img:
            pixels = np.asarray(img.convert("RGB"), dtype=np.float32)
    except OSError as err:
        raise DataError(f"{path}: cannot be read as an image ({err})") from err
    return torch.from_numpy(pixels.transpose(2, 0, 1) / 255.0)


class CelebAMaskDataset(Dataset):
    """Reads images, part masks and attribute rows lazily; resizes everything to one size."""

    def __init__(
        self,
        root: Path,
        indices: list[int],
        tasks: tuple[TaskSpec, ...],
        attributes: dict[int, np.ndarray] | None,
        preset: str,
        image_size: tuple[int, int],
        augment: bool,
        seed: int,
    ) -> None:
        self.root, self.indices, self.tasks = root, indices, tasks
        self.attributes = attributes
        self.preset, self.image_size = preset, image_size
        self.augment, self.seed, self.epoch = augment, seed, 0

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation stream; call before each epoch so resumed runs replay it."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.indices)

    def _target(self, task: TaskSpec, n: int) -> torch.Tensor:
        if task.kind == "attributes":
            return torch.from_numpy(self.attributes[n].copy())
        label = load_label(self.root, n)
        label = PAPER_LUT[label] if self.preset == "paper" else label
        return resize_nearest(label, self.image_size)

    def _flip(self, sample: dict, index: int) -> dict:
        if float(torch.rand(1, generator=sample_generator(self.seed, self.epoch, index))) >= 0.5:
            return sample
        flipped = hflip_sample(sample, self.tasks)
        if self.preset == "full" and "segmentation" in flipped:
            flipped["segmentation"] = FLIP_LUT[flipped["segmentation"]]
        return flipped

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        n = self.indices[index]
        sample = {"image": resize_image(load_image(self.root / IMAGE_DIR / f"{n}.jpg"), self.image_size)}
        for task in self.tasks:
            sample[task.name] = self._target(task, n)
        return self._flip(sample, index) if self.augment else sample


# ------------------------------------------------------------------------------------ builder


def _available_tasks(preset: str, attributes: tuple[str, ...]) -> tuple[TaskSpec, ...]:
    classes = PAPER_CLASSES if preset == "paper" else FULL_CLASSES
    return (
        TaskSpec("segmentation", "segmentation", len(classes), classes),
        TaskSpec("attributes", "attributes", len(attributes), attributes),
    )


def _load_attributes(
    root: Path, wanted: tuple[str, ...] | None, indices: list[int]
) -> tuple[tuple[str, ...], dict]:
    """Read the attribute file; return the chosen names and each listed image's {0, 1} vector."""
    path = root / ATTRIBUTE_FILE
    table = read_attributes(path)
    names = wanted if wanted is not None else table.names
    columns = _attribute_columns(names, table, path)
    missing = [n for n in indices if n not in table.rows]
    if missing:
        raise DataError(f"{path}: no row for image(s) {[f'{n}.jpg' for n in missing[:5]]}")
    return names, {n: table.rows[n][columns] for n in indices}


def _check_root(spec: DatasetSpec) -> Path:
    if spec.root is None:
        raise DataError(
            f"celebamask-hq needs a data root (spec.root) holding {IMAGE_DIR}/ and the annotation files"
        )
    root = Path(spec.root)
    if not root.is_dir():
        raise DataError(f"CelebAMask-HQ root {root} does not exist")
    if not (root / IMAGE_DIR).is_dir():
        raise DataError(
            f"CelebAMask-HQ image folder {root / IMAGE_DIR} is missing; expected <n>.jpg files there"
        )
    if spec.num_samples is not None and spec.num_samples < 1:
        raise DataError(f"num_samples must be >= 1, got {spec.num_samples}")
    return root


def _split_indices(root: Path, split: str, num_samples: int | None) -> list[int]:
    indices = read_split(root / MAPPING_FILE, split)[:num_samples]
    if not indices:
        raise DataError(f"{root / MAPPING_FILE}: no image falls in split {split!r}")
    for n in indices:
        if not (root / IMAGE_DIR / f"{n}.jpg").is_file():
            raise DataError(f"image {root / IMAGE_DIR / f'{n}.jpg'} is listed in {MAPPING_FILE} but missing")
    return indices


@register_dataset("celebamask-hq")
def build_celebamask(split: str, spec: DatasetSpec) -> tuple[CelebAMaskDataset, DatasetInfo]:
    """Build one split; the attribute file is read only when the attributes task is selected."""
    preset, override = _check_options(spec.options)
    root = _check_root(spec)
    selected = spec.tasks if spec.tasks else ("segmentation", "attributes")
    indices = _split_indices(root, split, spec.num_samples)
    names, attributes = (), None
    if "attributes" in selected:
        names, attributes = _load_attributes(root, override or PRESETS[preset], indices)
    try:
        tasks = select_tasks(_available_tasks(preset, names), spec.tasks)
    except ValueError as err:
        raise DataError(f"celebamask-hq: {err}") from err
    if "segmentation" in selected and not (root / MASK_DIR).is_dir():
        raise DataError(
            f"CelebAMask-HQ mask folder {root / MASK_DIR} is missing; expected <n // 2000>/<n:05d>_<part>.png"
        )
    size = (int(spec.image_size[0]), int(spec.image_size[1])) if spec.image_size is not None else DEFAULT_SIZE
    dataset = CelebAMaskDataset(
        root, indices, tasks, attributes, preset, size, spec.augment and split == "train", spec.seed
    )
    return dataset, DatasetInfo(name="celebamask-hq", tasks=tasks, image_size=size)
