"""Trivial baselines: the floor every trained model must beat in the printed comparison table.

`fit_trivial` reads the training targets once and keeps one constant per task (majority class,
mean depth, mean normal, majority attribute values); the resulting `TrivialPredictor` emits those
constants in the model output layouts, so it is evaluated by exactly the same metrics code as a
model (`evaluate_predictor`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from training.metrics import MultiTaskMetrics
from training.tasks import TaskSpec

#: Magnitude of the constant logits: saturated enough that sigmoid/softmax are 0 or 1 in float32.
TRIVIAL_LOGIT = 10.0

Predictor = Callable[[Tensor], Mapping[str, Tensor]]


@dataclass(frozen=True)
class TrivialPredictor:
    """Constant per-task predictions; ``constants[name]`` is a class index (segmentation), a depth
    in metres, a unit 3-vector (normal) or a 0/1 vector per attribute."""

    tasks: tuple[TaskSpec, ...]
    constants: Mapping[str, Tensor]

    def __call__(self, images: Tensor) -> dict[str, Tensor]:
        """Outputs for a batch of images ``[N, 3, H, W]``, in the layouts of `training.tasks`."""
        n, _, h, w = images.shape
        return {t.name: self._output(t, n, h, w, images) for t in self.tasks}

    def _output(self, task: TaskSpec, n: int, h: int, w: int, images: Tensor) -> Tensor:
        value = self.constants[task.name].to(images.device)
        kw = {"dtype": images.dtype, "device": images.device}
        if task.kind == "segmentation":
            logits = TRIVIAL_LOGIT * F.one_hot(value.long(), task.channels).to(**kw)
            return logits.view(1, -1, 1, 1).expand(n, -1, h, w)
        if task.kind in ("depth", "normal"):
            return value.to(**kw).view(1, -1, 1, 1).expand(n, -1, h, w)
        return (TRIVIAL_LOGIT * (2 * value.to(**kw) - 1)).expand(n, -1)


class _Accumulator:
    """Running sums/counts of one task's training targets."""

    def __init__(self, task: TaskSpec) -> None:
        self.task = task
        size = {"segmentation": task.channels, "depth": 1, "normal": 3, "attributes": task.channels}[
            task.kind
        ]
        self.sums = torch.zeros(size, dtype=torch.float64)
        self.count = 0

    def add(self, target: Tensor) -> None:
        target = target.detach().cpu()
        kind = self.task.kind
        if kind == "segmentation":
            t = target.long()
            valid = t[(t >= 0) & (t < self.task.channels)]
            self.sums += torch.bincount(valid, minlength=self.task.channels).double()
            self.count += valid.numel()
        elif kind == "depth":
            valid = target[target != 0].double()
            self.sums += valid.sum()
            self.count += valid.numel()
        elif kind == "normal":
            vectors = target.double().movedim(1, -1).reshape(-1, 3)
            valid = vectors[(vectors != 0).any(dim=1)]
            self.sums += valid.sum(dim=0)
            self.count += valid.shape[0]
        else:
            self.sums += (target > 0.5).double().sum(dim=0)
            self.count += target.shape[0]

    def constant(self) -> Tensor:
        if self.count == 0:
            raise ValueError(
                f"task {self.task.name!r}: no valid {self.task.kind} target in the training batches"
            )
        kind = self.task.kind
        if kind == "segmentation":
            return self.sums.argmax()  # ties: the lowest class index
        if kind == "depth":
            return (self.sums / self.count).float()
        if kind == "normal":
            return _unit(self.sums)
        return (2 * self.sums > self.count).float()  # ties: 0 (negative)


def _unit(vector: Tensor) -> Tensor:
    """Normalise; a zero mean (normals cancelling out) falls back to +z, facing the camera."""
    norm = vector.norm()
    if norm == 0:
        return torch.tensor([0.0, 0.0, 1.0])
    return (vector / norm).float()


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
