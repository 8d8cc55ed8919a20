"""The export's self-check rules: each output of the graph against its reference, per batch size.

Raw outputs (a raw graph's outputs; a final graph's ``TASK_raw``) are compared with the PyTorch
model's outputs on the same images (uint8 pixels ``p`` in the graph, ``p / 255`` in PyTorch):
``max|ort - torch| <= atol + rtol * max|torch|`` (why these bounds: `training.export.onnx_export`).

A final graph's answer fields are compared with the contract's numpy post-processing
(`parsimony.tasks.Kind.postprocess`, what the gateway computed in Python before the graph did) of
two raw outputs: PyTorch's (what the model computes) and ONNX Runtime's own ``TASK_raw`` from the
same run (which isolates the graph's post-processing from the forward pass's rounding).

- Float32 fields: ``max|graph - ref(ORT raw)| <= 1e-6 + 1e-5 * scale`` and ``max|graph -
  ref(torch raw)| <= 1e-6 + 1e-5 * scale + delta``, with ``scale = max|ref(torch raw)|`` and
  ``delta`` the raw output's measured ``max|ort - torch|``. Every post-processing here is 1-Lipschitz in the max norm (clamp
  and identity: 1; softmax: 1/2, as ``|dp_i| <= 2 p_i (1 - p_i) max|dz|``; sigmoid: 1/4), so the
  raw outputs' disagreement moves a field by at most ``delta``; what is left is the post-processing's
  own float32 rounding (exp, division: a few ulps, 1e-7 of the values), which 1e-5 of the scale
  covers a hundredfold while a wrong op (a softmax over the wrong axis, a missing clamp, a sigmoid
  where a softmax belongs) is off by 1e-2 of the scale or more. The absolute floor 1e-6 is for
  probabilities near 0: ONNX Runtime's Sigmoid is an approximation good to 1.7e-7 in absolute
  terms (measured over [-40, 40] in float32) but not relatively near 0 (a probability of 1e-7 may
  come out several times too large), so a field whose largest value is tiny (every attribute of an
  image unlikely) would fail the relative rule alone; a millionth of a probability is invisible to
  every consumer (float16 resolves 5e-4 near 1).
- Float16 copies: each rounding to float16 moves a value by at most half an ulp (``2^-11 |x|``,
  ``2^-25`` in the subnormal range), and the graph's and the reference's float32 values differ by
  the float32 rule's bound ``B``, so ``|graph16 - ref16| <= 2^-10 |ref32| + 2^-24 + B (1 + 2^-11)``:
  the error beyond ``2^-10 |ref32| + 2^-24`` must stay within ``B (1 + 2^-11)``. Values beyond
  float16's range are infinite in both (equal); one finite and one not fails.
- Discrete fields (class maps, edge maps): equal to ref(ORT raw) at every element, so the graph
  decides as the reference does (ArgMax takes the first maximum like numpy's argmax; an edge is a
  logit >= 0). Against ref(torch raw) they may differ only where the two raw outputs, which agree
  within their bound, order the top two logits (or the edge logit and 0) differently: near ties
  within the forward pass's rounding. Those are counted and may be at most 1e-3 of the elements; on
  random inputs of the models here they are none or a handful.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from parsimony.tasks import RAW, GraphOutput, TaskInfo

FINAL_RTOL = 1e-5  # float fields: the graph's post-processing within this fraction of the output's scale
FINAL_ATOL = 1e-6  # ... plus this, for fields whose values are all near 0 (see the module doc)
FLIP_FRACTION = 1e-3  # discrete fields: at most this fraction of elements may flip at near ties
FP16_REL, FP16_ABS = 2.0**-10, 2.0**-24  # two float16 roundings: two half-ulps, relative and subnormal
FP16_GROWTH = 1 + 2.0**-11  # a float32 disagreement B grows by at most this through rounding to float16


class ExportMismatch(ValueError):
    """ONNX Runtime disagrees with PyTorch on an exported graph; nothing was written."""


@dataclass(frozen=True)
class OutputError:
    """Agreement of one float output at one batch size. ``rule`` ``raw``: against PyTorch's output;
    ``float32``/``float16`` (final fields): ``max_abs_error`` against the reference on PyTorch's
    raw output and ``own_error`` against the reference on ONNX Runtime's own raw output (float16:
    the error beyond float16 rounding, see the module doc)."""

    name: str
    batch_size: int
    max_abs_error: float
    scale: float  # max |reference|
    bound: float
    rule: str = "raw"
    own_error: float = 0.0
    own_bound: float = float("inf")

    @property
    def max_rel_error(self) -> float:
        """Max absolute error relative to the output's scale (not element-wise)."""
        return self.max_abs_error / self.scale if self.scale > 0 else self.max_abs_error

    @property
    def passed(self) -> bool:
        finite = bool(np.isfinite(self.max_abs_error)) and bool(np.isfinite(self.own_error))
        return finite and self.max_abs_error <= self.bound and self.own_error <= self.own_bound


@dataclass(frozen=True)
class ExactCheck:
    """Agreement of one discrete output (class map, edge map) at one batch size: ``wrong``
    elements differ from the reference on ONNX Runtime's own raw output (must be none), ``flipped``
    ones from the reference on PyTorch's (near ties, at most `FLIP_FRACTION` of ``elements``)."""

    name: str
    batch_size: int
    elements: int
    wrong: int
    flipped: int

    @property
    def allowed(self) -> int:
        return int(FLIP_FRACTION * self.elements)

    @property
    def passed(self) -> bool:
        return self.wrong == 0 and self.flipped <= self.allowed


Check = OutputError | ExactCheck


def raw_error(name: str, batch: int, ref: np.ndarray, out: np.ndarray, atol: float, rtol: float) -> OutputError:
    """The raw rule: ``max|out - ref| <= atol + rtol * max|ref|``."""
    scale = _scale(ref)
    return OutputError(name, batch, _max_abs(out, ref), scale, atol + rtol * scale)


def check_shape(name: str, declared: tuple[int, ...], torch_shape: tuple, ort_shape: tuple) -> None:
    if tuple(torch_shape) != declared or tuple(ort_shape) != declared:
        raise ExportMismatch(
            f"output {name!r}: spec declares shape {declared}, PyTorch returned {tuple(torch_shape)} and "
            f"ONNX Runtime {tuple(ort_shape)}; the model config and the exported module disagree"
        )


def task_checks(task: TaskInfo, outputs: Sequence[GraphOutput], got: dict[str, np.ndarray], raw: np.ndarray,
                batch: int, *, atol: float, rtol: float) -> list[Check]:
    """Every output of ``task`` in a final graph at one batch size: ``got`` holds ONNX Runtime's
    outputs by name, ``raw`` PyTorch's raw output for the same images."""
    (raw_out,) = [o for o in outputs if o.field == RAW]
    own_raw = got[raw_out.name]
    check_shape(raw_out.name, _concrete(raw_out, batch), raw.shape, own_raw.shape)
    checks: list[Check] = [raw_error(raw_out.name, batch, raw, own_raw, atol, rtol)]
    delta = checks[0].max_abs_error
    ref, own = reference_fields(task, raw), reference_fields(task, own_raw)
    for out in outputs:
        if out.field == RAW:
            continue
        value = got[out.name]
        check_shape(out.name, _concrete(out, batch), ref[out.field].shape, value.shape)
        if out.dtype == "float32":
            checks.append(_float_error(out.name, batch, value, ref[out.field], own[out.field], delta))
        elif out.dtype == "float16":
            checks.append(_fp16_error(out.name, batch, value, ref[out.field], own[out.field], delta))
        else:
            checks.append(ExactCheck(out.name, batch, value.size, int(np.count_nonzero(value != own[out.field])),
                                     int(np.count_nonzero(value != ref[out.field]))))
    return checks


def reference_fields(task: TaskInfo, raw: np.ndarray) -> dict[str, np.ndarray]:
    """The contract's post-processing of a batch of raw outputs, per field stacked over the batch
    (float fields in float32; ``{name: value}`` maps as vectors in the map's order)."""
    owner = task.owner
    answers = [owner.postprocess(task, image, np.float32, True) for image in raw]
    return {f: np.stack([_array(a[f]) for a in answers]) for f in owner.field_names}


def describe_failures(checks: Sequence[Check], *, atol: float, rtol: float) -> list[str]:
    """One line per failed check, saying what the bound was."""
    lines = []
    for c in checks:
        if c.passed:
            continue
        if isinstance(c, ExactCheck):
            lines.append(f"output {c.name!r} at batch size {c.batch_size}: {c.wrong} element(s) differ from the "
                         f"reference post-processing of ONNX Runtime's own raw output (must be 0), {c.flipped} of "
                         f"{c.elements} from that of PyTorch's (near ties; at most {c.allowed})")
        elif c.rule == "raw":
            lines.append(f"output {c.name!r} at batch size {c.batch_size}: max |ort - torch| = {c.max_abs_error:.3g} "
                         f"> bound {c.bound:.3g} (atol {atol:g} + rtol {rtol:g} x output scale {c.scale:.3g})")
        else:
            beyond = " beyond float16 rounding" if c.rule == "float16" else ""
            lines.append(f"output {c.name!r} at batch size {c.batch_size}: error{beyond} against the reference "
                         f"post-processing {c.max_abs_error:.3g} (bound {c.bound:.3g}: {FINAL_ATOL:g} + {FINAL_RTOL:g} x "
                         f"output scale {c.scale:.3g} + the raw output's error), {c.own_error:.3g} on ONNX Runtime's own raw "
                         f"output (bound {c.own_bound:.3g})")
    return lines


def _float_error(name: str, batch: int, out: np.ndarray, ref: np.ndarray, own: np.ndarray,
                 delta: float) -> OutputError:
    scale = _scale(ref)
    own_bound = FINAL_ATOL + FINAL_RTOL * scale
    return OutputError(name, batch, _max_abs(out, ref), scale, own_bound + delta, "float32", _max_abs(out, own),
                       own_bound)


def _fp16_error(name: str, batch: int, out: np.ndarray, ref: np.ndarray, own: np.ndarray,
                delta: float) -> OutputError:
    scale = _scale(ref)
    own_bound = FINAL_ATOL + FINAL_RTOL * scale
    return OutputError(name, batch, _beyond_fp16(out, ref), scale, (own_bound + delta) * FP16_GROWTH, "float16",
                       _beyond_fp16(out, own), own_bound * FP16_GROWTH)


def _beyond_fp16(out: np.ndarray, ref32: np.ndarray) -> float:
    """``max(|out - fp16(ref32)| - 2^-10 |ref32| - 2^-24)``, at least 0; equal values (infinities
    included) count 0, an infinity against a finite value infinity."""
    out64, ref16 = out.astype(np.float64), ref32.astype(np.float16).astype(np.float64)
    with np.errstate(invalid="ignore"):
        diff = np.where(out64 == ref16, 0.0, np.abs(out64 - ref16))
    if np.isnan(diff).any() or np.isnan(ref32).any():
        return float("inf")
    excess = diff - FP16_REL * np.abs(ref32.astype(np.float64)) - FP16_ABS
    return max(float(excess.max(initial=0.0)), 0.0)


def _max_abs(out: np.ndarray, ref: np.ndarray) -> float:
    out64, ref64 = out.astype(np.float64), ref.astype(np.float64)
    if not (np.isfinite(out64).all() and np.isfinite(ref64).all()):
        return float("inf")
    return float(np.abs(out64 - ref64).max(initial=0.0))


def _scale(ref: np.ndarray) -> float:
    ref64 = ref.astype(np.float64)
    return float(np.abs(ref64).max(initial=0.0)) if np.isfinite(ref64).all() else float("inf")


def _array(value) -> np.ndarray:
    return np.asarray(list(value.values()), np.float64) if isinstance(value, dict) else np.asarray(value)


def _concrete(out: GraphOutput, batch: int) -> tuple[int, ...]:
    return (batch, *out.shape[1:])
