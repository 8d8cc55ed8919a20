"""Package namespaces that import their submodules on first use (PEP 562).

``training.models`` and ``training.export`` re-export names from submodules that need PyTorch.
Importing them eagerly made every user of a torch-free piece (the manifest reader, the tensor spec,
the model config) load PyTorch: the serving gateway paid 3 s of start-up and ~470 MB of memory
for it. With `lazy_exports` the package's names
resolve on first access, so ``from training.models import create_model`` still works, while
``from training.models.config import ModelConfig`` loads only that module.
"""

from __future__ import annotations

import importlib
import sys


def lazy_exports(package: str, modules: dict[str, tuple[str, ...]]):
    """``(__getattr__, __dir__, __all__)`` for ``package``: ``modules`` maps each submodule (relative
    to ``package``, e.g. ``".config"``) to the public names it defines."""
    where = {name: module for module, names in modules.items() for name in names}

    def getattr_(name: str) -> object:
        if name not in where:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(where[name], package), name)
        sys.modules[package].__dict__[name] = value  # resolve once: later lookups are plain attribute reads
        return value

    def dir_() -> list[str]:
        return sorted(where)

    return getattr_, dir_, sorted(where)
