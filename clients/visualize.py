"""Pictures of task outputs for people: PIL images with their legend, and PNG text chunks for programs.

- `segmentation_image`: one palette colour per class, and a legend to the right listing every class
  (swatch, name, share of the pixels).
- `depth_image`: a colour map (viridis, near = dark) stretched over the map's own range, with a
  colour bar labelled with that range in metres.
- `normal_image`: the usual RGB coding, ``(n + 1) / 2`` per axis (x right -> red, y down -> green,
  z forward -> blue).

Maps smaller than `MIN_HEIGHT` pixels are enlarged by a whole factor (`scale_for`, nearest
neighbour, so every model pixel stays one flat block) to keep the legend legible: the map is the
image's top-left ``(H * scale, W * scale)`` block. `save_png` writes the image with text chunks
(``scale``, ``classes``, ``depth_min_m``, ``depth_max_m``) that say exactly what it shows.
"""

from __future__ import annotations

import colorsys
import json
import math
from pathlib import Path

import matplotlib
import numpy as np
from PIL import Image, ImageDraw, ImageFont
from PIL.PngImagePlugin import PngInfo

MIN_HEIGHT = 192
LEGEND_BG = (255, 255, 255)
TEXT = (20, 20, 20)
_ROW, _SWATCH, _PAD = 18, 12, 6


def scale_for(height: int) -> int:
    return max(1, math.ceil(MIN_HEIGHT / height))


def palette(n: int) -> np.ndarray:
    """``[n, 3]`` uint8 colours, distinct for each class: tab10/tab20, then evenly spread hues."""
    if n <= 20:
        colours = matplotlib.colormaps["tab10" if n <= 10 else "tab20"].colors[:n]
    else:
        colours = [colorsys.hsv_to_rgb((i * 0.618034) % 1, 0.65 + 0.35 * (i % 2), 0.95 - 0.3 * (i % 3 == 2))
                   for i in range(n)]
    return np.round(np.asarray(colours, np.float64) * 255).astype(np.uint8)


def _font(size: int = 12) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _enlarge(rgb: np.ndarray) -> Image.Image:
    s = scale_for(rgb.shape[0])
    return Image.fromarray(np.ascontiguousarray(rgb.repeat(s, 0).repeat(s, 1)), "RGB")


def _beside(panel: Image.Image, legend_width: int, legend_height: int) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    """The map with a blank legend area to its right (as tall as the taller of the two)."""
    canvas = Image.new("RGB", (panel.width + legend_width, max(panel.height, legend_height)), LEGEND_BG)
    canvas.paste(panel, (0, 0))
    return canvas, ImageDraw.Draw(canvas)


def segmentation_image(class_map: np.ndarray, class_names: list[str] | tuple[str, ...]) -> Image.Image:
    names = list(class_names) or [str(i) for i in range(int(class_map.max()) + 1)]
    colours = palette(len(names))
    panel = _enlarge(colours[np.clip(class_map, 0, len(names) - 1)])
    share = np.bincount(class_map.ravel(), minlength=len(names))[:len(names)] / class_map.size
    font = _font()
    labels = [f"{name}  {100 * share[i]:.0f}%" for i, name in enumerate(names)]
    width = _PAD * 3 + _SWATCH + max(int(font.getlength(label)) for label in labels) + _PAD
    canvas, draw = _beside(panel, width, _PAD * 2 + _ROW * len(names))
    x = panel.width + _PAD
    for i, label in enumerate(labels):
        y = _PAD + i * _ROW
        draw.rectangle([x, y + 2, x + _SWATCH - 1, y + 2 + _SWATCH - 1], fill=tuple(int(c) for c in colours[i]))
        draw.text((x + _SWATCH + _PAD, y), label, fill=TEXT, font=font)
    return canvas


def depth_range(depth: np.ndarray) -> tuple[float, float]:
    finite = depth[np.isfinite(depth)].astype(np.float64)
    return (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)


def depth_image(depth: np.ndarray, unit: str = "m") -> Image.Image:
    lo, hi = depth_range(depth)
    lut = np.round(matplotlib.colormaps["viridis"](np.linspace(0, 1, 256))[:, :3] * 255).astype(np.uint8)
    scaled = (np.nan_to_num(depth.astype(np.float64), nan=lo) - lo) / max(hi - lo, 1e-12)
    panel = _enlarge(lut[np.clip(np.round(scaled * 255), 0, 255).astype(np.intp)])
    font = _font()
    labels = [f"{hi:.3g} {unit}", f"{lo:.3g} {unit}"]
    bar_w, text_w = 14, max(int(font.getlength(label)) for label in labels)
    canvas, draw = _beside(panel, _PAD * 3 + bar_w + text_w, MIN_HEIGHT)
    x, top, bottom = panel.width + _PAD, _PAD, canvas.height - _PAD - 1
    for y in range(top, bottom + 1):  # the colour bar: far (max) at the top
        draw.line([x, y, x + bar_w - 1, y], fill=tuple(int(c) for c in lut[round(255 * (bottom - y) / (bottom - top))]))
    draw.text((x + bar_w + _PAD, top), labels[0], fill=TEXT, font=font)
    draw.text((x + bar_w + _PAD, bottom - 12), labels[1], fill=TEXT, font=font)
    return canvas


def normal_image(normal: np.ndarray) -> Image.Image:
    rgb = np.clip(np.round((np.moveaxis(normal.astype(np.float64), 0, -1) + 1) * 127.5), 0, 255).astype(np.uint8)
    return _enlarge(rgb)


def save_png(image: Image.Image, path: Path, text: dict[str, object]) -> Path:
    info = PngInfo()
    for key, value in text.items():
        info.add_text(key, value if isinstance(value, str) else json.dumps(value))
    image.save(path, "PNG", pnginfo=info)
    return path
