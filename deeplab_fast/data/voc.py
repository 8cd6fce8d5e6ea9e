"""The PASCAL VOC 2012 semantic segmentation set (Everingham et al., IJCV 2010), as the DeepLab papers train on it:
the 1,464 / 1,449 train / val images, or the 10,582 "train_aug" images with the extra annotations of Hariharan et
al., "Semantic Contours from Inverse Detectors" (SBD), ICCV 2011 (DeepLab v1 ICLR 2015 sec. 5, v2 TPAMI 2017
sec. 4.1).

Layout (``root`` is the ``VOC2012`` folder; its parent holding ``VOCdevkit/VOC2012``, or ``VOCdevkit`` itself,
are found too)::

    VOC2012/
      JPEGImages/<id>.jpg
      SegmentationClass/<id>.png            palette PNGs: pixel = class index, 255 = boundary / void
      ImageSets/Segmentation/{train,val,trainval}.txt
      SegmentationClassAug/<id>.png         augmented=True: the SBD + VOC labels (palette or grey PNGs)
      ImageSets/Segmentation/train_aug.txt  augmented=True, split "train" (and trainval_aug.txt for "trainval")

This is the common "VOC aug" layout (as kazuto1011/deeplab-pytorch and most DeepLab ports use it). With
``augmented=True`` the labels come from ``SegmentationClassAug/``; the list is ``{split}_aug.txt`` for the
splits "train" and "trainval" and ``{split}.txt`` otherwise (val stays the 1,449 VOC images). List lines are
either ids or the Caffe DeepLab list format ``/JPEGImages/<id>.jpg /SegmentationClassAug/<id>.png`` (the id is
taken from the first path).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, List, Optional, Tuple

import numpy as np
import torch
from PIL import Image

__all__ = ["VOCSegmentation", "find_voc_root", "voc_palette", "colorize"]

_AUG_SPLITS = ("train", "trainval")


def find_voc_root(root) -> Path:
    """The ``VOC2012`` folder from ``root``: root itself if it has ``JPEGImages/`` or ``ImageSets/``, else
    ``root/VOCdevkit/VOC2012`` or ``root/VOC2012`` if one exists. FileNotFoundError naming ``root`` if it does not
    exist; otherwise root itself (the missing split file is reported later)."""
    root = Path(os.fspath(root)).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"VOCSegmentation: root {str(root)!r} does not exist or is not a folder")
    if (root / "JPEGImages").is_dir() or (root / "ImageSets").is_dir():
        return root
    for sub in (Path("VOCdevkit") / "VOC2012", Path("VOC2012")):
        if (root / sub / "JPEGImages").is_dir() or (root / sub / "ImageSets").is_dir():
            return root / sub
    return root


def _read_ids(list_file: Path) -> List[str]:
    ids = []
    for line in list_file.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        first = line.split()[0]
        ids.append(Path(first).stem if ("/" in first or "." in first) else first)
    return ids


class VOCSegmentation(torch.utils.data.Dataset):
    """PASCAL VOC 2012 segmentation pairs.

    ``VOCSegmentation(root, split="train", augmented=False, transform=None)``: see the module docstring for the
    layout and the lists. ``dataset[i]`` is ``(image, target)``: without a transform ``image`` is a uint8
    Tensor[3, H, W] RGB and ``target`` an int64 Tensor[H, W] of class indices (the palette PNG's indices; 255 =
    boundary / void, to ignore); with one, ``transform(image, target)``. ``ids`` lists the image names;
    ``images`` / ``labels`` their paths.

    FileNotFoundError naming the path for a missing root, split list, or image / label file (all files are
    checked up front); ValueError for an empty list, a label PNG that is not single-channel (palette or grey),
    or an image and label of different sizes.
    """

    def __init__(self, root, split: str = "train", augmented: bool = False,
                 transform: Optional[Callable] = None):
        if not isinstance(split, str) or not split:
            raise ValueError(f"VOCSegmentation: split must be a non-empty str, got {split!r}")
        self.root = find_voc_root(root)
        self.split = split
        self.augmented = bool(augmented)
        self.transform = transform
        list_name = f"{split}_aug.txt" if self.augmented and split in _AUG_SPLITS else f"{split}.txt"
        list_file = self.root / "ImageSets" / "Segmentation" / list_name
        if not list_file.is_file():
            raise FileNotFoundError(f"VOCSegmentation: split list {str(list_file)!r} not found")
        self.ids: List[str] = _read_ids(list_file)
        if not self.ids:
            raise ValueError(f"VOCSegmentation: split list {str(list_file)!r} is empty")
        label_dir = self.root / ("SegmentationClassAug" if self.augmented else "SegmentationClass")
        self.images: List[Path] = [self.root / "JPEGImages" / f"{i}.jpg" for i in self.ids]
        self.labels: List[Path] = [label_dir / f"{i}.png" for i in self.ids]
        for path in (p for pair in zip(self.images, self.labels) for p in pair):
            if not path.is_file():
                raise FileNotFoundError(f"VOCSegmentation: {str(path)!r} not found (listed in {str(list_file)!r})")

    def __len__(self) -> int:
        return len(self.ids)

    def load(self, index: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """The untransformed pair of item ``index``."""
        img_path, lbl_path = self.images[index], self.labels[index]
        for path in (img_path, lbl_path):
            if not path.is_file():
                raise FileNotFoundError(f"VOCSegmentation: {str(path)!r} not found")
        with Image.open(img_path) as im:
            image = np.asarray(im.convert("RGB"))
        with Image.open(lbl_path) as lb:
            if lb.mode not in ("P", "L", "I", "I;16"):
                raise ValueError(f"VOCSegmentation: label {str(lbl_path)!r} is a {lb.mode!r} image; expected a "
                                 "palette ('P') or grey ('L') PNG of class indices")
            label = np.asarray(lb)
        if label.shape != image.shape[:2]:
            raise ValueError(f"VOCSegmentation: label {str(lbl_path)!r} is {label.shape}, image "
                             f"{str(img_path)!r} {image.shape[:2]}")
        image_t = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))
        target_t = torch.from_numpy(label.astype(np.int64))
        return image_t, target_t

    def __getitem__(self, index: int):
        image, target = self.load(index)
        if self.transform is not None:
            return self.transform(image, target)
        return image, target

    def __repr__(self) -> str:
        return (f"VOCSegmentation(root={str(self.root)!r}, split={self.split!r}, augmented={self.augmented}, "
                f"{len(self)} images)")


def voc_palette(n: int = 256) -> np.ndarray:
    """The PASCAL VOC colour map: [n, 3] uint8, label k's colour from the bits of k (the VOC devkit's
    ``labelcolormap``)."""
    palette = np.zeros((n, 3), dtype=np.uint8)
    for k in range(n):
        c, r, g, b = k, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette[k] = (r, g, b)
    return palette


def colorize(labels: np.ndarray) -> np.ndarray:
    """[H, W] integer labels -> [H, W, 3] uint8 VOC colours (labels modulo 256)."""
    return voc_palette()[np.asarray(labels).astype(np.int64) % 256]
