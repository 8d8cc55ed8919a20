"""Data sets: built-in synthetic ones (the default, no downloads) and loaders for the real ones."""

# Importing the modules registers their data sets.
from training.data import celebamask, nyuv2, synthetic_faces, synthetic_scenes  # noqa: E402,F401
from training.data.registry import (
    SPLITS,
    DataError,
    DatasetInfo,
    DatasetSpec,
    available_datasets,
    build_dataset,
    register_dataset,
)

__all__ = [
    "SPLITS",
    "DataError",
    "DatasetInfo",
    "DatasetSpec",
    "available_datasets",
    "build_dataset",
    "register_dataset",
]
