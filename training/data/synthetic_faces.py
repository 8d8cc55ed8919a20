"""synthetic-faces: stylised portraits, the built-in stand-in for CelebAMask-HQ.

Each sample is a head and shoulders on a textured background, painted layer by layer (clothes,
back hair, neck, ears, face, beard, nose, brows, fringe, eyes, mouth, glasses) in a face frame
with random position, scale and in-plane rotation. Three binary attributes, each drawn with
probability 1/2 and each visible in the image:

- ``Male``: squarer jaw, thicker brows, short hair (85 %, vs 25 % for others), beard or
  moustache (60 %); non-male faces often wear lipstick and eye shadow.
- ``Smiling``: a wide mouth with raised corners, open on white teeth; otherwise a narrower,
  closed mouth with straight or slightly drooping corners.
- ``Eyeglasses``: dark frames around both eyes with tinted lenses.

Option ``preset`` chooses the targets:

- ``"paper"`` (default, as in the source paper): segmentation into ``PAPER_CLASSES``
  (background / skin / hair; eyes, brows, nose, mouth, beard and glasses count as skin) and the
  attributes Male and Smiling.
- ``"full"``: segmentation into ``FULL_CLASSES`` (eyeglasses frames are a class, as CelebAMask's
  eye_g) and the attributes Male, Smiling and Eyeglasses.

In both presets the neck is skin and clothes are background. Option ``cache`` as for every
synthetic set (bool; default on for <= 4096 samples within ~1 GiB). No pixel is invalid.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import numpy as np

from training.data import render, synthetic
from training.data.registry import DataError, DatasetInfo, DatasetSpec, register_dataset
from training.tasks import TaskSpec

NAME = "synthetic-faces"
FULL_CLASSES = ("background", "skin", "nose", "eye", "brow", "mouth", "hair", "eyeglasses")
PAPER_CLASSES = ("background", "skin", "hair")
BACKGROUND, SKIN, NOSE, EYE, BROW, MOUTH, HAIR, GLASSES = range(len(FULL_CLASSES))
TO_PAPER = np.array([0, 1, 1, 1, 1, 1, 2, 1], np.int64)  # full class -> paper class
ATTRIBUTES = ("Male", "Smiling", "Eyeglasses")
PRESETS: dict[str, tuple[TaskSpec, ...]] = {
    "paper": (TaskSpec("segmentation", "segmentation", len(PAPER_CLASSES), PAPER_CLASSES),
              TaskSpec("attributes", "attributes", 2, ATTRIBUTES[:2])),
    "full": (TaskSpec("segmentation", "segmentation", len(FULL_CLASSES), FULL_CLASSES),
             TaskSpec("attributes", "attributes", 3, ATTRIBUTES)),
}
DEFAULT_SIZE = (96, 96)
DEFAULT_LENGTHS = {"train": 800, "val": 200, "test": 200}
OPTIONS = {"cache": None, "preset": "paper"}


@dataclass(frozen=True)
class Face:
    """Everything random about one portrait; lengths are in face units (face half-height = 1)."""

    male: bool
    smiling: bool
    glasses: bool
    long_hair: bool
    beard: int  # 0 none, 1 moustache, 2 full beard
    fringe: int  # 0 none, 1 straight bangs, 2 side-swept, 3 receding line
    width: float  # face half-width
    jaw: float  # exponent of the lower face outline: 2 round, larger is squarer
    hair_top: float  # hair volume above and beside the head
    hair_side: float
    hair_length: float  # how far long hair falls below the face centre
    mouth_width: float
    mouth_curve: float  # > 0 raises the mouth corners
    mouth_open: float
    brow: float  # eyebrow thickness
    gaze: tuple[float, float]
    skin: np.ndarray  # colours (3,)
    hair: np.ndarray
    iris: np.ndarray
    lips: np.ndarray
    cloth: np.ndarray
    frame: np.ndarray
    lens: np.ndarray
    eye_shadow: float  # 0 = none


def sample_face(rng: np.random.Generator) -> Face:
    """Draw the attributes first, then a look that shows them."""
    male, smiling, glasses = (bool(b) for b in rng.random(3) < 0.5)
    long_hair = rng.random() < (0.15 if male else 0.75)
    tone = rng.uniform(0.25, 0.95)
    skin = render.hsv(rng.uniform(0.02, 0.07), rng.uniform(0.25, 0.55), tone)
    hair = render.hsv(rng.uniform(0.0, 0.12), rng.uniform(0.2, 0.8), rng.choice([0.12, 0.3, 0.5, 0.75]))
    lipstick = not male and rng.random() < 0.6
    lips = render.hsv(rng.uniform(-0.03, 0.02), rng.uniform(0.6, 0.9), rng.uniform(0.5, 0.8)) if lipstick \
        else skin * np.float32(0.75) + np.float32([0.1, 0.0, 0.0])
    return Face(
        male=male, smiling=smiling, glasses=glasses, long_hair=bool(long_hair),
        beard=int(rng.choice([1, 2])) if male and rng.random() < 0.6 else 0,
        fringe=int(rng.choice([0, 3, 2] if male else [0, 1, 2])),
        width=rng.uniform(0.74, 0.82) if male else rng.uniform(0.68, 0.76),
        jaw=rng.uniform(2.6, 3.4) if male else rng.uniform(1.8, 2.2),
        hair_top=rng.uniform(0.08, 0.2) if male and not long_hair else rng.uniform(0.15, 0.35),
        hair_side=rng.uniform(0.04, 0.1) if male and not long_hair else rng.uniform(0.1, 0.22),
        hair_length=rng.uniform(1.3, 2.4),
        mouth_width=rng.uniform(0.27, 0.33) if smiling else rng.uniform(0.19, 0.24),
        mouth_curve=rng.uniform(0.06, 0.1) if smiling else -rng.uniform(0.0, 0.03),
        mouth_open=rng.uniform(0.07, 0.12) if smiling else 0.0,
        brow=rng.uniform(0.065, 0.085) if male else rng.uniform(0.035, 0.05),
        gaze=(rng.uniform(-0.03, 0.03), rng.uniform(-0.01, 0.01)),
        skin=skin, hair=hair,
        iris=render.hsv(rng.choice([0.08, 0.55, 0.3]), rng.uniform(0.4, 0.8), rng.uniform(0.2, 0.5)),
        lips=lips.astype(np.float32),
        cloth=render.hsv(rng.random(), rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8)),
        frame=render.hsv(rng.random(), rng.uniform(0, 0.6), rng.uniform(0.03, 0.3)),
        lens=render.hsv(rng.random(), rng.uniform(0, 0.3), rng.uniform(0.3, 0.9)),
        eye_shadow=0.0 if male or rng.random() < 0.5 else rng.uniform(0.2, 0.45),
    )


# --------------------------------------------------------------------------- painting


class Canvas:
    """An RGB image (3, H, W) and its full-class label map, painted back to front."""

    def __init__(self, h: int, w: int) -> None:
        self.rgb = np.zeros((3, h, w), np.float32)
        self.label = np.zeros((h, w), np.int64)

    def paint(self, mask: np.ndarray, colour: np.ndarray, label: int | None = None) -> None:
        """Cover ``mask`` with ``colour`` ((3,) flat or (3, H, W) field); relabel unless None."""
        colour = colour.reshape(3, 1, 1) if colour.ndim == 1 else colour
        np.copyto(self.rgb, colour, where=mask)
        if label is not None:
            self.label[mask] = label


@dataclass(frozen=True)
class Frame:
    """Pixel coordinates in the face frame: u right, v down, face centre at 0, half-height 1."""

    u: np.ndarray
    v: np.ndarray
    x: np.ndarray  # canvas coordinates, the shorter side spans [-0.5, 0.5]
    y: np.ndarray


def face_frame(rng: np.random.Generator, h: int, w: int) -> Frame:
    """Random pose: face centre, size and in-plane rotation."""
    side = min(h, w)
    rows, cols = np.mgrid[0:h, 0:w].astype(np.float32)
    x, y = (cols + 0.5 - w / 2) / side, (rows + 0.5 - h / 2) / side
    cx, cy = rng.uniform(-0.05, 0.05), rng.uniform(-0.06, 0.03)
    scale, angle = rng.uniform(0.25, 0.31), rng.uniform(-0.2, 0.2)
    c, s = np.float32(np.cos(angle) / scale), np.float32(np.sin(angle) / scale)
    dx, dy = x - np.float32(cx), y - np.float32(cy)
    return Frame(c * dx + s * dy, c * dy - s * dx, x, y)


def ellipse(f: Frame, cu: float, cv: float, ru: float, rv: float) -> np.ndarray:
    return ((f.u - cu) / ru) ** 2 + ((f.v - cv) / rv) ** 2 <= 1


def face_outline(face: Face, f: Frame, grow: float = 0.0) -> np.ndarray:
    """The face: an ellipse on top, a squarer (male) or narrower (non-male) jaw below."""
    upper = (f.u / (face.width + grow)) ** 2 + (f.v / (1 + grow)) ** 2 <= 1
    lower = np.abs(f.u / (face.width + grow)) ** face.jaw + (f.v / (1 + grow)) ** 2 <= 1
    return np.where(f.v < 0, upper, lower)


def hair_field(face: Face, rng: np.random.Generator, f: Frame) -> np.ndarray:
    """Hair colour with streaks along the strands."""
    streaks = render.value_noise(rng, f.u * 14, f.v * 2, cells=16, octaves=2)
    return face.hair[:, None, None] * (0.7 + 0.6 * streaks)


def skin_field(face: Face, f: Frame, light: tuple[float, float]) -> np.ndarray:
    """Skin shaded as a rounded surface lit from one side."""
    bulge = np.sqrt(np.clip(1 - (f.u / (face.width + 0.1)) ** 2 - (f.v / 1.2) ** 2, 0, 1))
    shade = 0.7 + 0.25 * bulge + 0.12 * (light[0] * f.u + light[1] * f.v)
    return face.skin[:, None, None] * shade


def draw_body_and_hair(canvas: Canvas, face: Face, rng: np.random.Generator, f: Frame,
                       skin: np.ndarray) -> None:
    """Clothes, hair behind the head, neck, ears, face, beard."""
    folds = 0.85 + 0.15 * np.sign(np.sin(f.u * 6))
    canvas.paint(ellipse(f, 0, 2.75, 2.1, 1.35), face.cloth[:, None, None] * folds, BACKGROUND)
    hair = hair_field(face, rng, f)
    cap = ellipse(f, 0, -0.1, face.width + face.hair_side, 1 + face.hair_top)
    back = cap & (f.v < (1.0 if face.long_hair else -0.1))
    if face.long_hair:
        back |= (np.abs(f.u) / (face.width + face.hair_side + 0.08)) ** 4 + (f.v / face.hair_length) ** 2 <= 1
    canvas.paint(back, hair, HAIR)
    canvas.paint((np.abs(f.u) < face.width * 0.55) & (f.v > 0.3) & (f.v < 2.0), skin * 0.85, SKIN)
    for side in (-1, 1):
        canvas.paint(ellipse(f, side * face.width * 0.97, 0.02, 0.12, 0.2), skin * 0.9, SKIN)
    canvas.paint(face_outline(face, f), skin, SKIN)
    if face.beard:
        my = 0.55
        stubble = hair * (0.8 + 0.4 * (render.value_noise(rng, f.u * 30, f.v * 30, cells=32) > 0.5))
        beard = (np.abs(f.u) < face.mouth_width + 0.07) & (f.v > my - 0.15) \
            & (f.v < my - 0.05 + 0.03 * np.abs(f.u))  # moustache
        if face.beard == 2:
            beard |= face_outline(face, f, 0.03) & (f.v > 0.25 + 0.15 * (1 - (f.u / face.width) ** 2))
        canvas.paint(beard, stubble, SKIN)


def draw_features(canvas: Canvas, face: Face, rng: np.random.Generator, f: Frame, skin: np.ndarray) -> None:
    """Nose, brows, fringe, eyes, mouth and glasses."""
    nose = (f.v > -0.1) & (f.v < 0.3) & (np.abs(f.u) < 0.035 + 0.075 * (f.v + 0.1) / 0.4)
    canvas.paint(nose, skin * 0.86, NOSE)
    for side in (-1, 1):
        canvas.paint(ellipse(f, side * 0.055, 0.27, 0.035, 0.02), skin * 0.45, NOSE)
    brow_v = -0.34 - 0.05 * (1 - ((np.abs(f.u) - 0.3) / 0.17) ** 2)
    brows = (np.abs(np.abs(f.u) - 0.3) < 0.17) & (np.abs(f.v - brow_v) < face.brow / 2)
    canvas.paint(brows, face.hair * 0.7, BROW)
    draw_fringe(canvas, face, rng, f)
    for side in (-1, 1):
        draw_eye(canvas, face, f, side * 0.3, -0.12, skin)
    draw_mouth(canvas, face, f)
    if face.glasses:
        draw_glasses(canvas, face, f)


def draw_fringe(canvas: Canvas, face: Face, rng: np.random.Generator, f: Frame) -> None:
    if face.fringe == 0:
        return
    line = {1: -0.45 + 0.03 * np.cos(f.u * 25), 2: -0.5 + 0.3 * f.u, 3: -0.78 + 0.25 * f.u ** 2}[face.fringe]
    fringe = face_outline(face, f, 0.02) & (f.v < np.minimum(line, -0.42))
    canvas.paint(fringe, hair_field(face, rng, f), HAIR)


def draw_eye(canvas: Canvas, face: Face, f: Frame, cu: float, cv: float, skin: np.ndarray) -> None:
    if face.eye_shadow:
        shadow = ellipse(f, cu, cv - 0.03, 0.17, 0.1)
        canvas.paint(shadow, skin * (1 - face.eye_shadow) + face.lips[:, None, None] * face.eye_shadow * 0.5)
    white = ellipse(f, cu, cv, 0.13, 0.058)
    canvas.paint(white, np.float32([0.92, 0.9, 0.88]), EYE)
    iu, iv = cu + face.gaze[0], cv + face.gaze[1]
    canvas.paint(white & ellipse(f, iu, iv, 0.055, 0.055), face.iris)
    canvas.paint(white & ellipse(f, iu, iv, 0.024, 0.024), np.float32([0.03, 0.03, 0.03]))
    lid = white & ~ellipse(f, cu, cv + 0.012, 0.13, 0.058)
    canvas.paint(lid, np.float32([0.1, 0.07, 0.06]))


def draw_mouth(canvas: Canvas, face: Face, f: Frame) -> None:
    """Lips (and for a smile an open mouth with teeth) along a curve through the corners."""
    my, w = 0.55, face.mouth_width
    t = np.clip(f.u / w, -1, 1) ** 2
    inside = np.abs(f.u) < w
    centre = my - face.mouth_curve * t  # corners at my - curve
    top = centre - 0.04 * np.sqrt(1 - t) - 0.006
    bottom = centre + (face.mouth_open + 0.05) * np.sqrt(1 - t) + 0.006
    canvas.paint(inside & (f.v > top) & (f.v < bottom), face.lips, MOUTH)
    if face.mouth_open > 0:
        cavity = inside & (f.v > centre - 0.012) & (f.v < centre + face.mouth_open * np.sqrt(1 - t))
        canvas.paint(cavity, np.float32([0.3, 0.05, 0.06]))
        canvas.paint(cavity & (f.v < centre + 0.045 * np.sqrt(1 - t)), np.float32([0.95, 0.93, 0.88]))
    else:
        canvas.paint(inside & (np.abs(f.v - centre) < 0.008 + 0.004 * (1 - t)), face.lips * 0.45)


def draw_glasses(canvas: Canvas, face: Face, f: Frame) -> None:
    """Tinted lenses (the label stays what is behind) in dark frames with a bridge and arms."""
    radius, thick = 0.19, 0.035
    frame = np.zeros(f.u.shape, bool)
    for side in (-1, 1):
        r = np.sqrt((f.u - side * 0.3) ** 2 + ((f.v + 0.12) * 1.25) ** 2)
        lens = r < radius
        canvas.paint(lens, canvas.rgb * 0.7 + face.lens[:, None, None] * 0.3)
        frame |= (r >= radius) & (r < radius + thick)
        arm = (np.abs(f.u) > 0.3 + radius) & (np.abs(f.u) < face.width + 0.03)
        frame |= arm & (np.abs(f.v + 0.15) < thick / 2)
    frame |= (np.abs(f.v + 0.15) < thick / 2) & (np.abs(f.u) < 0.3 - radius + thick)
    canvas.paint(frame, face.frame, GLASSES)


def background(rng: np.random.Generator, f: Frame) -> np.ndarray:
    """Two random colours mixed by a smooth noise or a gradient, or blurry light blobs."""
    a, b = (render.hsv(rng.random(), rng.uniform(0, 0.7), rng.uniform(0.15, 0.95)).reshape(3, 1, 1)
            for _ in range(2))
    style = rng.integers(3)
    if style == 0:
        mix = render.value_noise(rng, f.x * 4, f.y * 4, cells=8, octaves=2)
    elif style == 1:
        angle = rng.uniform(0, 2 * np.pi)
        mix = np.clip(0.5 + np.cos(angle) * f.x + np.sin(angle) * f.y, 0, 1)
    else:
        mix = np.clip((render.value_noise(rng, f.x * 8, f.y * 8, cells=16) - 0.45) * 4, 0, 1)
    return a * mix + b * (1 - mix)


def render_face(rng: np.random.Generator, size: tuple[int, int],
                preset: str = "paper") -> dict[str, np.ndarray]:
    """One sample: image (3, H, W), segmentation in the preset's classes, attributes."""
    h, w = size
    face = sample_face(rng)
    f = face_frame(rng, h, w)
    canvas = Canvas(h, w)
    canvas.rgb[:] = background(rng, f)
    skin = skin_field(face, f, (rng.uniform(-1, 1), rng.uniform(-1, 0.5)))
    draw_body_and_hair(canvas, face, rng, f, skin)
    draw_features(canvas, face, rng, f, skin)
    n_attr = PRESETS[preset][1].channels
    return {
        "image": render.finish_image(canvas.rgb, rng, noise=(0.01, 0.04), blur=0.5),
        "segmentation": canvas.label if preset == "full" else TO_PAPER[canvas.label],
        "attributes": np.array([face.male, face.smiling, face.glasses][:n_attr], np.float32),
    }


@register_dataset(NAME)
def build(split: str, spec: DatasetSpec) -> tuple[synthetic.SyntheticDataset, DatasetInfo]:
    """Build one split of synthetic-faces (defaults: 96x96, 800/200/200 samples, preset paper)."""
    options = synthetic.resolve_options(NAME, spec.options, OPTIONS)
    if options["preset"] not in PRESETS:
        raise DataError(f"{NAME}: unknown preset {options['preset']!r}; choose one of {sorted(PRESETS)}")
    size = synthetic.resolve_size(NAME, spec, DEFAULT_SIZE)
    length = synthetic.resolve_length(NAME, spec, DEFAULT_LENGTHS, split)
    tasks = synthetic.resolve_tasks(NAME, PRESETS[options["preset"]], spec.tasks)
    renderer = partial(render_face, preset=options["preset"])
    cache = synthetic.resolve_cache(NAME, options, length, size)
    dataset = synthetic.SyntheticDataset(split=split, spec=spec, tasks=tasks, image_size=size, length=length,
                                      renderer=renderer, cache=cache)
    return dataset, DatasetInfo(NAME, tasks, size)
