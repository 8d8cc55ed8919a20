"""Monocular depth on the training side: L1 in metres, absolute and relative error, the mean
depth as the trivial baseline; a zoom brings the scene closer (depth / scale)."""

from __future__ import annotations

import math

import numpy as np
import torch
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


class DepthMetric(Metric):
    """Absolute and relative error in metres over pixels whose ground truth is non-zero."""

    def _zero_state(self, device: torch.device) -> list[Tensor]:
        # [Σ|pred − gt|, Σ|pred − gt|/gt] and N_valid
        return [
            torch.zeros(2, dtype=torch.float64, device=device),
            torch.zeros((), dtype=torch.int64, device=device),
        ]

    def update(self, output: Tensor, target: Tensor) -> None:
        ok = output.dim() == 4 and output.shape[1] == 1
        check_layout(ok and output.shape == target.shape, output, target, "[N, 1, H, W]")
        sums, count = self._on(output.device)
        gt = target.to(output.device, torch.float64)
        valid = gt != 0
        err = (output.detach().double() - gt)[valid].abs()
        sums[0] += err.sum()
        sums[1] += (err / gt[valid]).sum()
        count += valid.sum()

    def compute(self) -> dict[str, float]:
        sums, count = self._state
        n = int(count)
        if n == 0:
            return {"abs_err": math.nan, "rel_err": math.nan}
        return {"abs_err": float(sums[0]) / n, "rel_err": float(sums[1]) / n}


class Depth(TrainingKind):
    name = "depth"
    heads = DENSE_HEADS
    primary = "abs_err"
    lower_is_better = frozenset({"abs_err", "rel_err"})
    delta_metrics = ("abs_err", "rel_err")
    trivial = "mean depth"

    def loss(self, task: TaskSpec, output: Tensor, target: Tensor) -> Tensor:
        """L1 in metres, averaged over pixels whose ground truth is non-zero."""
        check_dense(task, output, target, 1)
        return masked_mean((output - target).abs(), target != 0)

    def metric(self, task: TaskSpec) -> Metric:
        return DepthMetric()

    def trivial_sums(self, task: TaskSpec, target: Tensor) -> tuple[Tensor, int]:
        """The sum of the valid (non-zero) depths."""
        valid = target[target != 0].double()
        return valid.sum(), valid.numel()

    def trivial_constant(self, task: TaskSpec, sums: Tensor, count: int) -> Tensor:
        return (sums / count).float()

    def trivial_output(self, task: TaskSpec, constant: Tensor, n: int, h: int, w: int, like: Tensor) -> Tensor:
        return constant_map(constant, n, h, w, like)

    def final_outputs(self, task: TaskSpec, raw: Tensor) -> dict[str, Tensor]:
        """Depth ``[N, H, W]`` in metres, clamped at 0 (the head is unconstrained)."""
        return {"depth": raw[:, 0].clamp_min(0.0)}

    def zoom(self, target: Tensor, scale: float) -> Tensor:
        """Zooming in by ``scale`` makes objects look ``scale`` times closer; invalid (0) stays 0."""
        return target / scale

    def preview(self, task: TaskSpec, target: np.ndarray) -> np.ndarray:
        import matplotlib

        d = target[0]
        valid = d > 0
        scaled = d / max(float(d[valid].max()) if valid.any() else 1.0, 1e-6)
        out = matplotlib.colormaps["viridis"](scaled)[..., :3]
        out[~valid] = 0
        return out
