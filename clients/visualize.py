"""Pictures of task results for people, drawn by the style a kind's `parsimony.tasks.Picture` asks
for, and PNG text chunks (or JSON) for programs:

- ``classes``: one palette colour per class, and a legend to the right listing every label (swatch,
  name, share of the pixels).
- ``scalar``: a colour map (viridis, low = dark) stretched over the map's own range, with a colour
  bar labelled with that range in the picture's unit.
- ``vector``: the usual RGB coding of unit vectors, ``(v + 1) / 2`` per axis (for normals: x right
  -> red, y down -> green, z forward -> blue).
- ``scores``: ``{name: score}``, written as JSON.

Maps smaller than `MIN_HEIGHT` pixels are enlarged by a whole factor (`scale_for`, nearest
neighbour, so every model pixel stays one flat block) to keep the legend legible: the map is the
image's top-left ``(H * scale, W * scale)`` block. `write` saves a picture with text chunks
(``scale`` and the picture's own, e.g. ``classes``, ``depth_min_m``) that say exactly what it shows.

The colours are matplotlib's, written here so that clients need no matplotlib: the tab10/tab20
palettes (20 fixed colours) and viridis, interpolated linearly between 17 evenly spaced colours of
its table (within 6/255 of matplotlib's 256-entry table).
"""

from __future__ import annotations

import colorsys
import json
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from PIL.PngImagePlugin import PngInfo

from parsimony.tasks import Picture

MIN_HEIGHT = 192
LEGEND_BG = (255, 255, 255)
TEXT = (20, 20, 20)
_ROW, _SWATCH, _PAD = 18, 12, 6

# matplotlib's tab20; tab10 is every other colour of it
TAB20 = ("1f77b4", "aec7e8", "ff7f0e", "ffbb78", "2ca02c", "98df8a", "d62728", "ff9896", "9467bd", "c5b0d5",
         "8c564b", "c49c94", "e377c2", "f7b6d2", "7f7f7f", "c7c7c7", "bcbd22", "dbdb8d", "17becf", "9edae5")
TAB10 = TAB20[::2]
# viridis at 0, 1/16, ..., 1
VIRIDIS = ("440154", "48186a", "472d7b", "424086", "3b528b", "33638d", "2c728e", "26828e", "21918c", "1f9f88",
           "27ad81", "3dbc74", "5cc863", "81d34d", "aadc32", "d5e21a", "fde725")


def _rgb(hex_colours: tuple[str, ...]) -> np.ndarray:
    return np.array([[int(h[i:i + 2], 16) for i in (0, 2, 4)] for h in hex_colours], np.uint8)


def scale_for(height: int) -> int:
    return max(1, math.ceil(MIN_HEIGHT / height))


def palette(n: int) -> np.ndarray:
    """``[n, 3]`` uint8 colours, distinct for each class: tab10/tab20, then evenly spread hues."""
    if n <= 20:
        return _rgb(TAB10 if n <= 10 else TAB20)[:n]
    colours = [colorsys.hsv_to_rgb((i * 0.618034) % 1, 0.65 + 0.35 * (i % 2), 0.95 - 0.3 * (i % 3 == 2))
               for i in range(n)]
    return np.round(np.asarray(colours, np.float64) * 255).astype(np.uint8)


def viridis(n: int = 256) -> np.ndarray:
    """``[n, 3]`` uint8: viridis from its low (dark) to its high end."""
    anchors = _rgb(VIRIDIS).astype(np.float64)
    at, x = np.linspace(0, 1, len(anchors)), np.linspace(0, 1, n)
    return np.round(np.stack([np.interp(x, at, anchors[:, c]) for c in range(3)], 1)).astype(np.uint8)


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


def classes_image(class_map: np.ndarray, labels: list[str] | tuple[str, ...]) -> Image.Image:
    names = list(labels) or [str(i) for i in range(int(class_map.max()) + 1)]
    colours = palette(len(names))
    panel = _enlarge(colours[np.clip(class_map, 0, len(names) - 1)])
    share = np.bincount(class_map.ravel(), minlength=len(names))[:len(names)] / class_map.size
    font = _font()
    rows = [f"{name}  {100 * share[i]:.0f}%" for i, name in enumerate(names)]
    width = _PAD * 3 + _SWATCH + max(int(font.getlength(row)) for row in rows) + _PAD
    canvas, draw = _beside(panel, width, _PAD * 2 + _ROW * len(names))
    x = panel.width + _PAD
    for i, row in enumerate(rows):
        y = _PAD + i * _ROW
        draw.rectangle([x, y + 2, x + _SWATCH - 1, y + 2 + _SWATCH - 1], fill=tuple(int(c) for c in colours[i]))
        draw.text((x + _SWATCH + _PAD, y), row, fill=TEXT, font=font)
    return canvas


def value_range(values: np.ndarray) -> tuple[float, float]:
    finite = values[np.isfinite(values)].astype(np.float64)
    return (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)


def scalar_image(values: np.ndarray, unit: str = "") -> Image.Image:
    lo, hi = value_range(values)
    lut = viridis()
    scaled = (np.nan_to_num(values.astype(np.float64), nan=lo) - lo) / max(hi - lo, 1e-12)
    panel = _enlarge(lut[np.clip(np.round(scaled * 255), 0, 255).astype(np.intp)])
    font = _font()
    labels = [f"{hi:.3g} {unit}".rstrip(), f"{lo:.3g} {unit}".rstrip()]
    bar_w, text_w = 14, max(int(font.getlength(label)) for label in labels)
    canvas, draw = _beside(panel, _PAD * 3 + bar_w + text_w, MIN_HEIGHT)
    x, top, bottom = panel.width + _PAD, _PAD, canvas.height - _PAD - 1
    for y in range(top, bottom + 1):  # the colour bar: the highest value at the top
        draw.line([x, y, x + bar_w - 1, y], fill=tuple(int(c) for c in lut[round(255 * (bottom - y) / (bottom - top))]))
    draw.text((x + bar_w + _PAD, top), labels[0], fill=TEXT, font=font)
    draw.text((x + bar_w + _PAD, bottom - 12), labels[1], fill=TEXT, font=font)
    return canvas


def vector_image(vectors: np.ndarray) -> Image.Image:
    rgb = np.clip(np.round((np.moveaxis(vectors.astype(np.float64), 0, -1) + 1) * 127.5), 0, 255).astype(np.uint8)
    return _enlarge(rgb)


def picture_image(picture: Picture) -> Image.Image:
    """The image of a ``classes``, ``scalar`` or ``vector`` picture (``scores`` are not drawn: `write`)."""
    if picture.style == "classes":
        return classes_image(picture.data, picture.labels)
    if picture.style == "scalar":
        return scalar_image(picture.data, picture.unit)
    if picture.style == "vector":
        return vector_image(picture.data)
    raise ValueError(f"a {picture.style!r} picture is not drawn; write it as JSON (clients.visualize.write)")


def write(picture: Picture, stem: Path, text: dict[str, object]) -> Path:
    """``STEM.json`` of a ``scores`` picture, else ``STEM.png`` with the text chunks ``text``,
    ``scale`` and the picture's own; returns the path written."""
    if picture.style == "scores":
        path = stem.with_name(stem.name + ".json")
        path.write_text(json.dumps(picture.data, indent=2) + "\n")
        return path
    text = text | {"scale": scale_for(np.shape(picture.data)[-2])} | picture.text
    return save_png(picture_image(picture), stem.with_name(stem.name + ".png"), text)


def save_png(image: Image.Image, path: Path, text: dict[str, object]) -> Path:
    info = PngInfo()
    for key, value in text.items():
        info.add_text(key, value if isinstance(value, str) else json.dumps(value))
    image.save(path, "PNG", pnginfo=info)
    return path
