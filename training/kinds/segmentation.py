"""Semantic segmentation on the training side: cross-entropy, the confusion matrix (mIoU, pixel
accuracy), the majority class as the trivial baseline."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from parsimony.tasks import TaskSpec
from training.kinds.base import (
    DENSE_HEADS,
    TRIVIAL_LOGIT,
    Metric,
    TrainingKind,
    check_dense,
    check_layout,
    masked_mean,
)


class SegmentationMetric(Metric):
    """Confusion matrix (rows: target, columns: prediction) over pixels with target in [0, C).

    mIoU averages IoU_c = TP/(TP+FP+FN) over the classes with a non-zero denominator, i.e. classes
    that occur in the targets or in the predictions of the set; a class never seen nor predicted
    is left out rather than counted as 0 or 100.
    """

    def __init__(self, num_classes: int) -> None:
        if num_classes < 1:
            raise ValueError(f"a segmentation metric needs at least one class, got {num_classes}")
        self.num_classes = num_classes
        super().__init__()

    def _zero_state(self, device: torch.device) -> list[Tensor]:
        return [torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64, device=device)]

    @property
    def confusion(self) -> Tensor:
        return self._state[0]

    def update(self, output: Tensor, target: Tensor) -> None:
        c = self.num_classes
        ok = output.dim() == 4 and output.shape[1] == c
        check_layout(ok and target.shape == (output.shape[0], *output.shape[2:]), output, target, f"[N, {c}, H, W]")
        (conf,) = self._on(output.device)
        pred = output.detach().argmax(dim=1)
        target = target.to(output.device).long()
        valid = (target >= 0) & (target < c)
        index = target[valid] * c + pred[valid]
        conf += torch.bincount(index, minlength=c * c).view(c, c)

    def per_class_iou(self) -> Tensor:
        """IoU per class in percent (float64), NaN where TP+FP+FN = 0."""
        conf = self.confusion.double()
        tp = conf.diag()
        denom = conf.sum(0) + conf.sum(1) - tp
        return torch.where(denom > 0, 100.0 * tp / denom.clamp_min(1), torch.full_like(tp, math.nan))

    def compute(self) -> dict[str, float]:
        iou = self.per_class_iou()
        present = ~iou.isnan()
        total = self.confusion.sum()
        miou = float(iou[present].mean()) if present.any() else math.nan
        pixel_acc = float(100.0 * self.confusion.diag().sum().double() / total) if total > 0 else math.nan
        return {"miou": miou, "pixel_acc": pixel_acc}


class Segmentation(TrainingKind):
    name = "segmentation"
    heads = DENSE_HEADS
    primary = "miou"
    higher_is_better = frozenset({"miou", "pixel_acc"})
    delta_metrics = ("miou", "pixel_acc")
    trivial = "majority class"

    def loss(self, task: TaskSpec, output: Tensor, target: Tensor) -> Tensor:
        """Cross-entropy per pixel, averaged over pixels whose target lies in [0, C)."""
        check_dense(task, output, target, None)
        target = target.long()
        valid = (target >= 0) & (target < output.shape[1])
        safe = torch.where(valid, target, torch.full_like(target, -1))
        per_pixel = F.cross_entropy(output, safe, ignore_index=-1, reduction="none")
        return masked_mean(per_pixel, valid)

    def metric(self, task: TaskSpec) -> Metric:
        return SegmentationMetric(task.channels)

    def trivial_sums(self, task: TaskSpec, target: Tensor) -> tuple[Tensor, int]:
        """Pixel counts per class (the majority class wins)."""
        t = target.long()
        valid = t[(t >= 0) & (t < task.channels)]
        return torch.bincount(valid, minlength=task.channels).double(), valid.numel()

    def trivial_constant(self, task: TaskSpec, sums: Tensor, count: int) -> Tensor:
        return sums.argmax()  # ties: the lowest class index

    def trivial_output(self, task: TaskSpec, constant: Tensor, n: int, h: int, w: int, like: Tensor) -> Tensor:
        logits = TRIVIAL_LOGIT * F.one_hot(constant.long(), task.channels).to(dtype=like.dtype, device=like.device)
        return logits.view(1, -1, 1, 1).expand(n, -1, h, w)

    def final_outputs(self, task: TaskSpec, raw: Tensor) -> dict[str, Tensor]:
        """The class map (``argmax`` over the classes: the first maximum on ties, as numpy's and ONNX
        Runtime's ArgMax) and the softmax probabilities, spelt out as ``exp(x - max) / sum``: ONNX
        Runtime's Softmax over the channel axis of ``[N, C, H, W]`` transposes it twice and took 3x
        as long (288x384, 13 classes, one thread: 23 ms against 7)."""
        exp = torch.exp(raw - raw.amax(dim=1, keepdim=True))
        return {"class_map": raw.argmax(dim=1), "probabilities": exp / exp.sum(dim=1, keepdim=True)}

    def preview(self, task: TaskSpec, target: np.ndarray) -> np.ndarray:
        import matplotlib

        cmap = matplotlib.colormaps["tab10" if task.channels <= 10 else "tab20"]
        colours = cmap(np.arange(task.channels))[:, :3]
        out = colours[np.clip(target, 0, task.channels - 1)]
        out[target < 0] = 0
        return out
