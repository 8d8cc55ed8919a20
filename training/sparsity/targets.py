"""Sparsity targets: what a run is asked to reach instead of a regularisation strength λ.

``--target KIND=VALUE`` (``sparsity.target``), one of

- ``zero_groups=F``: the fraction ``F`` in (0, 1) of the shared encoder's channel groups that are
  exactly zero;
- ``macs=R``: the compact model's MAC reduction ratio, dense MACs ÷ compact MACs (heads included,
  widths rounded up to the compaction's ``round_to``), ``R`` > 1;
- ``latency_ms=T``: the compact model's ONNX Runtime latency in ms on this machine's CPU at
  ``sparsity.target_batch`` images and ``sparsity.target_threads`` threads, predicted from a
  per-layer latency table and checked at the end by timing the exported model.

Every target is tracked as a *progress* ``s`` in [0, 1) that grows as groups die: the zero-group
fraction, the fraction of MACs removed (1 − 1/R) or the fraction of latency removed
(1 − T / dense latency). The controller (`training.sparsity.controller`) drives ``s`` along a
schedule towards the target's progress.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from parsimony.errors import ConfigError

TARGET_KINDS: tuple[str, ...] = ("zero_groups", "macs", "latency_ms")
GROUP_WEIGHTS: tuple[str, ...] = ("size", "macs", "latency")
#: Compaction rounds every width up to a multiple of this (training.compact's default).
ROUND_TO = 8
_EXAMPLES = "zero_groups=0.6, macs=3 or latency_ms=20"


class TargetError(ConfigError):
    """A target that cannot be parsed or reached; the message says what to write instead."""


@dataclass(frozen=True)
class Target:
    """A parsed target; ``value`` in the kind's own unit (fraction, ratio, ms)."""

    kind: str
    value: float

    def __str__(self) -> str:
        return f"{self.kind}={self.value:g}"

    @property
    def default_weight(self) -> str:
        """The group weight that matches the target: cost-aware for MACs and latency."""
        return {"zero_groups": "size", "macs": "macs", "latency_ms": "latency"}[self.kind]

    def progress(self, dense: float) -> float:
        """The progress ``s`` the target asks for; ``dense`` is the dense model's latency (ms) for a
        latency target and is ignored otherwise."""
        if self.kind == "zero_groups":
            return self.value
        if self.kind == "macs":
            return 1.0 - 1.0 / self.value
        if self.value >= dense:
            raise TargetError(f"latency_ms={self.value:g} is not below the dense model's predicted "
                              f"{dense:.3g} ms: nothing to remove; ask for less than {dense:.3g}")
        return 1.0 - self.value / dense

    def achieved(self, progress: float, dense: float = math.nan) -> float:
        """A progress expressed in the target's unit (inverse of `progress`)."""
        if self.kind == "zero_groups":
            return progress
        if self.kind == "macs":
            return 1.0 / max(1.0 - progress, 1e-12)
        return dense * (1.0 - progress)


def parse_target(text: str) -> Target:
    """``"macs=3"`` → ``Target("macs", 3.0)``; raises `TargetError` naming the problem."""
    if not isinstance(text, str) or "=" not in text:
        raise TargetError(f"target {text!r}: expected KIND=VALUE with KIND one of {TARGET_KINDS}, "
                          f"e.g. {_EXAMPLES}")
    kind, raw = (part.strip() for part in text.split("=", 1))
    if kind not in TARGET_KINDS:
        raise TargetError(f"target {text!r}: unknown kind {kind!r}; choose one of {TARGET_KINDS} "
                          f"(e.g. {_EXAMPLES})")
    try:
        value = float(raw)
    except ValueError:
        raise TargetError(f"target {text!r}: {raw!r} is not a number") from None
    if not math.isfinite(value):
        raise TargetError(f"target {text!r}: the value must be finite")
    if kind == "zero_groups" and not 0 < value < 1:
        raise TargetError(f"target {text!r}: zero_groups is a fraction of the encoder's groups, strictly "
                          f"between 0 and 1 (e.g. zero_groups=0.6 for 60 %)")
    if kind == "macs" and not value > 1:
        raise TargetError(f"target {text!r}: macs is the ratio dense MACs / compact MACs and must be "
                          f"above 1 (e.g. macs=3 for a model with a third of the MACs)")
    if kind == "latency_ms" and not value > 0:
        raise TargetError(f"target {text!r}: latency_ms must be a positive number of milliseconds")
    return Target(kind, value)


def resolve_weight(target: Target | None, weight: str | None) -> str:
    """The group weight of a run: the one asked for, else the target's matching one, else size."""
    if weight is not None:
        if weight not in GROUP_WEIGHTS:
            raise TargetError(f"unknown group weight {weight!r}; choose one of {GROUP_WEIGHTS}")
        return weight
    return target.default_weight if target is not None else "size"
