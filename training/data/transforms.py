"""Sample-level geometric transforms shared by the real data sets.

A sample is the dict described in `training.tasks`: ``"image"`` plus one target per task name.
Every function here returns a new dict, touches only the keys it knows (the image and the dense
targets of the given tasks) and passes every other key through unchanged, so attribute vectors
and any metadata survive.

What happens to a target is its kind's business (`training.kinds`), so that it keeps its meaning:

- the image is resampled bilinearly (with antialiasing when it shrinks);
- a target is resampled as its kind's ``resize_mode`` says. Every kind so far says nearest
  neighbour: a class index is never averaged, the ignore label -1 and invalid depth 0 never bleed
  into valid pixels, a normal stays a unit vector (or the all-zero "invalid" vector) and an edge
  map stays binary;
- a mirror and a zoom go through the kind's ``flip`` (normals negate x) and ``zoom`` (depth is
  divided by the zoom factor).

Augmentation randomness comes from a `torch.Generator` seeded by (seed, epoch, index) through
`sample_generator`, so a resumed run replays exactly the augmentations of the interrupted one,
whatever the number of data-loader workers.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from training.kinds import TrainingKind, kind_of
from training.tasks import TaskSpec

SCALES: tuple[float, ...] = (1.0, 1.2, 1.5)
"""Scale factors of the NYU-v2 random scale-crop (MTAN / LibMTL convention)."""


def sample_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """A generator private to one sample in one epoch.

    The three integers are mixed through numpy's `SeedSequence` (a proper hash), so nearby
    (epoch, index) pairs give unrelated streams and the result does not depend on worker order.
    """
    if min(seed, epoch, index) < 0:
        raise ValueError(f"seed, epoch and index must be >= 0, got {(seed, epoch, index)}")
    state = np.random.SeedSequence([seed, epoch, index]).generate_state(2, dtype=np.uint32)
    generator = torch.Generator()
    generator.manual_seed((int(state[0]) << 31) ^ int(state[1]))
    return generator


def _dense_kinds(sample: dict, tasks: Sequence[TaskSpec]) -> dict[str, TrainingKind]:
    """Name -> kind of the dense tasks that are present in ``sample``."""
    return {t.name: kind_of(t) for t in tasks if t.dense and t.name in sample}


def _as_batch(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """View a [H, W] or [C, H, W] map as [1, C, H, W]; also return its original rank."""
    if x.dim() == 2:
        return x[None, None], 2
    if x.dim() == 3:
        return x[None], 3
    raise ValueError(f"expected a [H, W] or [C, H, W] tensor, got shape {tuple(x.shape)}")


def _from_batch(x: torch.Tensor, rank: int) -> torch.Tensor:
    return x[0, 0] if rank == 2 else x[0]


def resize_image(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of a [3, H, W] image; antialiased when either side shrinks (no aliasing)."""
    size = (int(size[0]), int(size[1]))
    if tuple(image.shape[-2:]) == size:
        return image
    shrink = size[0] < image.shape[-2] or size[1] < image.shape[-1]
    batch, rank = _as_batch(image)
    out = F.interpolate(batch, size=size, mode="bilinear", align_corners=False, antialias=shrink)
    return _from_batch(out, rank)


def resize_nearest(target: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Nearest-neighbour resize of a [H, W] or [C, H, W] target map, keeping its dtype.

    Uses ``nearest-exact`` (pixel-centre sampling, consistent with the image's
    ``align_corners=False``); integer maps go through float, which is exact for class indices.
    """
    size = (int(size[0]), int(size[1]))
    if tuple(target.shape[-2:]) == size:
        return target
    batch, rank = _as_batch(target)
    out = F.interpolate(batch.float(), size=size, mode="nearest-exact")
    return _from_batch(out, rank).to(target.dtype)


def resize_bilinear(target: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize (align_corners=False, no antialiasing) of a float [H, W] or [C, H, W] map."""
    size = (int(size[0]), int(size[1]))
    if tuple(target.shape[-2:]) == size:
        return target
    batch, rank = _as_batch(target)
    return _from_batch(F.interpolate(batch, size=size, mode="bilinear", align_corners=False), rank)


RESIZERS = {"nearest": resize_nearest, "bilinear": resize_bilinear}  # by `TrainingKind.resize_mode`


def resize_target(target: torch.Tensor, size: tuple[int, int], kind: TrainingKind) -> torch.Tensor:
    """Resize a dense target as its kind says (`TrainingKind.resize_mode`)."""
    return RESIZERS[kind.resize_mode](target, size)


def resize_sample(sample: dict, tasks: Sequence[TaskSpec], size: tuple[int, int]) -> dict:
    """Resize the image and every dense target of ``tasks`` to ``size`` (height, width).

    Depth values are left as they are: resizing the whole frame changes the resolution, not the
    geometry (unlike the scale-crop augmentation, which zooms in).
    """
    out = dict(sample)
    if "image" in out:
        out["image"] = resize_image(out["image"], size)
    for name, kind in _dense_kinds(sample, tasks).items():
        out[name] = resize_target(sample[name], size, kind)
    return out


def hflip_sample(sample: dict, tasks: Sequence[TaskSpec]) -> dict:
    """Mirror the image and every dense target left-right (each target as its kind says: surface
    normals negate x, keeping the all-zero "invalid" vector exactly zero, so flipping twice is the
    identity)."""
    out = dict(sample)
    if "image" in out:
        out["image"] = out["image"].flip(-1)
    for name, kind in _dense_kinds(sample, tasks).items():
        out[name] = kind.flip(sample[name])
    return out


def _draw(generator: torch.Generator) -> tuple[float, float, float, bool]:
    """Draw every random number of one augmentation up front, in a fixed order, so the outcome
    does not depend on which tasks (keys) the sample carries."""
    scale = SCALES[int(torch.randint(len(SCALES), (1,), generator=generator))]
    top_u, left_u, flip_u = torch.rand(3, generator=generator).tolist()
    return scale, top_u, left_u, flip_u < 0.5


def scale_crop_sample(
    sample: dict, tasks: Sequence[TaskSpec], scale: float, top_u: float, left_u: float
) -> dict:
    """Crop an (H/scale) x (W/scale) window and resize it back to H x W (a zoom by ``scale``).

    ``top_u`` and ``left_u`` in [0, 1) place the window. Zooming in by ``scale`` makes objects
    look ``scale`` times closer, so depth is divided by ``scale``; invalid depth (0) stays 0.
    """
    if scale == 1.0:
        return dict(sample)
    height, width = sample["image"].shape[-2:]
    crop_h, crop_w = max(1, round(height / scale)), max(1, round(width / scale))
    top = min(int(top_u * (height - crop_h + 1)), height - crop_h)
    left = min(int(left_u * (width - crop_w + 1)), width - crop_w)
    window = (slice(top, top + crop_h), slice(left, left + crop_w))
    out = dict(sample)
    out["image"] = resize_image(sample["image"][..., window[0], window[1]], (height, width))
    for name, kind in _dense_kinds(sample, tasks).items():
        zoomed = resize_target(sample[name][..., window[0], window[1]], (height, width), kind)
        out[name] = kind.zoom(zoomed, scale)
    return out


def augment_sample(sample: dict, tasks: Sequence[TaskSpec], generator: torch.Generator) -> dict:
    """The NYU-v2 multi-task augmentation: random scale-crop, then a horizontal flip with p=0.5.

    Scale is drawn from `SCALES`; see `scale_crop_sample` and `hflip_sample`. Attributes and any
    key that is not the image or a dense task target are returned unchanged.
    """
    scale, top_u, left_u, flip = _draw(generator)
    out = scale_crop_sample(sample, tasks, scale, top_u, left_u)
    return hflip_sample(out, tasks) if flip else out
