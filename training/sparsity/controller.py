"""Reach a sparsity target in one run: λ adapted during training, zeros capped, then frozen.

`TargetGroupLasso` is the group lasso (`GroupLasso`, proximal mode) driven by a `Target`:

1. **Schedule.** Over the first ``reach_at`` of the sparsify phase (the epochs between the warm-up
   and the cool-down) the wanted progress follows the cubic schedule of gradual pruning
   (Zhu & Gupta, 2017): ``s_t = s_f · (1 − (1 − t/n)³)``, fast early and slow near the end.
2. **λ control.** Zeros lag λ (a group must first shrink to nothing), so λ is set from where the
   groups are, not from how many are zero yet. A group shrinks by ``lr · λ · w_g`` per proximal
   step (``w_g`` its weight) while the optimizer's step pushes its norm back by ``lr · p_g`` (an
   average of what each step did to its norm), so it reaches zero within ``horizon`` steps for
   ``λ ≥ λ_g = (‖W_g‖ / (horizon · lr) + p_g) / w_g``. Every ``every`` optimizer steps the groups
   are ranked by ``λ_g``, and λ is the ``λ_g`` of the last group needed for the progress the
   schedule wants ``horizon`` steps ahead, times a multiplier ``m`` that corrects the model from
   the lag of the exact progress (measured on the model: zero groups, or the compact model's MACs
   or predicted latency through `CostModel`) behind the schedule: ``log m += k · (s_t − s) / s_f``.
3. **Cap.** The proximal step may not run ahead: when the groups it would zero take the progress
   past the schedule (never past the target plus ``margin``), only the most decisively dead of
   them (largest threshold over norm) are zeroed, as many as fit; the others are left as they are
   for this step. It also never zeroes the last ``min_alive`` channels of a space (compaction keeps
   that many anyway, and an empty space cuts the network: collapse). A target that needs more is
   refused up front with the most that can be asked for.
4. **Freeze.** Once the progress is within ``margin`` below the target the zero set is frozen:
   the regulariser stops and zero groups are held at zero (as in the cool-down), so every
   remaining epoch fine-tunes the survivors.

If the sparsify phase ends first, the cool-down holds what was reached, and the summary says so
with the closest value reached and why. The controller never exceeds a target silently.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from training.sparsity.cost import CostModel
from training.sparsity.groups import GroupSet, alive_channels, zero_mask
from training.sparsity.regularizer import GroupLasso
from training.sparsity.targets import ROUND_TO, Target, TargetError

log = logging.getLogger("training")

DEFAULT_START_LAMBDA = 0.05
LAMBDA_RANGE = (1e-4, 10.0)  # λ ≳ 1 zeroes every group under Adam(W) whatever the learning rate
MULTIPLIER_RANGE = (0.1, 30.0)
SCHEDULE_SLACK = 0.02  # the cap runs this far (a fraction of the target's progress) ahead of the schedule
#: Reached / cap margin, in the target's unit: absolute for zero_groups, relative for the others.
MARGINS = {"zero_groups": 0.005, "macs": 0.02, "latency_ms": 0.02}


@dataclass(frozen=True)
class CubicSchedule:
    """Zhu & Gupta's gradual schedule from 0 at ``start`` to ``final`` at ``end`` (steps)."""

    start: int
    end: int
    final: float

    def at(self, step: int) -> float:
        if step <= self.start:
            return 0.0
        frac = min(1.0, (step - self.start) / max(1, self.end - self.start))
        return self.final * (1.0 - (1.0 - frac) ** 3)


class ProgressMeter:
    """A target's progress on the model: exactly (as compaction will see it), or quickly from the
    zero-group counts per space that a proximal step is about to leave (channel groups)."""

    def __init__(self, target: Target, groupset: GroupSet, model: nn.Module, cost: CostModel | None) -> None:
        if target.kind != "zero_groups" and (cost is None or groupset.mode != "channel"):
            raise TargetError(f"a {target.kind} target prices channels: it needs channel groups "
                              f"(sparsity.groups: channel)")
        self.target, self.groupset, self.model, self.cost = target, groupset, model, cost
        self.kind = {"macs": "macs", "latency_ms": "latency"}.get(target.kind)
        self.spaces = groupset.index().keys
        self.dense = cost.dense_cost(self.kind) if self.kind else float(groupset.num_groups)
        self.wanted = target.progress(self.dense)

    def from_zero_counts(self, zeros: Tensor) -> float:
        """Progress with ``zeros[i]`` zero groups in space ``i`` (index order)."""
        if self.kind is None:
            return float(zeros.sum()) / self.dense
        widths = self.groupset.index().widths
        alive = {n: w - int(z) for n, w, z in zip(self.spaces, widths, zeros.tolist(), strict=True)}
        return 1.0 - self.cost.cost(self.kind, alive) / self.dense

    def exact(self) -> float:
        """Progress of the model as it is: zero groups, or the cost of its alive channels."""
        if self.kind is None:
            return sum(int(z.sum()) for z in zero_mask(self.groupset, self.model).values()) / self.dense
        alive = {n: int(a.sum()) for n, a in alive_channels(self.model, self.groupset).items()}
        return 1.0 - self.cost.cost(self.kind, alive) / self.dense

    def in_unit(self, progress: float) -> float:
        return self.target.achieved(progress, self.dense)


class TargetGroupLasso(GroupLasso):
    """Proximal group lasso whose λ follows a target (module docstring)."""

    def __init__(self, groupset: GroupSet, meter: ProgressMeter, *, steps_per_epoch: int, epochs: int,
                 warmup_epochs: int = 0, cooldown_from: int | None = None, lam: float = DEFAULT_START_LAMBDA,
                 saving: Tensor | None = None, every: int = 5, reach_at: float = 0.75,
                 gain: float = 0.3, min_alive: int = ROUND_TO) -> None:
        super().__init__(groupset, lam, "proximal", warmup_epochs, cooldown_from=cooldown_from, saving=saving,
                         refresh_every=every)
        self.meter, self.every, self.gain = meter, max(1, int(every)), gain
        sparsify_end = (cooldown_from if cooldown_from is not None else epochs) * steps_per_epoch
        start = warmup_epochs * steps_per_epoch
        self.schedule = CubicSchedule(start, start + max(1, round(reach_at * (sparsify_end - start))), meter.wanted)
        self.horizon = max(self.every, (self.schedule.end - start) // 10)
        self.sparsify_end = sparsify_end
        self.step = 0
        self.multiplier = 1.0
        self._norms_before: Tensor | None = None
        self._push: Tensor | None = None  # per group: average growth of the norm per optimizer step / lr
        self._lr = 0.0
        self.frozen_step: int | None = None
        self.trajectory: list[dict] = []
        index = self._index
        self._space_id = torch.arange(len(index.keys)).repeat_interleave(torch.tensor(index.widths))
        self._max_zero = torch.tensor([w - min(w, min_alive) for w in index.widths])
        self._cap = self._cap_progress()
        self._check_reachable()

    # --- the proximal step, capped ----------------------------------------------------------------

    def before_step(self, epoch: int) -> None:
        super().before_step(epoch)
        if self.active(epoch) and not self.frozen:
            self._norms_before = self._index.reduce_flat("sumsq").sqrt()

    def proximal_step(self, lr: float, stepped: Tensor | None = None) -> None:
        if self.lam > 0 and lr != 0:  # eager: λ changes between steps and the cap reads the host
            self._lr = lr
            self._proximal(lr, stepped)

    @torch.no_grad()
    def limit_zeros(self, factor: Tensor, sq: Tensor, threshold: Tensor) -> Tensor:
        """Zero only as many groups as the schedule, the target (+ margin) and ``min_alive`` allow."""
        if self._norms_before is not None and self._lr > 0:  # what the optimizer step did to each norm
            growth = (sq.sqrt() - self._norms_before) / self._lr
            self._push = growth if self._push is None else 0.8 * self._push + 0.2 * growth
        proposed = factor == 0
        counts = self._counts(proposed)
        cap = min(self._cap, self.schedule.at(self.schedule.start + self.step) + SCHEDULE_SLACK * self.meter.wanted)
        if bool((counts <= self._max_zero).all()) and self.meter.from_zero_counts(counts) <= cap:
            return factor
        ratio = threshold / sq.sqrt().clamp_min(torch.finfo(sq.dtype).tiny)
        order = _allowed_order(proposed.cpu(), ratio.cpu(), self._space_id, self._max_zero)
        chosen = self._fill(order, cap)
        keep = torch.ones_like(proposed)
        keep[chosen.to(keep.device)] = False
        return torch.where(proposed & keep, torch.ones_like(factor), factor)

    def _counts(self, zero: Tensor) -> Tensor:
        return torch.bincount(self._space_id[zero.cpu()], minlength=len(self._index.keys))

    def _fill(self, order: Tensor, cap: float) -> Tensor:
        """Groups of ``order`` (best first) to zero within ``cap``: the longest prefix that fits,
        then each later group that still fits (greedy knapsack). Progress grows with every space's
        count, so once a group of a space does not fit, no later one of that space does."""
        k = self._longest_prefix(order, cap)
        chosen, full = [order[:k]], set()
        for g in order[k:].tolist():
            space = int(self._space_id[g])
            if space in full:
                continue
            trial = torch.cat([*chosen, torch.tensor([g])])
            if self._progress_of(trial) <= cap:
                chosen = [trial]
            else:
                full.add(space)
        return torch.cat(chosen)

    def _longest_prefix(self, order: Tensor, cap: float) -> int:
        """The most groups of ``order`` (best first) that keep the progress within ``cap``."""
        lo, hi = 0, len(order)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self._progress_of(order[:mid]) <= cap:
                lo = mid
            else:
                hi = mid - 1
        return lo

    def _shortest_prefix(self, order: Tensor, wanted: float) -> int:
        """The fewest groups of ``order`` whose removal reaches ``wanted`` (len + 1 if none does)."""
        lo, hi = 1, len(order) + 1
        while lo < hi:
            mid = (lo + hi) // 2
            if self._progress_of(order[:mid]) >= wanted:
                hi = mid
            else:
                lo = mid + 1
        return lo

    def _progress_of(self, groups: Tensor) -> float:
        return self.meter.from_zero_counts(torch.bincount(self._space_id[groups], minlength=len(self._index.keys)))

    def _cap_progress(self) -> float:
        t, m = self.meter.target, MARGINS[self.meter.target.kind]
        over = {"zero_groups": t.value + m, "macs": t.value * (1 + m), "latency_ms": t.value * (1 - m)}[t.kind]
        return Target(t.kind, over).progress(self.meter.dense) if t.kind != "zero_groups" else min(over, 1.0)

    def _check_reachable(self) -> None:
        most = self.meter.from_zero_counts(self._max_zero)
        if most + 1e-12 < self.meter.wanted:
            raise TargetError(
                f"target {self.meter.target} cannot be reached without emptying a channel space (collapse): "
                f"with at least {ROUND_TO} channels left in every space the most is "
                f"{self.meter.target.kind}={self.meter.in_unit(most):.4g}; ask for less")

    # --- control ----------------------------------------------------------------------------------

    def after_step(self, lr: float, epoch: int, stepped: Tensor | None = None) -> None:
        super().after_step(lr, epoch, stepped)  # the (capped) proximal step, or holding the zeros
        if self.frozen or not self.active(epoch):
            return
        self.step += 1
        if self.step % self.every == 0 or self.step == 1:
            self.control(self.schedule.start + self.step, lr)

    @torch.no_grad()
    def control(self, step: int, lr: float) -> None:
        """Measure, then freeze at the target or set λ for the schedule ``horizon`` steps ahead."""
        progress, wanted = self.meter.exact(), self.schedule.at(step)
        self.trajectory.append({"step": step, "lambda": self.lam, "progress": progress, "schedule": wanted})
        if progress >= self._reached_at():
            self.frozen, self.frozen_step = True, step
            log.info("target %s reached at step %d (%s=%.4g, λ %.4g): zero groups frozen",
                     self.meter.target, step, self.meter.target.kind, self.meter.in_unit(progress), self.lam)
            return
        lag = (wanted - progress) / max(self.meter.wanted, 1e-12)
        lo, hi = MULTIPLIER_RANGE
        self.multiplier = min(hi, max(lo, self.multiplier * math.exp(self.gain * lag)))
        norms = self._index.reduce_flat("sumsq").sqrt().cpu()
        push = self._push.cpu().clamp_min(0) if self._push is not None else torch.zeros_like(norms)
        needed = (norms / (self.horizon * max(lr, 1e-12)) + push) / self._weights_cpu
        needed[norms == 0] = 0.0
        order = _allowed_order(torch.ones_like(needed, dtype=torch.bool), -needed, self._space_id, self._max_zero)
        k = min(self._shortest_prefix(order, self.schedule.at(step + self.horizon)), len(order))
        lam_ff = float(needed[order[k - 1]]) if k else self.lam
        lo, hi = LAMBDA_RANGE
        self.lam = min(hi, max(lo, self.multiplier * lam_ff))

    def _reached_at(self) -> float:
        t, m = self.meter.target, MARGINS[self.meter.target.kind]
        if t.kind == "zero_groups":
            return t.value - m
        under = t.value * (1 - m) if t.kind == "macs" else t.value * (1 + m)
        return Target(t.kind, under).progress(self.meter.dense)

    # --- records ----------------------------------------------------------------------------------

    def epoch_record(self) -> dict:
        """What history.jsonl logs per epoch: λ now, the measured quantity and the target."""
        progress = self.meter.exact()
        return {"target": str(self.meter.target), "lambda": self.lam, "measured": self.meter.in_unit(progress),
                "progress": progress, "wanted_progress": self.meter.wanted, "frozen": self.frozen}

    def summary(self) -> dict:
        """The outcome, for sparsity.json: requested, achieved, and why when not reached."""
        progress = self.meter.exact()
        t = self.meter.target
        reached = self.frozen or progress >= self._reached_at()
        out = {"target": str(t), "kind": t.kind, "requested": t.value, "achieved": self.meter.in_unit(progress),
               "reached": reached, "frozen_at_step": self.frozen_step, "final_lambda": self.lam,
               "dense": self.meter.dense if t.kind == "latency_ms" else None, "trajectory": self.trajectory}
        if not reached:
            out["why"] = (f"the sparsify phase ended (step {self.sparsify_end}) before the target; λ was "
                          f"{self.lam:.4g}{' (its upper bound)' if self.lam >= LAMBDA_RANGE[1] else ''}: give "
                          f"more epochs before the cool-down, or ask for less")
        return out

    def state_dict(self) -> dict:
        return {"lam": self.lam, "multiplier": self.multiplier, "step": self.step, "frozen": self.frozen,
                "frozen_step": self.frozen_step, "trajectory": list(self.trajectory)}

    def load_state_dict(self, state: dict) -> None:
        self.lam, self.multiplier, self.step = float(state["lam"]), float(state["multiplier"]), int(state["step"])
        self.frozen, self.frozen_step = bool(state["frozen"]), state["frozen_step"]
        self.trajectory = list(state["trajectory"])


def _allowed_order(proposed: Tensor, ratio: Tensor, space_id: Tensor, max_zero: Tensor) -> Tensor:
    """Proposed zeros, most decisively dead first, without the ones beyond a space's ``max_zero``."""
    idx = proposed.nonzero().flatten()
    idx = idx[torch.sort(-ratio[idx].double(), stable=True).indices]
    keep = torch.zeros(len(idx), dtype=torch.bool)
    for s in space_id[idx].unique().tolist():
        mine = (space_id[idx] == s).nonzero().flatten()
        keep[mine[: int(max_zero[s])]] = True
    return idx[keep]

