"""Request bytes to model input, model output to typed task results: decode, preprocess, postprocess.

Everything here is protocol-neutral (gRPC and HTTP share it) and refuses bad input with an
`InvalidInput` that says what was wrong and how to fix it. The gateway never resizes: an image
must have exactly the model's input size (a silent resize would change what the model sees and
the geometry of every dense output), so the size is checked from the image header before any
pixel is decoded, as is the pixel limit.

Inputs: PNG or JPEG bytes, or a raw tensor, either ``uint8 [H, W, 3]`` (HWC, as image decoders
return it) or ``float32 [3, H, W]`` (CHW, RGB in [0, 1]; NaN, infinities and values outside
[0, 1] are refused, naming the first such element). Images that are not 8-bit RGB are
converted as Pillow converts them: palette, black-and-white, grayscale and their alpha variants and
RGBA become RGB (alpha dropped, not blended), 16-bit grayscale keeps its high byte (as Pillow reads
16-bit RGB); CMYK JPEGs are refused, since converting them without their colour profile changes
their colours.
What the model gets (`model_input`, `tensor_input`): a graph with a ``uint8 [N, H, W, 3]`` input
gets decoded pixels and uint8 tensors as they are (no conversion here: the graph converts and
normalises), and float32 tensors quantised to 8 bits, ``round(x * 255)`` (exact for images that came
from 8-bit pixels, which is what the model was trained on; a model exported with ``--float-input``
takes float images exactly). A graph with a ``float32 [N, 3, H, W]`` input gets float32 tensors as
they are and 8-bit pixels as ``x / 255``.
Outputs: a final graph's outputs are each task's answer already (`final_result` only turns an
attribute vector into its ``{name: probability}`` map, values untouched); a raw graph's outputs go
through each task's kind (`parsimony.tasks`, `postprocess`), which turns them into the fields of
its answer (a class map, metres, an edge map, ``{name: probability}``...; probability maps only on
request), float maps in float32 or float16, as requested. The codec knows no kind by name.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

from parsimony.tasks import FieldValue
from parsimony.wire import ENCODINGS, OUTPUT_DTYPES, WIRE_DTYPES, sniff_encoding
from serving.server.errors import ImageTooLarge, InvalidInput, UnknownTask, shown
from serving.server.metadata import ModelMetadata, TaskInfo

# modes converted to RGB by Pillow's own convert("RGB") (alpha dropped), and 16-bit grayscale
TO_RGB = ("1", "L", "P", "LA", "PA", "La", "RGBA", "RGBa", "RGBX")
SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I")
INPUT_DTYPES = ("uint8", "float32")  # a raw input tensor: uint8 HWC or float32 CHW


@dataclass(frozen=True, slots=True)
class RawTensor:
    dtype: str
    shape: tuple[int, ...]
    data: bytes


@dataclass(frozen=True, slots=True)
class TaskResult:
    """One task's answer: its kind and the kind's fields (arrays, or ``{name: value}`` maps)."""

    kind: str
    fields: dict[str, FieldValue]


# --- decode -------------------------------------------------------------------------------------


def warm_up() -> None:
    """Load and initialise PIL's image codecs now rather than on the first request (~10 ms)."""
    for fmt in (e.upper() for e in ENCODINGS):
        buf = io.BytesIO()
        Image.new("RGB", (8, 8)).save(buf, fmt)
        Image.open(io.BytesIO(buf.getvalue()), formats=[fmt]).load()


def decode_image(data: bytes, meta: ModelMetadata, max_pixels: int) -> np.ndarray:
    """PNG/JPEG bytes -> ``uint8 [H, W, 3]``, checked against the model's input and the pixel limit."""
    encoding = sniff_encoding(data)
    if encoding is None:
        raise InvalidInput(
            f"the image bytes are neither PNG nor JPEG (they start with {data[:8].hex(' ') or 'nothing'}); "
            f"send the encoded file's bytes unchanged, or a raw tensor"
        )
    fmt = encoding.upper()  # Pillow's format name
    try:
        image = Image.open(io.BytesIO(data), formats=[fmt])
    except Image.DecompressionBombError as exc:
        raise ImageTooLarge(f"the {fmt} image is far over the pixel limit ({exc})") from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise InvalidInput(f"the {fmt} image cannot be decoded ({exc}); the file is corrupt or truncated") from exc
    width, height = image.size
    check_size(height, width, meta.channels, meta, max_pixels, what=f"the {fmt} image")
    mode = image.mode
    if mode != "RGB" and mode not in TO_RGB and mode not in SIXTEEN_BIT:
        hint = (" converting it without its colour profile would change its colours; convert it to RGB with a "
                "colour-managed tool" if mode == "CMYK" else " convert it to 8-bit RGB first")
        raise InvalidInput(f"the {fmt} image has mode {mode}, which the gateway does not convert to RGB:{hint}")
    try:
        image.load()
        if mode in TO_RGB:
            image = image.convert("RGB")
    except (OSError, SyntaxError, ValueError) as exc:
        raise InvalidInput(f"the {fmt} image cannot be decoded ({exc}); the file is corrupt or truncated") from exc
    if mode in SIXTEEN_BIT:
        return _gray16_to_rgb(np.asarray(image), fmt)
    return np.asarray(image)


def _gray16_to_rgb(gray: np.ndarray, fmt: str) -> np.ndarray:
    """16-bit grayscale -> 8-bit RGB keeping the high byte, as Pillow reduces 16-bit RGB PNGs."""
    if gray.size and (gray.min() < 0 or gray.max() > 0xFFFF):
        raise InvalidInput(f"the {fmt} image has 32-bit integer pixels outside 0..65535; send 8-bit RGB")
    eight = (gray.astype(np.uint32) >> 8).astype(np.uint8)
    return np.repeat(eight[..., None], 3, axis=2)


def check_size(height: int, width: int, channels: int, meta: ModelMetadata, max_pixels: int, *, what: str) -> None:
    if height * width > max_pixels:
        raise ImageTooLarge(
            f"{what} has {width}x{height} = {width * height} pixels, over the server's limit of {max_pixels} "
            f"(--max-image-pixels); the model takes {meta.width}x{meta.height}: resize before sending"
        )
    if (height, width) != (meta.height, meta.width):
        raise InvalidInput(
            f"{what} is {width}x{height} (width x height) but model {meta.name!r} takes exactly "
            f"{meta.width}x{meta.height}; resize (or crop) it to that size before sending"
        )
    if channels != meta.channels:
        raise InvalidInput(
            f"{what} has {channels} channel(s) but model {meta.name!r} takes {meta.channels} (RGB); "
            f"convert it to RGB (drop alpha, expand grayscale)"
        )


def tensor_input(tensor: RawTensor, meta: ModelMetadata, max_pixels: int) -> np.ndarray:
    """A raw ``uint8 [H, W, 3]`` or ``float32 [3, H, W]`` tensor -> one image as the model takes it."""
    shape = tuple(int(d) for d in tensor.shape)
    if tensor.dtype not in INPUT_DTYPES or len(shape) != 3:
        raise InvalidInput(
            f"a raw tensor must be uint8 [H, W, 3] (HWC, 0..255) or float32 [3, H, W] (CHW, RGB in [0, 1]); "
            f"got {tensor.dtype} {list(shape)}"
        )
    hwc = tensor.dtype == "uint8"
    height, width, channels = (shape if hwc else (shape[1], shape[2], shape[0]))
    check_size(height, width, channels, meta, max_pixels, what=f"the {tensor.dtype} tensor {list(shape)}")
    dtype = WIRE_DTYPES[tensor.dtype]
    expected = math.prod(shape) * dtype.itemsize
    if len(tensor.data) != expected:
        raise InvalidInput(
            f"the tensor's data has {len(tensor.data)} bytes but {tensor.dtype} {list(shape)} needs {expected}; "
            f"send the array's raw bytes in C order (numpy: array.tobytes())"
        )
    array = np.frombuffer(tensor.data, dtype).reshape(shape)
    if hwc:
        return model_input(array, meta)
    check_unit_range(array)
    return quantise(array) if meta.input_dtype == "uint8" else array


def model_input(hwc: np.ndarray, meta: ModelMetadata) -> np.ndarray:
    """Decoded ``uint8 [H, W, 3]`` pixels as the model takes them: as they are for a uint8 input,
    through `preprocess` for a float32 one."""
    return hwc if meta.input_dtype == "uint8" else preprocess(hwc)


def quantise(chw: np.ndarray) -> np.ndarray:
    """``float32 [3, H, W]`` in [0, 1] -> ``uint8 [H, W, 3]``, ``round(x * 255)`` (half to even): the
    inverse of `preprocess` for every image that came from 8-bit pixels."""
    scaled = np.multiply(chw.transpose(1, 2, 0), np.float32(255))
    return np.rint(scaled, out=scaled).astype(np.uint8)


def check_unit_range(chw: np.ndarray) -> None:
    """Refuse a float image with NaN, an infinity or a value outside [0, 1], naming the first one."""
    inside = (chw >= 0) & (chw <= 1)  # False for NaN
    if inside.all():
        return
    index = np.unravel_index(int(np.argmin(inside)), chw.shape)
    raise InvalidInput(
        f"the float32 tensor's element {[int(i) for i in index]} (channel, row, column) is "
        f"{float(chw[index]):.7g}; float32 inputs must be finite RGB values in [0, 1]: divide 8-bit pixels by "
        f"255, or send them as a uint8 [H, W, 3] tensor"
    )


def preprocess(hwc: np.ndarray) -> np.ndarray:
    """``uint8 [H, W, 3]`` -> ``float32 [3, H, W]`` in [0, 1] (x / 255, as training's to_tensor does);
    the mean/std normalisation is inside the graph."""
    chw = np.ascontiguousarray(hwc.transpose(2, 0, 1))  # reorder the bytes first: ~25 % faster than
    out = np.empty(chw.shape, np.float32)  # dividing through the transposed view
    np.divide(chw, np.float32(255), out=out, casting="unsafe")
    return out


# --- request options ----------------------------------------------------------------------------


def select_tasks(meta: ModelMetadata, names: tuple[str, ...] | list[str]) -> tuple[TaskInfo, ...]:
    """The requested tasks in model order (all of them when ``names`` is empty)."""
    if not names:
        return meta.tasks
    unknown = [n for n in names if n not in meta.task_names]
    if unknown:
        raise UnknownTask(f"model {meta.name!r} has no task {shown(unknown[0])}; its tasks are {list(meta.task_names)}")
    return tuple(t for t in meta.tasks if t.name in names)


def output_dtype(name: str) -> np.dtype:
    if name not in OUTPUT_DTYPES:
        raise InvalidInput(f"output dtype {shown(name)} is not supported; choose one of {list(OUTPUT_DTYPES)}")
    return WIRE_DTYPES[name]


# --- postprocess --------------------------------------------------------------------------------


def postprocess(task: TaskInfo, raw: np.ndarray, dtype: np.dtype, probabilities: bool) -> TaskResult:
    """One image's raw output of ``task`` (no batch dimension) -> its answer, as its kind computes it."""
    return TaskResult(task.kind, task.owner.postprocess(task, raw, dtype, probabilities))


def final_result(task: TaskInfo, fields: dict[str, np.ndarray]) -> TaskResult:
    """One image's outputs of a final graph for ``task`` (``{field: array}``, no batch dimension) -> its
    answer: tensors as they are, a map field's vector as ``{name: value}`` (the same float32 values)."""
    owner = task.owner
    out: dict[str, FieldValue] = {}
    for name, value in fields.items():
        if owner.field(name).what == "map":
            labels = task.labels or tuple(str(i) for i in range(value.shape[0]))
            out[name] = dict(zip(labels, value.tolist(), strict=True))
        else:
            out[name] = value
    return TaskResult(task.kind, out)
