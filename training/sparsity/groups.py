"""Parameter groups of the shared encoder, built from its traced channel spaces.

Two grouping modes (`build_groups`), one group per channel of each grouped space:

- ``channel``: the zero-invariant group (docs/METHOD.md §2). For every feature channel of the encoder:
  producer filter(s) + bias + BN gamma and beta + the input slices of every encoder consumer; a
  residual-stream channel is one group across all blocks adding into it. When such a group is zero
  the channel is exactly 0 everywhere and can be removed with no change to any output. Channel
  groups overlap where a conv is both a producer (dim 0) and a consumer (dim 1).
- ``paper``: the reference code's group, one per input channel ``j`` of every encoder conv, the
  slice ``W[:, j]`` (space ``"<conv>:in"``); BN and heads are not grouped, and groups are
  disjoint. The reference (``proxssi/groups/resnet_gp.py``) regularises every 4-D backbone weight,
  so the stem's first conv and its 3 RGB input groups are included, as "each encoder conv" says.

Heads are never regularised: their input convs only appear as head consumers of the encoder output.
Everything is vectorised per space: a `SliceIndex` visits each parameter once per reduction, so
no code loops over channels. Parameters are addressed by qualified name, so a `GroupSet` can read
any model of the same architecture (``alive_channels(other_model, groupset)``).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from training.sparsity.trace import ChannelGraph, ChannelSpace, trace_channels, unwrap

GROUP_MODES: tuple[str, ...] = ("channel", "paper")
Stat = Literal["sumsq", "maxabs"]


@dataclass(frozen=True)
class ParamSlice:
    """Channel ``c`` of a space owns ``model.get_parameter(name).select(dim, c)``."""

    name: str
    dim: int


@dataclass(frozen=True)
class ChannelGroup:
    """One group: channel ``index`` of ``space``; ``size`` is |g|, its number of scalars."""

    space: str
    index: int
    slices: tuple[ParamSlice, ...]
    size: int


class SliceIndex:
    """``{key: [ParamSlice]}`` regrouped by parameter, so each parameter is read once per pass.

    Values live in one flat vector, the keys' channels end to end (``keys``, ``widths``).
    ``reduce_flat`` squares every parameter in one foreach call, reduces it to one vector per use,
    writes the uses into a ``[uses per key, channels]`` matrix (each cell once, so the result is
    deterministic, identical on every DDP rank) and reduces that: a few ops per parameter and a
    constant number for all keys together. ``scale_`` multiplies each parameter in place by the
    product of its keys' channel factors.
    """

    def __init__(self, slices: Mapping[str, Sequence[ParamSlice]], params: Mapping[str, Tensor]) -> None:
        self.keys = list(slices)
        self.widths = [_width(key, sl, params) for key, sl in slices.items()]
        offsets = dict(zip(self.keys, _cumsum(self.widths), strict=True))
        uses: dict[str, list[tuple[str, int]]] = {}
        for key, key_slices in slices.items():
            for s in key_slices:
                if (key, s.dim) in uses.setdefault(s.name, []):
                    raise ValueError(f"parameter {s.name} dim {s.dim} is listed twice in {key!r}")
                uses[s.name].append((key, s.dim))
        self.entries = [(params[name], tuple(u)) for name, u in uses.items()]
        self.total = sum(self.widths)
        self.rows = max((len(sl) for sl in slices.values()), default=0)
        self._cells_cpu = _cells(
            self.entries, offsets, dict(zip(self.keys, self.widths, strict=True)), self.total
        )
        self._cells: dict[torch.device, Tensor] = {}

    def reduce_flat(self, stat: Stat, differentiable: bool = False) -> Tensor:
        """Per channel of every key, end to end: the sum of squares or the max |w| (exact zeros)."""
        with torch.set_grad_enabled(differentiable and torch.is_grad_enabled()):
            params = [p for p, _ in self.entries]
            if torch.is_grad_enabled():
                powers = [p * p if stat == "sumsq" else p.abs() for p in params]
            else:
                powers = torch._foreach_mul(params, params) if stat == "sumsq" else torch._foreach_abs(params)
            parts = []
            for t, (_, uses) in zip(powers, self.entries, strict=True):
                if len(uses) == 1 and t.ndim > 1:  # one reduction straight to the channel dim
                    parts.append(_reduce(t, stat, tuple(d for d in range(t.ndim) if d != uses[0][1])))
                    continue
                t = _per_in_out(t, stat)
                parts += [t if t.ndim == 1 else _reduce(t, stat, 1 - dim) for _, dim in uses]
            values = torch.cat(parts)
            table = values.new_zeros(self.rows * self.total).index_put(
                (self._cells_on(values.device),), values
            )
            return _reduce(table.view(self.rows, self.total), stat, 0)

    def reduce(self, stat: Stat, differentiable: bool = False) -> dict[str, Tensor]:
        """`reduce_flat`, split per key."""
        return self.split(self.reduce_flat(stat, differentiable))

    def split(self, flat: Tensor) -> dict[str, Tensor]:
        return dict(zip(self.keys, flat.split(self.widths), strict=True))

    @torch.no_grad()
    def scale_(self, factors: Mapping[str, Tensor]) -> None:
        """``param *= factor`` per channel, for every key present in ``factors``."""
        same, broadcast = ([], []), ([], [])
        for param, uses in self.entries:
            f = None
            for key, dim in uses:
                if key in factors:
                    v = factors[key].to(param.dtype).view(_channel_shape(param.ndim, dim))
                    f = v if f is None else f * v
            if f is not None:
                target = same if f.shape == param.shape else broadcast
                target[0].append(param)
                target[1].append(f)
        for params, scales in (same, broadcast):  # CUDA's fused foreach path needs equal shapes
            if params:
                torch._foreach_mul_(params, scales)

    def count_scalars(self, masks: Mapping[str, Tensor]) -> tuple[int, int]:
        """(distinct scalars covered, distinct scalars lying in at least one masked group)."""
        total = hit = 0
        for param, uses in self.entries:
            z = None
            for key, dim in uses:
                v = masks[key].view(_channel_shape(param.ndim, dim))
                z = v if z is None else z | v
            assert z is not None
            total += param.numel()
            hit += int(z.sum()) * (param.numel() // z.numel())
        return total, hit

    def _cells_on(self, device: torch.device) -> Tensor:
        if device not in self._cells:
            self._cells[device] = self._cells_cpu.to(device)
        return self._cells[device]


def _width(key: str, slices: Sequence[ParamSlice], params: Mapping[str, Tensor]) -> int:
    widths = {params[s.name].shape[s.dim] for s in slices}
    if len(widths) != 1:
        raise ValueError(f"the slices of {key!r} disagree on its width (or there are none): {sorted(widths)}")
    return widths.pop()


def _cumsum(widths: Sequence[int]) -> list[int]:
    out, acc = [], 0
    for w in widths:
        out.append(acc)
        acc += w
    return out


def _cells(
    entries: Sequence[tuple[Tensor, tuple[tuple[str, int], ...]]],
    offsets: Mapping[str, int],
    widths: Mapping[str, int],
    total: int,
) -> Tensor:
    """Flat positions in the [rows, total] table for every use's channels, in `reduce_flat` order:
    the k-th use of a key goes to row k, so no cell is written twice."""
    row = dict.fromkeys(offsets, 0)
    cells = []
    for _, uses in entries:
        for key, _ in uses:
            start = row[key] * total + offsets[key]
            cells.append(torch.arange(start, start + widths[key]))
            row[key] += 1
    return torch.cat(cells) if cells else torch.zeros(0, dtype=torch.int64)


def _per_in_out(t: Tensor, stat: Stat) -> Tensor:
    """|w|² or |w| (already taken) reduced to at most [out, in]: kernel dims summed or maxed away."""
    if t.ndim <= 2:
        return t
    if t.shape[2:].numel() == 1:
        return t.view(t.shape[0], t.shape[1])
    return _reduce(t, stat, tuple(range(2, t.ndim)))


def _reduce(t: Tensor, stat: Stat, dim: int | tuple[int, ...]) -> Tensor:
    return t.sum(dim) if stat == "sumsq" else t.amax(dim)


def _channel_shape(ndim: int, dim: int) -> list[int]:
    return [-1 if d == dim else 1 for d in range(ndim)]


class GroupSet:
    """The regularised groups of one model: ``spaces`` (one group per channel) and their slices.

    ``graph`` holds the traced feature spaces (what compaction removes); in channel mode
    ``spaces`` are exactly those, in paper mode they are the ``"<conv>:in"`` input spaces.
    """

    def __init__(
        self,
        mode: str,
        graph: ChannelGraph,
        spaces: dict[str, ChannelSpace],
        slices: dict[str, list[ParamSlice]],
        params: Mapping[str, Tensor],
    ) -> None:
        self.mode, self.graph, self.spaces = mode, graph, spaces
        self._slices = slices
        self._sizes = {
            n: sum(params[s.name].numel() // params[s.name].shape[s.dim] for s in sl)
            for n, sl in slices.items()
        }
        self._index = SliceIndex(slices, params)
        self._params = {s.name: params[s.name] for sl in slices.values() for s in sl}

    def slices(self, space: str) -> list[ParamSlice]:
        """The (parameter, dim) slices every group of ``space`` covers."""
        return list(self._slices[self._check(space)])

    def group_size(self, space: str) -> int:
        """|g|: the number of scalars in one group of ``space`` (equal for all its channels)."""
        return self._sizes[self._check(space)]

    def group_sizes(self, space: str) -> Tensor:
        """|g| per channel of ``space`` (int64 ``[width]``)."""
        return torch.full((self.spaces[self._check(space)].width,), self._sizes[space], dtype=torch.int64)

    @property
    def num_groups(self) -> int:
        return sum(s.width for s in self.spaces.values())

    def group(self, space: str, index: int) -> ChannelGroup:
        width = self.spaces[self._check(space)].width
        if not 0 <= index < width:
            raise IndexError(f"space {space!r} has {width} channels, got index {index}")
        return ChannelGroup(space, index, tuple(self._slices[space]), self._sizes[space])

    def groups(self) -> Iterator[ChannelGroup]:
        """Every group, for inspection (the regulariser never loops over groups)."""
        for name, space in self.spaces.items():
            for i in range(space.width):
                yield self.group(name, i)

    def index(self, model: nn.Module | None = None) -> SliceIndex:
        """The vectorised view over this model's parameters, or over ``model``'s (same layout)."""
        if model is None:
            return self._index
        return SliceIndex(self._slices, dict(unwrap(model).named_parameters()))

    @torch.no_grad()
    def fisher_importance(self) -> Tensor | None:
        """Per group (flat, index order): ``Σ_{w∈g} (w · ∂L/∂w)²``, the diagonal Fisher estimate of
        how much the loss would change without the group, from the gradients the parameters hold
        now; None while any of them has no gradient. Invariant to the scale a BatchNorm absorbs."""
        if any(p.grad is None for p in self._params.values()):
            return None
        products = {n: p.detach() * p.grad for n, p in self._params.items()}
        return SliceIndex(self._slices, products).reduce_flat("sumsq")

    def to_dict(self) -> dict:
        """A JSON-friendly summary (no tensors)."""
        return {
            "mode": self.mode,
            "groups": self.num_groups,
            "spaces": [{**s.to_dict(), "group_size": self._sizes[n]} for n, s in self.spaces.items()],
            "feature_spaces": [s.to_dict() for s in self.graph.spaces.values()],
        }

    def _check(self, space: str) -> str:
        if space not in self.spaces:
            raise KeyError(f"unknown space {space!r}; this {self.mode} group set has {list(self.spaces)}")
        return space


def build_groups(model: nn.Module, mode: str = "channel") -> GroupSet:
    """Trace ``model.encoder`` and build the groups of ``mode`` (``channel`` or ``paper``).

    Build after moving the model to its device: the set keeps references to its parameters.
    """
    if mode not in GROUP_MODES:
        raise ValueError(f"unknown group mode {mode!r}; choose one of {GROUP_MODES}")
    model = unwrap(model)
    params = dict(model.named_parameters())
    graph = trace_channels(model)
    if mode == "channel":
        spaces = dict(graph.spaces)
        slices = {n: producer_slices(s, params) + consumer_slices(s.consumers) for n, s in spaces.items()}
    else:
        spaces = dict(_paper_space(c, params) for c in graph.convs)
        slices = {n: consumer_slices(s.consumers) for n, s in spaces.items()}
    return GroupSet(mode, graph, spaces, slices, params)


def _paper_space(conv: str, params: Mapping[str, Tensor]) -> tuple[str, ChannelSpace]:
    """The input channels of one encoder conv, named relative to the encoder (``stem.0.conv:in``)."""
    name = conv.split(".", 1)[1] + ":in"
    return name, ChannelSpace(name, params[f"{conv}.weight"].shape[1], consumers=[conv])


def producer_slices(space: ChannelSpace, params: Mapping[str, Tensor]) -> list[ParamSlice]:
    """Producer filters (dim 0), their biases and their BN gamma and beta."""
    out = []
    for conv, bn in space.producers:
        names = [f"{conv}.weight", f"{conv}.bias"] + ([f"{bn}.weight", f"{bn}.bias"] if bn else [])
        out += [ParamSlice(n, 0) for n in names if n in params]
    return out


def consumer_slices(convs: Sequence[str]) -> list[ParamSlice]:
    """Input-channel slices (dim 1) of the given convs."""
    return [ParamSlice(f"{c}.weight", 1) for c in convs]


def zero_mask(groupset: GroupSet, model: nn.Module | None = None) -> dict[str, Tensor]:
    """Per grouped space: True where the group is exactly zero (every one of its weights is 0).

    Uses max |w| rather than the norm, so tiny weights whose squares underflow are not zero.
    """
    return {k: v == 0 for k, v in groupset.index(model).reduce("maxabs").items()}


def alive_channels(model: nn.Module, groupset: GroupSet) -> dict[str, Tensor]:
    """Per feature space of the encoder: True for channels that cannot be removed.

    A channel is dead (removable with every output unchanged) when either
    - all its producer weights (filters, biases, BN gamma and beta) are exactly 0: it is then 0
      everywhere and its readers, head input convs included, multiply zeros; or
    - all its encoder consumer slices are exactly 0 and nothing else reads it: no head reads it
      and it is not the encoder output. A channel the heads read is therefore never dead in
      paper mode, where the producers are not grouped.
    Channel mode reaches the first case (a zero group zeroes both sides); paper mode the second.
    Weights that only touch dead channels count as zero, repeated until nothing changes, so a
    filter left non-zero on dead inputs only (say by an optimizer step after the proximal one)
    does not keep its channel alive.
    """
    params = {n: p.detach() for n, p in unwrap(model).named_parameters()}
    graph = groupset.graph
    device = next(iter(params.values())).device
    alive = {n: torch.ones(s.width, dtype=torch.bool, device=device) for n, s in graph.spaces.items()}
    while True:
        new = {n: alive[n] & ~_dead(s, params, graph, alive) for n, s in graph.spaces.items()}
        if all(torch.equal(new[n], alive[n]) for n in alive):
            return new
        alive = new


def _dead(
    space: ChannelSpace, params: Mapping[str, Tensor], graph: ChannelGraph, alive: Mapping[str, Tensor]
) -> Tensor:
    """One pass of the `alive_channels` rule for one space, given the channels alive so far."""
    parts = []
    for conv, bn in space.producers:
        w = _masked_abs(params[f"{conv}.weight"], 1, alive.get(graph.conv_inputs[conv] or ""))
        parts.append(w.amax((1, 2, 3)))
        extra = [f"{conv}.bias"] + ([f"{bn}.weight", f"{bn}.bias"] if bn else [])
        parts += [params[n].abs() for n in extra if n in params]
    dead = torch.stack(parts).amax(0) == 0
    if space.consumers and not space.head_consumers and not space.encoder_output:
        reads = [
            _masked_abs(params[f"{c}.weight"], 0, alive[graph.conv_outputs[c]]).amax((0, 2, 3))
            for c in space.consumers
        ]
        dead |= torch.stack(reads).amax(0) == 0
    return dead


def _masked_abs(weight: Tensor, dim: int, keep: Tensor | None) -> Tensor:
    """|weight| with the slices along ``dim`` of dead channels (``keep`` False) set to 0."""
    w = weight.abs()
    return w if keep is None else w * keep.to(w.dtype).view(_channel_shape(w.ndim, dim))
