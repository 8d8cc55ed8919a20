"""Binary attributes of the whole image on the training side: binary cross-entropy, accuracy and
F1 per attribute, the majority value per attribute as the trivial baseline."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from parsimony.tasks import TaskSpec
from training.kinds.base import TRIVIAL_LOGIT, Metric, TrainingKind, check_layout

_TEMPLATES = ("{name}_acc", "{name}_f1")  # the metrics of one attribute
_MEANS = ("mean_acc", "mean_f1")


def attribute_names(task: TaskSpec) -> tuple[str, ...]:
    """The attribute names used in metric keys: the task's labels, or ``attr<i>`` without labels."""
    return task.labels or tuple(f"attr{i}" for i in range(task.channels))


class AttributeMetric(Metric):
    """Per-attribute accuracy and F1 (percent) with the prediction logit > 0 (sigmoid > 0.5).

    F1 = 2TP / (2TP + FP + FN); when that denominator is 0 (no positive target and no positive
    prediction in the whole set) F1 is reported as 0, the scikit-learn ``zero_division=0``
    convention. ``mean_acc`` and ``mean_f1`` average over attributes.
    """

    def __init__(self, names: Sequence[str]) -> None:
        names = tuple(names)
        keys = [t.format(name=n) for n in names for t in _TEMPLATES] + list(_MEANS)
        if not names or len(set(keys)) != len(keys):
            raise ValueError(f"attribute names must be non-empty, unique and not 'mean': {names}")
        self.names = names
        super().__init__()

    def _zero_state(self, device: torch.device) -> list[Tensor]:
        return [torch.zeros(4, len(self.names), dtype=torch.int64, device=device)]  # TP, FP, FN, TN

    def update(self, output: Tensor, target: Tensor) -> None:
        ok = output.dim() == 2 and output.shape[1] == len(self.names)
        check_layout(ok and output.shape == target.shape, output, target, f"[N, {len(self.names)}]")
        (counts,) = self._on(output.device)
        pred = output.detach() > 0
        true = target.to(output.device) > 0.5
        for i, cell in enumerate((pred & true, pred & ~true, ~pred & true, ~pred & ~true)):
            counts[i] += cell.sum(dim=0)

    def compute(self) -> dict[str, float]:
        tp, fp, fn, tn = self._state[0].double()
        total = tp + fp + fn + tn
        acc = torch.where(total > 0, 100.0 * (tp + tn) / total.clamp_min(1), torch.full_like(tp, math.nan))
        f1_denom = 2 * tp + fp + fn
        f1 = torch.where(f1_denom > 0, 100.0 * 2 * tp / f1_denom.clamp_min(1), torch.zeros_like(tp))
        f1 = torch.where(total > 0, f1, torch.full_like(tp, math.nan))
        result: dict[str, float] = {}
        for i, name in enumerate(self.names):
            result[f"{name}_acc"] = float(acc[i])
            result[f"{name}_f1"] = float(f1[i])
        result["mean_acc"] = float(acc.mean())
        result["mean_f1"] = float(f1.mean())
        return result


class Attributes(TrainingKind):
    name = "attributes"
    heads = ("pool_linear",)
    primary = "mean_acc"
    higher_is_better = frozenset(_MEANS)
    trivial = "majority attributes"

    def loss(self, task: TaskSpec, output: Tensor, target: Tensor) -> Tensor:
        """Binary cross-entropy on logits, mean over samples and attributes."""
        if output.dim() != 2 or tuple(output.shape) != tuple(target.shape):
            raise ValueError(
                f"task {task.name!r} (attributes): output {tuple(output.shape)} and target "
                f"{tuple(target.shape)} must both be [N, A]"
            )
        return F.binary_cross_entropy_with_logits(output, target.to(output.dtype))

    def metric(self, task: TaskSpec) -> Metric:
        return AttributeMetric(attribute_names(task))

    def metric_names(self, task: TaskSpec) -> tuple[str, ...]:
        return self.delta_metric_names(task) + _MEANS

    def direction(self, metric: str) -> int:
        """Every attribute metric (``<name>_acc``, ``<name>_f1`` and their means) is higher-better."""
        if metric.endswith(("_acc", "_f1")):
            return 1
        return super().direction(metric)

    def delta_metric_names(self, task: TaskSpec) -> tuple[str, ...]:
        return tuple(t.format(name=n) for n in attribute_names(task) for t in _TEMPLATES)

    def table_metric_names(self, task: TaskSpec) -> tuple[str, ...]:
        return self.metric_names(task)

    def trivial_sums(self, task: TaskSpec, target: Tensor) -> tuple[Tensor, int]:
        """Positive counts per attribute (the majority value wins)."""
        return (target > 0.5).double().sum(dim=0), target.shape[0]

    def trivial_constant(self, task: TaskSpec, sums: Tensor, count: int) -> Tensor:
        return (2 * sums > count).float()  # ties: 0 (negative)

    def trivial_output(self, task: TaskSpec, constant: Tensor, n: int, h: int, w: int, like: Tensor) -> Tensor:
        return (TRIVIAL_LOGIT * (2 * constant.to(dtype=like.dtype, device=like.device) - 1)).expand(n, -1)

    def final_outputs(self, task: TaskSpec, raw: Tensor) -> dict[str, Tensor]:
        """The probability of each attribute ``[N, A]`` (the answer's map, in attribute order)."""
        return {"probabilities": torch.sigmoid(raw)}

    def caption(self, task: TaskSpec, target: np.ndarray) -> str:
        on = [name for name, v in zip(task.labels, target.tolist(), strict=True) if v > 0.5]
        return ",".join(on) or "-"
