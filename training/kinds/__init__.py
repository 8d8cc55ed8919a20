"""The task kinds on the training side, one module each in this package.

`kind(name)` returns the `TrainingKind` of a kind name, `kind_of(task)` that of a task, `KINDS`
maps every name to its object. Kinds register themselves by subclassing `TrainingKind` in a module
of this package: every module here is imported on first use, so a new kind is one new file (next to
its contract module in `parsimony.tasks`, whose name it takes).

| kind           | loss                          | primary metric         | trivial baseline     | heads          |
|----------------|-------------------------------|------------------------|----------------------|----------------|
| `segmentation` | cross-entropy                 | ``miou`` ↑             | majority class       | light, aspp    |
| `depth`        | L1 (metres)                   | ``abs_err`` ↓          | mean depth           | light, aspp    |
| `normal`       | 1 − cosine                    | ``mean`` (degrees) ↓   | mean direction       | light, aspp    |
| `attributes`   | binary cross-entropy          | ``mean_acc`` ↑         | majority per attribute | pool_linear  |
| `edges`        | class-balanced binary CE      | ``ods_f`` ↑            | all background       | light, aspp    |
"""

from __future__ import annotations

from parsimony.tasks import TaskSpec, UnknownKind, discover, kind_names
from training.kinds.base import TRIVIAL_LOGIT, Metric, TrainingKind

__all__ = ["KINDS", "TRIVIAL_LOGIT", "Metric", "TrainingKind", "UnknownKind", "kind", "kind_of", "names"]

KINDS: dict[str, TrainingKind] = {}


def _discover() -> dict[str, TrainingKind]:
    if not KINDS:
        contract = kind_names()
        found = discover(__name__, __path__, TrainingKind)
        for name, cls in found.items():
            if name not in contract:
                raise RuntimeError(f"training kind {name!r} ({cls}) has no contract module in parsimony.tasks "
                                   f"(it has {list(contract)}); add parsimony/tasks/{name}.py")
        KINDS.update((name, found[name]()) for name in sorted(found, key=contract.index))
    return KINDS


def names() -> tuple[str, ...]:
    """The kinds training knows, in the order of `parsimony.tasks.kind_names`."""
    return tuple(_discover())


def kind(name: str, *, task: str | None = None) -> TrainingKind:
    """The `TrainingKind` called ``name``; `UnknownKind` (naming the task, when given) otherwise."""
    kinds = _discover()
    if name not in kinds:
        which = f"task {task!r} has kind {name!r}" if task else f"task kind {name!r}"
        raise UnknownKind(f"{which}, which training does not know (it trains {list(kinds)}); use one of those, "
                          f"or add training/kinds/{name}.py")
    return kinds[name]


def kind_of(task: TaskSpec) -> TrainingKind:
    """The `TrainingKind` of ``task``."""
    return kind(task.kind, task=task.name)
