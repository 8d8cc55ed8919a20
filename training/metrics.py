"""Evaluation metrics accumulated over a whole evaluation set (definitions: docs/METHOD.md §5).

Every metric keeps its state as tensors of sums and counts only (float64 or int64). Summing the
states of several DDP ranks (`all_reduce_metrics`) therefore gives the single-process result:
exactly for the counts, up to float64 rounding for the sums. ``compute`` turns the state into
plain floats; percentages are in [0, 100]. A metric with no valid pixel or sample yet reports NaN.

State tensors follow the device of the outputs they are fed (so updates never copy whole
prediction maps to the host); ``all_reduce_metrics`` moves them to the collective's device when
needed.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from training.tasks import TaskSpec

NORMAL_THRESHOLDS: tuple[float, ...] = (11.25, 22.5, 30.0)
#: Width of the angle histogram behind the normal median: the median is exact to ± half of it.
NORMAL_HIST_BIN_DEG = 0.01
_NORMAL_BINS = round(180.0 / NORMAL_HIST_BIN_DEG)


class Metric(ABC):
    """Common interface: feed batches, read results, expose the state to reduce across ranks."""

    def __init__(self) -> None:
        self._state = self._zero_state(torch.device("cpu"))

    @abstractmethod
    def update(self, output: Tensor, target: Tensor) -> None:
        """Add one batch (model output and target in the layouts of `training.tasks`)."""

    @abstractmethod
    def compute(self) -> dict[str, float]:
        """The metric values over everything seen so far."""

    @abstractmethod
    def _zero_state(self, device: torch.device) -> list[Tensor]:
        """Fresh state tensors; their order is the order of `state`."""

    def state(self) -> list[Tensor]:
        """The tensors to sum across ranks (reduced in place by `all_reduce_metrics`)."""
        return self._state

    def reset(self) -> None:
        self._state = self._zero_state(self._state[0].device)

    def _on(self, device: torch.device) -> list[Tensor]:
        """The state, moved once to the device of the incoming outputs."""
        if self._state[0].device != device:
            self._state = [t.to(device) for t in self._state]
        return self._state


def _check(ok: bool, output: Tensor, target: Tensor, layout: str) -> None:
    """Refuse mismatched layouts: a silent broadcast would score the wrong pixels."""
    if not ok:
        raise ValueError(
            f"output {tuple(output.shape)} and target {tuple(target.shape)} do not fit the "
            f"{layout} layout of training.tasks"
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
        _check(ok and target.shape == (output.shape[0], *output.shape[2:]), output, target, f"[N, {c}, H, W]")
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
        _check(ok and output.shape == target.shape, output, target, "[N, 1, H, W]")
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
        _check(ok and output.shape == target.shape, output, target, "[N, 3, H, W]")
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
        keys = ["mean", "median", *(f"within_{t:g}" for t in NORMAL_THRESHOLDS)]
        if n == 0:
            return dict.fromkeys(keys, math.nan)
        values = [float(angle_sum) / n, self._median(), *(100.0 * int(w) / n for w in within)]
        return dict(zip(keys, values, strict=True))


class AttributeMetric(Metric):
    """Per-attribute accuracy and F1 (percent) with the prediction logit > 0 (sigmoid > 0.5).

    F1 = 2TP / (2TP + FP + FN); when that denominator is 0 (no positive target and no positive
    prediction in the whole set) F1 is reported as 0, the scikit-learn ``zero_division=0``
    convention. ``mean_acc`` and ``mean_f1`` average over attributes.
    """

    def __init__(self, names: Sequence[str]) -> None:
        names = tuple(names)
        keys = [f"{n}_{m}" for n in names for m in ("acc", "f1")] + ["mean_acc", "mean_f1"]
        if not names or len(set(keys)) != len(keys):
            raise ValueError(f"attribute names must be non-empty, unique and not 'mean': {names}")
        self.names = names
        super().__init__()

    def _zero_state(self, device: torch.device) -> list[Tensor]:
        return [torch.zeros(4, len(self.names), dtype=torch.int64, device=device)]  # TP, FP, FN, TN

    def update(self, output: Tensor, target: Tensor) -> None:
        ok = output.dim() == 2 and output.shape[1] == len(self.names)
        _check(ok and output.shape == target.shape, output, target, f"[N, {len(self.names)}]")
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


def build_metric(task: TaskSpec) -> Metric:
    """The metric for one task, chosen by its kind."""
    if task.kind == "segmentation":
        return SegmentationMetric(task.channels)
    if task.kind == "depth":
        return DepthMetric()
    if task.kind == "normal":
        return NormalMetric()
    if task.kind == "attributes":
        return AttributeMetric(attribute_names(task))
    raise ValueError(f"task {task.name!r}: no metric for kind {task.kind!r}")


def attribute_names(task: TaskSpec) -> tuple[str, ...]:
    """The attribute names used in metric keys: the task's labels, or ``attr<i>`` without labels."""
    return task.labels or tuple(f"attr{i}" for i in range(task.channels))


def _collective_device(tensor: Tensor) -> torch.device:
    """NCCL reduces CUDA tensors only; other backends take the tensor where it is."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return tensor.device


def all_reduce_metrics(metrics: Iterable[Metric]) -> None:
    """Sum every state tensor across ranks in place; a no-op without torch.distributed.

    Every rank must call this with the same metrics in the same order (a collective).
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    for metric in metrics:
        for tensor in metric.state():
            work = tensor.to(_collective_device(tensor))
            dist.all_reduce(work, op=dist.ReduceOp.SUM)
            if work is not tensor:
                tensor.copy_(work)


class MultiTaskMetrics:
    """One metric per task, fed with the model's output dict and the batch dict."""

    def __init__(self, tasks: Sequence[TaskSpec]) -> None:
        self.tasks = tuple(tasks)
        self.metrics: dict[str, Metric] = {t.name: build_metric(t) for t in self.tasks}

    def update(self, outputs: Mapping[str, Tensor], batch: Mapping[str, Tensor]) -> None:
        for task in self.tasks:
            for what, d in (("outputs", outputs), ("batch", batch)):
                if task.name not in d:
                    raise KeyError(f"task {task.name!r} missing from {what}; it has {sorted(d)}")
            self.metrics[task.name].update(outputs[task.name], batch[task.name])

    def compute(self) -> dict[str, dict[str, float]]:
        return {name: metric.compute() for name, metric in self.metrics.items()}

    def all_reduce(self) -> None:
        all_reduce_metrics(self.metrics.values())

    def reset(self) -> None:
        for metric in self.metrics.values():
            metric.reset()


# ---------------------------------------------------------------------------------------------
# Directions, primary metrics and ΔMTL

#: Metrics entering ΔMTL per kind; for attributes, templates expanded per attribute name.
DELTA_METRICS: dict[str, tuple[str, ...]] = {
    "segmentation": ("miou", "pixel_acc"),
    "depth": ("abs_err", "rel_err"),
    "normal": ("mean", "median", "within_11.25", "within_22.5", "within_30"),
    "attributes": ("{name}_acc", "{name}_f1"),
}
_PRIMARY = {"segmentation": "miou", "depth": "abs_err", "normal": "mean", "attributes": "mean_acc"}
_LOWER_IS_BETTER = {"depth": {"abs_err", "rel_err"}, "normal": {"mean", "median"}}
_HIGHER_IS_BETTER = {
    "segmentation": {"miou", "pixel_acc"},
    "normal": {f"within_{t:g}" for t in NORMAL_THRESHOLDS},
}


def metric_direction(kind: str, metric_name: str) -> int:
    """+1 where higher is better, −1 where lower is better."""
    if metric_name in _LOWER_IS_BETTER.get(kind, ()):
        return -1
    if metric_name in _HIGHER_IS_BETTER.get(kind, ()):
        return 1
    if kind == "attributes" and metric_name.endswith(("_acc", "_f1")):
        return 1
    raise ValueError(f"unknown metric {metric_name!r} for kind {kind!r}")


def primary_metric(kind: str) -> str:
    """The one metric per kind shown in compact tables."""
    if kind not in _PRIMARY:
        raise ValueError(f"unknown task kind {kind!r}; choose one of {sorted(_PRIMARY)}")
    return _PRIMARY[kind]


def delta_metric_names(task: TaskSpec) -> tuple[str, ...]:
    """The metric keys of ``task`` that enter ΔMTL."""
    templates = DELTA_METRICS[task.kind]
    if task.kind != "attributes":
        return templates
    return tuple(t.format(name=n) for n in attribute_names(task) for t in templates)


def delta_mtl(
    metrics: Mapping[str, Mapping[str, float]],
    baseline: Mapping[str, Mapping[str, float]],
    tasks: Sequence[TaskSpec],
) -> float:
    """ΔMTL in percent: ``100 · (1/T) Σ_t (1/M_t) Σ_m s_m · (N_tm − B_tm) / B_tm``.

    Taken over ``tasks``; each must appear, with all of its ΔMTL metrics, in both ``metrics`` and
    ``baseline`` (the single-task results). Positive means better than the baseline.
    """
    if not tasks:
        raise ValueError("delta_mtl needs at least one task")
    per_task = [_task_delta(task, metrics, baseline) for task in tasks]
    return 100.0 * sum(per_task) / len(per_task)


def _task_delta(
    task: TaskSpec, metrics: Mapping[str, Mapping[str, float]], baseline: Mapping[str, Mapping[str, float]]
) -> float:
    names = delta_metric_names(task)
    terms = []
    for m in names:
        new = _value(metrics, task.name, m, "the evaluated results")
        base = _value(baseline, task.name, m, "the baseline")
        if base == 0:
            raise ValueError(f"baseline {task.name}/{m} is 0: the relative change ΔMTL needs is undefined")
        terms.append(metric_direction(task.kind, m) * (new - base) / base)
    return sum(terms) / len(terms)


def _value(results: Mapping[str, Mapping[str, float]], task: str, metric: str, what: str) -> float:
    if task not in results:
        raise KeyError(f"task {task!r} is missing from {what} (it has tasks {sorted(results)})")
    if metric not in results[task]:
        raise KeyError(
            f"metric {metric!r} of task {task!r} is missing from {what} (it has {sorted(results[task])})"
        )
    return float(results[task][metric])
