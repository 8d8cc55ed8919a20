"""One epoch of training and one pass of evaluation; nothing here knows about files or flags."""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

from training.distributed import all_reduce_sum
from training.losses import MultiTaskLoss
from training.metrics import MultiTaskMetrics
from training.sparsity import GroupLasso
from training.tasks import TaskSpec

log = logging.getLogger("training")


class TrainStep(nn.Module):
    """Model and loss as one module, so DDP also averages the gradients of the loss's own
    parameters (the log-variances of uncertainty weighting)."""

    def __init__(self, model: nn.Module, loss: MultiTaskLoss) -> None:
        super().__init__()
        self.model = model
        self.loss = loss

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        outputs = self.model(batch["image"])
        return self.loss(outputs, batch)


@dataclass
class StepContext:
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    autocast: Callable[[], contextlib.AbstractContextManager]
    grad_clip: float | None = None
    log_every: int = 20
    show_progress: bool = False
    regularizer: GroupLasso | None = None
    epoch: int = 0


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def train_one_epoch(step: nn.Module, loader: Iterable[dict], ctx: StepContext, device: torch.device, *,
                    epoch: int, first_batch: int, total_batches: int,
                    after_step: Callable[[int], None] | None = None) -> dict[str, float]:
    """Train over ``loader`` (which already skips ``first_batch`` batches on resume).

    ``after_step(batch_index)`` runs after every optimizer step (mid-epoch checkpoints).
    Returns the mean total and per-task training losses over the batches seen.
    """
    step.train()
    sums = _LossSums()
    bar = _progress_bar(ctx.show_progress, total_batches, first_batch, f"epoch {epoch}")
    started = time.perf_counter()
    images = 0
    for b, batch in enumerate(loader, start=first_batch):
        batch = to_device(batch, device)
        total, parts = _optimizer_step(step, batch, ctx)
        images += batch["image"].shape[0]
        sums.add({"loss": total, **parts})
        if after_step is not None:
            after_step(b + 1)
        due = (b + 1) % ctx.log_every == 0 or b + 1 == total_batches
        if bar is not None:
            bar.update(1)
            if due:
                bar.set_postfix(loss=f"{sums.mean()['loss']:.4f}")
        elif due:
            rate = images / max(time.perf_counter() - started, 1e-9)
            log.info("epoch %d batch %d/%d loss %.4f lr %.3g %.1f img/s", epoch, b + 1, total_batches,
                     sums.mean()["loss"], ctx.optimizer.param_groups[0]["lr"], rate)
    if bar is not None:
        bar.close()
    return sums.mean()


class _LossSums:
    """Running sums of the loss parts, kept on the device: reading them (`mean`) is the only
    host-device synchronisation, so it happens when logging, not after every step."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.seen = 0

    def add(self, values: dict[str, torch.Tensor]) -> None:
        self.seen += 1
        for name, value in values.items():
            v = value.detach().float()
            self.sums[name] = self.sums[name] + v if name in self.sums else v.clone()

    def mean(self) -> dict[str, float]:
        if not self.sums:
            return {}
        names = list(self.sums)
        values = torch.stack([self.sums[n] for n in names]).tolist()  # one transfer for all parts
        return {n: v / max(self.seen, 1) for n, v in zip(names, values, strict=True)}


def _optimizer_step(step: nn.Module, batch: dict, ctx: StepContext):
    """Forward, backward, optimizer step; then the group-lasso proximal step (or, in penalty
    mode, the penalty was part of the loss)."""
    reg = ctx.regularizer
    ctx.optimizer.zero_grad(set_to_none=True)
    with ctx.autocast():
        total, parts = step(batch)
    penalty = reg.loss_term(ctx.epoch) if reg is not None else None
    objective = total if penalty is None else total + penalty
    ctx.scaler.scale(objective).backward()
    if ctx.grad_clip is not None:
        ctx.scaler.unscale_(ctx.optimizer)
        torch.nn.utils.clip_grad_norm_(step.parameters(), ctx.grad_clip)
    lr = ctx.optimizer.param_groups[0]["lr"]
    if reg is not None:
        reg.before_step(ctx.epoch)
    scale = _scale_on_device(ctx.scaler)
    ctx.scaler.step(ctx.optimizer)
    ctx.scaler.update()
    if reg is not None:
        # the grad scaler lowers its scale exactly when it skipped the step (inf/NaN gradients): then
        # the weights did not move and the proximal step must not either; compared on the device
        stepped = None if scale is None else _scale_on_device(ctx.scaler) >= scale
        reg.after_step(lr, ctx.epoch, stepped=stepped)
    ctx.scheduler.step()
    return total, parts


def _scale_on_device(scaler: torch.amp.GradScaler) -> torch.Tensor | None:
    """A copy of the scaler's current scale as a tensor on its device (no synchronisation), or
    None when the scaler is off."""
    if not scaler.is_enabled():
        return None
    scale = getattr(scaler, "_scale", None)  # the tensor behind get_scale(), which would synchronise
    return scale.detach().clone() if torch.is_tensor(scale) else torch.tensor(scaler.get_scale())


def _progress_bar(enabled: bool, total: int, initial: int, desc: str):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, leave=False, dynamic_ncols=True, file=sys.stderr)


@torch.no_grad()
def evaluate(model: nn.Module, loss: MultiTaskLoss, loader: Iterable[dict], tasks: tuple[TaskSpec, ...],
             device: torch.device, autocast: Callable[[], contextlib.AbstractContextManager]
             ) -> tuple[dict[str, dict[str, float]], float]:
    """Metrics over the whole set (summed across DDP ranks) and the mean validation loss.

    The validation loss is the unweighted sum of the task losses, averaged over samples, so that
    early stopping does not depend on the (learned) task weights.
    """
    model.eval()
    metrics = MultiTaskMetrics(tasks)
    loss_sum = torch.zeros(2, dtype=torch.float64, device=device)  # (sum of loss * n, n)
    for batch in loader:
        batch = to_device(batch, device)
        with autocast():
            outputs = model(batch["image"])
        outputs = {k: v.float() for k, v in outputs.items()}
        _, parts = loss(outputs, batch)
        n = batch["image"].shape[0]
        loss_sum[0] += sum(parts.values()).detach().double() * n  # stays on the device: no sync per batch
        loss_sum[1] += n
        metrics.update(outputs, batch)
    metrics.all_reduce()
    all_reduce_sum(loss_sum)
    return metrics.compute(), float(loss_sum[0] / loss_sum[1].clamp(min=1))
