"""ONNX export that checks itself: spec-named graph, ONNX checker, spec check, ONNX Runtime vs PyTorch.

`export_onnx` traces a float32 CPU copy of the model in eval mode with the TorchScript exporter
(``dynamo=False``: it needs no onnxscript and behaves the same on torch 2.9 to 2.14), names every
tensor from the `ModelIOSpec`, makes the batch dimension dynamic and writes the spec's fixed dims
into the graph outputs (the tracer leaves the dims of upsampled maps symbolic). The graph is written
to a temporary file next to ``path`` and renamed into place only after every check passed, so a
failed export leaves nothing at ``path``.

Tolerance. Output ``o`` agrees when ``max|ort - torch| <= atol + rtol * scale`` with
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

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import Tensor, nn

from parsimony import onnxrt
from parsimony.io import staged
from parsimony.spec import DYNAMIC, ModelIOSpec
from training.export.spec import io_spec

log = logging.getLogger(__name__)

DEFAULT_OPSET = 17
DEFAULT_ATOL = 1e-3
DEFAULT_RTOL = 1e-4
TOLERANCE_RULE = "max|ort - torch| <= atol + rtol * max|torch|, per output and batch size"
TRACE_SEED = 0  # the traced input; each checked batch size b uses seed 1000 + b (never the traced input)


class ExportMismatch(ValueError):
    """ONNX Runtime disagrees with PyTorch on an exported graph; nothing was written."""


@dataclass(frozen=True)
class OutputError:
    """Agreement of one output at one batch size."""

    name: str
    batch_size: int
    max_abs_error: float
    scale: float  # max |PyTorch output|
    bound: float

    @property
    def max_rel_error(self) -> float:
        """Max absolute error relative to the output's scale (not element-wise)."""
        return self.max_abs_error / self.scale if self.scale > 0 else self.max_abs_error

    @property
    def passed(self) -> bool:
        return bool(np.isfinite(self.max_abs_error)) and self.max_abs_error <= self.bound


@dataclass(frozen=True)
class ExportReport:
    path: Path
    io_spec: ModelIOSpec
    opset: int
    atol: float
    rtol: float
    checks: tuple[OutputError, ...]
    export_seconds: float
    verify_seconds: float

    @property
    def batch_sizes(self) -> tuple[int, ...]:
        return tuple(sorted({c.batch_size for c in self.checks}))

    def max_abs_error(self) -> dict[str, float]:
        """Per output, the largest absolute error over the checked batch sizes."""
        return {
            n: max(c.max_abs_error for c in self.checks if c.name == n) for n in self.io_spec.output_names
        }

    def max_rel_error(self) -> dict[str, float]:
        return {
            n: max(c.max_rel_error for c in self.checks if c.name == n) for n in self.io_spec.output_names
        }

    def to_dict(self) -> dict:
        """The manifest's ``export`` section (JSON-ready)."""
        return {
            "file": self.path.name,
            "opset": self.opset,
            "exporter": f"torch.onnx.export (TorchScript, dynamo=False), torch {torch.__version__}",
            "check": {
                "runtime": f"onnxruntime {ort.__version__} CPUExecutionProvider",
                "batch_sizes": list(self.batch_sizes),
                "input": "uniform [0, 1) images, fixed seeds",
                "atol": self.atol,
                "rtol": self.rtol,
                "rule": TOLERANCE_RULE,
            },
            "max_abs_error": self.max_abs_error(),
            "max_rel_error": self.max_rel_error(),
        }


def export_onnx(
    model: nn.Module,
    path: str | Path,
    *,
    image_size: tuple[int, int],
    opset: int = DEFAULT_OPSET,
    atol: float = DEFAULT_ATOL,
    rtol: float = DEFAULT_RTOL,
    check_batch_sizes: Sequence[int] = (1, 2),
) -> ExportReport:
    """Export ``model`` (a `MultiTaskModel`, or any module with a ``config`` returning a dict of
    task outputs) to ``path`` at ``image_size`` (H, W) and verify it; see the module doc.

    Raises `ExportMismatch` when ONNX Runtime and PyTorch disagree beyond the bound, and
    ``SpecMismatch`` / ``onnx.checker.ValidationError`` when the graph is malformed; in every
    failure nothing is written at ``path``. The caller's model is not modified.
    """
    if not check_batch_sizes or min(check_batch_sizes) < 1:
        raise ValueError(f"check_batch_sizes must list positive batch sizes, got {check_batch_sizes!r}")
    if atol < 0 or rtol < 0:
        raise ValueError(f"atol and rtol must be non-negative, got {atol}, {rtol}")
    spec = io_spec(model.config, image_size)
    module = SpecOutputs(model, spec.output_names)
    path = Path(path)
    with staged(path) as tmp:
        start = time.perf_counter()
        trace_to_onnx(module, tmp, spec, opset)
        finalize_graph(tmp, spec)
        exported = time.perf_counter()
        checks = compare_with_onnx_runtime(module, tmp, spec, check_batch_sizes, atol=atol, rtol=rtol)
        raise_on_mismatch(checks, atol=atol, rtol=rtol, opset=opset)
        verified = time.perf_counter()
    report = ExportReport(path, spec, opset, atol, rtol, tuple(checks), exported - start, verified - exported)
    log.info(
        "exported %s (opset %d) in %.1f s, verified in %.1f s; max rel error %s",
        path,
        opset,
        report.export_seconds,
        report.verify_seconds,
        {k: f"{v:.2g}" for k, v in report.max_rel_error().items()},
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


def sample_input(spec: ModelIOSpec, batch: int, seed: int) -> Tensor:
    """A fixed-seed image batch in [0, 1), the input's domain."""
    (image,) = spec.inputs
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(image.concrete_shape(batch), generator=generator, dtype=torch.float32)


def trace_to_onnx(module: SpecOutputs, path: Path, spec: ModelIOSpec, opset: int) -> None:
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
) -> list[OutputError]:
    """Run ``onnx_path`` in ONNX Runtime and ``module`` (tuple outputs in spec order) on the same
    fixed-seed images for each batch size; shape mismatches raise `ExportMismatch` at once."""
    session = onnxrt.session(onnx_path)
    module.eval()
    checks = []
    for batch in batch_sizes:
        image = sample_input(spec, batch, 1000 + batch)
        with torch.no_grad():
            expected = [t.numpy() for t in module(image)]
        got = session.run(list(spec.output_names), {spec.inputs[0].name: image.numpy()})
        for tensor, ref, out in zip(spec.outputs, expected, got, strict=True):
            _check_shape(tensor.name, tensor.concrete_shape(batch), ref.shape, out.shape)
            checks.append(_output_error(tensor.name, batch, ref, out, atol, rtol))
    return checks


def raise_on_mismatch(checks: Sequence[OutputError], *, atol: float, rtol: float, opset: int) -> None:
    failed = [c for c in checks if not c.passed]
    if not failed:
        return
    lines = [
        f"output {c.name!r} at batch size {c.batch_size}: max |ort - torch| = {c.max_abs_error:.3g} "
        f"> bound {c.bound:.3g} (atol {atol:g} + rtol {rtol:g} x output scale {c.scale:.3g})"
        for c in failed
    ]
    raise ExportMismatch(
        "ONNX Runtime disagrees with PyTorch, so nothing was written:\n  " + "\n  ".join(lines) + "\n"
        f"Try another opset (this was {opset}; e.g. {opset - 1} or {opset + 1}); look for Python "
        "control flow on tensor values or batch size in forward (tracing freezes it: see the tracer "
        "warnings) and for ops that differ between the runtimes; loosen atol/rtol only if the "
        "difference is float rounding (relative error near 1e-4, not near 1)."
    )


def _output_error(
    name: str, batch: int, ref: np.ndarray, out: np.ndarray, atol: float, rtol: float
) -> OutputError:
    ref64, out64 = ref.astype(np.float64), out.astype(np.float64)
    finite = np.isfinite(ref64).all() and np.isfinite(out64).all()
    max_abs = float(np.abs(out64 - ref64).max()) if finite else float("inf")
    scale = float(np.abs(ref64).max()) if np.isfinite(ref64).all() else float("inf")
    return OutputError(name, batch, max_abs, scale, atol + rtol * scale)


def _check_shape(name: str, declared: tuple[int, ...], torch_shape: tuple, ort_shape: tuple) -> None:
    if tuple(torch_shape) != declared or tuple(ort_shape) != declared:
        raise ExportMismatch(
            f"output {name!r}: spec declares shape {declared}, PyTorch returned {tuple(torch_shape)} and "
            f"ONNX Runtime {tuple(ort_shape)}; the model config and the exported module disagree"
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
