"""Per-task training losses and their multi-task combination.

Each task's loss is its kind's (`training.kinds`). Every dense loss is a mean over the *valid*
pixels of the batch (the masks of `training.tasks`: segmentation target outside [0, C), depth 0,
normal all-zero, edges -1), computed as a masked sum divided by ``max(N_valid, 1)``: no host
synchronisation, and a batch without a single valid pixel gives exactly 0 while keeping a
``grad_fn`` connected to the output, so ``backward()`` and DDP's gradient hooks still run on
every rank.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

from training.kinds import kind_of
from training.tasks import TaskSpec

WEIGHTINGS: tuple[str, ...] = ("equal", "uncertainty")


def task_loss(task: TaskSpec, output: Tensor, target: Tensor) -> Tensor:
    """The scalar training loss of one task, as its kind defines it (`training.kinds`)."""
    return kind_of(task).loss(task, output, target)


class MultiTaskLoss(nn.Module):
    """Sum of task losses, either plainly (``equal``) or with learned uncertainty weights.

    ``uncertainty`` follows Kendall, Gal & Cipolla (CVPR 2018) in the common simplified form with
    one learnable log-variance ``s_t`` per task (initialised to 0)::

        total = Σ_t exp(−s_t) · L_t + s_t

    For a fixed ``L_t`` the optimum is ``s_t = log L_t``: a task whose loss stays large is
    down-weighted, and the ``+ s_t`` term stops all weights from collapsing to zero. The same form
    is used for every kind (no ½ factor for regression tasks). The ``s_t`` are parameters of this
    module, so the optimizer must be given ``loss_module.parameters()`` (best without weight
    decay, which would pull them back to 0). Under DDP they are not covered by the model wrapper:
    call `all_reduce_grads` after ``backward()`` so that every rank keeps the same values.
    """

    def __init__(self, tasks: Sequence[TaskSpec], weighting: str = "equal") -> None:
        super().__init__()
        if weighting not in WEIGHTINGS:
            raise ValueError(f"unknown loss weighting {weighting!r}; choose one of {WEIGHTINGS}")
        if not tasks:
            raise ValueError("MultiTaskLoss needs at least one task")
        self.tasks = tuple(tasks)
        self.weighting = weighting
        self.log_variances = nn.ParameterDict()
        if weighting == "uncertainty":
            for task in self.tasks:
                self.log_variances[task.name] = nn.Parameter(torch.zeros(()))

    @property
    def log_vars(self) -> dict[str, float]:
        """Current log-variances by task, for logging (empty under ``equal`` weighting)."""
        return {name: float(p.detach()) for name, p in self.log_variances.items()}

    def forward(
        self, outputs: Mapping[str, Tensor], batch: Mapping[str, Tensor]
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Return the weighted total and every task's raw (unweighted, detached) loss."""
        raw: dict[str, Tensor] = {}
        total: Tensor | None = None
        for task in self.tasks:
            loss = task_loss(task, _lookup(outputs, task, "outputs"), _lookup(batch, task, "batch"))
            raw[task.name] = loss.detach()
            weighted = self._weigh(task.name, loss)
            total = weighted if total is None else total + weighted
        assert total is not None  # at least one task, checked in __init__
        return total, raw

    def _weigh(self, name: str, loss: Tensor) -> Tensor:
        if self.weighting == "equal":
            return loss
        s = self.log_variances[name]
        return torch.exp(-s) * loss + s

    def all_reduce_grads(self) -> None:
        """Average the log-variance gradients across DDP ranks (no-op otherwise)."""
        if not (dist.is_available() and dist.is_initialized()):
            return
        world = dist.get_world_size()
        for p in self.parameters():
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
            p.grad.div_(world)


def _lookup(tensors: Mapping[str, Tensor], task: TaskSpec, what: str) -> Tensor:
    if task.name not in tensors:
        raise KeyError(f"task {task.name!r} missing from {what}; it has {sorted(tensors)}")
    return tensors[task.name]
