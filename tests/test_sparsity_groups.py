"""Channel groups traced from the encoder: coverage for every registered encoder, residual-stream
coupling, zero-invariance of a zeroed group, paper mode, and loud failures on unsupported graphs.
Big encoders run at 32x32 in eval mode with 8-wide light heads."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from torch import nn

from training.models import available_encoders, create_model
from training.sparsity import GroupSet, alive_channels, build_groups, trace_channels, zero_mask
from training.tasks import TaskSpec

SEG = TaskSpec("seg", "segmentation", 5)
DEPTH = TaskSpec("depth", "depth", 1)
ATTR = TaskSpec("attr", "attributes", 2, ("Male", "Smiling"))
TASKS = (SEG, DEPTH, ATTR)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


_MODELS: dict[str, nn.Module] = {}


def _model(encoder: str) -> nn.Module:
    """One cached model per encoder (read-only tests); mutating tests build their own."""
    if encoder not in _MODELS:
        torch.manual_seed(0)
        _MODELS[encoder] = create_model(encoder=encoder, tasks=TASKS, head="light", head_width=8).eval()
    return _MODELS[encoder]


def _encoder_convs(model: nn.Module) -> list[str]:
    return [f"encoder.{n}" for n, m in model.encoder.named_modules() if isinstance(m, nn.Conv2d)]


def _feature_channels(model: nn.Module) -> int:
    """Distinct feature channels, counted from the config (stage 0 shares the stem's last width
    when it has no projection shortcut)."""
    cfg = model.config.encoder
    stem = sum(cfg.stem) - (0 if cfg.stages[0].downsample else cfg.stem[-1])
    return stem + sum(st.out + sum(sum(b) for b in st.blocks) for st in cfg.stages)


@pytest.mark.parametrize("encoder", available_encoders())
def test_channel_groups_cover_every_conv_output_once(encoder: str) -> None:
    model = _model(encoder)
    gs = build_groups(model, mode="channel")
    params = dict(model.named_parameters())
    convs = _encoder_convs(model)
    assert sum(s.width for s in gs.spaces.values()) == _feature_channels(model) == gs.num_groups
    producers = Counter(c for s in gs.spaces.values() for c, _ in s.producers)
    assert producers == Counter(convs)
    slices = [(sl.name, sl.dim) for n in gs.spaces for sl in gs.slices(n)]
    assert len(slices) == len(set(slices))
    dim0 = Counter(
        name for name, dim in slices if dim == 0 and name.endswith(".weight") and params[name].ndim == 4
    )
    assert dim0 == Counter(f"{c}.weight" for c in convs)
    dim1 = {name for name, dim in slices if dim == 1}
    first = f"{gs.graph.convs[0]}.weight"
    assert dim1 == {f"{c}.weight" for c in convs} - {first}  # the RGB input is never grouped
    assert params[first].shape[1] == 3
    bn = {n for n, m in model.encoder.named_modules() if isinstance(m, nn.BatchNorm2d)}
    assert {name.rsplit(".", 1)[0] for name, _ in slices if "bn" in name or "downsample" in name} >= {
        f"encoder.{b}" for b in bn
    }
    assert not any(name.startswith("heads.") for name, _ in slices)
    # every encoder parameter lies in some group, and each group's size adds up
    total, _ = gs.index().count_scalars(
        {n: torch.zeros(s.width, dtype=torch.bool) for n, s in gs.spaces.items()}
    )
    assert total == sum(p.numel() for p in model.encoder.parameters())
    for name in gs.spaces:
        size = sum(params[s.name].numel() // params[s.name].shape[s.dim] for s in gs.slices(name))
        assert gs.group_size(name) == size and gs.group_sizes(name).eq(size).all()


@pytest.mark.parametrize("encoder", available_encoders())
def test_heads_read_the_encoder_output_space(encoder: str) -> None:
    model = _model(encoder)
    graph = trace_channels(model)
    out = graph.spaces[graph.output]
    assert out.encoder_output and out.width == model.encoder.out_channels
    expected = [f"heads.{t.name}.conv.conv" for t in TASKS]
    assert out.head_consumers == expected
    assert [s.name for s in graph.spaces.values() if s.head_consumers] == [graph.output]
    assert all(graph.conv_inputs[c] == graph.output for c in expected)


def test_resnet18_stream_couples_stem_and_blocks() -> None:
    graph = trace_channels(_model("resnet18"))
    stream = graph.spaces["stages.0 (stream)"]
    assert [c for c, _ in stream.producers] == [
        "encoder.stem.0.conv",
        "encoder.stages.0.0.conv2",
        "encoder.stages.0.1.conv2",
    ]
    assert [b for _, b in stream.producers] == [
        "encoder.stem.0.bn",
        "encoder.stages.0.0.bn2",
        "encoder.stages.0.1.bn2",
    ]
    assert set(stream.consumers) == {
        "encoder.stages.0.0.conv1",
        "encoder.stages.0.1.conv1",
        "encoder.stages.1.0.conv1",
        "encoder.stages.1.0.downsample.0",
    }
    inner = graph.spaces["stages.1.0.conv1"]
    assert inner.producers == [("encoder.stages.1.0.conv1", "encoder.stages.1.0.bn1")]
    assert inner.consumers == ["encoder.stages.1.0.conv2"] and inner.width == 128


@pytest.mark.parametrize("encoder", ["resnet50", "resnet50d-os8"])
def test_resnet50_stream_holds_downsample_and_every_conv3(encoder: str) -> None:
    model = _model(encoder)
    graph = trace_channels(model)
    shortcut = "downsample.1" if encoder == "resnet50d-os8" else "downsample.0"
    for k, stage in enumerate(model.encoder.stages):
        stream = graph.spaces[f"stages.{k} (stream)"]
        convs = {c for c, _ in stream.producers}
        assert convs == {f"encoder.stages.{k}.0.{shortcut}"} | {
            f"encoder.stages.{k}.{i}.conv3" for i in range(len(stage))
        }
        assert stream.width == model.config.encoder.stages[k].out
    stem = len(model.config.encoder.stem)
    assert f"stem.{stem - 1}" in graph.spaces and len(graph.spaces) == stem + 4 + 2 * 16


def test_unknown_mode_lists_choices() -> None:
    with pytest.raises(ValueError, match="channel.*paper"):
        build_groups(_model("tiny"), mode="filters")


@pytest.mark.parametrize("encoder", ["tiny", "resnet50d-os8"])
def test_paper_groups_are_input_channels_of_every_encoder_conv(encoder: str) -> None:
    model = _model(encoder)
    gs = build_groups(model, mode="paper")
    params = dict(model.named_parameters())
    convs = _encoder_convs(model)
    assert sorted(gs.spaces) == sorted(c.removeprefix("encoder.") + ":in" for c in convs)
    for conv in convs:
        name = conv.removeprefix("encoder.") + ":in"
        w = params[f"{conv}.weight"]
        assert [(s.name, s.dim) for s in gs.slices(name)] == [(f"{conv}.weight", 1)]
        assert gs.spaces[name].width == w.shape[1]
        assert gs.group_size(name) == w.shape[0] * w.shape[2] * w.shape[3]
    assert gs.spaces["stem.0.conv:in"].width == 3  # the reference groups every backbone conv
    assert gs.num_groups == sum(params[f"{c}.weight"].shape[1] for c in convs)
    assert not any("bn" in s.name or s.name.startswith("heads.") for n in gs.spaces for s in gs.slices(n))


def _randomize_bn(model: nn.Module) -> None:
    """Non-trivial BN statistics and shifts, so a forgotten beta would show in the outputs."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)


def _zero_group(model: nn.Module, gs: GroupSet, space: str, index: int) -> None:
    with torch.no_grad():
        for s in gs.slices(space):
            model.get_parameter(s.name).select(s.dim, index).zero_()


@pytest.mark.parametrize("encoder", ["tiny", "resnet18", "resnet50d-os8"])
def test_zeroed_groups_are_dead_channels(encoder: str) -> None:
    """A zeroed channel group (stream, inner, encoder output) leaves the channel exactly 0 everywhere:
    the outputs do not change when its readers' slices, head input convs included, are randomised."""
    torch.manual_seed(1)
    model = create_model(encoder=encoder, tasks=TASKS, head="light", head_width=8).eval()
    _randomize_bn(model)
    gs = build_groups(model, mode="channel")
    graph = gs.graph
    picks = {"stages.1 (stream)": 3, "stages.1.0.conv1": 5, graph.output: 7}
    for space, index in picks.items():
        _zero_group(model, gs, space, index)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        before = model(x)
        stream = model.encoder.forward_stages(model.normalize(x))[1]
        assert stream[:, 3].eq(0).all() and stream[:, :3].ne(0).any()
        for space, index in picks.items():
            s = graph.spaces[space]
            for conv in s.consumers + s.head_consumers:
                model.get_submodule(conv).weight[:, index].normal_()
        after = model(x)
    for task in before:
        torch.testing.assert_close(after[task], before[task], rtol=0, atol=1e-6)
    alive = alive_channels(model, gs)
    for space, index in picks.items():
        assert not alive[space][index] and int(alive[space].sum()) == graph.spaces[space].width - 1
    # readers are non-zero again: only an output group read by heads alone (tiny) stays zero
    zeros = zero_mask(gs)
    expected = {} if graph.spaces[graph.output].consumers else {graph.output: [7]}
    assert {n: z.nonzero().flatten().tolist() for n, z in zeros.items() if z.any()} == expected


def test_alive_channels_paper_mode() -> None:
    """Paper mode: a channel dies when every encoder conv reading it has a zero input slice, but a
    channel the heads read (the encoder output) never does."""
    model = create_model(encoder="tiny", tasks=TASKS, head="light", head_width=8)
    gs = build_groups(model, mode="paper")
    graph = gs.graph
    with torch.no_grad():
        for conv in graph.spaces["stages.1 (stream)"].consumers:
            model.get_submodule(conv).weight[:, 2].zero_()
        model.get_submodule("encoder.stages.1.0.conv2").weight[:, 4].zero_()  # reads stages.1.0.conv1
    alive = alive_channels(model, gs)
    assert alive["stages.1 (stream)"].logical_not().nonzero().flatten().tolist() == [2]
    assert alive["stages.1.0.conv1"].logical_not().nonzero().flatten().tolist() == [4]
    assert alive["stages.3 (stream)"].all()
    zeros = zero_mask(gs)
    assert int(zeros["stages.2.0.conv1:in"].sum()) == 1 and int(zeros["stages.1.0.conv2:in"].sum()) == 1


def test_paper_mode_keeps_channels_the_heads_read() -> None:
    model = create_model(encoder="resnet18", tasks=TASKS, head="light", head_width=8)
    gs = build_groups(model, mode="paper")
    out = gs.graph.spaces[gs.graph.output]
    assert out.consumers == ["encoder.stages.3.1.conv1"]
    with torch.no_grad():
        model.encoder.stages[3][1].conv1.weight[:, 0].zero_()
    assert zero_mask(gs)["stages.3.1.conv1:in"][0]
    assert alive_channels(model, gs)[out.name].all()


class _Wrap(nn.Module):
    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder


class _Cat(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 3), nn.Conv2d(3, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.a(x), self.b(x)], dim=1)


class _Depthwise(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.dw = nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3, groups=4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dw(self.a(x))


class _AddConstant(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x) + 1.0


class _Linear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.fc = nn.Conv2d(3, 4, 3), nn.Linear(6, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.a(x))  # acts on the last (width) axis of an 8x8 input's 6x6 map


@pytest.mark.parametrize(
    ("encoder", "names"),
    [(_Cat, "cat"), (_Depthwise, "dw"), (_AddConstant, "add"), (_Linear, "fc")],
)
def test_unsupported_ops_raise_naming_the_node(encoder: type[nn.Module], names: str) -> None:
    with pytest.raises(NotImplementedError, match=f"node '{names}"):
        build_groups(_Wrap(encoder()))


def test_groups_and_summary() -> None:
    gs = build_groups(_model("tiny"))
    group = gs.group("stages.1.0.conv1", 5)
    assert group.index == 5 and group.size == gs.group_size("stages.1.0.conv1")
    assert [(s.name, s.dim) for s in group.slices] == [
        ("encoder.stages.1.0.conv1.weight", 0),
        ("encoder.stages.1.0.bn1.weight", 0),
        ("encoder.stages.1.0.bn1.bias", 0),
        ("encoder.stages.1.0.conv2.weight", 1),
    ]
    assert sum(1 for _ in gs.groups()) == gs.num_groups == 640
    with pytest.raises(IndexError):
        gs.group("stages.1.0.conv1", 64)
    with pytest.raises(KeyError, match="stages.0 \\(stream\\)"):
        gs.slices("nope")
    summary = gs.to_dict()
    assert summary["mode"] == "channel" and summary["groups"] == 640
    assert [s["name"] for s in summary["spaces"]] == list(gs.spaces)
