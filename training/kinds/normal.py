"""Surface normals on the training side: 1 − cosine, angular errors, the mean direction as the
trivial baseline; heads emit unit vectors, and a mirror negates x."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from parsimony.tasks import TaskSpec
from training.kinds.base import (
    DENSE_HEADS,
    Metric,
    TrainingKind,
    check_dense,
    check_layout,
    constant_map,
    masked_mean,
)

NORMAL_THRESHOLDS: tuple[float, ...] = (11.25, 22.5, 30.0)
#: Width of the angle histogram behind the normal median: the median is exact to ± half of it.
NORMAL_HIST_BIN_DEG = 0.01
_NORMAL_BINS = round(180.0 / NORMAL_HIST_BIN_DEG)
_NAMES = ("mean", "median", *(f"within_{t:g}" for t in NORMAL_THRESHOLDS))


def unit_vectors(x: Tensor, dim: int = 1) -> Tensor:
    """``x / ‖x‖₂`` along ``dim``, safe in FP16: dividing by the largest magnitude first bounds the
    squares by 1 (plain normalisation overflows FP16 once a logit passes about 180, and TensorRT may
    run the reduction in FP16); the direction is unchanged. An all-zero vector stays zero."""
    peak = x.abs().amax(dim=dim, keepdim=True)
    scaled = x / torch.where(peak > 0, peak, torch.ones_like(peak))
    return F.normalize(scaled, dim=dim, eps=1e-6)


class NormalMetric(Metric):
    """Angular error in degrees between the L2-normalised prediction and the ground truth.

    Pixels with an all-zero ground-truth vector are ignored. The mean comes from an exact float64
    sum and the ``within_*`` percentages from exact counts of angle < threshold. The median is read
    from a histogram of 0.01° bins over [0, 180] (so that it can be summed across ranks): it is the
    centre of the bin holding the middle angle (the mean of the two middle ones for an even count),
    hence within ``NORMAL_HIST_BIN_DEG / 2`` = 0.005° of the exact median.
    """

    def _zero_state(self, device: torch.device) -> list[Tensor]:
        return [
            torch.zeros((), dtype=torch.float64, device=device),  # Σ angle
            torch.zeros((), dtype=torch.int64, device=device),  # N_valid
            torch.zeros(len(NORMAL_THRESHOLDS), dtype=torch.int64, device=device),  # N(angle < t)
            torch.zeros(_NORMAL_BINS, dtype=torch.int64, device=device),  # angle histogram
        ]

    def update(self, output: Tensor, target: Tensor) -> None:
        ok = output.dim() == 4 and output.shape[1] == 3
        check_layout(ok and output.shape == target.shape, output, target, "[N, 3, H, W]")
        angle_sum, count, within, hist = self._on(output.device)
        angles = self._angles(output.detach(), target.to(output.device))
        angle_sum += angles.sum()
        count += angles.numel()
        for i, t in enumerate(NORMAL_THRESHOLDS):
            within[i] += (angles < t).sum()
        bins = (angles / NORMAL_HIST_BIN_DEG).long().clamp_(0, _NORMAL_BINS - 1)
        hist += torch.bincount(bins, minlength=_NORMAL_BINS)

    @staticmethod
    def _angles(output: Tensor, target: Tensor) -> Tensor:
        """Angles in degrees (float64) at the valid pixels, flattened."""
        gt = target.double()
        valid = (gt != 0).any(dim=1)
        dot = (F.normalize(output.double(), dim=1) * gt).sum(dim=1)[valid]
        return torch.rad2deg(torch.arccos(dot.clamp(-1.0, 1.0)))

    def _median(self) -> float:
        count, hist = int(self._state[1]), self._state[3]
        cumulative = hist.cumsum(0)
        centres = []
        for rank in ((count - 1) // 2, count // 2):  # 0-based ranks of the middle angle(s)
            b = int(torch.searchsorted(cumulative, torch.tensor(rank + 1, device=hist.device)))
            centres.append((b + 0.5) * NORMAL_HIST_BIN_DEG)
        return sum(centres) / 2

    def compute(self) -> dict[str, float]:
        angle_sum, count, within, _ = self._state
        n = int(count)
        if n == 0:
            return dict.fromkeys(_NAMES, math.nan)
        values = [float(angle_sum) / n, self._median(), *(100.0 * int(w) / n for w in within)]
        return dict(zip(_NAMES, values, strict=True))


class Normal(TrainingKind):
    name = "normal"
    heads = DENSE_HEADS
    primary = "mean"
    lower_is_better = frozenset({"mean", "median"})
    higher_is_better = frozenset(_NAMES[2:])
    delta_metrics = _NAMES
    trivial = "mean normal"

    def loss(self, task: TaskSpec, output: Tensor, target: Tensor) -> Tensor:
        """1 − cosine similarity, averaged over pixels whose ground-truth vector is not all zero.

        The head already emits unit vectors; normalising again costs little and keeps the loss a
        true cosine if a head (or a compacted one) ever does not.
        """
        check_dense(task, output, target, 3)
        valid = (target != 0).any(dim=1)
        cosine = (F.normalize(output, dim=1) * F.normalize(target, dim=1)).sum(dim=1)
        return masked_mean(1.0 - cosine, valid)

    def metric(self, task: TaskSpec) -> Metric:
        return NormalMetric()

    def trivial_sums(self, task: TaskSpec, target: Tensor) -> tuple[Tensor, int]:
        """The sum of the valid (not all-zero) vectors."""
        vectors = target.double().movedim(1, -1).reshape(-1, 3)
        valid = vectors[(vectors != 0).any(dim=1)]
        return valid.sum(dim=0), valid.shape[0]

    def trivial_constant(self, task: TaskSpec, sums: Tensor, count: int) -> Tensor:
        """The mean direction; a zero mean (normals cancelling out) falls back to +z, facing the camera."""
        norm = sums.norm()
        if norm == 0:
            return torch.tensor([0.0, 0.0, 1.0])
        return (sums / norm).float()

    def trivial_output(self, task: TaskSpec, constant: Tensor, n: int, h: int, w: int, like: Tensor) -> Tensor:
        return constant_map(constant, n, h, w, like)

    def head_output(self, out: Tensor) -> Tensor:
        return unit_vectors(out)

    def final_outputs(self, task: TaskSpec, raw: Tensor) -> dict[str, Tensor]:
        """The unit normals as they are: the head already normalises them (`head_output`)."""
        return {"normal": raw}

    def flip(self, target: Tensor) -> Tensor:
        """Mirroring negates the x component; ``0.0 - x`` keeps the all-zero "invalid" vector
        exactly zero (no -0.0), so flipping twice is the identity."""
        flipped = target.flip(-1).clone()
        flipped[0] = 0.0 - flipped[0]
        return flipped

    def preview(self, task: TaskSpec, target: np.ndarray) -> np.ndarray:
        out = (target.transpose(1, 2, 0) + 1) / 2
        out[np.all(target == 0, axis=0)] = 0
        return np.clip(out, 0, 1)
