"""Trivial baselines: the floor every trained model must beat in the printed comparison table.

`fit_trivial` reads the training targets once and keeps one constant per task, as its kind
defines it (`training.kinds`: majority class, mean depth, mean normal, majority attribute
values, all-background edges); the resulting `TrivialPredictor` emits those constants in the
model output layouts, so it is evaluated by exactly the same metrics code as a model
(`evaluate_predictor`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from training.kinds import TRIVIAL_LOGIT, kind_of
from training.metrics import MultiTaskMetrics
from training.tasks import TaskSpec

__all__ = ["TRIVIAL_LOGIT", "Predictor", "TrivialPredictor", "evaluate_predictor", "fit_trivial", "trivial_names"]

Predictor = Callable[[Tensor], Mapping[str, Tensor]]


@dataclass(frozen=True)
class TrivialPredictor:
    """Constant per-task predictions; ``constants[name]`` is what the task's kind keeps (a class
    index, a depth in metres, a unit 3-vector, a 0/1 vector per attribute, ...)."""

    tasks: tuple[TaskSpec, ...]
    constants: Mapping[str, Tensor]

    def __call__(self, images: Tensor) -> dict[str, Tensor]:
        """Outputs for a batch of images ``[N, 3, H, W]``, in the layouts of `training.tasks`."""
        n, _, h, w = images.shape
        return {t.name: self._output(t, n, h, w, images) for t in self.tasks}

    def _output(self, task: TaskSpec, n: int, h: int, w: int, images: Tensor) -> Tensor:
        value = self.constants[task.name].to(images.device)
        return kind_of(task).trivial_output(task, value, n, h, w, images)


class _Accumulator:
    """Running sums/counts of one task's training targets."""

    def __init__(self, task: TaskSpec) -> None:
        self.task = task
        self.kind = kind_of(task)
        self.sums = torch.zeros(self.kind.trivial_width(task), dtype=torch.float64)
        self.count = 0

    def add(self, target: Tensor) -> None:
        sums, count = self.kind.trivial_sums(self.task, target.detach().cpu())
        self.sums += sums
        self.count += count

    def constant(self) -> Tensor:
        if self.count == 0:
            raise ValueError(
                f"task {self.task.name!r}: no valid {self.task.kind} target in the training batches"
            )
        return self.kind.trivial_constant(self.task, self.sums, self.count)


def trivial_names(tasks: Sequence[TaskSpec]) -> str:
    """What the trivial baselines of ``tasks`` predict, e.g. ``"majority class, mean depth"``."""
    return ", ".join(dict.fromkeys(kind_of(t).trivial for t in tasks))


def fit_trivial(tasks: Sequence[TaskSpec], batches: Iterable[Mapping[str, Tensor]]) -> TrivialPredictor:
    """Fit the per-task constants on training batches (dicts of batched targets by task name)."""
    accumulators = {t.name: _Accumulator(t) for t in tasks}
    for batch in batches:
        for name, acc in accumulators.items():
            acc.add(batch[name])
    return TrivialPredictor(tuple(tasks), {name: acc.constant() for name, acc in accumulators.items()})


def evaluate_predictor(
    predictor: Predictor,
    batches: Iterable[Mapping[str, Tensor]],
    tasks: Sequence[TaskSpec],
    *,
    device: torch.device | str | None = None,
    all_reduce: bool = True,
) -> dict[str, dict[str, float]]:
    """Metrics of ``predictor`` (a model or a `TrivialPredictor`) over ``batches``, without grads.

    ``device`` moves every batch tensor there first (None: leave them where they are). With
    ``all_reduce`` the states are summed across ranks when torch.distributed is initialised, so
    every rank must then evaluate (its shard of the set). A model's train/eval mode is the caller's
    business.
    """
    metrics = MultiTaskMetrics(tasks)
    with torch.no_grad():
        for batch in batches:
            if device is not None:
                batch = {
                    k: v.to(device, non_blocking=True) if isinstance(v, Tensor) else v
                    for k, v in batch.items()
                }
            metrics.update(predictor(batch["image"]), batch)
    if all_reduce:
        metrics.all_reduce()
    return metrics.compute()
