"""Package namespaces that import their submodules on first use (PEP 562).

``training.models`` and ``training.export`` re-export names from submodules that need PyTorch.
Importing them eagerly made every user of a torch-free piece (the manifest reader, the tensor spec,
the model config) load PyTorch: the serving gateway paid ~3 s of start-up and several hundred MB
for it, and its container image had to carry torch. With `lazy_exports` the package's names
resolve on first access, so ``from training.models import create_model`` still works, while
``from training.models.config import ModelConfig`` loads only that module.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable


def lazy_exports(package: str, exports: dict[str, str]) -> tuple[Callable[[str], object], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for ``package``: ``exports`` maps each public name to the module
    (relative to ``package``, e.g. ``".config"``) that defines it."""

    def getattr_(name: str) -> object:
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(exports[name], package), name)
        globals_ = importlib.import_module(package).__dict__
        globals_[name] = value  # resolve once: later lookups are plain attribute reads
        return value

    def dir_() -> list[str]:
        return sorted(exports)

    return getattr_, dir_
