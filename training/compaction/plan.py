"""Phase one of compaction: a serialisable plan of which channels of each channel space survive.

A `CompactionPlan` lists, for every feature channel space of the encoder (traced by
`training.sparsity.trace_channels`: a conv output, or a whole residual stream), the sorted channel
indices to keep and the new width, plus the conv/BN modules the space touches. It records the
source model's config (and its SHA-256), so `apply_plan` refuses a model it was not made for, and a
recorded plan replays on any freshly built model with that config (the Torch-Pruning habit).

Kept channels are the alive ones (`training.sparsity.alive_channels`); with ``round_to`` > 1 a
few dead channels are retained so every width is a multiple of ``round_to`` (such widths
run much faster: docs/METHOD.md §4), never exceeding the original width. Retained dead channels are chosen
deterministically: largest L2 norm of their producer weights (filters, biases, BN γ and β) first,
then lowest index. Keeping a dead channel never changes an output (it is either exactly zero or
read by nothing that is kept alive), so the compacted model stays exact whatever ``round_to`` is.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from training.sparsity.groups import GROUP_MODES, GroupSet, alive_channels, build_groups
from training.sparsity.trace import ChannelSpace, unwrap

PLAN_FORMAT = "parsimony.compaction-plan/1"


def config_hash(config_dict: Mapping) -> str:
    """SHA-256 of a model config dict in canonical JSON (sorted keys, no whitespace)."""
    text = json.dumps(config_dict, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True)
class SpacePlan:
    """One channel space: keep ``kept`` (sorted) of ``original_width`` channels.

    ``padding`` lists the kept channels that are dead (retained only for ``round_to`` or the
    minimum width). ``producers`` are the (conv, BN or None) pairs writing the channels,
    ``consumers`` the encoder convs and ``head_consumers`` the head input convs reading them.
    """

    name: str
    original_width: int
    kept: tuple[int, ...]
    producers: tuple[tuple[str, str | None], ...]
    consumers: tuple[str, ...] = ()
    head_consumers: tuple[str, ...] = ()
    padding: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        _check_indices(self)

    @property
    def width(self) -> int:
        return len(self.kept)

    @property
    def alive(self) -> int:
        return len(self.kept) - len(self.padding)

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "original_width": self.original_width,
            "width": self.width,
            "kept": list(self.kept),
            "padding": list(self.padding),
            "producers": [list(p) for p in self.producers],
            "consumers": list(self.consumers),
            "head_consumers": list(self.head_consumers),
        }

    @classmethod
    def from_dict(cls, d: Mapping) -> SpacePlan:
        try:
            fields = dict(
                name=str(d["name"]),
                original_width=int(d["original_width"]),
                kept=tuple(int(i) for i in d["kept"]),
                producers=tuple((str(c), None if b is None else str(b)) for c, b in d["producers"]),
                consumers=tuple(str(c) for c in d.get("consumers", ())),
                head_consumers=tuple(str(c) for c in d.get("head_consumers", ())),
                padding=tuple(int(i) for i in d.get("padding", ())),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"compaction plan: malformed space entry {dict(d)!r}: {e!r}") from e
        space = cls(**fields)
        if "width" in d and int(d["width"]) != space.width:
            raise ValueError(
                f"compaction plan: space {space.name!r} declares width {d['width']} but keeps {space.width} channels"
            )
        return space


def _check_indices(space: SpacePlan) -> None:
    where = f"compaction plan: space {space.name!r}"
    kept = list(space.kept)
    if space.original_width < 1 or not kept:
        raise ValueError(f"{where} must keep at least one of its {space.original_width} channels")
    if kept != sorted(set(kept)):
        raise ValueError(f"{where}: kept indices must be sorted and unique, got {kept}")
    if kept[0] < 0 or kept[-1] >= space.original_width:
        raise ValueError(
            f"{where}: kept indices must lie in [0, {space.original_width}), got {kept[0]}..{kept[-1]}"
        )
    if not set(space.padding) <= set(kept):
        raise ValueError(f"{where}: padding channels {sorted(set(space.padding) - set(kept))} are not kept")
    if not space.producers:
        raise ValueError(f"{where} has no producers")


@dataclass(frozen=True)
class CompactionPlan:
    """Kept channels per channel space of one model config (see the module docstring)."""

    source_config: dict
    mode: str
    round_to: int
    spaces: tuple[SpacePlan, ...]
    source_hash: str = field(default="")

    def __post_init__(self) -> None:
        digest = config_hash(self.source_config)
        if self.source_hash and self.source_hash != digest:
            raise ValueError(
                f"compaction plan: source_config_sha256 {self.source_hash} does not match its source_config "
                f"({digest}); the plan file was edited or corrupted, re-plan with plan_compaction(model)"
            )
        object.__setattr__(self, "source_hash", digest)
        object.__setattr__(self, "source_config", copy.deepcopy(self.source_config))  # owned, never aliased
        if self.mode not in GROUP_MODES:
            raise ValueError(
                f"compaction plan: unknown group mode {self.mode!r}; expected one of {GROUP_MODES}"
            )
        _check_round_to(self.round_to)
        names = [s.name for s in self.spaces]
        if len(set(names)) != len(names):
            raise ValueError(f"compaction plan: duplicate space names in {names}")

    def space(self, name: str) -> SpacePlan:
        for s in self.spaces:
            if s.name == name:
                return s
        raise KeyError(f"unknown space {name!r}; this plan has {[s.name for s in self.spaces]}")

    def widths(self) -> dict[str, int]:
        """New width per space."""
        return {s.name: s.width for s in self.spaces}

    def to_dict(self) -> dict:
        return {
            "format": PLAN_FORMAT,
            "mode": self.mode,
            "round_to": self.round_to,
            "source_config_sha256": self.source_hash,
            "source_config": copy.deepcopy(self.source_config),
            "spaces": [s.to_dict() for s in self.spaces],
        }

    @classmethod
    def from_dict(cls, d: Mapping) -> CompactionPlan:
        if d.get("format") != PLAN_FORMAT:
            raise ValueError(
                f"not a compaction plan: format is {d.get('format')!r}, expected {PLAN_FORMAT!r}"
            )
        missing = [k for k in ("mode", "round_to", "source_config", "spaces") if k not in d]
        if missing:
            raise ValueError(f"compaction plan is missing {missing}")
        return cls(
            source_config=dict(d["source_config"]),
            mode=str(d["mode"]),
            round_to=int(d["round_to"]),
            spaces=tuple(SpacePlan.from_dict(s) for s in d["spaces"]),
            source_hash=str(d.get("source_config_sha256", "")),
        )

    def summary(self) -> str:
        """One line per space (channels before -> after, alive), then the totals."""
        width = max([len(s.name) for s in self.spaces] + [5])
        lines = [f"{'space':<{width}}  {'before':>6}  {'after':>6}  {'alive':>6}"]
        for s in self.spaces:
            lines.append(f"{s.name:<{width}}  {s.original_width:>6}  {s.width:>6}  {s.alive:>6}")
        before = sum(s.original_width for s in self.spaces)
        after = sum(s.width for s in self.spaces)
        alive = sum(s.alive for s in self.spaces)
        lines.append(
            f"channels {before} -> {after} ({alive} alive, {after - alive} kept for round_to={self.round_to}); "
            f"{self.mode} groups"
        )
        return "\n".join(lines)


def plan_compaction(
    model: nn.Module, *, groupset: GroupSet | None = None, mode: str | None = None, round_to: int = 8
) -> CompactionPlan:
    """Plan the removal of the encoder's dead channels (phase one; `apply_plan` is phase two).

    ``groupset`` defaults to ``build_groups(model, mode)``; ``mode`` defaults to the groupset's mode,
    or ``"channel"``; a ``mode`` that contradicts the groupset's raises. ``round_to`` (0 or 1:
    off) keeps every width a multiple of ``round_to`` (or the original width, if smaller) by
    retaining dead channels. A space keeps at least ``max(1, round_to)`` channels (or all of them
    when it is narrower) even when every channel is dead, because a zero-width conv cannot be
    built; those retained channels change no output.
    """
    model = unwrap(model)
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        raise TypeError("plan_compaction needs a MultiTaskModel (a model with a width-explicit .config)")
    _check_round_to(round_to)
    groupset = _resolve_groupset(model, groupset, mode)
    alive = alive_channels(model, groupset)
    params = {n: p.detach() for n, p in model.named_parameters()}
    spaces = tuple(
        _plan_space(space, alive[name].cpu(), params, round_to)
        for name, space in groupset.graph.spaces.items()
    )
    return CompactionPlan(config.to_dict(), groupset.mode, round_to, spaces)


def _check_round_to(round_to: object) -> None:
    if isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 0:
        raise ValueError(f"round_to must be a non-negative int (0 or 1: no rounding), got {round_to!r}")


def _resolve_groupset(model: nn.Module, groupset: GroupSet | None, mode: str | None) -> GroupSet:
    if mode is not None and mode not in GROUP_MODES:
        raise ValueError(f"unknown group mode {mode!r}; choose one of {GROUP_MODES}")
    if groupset is None:
        return build_groups(model, mode or "channel")
    if mode is not None and mode != groupset.mode:
        raise ValueError(f"mode={mode!r} contradicts the groupset's mode {groupset.mode!r}; pass one of them")
    return groupset


def target_width(alive: int, original: int, round_to: int) -> int:
    """``alive`` rounded up to a multiple of ``round_to`` (at least ``max(1, round_to)``), capped at
    ``original``."""
    r = max(1, round_to)
    return min(original, max(r, -(-alive // r) * r))


def _plan_space(space: ChannelSpace, alive: Tensor, params: Mapping[str, Tensor], round_to: int) -> SpacePlan:
    alive_idx = alive.nonzero().flatten()
    extra = target_width(len(alive_idx), space.width, round_to) - len(alive_idx)
    dead_idx = (~alive).nonzero().flatten()
    norms = producer_norms(space, params)[dead_idx]
    order = torch.sort(-norms, stable=True).indices  # largest norm first, ties by lowest index
    padding = dead_idx[order[:extra]]
    return SpacePlan(
        name=space.name,
        original_width=space.width,
        kept=tuple(sorted(alive_idx.tolist() + padding.tolist())),
        producers=tuple((c, b) for c, b in space.producers),
        consumers=tuple(space.consumers),
        head_consumers=tuple(space.head_consumers),
        padding=tuple(sorted(padding.tolist())),
    )


def producer_norms(space: ChannelSpace, params: Mapping[str, Tensor]) -> Tensor:
    """Per channel: the L2 norm of its producer weights (filters, biases, BN γ and β), float64 on CPU."""
    total = torch.zeros(space.width, dtype=torch.float64)
    for conv, bn in space.producers:
        names = [f"{conv}.weight", f"{conv}.bias"] + ([f"{bn}.weight", f"{bn}.bias"] if bn else [])
        for name in names:
            if name in params:
                p = params[name].detach().to("cpu", torch.float64)
                total += p.pow(2).reshape(p.shape[0], -1).sum(1)
    return total.sqrt()
