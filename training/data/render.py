"""Shared machinery of the built-in synthetic data sets.

Both synthetic sets (`synthetic_scenes`, `synthetic_faces`) are drawn on the fly from a numpy
Generator seeded by ``(seed, split, index)``, so a sample never has to be stored and is identical
on every machine and in every DataLoader worker. This module holds the numpy rendering toolkit
(value-noise textures, vectorised ray casting against boxes, spheres, cylinders and a room, the
camera-like image finish). The data-set wrapper, option checking and `preview` live in
`training.data.synthetic`.
"""

from __future__ import annotations

import colorsys
from typing import Any

import numpy as np

# --------------------------------------------------------------------------- textures and colour


def value_noise(rng: np.random.Generator, u: np.ndarray, v: np.ndarray, cells: int = 8,
                octaves: int = 1) -> np.ndarray:
    """Smooth random field in [0, 1] at float coordinates ``(u, v)`` (one lattice unit per cell).

    The lattice is ``cells`` x ``cells`` (a power of two) and wraps around, so any coordinate range
    works; each extra octave doubles the frequency and halves the amplitude (fractal detail).
    """
    total = np.zeros(np.broadcast(u, v).shape, np.float32)
    norm = 0.0
    for octave in range(octaves):
        scale, amp = 2.0 ** octave, 0.5 ** octave
        total += amp * _lattice(rng.random((cells, cells), dtype=np.float32), u * scale, v * scale)
        norm += amp
    return total / norm


def _lattice(table: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Bilinear, smoothstep-eased lookup of a wrapping random table (side a power of two)."""
    cells = table.shape[0]
    flat, wrap = table.ravel(), cells - 1
    fu, fv = np.floor(u), np.floor(v)
    su, sv = (u - fu).astype(np.float32), (v - fv).astype(np.float32)
    su, sv = su * su * (3 - 2 * su), sv * sv * (3 - 2 * sv)
    iu, iv = fu.astype(np.int32) & wrap, (fv.astype(np.int32) & wrap) * cells
    iu1, iv1 = (iu + 1) & wrap, (iv + cells) & (cells * cells - 1)
    a, b, c, d = flat[iv + iu], flat[iv + iu1], flat[iv1 + iu], flat[iv1 + iu1]
    top, bottom = a + (b - a) * su, c + (d - c) * su
    return top + (bottom - top) * sv


def frac(x: np.ndarray) -> np.ndarray:
    """Fractional part (position within a tile, plank or stripe)."""
    return x - np.floor(x)


def blob_mask(rng: np.random.Generator, h: int, w: int, fraction: float) -> np.ndarray:
    """Smooth random blobs covering ``fraction`` of an (H, W) image. They are drawn on a grid of
    at most about 96 rows and scaled up, so they look alike (and cost the same) at any size."""
    step = max(1, h // 96)
    hc, wc = -(-h // step), -(-w // step)
    v, u = np.mgrid[0:hc, 0:wc].astype(np.float32)
    noise = value_noise(rng, u / wc * 6, v / hc * 5, cells=8, octaves=2)
    k = int(round(fraction * hc * wc))
    blobs = noise >= np.partition(noise.ravel(), -k)[-k] if k > 0 else np.zeros((hc, wc), bool)
    return np.repeat(np.repeat(blobs, step, 0), step, 1)[:h, :w]


def cell_hash(i: np.ndarray, j: np.ndarray, table: np.ndarray) -> np.ndarray:
    """Per-cell random value for integer cell indices (tiles, planks, sectors)."""
    n = table.shape[0]
    return table[(i.astype(np.int64) * 73 + j.astype(np.int64) * 151) % n]


def hsv(h: float, s: float, v: float) -> np.ndarray:
    """An RGB colour (float32, 3) from hue/saturation/value; hue wraps."""
    return np.array(colorsys.hsv_to_rgb(h % 1.0, min(max(s, 0.0), 1.0), min(max(v, 0.0), 1.0)),
                    np.float32)


def random_colour(rng: np.random.Generator, hue: tuple[float, float] = (0.0, 1.0),
                  sat: tuple[float, float] = (0.0, 1.0), val: tuple[float, float] = (0.0, 1.0)) -> np.ndarray:
    """A colour drawn uniformly within hue/saturation/value ranges (class-typical palettes)."""
    return hsv(rng.uniform(*hue), rng.uniform(*sat), rng.uniform(*val))


def finish_image(rgb: np.ndarray, rng: np.random.Generator, noise: tuple[float, float] = (0.01, 0.03),
                 blur: float = 0.0) -> np.ndarray:
    """Camera-like finish of a (3, H, W) image: optional blur, random saturation, contrast,
    brightness and white balance, sensor noise, then 8-bit quantisation through a random gamma.

    Jitter makes colour alone an unreliable cue, so a model has to use texture and shape.
    """
    if blur > 0:
        rgb = (1 - blur) * rgb + blur * box_blur3(rgb)
    saturation, contrast, brightness = rng.uniform(0.7, 1.3), rng.uniform(0.8, 1.2), rng.uniform(-0.08, 0.08)
    balance = rng.uniform(0.92, 1.08, size=(3, 1, 1)).astype(np.float32)
    gray = (rgb[0] + rgb[1] + rgb[2]) * np.float32((1 - saturation) / 3) - 0.5
    out = (rgb * np.float32(saturation) + gray) * (balance * np.float32(contrast))
    out += balance * np.float32(0.5 + brightness)
    out += np.float32(rng.uniform(*noise)) * rng.standard_normal(out.shape, dtype=np.float32)
    levels = np.clip(out * 255 + 0.5, 0, 255).astype(np.uint8)
    return (LEVELS ** np.float32(rng.uniform(0.85, 1.15)))[levels]  # gamma as a lookup table


LEVELS = np.arange(256, dtype=np.float32) / 255


def box_blur3(img: np.ndarray) -> np.ndarray:
    """3x3 mean filter of a (C, H, W) image, edges replicated (softens hard rasterised edges)."""
    rows = img * 2
    rows[:, 1:] += img[:, :-1] - img[:, 1:]
    rows[:, :-1] += img[:, 1:]
    rows[:, -1] += img[:, -1]
    out = rows * 2
    out[:, :, 1:] += rows[:, :, :-1] - rows[:, :, 1:]
    out[:, :, :-1] += rows[:, :, 1:]
    out[:, :, -1] += rows[:, :, -1]
    return out / 9


# --------------------------------------------------------------------------- ray casting
# Vectors are stored component-first, (3, ...), like the normal target, in float32. ``o`` is a ray
# origin ((3,) shared or (3, ...) per ray), ``d`` the directions (3, ...); t = inf means a miss.


def dot(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return a[0] * b[0] + a[1] * b[1] + a[2] * b[2]


def as_column(v: Any, like: np.ndarray) -> np.ndarray:
    """A (3,) vector shaped to broadcast against a (3, ...) array; (3, ...) arrays pass through."""
    return np.asarray(v, np.float32).reshape((3,) + (1,) * (like.ndim - 1)) if np.ndim(v) == 1 else v


def rotate_y(v: np.ndarray, angle: float) -> np.ndarray:
    """Rotate (3, ...) vectors about the y axis."""
    c, s = float(np.cos(angle)), float(np.sin(angle))
    return np.stack([c * v[0] + s * v[2], v[1], c * v[2] - s * v[0]])


def _nonzero(d: np.ndarray) -> np.ndarray:
    return np.where(np.abs(d) < 1e-9, np.float32(1e-9), d)


def ray_box(centre: np.ndarray, half: np.ndarray, yaw: float, o: np.ndarray, d: np.ndarray,
            eps: float) -> np.ndarray:
    """First hit beyond ``eps`` on a box turned by ``yaw`` about y (slab method)."""
    rel = rotate_y(as_column(o, d) - as_column(centre, d), -yaw)
    inv, half = 1 / _nonzero(rotate_y(d, -yaw)), as_column(half, d)
    t1, t2 = (-half - rel) * inv, (half - rel) * inv
    near, far = np.minimum(t1, t2).max(axis=0), np.maximum(t1, t2).min(axis=0)
    return np.where((near <= far) & (near > eps), near, np.inf)


def ray_sphere(centre: np.ndarray, radius: float, o: np.ndarray, d: np.ndarray, eps: float) -> np.ndarray:
    rel = as_column(o, d) - as_column(centre, d)
    a, b = dot(d, d), dot(d, rel)
    disc = b * b - a * (dot(rel, rel) - radius * radius)
    t = (-b - np.sqrt(np.maximum(disc, 0))) / a
    return np.where((disc >= 0) & (t > eps), t, np.inf)


def ray_cylinder(base: np.ndarray, radius: float, height: float, o: np.ndarray, d: np.ndarray,
                 eps: float) -> np.ndarray:
    """First hit on an upright closed cylinder standing on ``base``: curved side or top cap."""
    rel = as_column(o, d) - as_column(base, d)
    a, b = d[0] ** 2 + d[2] ** 2, d[0] * rel[0] + d[2] * rel[2]
    disc = b * b - a * (rel[0] ** 2 + rel[2] ** 2 - radius * radius)
    t = (-b - np.sqrt(np.maximum(disc, 0))) / np.maximum(a, 1e-12)
    y = rel[1] + t * d[1]
    side = np.where((disc >= 0) & (t > eps) & (y >= 0) & (y <= height), t, np.inf)
    tc = (height - rel[1]) / _nonzero(d[1])
    cap = (rel[0] + tc * d[0]) ** 2 + (rel[2] + tc * d[2]) ** 2 <= radius * radius
    return np.minimum(side, np.where((tc > eps) & cap, tc, np.inf))


def box_normal(centre: np.ndarray, half: np.ndarray, yaw: float, p: np.ndarray) -> np.ndarray:
    """Outward normals at points ``p`` (3, k) on a box: the axis of the face each point is on."""
    q = rotate_y(p - as_column(centre, p), -yaw) / as_column(half, p)
    axis, rows = np.abs(q).argmax(axis=0), np.arange(q.shape[1])
    n = np.zeros_like(q)
    n[axis, rows] = np.sign(q[axis, rows])
    return rotate_y(n, yaw)


def cylinder_normal(base: np.ndarray, radius: float, height: float, p: np.ndarray) -> np.ndarray:
    """Outward normals at points ``p`` (3, k) on an upright cylinder: radial, or up on the cap."""
    rel = p - as_column(base, p)
    radial = np.maximum(np.hypot(rel[0], rel[2]), 1e-9)
    side = np.stack([rel[0] / radial, 0 * radial, rel[2] / radial])
    return np.where((height - rel[1]) < (radius - radial), as_column([0.0, 1.0, 0.0], side), side)


def sphere_window(centre: np.ndarray, radius: float, origin: np.ndarray, axes: np.ndarray, focal: float,
                  h: int, w: int) -> tuple[slice, slice]:
    """Rows and columns of a pinhole image (see `camera_rays`) that can see a sphere, so that
    rays are only intersected where they may hit; the whole image when it is too close."""
    x, y, z = axes.T @ (np.asarray(centre) - origin)
    if z - radius < 0.05:
        return slice(0, h), slice(0, w)
    window = []
    for c, n in ((y, h), (x, w)):
        ends = [focal * (c + sc) / (z + sz) + n / 2 for sc in (-radius, radius) for sz in (-radius, radius)]
        lo, hi = np.clip([np.floor(min(ends)) - 1, np.ceil(max(ends)) + 1], 0, n)
        window.append(slice(int(lo), int(hi)))
    return window[0], window[1]


def ray_room(size: np.ndarray, o: np.ndarray, d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Where rays from inside the box [0, size] leave it: (t, face = 2 * axis + far side)."""
    far = d > 0
    t_axes = np.where(far, as_column(size, d), 0) - as_column(o, d)
    t_axes = np.where(np.abs(d) < 1e-9, np.inf, t_axes / _nonzero(d))
    axis = t_axes.argmin(axis=0)
    t = np.take_along_axis(t_axes, axis[None], 0)[0]
    return t.astype(np.float32), 2 * axis + np.take_along_axis(far, axis[None], 0)[0]


def camera_rays(axes: np.ndarray, focal: float, h: int, w: int) -> np.ndarray:
    """World ray directions (3, H, W) of a pinhole camera whose columns ``axes`` are its x
    (right), y (down) and z (forward) axes, scaled so that t along a ray is the z-depth."""
    v, u = np.mgrid[0:h, 0:w].astype(np.float32) + 0.5
    cam = np.stack([(u - w / 2) / focal, (v - h / 2) / focal, np.ones_like(u)])
    return np.einsum("ij,jhw->ihw", axes.astype(np.float32), cam)


def invalid_mask(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """3.5-7 % invalid pixels: smooth 'specular' blobs, and in half the images a thin band at the
    left and right borders (as in the NYU-v2 crops)."""
    target, width = rng.uniform(0.035, 0.07), max(1, round(w / 128)) if rng.random() < 0.5 else 0
    mask = blob_mask(rng, h, w, target - 2 * width / w)
    mask[:, :width] = True
    mask[:, w - width:] = True
    return mask


def boundaries(*maps: np.ndarray) -> np.ndarray:
    """Float32 ``[1, H, W]``: 1 where a pixel differs from its right or lower neighbour in any of
    the ``[H, W]`` id ``maps`` (class, instance), on both pixels of the pair, else 0. A boundary is
    thus 2 px wide, one on each side, at the size the maps are rendered at."""
    edge = np.zeros(maps[0].shape, bool)
    for ids in maps:
        across = ids[:, 1:] != ids[:, :-1]
        edge[:, 1:] |= across
        edge[:, :-1] |= across
        down = ids[1:] != ids[:-1]
        edge[1:] |= down
        edge[:-1] |= down
    return edge[None].astype(np.float32)
