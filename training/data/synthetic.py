"""The wrapper every built-in synthetic data set shares: option checking, sizes, caching,
augmentation and task selection around a renderer, plus `preview`, which draws a PNG grid for
eyeballing what a data set really looks like.

Samples are drawn on the fly from a numpy Generator seeded by ``(seed, split, index)``, so a sample
never has to be stored and is identical on every machine and in every DataLoader worker.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from training.data import transforms
from training.data.registry import SPLITS, DataError, DatasetSpec
from training.kinds import kind_of
from training.tasks import TaskSpec, select_tasks

SPLIT_IDS: dict[str, int] = {name: i for i, name in enumerate(SPLITS)}
AUTO_CACHE_LIMIT = 4096  # generated samples are cached by default up to this many per split
AUTO_CACHE_BYTES = 1 << 30  # ... and up to this much memory
BYTES_PER_PIXEL = 40  # upper bound of a cached sample: image, label, depth, normal and edge maps
MIN_SIDE = 32

# A renderer draws one sample: rng, (H, W) -> {"image": float32 (3, H, W), <task name>: numpy target}.
Renderer = Callable[[np.random.Generator, tuple[int, int]], dict[str, np.ndarray]]


# --------------------------------------------------------------------------- options and sizes


def resolve_options(dataset: str, options: Mapping[str, Any], defaults: Mapping[str, Any]) -> dict[str, Any]:
    """``defaults`` updated by ``options``; an unknown key raises `DataError` listing the valid ones."""
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        raise DataError(f"{dataset}: unknown option(s) {unknown}; valid options are {sorted(defaults)}")
    return {**defaults, **options}


def require_bool(dataset: str, options: Mapping[str, Any], key: str, allow_none: bool = False) -> None:
    """Reject non-boolean flags early (a YAML "no" must not silently become a truthy string)."""
    value = options[key]
    if not (isinstance(value, bool) or (allow_none and value is None)):
        raise DataError(f"{dataset}: option {key!r} must be true or false, got {value!r}")


def resolve_cache(dataset: str, options: Mapping[str, Any], length: int, size: tuple[int, int]) -> bool:
    """Option ``cache``: True/False, or None (default) for 'cache when there are at most 4096
    samples and they fit in about 1 GiB' (each DataLoader worker holds its own copy)."""
    require_bool(dataset, options, "cache", allow_none=True)
    if options["cache"] is not None:
        return options["cache"]
    return length <= AUTO_CACHE_LIMIT and length * size[0] * size[1] * BYTES_PER_PIXEL <= AUTO_CACHE_BYTES


def resolve_tasks(dataset: str, available: tuple[TaskSpec, ...], names: Any,
                  default: tuple[TaskSpec, ...] | None = None) -> tuple[TaskSpec, ...]:
    """`select_tasks` from ``available``; ``default`` (all of ``available`` when None) when no
    names are given. Its error is re-raised as a `DataError` naming the data set."""
    try:
        return select_tasks(available if names or default is None else default, names)
    except ValueError as err:
        raise DataError(f"{dataset}: {err}") from err


def resolve_size(dataset: str, spec: DatasetSpec, default: tuple[int, int]) -> tuple[int, int]:
    """The (H, W) to render at: ``spec.image_size`` or the data set's default."""
    size = tuple(spec.image_size) if spec.image_size is not None else default
    if len(size) != 2 or any(int(s) != s or s < MIN_SIDE for s in size):
        raise DataError(f"{dataset}: image_size must be two integers >= {MIN_SIDE} (height, width), "
                        f"got {size}")
    return int(size[0]), int(size[1])


def resolve_length(dataset: str, spec: DatasetSpec, defaults: Mapping[str, int], split: str) -> int:
    """How many samples split ``split`` has: ``spec.num_samples`` or the data set's default."""
    n = defaults[split] if spec.num_samples is None else spec.num_samples
    if int(n) != n or n < 1:
        raise DataError(f"{dataset}: num_samples must be a positive integer, got {n!r}")
    return int(n)


# --------------------------------------------------------------------------- the Dataset


class SyntheticDataset(Dataset):
    """Samples drawn on the fly by a renderer, deterministically from ``(seed, split, index)``.

    Un-augmented samples are optionally cached in memory (rendering is cheap but not free, and a
    small set is revisited every epoch). With ``augment`` on the train split, every access applies
    `training.data.transforms.augment_sample` with a generator derived from (seed, epoch, index),
    so augmentations differ between epochs yet replay exactly; call `set_epoch` once per epoch.
    """

    def __init__(self, *, split: str, spec: DatasetSpec, tasks: tuple[TaskSpec, ...],
                 image_size: tuple[int, int], length: int, renderer: Renderer, cache: bool) -> None:
        if int(spec.seed) != spec.seed or spec.seed < 0:
            raise DataError(f"seed must be a non-negative integer, got {spec.seed!r}")
        self.split = split
        self.seed = int(spec.seed)
        self.tasks = tasks
        self.image_size = image_size
        self.augment = bool(spec.augment) and split == "train"
        self.epoch = 0
        self._length = length
        self._renderer = renderer
        self._cache: dict[int, dict[str, np.ndarray]] | None = {} if cache else None

    def __len__(self) -> int:
        return self._length

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation stream for this epoch (no effect without augmentation)."""
        self.epoch = int(epoch)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if index < 0:
            index += self._length
        if not 0 <= index < self._length:
            raise IndexError(f"index {index} out of range for {self._length} samples")
        arrays = self._cache.get(index) if self._cache is not None else None
        if arrays is None:
            arrays = self.render(index)
            if self._cache is not None:
                self._cache[index] = arrays
        # numpy copies (not torch ops) keep the cache immutable without waking torch's thread pool
        sample = {key: torch.from_numpy(value.copy()) for key, value in arrays.items()}
        if self.augment:
            generator = transforms.sample_generator(self.seed, self.epoch, index)
            sample = transforms.augment_sample(sample, self.tasks, generator)
        return sample

    def render(self, index: int) -> dict[str, np.ndarray]:
        """Sample ``index`` as contiguous numpy arrays in the tensor layouts (no augmentation)."""
        rng = np.random.default_rng([self.seed, SPLIT_IDS[self.split], index])
        arrays = self._renderer(rng, self.image_size)
        sample = {"image": np.ascontiguousarray(arrays["image"])}
        for task in self.tasks:
            sample[task.name] = np.ascontiguousarray(arrays[task.name])
        return sample


# --------------------------------------------------------------------------- preview


def preview(dataset: Any, n: int, path: str) -> None:
    """Save a PNG grid, one row per sample: image, then every dense target as its kind draws it
    (invalid pixels black, so holes are easy to spot); other targets in the image's title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = dataset.tasks
    dense = [t for t in tasks if t.dense]
    cols = 1 + len(dense)
    fig, axes = plt.subplots(n, cols, figsize=(2.6 * cols, 2.2 * n), squeeze=False)
    for row in range(n):
        sample = dataset[row]
        axes[row, 0].imshow(sample["image"].permute(1, 2, 0).numpy())
        titles = [kind_of(t).caption(t, sample[t.name].numpy()) for t in tasks if not t.dense]
        axes[row, 0].set_title(" ".join(t for t in titles if t) or "image", fontsize=7)
        for col, task in enumerate(dense, start=1):
            picture = kind_of(task).preview(task, sample[task.name].numpy())
            axes[row, col].imshow(picture, interpolation="nearest")
            axes[row, col].set_title(task.name, fontsize=7)
    for ax in axes.flat:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
