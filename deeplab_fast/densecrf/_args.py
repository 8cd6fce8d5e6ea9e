"""Argument checks of the pydensecrf drop-in (deeplab_fast.densecrf): pydensecrf's argument conventions, turned into
what the dense CRF ops take, with a ValueError naming the argument for anything else."""
from __future__ import annotations

import numbers

import numpy as np
import torch

from .._validation import host_array

__all__ = ["enum_value", "float_matrix", "compat_tensor", "per_axis"]


def enum_value(x, enum_cls, name: str) -> int:
    if isinstance(x, bool) or not isinstance(x, numbers.Integral):
        raise ValueError(f"{name} must be one of {[m.name for m in enum_cls]}, got {type(x).__name__} {x!r}")
    try:
        return int(enum_cls(int(x)))
    except ValueError:
        raise ValueError(f"{name} must be one of {[f'{m.name} ({int(m)})' for m in enum_cls]}, got {x!r}") from None


def float_matrix(a, name: str) -> np.ndarray:
    """``a`` as a fresh C-contiguous float32 2-D array; a ValueError naming ``name`` if it is not a 2-D float array."""
    arr = np.asarray(host_array(a, name))
    if arr.dtype.kind != "f":
        raise ValueError(f"{name} must be a float array (float32 like pydensecrf), got dtype {arr.dtype}")
    if arr.ndim != 2:
        raise ValueError(f"{name} must be 2-D, got {arr.ndim}-D with shape {arr.shape}")
    return np.array(arr, dtype=np.float32, order="C", copy=True)


def compat_tensor(compat, nlabels: int) -> torch.Tensor:
    """pydensecrf's ``compat`` argument as the op takes it: a number is a Potts weight, a 1-D array a diagonal
    compatibility, a 2-D array a label compatibility matrix (symmetrised by the op, as pydensecrf does)."""
    if isinstance(compat, bool):
        raise ValueError("compat must be a number or a float array, got bool")
    if isinstance(compat, numbers.Real):
        w = torch.tensor(float(compat), dtype=torch.float32)  # a finite double may overflow to inf here
        if not torch.isfinite(w):
            raise ValueError(f"compat must be finite in float32 (|value| <= 3.4e38), got {compat}")
        return w
    compat = host_array(compat, "compat")
    try:
        arr = np.asarray(compat)
    except Exception as e:  # pragma: no cover - exotic objects
        raise ValueError(f"compat must be a number or an array, got {type(compat).__name__}") from e
    if arr.dtype.kind not in "fiu":
        raise ValueError(f"compat must be a number or a real-valued array, got dtype {arr.dtype}")
    if arr.ndim > 2:
        raise ValueError(f"LabelCompatibility of dimension > 2 not meaningful: compat has shape {arr.shape}")
    if arr.ndim == 1 and arr.shape != (nlabels,):
        raise ValueError(f"compat as a vector (diagonal compatibility) must have shape ({nlabels},), got {arr.shape}")
    if arr.ndim == 2 and arr.shape != (nlabels, nlabels):
        raise ValueError(f"compat as a matrix must have shape ({nlabels}, {nlabels}), got {arr.shape}")
    arr = np.array(arr, dtype=np.float32, order="C", copy=True)
    if not np.isfinite(arr).all():
        raise ValueError("compat must be finite")
    return torch.from_numpy(arr)  # 0-d: Potts weight; [L]: diagonal; [L, L]: matrix


def per_axis(s, n: int, name: str) -> tuple:
    """A standard deviation given as a scalar (all axes) or a sequence of ``n`` values, as float32 values."""
    s = host_array(s, name)
    if isinstance(s, numbers.Real) or (isinstance(s, np.ndarray) and s.ndim == 0):
        vals = [s] * n
    else:
        try:
            vals = list(s)
        except TypeError:
            raise ValueError(f"{name} must be a number or a sequence of {n} numbers, got {type(s).__name__}") from None
        if len(vals) != n:
            raise ValueError(f"{name} must be a number or a sequence of {n} numbers, got {len(vals)} values")
    out = []
    for v in vals:
        if isinstance(v, bool) or not isinstance(v, (numbers.Real, np.ndarray)) or np.ndim(v) != 0:
            raise ValueError(f"{name} must hold numbers, got {v!r}")
        f = np.float32(v)  # pydensecrf passes them to C++ as float
        if not (np.isfinite(f) and f > 0):
            raise ValueError(f"{name} must be finite and > 0, got {v!r}")
        out.append(f)
    return tuple(out)
