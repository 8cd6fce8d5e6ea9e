"""A synthetic medical-like volume for tests, benchmarks and examples of the volumetric dense CRF.

Ellipsoidal blobs (one class each, 1 .. L - 1; class 0 is the background) with their own mean intensity per
channel, a smooth bias field and Gaussian voxel noise, as in an MR scan; and a noisy probability map as a CNN
would give it: the true class favoured by a margin, plus a smooth random field (errors in blobs of a few voxels)
and voxel noise, through a softmax. Made on the fly from a seed; nothing is stored.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["SyntheticVolume", "synthetic_volume"]


class SyntheticVolume(NamedTuple):
    image: np.ndarray          # [C, D, H, W] uint8 intensities
    probabilities: np.ndarray  # [L, D, H, W] float32, summing to 1 over L
    truth: np.ndarray          # [D, H, W] int64 labels


def _smooth_field(rng: np.random.Generator, shape: Sequence[int], channels: int, cell: int) -> np.ndarray:
    """A smooth random field [channels, *shape] (unit-variance noise on a grid of ``cell`` voxels, upsampled)."""
    low = [max(2, s // cell) for s in shape]
    coarse = torch.from_numpy(rng.standard_normal((1, channels, *low)).astype(np.float32))
    return F.interpolate(coarse, size=tuple(shape), mode="trilinear", align_corners=False)[0].numpy()


def synthetic_volume(shape: Sequence[int], labels: int = 3, channels: int = 1, *, seed: int = 0,
                     blobs: int | None = None, noise: float = 10.0, margin: float = 1.5,
                     prob_noise: float = 1.0) -> SyntheticVolume:
    """A volume of ``shape`` (D, H, W) with ``labels`` classes and ``channels`` modalities.

    Args:
        shape: (D, H, W).
        labels (int): L >= 2 (background and L - 1 blob classes).
        channels (int): C >= 1 image channels.
        seed (int): the random seed.
        blobs (int, optional): the number of blobs (default 2 per foreground class).
        noise (float): the voxel noise's standard deviation, 8-bit levels (default 10).
        margin (float): the true class's logit advantage in the probability map (default 1.5).
        prob_noise (float): the probability map's logit noise (smooth field and voxel noise, each this
            standard deviation; default 1).

    Returns:
        SyntheticVolume(image uint8 [C, D, H, W], probabilities float32 [L, D, H, W], truth int64 [D, H, W]).
    """
    if labels < 2 or channels < 1 or len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"synthetic_volume: needs labels >= 2, channels >= 1 and a 3-D shape, got labels={labels}, "
                         f"channels={channels}, shape={tuple(shape)}")
    rng = np.random.default_rng(seed)
    d, h, w = shape
    zz, yy, xx = np.meshgrid(np.arange(d, dtype=np.float32), np.arange(h, dtype=np.float32),
                             np.arange(w, dtype=np.float32), indexing="ij")
    truth = np.zeros(shape, dtype=np.int64)
    for k in range(blobs if blobs is not None else 2 * (labels - 1)):
        cls = 1 + k % (labels - 1)
        centre = [rng.uniform(0.2, 0.8) * s for s in shape]
        radii = [max(1.0, rng.uniform(0.08, 0.25) * s) for s in shape]
        inside = (((zz - centre[0]) / radii[0]) ** 2 + ((yy - centre[1]) / radii[1]) ** 2
                  + ((xx - centre[2]) / radii[2]) ** 2) <= 1.0
        truth[inside] = cls
    means = rng.uniform(40, 215, size=(channels, labels)).astype(np.float32)
    image = means[:, truth]                                              # [C, D, H, W]
    image += 12.0 * _smooth_field(rng, shape, channels, 32)              # bias field
    image += rng.normal(0.0, noise, size=image.shape).astype(np.float32)
    image = np.clip(np.rint(image), 0, 255).astype(np.uint8)
    logits = prob_noise * _smooth_field(rng, shape, labels, 6)
    logits += rng.normal(0.0, prob_noise, size=logits.shape).astype(np.float32)
    logits[truth[None] == np.arange(labels).reshape(labels, 1, 1, 1)] += margin
    probabilities = torch.softmax(torch.from_numpy(logits), dim=0).numpy()
    return SyntheticVolume(image, np.ascontiguousarray(probabilities), truth)
