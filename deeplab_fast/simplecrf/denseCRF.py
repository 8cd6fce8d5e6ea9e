"""SimpleCRF's ``denseCRF`` module: the 2-D dense CRF of an RGB image (drop-in; see ``deeplab_fast.simplecrf``)."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from ..ops.dense_crf import dense_crf_features
from ._common import (check_extent, image_array, labels_from_marginals, probability_array, read_iterations,
                      read_number, unary_from_probabilities)

__all__ = ["densecrf"]

# SimpleCRF's 6-tuple, in order (densecrf_python/densecrf.cpp, CRFParam in densecrf_core.h).
PARAM_NAMES = ("w1", "alpha", "beta", "w2", "gamma", "it")
_MEANING = {"w1": "the bilateral term's weight", "alpha": "its spatial standard deviation, pixels",
            "beta": "its colour standard deviation, 8-bit levels", "w2": "the spatial term's weight",
            "gamma": "its standard deviation, pixels", "it": "the number of iterations"}
_CLIP = (0.01, 0.99)  # SimpleCRF's computeUnary clamps the probabilities to these (as floats)


def _read_param(param: Sequence) -> dict:
    if isinstance(param, (str, bytes, dict)) or not hasattr(param, "__len__"):
        raise ValueError(f"param must be a tuple (w1, alpha, beta, w2, gamma, it), got {type(param).__name__}")
    if len(param) != len(PARAM_NAMES):
        raise ValueError(f"param must have 6 values (w1, alpha, beta, w2, gamma, it), got {len(param)}")
    out = {}
    for k, (key, value) in enumerate(zip(PARAM_NAMES, param)):
        name = f"param[{k}] ({key}, {_MEANING[key]})"
        if key == "it":
            out[key] = read_iterations(value, name)
        else:
            out[key] = read_number(value, name, positive=key in ("alpha", "beta", "gamma"))
    return out


def densecrf(I, P, param) -> np.ndarray:
    """2-D dense CRF inference, as SimpleCRF's ``denseCRF.densecrf``.

    The model of SimpleCRF's ``dense_crf_inference``: pydensecrf's ``DenseCRF2D`` with the unary
    ``-log(clip(P, 0.01, 0.99))``, ``addPairwiseBilateral(alpha, alpha, beta, beta, beta, I, Potts(w1))`` then
    ``addPairwiseGaussian(gamma, gamma, Potts(w2))`` (symmetric normalisation), ``int(it)`` mean-field
    iterations, and the most probable label of every pixel.

    Args:
        I (ndarray[H, W, 3], uint8): the RGB image.
        P (ndarray[H, W, L], float32): the probability of each of L labels per pixel (clipped to [0.01, 0.99],
            as SimpleCRF does).
        param (tuple): ``(w1, alpha, beta, w2, gamma, it)``: bilateral weight (e.g. 10), its spatial standard
            deviation in pixels (80) and colour standard deviation in 8-bit levels (13), the spatial term's weight
            (3) and standard deviation (3), the number of iterations (5; truncated to an int).

    Returns:
        ndarray[H, W], int8: the labels.

    Raises:
        ValueError: ``I`` not uint8 [H, W, 3]; ``P`` not 3-D, not finite, with more than 128 labels or another
            image size; a ``param`` that is not 6 numbers, a non-positive standard deviation, negative ``it``
            (the message names the entry).
    """
    image = image_array(I, 3, "[H, W, 3]")
    if image.shape[2] != 3:
        raise ValueError(f"I must be an RGB image [H, W, 3], got shape {image.shape}")
    prob = probability_array(P, 3, "[H, W, L]", clipped=True)
    if prob.shape[:2] != image.shape[:2]:
        raise ValueError(f"P {prob.shape} and I {image.shape} must have the same height and width")
    p = _read_param(param)
    h, w, labels = prob.shape
    for key, extent in (("alpha", max(h, w) - 1), ("beta", 255), ("gamma", max(h, w) - 1)):
        check_extent(p[key], extent, f"param[{PARAM_NAMES.index(key)}] ({key})")
    unary = unary_from_probabilities(prob, _CLIP)
    rgb = torch.from_numpy(image).permute(2, 0, 1)[None]
    gaussian, bilateral = torch.ops.deeplab_fast.dense_crf_image_features(rgb, p["gamma"], p["alpha"], p["beta"])
    q = dense_crf_features(unary, [bilateral, gaussian], [p["w1"], p["w2"]], iterations=p["it"])
    return labels_from_marginals(q, (h, w))
