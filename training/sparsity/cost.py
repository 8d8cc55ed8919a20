"""What a compact model costs, as a function of how many channels of each space stay alive.

`CostModel` lists every conv whose width compaction changes (encoder convs and the heads' input
convs) with the spaces it reads and writes and its MACs per (input, output) channel pair, plus the
MACs of everything compaction leaves alone. Given the alive channels per space it gives

- the compact model's MACs *exactly* as `training.compact` builds it: each space's width is its
  alive count rounded up to a multiple of ``round_to`` (at least ``round_to``, at most the dense
  width, `training.compaction.plan.target_width`), and a conv costs ``per_pair · in · out``;
- its ONNX Runtime latency predicted by a `LatencyTable` (when one is attached).

It also prices one channel of each space (``channel_saving``): the MACs, or the table's latency,
that removing it saves — its producers' filters *and* its consumers' input slices — which
`group_weights` turns into cost-aware group-lasso weights.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn

from training.compaction.plan import target_width
from training.models.complexity import macs_by_module
from training.sparsity.groups import GroupSet
from training.sparsity.latency_table import LatencyTable
from training.sparsity.targets import ROUND_TO, TargetError
from training.sparsity.trace import unwrap


@dataclass(frozen=True)
class ConvCost:
    """One conv compaction narrows: the spaces it reads and writes (None: a fixed width)."""

    name: str
    space_in: str | None
    space_out: str | None
    cin: int
    cout: int
    per_pair: int  # MACs per (input channel, output channel) pair at the run's input size


@dataclass(frozen=True)
class CostModel:
    convs: tuple[ConvCost, ...]
    fixed_macs: int  # layers compaction does not change
    dense_widths: dict[str, int]
    round_to: int = ROUND_TO
    table: LatencyTable | None = None

    @classmethod
    def build(cls, model: nn.Module, groupset: GroupSet, image_size: tuple[int, int],
              round_to: int = ROUND_TO) -> CostModel:
        model = unwrap(model)
        graph = groupset.graph
        macs = macs_by_module(model, image_size)
        modules = dict(model.named_modules())
        convs = []
        for name in graph.conv_inputs:  # encoder convs and head input convs
            m = modules[name]
            if m.groups != 1:
                raise NotImplementedError(f"{name}: grouped convs are not priced")
            convs.append(ConvCost(name, graph.conv_inputs[name], graph.conv_outputs.get(name), m.in_channels,
                                  m.out_channels, macs[name] // (m.in_channels * m.out_channels)))
        fixed = sum(v for k, v in macs.items() if k not in graph.conv_inputs)
        widths = {n: s.width for n, s in graph.spaces.items()}
        return cls(tuple(convs), fixed, widths, round_to)

    def with_table(self, table: LatencyTable) -> CostModel:
        return replace(self, table=table)

    def table_convs(self) -> dict[str, tuple[int, int, bool, bool]]:
        """What a `LatencyTable` measures: name -> (dense in, dense out, in fixed, out fixed)."""
        return {c.name: (c.cin, c.cout, c.space_in is None, c.space_out is None) for c in self.convs}

    # --- widths ---------------------------------------------------------------------------------

    def widths(self, alive: Mapping[str, int]) -> dict[str, int]:
        """The compact width of every space: its alive count rounded as compaction rounds it."""
        return {n: target_width(int(alive[n]), w, self.round_to) for n, w in self.dense_widths.items()}

    def conv_widths(self, widths: Mapping[str, int]) -> dict[str, tuple[int, int]]:
        return {c.name: (widths[c.space_in] if c.space_in else c.cin, widths[c.space_out] if c.space_out else c.cout)
                for c in self.convs}

    # --- costs ----------------------------------------------------------------------------------

    @property
    def dense_macs(self) -> int:
        return self.fixed_macs + sum(c.per_pair * c.cin * c.cout for c in self.convs)

    def macs(self, alive: Mapping[str, int]) -> int:
        """The compact model's MACs with ``alive`` channels per space (exact, see the module doc)."""
        widths = self.conv_widths(self.widths(alive))
        return self.fixed_macs + sum(c.per_pair * widths[c.name][0] * widths[c.name][1] for c in self.convs)

    def latency_ms(self, alive: Mapping[str, int]) -> float:
        return self._table().predict(self.conv_widths(self.widths(alive)))

    @property
    def dense_latency_ms(self) -> float:
        return self._table().predict(self.conv_widths(self.dense_widths))

    def cost(self, kind: str, alive: Mapping[str, int]) -> float:
        """``macs`` or ``latency`` of the compact model."""
        return float(self.macs(alive)) if kind == "macs" else self.latency_ms(alive)

    def dense_cost(self, kind: str) -> float:
        return float(self.dense_macs) if kind == "macs" else self.dense_latency_ms

    def channel_saving(self, kind: str) -> dict[str, float]:
        """Per space: what removing one of its channels saves from the dense model (MACs or ms).

        MACs: its producers' output slices and its consumers' input slices. Latency: the table's
        mean slope of each of those convs between half and full width (a single ``round_to`` step
        is too noisy, and ONNX Runtime's blocked layouts make the cost a staircase)."""
        saving = dict.fromkeys(self.dense_widths, 0.0)
        for c in self.convs:
            for space, own, other, axis in ((c.space_in, c.cin, c.cout, 0), (c.space_out, c.cout, c.cin, 1)):
                if space is None:
                    continue
                if kind == "macs":
                    saving[space] += c.per_pair * other
                else:
                    half = max(1, own // 2)
                    low = (half, c.cout) if axis == 0 else (c.cin, half)
                    full = self._table().conv_ms(c.name, c.cin, c.cout)
                    saving[space] += max(0.0, full - self._table().conv_ms(c.name, *low)) / (own - half or 1)
        return saving

    def _table(self) -> LatencyTable:
        if self.table is None:
            raise TargetError("latency needs a latency table: attach one with CostModel.with_table")
        return self.table


def group_saving(groupset: GroupSet, kind: str, cost: CostModel) -> Tensor:
    """What removing each group saves from the dense model (flat, in the group index's order):
    MACs for ``macs``, the latency table's ms for ``latency``. With the groups' importance this
    gives the cost-aware weights (`GroupLasso.refresh_weights`)."""
    if groupset.mode != "channel":
        raise TargetError(f"the {kind!r} group weight prices channels: it needs channel groups "
                          f"(sparsity.groups: channel), got {groupset.mode!r}")
    index = groupset.index()
    saving = cost.channel_saving("macs" if kind == "macs" else "latency")
    per_space = torch.tensor([saving[k] for k in index.keys], dtype=torch.float64)
    return per_space.clamp_min(1e-12 * float(per_space.max())).repeat_interleave(torch.tensor(index.widths))
