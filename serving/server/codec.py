"""Request bytes to model input, model output to typed task results: decode, preprocess, postprocess.

Everything here is protocol-neutral (gRPC and HTTP share it) and refuses bad input with an
`InvalidInput` that says what was wrong and how to fix it. The gateway never resizes: an image
must have exactly the model's input size (a silent resize would change what the model sees and
the geometry of every dense output), so the size is checked from the image header before any
pixel is decoded, as is the pixel limit.

Inputs: PNG or JPEG bytes, or a raw tensor, either ``uint8 [H, W, 3]`` (HWC, as image decoders
return it) or ``float32 [3, H, W]`` (CHW, RGB in [0, 1], what the graph takes; NaN, infinities and
values outside [0, 1] are refused, naming the first such element). Images that are not 8-bit RGB are
converted as Pillow converts them: palette, black-and-white, grayscale and their alpha variants and
RGBA become RGB (alpha dropped, not blended), 16-bit grayscale keeps its high byte (as Pillow reads
16-bit RGB); CMYK JPEGs are refused, since converting them without their colour profile changes
their colours.
Outputs per task kind: segmentation -> class-index map ``[H, W]`` (+ softmax probabilities
``[C, H, W]`` on request); depth -> ``[H, W]`` metres clamped at 0; normal -> ``[3, H, W]``;
attributes -> name -> sigmoid probability. Float maps in float32 or float16, as requested.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

from serving.server.errors import ImageTooLarge, InvalidInput, UnknownTask, shown
from serving.server.metadata import ModelMetadata, TaskInfo

# dtype names shared by the proto enum, the JSON API and numpy (little-endian on the wire)
DTYPES: dict[str, np.dtype] = {
    "float32": np.dtype("<f4"),
    "float16": np.dtype("<f2"),
    "uint8": np.dtype("u1"),
    "int32": np.dtype("<i4"),
}
OUTPUT_DTYPES = ("float32", "float16")
_MAGIC = {b"\x89PNG\r\n\x1a\n": "PNG", b"\xff\xd8\xff": "JPEG"}
# modes converted to RGB by Pillow's own convert("RGB") (alpha dropped), and 16-bit grayscale
TO_RGB = ("1", "L", "P", "LA", "PA", "La", "RGBA", "RGBa", "RGBX")
SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I")


@dataclass(frozen=True, slots=True)
class RawTensor:
    dtype: str
    shape: tuple[int, ...]
    data: bytes


@dataclass(frozen=True, slots=True)
class SegmentationOutput:
    class_map: np.ndarray
    probabilities: np.ndarray | None = None


@dataclass(frozen=True, slots=True)
class DepthOutput:
    depth: np.ndarray


@dataclass(frozen=True, slots=True)
class NormalOutput:
    normal: np.ndarray


@dataclass(frozen=True, slots=True)
class AttributesOutput:
    probabilities: dict[str, float]


TaskOutput = SegmentationOutput | DepthOutput | NormalOutput | AttributesOutput


# --- decode -------------------------------------------------------------------------------------


def warm_up() -> None:
    """Load and initialise PIL's PNG and JPEG codecs now rather than on the first request (~10 ms)."""
    for fmt in ("PNG", "JPEG"):
        buf = io.BytesIO()
        Image.new("RGB", (8, 8)).save(buf, fmt)
        Image.open(io.BytesIO(buf.getvalue()), formats=[fmt]).load()


def decode_image(data: bytes, meta: ModelMetadata, max_pixels: int) -> np.ndarray:
    """PNG/JPEG bytes -> ``uint8 [H, W, 3]``, checked against the model's input and the pixel limit."""
    fmt = next((f for magic, f in _MAGIC.items() if data.startswith(magic)), None)
    if fmt is None:
        raise InvalidInput(
            f"the image bytes are neither PNG nor JPEG (they start with {data[:8].hex(' ') or 'nothing'}); "
            f"send the encoded file's bytes unchanged, or a raw tensor"
        )
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
    """A raw ``uint8 [H, W, 3]`` or ``float32 [3, H, W]`` tensor -> the model's ``float32 [3, H, W]``."""
    shape = tuple(int(d) for d in tensor.shape)
    if tensor.dtype not in ("uint8", "float32") or len(shape) != 3:
        raise InvalidInput(
            f"a raw tensor must be uint8 [H, W, 3] (HWC, 0..255) or float32 [3, H, W] (CHW, RGB in [0, 1]); "
            f"got {tensor.dtype} {list(shape)}"
        )
    hwc = tensor.dtype == "uint8"
    height, width, channels = (shape if hwc else (shape[1], shape[2], shape[0]))
    check_size(height, width, channels, meta, max_pixels, what=f"the {tensor.dtype} tensor {list(shape)}")
    dtype = DTYPES[tensor.dtype]
    expected = math.prod(shape) * dtype.itemsize
    if len(tensor.data) != expected:
        raise InvalidInput(
            f"the tensor's data has {len(tensor.data)} bytes but {tensor.dtype} {list(shape)} needs {expected}; "
            f"send the array's raw bytes in C order (numpy: array.tobytes())"
        )
    array = np.frombuffer(tensor.data, dtype).reshape(shape)
    if hwc:
        return preprocess(array)
    check_unit_range(array)
    return array


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
    return DTYPES[name]


# --- postprocess --------------------------------------------------------------------------------


def postprocess(task: TaskInfo, raw: np.ndarray, dtype: np.dtype, probabilities: bool) -> TaskOutput:
    """One image's raw output of ``task`` (no batch dimension) -> its typed result."""
    if task.kind == "segmentation":
        class_map = argmax_classes(raw, np.uint8 if task.channels <= 256 else np.int32)
        return SegmentationOutput(class_map, softmax(raw).astype(dtype, copy=False) if probabilities else None)
    if task.kind == "depth":
        return DepthOutput(np.maximum(raw[0], 0).astype(dtype, copy=False))
    if task.kind == "normal":
        return NormalOutput(raw.astype(dtype, copy=False))
    scores = 1.0 / (1.0 + np.exp(-raw.astype(np.float64)))
    return AttributesOutput(dict(zip(task.attribute_names, scores.tolist(), strict=True)))


def argmax_classes(logits: np.ndarray, dtype) -> np.ndarray:
    """``logits.argmax(axis=0)`` for ``[C, H, W]``, 7-9x faster: numpy reduces axis 0 of a C-contiguous
    array pixel by pixel, while this makes C-1 passes of whole-plane vector ops. Ties go to the lower
    class, as with argmax; NaN logits never win (argmax would pick them)."""
    best = logits[0].copy()
    index = np.zeros(best.shape, dtype)
    greater = np.empty(best.shape, bool)
    step = np.empty(best.shape, dtype)
    for c in range(1, logits.shape[0]):
        np.greater(logits[c], best, out=greater)
        np.subtract(dtype(c), index, out=step)  # index += greater * (c - index), i.e. index[greater] = c
        np.multiply(step, greater, out=step)
        index += step
        np.maximum(best, logits[c], out=best)
    return index


def softmax(logits: np.ndarray) -> np.ndarray:
    """Softmax over the class axis (0), computed stably in float32."""
    e = np.exp(logits - logits.max(axis=0, keepdims=True))
    e /= e.sum(axis=0, keepdims=True)
    return e
