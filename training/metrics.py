"""Evaluation metrics accumulated over a whole evaluation set (definitions: docs/METHOD.md §5).

Each task's metric is its kind's (`training.kinds`). Every metric keeps its state as tensors of
sums and counts only (float64 or int64). Summing the states of several DDP ranks
(`all_reduce_metrics`) therefore gives the single-process result: exactly for the counts, up to
float64 rounding for the sums. ``compute`` turns the state into plain floats; percentages are in
[0, 100]. A metric with no valid pixel or sample yet reports NaN.

State tensors follow the device of the outputs they are fed (so updates never copy whole
prediction maps to the host); ``all_reduce_metrics`` moves them to the collective's device when
needed.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from training.kinds import kind, kind_of

# the accumulators of the first kinds, importable from here as before (each lives with its kind)
from training.kinds.attributes import AttributeMetric, attribute_names
from training.kinds.base import Metric
from training.kinds.depth import DepthMetric
from training.kinds.normal import NORMAL_HIST_BIN_DEG, NORMAL_THRESHOLDS, NormalMetric
from training.kinds.segmentation import SegmentationMetric
from training.tasks import TaskSpec

__all__ = [
    "NORMAL_HIST_BIN_DEG", "NORMAL_THRESHOLDS", "AttributeMetric", "DepthMetric", "Metric", "MultiTaskMetrics",
    "NormalMetric", "SegmentationMetric", "all_reduce_metrics", "attribute_names", "build_metric",
    "delta_metric_names", "delta_mtl", "metric_direction", "primary_metric",
]


def build_metric(task: TaskSpec) -> Metric:
    """The metric for one task, as its kind defines it."""
    return kind_of(task).metric(task)


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


def metric_direction(kind_name: str, metric_name: str) -> int:
    """+1 where higher is better, −1 where lower is better."""
    return kind(kind_name).direction(metric_name)


def primary_metric(kind_name: str) -> str:
    """The one metric per kind shown in compact tables."""
    return kind(kind_name).primary


def delta_metric_names(task: TaskSpec) -> tuple[str, ...]:
    """The metric keys of ``task`` that enter ΔMTL."""
    return kind_of(task).delta_metric_names(task)


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
