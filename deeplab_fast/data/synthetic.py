"""A small synthetic dataset in the PASCAL VOC layout, for tests and smoke runs of the training loop.

Coloured shapes on textured backgrounds: class k (1 .. num_classes - 1) is one shape kind in one colour family
(class 1: red circles, 2: green rectangles, 3: blue triangles, 4: yellow diamonds, 5: magenta crosses, 6: cyan
ellipses), class 0 the background (grey-ish stripes plus noise), with a 255 "void" band of about 2 px along every
label boundary, as the VOC annotations have one (theirs is ~5 px). Learnable in a few hundred steps.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Tuple

import numpy as np
from PIL import Image

from .voc import voc_palette

__all__ = ["make_synthetic_voc", "SHAPES"]

SHAPES = ("circle", "rectangle", "triangle", "diamond", "cross", "ellipse")
_COLOURS = np.array([(200, 40, 40), (40, 180, 60), (40, 70, 210), (220, 200, 40), (200, 50, 200), (40, 200, 210)],
                    dtype=np.float32)


def _shape_mask(kind: str, yy, xx, cy, cx, r, angle) -> np.ndarray:
    dy, dx = yy - cy, xx - cx
    c, s = np.cos(angle), np.sin(angle)
    u, v = c * dx + s * dy, -s * dx + c * dy  # rotated coordinates
    if kind == "circle":
        return dx * dx + dy * dy <= r * r
    if kind == "rectangle":
        return (np.abs(u) <= r) & (np.abs(v) <= 0.6 * r)
    if kind == "triangle":  # equilateral-ish: three half-planes
        m = np.ones_like(u, dtype=bool)
        for k in range(3):
            a = angle + 2 * np.pi * k / 3
            m &= (np.cos(a) * dx + np.sin(a) * dy) <= 0.5 * r
        return m
    if kind == "diamond":
        return np.abs(u) + np.abs(v) <= r
    if kind == "cross":
        return ((np.abs(u) <= r) & (np.abs(v) <= 0.3 * r)) | ((np.abs(v) <= r) & (np.abs(u) <= 0.3 * r))
    return (u / r) ** 2 + (v / (0.5 * r)) ** 2 <= 1.0  # ellipse


def _boundary(label: np.ndarray) -> np.ndarray:
    """Pixels with an 8-neighbour of another label (a ~2 px band across each edge)."""
    H, W = label.shape
    p = np.pad(label, 1, mode="edge")
    band = np.zeros((H, W), dtype=bool)
    for dy in (0, 1, 2):
        for dx in (0, 1, 2):
            if dy != 1 or dx != 1:
                band |= p[dy:dy + H, dx:dx + W] != label
    return band


def _sample(rng: np.random.Generator, H: int, W: int, num_classes: int):
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)
    # background: a low-saturation base colour, stripes at a random angle and frequency, pixel noise
    base = rng.uniform(70, 170) + rng.uniform(-20, 20, size=3)
    theta, freq = rng.uniform(0, np.pi), rng.uniform(0.15, 0.6)
    stripes = np.sin(freq * (np.cos(theta) * xx + np.sin(theta) * yy) + rng.uniform(0, 2 * np.pi))
    img = base[None, None, :] + rng.uniform(10, 30) * stripes[..., None]
    label = np.zeros((H, W), dtype=np.uint8)
    for _ in range(int(rng.integers(1, 4))):
        k = int(rng.integers(1, num_classes))
        r = rng.uniform(0.12, 0.3) * min(H, W)
        cy, cx = rng.uniform(r * 0.5, H - r * 0.5), rng.uniform(r * 0.5, W - r * 0.5)
        mask = _shape_mask(SHAPES[k - 1], yy, xx, cy, cx, r, rng.uniform(0, np.pi))
        if not mask.any():
            continue
        colour = _COLOURS[k - 1] + rng.uniform(-30, 30, size=3)
        shade = 1.0 + 0.15 * (yy - cy) / max(r, 1.0)  # a little shading across the object
        img[mask] = colour[None, :] * shade[mask][:, None]
        label[mask] = k
    img += rng.normal(0, 8, size=img.shape)
    label[_boundary(label)] = 255
    return np.clip(img, 0, 255).astype(np.uint8), label


def make_synthetic_voc(root, num_train: int = 64, num_val: int = 16, size: Tuple[int, int] = (96, 128),
                       num_classes: int = 4, seed: int = 0) -> Path:
    """Writes a VOC-layout dataset into ``root`` (created if needed; it becomes the ``VOC2012`` folder) and returns
    ``Path(root)``:

    - ``JPEGImages/<id>.jpg``: RGB, ``size`` = (height, width), JPEG quality 95;
    - ``SegmentationClass/<id>.png``: palette PNGs with the VOC colour map, indices in {0 .. num_classes - 1, 255};
    - ``ImageSets/Segmentation/{train,val,trainval}.txt``: ids ``train_000000`` .. / ``val_000000`` ...

    ``num_classes`` (background included) in [2, 7]. Deterministic from ``seed`` (numpy's PCG64). A few ms per
    96x128 image. ValueError for bad arguments.
    """
    for name, v, lo in (("num_train", num_train, 0), ("num_val", num_val, 0), ("seed", seed, 0)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ValueError(f"make_synthetic_voc: {name} must be an int >= {lo}, got {v!r}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or not 2 <= num_classes <= len(SHAPES) + 1:
        raise ValueError(f"make_synthetic_voc: num_classes must be an int in [2, {len(SHAPES) + 1}], got "
                         f"{num_classes!r}")
    if not isinstance(size, (tuple, list)) or len(size) != 2 or any(
            isinstance(s, bool) or not isinstance(s, int) or s < 8 for s in size):
        raise ValueError(f"make_synthetic_voc: size must be (height, width), each an int >= 8, got {size!r}")
    root = Path(os.fspath(root)).expanduser()
    img_dir, lbl_dir, set_dir = root / "JPEGImages", root / "SegmentationClass", root / "ImageSets" / "Segmentation"
    for d in (img_dir, lbl_dir, set_dir):
        d.mkdir(parents=True, exist_ok=True)
    palette = voc_palette().reshape(-1).tolist()
    rng = np.random.default_rng(seed)
    H, W = size
    splits = {"train": [f"train_{i:06d}" for i in range(num_train)], "val": [f"val_{i:06d}" for i in range(num_val)]}
    for ids in splits.values():
        for name in ids:
            img, label = _sample(rng, H, W, num_classes)
            Image.fromarray(img).save(img_dir / f"{name}.jpg", quality=95)
            lbl = Image.frombytes("P", (W, H), np.ascontiguousarray(label).tobytes())
            lbl.putpalette(palette)
            lbl.save(lbl_dir / f"{name}.png")
    for split, ids in (*splits.items(), ("trainval", splits["train"] + splits["val"])):
        (set_dir / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
    return root
