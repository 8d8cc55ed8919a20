"""Writers of tiny data roots in the exact on-disk layouts of the real data sets (docs/DATA.md).

They are deliberately independent of the loaders (own attribute list, own file naming), so a
loader that misreads the format fails against them. Content is random but reproducible from
``seed``, with a few pixels pinned so tests can check values by hand:

CelebAMask-HQ masks (``size`` x ``size``), every sample:

- ``(0, 0)``: no part at all (background);
- ``(size // 2, size // 2)``: skin and nose (nose wins: class 2, "skin" in the paper preset);
- ``(1, size // 2)``: skin and hair (hair wins: class 13);
- ``(size - 1, 0)``: cloth only (class 18, background in the paper preset);
- ``(1, 1)``: hair and hat (hat wins: class 14, background in the paper preset).

Images are ``2 * size`` wide, as real CelebA-HQ images (1024) are twice the mask size (512).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

CELEBA_ATTRIBUTE_NAMES: tuple[str, ...] = (
    "5_o_Clock_Shadow", "Arched_Eyebrows", "Attractive", "Bags_Under_Eyes", "Bald", "Bangs",
    "Big_Lips", "Big_Nose", "Black_Hair", "Blond_Hair", "Blurry", "Brown_Hair", "Bushy_Eyebrows",
    "Chubby", "Double_Chin", "Eyeglasses", "Goatee", "Gray_Hair", "Heavy_Makeup",
    "High_Cheekbones", "Male", "Mouth_Slightly_Open", "Mustache", "Narrow_Eyes", "No_Beard",
    "Oval_Face", "Pale_Skin", "Pointy_Nose", "Receding_Hairline", "Rosy_Cheeks", "Sideburns",
    "Smiling", "Straight_Hair", "Wavy_Hair", "Wearing_Earrings", "Wearing_Hat",
    "Wearing_Lipstick", "Wearing_Necklace", "Wearing_Necktie", "Young",
)  # fmt: skip
CELEBA_PARTS: tuple[str, ...] = (
    "skin", "nose", "eye_g", "l_eye", "r_eye", "l_brow", "r_brow", "l_ear", "r_ear", "mouth",
    "u_lip", "l_lip", "hair", "hat", "ear_r", "neck_l", "neck", "cloth",
)  # fmt: skip
ATTRIBUTE_FILE = "CelebAMask-HQ-attribute-anno.txt"
MAPPING_FILE = "CelebA-HQ-to-CelebA-mapping.txt"
IMAGE_DIR = "CelebA-HQ-img"
MASK_DIR = "CelebAMask-HQ-mask-anno"


# --------------------------------------------------------------------------------------- NYU-v2


def _nyuv2_sample(rng: np.random.Generator, size: tuple[int, int]) -> dict[str, np.ndarray]:
    """One MTAN-style sample: float image in [0, 1], float labels with -1, metres, unit normals."""
    h, w = size
    invalid = rng.random((h, w)) < 0.15
    label = rng.integers(0, 13, (h, w)).astype(np.float32)
    label[rng.random((h, w)) < 0.1] = -1.0
    depth = rng.uniform(0.5, 9.0, (h, w, 1)).astype(np.float32)
    depth[invalid] = 0.0
    normal = rng.normal(size=(h, w, 3)).astype(np.float32)
    normal /= np.linalg.norm(normal, axis=-1, keepdims=True)
    normal[invalid] = 0.0
    image = rng.random((h, w, 3)).astype(np.float32)
    return {"image": image, "label": label, "depth": depth, "normal": normal}


def write_nyuv2(
    root: str | Path, n_train: int = 4, n_val: int = 3, size: tuple[int, int] = (24, 32), seed: int = 0
) -> Path:
    """Write ``root/{train,val}/{image,label,depth,normal}/{i}.npy`` and return ``root``."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    for split, count in (("train", n_train), ("val", n_val)):
        for modality in ("image", "label", "depth", "normal"):
            (root / split / modality).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            for modality, array in _nyuv2_sample(rng, size).items():
                np.save(root / split / modality / f"{i}.npy", array)
    return root


# -------------------------------------------------------------------------------- CelebAMask-HQ


def celeba_split_orig_idx(i: int) -> int:
    """A CelebA ``orig_idx`` putting sample ``i`` in train, val, test, train, ... (near the
    split boundaries 162771 and 182638, to catch off-by-one errors)."""
    return (162770 - i, 162771 + i, 182638 + i)[i % 3]


def _ellipse(size: int, cy: float, cx: float, ry: float, rx: float) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size]
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0


def _part_masks(rng: np.random.Generator, size: int) -> dict[str, np.ndarray]:
    """Random overlapping part masks with the pinned pixels of the module docstring."""
    s, c = size, size // 2
    jitter = lambda: rng.uniform(-0.06, 0.06) * s  # noqa: E731
    masks = {
        "skin": _ellipse(s, c + jitter(), c + jitter(), 0.4 * s, 0.3 * s),
        "nose": _ellipse(s, c + jitter(), c + jitter(), 0.08 * s, 0.05 * s),
        "l_eye": _ellipse(s, 0.4 * s + jitter(), 0.35 * s, 0.04 * s, 0.07 * s),
        "r_eye": _ellipse(s, 0.4 * s + jitter(), 0.65 * s, 0.04 * s, 0.07 * s),
        "u_lip": _ellipse(s, 0.68 * s + jitter(), c, 0.04 * s, 0.12 * s),
        "hair": rng.random((s, s)) < np.linspace(0.95, 0.0, s)[:, None],
        "neck": _ellipse(s, 0.9 * s, c + jitter(), 0.15 * s, 0.15 * s),
        "cloth": np.zeros((s, s), bool),
    }
    masks["cloth"][int(0.9 * s) :] = rng.random((s - int(0.9 * s), s)) < 0.7
    masks["hat"] = np.zeros((s, s), bool)
    masks["hat"][:2, 1:4] = True
    masks["skin"][[c, 1], [c, c]] = True
    masks["nose"][c, c] = True
    masks["hair"][[1, 1], [c, 1]] = True
    masks["cloth"][s - 1, 0] = True
    for name in ("skin", "hair", "neck", "cloth"):
        masks[name][s - 1, 0] = name == "cloth"
        masks[name][0, 0] = False
    masks["hair"][c, c] = False
    return masks


def _write_mask(path: Path, mask: np.ndarray, rgb: bool) -> None:
    """Part PNGs come as RGB or grayscale in the wild; only channel 0 matters."""
    data = mask.astype(np.uint8) * 255
    image = Image.fromarray(np.stack([data] * 3, -1) if rgb else data)
    image.save(path)


def _attribute_lines(rng: np.random.Generator, n: int) -> list[str]:
    lines = [str(n), " ".join(CELEBA_ATTRIBUTE_NAMES)]
    for i in range(n):
        values = rng.choice(["1", "-1"], size=len(CELEBA_ATTRIBUTE_NAMES))
        values[20], values[31] = ("1", "-1") if i % 2 == 0 else ("-1", "1")  # Male, Smiling
        sep = "  " if i % 2 else " "  # the real file mixes single and double spaces
        lines.append(f"{i}.jpg{sep}" + sep.join(values))
    return lines


def write_celebamask(root: str | Path, n: int = 6, size: int = 64, seed: int = 0) -> Path:
    """Write an n-image CelebAMask-HQ root in the original release layout and return ``root``.

    Sample ``i`` is Male when i is even and Smiling when i is odd; its split is given by
    `celeba_split_orig_idx`.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    (root / IMAGE_DIR).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        pixels = rng.integers(0, 256, (2 * size, 2 * size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / IMAGE_DIR / f"{i}.jpg", quality=95)
        folder = root / MASK_DIR / str(i // 2000)
        folder.mkdir(parents=True, exist_ok=True)
        for part, mask in _part_masks(rng, size).items():
            if mask.any():
                _write_mask(folder / f"{i:05d}_{part}.png", mask, rgb=part != "hair")
    (root / ATTRIBUTE_FILE).write_text("\n".join(_attribute_lines(rng, n)) + "\n")
    rows = ["idx         orig_idx    orig_file"]
    rows += [
        f"{i}      {celeba_split_orig_idx(i)}     {celeba_split_orig_idx(i) + 1:06d}.jpg" for i in range(n)
    ]
    (root / MAPPING_FILE).write_text("\n".join(rows) + "\n")
    return root
