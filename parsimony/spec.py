"""The tensor spec of an exported model: the single source of input/output names, dtypes, shapes.

The training side derives it from a model's tasks (`parsimony.tasks.final_io_spec` for a graph
that returns final answers, `parsimony.tasks.model_io_spec` for a raw one: each task kind says what
its outputs are); the ONNX export names and shapes the graph from it and checks the written graph
against it (`ModelIOSpec.check_against_onnx`), the manifest records it, and the Triton
``config.pbtxt`` generator maps it field by field (``DTYPES`` holds the ONNX and Triton type
names). The input is ``image``: uint8 ``[-1, H, W, 3]`` pixels in a final graph (or float32
``[-1, 3, H, W]`` in [0, 1]: the float-input variant and raw graphs), converted and normalised
inside the graph (`image_input_spec`); ``-1`` is the dynamic batch dimension, named ``batch`` in
the graph. Outputs are named after their tasks (`parsimony.tasks.graph_output_name`). Every name
must match ``[A-Za-z_][A-Za-z0-9_]*`` so it is valid in ONNX, as a Triton tensor name and as a
Python identifier.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from parsimony.errors import InputFileError, SpecError, SpecMismatch

if TYPE_CHECKING:
    import onnx

INPUT_NAME = "image"
BATCH_DIM = "batch"  # name of the dynamic batch dimension in the ONNX graph
DYNAMIC = -1
NAME_PATTERN = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass(frozen=True)
class DType:
    """One element type in every vocabulary that needs it."""

    numpy: type
    onnx: int  # onnx.TensorProto element type (the enum's stable values, so onnx is not imported)
    triton: str  # Triton config.pbtxt data_type


DTYPES: dict[str, DType] = {
    "float32": DType(np.float32, 1, "TYPE_FP32"),
    "float16": DType(np.float16, 10, "TYPE_FP16"),
    "int64": DType(np.int64, 7, "TYPE_INT64"),
    "int32": DType(np.int32, 6, "TYPE_INT32"),
    "uint8": DType(np.uint8, 2, "TYPE_UINT8"),
    "bool": DType(np.bool_, 9, "TYPE_BOOL"),
}


def validate_name(name: str, what: str = "tensor") -> str:
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise SpecError(
            f"{what} name {name!r} is not valid for ONNX and Triton: use letters, digits and '_' and do "
            f"not start with a digit (pattern {NAME_PATTERN.pattern}); rename the task in the data set's "
            f"task list or the model config"
        )
    return name


@dataclass(frozen=True)
class TensorSpec:
    """Name, dtype (a key of ``DTYPES``) and shape (``-1`` marks a dynamic dimension)."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    def __post_init__(self) -> None:
        validate_name(self.name)
        if self.dtype not in DTYPES:
            raise SpecError(
                f"tensor {self.name!r}: unknown dtype {self.dtype!r}; choose one of {sorted(DTYPES)}"
            )
        shape = tuple(self.shape)
        if any(isinstance(d, bool) or not isinstance(d, (int, np.integer)) for d in shape):
            raise SpecError(f"tensor {self.name!r}: shape {self.shape!r} must be a tuple of ints")
        if any(d < 1 and d != DYNAMIC for d in shape):
            raise SpecError(
                f"tensor {self.name!r}: dims must be positive or {DYNAMIC} (dynamic), got {shape}"
            )
        object.__setattr__(self, "shape", tuple(int(d) for d in shape))

    @property
    def rank(self) -> int:
        return len(self.shape)

    @property
    def element_type(self) -> DType:
        return DTYPES[self.dtype]

    def dim_names(self) -> dict[int, str]:
        """Names of the dynamic dims, as ``torch.onnx.export(dynamic_axes=...)`` takes them."""
        return {
            i: BATCH_DIM if i == 0 else f"{self.name}_dim{i}"
            for i, d in enumerate(self.shape)
            if d == DYNAMIC
        }

    def concrete_shape(self, batch: int) -> tuple[int, ...]:
        """The shape with the batch dimension (dim 0, when dynamic) set to ``batch``."""
        return tuple(batch if (i == 0 and d == DYNAMIC) else d for i, d in enumerate(self.shape))

    def to_dict(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_dict(cls, d: dict) -> TensorSpec:
        return cls(name=d["name"], dtype=d["dtype"], shape=tuple(d["shape"]))


@dataclass(frozen=True)
class ModelIOSpec:
    """All inputs and outputs of an exported model, in graph order; names are unique."""

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "inputs", tuple(self.inputs))
        object.__setattr__(self, "outputs", tuple(self.outputs))
        if not self.inputs or not self.outputs:
            raise SpecError("a model spec needs at least one input and one output")
        names = [t.name for t in self.inputs + self.outputs]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise SpecError(
                f"tensor names {dupes} are used twice; inputs and outputs share one namespace "
                f"(a task cannot be called {INPUT_NAME!r})"
            )

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.inputs)

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.outputs)

    def tensor(self, name: str) -> TensorSpec:
        for t in self.inputs + self.outputs:
            if t.name == name:
                return t
        raise KeyError(f"no tensor {name!r} in the spec; it has {list(self.input_names + self.output_names)}")

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        return {t.name: t.dim_names() for t in self.inputs + self.outputs if t.dim_names()}

    def to_dict(self) -> dict:
        return {"inputs": [t.to_dict() for t in self.inputs], "outputs": [t.to_dict() for t in self.outputs]}

    @classmethod
    def from_dict(cls, d: dict) -> ModelIOSpec:
        try:
            return cls(
                inputs=tuple(TensorSpec.from_dict(t) for t in d["inputs"]),
                outputs=tuple(TensorSpec.from_dict(t) for t in d["outputs"]),
            )
        except (KeyError, TypeError) as exc:
            raise SpecError(
                f"malformed io spec {d!r}: {exc!r}; expected inputs/outputs lists of {{name, dtype, shape}}"
            ) from exc

    def check_against_onnx(self, onnx_model: onnx.ModelProto | str | Path) -> None:
        """Raise `SpecMismatch` unless the graph's inputs and outputs have exactly the spec's names,
        element types, ranks and dims (a spec's ``-1`` must be a dynamic dim in the graph, a fixed
        dim the same fixed value). Order is not compared: serving addresses tensors by name."""
        model = load_onnx(onnx_model) if isinstance(onnx_model, (str, Path)) else onnx_model
        initializers = {i.name for i in model.graph.initializer}
        graph_inputs = [v for v in model.graph.input if v.name not in initializers]
        problems = _compare("input", self.inputs, graph_inputs) + _compare(
            "output", self.outputs, model.graph.output
        )
        if problems:
            raise SpecMismatch("ONNX graph does not match the tensor spec:\n  " + "\n  ".join(problems))


def load_onnx(path: str | Path) -> onnx.ModelProto:
    """An ONNX file, refused with an `InputFileError` naming it when it is missing or not ONNX
    (needs the onnx package: the serve and train extras)."""
    import onnx

    path = Path(path)
    if not path.is_file():
        raise InputFileError(f"{path}: ONNX model not found")
    try:
        return onnx.load(str(path))
    except Exception as exc:  # protobuf's DecodeError and onnx's own errors: a truncated or corrupt file
        raise InputFileError(f"{path}: not a readable ONNX model ({type(exc).__name__}: {exc})") from None


def image_spec(channels: int, image_size: tuple[int, int]) -> TensorSpec:
    """The graph's ``image`` input: float32 ``[-1, channels, H, W]``, RGB in [0, 1]."""
    h, w = check_image_size(image_size)
    return TensorSpec(INPUT_NAME, "float32", (DYNAMIC, int(channels), h, w))


INPUT_DTYPES = ("uint8", "float32")  # what a final graph's image input may be (see `image_input_spec`)


def image_input_spec(channels: int, image_size: tuple[int, int], dtype: str) -> TensorSpec:
    """The image input of a graph that converts and normalises inside: ``uint8 [-1, H, W, C]``
    (pixels as image decoders return them) or ``float32 [-1, C, H, W]`` (RGB in [0, 1])."""
    if dtype not in INPUT_DTYPES:
        raise SpecError(f"image input dtype {dtype!r} is not supported; choose one of {list(INPUT_DTYPES)}")
    if dtype == "float32":
        return image_spec(channels, image_size)
    h, w = check_image_size(image_size)
    return TensorSpec(INPUT_NAME, "uint8", (DYNAMIC, h, w, int(channels)))


def check_image_size(image_size: tuple[int, int]) -> tuple[int, int]:
    size = tuple(image_size)
    if len(size) != 2 or any(
        isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s < 1 for s in size
    ):
        raise SpecError(f"image_size must be (height, width) with positive ints, got {image_size!r}")
    return int(size[0]), int(size[1])


def _compare(role: str, specs: tuple[TensorSpec, ...], values) -> list[str]:
    by_name = {v.name: v for v in values}
    problems = []
    missing = [t.name for t in specs if t.name not in by_name]
    extra = sorted(set(by_name) - {t.name for t in specs})
    if missing:
        problems.append(f"{role}s {missing} are in the spec but not in the graph")
    if extra:
        problems.append(f"graph {role}s {extra} are not in the spec (graph has {sorted(by_name)})")
    for t in specs:
        if t.name in by_name:
            problems += _compare_one(role, t, by_name[t.name].type.tensor_type)
    return problems


def _compare_one(role: str, spec: TensorSpec, tensor_type) -> list[str]:
    import onnx

    where = f"{role} {spec.name!r}"
    problems = []
    if tensor_type.elem_type != spec.element_type.onnx:
        got = onnx.TensorProto.DataType.Name(tensor_type.elem_type)
        want = onnx.TensorProto.DataType.Name(spec.element_type.onnx)
        problems.append(f"{where}: element type {got}, spec says {want} ({spec.dtype})")
    if not tensor_type.HasField("shape"):
        return problems + [f"{where}: graph declares no shape, spec says {list(spec.shape)}"]
    dims = list(tensor_type.shape.dim)
    if len(dims) != spec.rank:
        return problems + [f"{where}: rank {len(dims)}, spec says {spec.rank} {list(spec.shape)}"]
    for i, (dim, want) in enumerate(zip(dims, spec.shape, strict=True)):
        fixed = dim.dim_value if dim.HasField("dim_value") else None
        if want == DYNAMIC and fixed is not None:
            problems.append(f"{where}: dim {i} is fixed to {fixed}, spec says dynamic")
        elif want != DYNAMIC and fixed != want:
            shown = fixed if fixed is not None else f"dynamic ({dim.dim_param or 'unnamed'})"
            problems.append(f"{where}: dim {i} is {shown}, spec says {want}")
    return problems
