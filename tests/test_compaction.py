"""Physical compaction: for every registered encoder and several seeded sparsity patterns, the
compacted model's task outputs equal the sparse model's; plans round-trip through JSON and replay on
fresh models; compacted models save and load without pickle; the rebuilt configs declare the
parameter and MAC counts the sparsity report predicted. Big encoders run at 32x32 in eval mode
with 8-wide light heads, one intra-op thread."""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch
from safetensors import safe_open
from torch import nn

from parsimony.errors import InputFileError
from training.compaction import (
    CompactionPlan,
    apply_plan,
    compact,
    load_compact,
    load_plan,
    plan_compaction,
    save_compact,
)
from training.models import (
    EncoderConfig,
    ModelConfig,
    StageConfig,
    available_encoders,
    build_model,
    count_macs,
    count_parameters,
    create_model,
)
from training.sparsity import GroupSet, alive_channels, build_groups, sparsity_report
from training.sparsity.groups import producer_slices
from training.tasks import TaskSpec

SEG = TaskSpec("seg", "segmentation", 5)
DEPTH = TaskSpec("depth", "depth", 1)
ATTR = TaskSpec("attr", "attributes", 2, ("Male", "Smiling"))
TASKS = (SEG, DEPTH, ATTR)
SIZE = (32, 32)
RTOL = 1e-5
PATTERNS = (0, 1, 2)  # 0: whole groups, 1: producers only, 2: whole groups + one whole space dead


pytestmark = pytest.mark.usefixtures("one_torch_thread")


_BASE: dict[str, tuple[nn.Module, GroupSet]] = {}


def _base(encoder: str) -> tuple[nn.Module, GroupSet]:
    """One randomised dense model per encoder and its channel groups (tests copy before zeroing)."""
    if encoder not in _BASE:
        torch.manual_seed(0)
        model = create_model(encoder=encoder, tasks=TASKS, head="light", head_width=8).eval()
        _randomise(model)
        _BASE[encoder] = model, build_groups(model, "channel")
    return _BASE[encoder]


def _randomise(model: nn.Module) -> None:
    """BN statistics and affine terms, biases: nothing is trivially zero or identity."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
                m.num_batches_tracked.fill_(7)
            elif isinstance(m, (nn.Conv2d, nn.Linear)) and m.bias is not None:
                m.bias.uniform_(-0.1, 0.1)


def _kill(model: nn.Module, gs: GroupSet, pattern: int) -> dict[str, set[int]]:
    """Zero channel groups the way the proximal step leaves them; returns the killed channels.

    Random spaces (always a residual stream and the encoder output) lose a random 10-70% of their
    channels. Pattern 1 zeroes only the producer side (filters, biases, BN γ and β); pattern 2
    also kills every channel of one non-stream space.
    """
    g = torch.Generator().manual_seed(1000 + pattern)
    spaces = gs.graph.spaces
    streams = [n for n, s in spaces.items() if len(s.producers) > 1]
    chosen = {n for n in spaces if torch.rand(1, generator=g).item() < 0.5}
    chosen |= {streams[int(torch.randint(len(streams), (1,), generator=g))], gs.graph.output}
    killed = {}
    for name in sorted(chosen):
        width = spaces[name].width
        count = max(1, int(width * (0.1 + 0.6 * torch.rand(1, generator=g).item())))
        killed[name] = set(torch.randperm(width, generator=g)[:count].tolist())
    if pattern == 2:
        inner = sorted(n for n, s in spaces.items() if len(s.producers) == 1 and n not in chosen)
        whole = inner[int(torch.randint(len(inner), (1,), generator=g))]
        killed[whole] = set(range(spaces[whole].width))
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, indices in killed.items():
            slices = producer_slices(spaces[name], params) if pattern == 1 else gs.slices(name)
            for s in slices:
                model.get_parameter(s.name).index_fill_(s.dim, torch.tensor(sorted(indices)), 0.0)
    return killed


def _sparse(encoder: str, pattern: int) -> tuple[nn.Module, GroupSet, dict[str, set[int]]]:
    base, gs = _base(encoder)
    model = copy.deepcopy(base)
    return model, gs, _kill(model, gs, pattern)


def _outputs(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        return model(x)


def _assert_same_outputs(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    """Robust relative error per task: max|a - b| / max|b| (and identical shapes)."""
    assert got.keys() == want.keys()
    for task, b in want.items():
        a = got[task]
        assert a.shape == b.shape, task
        scale = b.abs().max().item()
        assert scale > 0, f"{task}: reference output is all zero, the test proves nothing"
        err = (a - b).abs().max().item() / scale
        assert err <= RTOL, f"{task}: relative error {err:.2e} > {RTOL}"


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_unchanged(model: nn.Module, snapshot: dict[str, torch.Tensor]) -> None:
    state = model.state_dict()
    assert state.keys() == snapshot.keys()
    assert all(torch.equal(state[k], v) for k, v in snapshot.items())


def _input() -> torch.Tensor:
    return torch.rand(2, 3, *SIZE, generator=torch.Generator().manual_seed(7))


def _declared_parameters(model: nn.Module) -> int:
    """Parameters of a model rebuilt from its JSON config alone."""
    return count_parameters(
        build_model(ModelConfig.from_dict(json.loads(json.dumps(model.config.to_dict()))))
    )


# --- exactness --------------------------------------------------------------------------------


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("encoder", available_encoders())
def test_compaction_is_exact_with_widths_rounded_to_8(encoder: str, pattern: int) -> None:
    model, gs, killed = _sparse(encoder, pattern)
    before = _snapshot(model)
    x = _input()
    want = _outputs(model, x)
    plan = plan_compaction(model, groupset=gs, round_to=8)
    small = apply_plan(model, plan)
    _assert_same_outputs(_outputs(small, x), want)
    _assert_unchanged(model, before)
    alive_masks = alive_channels(model, gs)
    for space in plan.spaces:
        alive = set(alive_masks[space.name].nonzero().flatten().tolist())
        assert not alive & killed.get(space.name, set()), space.name  # every zeroed channel is dead
        assert space.width % 8 == 0 or space.width == space.original_width, space.name
        assert set(space.kept) >= alive and set(space.padding) == set(space.kept) - alive
        assert space.width == max(8, -(-len(alive) // 8) * 8), space.name
    assert count_parameters(small) < count_parameters(model)
    assert small.config.encoder.out_channels == plan.space(gs.graph.output).width


@pytest.mark.parametrize("encoder", available_encoders())
def test_round_to_1_keeps_exactly_the_alive_channels_and_the_predicted_cost(encoder: str) -> None:
    model, gs, killed = _sparse(encoder, 0)
    x = _input()
    plan = plan_compaction(model, groupset=gs, round_to=1)
    small = apply_plan(model, plan)
    _assert_same_outputs(_outputs(small, x), _outputs(model, x))
    for space in plan.spaces:
        assert space.kept == tuple(sorted(set(range(space.original_width)) - killed.get(space.name, set())))
        assert space.padding == ()
    report = sparsity_report(model, gs, image_size=SIZE)
    assert count_parameters(small) == report["compact_parameters"] == _declared_parameters(small)
    assert count_macs(small, SIZE) == report["compact_macs"]
    assert sum(s.width for s in plan.spaces) == report["alive_channels"]


def _kill_paper(model: nn.Module, gs: GroupSet, seed: int) -> dict[str, set[int]]:
    """Paper groups: zero the input slice W[:, j] of every encoder conv reading channel j."""
    g = torch.Generator().manual_seed(seed)
    graph, killed = gs.graph, {}
    for name, space in graph.spaces.items():
        if space.encoder_output or torch.rand(1, generator=g).item() < 0.4:
            continue
        count = max(1, int(space.width * (0.1 + 0.6 * torch.rand(1, generator=g).item())))
        killed[name] = set(torch.randperm(space.width, generator=g)[:count].tolist())
        with torch.no_grad():
            for conv in space.consumers:
                for s in gs.slices(conv.split(".", 1)[1] + ":in"):
                    model.get_parameter(s.name).index_fill_(1, torch.tensor(sorted(killed[name])), 0.0)
    return killed


@pytest.mark.parametrize("encoder", ["tiny", "resnet18-os8", "resnet50d-os8"])
def test_paper_mode_groups_compact_exactly(encoder: str) -> None:
    model = copy.deepcopy(_base(encoder)[0])
    gs = build_groups(model, "paper")
    killed = _kill_paper(model, gs, seed=3)
    x = _input()
    want = _outputs(model, x)
    for round_to in (1, 8):
        plan = plan_compaction(model, groupset=gs, round_to=round_to)
        assert plan.mode == "paper"
        _assert_same_outputs(_outputs(apply_plan(model, plan), x), want)
        for space in plan.spaces:
            alive = set(range(space.original_width)) - killed.get(space.name, set())
            assert set(space.kept) == alive if round_to == 1 else set(space.kept) >= alive


def test_a_whole_dead_stream_keeps_the_minimum_width_and_stays_exact() -> None:
    """Float64, so the comparison has no summation-order noise; the dtype carries over."""
    model = copy.deepcopy(_base("tiny")[0]).double()
    gs = build_groups(model)
    name = "stages.1 (stream)"
    with torch.no_grad():
        for s in gs.slices(name):
            model.get_parameter(s.name).zero_()
    x = _input().double()
    want = _outputs(model, x)
    for round_to, kept in ((8, tuple(range(8))), (1, (0,)), (0, (0,))):
        small, plan = compact(model, round_to=round_to)
        assert plan.space(name).kept == kept and plan.space(name).padding == kept
        assert small.config.encoder.stages[1].out == len(kept)
        assert next(small.parameters()).dtype == torch.float64
        got = _outputs(small, x)
        for task in want:
            torch.testing.assert_close(got[task], want[task], rtol=0, atol=1e-10)


def test_widths_never_exceed_the_original_and_ties_keep_the_lowest_index() -> None:
    """Odd widths: where rounding up to 8 would exceed the width, the original width is kept."""
    enc = EncoderConfig(
        block="basic",
        stem=(12,),
        stages=(
            StageConfig(out=12, blocks=((20,),)),
            StageConfig(out=20, blocks=((9,),), stride=2, downsample=True),
        ),
    )
    torch.manual_seed(1)
    model = create_model(encoder=enc, tasks=(SEG,), head_width=8).eval()
    _randomise(model)
    gs = build_groups(model)
    kills = {
        "stages.0.0.conv1": [3, 5, 9],
        "stages.0 (stream)": [0, 1, 2, 7, 11],
        "stages.1 (stream)": [4, 6],
    }
    with torch.no_grad():
        for name, indices in kills.items():
            for s in gs.slices(name):
                model.get_parameter(s.name).index_fill_(s.dim, torch.tensor(indices), 0.0)
    x = _input()
    want = _outputs(model, x)
    plan = plan_compaction(model, groupset=gs, round_to=8)
    # 17 of 20 alive -> 24 > 20: all kept; 7 of 12 -> 8; 18 of 20 -> 24 > 20: all kept
    assert plan.widths() == {
        "stages.0 (stream)": 8,
        "stages.0.0.conv1": 20,
        "stages.1 (stream)": 20,
        "stages.1.0.conv1": 9,
    }
    assert plan.space("stages.0 (stream)").padding == (0,)  # equal (zero) norms: lowest dead index
    _assert_same_outputs(_outputs(apply_plan(model, plan), x), want)
    assert plan_compaction(model, groupset=gs, round_to=4).space("stages.0.0.conv1").width == 20
    plan9 = plan_compaction(model, groupset=gs, round_to=9).space("stages.0.0.conv1")
    assert plan9.width == 18 and plan9.padding == (3,)


def test_padding_takes_the_dead_channel_with_the_largest_producer_norm() -> None:
    """Paper mode: dead channels keep their filters; the largest one is retained first."""
    model = copy.deepcopy(_base("tiny")[0])
    gs = build_groups(model, "paper")
    reader = model.encoder.stages[1][0].conv2  # the only reader of stages.1.0.conv1
    with torch.no_grad():
        reader.weight[:, [2, 6, 9]] = 0.0
        model.encoder.stages[1][0].conv1.weight[6] *= 10.0
    plan = plan_compaction(model, groupset=gs, round_to=62)
    space = plan.space("stages.1.0.conv1")
    assert space.width == 62 and space.padding == (6,)
    assert set(space.kept) == set(range(64)) - {2, 9}


# --- plans ------------------------------------------------------------------------------------


@pytest.mark.parametrize("encoder", ["tiny", "resnet50d-os8"])
def test_plan_json_round_trip_and_replay_on_a_fresh_model(encoder: str) -> None:
    model, gs, _ = _sparse(encoder, 0)
    plan = plan_compaction(model, groupset=gs)
    text = json.dumps(plan.to_dict())
    again = CompactionPlan.from_dict(json.loads(text))
    assert again == plan and json.dumps(again.to_dict()) == text
    assert plan.round_to == 8 and plan.mode == "channel" and len(plan.source_hash) == 64
    entry = json.loads(text)["spaces"][0]
    assert {"name", "original_width", "kept", "width", "producers", "consumers"} <= set(entry)
    small = apply_plan(model, plan)
    # a freshly built model with the same config and weights replays the recorded plan exactly
    fresh = build_model(ModelConfig.from_dict(plan.source_config))
    fresh.load_state_dict(model.state_dict())
    replayed = apply_plan(fresh, again)
    a, b = small.state_dict(), replayed.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert replayed.config == small.config


def test_plan_summary_and_compact_convenience() -> None:
    model, gs, killed = _sparse("tiny", 0)
    small, plan = compact(model)
    assert plan == plan_compaction(model)
    text = plan.summary()
    lines = text.splitlines()
    assert len(lines) == len(plan.spaces) + 2
    for space in plan.spaces:
        assert any(line.split()[: len(space.name.split())] == space.name.split() for line in lines)
    before = sum(s.original_width for s in plan.spaces)
    assert f"channels {before} -> {sum(s.width for s in plan.spaces)}" in text


def test_apply_refuses_foreign_and_broken_plans() -> None:
    model, gs, _ = _sparse("tiny", 0)
    plan = plan_compaction(model, groupset=gs)
    other = _base("resnet18")[0]
    with pytest.raises(ValueError, match="another model config"):
        apply_plan(other, plan)
    space = plan.spaces[0]
    with pytest.raises(ValueError, match=r"must lie in \[0, 32\)"):
        dataclasses.replace(space, kept=space.kept[:-1] + (32,))
    with pytest.raises(ValueError, match="sorted and unique"):
        dataclasses.replace(space, kept=(1, 0))
    with pytest.raises(ValueError, match="at least one"):
        dataclasses.replace(space, kept=())
    edited = plan.to_dict()
    edited["spaces"][0]["kept"] = [0, 1, 40]
    with pytest.raises(ValueError, match="lie in"):
        CompactionPlan.from_dict(edited)
    edited = plan.to_dict()
    edited["source_config"]["name"] = "someone else"
    with pytest.raises(ValueError, match="does not match its source_config"):
        CompactionPlan.from_dict(edited)
    assert plan.source_config["name"] == "tiny"  # to_dict hands out a copy
    edited = plan.to_dict() | {"mode": "filters"}
    with pytest.raises(ValueError, match="unknown group mode"):
        CompactionPlan.from_dict(edited)
    with pytest.raises(ValueError, match="not a compaction plan"):
        CompactionPlan.from_dict({"format": "x"})
    renamed = dataclasses.replace(space, producers=(("encoder.stem.9.conv", None),))
    with pytest.raises(ValueError, match="no Conv2d 'encoder.stem.9.conv'"):
        apply_plan(model, dataclasses.replace(plan, spaces=(renamed,) + plan.spaces[1:]))
    wider = dataclasses.replace(space, original_width=space.original_width + 8)
    with pytest.raises(ValueError, match="disagree"):
        apply_plan(model, dataclasses.replace(plan, spaces=(wider,) + plan.spaces[1:]))
    with pytest.raises(ValueError, match="does not cover"):
        apply_plan(model, dataclasses.replace(plan, spaces=plan.spaces[1:]))
    with pytest.raises(ValueError, match="round_to"):
        plan_compaction(model, round_to=-1)
    with pytest.raises(ValueError, match="contradicts"):
        plan_compaction(model, groupset=gs, mode="paper")


# --- saving and loading -----------------------------------------------------------------------


def test_save_and_load_round_trip_without_pickle(tmp_path, monkeypatch) -> None:
    model, gs, _ = _sparse("tiny", 2)
    small, plan = compact(model)
    out = save_compact(small, plan, tmp_path / "compact")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "plan.json"]
    config = json.loads((out / "config.json").read_text())
    assert config == small.config.to_dict()
    assert config["encoder"]["stages"][0]["out"] == small.config.encoder.stages[0].out
    assert load_plan(out) == plan

    def no_pickle(*args, **kwargs):
        raise AssertionError("load_compact must not use torch.load")

    monkeypatch.setattr(torch, "load", no_pickle)
    loaded = load_compact(out)
    assert not loaded.training and loaded.config == small.config
    x = _input()
    a, b = _outputs(small, x), _outputs(loaded, x)
    assert all(torch.equal(a[t], b[t]) for t in a)
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        assert set(f.keys()) == set(small.state_dict())
    assert count_parameters(loaded) == _declared_parameters(loaded) == count_parameters(small)


def test_save_refuses_a_model_the_plan_did_not_produce(tmp_path) -> None:
    model, gs, _ = _sparse("tiny", 0)
    plan = plan_compaction(model, groupset=gs)
    with pytest.raises(ValueError, match="apply_plan"):
        save_compact(model, plan, tmp_path)
    assert not list(tmp_path.iterdir())


def test_load_errors_name_the_file(tmp_path) -> None:
    with pytest.raises(InputFileError, match="config.json: compact model config not found"):
        load_compact(tmp_path)
    model, gs, _ = _sparse("tiny", 0)
    small, plan = compact(model)
    save_compact(small, plan, tmp_path)
    (tmp_path / "model.safetensors").rename(tmp_path / "moved")
    with pytest.raises(InputFileError, match="model.safetensors: compacted weights not found"):
        load_compact(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"not a tensor file")
    with pytest.raises(ValueError, match="model.safetensors"):
        load_compact(tmp_path)
    (tmp_path / "moved").rename(tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps(model.config.to_dict()))  # the dense config
    with pytest.raises(InputFileError, match=r"model.safetensors: field 'encoder\.[a-z0-9.]+': the model config in .*config.json expects .* shape"):
        load_compact(tmp_path)
    (tmp_path / "config.json").write_text("{")
    with pytest.raises(ValueError, match="config.json"):
        load_compact(tmp_path)


def test_a_config_with_an_unregistered_task_kind_is_refused_listing_the_kinds(tmp_path) -> None:
    from parsimony.tasks import kind_names
    from training.compaction.io import load_config

    config = create_model(encoder="tiny", tasks=(TaskSpec("depth", "depth", 1),)).config.to_dict()
    config["heads"][0]["task"]["kind"] = "optical_flow"
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    with pytest.raises(InputFileError, match=r"field 'heads\.0\.task\.kind'.*unknown task kind 'optical_flow'") as info:
        load_config(path)
    assert all(repr(k) in str(info.value) for k in kind_names()) and str(path) in str(info.value)
