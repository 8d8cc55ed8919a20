"""Channel spaces of the shared encoder, found by tracing its graph (never listed by hand).

Why a trace: which parameters belong to one feature channel depends on the wiring (a residual
stream couples every block that adds into it), so the groups are computed the way Torch-Pruning
builds its dependency graph. ``torch.fx`` traces the encoder and "channel spaces" are propagated
through the graph:

- every conv output opens a new space; BatchNorm, ReLU, max/avg-pool and Identity pass their
  input's space through (a BN directly after a conv becomes that conv's producer BN);
- an elementwise add unions the spaces of its operands (union-find), so a residual stream is one
  space across the shortcut that starts it and every block that adds into it;
- a conv records itself as a consumer of the space it reads; the heads' ``input_convs()`` are
  recorded as *head* consumers of the encoder output space (for compaction), never regularised;
- the image input (RGB) is not a feature space. Anything else (cat, grouped convs, linear, ...)
  raises NotImplementedError naming the node, rather than silently mis-grouping.

Module names are qualified in the model (``encoder.stages.1.0.conv1``); `training.sparsity.groups`
turns the spaces into parameter groups.
"""

from __future__ import annotations

import operator
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

_ADD_FNS = (operator.add, operator.iadd, torch.add)
_RELU_FNS = (F.relu, torch.relu)
_PASS_THROUGH = (nn.ReLU, nn.MaxPool2d, nn.AvgPool2d, nn.Identity)


@dataclass
class ChannelSpace:
    """A set of channels that must be kept or removed together (one group per channel).

    ``producers`` lists (conv, BN or None) writing the channels, ``consumers`` the encoder convs
    reading them and ``head_consumers`` the head input convs reading them (encoder output only).
    Module names are qualified in the model (``encoder.stages.1.0.conv1``).
    """

    name: str
    width: int
    producers: list[tuple[str, str | None]] = field(default_factory=list)
    consumers: list[str] = field(default_factory=list)
    head_consumers: list[str] = field(default_factory=list)
    encoder_output: bool = False

    def to_dict(self) -> dict:
        return {**asdict(self), "producers": [list(p) for p in self.producers]}


@dataclass
class ChannelGraph:
    """What the trace found: the feature spaces and which space each module reads or writes."""

    spaces: dict[str, ChannelSpace]
    conv_inputs: dict[str, str | None]  # encoder and head input convs -> space read (None: image)
    conv_outputs: dict[str, str]  # encoder convs -> space written
    norm_spaces: dict[str, str]  # encoder BNs -> space
    convs: list[str]  # encoder convs in execution order
    output: str  # the encoder output space


# --- tracing ----------------------------------------------------------------------------------


@dataclass
class _Space:
    width: int
    producers: list[list[str | None]] = field(default_factory=list)
    consumers: list[str] = field(default_factory=list)
    image: bool = False


class _Tracer:
    """Walks the fx graph once, propagating channel spaces (union-find over space ids)."""

    def __init__(self, encoder: nn.Module, names: Mapping[int, str]) -> None:
        self.encoder, self.names = encoder, names
        self.spaces: list[_Space] = []
        self.parent: list[int] = []
        self.space_of: dict[fx.Node, int] = {}
        self.conv_node: dict[fx.Node, list[str | None]] = {}
        self.conv_inputs: dict[str, int] = {}
        self.conv_outputs: dict[str, int] = {}
        self.norms: dict[str, int] = {}
        self.output: int | None = None

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def new(self, node: fx.Node, space: _Space) -> int:
        self.spaces.append(space)
        self.parent.append(len(self.parent))
        self.space_of[node] = len(self.spaces) - 1
        return self.space_of[node]

    def visit(self, node: fx.Node) -> None:
        if node.op == "placeholder":
            if any(s.image for s in self.spaces):
                raise NotImplementedError(f"node {node.name}: the encoder must take a single image input")
            self.new(node, _Space(width=0, image=True))
        elif node.op == "call_module":
            self.visit_module(node, self.encoder.get_submodule(str(node.target)))
        elif node.op == "call_function" and node.target in _ADD_FNS:
            self.visit_add(node)
        elif node.op == "call_function" and node.target in _RELU_FNS:
            self.space_of[node] = self.space_of[_single_input(node)]
        elif node.op == "output":
            self.visit_output(node)
        else:
            raise _unsupported(node, f"{node.op} {getattr(node.target, '__name__', node.target)}")

    def visit_module(self, node: fx.Node, module: nn.Module) -> None:
        name = self.names[id(module)]
        if isinstance(module, nn.Conv2d):
            self.visit_conv(node, module, name)
        elif isinstance(module, nn.BatchNorm2d):
            self.visit_norm(node, name)
        elif isinstance(module, _PASS_THROUGH):
            self.space_of[node] = self.space_of[_single_input(node)]
        else:
            raise _unsupported(node, f"module {name} ({type(module).__name__})")

    def visit_conv(self, node: fx.Node, conv: nn.Conv2d, name: str) -> None:
        if conv.groups != 1:
            raise _unsupported(node, f"grouped/depthwise conv {name} (groups={conv.groups})")
        if name in self.conv_inputs:
            raise _unsupported(node, f"conv {name} called twice (shared weights)")
        s_in = self.find(self.space_of[_single_input(node)])
        self.spaces[s_in].consumers.append(name)
        if self.spaces[s_in].image:
            self.spaces[s_in].width = conv.in_channels
        self.conv_inputs[name] = s_in
        producer: list[str | None] = [name, None]
        self.conv_outputs[name] = self.new(node, _Space(conv.out_channels, [producer]))
        self.conv_node[node] = producer

    def visit_norm(self, node: fx.Node, name: str) -> None:
        src = _single_input(node)
        producer = self.conv_node.get(src)
        if producer is None or producer[1] is not None:
            raise _unsupported(node, f"BatchNorm {name} that does not directly follow its own conv")
        producer[1] = name
        self.norms[name] = self.space_of[src]
        self.space_of[node] = self.space_of[src]

    def visit_add(self, node: fx.Node) -> None:
        args = node.args
        if node.kwargs or len(args) != 2 or not all(isinstance(a, fx.Node) for a in args):
            raise _unsupported(node, "add of anything but two tensors (a constant breaks zero-invariance)")
        a, b = (self.find(self.space_of[x]) for x in args)  # type: ignore[index]
        if self.spaces[a].image or self.spaces[b].image:
            raise _unsupported(node, "add that involves the image input")
        if a != b:
            self.parent[b] = a
        self.space_of[node] = a

    def visit_output(self, node: fx.Node) -> None:
        out = node.args[0]
        if not isinstance(out, fx.Node) or self.spaces[self.find(self.space_of[out])].image:
            raise _unsupported(node, "encoder output that is not a single feature tensor")
        self.output = self.find(self.space_of[out])


def _single_input(node: fx.Node) -> fx.Node:
    inputs = [a for a in node.args if isinstance(a, fx.Node)]
    if len(inputs) != 1 or any(isinstance(v, fx.Node) for v in node.kwargs.values()):
        raise _unsupported(node, "an op with other than one tensor input")
    return inputs[0]


def _unsupported(node: fx.Node, what: str) -> NotImplementedError:
    return NotImplementedError(
        f"channel groups: node {node.name!r} is {what}, which the group tracer does not support; "
        "supported: single-group Conv2d, BatchNorm2d after its conv, ReLU, max/avg pool, Identity, add"
    )


def trace_channels(model: nn.Module) -> ChannelGraph:
    """Trace ``model.encoder`` and return its channel spaces (see the module docstring)."""
    model = unwrap(model)
    names = {id(m): n for n, m in model.named_modules()}
    tracer = _Tracer(model.encoder, names)
    for node in fx.symbolic_trace(model.encoder).graph.nodes:
        tracer.visit(node)
    return _finish(tracer, model, names[id(model.encoder)] + ".")


def _finish(t: _Tracer, model: nn.Module, prefix: str) -> ChannelGraph:
    merged: dict[int, _Space] = {}
    for i, space in enumerate(t.spaces):
        root = merged.setdefault(t.find(i), _Space(space.width, image=space.image))
        root.producers += space.producers
        root.consumers += space.consumers
    names: dict[int, str] = {}
    spaces: dict[str, ChannelSpace] = {}
    for root, s in merged.items():
        if s.image:
            continue
        names[root] = _unique(_space_name([str(p[0]) for p in s.producers], prefix), spaces)
        spaces[names[root]] = ChannelSpace(
            names[root], s.width, [(str(c), b) for c, b in s.producers], list(s.consumers)
        )
    assert t.output is not None, "fx graphs always end in an output node"
    out = spaces[names[t.output]]
    out.encoder_output = True
    conv_inputs = {c: names.get(t.find(s)) for c, s in t.conv_inputs.items()}
    for conv, conv_name in _head_input_convs(model):
        if conv.in_channels != out.width:
            raise ValueError(
                f"head conv {conv_name} reads {conv.in_channels} channels, encoder gives {out.width}"
            )
        out.head_consumers.append(conv_name)
        conv_inputs[conv_name] = out.name
    return ChannelGraph(
        spaces=spaces,
        conv_inputs=conv_inputs,
        conv_outputs={c: names[t.find(s)] for c, s in t.conv_outputs.items()},
        norm_spaces={n: names[t.find(s)] for n, s in t.norms.items()},
        convs=list(t.conv_inputs),
        output=out.name,
    )


def _space_name(producers: list[str], prefix: str) -> str:
    """``stem.0`` / ``stages.1.0.conv1`` for one producer, ``stages.2 (stream)`` for a stream."""
    rel = [p.removeprefix(prefix) for p in producers]
    if len(rel) == 1:
        return rel[0].removesuffix(".conv")
    return ".".join(rel[-1].split(".")[:2]) + " (stream)"


def _unique(name: str, taken: Mapping[str, object]) -> str:
    k, candidate = 2, name
    while candidate in taken:
        candidate, k = f"{name} #{k}", k + 1
    return candidate


def _head_input_convs(model: nn.Module) -> Iterator[tuple[nn.Conv2d, str]]:
    names = {id(m): n for n, m in model.named_modules()}
    heads = getattr(model, "heads", {})
    for task, head in heads.items():
        if not hasattr(head, "input_convs"):
            raise NotImplementedError(f"head {task!r} has no input_convs(); the groups need its readers")
        for conv in head.input_convs():
            yield conv, names[id(conv)]


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model under DDP/DataParallel (``.module``) or torch.compile (``._orig_mod``)."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod  # type: ignore[assignment]
        else:
            return model
