"""Semantic boundaries on the training side (docs/METHOD.md §5, "Edges").

- **Loss**: class-balanced binary cross-entropy on the logits. Boundaries are a small fraction of
  the pixels, so each batch weighs its boundary pixels by the fraction of background pixels and
  its background pixels by the fraction of boundary pixels (both counted over the batch's valid
  pixels, HED's weighting), then averages over the valid pixels like every dense loss here:
  ``(1/N) Σ_valid w_i · BCE(x_i, y_i)``. Target -1 is ignored.
- **Metrics**: a pixel is a boundary at threshold ``t`` when its probability is at least ``t``
  (compared in logit space, ``x >= log(t / (1 - t))``, so saturated logits still order). TP, FP
  and FN are counted at each of `THRESHOLDS` over the whole set (summed across DDP ranks).
  ``precision``, ``recall`` and ``f`` (percent) are read at `THRESHOLD`, the gateway's 0.5;
  ``ods_f`` is the best F over the thresholds (ODS: one threshold for the whole data set) and
  ``ods_threshold`` the lowest threshold reaching it. There is no boundary-matching tolerance:
  a predicted boundary pixel counts only where the target marks one, unlike the BSDS benchmark.
  0/0 is 0: a set without predicted boundaries has precision 0, one without target boundaries
  recall 0, and F is 0 whenever TP is 0. A set without a valid pixel reports NaN throughout.
- **Trivial baseline**: all background (every metric 0).
- **Heads**: the dense heads; **augmentation**: nearest-neighbour resize (the map stays binary)
  and a plain mirror.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from parsimony.tasks import TaskSpec
from parsimony.tasks.edges import EDGE, THRESHOLD
from training.kinds.base import (
    DENSE_HEADS,
    TRIVIAL_LOGIT,
    Metric,
    TrainingKind,
    check_dense,
    check_layout,
    constant_map,
    masked_mean,
)

THRESHOLDS: tuple[float, ...] = tuple(k / 100 for k in range(1, 100))  # 0.01, 0.02, ..., 0.99
if THRESHOLD not in THRESHOLDS:
    raise RuntimeError(f"the serving threshold {THRESHOLD} must be one of the metric's thresholds")
_AT = THRESHOLDS.index(THRESHOLD)
_NAMES = ("precision", "recall", "f", "ods_f", "ods_threshold")
_BACKGROUND_PREVIEW = 0.25  # grey, so that invalid (black) pixels stand out


def logit_thresholds(device: torch.device | None = None) -> Tensor:
    """`THRESHOLDS` as logits (float64, ascending): ``log(t / (1 - t))``; 0.5 is exactly 0."""
    return torch.tensor([math.log(t / (1 - t)) for t in THRESHOLDS], dtype=torch.float64, device=device)


class EdgeMetric(Metric):
    """TP, FP and FN at every threshold of `THRESHOLDS`, over the pixels whose target is not -1."""

    def _zero_state(self, device: torch.device) -> list[Tensor]:
        return [
            torch.zeros(3, len(THRESHOLDS), dtype=torch.int64, device=device),  # TP, FP, FN per threshold
            torch.zeros((), dtype=torch.int64, device=device),  # N_valid
        ]

    @property
    def counts(self) -> Tensor:
        """``[3, T]``: TP, FP and FN at each threshold."""
        return self._state[0]

    def update(self, output: Tensor, target: Tensor) -> None:
        ok = output.dim() == 4 and output.shape[1] == 1
        check_layout(ok and output.shape == target.shape, output, target, "[N, 1, H, W]")
        counts, n_valid = self._on(output.device)
        target = target.to(output.device)
        valid = target >= 0
        positive = (target > 0.5)[valid]
        logits = output.detach()[valid].double()
        # how many thresholds each pixel reaches: it is a boundary at threshold k iff k < reached
        reached = torch.bucketize(logits, logit_thresholds(output.device), right=True)
        size = len(THRESHOLDS) + 1
        at_least = [torch.bincount(reached[cls], minlength=size).flip(0).cumsum(0).flip(0)
                    for cls in (positive, ~positive)]  # at_least[j]: pixels reaching j or more thresholds
        tp, fp = at_least[0][1:], at_least[1][1:]
        counts[0] += tp
        counts[1] += fp
        counts[2] += positive.sum() - tp
        n_valid += valid.sum()

    def compute(self) -> dict[str, float]:
        if int(self._state[1]) == 0:
            return dict.fromkeys(_NAMES, math.nan)
        tp, fp, fn = self.counts.double()
        precision, recall, f = _share(tp, tp + fp), _share(tp, tp + fn), _share(2 * tp, 2 * tp + fp + fn)
        best = int(torch.argmax(f))  # the first maximum: the lowest threshold reaching it
        return {"precision": 100.0 * float(precision[_AT]), "recall": 100.0 * float(recall[_AT]),
                "f": 100.0 * float(f[_AT]), "ods_f": 100.0 * float(f[best]), "ods_threshold": THRESHOLDS[best]}


def _share(part: Tensor, whole: Tensor) -> Tensor:
    """``part / whole``, 0 where ``whole`` is 0 (no prediction, or no target, at that threshold)."""
    return torch.where(whole > 0, part / whole.clamp_min(1), torch.zeros_like(part))


class Edges(TrainingKind):
    name = "edges"
    heads = DENSE_HEADS
    primary = "ods_f"
    higher_is_better = frozenset({"precision", "recall", "f", "ods_f"})  # ods_threshold has no direction
    delta_metrics = ("ods_f",)
    trivial = "all background"

    def loss(self, task: TaskSpec, output: Tensor, target: Tensor) -> Tensor:
        """Class-balanced binary cross-entropy over the valid pixels (see the module doc)."""
        check_dense(task, output, target, 1)
        valid = target >= 0
        positive = valid & (target > 0.5)
        per_pixel = F.binary_cross_entropy_with_logits(output, positive.to(output.dtype), reduction="none")
        n_valid = valid.sum().clamp_min(1).to(per_pixel.dtype)
        negatives = (n_valid - positive.sum().to(per_pixel.dtype)) / n_valid  # fraction of background
        weight = torch.where(positive, negatives, 1 - negatives)
        return masked_mean(weight * per_pixel, valid)

    def metric(self, task: TaskSpec) -> Metric:
        return EdgeMetric()

    def metric_names(self, task: TaskSpec) -> tuple[str, ...]:
        return _NAMES

    def table_metric_names(self, task: TaskSpec) -> tuple[str, ...]:
        return ("precision", "recall", "f", "ods_f")

    def trivial_sums(self, task: TaskSpec, target: Tensor) -> tuple[Tensor, int]:
        """Nothing to fit (the baseline is all background); the count is of valid pixels."""
        return torch.zeros(1, dtype=torch.float64), int((target >= 0).sum())

    def trivial_constant(self, task: TaskSpec, sums: Tensor, count: int) -> Tensor:
        return torch.zeros(1)  # boundary probability 0: all background

    def trivial_output(self, task: TaskSpec, constant: Tensor, n: int, h: int, w: int, like: Tensor) -> Tensor:
        return constant_map(TRIVIAL_LOGIT * (2 * constant - 1), n, h, w, like)

    def final_outputs(self, task: TaskSpec, raw: Tensor) -> dict[str, Tensor]:
        """The edge map ``[N, H, W]``: `EDGE` where the logit is at least 0 (probability >= 0.5),
        else 0; and the boundary probabilities."""
        logits = raw[:, 0]
        return {"edge_map": torch.where(logits >= 0, float(EDGE), 0.0), "probabilities": torch.sigmoid(logits)}

    def preview(self, task: TaskSpec, target: np.ndarray) -> np.ndarray:
        t = target[0]
        grey = np.where(t > 0.5, 1.0, np.where(t >= 0, _BACKGROUND_PREVIEW, 0.0))
        return np.repeat(grey[..., None], 3, axis=-1)
