"""What the SimpleCRF drop-in's 2-D and 3-D modules share: input arrays checked as SimpleCRF takes them, the
unary from probabilities, the parameters read and checked by name, and the labels as SimpleCRF returns them."""
from __future__ import annotations

import math
import numbers

import numpy as np
import torch

from .._validation import host_array

# SimpleCRF returns int8 labels: at most 128 labels can be told apart.
MAX_LABELS = 128


def _writable(arr: np.ndarray) -> np.ndarray:
    """``arr``, copied when read-only (e.g. ``np.asarray`` of a PIL image): torch tensors share the memory."""
    return arr if arr.flags.writeable else arr.copy()


def image_array(I, ndim: int, layout: str) -> np.ndarray:
    """``I`` as a C-contiguous uint8 array of ``ndim`` dimensions (SimpleCRF casts to uint8 where numpy may do so
    safely: uint8 and bool)."""
    arr = np.asarray(host_array(I, "I"))
    if arr.dtype not in (np.uint8, np.bool_):
        raise ValueError(f"I must be a uint8 array {layout} (values 0..255, as SimpleCRF takes it), got dtype "
                         f"{arr.dtype}; convert it, e.g. np.asarray(I / I.max() * 255, np.uint8)")
    if arr.ndim != ndim:
        raise ValueError(f"I must be {ndim}-D {layout}, got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"I must not be empty, got shape {arr.shape}")
    return _writable(np.ascontiguousarray(arr, dtype=np.uint8))


def probability_array(P, ndim: int, layout: str, clipped: bool = False) -> np.ndarray:
    """``P`` as a C-contiguous float32 array of ``ndim`` dimensions, checked: finite, at most 128 labels, and,
    unless the caller clips the probabilities (``clipped``, as SimpleCRF's 2-D module does), >= 0 and non-zero
    for some label at every voxel."""
    arr = np.asarray(host_array(P, "P"))
    if arr.dtype.kind not in "fiub":
        raise ValueError(f"P must be a float32 array {layout} of probabilities, got dtype {arr.dtype}")
    if arr.ndim != ndim:
        raise ValueError(f"P must be {ndim}-D {layout}, got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"P must not be empty, got shape {arr.shape}")
    if arr.shape[-1] > MAX_LABELS:
        raise ValueError(f"P has {arr.shape[-1]} labels; the int8 labels SimpleCRF returns hold at most {MAX_LABELS}")
    arr = _writable(np.ascontiguousarray(arr, dtype=np.float32))
    if not np.isfinite(arr).all():
        raise ValueError("P contains NaN or inf")
    if clipped:
        return arr
    if (arr < 0).any():
        raise ValueError("P contains negative values; it must hold probabilities (>= 0)")
    nothing = ~(arr > 0).any(axis=-1)
    if nothing.any():
        where = tuple(int(i) for i in np.argwhere(nothing)[0])
        raise ValueError(f"P is 0 for every label at {int(nothing.sum())} position(s), e.g. {where}: at least one "
                         "label must have a non-zero probability")
    return arr


def unary_from_probabilities(p: np.ndarray, clip: tuple | None = None) -> torch.Tensor:
    """[..., L] float32 probabilities -> [1, L, N] float32 energies ``-log(p)`` (0 becomes +inf, an impossible
    label), evaluated in float64 and rounded once; with ``clip`` = (lo, hi), of the clipped probabilities."""
    L = p.shape[-1]
    p = p.reshape(-1, L)
    if clip is not None:
        p = np.clip(p, np.float32(clip[0]), np.float32(clip[1]))
    with np.errstate(divide="ignore"):
        energy = (-np.log(p.astype(np.float64))).astype(np.float32)
    return torch.from_numpy(np.ascontiguousarray(energy.T))[None]


def check_extent(sigma: float, extent: float, name: str) -> None:
    """The lattice takes features up to 2^19: ``extent / sigma`` (the largest position or intensity divided by its
    standard deviation) must stay below it."""
    if extent / float(np.float32(sigma)) > 2.0**19:
        raise ValueError(f"{name} = {sigma!r} is too small for this input (values up to {extent:g}): at least "
                         f"{extent / 2.0**19:.3g}")


def read_number(value, name: str, *, positive: bool = False) -> float:
    """A parameter SimpleCRF reads as a C double: a real number, finite in float32 (positive when asked)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    v = float(value)
    if not math.isfinite(v) or abs(v) > float(np.finfo(np.float32).max):
        raise ValueError(f"{name} must be finite (in float32), got {value!r}")
    if positive and not float(np.float32(v)) > 0:
        raise ValueError(f"{name} must be > 0 (a standard deviation), got {value!r}")
    return v


def read_iterations(value, name: str) -> int:
    """SimpleCRF's iteration count: a number, truncated to an int as its C++ does (5.0 -> 5)."""
    v = read_number(value, name)
    if v < 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")
    if v > 2**31 - 1:
        raise ValueError(f"{name} must be at most 2^31 - 1, got {value!r}")
    return int(v)


def labels_from_marginals(q: torch.Tensor, shape) -> np.ndarray:
    """argmax over the labels of Q [1, L, N] (the first maximum, as Eigen's maxCoeff), as int8 of ``shape``."""
    return q[0].argmax(0).to(torch.int8).numpy().reshape(shape)
