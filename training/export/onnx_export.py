"""ONNX export that checks itself: spec-named graph, ONNX checker, spec check, ONNX Runtime vs PyTorch.

`export_onnx` exports the final graph by default (uint8 pixels in, each task's answer out, pre- and
post-processing inside: `training.export.final_graph`), ``float_input`` the same graph on float32
``[N, C, H, W]`` images in [0, 1], and ``raw_outputs`` the raw graph (float32 images in, each
task's head output named by the task). It traces a float32 CPU copy of the model in eval mode with
the TorchScript exporter (``dynamo=False``: it needs no onnxscript and behaves the same on torch 2.9
to 2.14), names every
tensor from the `ModelIOSpec`, makes the batch dimension dynamic and writes the spec's fixed dims
into the graph outputs (the tracer leaves the dims of upsampled maps symbolic). The graph is written
to a temporary file next to ``path`` and renamed into place only after every check passed, so a
failed export leaves nothing at ``path``.

Tolerance of raw outputs (a final graph's answer fields follow `training.export.checks`). Output
``o`` agrees when ``max|ort - torch| <= atol + rtol * scale`` with
``scale = max|torch output|``, per output and batch size. Both runtimes compute in float32 but sum
convolutions in different orders (and ONNX Runtime fuses Conv+BN+ReLU), so they differ by rounding:
measured up to 8e-6 of the scale for logits and depth (tiny and resnet50d-os8, 25 and 12 random
initialisations; 2.6e-6 for resnet50d-os8 at 288x384). ``rtol = 1e-4`` leaves more than 10x
headroom there, while real export faults (stale weights, frozen control flow, wrong op semantics,
a wrong BN epsilon) are 5e-4 of the scale or far more. The bound is relative because untrained
ResNets emit outputs in the thousands, where rounding alone reaches 0.04 in absolute terms.
``atol = 1e-3`` is the floor for outputs near zero and governs unit normals: normalising divides
the rounding by the length of the raw vector, which is arbitrarily short at some pixels, so their
error has a heavy tail (up to 1e-4 observed on narrow untrained heads). 1e-3 is below what any
consumer can see: 1 mm of depth, 0.06 degrees of normal, 2.5e-4 of an attribute probability.
"""

from __future__ import annotations

import copy
import logging
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import onnx
import onnxruntime as ort
import torch
from torch import Tensor, nn

from parsimony import onnxrt
from parsimony.io import staged
from parsimony.spec import DYNAMIC, ModelIOSpec
from parsimony.tasks import GraphOutput
from training.export.checks import (
    FINAL_ATOL,
    FINAL_RTOL,
    FLIP_FRACTION,
    Check,
    ExactCheck,
    ExportMismatch,
    OutputError,
    check_shape,
    describe_failures,
    raw_error,
    task_checks,
)
from training.export.final_graph import FinalOutputs, graph_spec, model_input, sample_input

log = logging.getLogger(__name__)

DEFAULT_OPSET = 17
DEFAULT_ATOL = 1e-3
DEFAULT_RTOL = 1e-4
TOLERANCE_RULE = "max|ort - torch| <= atol + rtol * max|torch|, per output and batch size"
FINAL_RULES = {
    "raw": f"TASK_raw: {TOLERANCE_RULE}",
    "float32": f"max|ort - ref| <= {FINAL_ATOL:g} + {FINAL_RTOL:g} * max|ref| + the raw output's max|ort - torch|, "
               f"ref = the reference post-processing (parsimony.tasks Kind.postprocess) of PyTorch's raw output; and "
               f"within {FINAL_ATOL:g} + {FINAL_RTOL:g} * max|ref| of the reference on ONNX Runtime's own raw output",
    "float16": "the error beyond 2^-10 |ref| + 2^-24 (two float16 roundings) within the float32 bound x (1 + 2^-11)",
    "exact": f"equal to the reference on ONNX Runtime's own raw output everywhere; unequal to that on PyTorch's at "
             f"no more than {FLIP_FRACTION:g} of the elements (near ties)",
}
TRACE_SEED = 0  # the traced input; each checked batch size b uses seed 1000 + b (never the traced input)


@dataclass(frozen=True)
class ExportReport:
    path: Path
    io_spec: ModelIOSpec
    opset: int
    atol: float
    rtol: float
    checks: tuple[Check, ...]
    export_seconds: float
    verify_seconds: float
    outputs: tuple[GraphOutput, ...] = ()  # what each output of a final graph is; empty: a raw graph

    @property
    def final(self) -> bool:
        return bool(self.outputs)

    @property
    def input_dtype(self) -> str:
        return self.io_spec.inputs[0].dtype

    @property
    def batch_sizes(self) -> tuple[int, ...]:
        return tuple(sorted({c.batch_size for c in self.checks}))

    def _float_checks(self, name: str) -> list[OutputError]:
        return [c for c in self.checks if c.name == name and isinstance(c, OutputError)]

    def max_abs_error(self) -> dict[str, float]:
        """Per float output, the largest absolute error over the checked batch sizes (float16
        outputs: beyond float16 rounding)."""
        return {n: max(c.max_abs_error for c in checks) for n in self.io_spec.output_names
                if (checks := self._float_checks(n))}

    def max_rel_error(self) -> dict[str, float]:
        return {n: max(c.max_rel_error for c in checks) for n in self.io_spec.output_names
                if (checks := self._float_checks(n))}

    def near_ties(self) -> dict[str, int]:
        """Per discrete output (class and edge maps), the most elements at one batch size that
        differ from the reference on PyTorch's raw output."""
        exact = [c for c in self.checks if isinstance(c, ExactCheck)]
        return {n: max(c.flipped for c in exact if c.name == n) for n in dict.fromkeys(c.name for c in exact)}

    def to_dict(self) -> dict:
        """The manifest's ``export`` section (JSON-ready)."""
        check = {
            "runtime": f"onnxruntime {ort.__version__} CPUExecutionProvider",
            "batch_sizes": list(self.batch_sizes),
            "input": ("uniform random uint8 pixels p, fixed seeds; PyTorch gets p / 255" if self.input_dtype == "uint8"
                      else "uniform [0, 1) images, fixed seeds"),
            "atol": self.atol,
            "rtol": self.rtol,
            "rule": TOLERANCE_RULE,
        }
        out = {
            "file": self.path.name,
            "opset": self.opset,
            "exporter": f"torch.onnx.export (TorchScript, dynamo=False), torch {torch.__version__}",
            "check": check | ({"final_atol": FINAL_ATOL, "final_rtol": FINAL_RTOL, "flip_fraction": FLIP_FRACTION, "final_rules": FINAL_RULES}
                              if self.final else {}),
            "max_abs_error": self.max_abs_error(),
            "max_rel_error": self.max_rel_error(),
        }
        return out | ({"near_ties": self.near_ties()} if self.final else {})


def export_onnx(
    model: nn.Module,
    path: str | Path,
    *,
    image_size: tuple[int, int],
    raw_outputs: bool = False,
    float_input: bool = False,
    opset: int = DEFAULT_OPSET,
    atol: float = DEFAULT_ATOL,
    rtol: float = DEFAULT_RTOL,
    check_batch_sizes: Sequence[int] = (1, 2),
) -> ExportReport:
    """Export ``model`` (a `MultiTaskModel`, or any module with a ``config`` returning a dict of
    task outputs) to ``path`` at ``image_size`` (H, W) and verify it; see the module doc. The
    final graph by default (on ``float_input``: float32 images), the raw graph on ``raw_outputs``.

    Raises `ExportMismatch` when ONNX Runtime and PyTorch disagree beyond the bound, and
    ``SpecMismatch`` / ``onnx.checker.ValidationError`` when the graph is malformed; in every
    failure nothing is written at ``path``. The caller's model is not modified.
    """
    if not check_batch_sizes or min(check_batch_sizes) < 1:
        raise ValueError(f"check_batch_sizes must list positive batch sizes, got {check_batch_sizes!r}")
    if atol < 0 or rtol < 0:
        raise ValueError(f"atol and rtol must be non-negative, got {atol}, {rtol}")
    spec, outputs = graph_spec(model.config, image_size, raw_outputs=raw_outputs, float_input=float_input)
    module = FinalOutputs(model, outputs) if outputs else SpecOutputs(model, spec.output_names)
    path = Path(path)
    with staged(path) as tmp:
        start = time.perf_counter()
        trace_to_onnx(module, tmp, spec, opset)
        finalize_graph(tmp, spec)
        exported = time.perf_counter()
        checks = compare_with_onnx_runtime(module, tmp, spec, check_batch_sizes, atol=atol, rtol=rtol)
        raise_on_mismatch(checks, atol=atol, rtol=rtol, opset=opset)
        verified = time.perf_counter()
    report = ExportReport(path, spec, opset, atol, rtol, tuple(checks), exported - start, verified - exported,
                          outputs)
    log.info(
        "exported %s (%s graph, opset %d) in %.1f s, verified in %.1f s; max rel error %s%s",
        path,
        "final" if outputs else "raw",
        opset,
        report.export_seconds,
        report.verify_seconds,
        {k: f"{v:.2g}" for k, v in report.max_rel_error().items()},
        f"; near ties {report.near_ties()}" if outputs else "",
    )
    return report


class SpecOutputs(nn.Module):
    """A float32 CPU eval-mode copy of a dict-returning model that returns a tuple in spec order.

    The copy keeps ``torch.onnx.export`` (which restores the *wrapper's* training flag afterwards)
    from ever switching the caller's model, or the reference, back to training mode.
    """

    def __init__(self, model: nn.Module, output_names: tuple[str, ...]) -> None:
        super().__init__()
        self.model = copy.deepcopy(model).cpu().float()
        self.output_names = output_names
        self.eval()

    def forward(self, image: Tensor) -> tuple[Tensor, ...]:
        out = self.model(image)
        missing = [n for n in self.output_names if n not in out]
        if missing or len(out) != len(self.output_names):
            raise ValueError(
                f"the model returned outputs {sorted(out)}, the spec expects {list(self.output_names)}; "
                f"export a model whose config lists exactly the tasks it computes"
            )
        return tuple(out[n] for n in self.output_names)


def trace_to_onnx(module: nn.Module, path: Path, spec: ModelIOSpec, opset: int) -> None:
    """TorchScript-trace ``module`` to ``path`` with the spec's names and dynamic batch dimension.

    Traced with batch 2, so no dimension of size 1 gets specialised into the graph.
    """
    example = sample_input(spec, 2, TRACE_SEED)
    with warnings.catch_warnings(), torch.no_grad():
        # The TorchScript exporter announces its deprecation on every call; tracer warnings stay.
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        torch.onnx.export(
            module,
            (example,),
            str(path),
            dynamo=False,
            opset_version=opset,
            input_names=list(spec.input_names),
            output_names=list(spec.output_names),
            dynamic_axes=spec.dynamic_axes(),
            do_constant_folding=True,
        )


def finalize_graph(path: Path, spec: ModelIOSpec) -> None:
    """Write the spec's shapes into the graph's inputs and outputs, then run the ONNX checker
    (with strict shape inference) and the spec check."""
    model = onnx.load(str(path))
    for value in list(model.graph.input) + list(model.graph.output):
        if value.name in spec.input_names + spec.output_names:
            _set_shape(value, spec.tensor(value.name))
    onnx.checker.check_model(model, full_check=True)
    spec.check_against_onnx(model)
    onnx.save(model, str(path))


def compare_with_onnx_runtime(
    module: nn.Module,
    onnx_path: Path,
    spec: ModelIOSpec,
    batch_sizes: Sequence[int],
    *,
    atol: float = DEFAULT_ATOL,
    rtol: float = DEFAULT_RTOL,
) -> list[Check]:
    """Run ``onnx_path`` in ONNX Runtime and ``module`` in PyTorch on the same fixed-seed inputs for
    each batch size (a final graph's pixels ``p`` are ``p / 255`` in PyTorch). A raw graph's
    ``module`` returns the outputs in spec order; a final graph's (`FinalOutputs`) outputs are
    checked per task by `training.export.checks.task_checks`. Shape mismatches raise
    `ExportMismatch` at once."""
    session = onnxrt.session(onnx_path)
    module.eval()
    checks: list[Check] = []
    for batch in batch_sizes:
        image = sample_input(spec, batch, 1000 + batch)
        got = dict(zip(spec.output_names, session.run(list(spec.output_names), {spec.inputs[0].name: image.numpy()}),
                       strict=True))
        with torch.no_grad():
            if isinstance(module, FinalOutputs):
                raw = {name: t.numpy() for name, t in module.model(model_input(image)).items()}
                for name, task in module.tasks.items():
                    outputs = [o for o in module.outputs if o.task == name]
                    checks += task_checks(task.info(), outputs, got, raw[name], batch, atol=atol, rtol=rtol)
                continue
            expected = [t.numpy() for t in module(image)]
        for tensor, ref in zip(spec.outputs, expected, strict=True):
            check_shape(tensor.name, tensor.concrete_shape(batch), ref.shape, got[tensor.name].shape)
            checks.append(raw_error(tensor.name, batch, ref, got[tensor.name], atol, rtol))
    return checks


def raise_on_mismatch(checks: Sequence[Check], *, atol: float, rtol: float, opset: int) -> None:
    lines = describe_failures(checks, atol=atol, rtol=rtol)
    if not lines:
        return
    raise ExportMismatch(
        "ONNX Runtime disagrees with PyTorch, so nothing was written:\n  " + "\n  ".join(lines) + "\n"
        f"Try another opset (this was {opset}; e.g. {opset - 1} or {opset + 1}); look for Python "
        "control flow on tensor values or batch size in forward (tracing freezes it: see the tracer "
        "warnings) and for ops that differ between the runtimes; loosen atol/rtol only if the "
        "difference is float rounding (relative error near 1e-4, not near 1)."
    )


def _set_shape(value: onnx.ValueInfoProto, tensor) -> None:
    shape = value.type.tensor_type.shape
    shape.ClearField("dim")
    names = tensor.dim_names()
    for i, d in enumerate(tensor.shape):
        dim = shape.dim.add()
        if d == DYNAMIC:
            dim.dim_param = names[i]
        else:
            dim.dim_value = d
