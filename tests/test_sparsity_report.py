"""Sparsity report: exact schema, hand-checkable counts, and compact parameters/MACs equal to those
of the narrower model built by hand (whose outputs also match the zeroed model's)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from torch import nn

from training.models import build_model, count_macs, count_parameters, create_model
from training.sparsity import (
    GroupSet,
    alive_channels,
    build_groups,
    format_report,
    plot_survival,
    sparsity_report,
)
from training.tasks import TaskSpec

SEG = TaskSpec("seg", "segmentation", 5)
DEPTH = TaskSpec("depth", "depth", 1)
ATTR = TaskSpec("attr", "attributes", 2, ("Male", "Smiling"))
SIZE = (32, 48)
KEYS = {
    "mode", "groups_total", "groups_zero", "pct_zero_groups", "encoder_weights", "zero_weights",
    "pct_zero_weights", "dense_parameters", "compact_parameters", "dense_macs", "compact_macs",
    "alive_channels", "total_channels", "layers",
}  # fmt: skip
LAYER_KEYS = {"name", "groups", "zero", "pct_zero", "weights", "zero_weights", "channels", "alive"}
# tiny: stage k's stream is "stages.k (stream)" (stage 0's includes the stem), its inner width "stages.k.0.conv1"
ZEROED = {
    "stages.0 (stream)": [4],
    "stages.1 (stream)": [0, 5, 7],
    "stages.2.0.conv1": [1, 2],
    "stages.3 (stream)": [3],
}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _tiny() -> nn.Module:
    torch.manual_seed(0)
    model = create_model(encoder="tiny", tasks=(SEG, DEPTH, ATTR), head="light", head_width=8).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    return model


def _zero(model: nn.Module, gs: GroupSet, picks: dict[str, list[int]]) -> None:
    with torch.no_grad():
        for space, indices in picks.items():
            for s in gs.slices(space):
                model.get_parameter(s.name).index_fill_(s.dim, torch.tensor(indices), 0.0)


def _narrow_config(model: nn.Module, removed: dict[str, list[int]]):
    """tiny's config with the removed channels taken off each width (stream = stage out)."""
    enc = model.config.encoder
    stages = []
    for k, st in enumerate(enc.stages):
        out = st.out - len(removed.get(f"stages.{k} (stream)", []))
        inner = st.blocks[0][0] - len(removed.get(f"stages.{k}.0.conv1", []))
        stages.append(dataclasses.replace(st, out=out, blocks=((inner,),)))
    encoder = dataclasses.replace(enc, stem=(stages[0].out,), stages=tuple(stages))
    return dataclasses.replace(model.config, encoder=encoder)


def _transfer(big: nn.Module, small: nn.Module, gs: GroupSet) -> None:
    """Copy the kept channels of every conv and BN into the narrower model (a hand compaction)."""
    graph, alive = gs.graph, alive_channels(big, gs)
    keep = {n: a.nonzero().flatten() for n, a in alive.items()}
    state = big.state_dict()
    new = {}
    for name, target in small.state_dict().items():
        module, value = name.rsplit(".", 1)[0], state[name]
        if module in graph.conv_outputs:
            value = value.index_select(0, keep[graph.conv_outputs[module]])
        if module in graph.conv_inputs and graph.conv_inputs[module] is not None and name.endswith("weight"):
            value = value.index_select(1, keep[graph.conv_inputs[module]])
        if module in graph.norm_spaces and value.ndim == 1:
            value = value.index_select(0, keep[graph.norm_spaces[module]])
        assert value.shape == target.shape, name
        new[name] = value
    small.load_state_dict(new)


def test_report_counts_and_compact_cost_match_the_hand_built_model() -> None:
    model = _tiny()
    gs = build_groups(model)
    _zero(model, gs, ZEROED)
    report = sparsity_report(model, gs, image_size=SIZE)
    assert set(report) == KEYS and all(set(r) == LAYER_KEYS for r in report["layers"])
    json.dumps(report)
    small = build_model(_narrow_config(model, ZEROED))
    assert report["compact_parameters"] == count_parameters(small)
    assert report["compact_macs"] == count_macs(small, SIZE)
    assert report["dense_parameters"] == count_parameters(model)
    assert report["dense_macs"] == count_macs(model, SIZE)
    assert report["compact_parameters"] < report["dense_parameters"]
    # removing the channels leaves every task output unchanged (float64: no summation-order noise)
    _transfer(model, small, gs)
    x = torch.rand(2, 3, *SIZE, dtype=torch.float64)
    with torch.no_grad():
        a, b = model.double()(x), small.double().eval()(x)
    for task in a:
        torch.testing.assert_close(b[task], a[task], rtol=0, atol=1e-6)


def test_report_numbers_by_hand() -> None:
    model = _tiny()
    gs = build_groups(model)
    _zero(model, gs, ZEROED)
    report = sparsity_report(model, gs, image_size=SIZE)
    assert report["mode"] == "channel"
    assert (report["groups_total"], report["groups_zero"]) == (640, 7)
    assert report["pct_zero_groups"] == pytest.approx(100 * 7 / 640)
    assert (report["alive_channels"], report["total_channels"]) == (633, 640)
    assert report["encoder_weights"] == 497_120  # every tiny encoder parameter is grouped
    rows = {r["name"]: r for r in report["layers"]}
    assert list(rows) == list(gs.spaces)
    # stages.1 stream: downsample 1x1 (in 32) + BN + conv2 3x3 (in 64) + BN + readers: stage 2's
    # downsample 1x1 (out 96) and conv1 3x3 (out 96) = 32 + 2 + 576 + 2 + 96 + 864
    assert rows["stages.1 (stream)"] == {
        "name": "stages.1 (stream)", "groups": 64, "zero": 3, "pct_zero": pytest.approx(100 * 3 / 64),
        "weights": 1572 * 64, "zero_weights": 1572 * 3, "channels": 64, "alive": 61,
    }  # fmt: skip
    # stages.2 inner: conv1 3x3 (in 64) + BN + conv2 3x3 (out 96) = 576 + 2 + 864
    assert (
        rows["stages.2.0.conv1"]["weights"] == 1442 * 96
        and rows["stages.2.0.conv1"]["zero_weights"] == 1442 * 2
    )
    # stages.3 inner: conv1 3x3 (in 96) + BN + conv2 3x3 (out 128)
    assert rows["stages.3.0.conv1"] | {"name": ""} == {
        "name": "", "groups": 128, "zero": 0, "pct_zero": 0.0, "weights": 128 * (864 + 2 + 1152),
        "zero_weights": 0, "channels": 128, "alive": 128,
    }  # fmt: skip
    # distinct scalars in zero groups, counted weight by weight (overlaps counted once)
    marked = {n: torch.zeros_like(p, dtype=torch.bool) for n, p in model.named_parameters()}
    for space, indices in ZEROED.items():
        for s in gs.slices(space):
            marked[s.name].index_fill_(s.dim, torch.tensor(indices), True)
    zero_weights = sum(int(m.sum()) for m in marked.values())
    assert report["zero_weights"] == zero_weights
    assert report["pct_zero_weights"] == pytest.approx(100 * zero_weights / 497_120)


def test_paper_mode_report() -> None:
    model = _tiny()
    gs = build_groups(model, "paper")
    with torch.no_grad():
        model.encoder.stages[1][0].conv2.weight[:, 4].zero_()  # the only reader of stages.1.0.conv1[4]
    report = sparsity_report(model, gs, image_size=SIZE)
    assert report["mode"] == "paper" and report["groups_zero"] == 1
    assert report["groups_total"] == 3 + 32 + 32 + 32 + 32 + 64 + 64 + 64 + 96 + 96 + 96 + 128
    rows = {r["name"]: r for r in report["layers"]}
    assert rows["stem.0.conv:in"] | {"name": ""} == {
        "name": "", "groups": 3, "zero": 0, "pct_zero": 0.0, "weights": 3 * 32 * 49, "zero_weights": 0,
        "channels": 3, "alive": 3,
    }  # fmt: skip
    row = rows["stages.1.0.conv2:in"]
    counts = (row["zero"], row["weights"], row["zero_weights"], row["channels"], row["alive"])
    assert counts == (1, 64 * 576, 576, 64, 63)
    assert report["alive_channels"] == 639
    # removing the channel drops conv1's filter (in 32: 32*9), its BN (2) and conv2's input slice (64*9)
    assert report["dense_parameters"] - report["compact_parameters"] == 288 + 2 + 576
    assert report["zero_weights"] == 576


def test_format_and_plot(tmp_path) -> None:
    model = _tiny()
    gs = build_groups(model)
    _zero(model, gs, ZEROED)
    report = sparsity_report(model, gs, image_size=SIZE)
    text = format_report(report)
    lines = text.splitlines()
    assert len(lines) == 1 + len(report["layers"]) + 2
    assert "stages.1 (stream)" in text and "61/64" in text.replace(" ", "") and "7/640 zero" in text
    path = plot_survival(report, tmp_path / "plots" / "survival.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000
