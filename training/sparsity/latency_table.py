"""A per-layer ONNX Runtime latency table of one model, measured on this machine (HALP-style).

For every conv whose width compaction can change (encoder convs and the heads' input convs), the
table holds its latency on a grid of (input, output) widths, multiples of ``round_to`` up to the
dense widths, at the run's input size, batch and thread count. Each layer's grid is one ONNX graph
of independent Conv+ReLU nodes, run with ONNX Runtime's profiler, so one session gives the kernel
time of every grid point without per-run overhead or the layout reorders that a lone conv pays.
Between grid points latency is interpolated bilinearly.

A model's latency is predicted as ``offset_ms + scale · Σ convs' table entries``. The sum alone
misses what the whole model spends elsewhere (session overhead, layout reorders, adds, pooling,
upsampling, the heads' other layers), part of it fixed and part shrinking with the widths, so the
two coefficients are fitted (least squares) to three whole models timed side by side in
alternating rounds: the dense one and the same model with every channel space at a half and at a
quarter of its width.

Every latency here is the fastest of many runs, not the median: on a machine shared with other
work the minimum is the stable estimate of what the model costs when it has the cores, while the
median moves with whatever else runs (we saw the same model's median double within a minute).

The table is measured once per run (a few seconds) and cached as JSON in the run directory; a cache
made for another model, input size, batch, thread count or ONNX Runtime version is re-measured.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import re
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from parsimony import onnxrt
from parsimony.io import atomic_write_json

log = logging.getLogger("training")

TABLE_FORMAT = "parsimony.latency-table/1"
GRID_POINTS = 6  # widths per dimension and layer (plus the dense width)
PROFILE_RUNS = 12
CALIBRATION_MISFIT = 0.08  # the three calibration models must lie this close to the fitted line
_OUTPUT = re.compile(r"^(y\d+)(_|$)")


@dataclass(frozen=True)
class ConvShape:
    """What a conv's latency depends on besides its widths."""

    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    input_hw: tuple[int, int]
    bias: bool


@dataclass(frozen=True)
class LayerTable:
    """Latency (ms) of one conv on a grid: ``ms[i][j]`` at ``cin[i]`` inputs and ``cout[j]`` outputs."""

    cin: tuple[int, ...]
    cout: tuple[int, ...]
    ms: tuple[tuple[float, ...], ...]

    def at(self, cin: int, cout: int) -> float:
        """Bilinear interpolation (linear extrapolation below the smallest grid width)."""
        (i0, i1, a), (j0, j1, b) = _bracket(self.cin, cin), _bracket(self.cout, cout)
        m = self.ms
        low = m[i0][j0] * (1 - b) + m[i0][j1] * b
        high = m[i1][j0] * (1 - b) + m[i1][j1] * b
        return max(0.0, low * (1 - a) + high * a)


@dataclass(frozen=True)
class LatencyTable:
    layers: dict[str, LayerTable]
    offset_ms: float
    dense_ms: float  # the whole dense model, measured with the table
    key: dict  # what the table was measured for (cache check)
    scale: float = 1.0

    def conv_ms(self, conv: str, cin: int, cout: int) -> float:
        return self.layers[conv].at(cin, cout)

    def predict(self, widths: Mapping[str, tuple[int, int]]) -> float:
        """Latency (ms) of the model whose convs have these (in, out) widths."""
        return self.offset_ms + self.scale * sum(self.conv_ms(c, *w) for c, w in widths.items())

    def to_dict(self) -> dict:
        return {"format": TABLE_FORMAT, "key": self.key, "offset_ms": self.offset_ms, "scale": self.scale,
                "dense_ms": self.dense_ms, "layers": {n: asdict(t) for n, t in self.layers.items()}}

    @classmethod
    def from_dict(cls, d: Mapping) -> LatencyTable:
        layers = {n: LayerTable(tuple(t["cin"]), tuple(t["cout"]), tuple(tuple(r) for r in t["ms"]))
                  for n, t in d["layers"].items()}
        return cls(layers, float(d["offset_ms"]), float(d["dense_ms"]), dict(d["key"]), float(d["scale"]))


def _bracket(grid: Sequence[int], x: int) -> tuple[int, int, float]:
    if len(grid) == 1:
        return 0, 0, 0.0
    k = max(1, min(int(np.searchsorted(grid, x)), len(grid) - 1))
    lo, hi = grid[k - 1], grid[k]
    return k - 1, k, (x - lo) / (hi - lo)


def width_grid(dense: int, round_to: int, points: int = GRID_POINTS, fixed: bool = False) -> tuple[int, ...]:
    """Multiples of ``round_to`` spread over (0, dense], always including ``dense``."""
    if fixed:
        return (dense,)
    step = max(1, round_to)
    choices = list(range(step, dense, step)) + [dense]
    if len(choices) <= points:
        return tuple(choices)
    idx = np.linspace(0, len(choices) - 1, points).round().astype(int)
    return tuple(sorted({choices[i] for i in idx}))


def conv_shapes(model: nn.Module, convs: Sequence[str], image_size: tuple[int, int]) -> dict[str, ConvShape]:
    """The geometry of each named conv, its input size found by one forward pass."""
    from training.models.complexity import _dummy_input

    sizes: dict[str, tuple[int, int]] = {}
    modules = dict(model.named_modules())

    def note(name: str):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            sizes.setdefault(name, tuple(args[0].shape[-2:]))
        return hook

    hooks = [modules[c].register_forward_hook(note(c)) for c in convs]
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(_dummy_input(model, image_size, 1, None))
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    out = {}
    for c in convs:
        m = modules[c]
        if not isinstance(m.padding, tuple) or m.groups != 1:
            raise NotImplementedError(f"{c}: only ungrouped convs with explicit padding are tabled")
        out[c] = ConvShape(tuple(m.kernel_size), tuple(m.stride), tuple(m.padding), tuple(m.dilation),
                           sizes[c], m.bias is not None)
    return out


def measure_layer(shape: ConvShape, cin: Sequence[int], cout: Sequence[int], batch: int,
                  threads: int | None) -> LayerTable:
    """One profiled ONNX Runtime session over the layer's whole grid."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    nodes, inputs, outputs, inits, points = [], [], [], [], []
    h, w = shape.input_hw
    for ci in cin:
        for co in cout:
            k = len(points)
            points.append((ci, co))
            inputs.append(helper.make_tensor_value_info(f"x{k}", TensorProto.FLOAT, [batch, ci, h, w]))
            weight = rng.standard_normal((co, ci, *shape.kernel)).astype(np.float32) * 0.05
            inits.append(numpy_helper.from_array(weight, f"w{k}"))
            args = [f"x{k}", f"w{k}"]
            if shape.bias:
                inits.append(numpy_helper.from_array(np.zeros(co, np.float32), f"b{k}"))
                args.append(f"b{k}")
            nodes.append(helper.make_node(
                "Conv", args, [f"c{k}"], kernel_shape=list(shape.kernel), strides=list(shape.stride),
                pads=[*shape.padding, *shape.padding], dilations=list(shape.dilation)))
            nodes.append(helper.make_node("Relu", [f"c{k}"], [f"y{k}"]))
            outputs.append(helper.make_tensor_value_info(f"y{k}", TensorProto.FLOAT, None))
    graph = helper.make_graph(nodes, "latency_table", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with tempfile.TemporaryDirectory() as tmp:
        session = onnxrt.session(model.SerializeToString(), threads=threads or 0, profile=Path(tmp) / "profile")
        feed = {i.name: rng.standard_normal(i.shape).astype(np.float32) for i in session.get_inputs()}
        for _ in range(PROFILE_RUNS + 2):
            session.run(None, feed)
        events = json.loads(Path(session.end_profiling()).read_text())
    per_output = _kernel_times(events)
    ms = []
    for k, _ in enumerate(points):
        runs = per_output.get(f"y{k}")
        if not runs:
            raise RuntimeError(f"ONNX Runtime's profile has no kernel time for grid point {points[k]}; "
                               f"this ONNX Runtime names its fused nodes differently")
        ms.append(min(runs[2:] or runs) / 1e3)  # µs -> ms, first runs are warm-up
    grid = tuple(tuple(ms[i * len(cout):(i + 1) * len(cout)]) for i in range(len(cin)))
    return LayerTable(tuple(cin), tuple(cout), grid)


def _kernel_times(events: list[dict]) -> dict[str, list[float]]:
    """Per graph output ``y<k>``: the summed conv kernel time of every run (reorders excluded)."""
    per_run: dict[str, list[float]] = {}
    for e in events:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time"):
            continue
        if "Conv" not in str(e.get("args", {}).get("op_name", "")):
            continue
        found = _OUTPUT.match(e["name"].removesuffix("_kernel_time"))
        if found:
            per_run.setdefault(found.group(1), []).append(float(e["dur"]))
    return per_run


def measure_model_ms(model: nn.Module, image_size: tuple[int, int], batch: int, threads: int | None) -> float:
    """The whole model's fastest ONNX Runtime latency (exported to a temporary file)."""
    return measure_models_ms([model], image_size, batch, threads)[0]


def measure_models_ms(models: Sequence[nn.Module], image_size: tuple[int, int], batch: int, threads: int | None,
                      rounds: int = 4) -> list[float]:
    """The fastest ONNX Runtime latency of each model (`time_onnx`)."""
    with tempfile.TemporaryDirectory() as tmp:
        paths = [export_temporary(m, Path(tmp) / f"model{i}.onnx", image_size) for i, m in enumerate(models)]
        return [min(t) for t in time_onnx(paths, image_size, batch, threads, rounds=rounds)]


def export_temporary(model: nn.Module, path: Path, image_size: tuple[int, int]) -> Path:
    """A raw ONNX graph (the network alone, float32 images in) of a CPU copy of ``model`` (the
    model itself is left where it is)."""
    from training.export.onnx_export import export_onnx

    return export_onnx(copy.deepcopy(model).cpu().eval(), path, image_size=image_size, check_batch_sizes=(1,),
                       raw_outputs=True).path


def time_onnx(paths: Sequence[Path], image_size: tuple[int, int], batch: int, threads: int | None, *,
              rounds: int = 4, repeats: int = 6) -> list[list[float]]:
    """Every timed run (ms) of each ONNX file, timed in alternating rounds so that load from other
    work hits all of them alike."""
    from training.speed import example_batch
    from training.timing import sample_ms

    x = example_batch(image_size, batch).numpy()
    sessions = [onnxrt.session(p, threads=threads or 0) for p in paths]
    times: list[list[float]] = [[] for _ in paths]
    for _ in range(rounds):
        for s, out in zip(sessions, times, strict=True):
            feed = {s.get_inputs()[0].name: x}
            out += sample_ms(lambda s=s, feed=feed: s.run(None, feed), repeats=repeats, warmup=2)
    return times


def narrowed_model(model: nn.Module, round_to: int, keep: float) -> nn.Module:
    """``model`` with every channel space cut to the fraction ``keep`` of its width (a calibration
    point)."""
    from training.compaction import compact
    from training.sparsity.groups import build_groups

    half = copy.deepcopy(model).cpu()
    groupset = build_groups(half)
    index = groupset.index()
    index.scale_({k: (torch.arange(w) < max(1, round(w * keep))).double()
                  for k, w in zip(index.keys, index.widths, strict=True)})
    return compact(half, round_to=round_to)[0]


def measure_table(model: nn.Module, convs: Mapping[str, tuple[int, int, bool, bool]], image_size: tuple[int, int],
                  *, batch: int, threads: int | None, round_to: int, key: dict, attempts: int = 3) -> LatencyTable:
    """``convs``: name -> (dense in, dense out, in fixed, out fixed).

    A burst of other work while the layers are measured bends the table; the calibration shows it
    (its three points stop lying on a line), and the table is then measured again, up to
    ``attempts`` times, keeping the best fit. Should no fit hold, the table is scaled to the dense
    model's measured latency (no offset)."""
    shapes = conv_shapes(model, list(convs), image_size)
    models = [model, *(narrowed_model(model, round_to, keep) for keep in (0.5, 0.25))]
    best: tuple[float, LatencyTable] | None = None
    for attempt in range(attempts):
        layers = {name: measure_layer(shapes[name], width_grid(cin, round_to, fixed=fixed_in),
                                      width_grid(cout, round_to, fixed=fixed_out), batch, threads)
                  for name, (cin, cout, fixed_in, fixed_out) in convs.items()}
        measured = measure_models_ms(models, image_size, batch, threads)
        sums = [sum(layers[n].at(m.in_channels, m.out_channels) for n, m in mod.named_modules() if n in convs)
                for mod in models]
        offset, scale = _fit_line(sums, measured)
        misfit = max(abs(offset + scale * x - y) / y for x, y in zip(sums, measured, strict=True))
        if not 0.25 <= scale <= 4.0 or offset < -0.5 * measured[-1]:
            offset, scale, misfit = 0.0, measured[0] / sums[0], math.inf
        table = LatencyTable(layers, offset, measured[0], key, scale)
        if best is None or misfit < best[0]:
            best = (misfit, table)
        if misfit <= CALIBRATION_MISFIT:
            break
        log.info("latency table attempt %d: the calibration misses by %.0f %% (load from other work?); "
                 "measuring again", attempt + 1, 100 * misfit)
    return best[1]


def _fit_line(x: Sequence[float], y: Sequence[float]) -> tuple[float, float]:
    """Least-squares ``y = a + b·x``; (a, b)."""
    mx, my = sum(x) / len(x), sum(y) / len(y)
    sxx = sum((v - mx) ** 2 for v in x)
    b = sum((u - mx) * (v - my) for u, v in zip(x, y, strict=True)) / sxx if sxx > 0 else 1.0
    return my - b * mx, b


def load_or_measure(path: Path, model: nn.Module, convs: Mapping[str, tuple[int, int, bool, bool]],
                    image_size: tuple[int, int], *, batch: int, threads: int | None, round_to: int,
                    model_key: str) -> LatencyTable:
    """The cached table at ``path`` when it was measured for the same setting, else a new one."""
    import onnxruntime as ort

    key = {"model": model_key, "image_size": list(image_size), "batch": batch, "threads": threads,
           "round_to": round_to, "onnxruntime": ort.__version__, "grid_points": GRID_POINTS}
    if path.is_file():
        try:
            cached = json.loads(path.read_text())
            if cached.get("format") == TABLE_FORMAT and cached.get("key") == key:
                return LatencyTable.from_dict(cached)
        except (ValueError, KeyError, TypeError):
            pass
        log.info("%s was measured for another setting; measuring again", path)
    log.info("measuring the per-layer latency table (ONNX Runtime, batch %d, %s threads) into %s",
             batch, threads or "default", path)
    table = measure_table(model, convs, image_size, batch=batch, threads=threads, round_to=round_to, key=key)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, table.to_dict())
    log.info("latency table: dense model %.2f ms measured; prediction %.2f ms + %.2f x the tabled convs",
             table.dense_ms, table.offset_ms, table.scale)
    return table
