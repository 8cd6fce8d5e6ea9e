"""Inference preprocessing of the DeepLab models: what ``weights.transforms()`` returns.

``SegmentationPreset(preprocessing)`` turns uint8 RGB images (a Tensor[..., 3, H, W], or a numpy [H, W, 3] /
[B, H, W, 3] array) into the model's float32 input Tensor[B, 3, H, W] (or [3, H, W]), normalised as the
weights expect (``deeplab_fast.data.transforms.normalize``):

- ``"torchvision"``: RGB / 255, minus the ImageNet mean, over its std (torchvision's weights);
- ``"caffe"``: BGR in 0-255 minus the Caffe mean (the Caffe-converted DeepLab v1 / v2 weights).

No resizing: the models take any size and return logits at the input's.
"""
from __future__ import annotations

import numpy as np
import torch

from ..data.transforms import (CAFFE_MEAN_BGR, IMAGENET_MEAN, IMAGENET_STD, PREPROCESSING_CHOICES,  # noqa: F401
                               normalize)

__all__ = ["SegmentationPreset", "normalization_meta"]


def normalization_meta(preprocessing: str) -> dict:
    """The ``meta["normalization"]`` entry of a preprocessing ("torchvision" or "caffe")."""
    if preprocessing == "torchvision":
        return {"preprocessing": "torchvision", "channels": "RGB", "scale": "0-1", "mean": IMAGENET_MEAN,
                "std": IMAGENET_STD}
    if preprocessing == "caffe":
        return {"preprocessing": "caffe", "channels": "BGR", "scale": "0-255", "mean": CAFFE_MEAN_BGR,
                "std": (1.0, 1.0, 1.0)}
    raise ValueError(f"normalization_meta: preprocessing must be one of {PREPROCESSING_CHOICES}, got "
                     f"{preprocessing!r}")


class SegmentationPreset:
    """The preprocessing of a set of weights: ``preset(images) -> float32 Tensor`` (see the module docstring)."""

    def __init__(self, preprocessing: str = "torchvision"):
        normalization_meta(preprocessing)  # checks the preprocessing
        self.preprocessing = preprocessing

    def __call__(self, images) -> torch.Tensor:
        if isinstance(images, np.ndarray):
            if images.dtype != np.uint8 or images.ndim not in (3, 4) or images.shape[-1] != 3:
                raise ValueError(f"SegmentationPreset: a numpy image must be uint8 [H, W, 3] or [B, H, W, 3], got "
                                 f"{images.dtype} {images.shape}")
            images = torch.from_numpy(np.array(images, dtype=np.uint8)).movedim(-1, -3)  # a writable copy
        return normalize(images, self.preprocessing)

    def __repr__(self) -> str:
        return f"SegmentationPreset(preprocessing={self.preprocessing!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, SegmentationPreset) and other.preprocessing == self.preprocessing

    def __hash__(self) -> int:
        return hash(self.preprocessing)
