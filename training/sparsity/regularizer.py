"""Group lasso on the encoder's channel groups: ``λ · Σ_g w_g · ‖W_g‖₂``, ``w_g = sqrt(|g|)`` (the
paper's) unless other weights are given (`training.sparsity.cost.group_weights`).

Two ways to apply it (``SparsityConfig.mode``):

- ``proximal`` (the paper's): after every optimizer step, the group soft-threshold
  ``W_g ← W_g · max(0, 1 − lr·λ·sqrt(|g|) / ‖W_g‖₂)``, which sets whole groups exactly to zero.
- ``penalty``: ``penalty()`` is added to the loss; plain (sub)gradients only shrink groups towards
  zero, so `finalize` zeroes the groups whose norm ends below ``tolerance`` before compaction.

Channel-mode groups overlap (a conv weight is a producer slice of one space and a consumer slice of
another). The proximal step computes every group's factor from the norms *before* the step and
multiplies each weight by the factors of all groups containing it: groups under the threshold end
exactly zero, a group that overlaps no shrinking group shrinks by exactly ``lr·λ·sqrt(|g|)``, and
the result does not depend on the order of the spaces. Paper-mode groups are disjoint, so there
the step is the exact proximal operator.

Optional cool-down (``cooldown_from``): from that epoch on the regulariser is off and the groups
that are exactly zero are held at zero (re-zeroed after every optimizer step, from a mask read
before it), so the last epochs fine-tune the surviving channels: prune then fine-tune in one run.
The mask is read from the weights, so a resumed run holds the same groups without extra state.

Under DDP every rank holds the same parameters after the optimizer step, so the step yields the
same zeros everywhere; `check_same_across_ranks` verifies that cheaply (one all-gather of a hash).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from training.sparsity.captured import CapturedUpdate
from training.sparsity.groups import GroupSet, zero_mask

REG_MODES: tuple[str, ...] = ("proximal", "penalty")


class GroupLasso:
    """The regulariser over a `GroupSet`; the task heads are never touched."""

    def __init__(
        self,
        groupset: GroupSet,
        lam: float,
        mode: str = "proximal",
        warmup_epochs: int = 0,
        tolerance: float = 1e-6,
        cooldown_from: int | None = None,
        weights: Tensor | None = None,
        saving: Tensor | None = None,
        refresh_every: int = 5,
    ) -> None:
        if mode not in REG_MODES:
            raise ValueError(f"unknown sparsity mode {mode!r}; choose one of {REG_MODES}")
        if lam < 0 or warmup_epochs < 0 or tolerance < 0:
            raise ValueError(
                f"lam, warmup_epochs and tolerance must be >= 0, got {lam}, {warmup_epochs}, {tolerance}"
            )
        self.groupset, self.lam, self.mode = groupset, float(lam), mode
        self.warmup_epochs, self.tolerance = int(warmup_epochs), float(tolerance)
        if cooldown_from is not None and cooldown_from <= self.warmup_epochs:
            raise ValueError(
                f"the cool-down starts at epoch {cooldown_from}, not after the {self.warmup_epochs} warm-up "
                f"epochs: no epoch would be sparsified; lower sparsity.cooldown_epochs or warmup_epochs, "
                f"or train for more epochs"
            )
        self.cooldown_from = cooldown_from
        self.frozen = False  # set when a sparsity target is reached: zero groups held from then on
        self._keep: dict[str, Tensor] | None = None
        self._captured: CapturedUpdate | None = None
        self._index = groupset.index()
        if weights is None:  # the paper's sqrt(|g|)
            sizes = torch.tensor([groupset.group_size(n) for n in self._index.keys], dtype=torch.float64)
            weights = sizes.sqrt().repeat_interleave(torch.tensor(self._index.widths))
        if weights.shape != (self._index.total,):
            raise ValueError(f"weights must hold one value per group ({self._index.total}), got {tuple(weights.shape)}")
        self._weights_cpu = weights.detach().to("cpu", torch.float64)
        self._weights_on: dict[tuple[torch.device, torch.dtype], Tensor] = {}
        self._sqrt_sizes = self._weights_cpu.clone()
        self._saving = None if saving is None else saving.detach().to("cpu", torch.float64)
        self._importance: Tensor | None = None
        self.refresh_every, self._calls = max(1, int(refresh_every)), 0

    @classmethod
    def from_config(cls, groupset: GroupSet, config: Any, epochs: int | None = None) -> GroupLasso:
        """From a `training.config.SparsityConfig` (lam, mode, warmup_epochs, tolerance,
        cooldown_epochs: the last ``cooldown_epochs`` of ``epochs`` are the cool-down)."""
        cooldown = getattr(config, "cooldown_epochs", 0)
        cooldown_from = epochs - cooldown if cooldown and epochs is not None else None
        return cls(groupset, config.lam, config.mode, config.warmup_epochs, config.tolerance, cooldown_from)

    def active(self, epoch: int) -> bool:
        """False while ``lam`` is 0, during warm-up and during cool-down (``epoch`` counts from 0)."""
        return self.lam > 0 and epoch >= self.warmup_epochs and not self.holding(epoch)

    def holding(self, epoch: int) -> bool:
        """True in the cool-down (or once frozen): no regulariser, zero groups held at zero."""
        return self.frozen or (self.lam > 0 and self.cooldown_from is not None and epoch >= self.cooldown_from)

    @torch.no_grad()
    def before_step(self, epoch: int) -> None:
        """Call before ``optimizer.step()``: in the cool-down, note which groups are zero now (in
        penalty mode after zeroing those under the tolerance)."""
        if self._saving is not None and self.active(epoch):
            if self._calls % self.refresh_every == 0:
                self.refresh_weights()
            self._calls += 1
        if not self.holding(epoch):
            self._keep = None
            return
        if self.mode == "penalty":
            self.finalize()
        maxabs = self._index.reduce_flat("maxabs")
        self._keep = self._index.split((maxabs != 0).to(maxabs.dtype))

    def penalty(self) -> Tensor:
        """``λ Σ_g sqrt(|g|) ‖W_g‖₂``, differentiable; a zero group contributes a zero gradient."""
        sq = self._index.reduce_flat("sumsq", differentiable=True)
        return self.lam * (self._weights(sq) * _safe_sqrt(sq)).sum()

    @torch.no_grad()
    def proximal_step(self, lr: float, stepped: Tensor | None = None) -> None:
        """Group soft-threshold with step ``lr`` (the optimizer's current learning rate).

        ``stepped``: a boolean tensor saying whether the optimizer step was taken (a grad scaler
        skips steps with inf/NaN gradients); when False the weights are left as they are. Given as
        a tensor so that the decision stays on the device."""
        if self.lam == 0 or lr == 0:
            return
        device = self._index.entries[0][0].device if self._index.entries else torch.device("cpu")
        if device.type != "cuda" or not self._static_step():
            self._proximal(lr, stepped)
            return
        if self._captured is None:  # on a GPU: one graph replay instead of hundreds of launches
            self._captured = CapturedUpdate(self._proximal, device)
        self._captured(lr, stepped)

    def _static_step(self) -> bool:
        """Whether every call of the step launches the same kernels on the same tensors, so that a
        CUDA graph can replay it: not with a controller choosing which groups may be zeroed (its
        choice is made on the host) nor with cost-aware weights (refreshed into new tensors)."""
        return type(self).limit_zeros is GroupLasso.limit_zeros and self._saving is None

    def _proximal(self, lr: float | Tensor, stepped: Tensor | None) -> None:
        sq = self._index.reduce_flat("sumsq")
        threshold = self._weights(sq) * (lr * self.lam)
        factor = (1 - threshold / sq.sqrt().clamp_min(torch.finfo(sq.dtype).tiny)).clamp_min_(0)
        factor = self.limit_zeros(factor, sq, threshold)
        if stepped is not None:
            factor = torch.where(stepped.to(factor.device), factor, torch.ones_like(factor))
        self._index.scale_(self._index.split(factor))

    def limit_zeros(self, factor: Tensor, sq: Tensor, threshold: Tensor) -> Tensor:
        """Hook for a controller that caps which groups one step may zero (a factor of 0); by
        default every group under its threshold is zeroed."""
        return factor

    def loss_term(self, epoch: int) -> Tensor | None:
        """The penalty to add to the loss this epoch (penalty mode, after warm-up), else None."""
        return self.penalty() if self.mode == "penalty" and self.active(epoch) else None

    def after_step(self, lr: float, epoch: int, stepped: Tensor | None = None) -> None:
        """Call after ``optimizer.step()``: the proximal step (proximal mode, after warm-up), or in
        the cool-down re-zero the groups `before_step` found zero (``stepped``: `proximal_step`)."""
        if self.mode == "proximal" and self.active(epoch):
            self.proximal_step(lr, stepped)
        elif self._keep is not None and self.holding(epoch):
            with torch.no_grad():
                self._index.scale_(self._keep)

    @torch.no_grad()
    def finalize(self) -> int:
        """Set every group with ‖W_g‖₂ < tolerance exactly to zero; returns how many were not yet."""
        norms = self._index.reduce_flat("sumsq").sqrt()
        exact = self._index.reduce_flat("maxabs") == 0
        small = norms < self.tolerance
        self._index.scale_(self._index.split((~small).to(norms.dtype)))
        return int((small & ~exact).sum())

    @torch.no_grad()
    def group_norms(self) -> dict[str, Tensor]:
        """‖W_g‖₂ per channel of every grouped space."""
        return {k: v.sqrt() for k, v in self._index.reduce("sumsq").items()}

    def zero_mask(self) -> dict[str, Tensor]:
        """Per grouped space: True where every weight of the group is exactly 0."""
        return zero_mask(self.groupset)

    @torch.no_grad()
    def refresh_weights(self) -> None:
        """Cost-aware weights (``saving`` given): ``w_g = sqrt(|g|) · m_g`` with ``m_g`` the group's
        saving per unit of importance relative to the average, ``(S_g / S̄) / (I_g / Ī)``, clipped to
        [1/4, 4] and rescaled so the weights keep the total of ``sqrt(|g|)``. ``I_g`` is a running
        mean of the groups' Fisher importance (from the gradients of this step), so a group is
        shrunk harder the more it saves and the less the loss needs it — the knapsack's order.
        Without the importance term every costly channel would go first, needed or not: under
        Adam(W) the proximal balance hardly sees how much the loss needs a group."""
        sample = self.groupset.fisher_importance()
        if sample is None or self._saving is None:
            return
        sample = sample.detach().to("cpu", torch.float64)
        self._importance = sample if self._importance is None else 0.7 * self._importance + 0.3 * sample
        alive = self._importance > 0
        if not bool(alive.any()):
            return
        rel_saving = self._saving / self._saving[alive].mean()
        rel_importance = self._importance / self._importance[alive].mean()
        m = (rel_saving / rel_importance.clamp_min(1e-12)).clamp(0.25, 4.0)
        weights = self._sqrt_sizes * m
        self._weights_cpu = weights * (self._sqrt_sizes.sum() / weights.sum())
        self._weights_on.clear()

    def _weights(self, like: Tensor) -> Tensor:
        """The group weights (``sqrt(|g|)`` unless others were given) on ``like``'s device and dtype."""
        key = (like.device, like.dtype)
        if key not in self._weights_on:
            self._weights_on[key] = self._weights_cpu.to(device=like.device, dtype=like.dtype)
        return self._weights_on[key]


def _safe_sqrt(sq: Tensor) -> Tensor:
    """sqrt with value 0 and gradient 0 at 0 (a valid subgradient of the norm), never NaN."""
    positive = sq > 0
    return torch.where(positive, sq.clamp_min(torch.finfo(sq.dtype).tiny).sqrt(), torch.zeros_like(sq))


def zero_mask_digest(mask: Mapping[str, Tensor]) -> int:
    """A stable 63-bit hash of a zero mask (space names and bits), equal across processes."""
    h = hashlib.sha256()
    for name in sorted(mask):
        bits = mask[name].detach().to("cpu", torch.bool).flatten()
        h.update(f"{name}\0{bits.numel()}\0".encode())
        h.update(bits.numpy().tobytes())
    return int.from_bytes(h.digest()[:8], "big") >> 1


def check_same_across_ranks(groupset: GroupSet) -> None:
    """Raise RuntimeError naming the ranks whose zero groups differ; no-op without a process group."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    digest = zero_mask_digest(zero_mask(groupset))
    cuda = dist.get_backend() == "nccl"
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    mine = torch.tensor([digest], dtype=torch.int64, device=device)
    gathered = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, mine)
    raise_if_ranks_differ([int(t.item()) for t in gathered])


def raise_if_ranks_differ(digests: list[int]) -> None:
    """RuntimeError listing the ranks that disagree with rank 0."""
    bad = [rank for rank, d in enumerate(digests) if d != digests[0]]
    if bad:
        raise RuntimeError(
            f"zero groups differ across ranks: ranks {bad} disagree with rank 0 (digests {digests}); "
            "parameters have diverged (check that every rank runs the same proximal step and lr)"
        )
