"""Data-set registry: every data set (built-in synthetic or real) is built through `build_dataset`.

A builder is registered under a name with `@register_dataset(name)` and called as
``builder(split, spec)`` where ``spec`` is a `DatasetSpec`; it returns a `torch.utils.data.Dataset`
whose items are dicts ``{"image": float32 [3, H, W] in [0, 1], <task name>: target, ...}`` (layouts
in `training.tasks`) and a `DatasetInfo` naming the tasks it provides.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch.utils.data import Dataset

from training.tasks import TaskSpec

SPLITS = ("train", "val", "test")


class DataError(ValueError):
    """A data root is missing or malformed, or a data-set option is invalid. The message names the
    path or option and says what was expected."""


@dataclass(frozen=True)
class DatasetSpec:
    """What to build, independent of the split.

    ``image_size`` is (height, width); None keeps the data set's native size. ``num_samples``
    caps the number of samples (synthetic sets generate exactly this many; real sets take the
    first N). ``tasks`` selects tasks by name (None: all the data set provides). ``options`` holds
    data-set specific settings (for example ``{"preset": "paper"}`` for celebamask-hq).
    """

    root: str | None = None
    image_size: tuple[int, int] | None = None
    num_samples: int | None = None
    tasks: tuple[str, ...] | None = None
    seed: int = 0
    augment: bool = False
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    tasks: tuple[TaskSpec, ...]
    image_size: tuple[int, int]


Builder = Callable[[str, DatasetSpec], "tuple[Dataset, DatasetInfo]"]
_REGISTRY: dict[str, Builder] = {}


def register_dataset(name: str) -> Callable[[Builder], Builder]:
    def wrap(fn: Builder) -> Builder:
        if name in _REGISTRY:
            raise ValueError(f"data set {name!r} is registered twice")
        _REGISTRY[name] = fn
        return fn

    return wrap


def available_datasets() -> list[str]:
    return sorted(_REGISTRY)


def build_dataset(name: str, split: str, spec: DatasetSpec | None = None) -> tuple[Dataset, DatasetInfo]:
    """Build split ``split`` of data set ``name``."""
    if name not in _REGISTRY:
        raise DataError(f"unknown data set {name!r}; choose one of {available_datasets()}")
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; choose one of {SPLITS}")
    return _REGISTRY[name](split, spec or DatasetSpec())
