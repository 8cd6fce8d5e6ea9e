"""SimpleCRF's ``denseCRF3D`` module: the 3-D dense CRF of a multi-modal volume (Kamnitsas et al.'s dense3dCrf;
drop-in, see ``deeplab_fast.simplecrf``)."""
from __future__ import annotations

import warnings
from collections.abc import Mapping

import numpy as np
import torch

from ..ops.dense_crf import dense_crf_features
from ..ops.dense_crf_3d import MAX_CHANNELS, dense_crf_3d
from ._common import (check_extent, image_array, labels_from_marginals, probability_array, read_iterations,
                      read_number, unary_from_probabilities)

__all__ = ["densecrf3d", "PARAM_KEYS"]

# SimpleCRF's parameter dictionary (densecrf_python/densecrf3d.cpp), what each key means.
PARAM_KEYS = {
    "MaxIterations": "the number of mean-field iterations (truncated to an int)",
    "PosRStd": "the smoothness term's standard deviation along the last axis (W), voxels",
    "PosCStd": "the smoothness term's standard deviation along H, voxels",
    "PosZStd": "the smoothness term's standard deviation along the first axis (D), voxels",
    "PosW": "the smoothness term's Potts weight",
    "BilateralRStd": "the appearance term's spatial standard deviation along W, voxels",
    "BilateralCStd": "the appearance term's spatial standard deviation along H, voxels",
    "BilateralZStd": "the appearance term's spatial standard deviation along D, voxels",
    "ModalityNum": "the number of image channels C",
    "BilateralW": "the appearance term's Potts weight",
    "BilateralModsStds": "the appearance term's intensity standard deviation of each channel (a tuple of C "
                         "numbers), 8-bit levels",
}
_STDS = ("PosRStd", "PosCStd", "PosZStd", "BilateralRStd", "BilateralCStd", "BilateralZStd")
# SimpleCRF's bilateral term exists for 1 to 5 modalities (densecrf3d_util.cpp); it is dropped for more.
SIMPLECRF_MAX_MODALITIES = 5


def _read_param(param, channels: int) -> dict:
    if not isinstance(param, Mapping):
        raise ValueError(f"param must be a dict with the keys {', '.join(PARAM_KEYS)}, got {type(param).__name__}")
    missing = [k for k in PARAM_KEYS if k not in param]
    if missing:
        unknown = sorted(str(k) for k in param if k not in PARAM_KEYS)
        raise ValueError(f"param is missing {', '.join(repr(k) for k in missing)} ({PARAM_KEYS[missing[0]]})"
                         + (f"; unknown keys: {', '.join(repr(k) for k in unknown)}" if unknown else ""))
    out = {"MaxIterations": read_iterations(param["MaxIterations"], "param['MaxIterations']")}
    for key in _STDS:
        out[key] = read_number(param[key], f"param[{key!r}]", positive=True)
    for key in ("PosW", "BilateralW"):
        out[key] = read_number(param[key], f"param[{key!r}]")
    modalities = read_number(param["ModalityNum"], "param['ModalityNum']")
    if modalities != channels:
        raise ValueError(f"param['ModalityNum'] is {param['ModalityNum']!r} but I has {channels} channel(s) "
                         "(its last axis)")
    stds = param["BilateralModsStds"]
    if isinstance(stds, (str, bytes)) or not hasattr(stds, "__len__"):
        raise ValueError(f"param['BilateralModsStds'] must be a tuple of {channels} numbers (one per channel), got "
                         f"{type(stds).__name__} {stds!r}")
    if len(stds) != channels:
        raise ValueError(f"param['BilateralModsStds'] must have one value per channel ({channels}), got {len(stds)}")
    out["BilateralModsStds"] = tuple(read_number(v, f"param['BilateralModsStds'][{k}]", positive=True)
                                     for k, v in enumerate(stds))
    return out


def _f32(v: float) -> float:
    return float(np.float32(v))


def _simplecrf_features(shape, image: np.ndarray, p: dict, bilateral: bool):
    """SimpleCRF's features: the lattice of DenseCRF3D(W_=shape[0], H_=shape[1], Z_=shape[2]) over voxels in C
    order, i.e. storage index n at (n % D, (n // D) % H, n // (D * H)), divided by (R, C, Z) standard deviations
    in float32; then each channel's intensity / its standard deviation."""
    d, h, w = shape
    n = torch.arange(d * h * w)
    coords = [(n % d).float(), ((n // d) % h).float(), (n // (d * h)).float()]
    gauss = torch.stack([c / _f32(p[k]) for c, k in zip(coords, ("PosRStd", "PosCStd", "PosZStd"))])
    feats = [gauss[None]]
    if bilateral:
        rows = [c / _f32(p[k]) for c, k in zip(coords, ("BilateralRStd", "BilateralCStd", "BilateralZStd"))]
        values = torch.from_numpy(image.reshape(-1, image.shape[-1])).float()
        rows += [values[:, ch] / _f32(s) for ch, s in enumerate(p["BilateralModsStds"])]
        feats.append(torch.stack(rows)[None])
    return feats


def densecrf3d(I, P, param, *, simplecrf_order: bool = False) -> np.ndarray:
    """3-D dense CRF inference, as SimpleCRF's ``denseCRF3D.densecrf3d``.

    The model of SimpleCRF (dense3dCrf's ``DenseCRF3D``): the unary ``-log(P)``, a smoothness term on the voxel
    positions (Potts ``PosW``) and an appearance term on positions and the intensities of the C channels (Potts
    ``BilateralW``), symmetric normalisation, ``int(MaxIterations)`` mean-field iterations, the most probable
    label per voxel. It runs :func:`deeplab_fast.ops.dense_crf_3d` with ``spacing`` 1,
    ``gaussian_sigma=(PosZStd, PosCStd, PosRStd)``, ``bilateral_sigma=(BilateralZStd, BilateralCStd,
    BilateralRStd)`` and ``intensity_sigma=BilateralModsStds``.

    Args:
        I (ndarray[D, H, W, C], uint8): the image, C = 1..13 co-registered channels, values 0..255.
        P (ndarray[D, H, W, L], float32): the probability of each of L labels per voxel (0 means impossible;
            every voxel needs one non-zero).
        param (dict): SimpleCRF's keys ``MaxIterations``, ``PosRStd``, ``PosCStd``, ``PosZStd``, ``PosW``,
            ``BilateralRStd``, ``BilateralCStd``, ``BilateralZStd``, ``ModalityNum`` (= C), ``BilateralW``,
            ``BilateralModsStds`` (a tuple of C numbers); standard deviations in voxels and 8-bit levels. Other
            keys are ignored. The ``R`` standard deviations act along the last axis (W), ``C`` along H, ``Z``
            along the first axis (D), as SimpleCRF's on a volume with D == W.
        simplecrf_order (bool, keyword): reproduce SimpleCRF 0.2.1.1's scrambled positions and feature order
            (see the package docstring) to match its labels; default False (the correct geometry).

    Returns:
        ndarray[D, H, W], int8: the labels.

    Raises:
        ValueError: ``I`` not uint8 [D, H, W, C] with 1 to 13 channels; ``P`` not [D, H, W, L] of the same
            volume, with NaN, inf, negative values, more than 128 labels or a voxel whose probabilities are all 0;
            ``param`` not a dict, a missing key, a value that is not a number, a non-positive standard deviation,
            ``ModalityNum`` or ``BilateralModsStds`` not matching C (each message names the key).
        MemoryError: the volume does not fit in memory (see :func:`deeplab_fast.ops.dense_crf_3d_memory`).
    """
    if not isinstance(simplecrf_order, bool):
        raise ValueError(f"simplecrf_order must be a bool, got {type(simplecrf_order).__name__}")
    image = image_array(I, 4, "[D, H, W, C]")
    prob = probability_array(P, 4, "[D, H, W, L]")
    if prob.shape[:3] != image.shape[:3]:
        raise ValueError(f"P {prob.shape} and I {image.shape} must have the same volume shape [D, H, W]")
    channels = image.shape[3]
    p = _read_param(param, channels)
    shape, labels = prob.shape[:3], prob.shape[3]
    unary = unary_from_probabilities(prob)
    if simplecrf_order:
        for key, extent in zip(_STDS, (shape[0], shape[1], max(shape[2], 1)) * 2):
            check_extent(p[key], max(extent - 1, 1), f"param[{key!r}]")
        for k, s in enumerate(p["BilateralModsStds"]):
            check_extent(s, 255, f"param['BilateralModsStds'][{k}]")
        bilateral = channels <= SIMPLECRF_MAX_MODALITIES
        if not bilateral:
            warnings.warn(f"simplecrf_order=True: SimpleCRF has no bilateral term for more than "
                          f"{SIMPLECRF_MAX_MODALITIES} modalities (got {channels}); reproducing that, the appearance "
                          "term is left out", stacklevel=2)
        q = dense_crf_features(unary, _simplecrf_features(shape, image, p, bilateral),
                               [p["PosW"], p["BilateralW"]][:2 if bilateral else 1], iterations=p["MaxIterations"])
        return labels_from_marginals(q, shape)
    if channels > MAX_CHANNELS:
        raise ValueError(f"I has {channels} channels; at most {MAX_CHANNELS} are supported")
    try:
        q = dense_crf_3d(unary.view(1, labels, *shape), torch.from_numpy(image).permute(3, 0, 1, 2)[None],
                         gaussian_sigma=(p["PosZStd"], p["PosCStd"], p["PosRStd"]), gaussian_compat=p["PosW"],
                         bilateral_sigma=(p["BilateralZStd"], p["BilateralCStd"], p["BilateralRStd"]),
                         intensity_sigma=p["BilateralModsStds"], bilateral_compat=p["BilateralW"],
                         iterations=p["MaxIterations"])
    except ValueError as exc:  # a standard deviation too small for the volume: name the param key
        raise ValueError(f"{exc} (param: gaussian_sigma = (PosZStd, PosCStd, PosRStd), bilateral_sigma = "
                         "(BilateralZStd, BilateralCStd, BilateralRStd), intensity_sigma = BilateralModsStds)") from None
    return labels_from_marginals(q.view(1, labels, -1), shape)
