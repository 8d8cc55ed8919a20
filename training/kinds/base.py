"""What a task kind is on the training side: the one object per kind that the losses, the metrics,
the trivial baselines, the model heads and the target augmentation dispatch through.

A `TrainingKind` says
- how a task of the kind is trained (`loss`: a scalar, a mean over the valid pixels or samples),
- how it is evaluated (`metric`: an accumulator of sums and counts, summed across DDP ranks; the
  names it reports, its `primary` metric, each metric's direction and those entering ΔMTL),
- what its trivial baseline predicts (a constant fitted on the training targets),
- which head archs it may use (`heads`; the first is its default) and what the head's output
  becomes in the graph (`head_output`),
- how a batch of raw outputs becomes the fields of the answer, as torch ops that an exported graph
  computes (`final_outputs`; the contract's `Kind.postprocess` is the numpy reference it is checked
  against),
- how its targets follow the image through a resize (`resize_mode`), a horizontal flip (`flip`)
  and a zoom (`zoom`), and how a data-set preview draws them (`preview`, `caption`).

What a kind is outside training (its graph output, wire encoding, what a client draws) is its
`parsimony.tasks` object, `contract`. Adding a kind is one module in this package (found by
`training.kinds` on first use) next to its module in `parsimony.tasks`.
"""

from __future__ import annotations

import abc
from typing import ClassVar, Literal

import numpy as np
import torch
from torch import Tensor

from parsimony.tasks import Kind, TaskSpec
from parsimony.tasks import kind as contract_kind

#: Magnitude of the trivial baselines' constant logits: saturated enough that sigmoid/softmax are
#: 0 or 1 in float32.
TRIVIAL_LOGIT = 10.0
DENSE_HEADS: tuple[str, ...] = ("light", "aspp")  # the dense head archs of `training.models.heads`


class Metric(abc.ABC):
    """An evaluation metric over a whole set: feed batches, read results, expose the state.

    The state is tensors of sums and counts only (float64 or int64), so summing the states of
    several DDP ranks gives the single-process result. The tensors follow the device of the
    outputs they are fed (`_on`), so an update never copies whole prediction maps to the host.
    """

    def __init__(self) -> None:
        self._state = self._zero_state(torch.device("cpu"))

    @abc.abstractmethod
    def update(self, output: Tensor, target: Tensor) -> None:
        """Add one batch (model output and target in the layouts of `training.tasks`)."""

    @abc.abstractmethod
    def compute(self) -> dict[str, float]:
        """The metric values over everything seen so far."""

    @abc.abstractmethod
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


def check_layout(ok: bool, output: Tensor, target: Tensor, layout: str) -> None:
    """Refuse mismatched layouts in a metric: a silent broadcast would score the wrong pixels."""
    if not ok:
        raise ValueError(
            f"output {tuple(output.shape)} and target {tuple(target.shape)} do not fit the "
            f"{layout} layout of training.tasks"
        )


def check_dense(task: TaskSpec, output: Tensor, target: Tensor, target_channels: int | None) -> None:
    """Refuse mismatched layouts in a loss: a silent broadcast would train on the wrong pixels.
    ``target_channels`` None: the target has no channel dimension (``[N, H, W]``)."""
    expected = (output.shape[0], *output.shape[2:]) if target_channels is None else output.shape
    if output.dim() != 4 or tuple(target.shape) != tuple(expected):
        raise ValueError(
            f"task {task.name!r} ({task.kind}): output {tuple(output.shape)} and target "
            f"{tuple(target.shape)} do not match the layouts in training.tasks"
        )


def masked_mean(per_pixel: Tensor, valid: Tensor) -> Tensor:
    """Mean of ``per_pixel`` over ``valid``; 0 (still differentiable) when nothing is valid.

    ``torch.where`` rather than a product, so a NaN/inf at an invalid pixel cannot leak in.
    """
    total = torch.where(valid, per_pixel, torch.zeros_like(per_pixel)).sum()
    return total / valid.sum().clamp_min(1).to(per_pixel.dtype)


def constant_map(value: Tensor, n: int, h: int, w: int, like: Tensor) -> Tensor:
    """``[N, C, H, W]`` holding the vector ``value`` ``[C]`` at every pixel, in ``like``'s dtype."""
    return value.to(dtype=like.dtype, device=like.device).view(1, -1, 1, 1).expand(n, -1, h, w)


class TrainingKind(abc.ABC):
    """One task kind on the training side; subclasses set the class attributes and implement the
    abstract methods (see the module doc)."""

    name: ClassVar[str]  # the `parsimony.tasks` kind it trains
    heads: ClassVar[tuple[str, ...]]  # head archs it may use; the first is its default
    primary: ClassVar[str]  # the metric shown in compact tables and logs
    higher_is_better: ClassVar[frozenset[str]] = frozenset()
    lower_is_better: ClassVar[frozenset[str]] = frozenset()
    delta_metrics: ClassVar[tuple[str, ...]]  # the metrics entering ΔMTL
    trivial: ClassVar[str]  # what the trivial baseline predicts, in a few words
    resize_mode: ClassVar[Literal["nearest", "bilinear"]] = "nearest"  # how a resize resamples targets

    @property
    def contract(self) -> Kind:
        return contract_kind(self.name)

    @property
    def dense(self) -> bool:
        return self.contract.dense

    # --- training and evaluation ---------------------------------------------------------------

    @abc.abstractmethod
    def loss(self, task: TaskSpec, output: Tensor, target: Tensor) -> Tensor:
        """The scalar training loss of one batch (a mean over its valid pixels or samples)."""

    @abc.abstractmethod
    def metric(self, task: TaskSpec) -> Metric:
        """A fresh accumulator of this task's evaluation metrics."""

    def metric_names(self, task: TaskSpec) -> tuple[str, ...]:
        """The keys `Metric.compute` returns for ``task``, in order (by default those of ΔMTL)."""
        return self.delta_metric_names(task)

    def direction(self, metric: str) -> int:
        """+1 where higher is better, −1 where lower is better; ValueError for other names."""
        if metric in self.lower_is_better:
            return -1
        if metric in self.higher_is_better:
            return 1
        raise ValueError(f"unknown metric {metric!r} for kind {self.name!r}")

    def delta_metric_names(self, task: TaskSpec) -> tuple[str, ...]:
        """The metric keys of ``task`` that enter ΔMTL."""
        return self.delta_metrics

    def table_metric_names(self, task: TaskSpec) -> tuple[str, ...]:
        """The metrics a run's final table lists (each has a direction)."""
        return self.delta_metric_names(task)

    # --- the trivial baseline ------------------------------------------------------------------

    def trivial_width(self, task: TaskSpec) -> int:
        """Length of the float64 sums the baseline accumulates over the training targets."""
        return task.channels

    @abc.abstractmethod
    def trivial_sums(self, task: TaskSpec, target: Tensor) -> tuple[Tensor, int]:
        """What one batch of training targets (on the CPU) adds: ``(sums, count of valid values)``."""

    @abc.abstractmethod
    def trivial_constant(self, task: TaskSpec, sums: Tensor, count: int) -> Tensor:
        """The baseline's constant from the accumulated sums (``count`` > 0)."""

    @abc.abstractmethod
    def trivial_output(self, task: TaskSpec, constant: Tensor, n: int, h: int, w: int, like: Tensor) -> Tensor:
        """The constant as a model output for ``n`` images of ``h`` x ``w`` (dtype and device of ``like``)."""

    # --- the model head ------------------------------------------------------------------------

    def head_output(self, out: Tensor) -> Tensor:
        """What a dense head's upsampled map becomes in the graph (unchanged unless a kind says)."""
        return out

    # --- final outputs computed in the exported graph ------------------------------------------

    @abc.abstractmethod
    def final_outputs(self, task: TaskSpec, raw: Tensor) -> dict[str, Tensor]:
        """A batch of raw outputs (``[N, C, H, W]`` dense, else ``[N, C]``) -> every field of the
        answer (`parsimony.tasks.Kind.fields`) for the batch, as ops the ONNX exporter traces: float
        fields in float32, discrete ones (class or edge maps) in any dtype holding their values
        exactly. The export casts each to the dtypes the contract offers it in
        (`Kind.field_dtypes`: the class map's uint8/int32, float16 copies); the values must be those
        of `Kind.postprocess` on each image up to float rounding."""

    # --- target augmentation and previews ------------------------------------------------------

    def flip(self, target: Tensor) -> Tensor:
        """The target of the left-right mirrored image."""
        return target.flip(-1)

    def zoom(self, target: Tensor, scale: float) -> Tensor:
        """The target of an image zoomed in by ``scale`` (after it was cropped and resized)."""
        return target

    def preview(self, task: TaskSpec, target: np.ndarray) -> np.ndarray | None:
        """An RGB picture ``[H, W, 3]`` in [0, 1] of a dense target, invalid pixels black; None
        for kinds that are not dense."""
        return None

    def caption(self, task: TaskSpec, target: np.ndarray) -> str:
        """A title for the image of a sample (kinds that are not drawn as pictures)."""
        return ""
