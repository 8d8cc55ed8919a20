"""Sparsity targets: parsing, the cost model against compacted models, the latency table against a
direct measurement, the cubic schedule, and the controller reaching a target and freezing."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from training.compaction import compact
from training.config import ConfigError, resolve_config
from training.models import create_model
from training.models.complexity import count_macs
from training.sparsity import build_groups, zero_mask
from training.sparsity.build import build_regularizer
from training.sparsity.controller import MARGINS, CubicSchedule, ProgressMeter, TargetGroupLasso
from training.sparsity.cost import CostModel, group_saving
from training.sparsity.groups import alive_channels
from training.sparsity.latency_table import measure_model_ms, measure_table, width_grid
from training.sparsity.regularizer import GroupLasso
from training.sparsity.targets import Target, TargetError, parse_target, resolve_weight
from training.tasks import TaskSpec

SEG = TaskSpec("seg", "segmentation", 5)
DEPTH = TaskSpec("depth", "depth", 1)
ATTR = TaskSpec("attr", "attributes", 2, ("Male", "Smiling"))
SIZE = (32, 48)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _model(encoder: str = "tiny", seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return create_model(encoder=encoder, tasks=(SEG, DEPTH, ATTR), head="light", head_width=16)


def _zero_random_channels(model: nn.Module, fraction: float, seed: int = 0) -> None:
    """Zero a random ``fraction`` of every channel group (producers, BN and consumer slices)."""
    groupset = build_groups(model)
    gen = torch.Generator().manual_seed(seed)
    index = groupset.index()
    keep = {k: (torch.rand(w, generator=gen) >= fraction).double() for k, w in zip(index.keys, index.widths,
                                                                                  strict=True)}
    index.scale_(keep)


# --- parsing -------------------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "kind", "value"), [
    ("zero_groups=0.6", "zero_groups", 0.6), ("macs=3", "macs", 3.0), (" latency_ms = 12.5 ", "latency_ms", 12.5)])
def test_parse_target(text, kind, value):
    assert parse_target(text) == Target(kind, value)


@pytest.mark.parametrize(("text", "says"), [
    ("macs", "expected KIND=VALUE"), ("flops=2", "unknown kind 'flops'"), ("macs=fast", "is not a number"),
    ("zero_groups=60", "strictly between 0 and 1"), ("zero_groups=0", "strictly between 0 and 1"),
    ("macs=1", "must be above 1"), ("macs=0.5", "must be above 1"), ("latency_ms=-3", "positive"),
    ("macs=nan", "finite"), ("macs=inf", "finite")])
def test_parse_target_rejects_bad_values_clearly(text, says):
    with pytest.raises(TargetError, match=says):
        parse_target(text)
    with pytest.raises(ConfigError, match="sparsity.target"):  # the same message at the config boundary
        resolve_config({"sparsity": {"target": text}})


def test_config_normalises_target_and_weights():
    cfg = resolve_config({"sparsity": {"target": "macs = 3.0"}}).sparsity
    assert cfg.target == "macs=3" and cfg.group_weight is None and cfg.target_batch == 8
    assert resolve_weight(parse_target(cfg.target), None) == "macs"
    assert resolve_weight(parse_target("latency_ms=4"), None) == "latency"
    assert resolve_weight(parse_target("zero_groups=0.5"), None) == "size"
    assert resolve_weight(None, "macs") == "macs"
    with pytest.raises(ConfigError, match="group_weight"):
        resolve_config({"sparsity": {"group_weight": "flops"}})


def test_unreachable_and_mismatched_targets_are_refused():
    model = _model()
    groupset = build_groups(model)
    cost = CostModel.build(model, groupset, SIZE)
    with pytest.raises(TargetError, match="cannot be reached without emptying a channel space"):
        TargetGroupLasso(groupset, ProgressMeter(parse_target("zero_groups=0.99"), groupset, model, None),
                         steps_per_epoch=4, epochs=2)
    with pytest.raises(TargetError, match="cannot be reached"):
        TargetGroupLasso(groupset, ProgressMeter(parse_target("macs=1000"), groupset, model, cost),
                         steps_per_epoch=4, epochs=2)
    paper = build_groups(model, "paper")
    with pytest.raises(TargetError, match="channel groups"):
        ProgressMeter(parse_target("macs=2"), paper, model, cost)


# --- cost model ----------------------------------------------------------------------------------

@pytest.mark.parametrize("round_to", [1, 8])
@pytest.mark.parametrize("fraction", [0.0, 0.3, 0.7, 0.97])
def test_predicted_macs_equal_the_compact_models(round_to, fraction):
    model = _model()
    _zero_random_channels(model, fraction, seed=int(100 * fraction))
    groupset = build_groups(model)
    cost = CostModel.build(model, groupset, SIZE, round_to)
    alive = {n: int(a.sum()) for n, a in alive_channels(model, groupset).items()}
    small, _ = compact(model, round_to=round_to)
    assert cost.macs(alive) == count_macs(small, SIZE)
    assert cost.dense_macs == count_macs(model, SIZE)


def test_group_saving_counts_producers_and_consumers():
    model = _model()
    groupset = build_groups(model)
    cost = CostModel.build(model, groupset, SIZE, round_to=1)
    saving = group_saving(groupset, "macs", cost)
    assert saving.shape == (groupset.num_groups,)
    index = groupset.index()
    first = index.keys[0]  # removing one channel of a space saves exactly its share of the MACs
    alive = {k: w - (1 if k == first else 0) for k, w in zip(index.keys, index.widths, strict=True)}
    assert float(saving[0]) == cost.dense_macs - cost.macs(alive)
    with pytest.raises(TargetError, match="channel groups"):
        group_saving(build_groups(model, "paper"), "macs", cost)


def test_cost_aware_weights_follow_saving_per_importance():
    """The weight of a group is sqrt(|g|) times its saving per unit of (Fisher) importance,
    relative to the average: equal importance -> the costlier group weighs more; the total stays
    that of sqrt(|g|), so λ keeps its scale."""
    model = _model()
    groupset = build_groups(model)
    cost = CostModel.build(model, groupset, SIZE)
    saving = group_saving(groupset, "macs", cost)
    reg = GroupLasso(groupset, 0.1, saving=saving)
    size = reg._weights_cpu.clone()
    loss = model(torch.rand(2, 3, *SIZE))["depth"].pow(2).mean()
    loss.backward()
    reg.before_step(0)
    weights = reg._weights_cpu
    assert math.isclose(float(weights.sum()), float(size.sum()), rel_tol=1e-9)
    m = weights / size
    assert float(m.min()) > 0 and not torch.allclose(m, m[0].expand_as(m))
    importance = groupset.fisher_importance().double()
    ratio = (saving / importance)
    i, j = int(ratio.argmax()), int(ratio.argmin())
    assert float(m[i]) >= float(m[j])


# --- latency table -------------------------------------------------------------------------------

def test_width_grid():
    assert width_grid(64, 8, points=20) == (8, 16, 24, 32, 40, 48, 56, 64)
    grid = width_grid(256, 8, points=6)
    assert grid[-1] == 256 and len(grid) <= 6 and all(w % 8 == 0 for w in grid)
    assert width_grid(3, 8) == (3,) and width_grid(128, 8, fixed=True) == (128,)


def test_latency_table_predicts_a_compact_models_measured_latency():
    """Predicted from the table vs ONNX Runtime timing the compacted model itself: dense and half
    width, measured side by side (noisy machines: a generous bound, ratios compared too)."""
    model = _model("tiny")
    groupset = build_groups(model)
    cost = CostModel.build(model, groupset, SIZE)
    key = {"test": True}
    table = measure_table(model, cost.table_convs(), SIZE, batch=4, threads=1, round_to=8, key=key)
    cost = cost.with_table(table)
    _zero_random_channels(model, 0.5, seed=3)
    alive = {n: int(a.sum()) for n, a in alive_channels(model, groupset).items()}
    small, _ = compact(model, round_to=8)
    predicted = cost.latency_ms(alive)
    dense_now = measure_model_ms(model, SIZE, 4, 1)
    measured = measure_model_ms(small, SIZE, 4, 1)
    drift = dense_now / table.dense_ms  # the machine's load between the table and now
    assert predicted < cost.dense_latency_ms
    assert measured / drift == pytest.approx(predicted, rel=0.35)


# --- controller ----------------------------------------------------------------------------------

def test_cubic_schedule():
    s = CubicSchedule(start=10, end=110, final=0.6)
    assert s.at(0) == 0 and s.at(10) == 0 and s.at(110) == pytest.approx(0.6) and s.at(500) == pytest.approx(0.6)
    assert s.at(20) == pytest.approx(0.6 * (1 - 0.9 ** 3))
    steps = [s.at(t) for t in range(10, 111, 10)]
    increments = [b - a for a, b in zip(steps, steps[1:], strict=False)]
    assert all(x > y for x, y in zip(increments, increments[1:], strict=False))  # fast early, slow late


def _train(model: nn.Module, reg: TargetGroupLasso, steps: int, seed: int = 0) -> list[float]:
    """A synthetic problem: regress random targets from random images with AdamW; returns the
    zero-group fraction after every step."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    x = torch.rand(8, 3, *SIZE, generator=gen)
    y = torch.randn(8, 1, *SIZE, generator=gen)
    fractions = []
    for step in range(steps):
        epoch = step // 10
        opt.zero_grad()
        loss = (model(x)["depth"] - y).pow(2).mean()
        loss.backward()
        reg.before_step(epoch)
        opt.step()
        reg.after_step(3e-3, epoch)
        zeros = zero_mask(reg.groupset)
        fractions.append(sum(int(z.sum()) for z in zeros.values()) / reg.groupset.num_groups)
    return fractions


@pytest.mark.parametrize("target", ["zero_groups=0.5", "macs=2"])
def test_controller_reaches_the_target_and_freezes(target):
    model = _model()
    groupset = build_groups(model)
    cost = CostModel.build(model, groupset, SIZE)
    meter = ProgressMeter(parse_target(target), groupset, model, cost)
    weight = resolve_weight(meter.target, None)
    reg = TargetGroupLasso(groupset, meter, steps_per_epoch=10, epochs=12, cooldown_from=10, every=2,
                           saving=group_saving(groupset, weight, cost) if weight != "size" else None)
    fractions = _train(model, reg, 120)
    assert reg.frozen and reg.frozen_step is not None and reg.frozen_step <= 100
    achieved = meter.in_unit(meter.exact())
    if meter.target.kind == "zero_groups":
        margin = MARGINS["zero_groups"]
        assert abs(achieved - 0.5) <= margin + 1e-9
        assert max(fractions) <= 0.5 + margin + 1e-9  # never overshot, not even for one step
    else:
        margin = MARGINS["macs"]
        assert 2 * (1 - margin) <= achieved <= 2 * (1 + margin)
        small, _ = compact(model, round_to=8)
        assert count_macs(model, SIZE) / count_macs(small, SIZE) == pytest.approx(achieved)
    assert len(set(fractions[reg.frozen_step:])) == 1  # the zero set no longer changes once frozen
    summary = reg.summary()
    assert summary["reached"] and summary["requested"] == meter.target.value and summary["trajectory"]
    state = reg.state_dict()
    again = TargetGroupLasso(groupset, meter, steps_per_epoch=10, epochs=12, cooldown_from=10)
    again.load_state_dict(state)
    assert again.frozen and again.lam == reg.lam


def test_build_regularizer_from_config(tmp_path):
    model = _model()
    groupset = build_groups(model)
    cfg = resolve_config({"sparsity": {"target": "macs=2", "cooldown_epochs": 1}}).sparsity
    reg = build_regularizer(groupset, cfg, model=model, image_size=SIZE, epochs=4, steps_per_epoch=5,
                            run_dir=tmp_path)
    assert isinstance(reg, TargetGroupLasso) and reg.meter.wanted == pytest.approx(0.5)
    assert reg.schedule.start == 0 and reg.schedule.end == round(0.75 * 15)
    assert build_regularizer(groupset, resolve_config({}).sparsity, model=model, image_size=SIZE, epochs=4,
                             steps_per_epoch=5, run_dir=tmp_path) is None
    penalty = resolve_config({"sparsity": {"target": "macs=2", "mode": "penalty"}}).sparsity
    with pytest.raises(TargetError, match="proximal"):
        build_regularizer(groupset, penalty, model=model, image_size=SIZE, epochs=4, steps_per_epoch=5,
                          run_dir=tmp_path)
