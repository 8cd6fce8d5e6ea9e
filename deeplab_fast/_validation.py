"""Argument checks shared by the library's Python code: one copy of each, with messages that name the argument.

``owner`` (optional) prefixes the message as ``"owner: name must be ..."``, the house style of the modules and
model builders; without it the message starts with the argument's name (the pydensecrf drop-in's style).
"""
from __future__ import annotations

import math
import numbers

__all__ = ["is_int", "is_real", "positive_int", "positive_float", "per_axis", "host_array", "MAX_INT32"]

MAX_INT32 = 2**31 - 1


def is_int(value) -> bool:
    """An integral number that is not a bool (Python int, numpy integer, ...)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_real(value) -> bool:
    """A real number that is not a bool (Python int or float, numpy scalar, ...)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _prefix(owner: str | None) -> str:
    return f"{owner}: " if owner else ""


def positive_float(value, name: str, owner: str | None = None) -> float:
    """``float(value)`` if ``value`` is a finite real number > 0 (not a bool); else ValueError naming ``name``."""
    if not is_real(value):
        raise ValueError(f"{_prefix(owner)}{name} must be a positive number, got {type(value).__name__} {value!r}")
    if not (math.isfinite(float(value)) and float(value) > 0.0):
        raise ValueError(f"{_prefix(owner)}{name} must be a finite number > 0, got {value!r}")
    return float(value)


def per_axis(value, n: int, name: str, owner: str | None = None, what: str = "axis") -> tuple:
    """A positive quantity given once for all ``n`` axes (a number) or once per axis (a sequence of ``n``
    numbers: list, tuple, 1-D numpy array or tensor), as a tuple of ``n`` floats; ValueError naming ``name``
    (and the offending entry) otherwise. ``what`` names the entries in the messages ("axis", "channel")."""
    value = host_array(value, name)
    if is_real(value) or (hasattr(value, "ndim") and getattr(value, "ndim") == 0 and not isinstance(value, str)):
        return (positive_float(value.item() if hasattr(value, "item") else value, name, owner),) * n
    else:
        if isinstance(value, (str, bytes)) or not hasattr(value, "__len__"):
            raise ValueError(f"{_prefix(owner)}{name} must be a number or a sequence of {n} numbers (one per "
                             f"{what}), got {type(value).__name__}")
        values = list(value)
        if len(values) != n:
            raise ValueError(f"{_prefix(owner)}{name} must be a number or a sequence of {n} numbers (one per "
                             f"{what}), got {len(values)} values")
    out = []
    for k, v in enumerate(values):
        v = v.item() if hasattr(v, "item") and getattr(v, "ndim", 1) == 0 else v
        out.append(positive_float(v, f"{name}[{k}]" if n > 1 else name, owner))
    return tuple(out)


def positive_int(value, name: str, owner: str | None = None, high: int = MAX_INT32) -> int:
    """``int(value)`` if ``value`` is an integral number in [1, high] (not a bool; by default at most 2^31 - 1,
    the sizes the kernels index); else ValueError naming ``name``."""
    if not is_int(value) or not 0 < value <= high:
        got = f"{type(value).__name__} {value!r}" if not is_int(value) else f"{value!r}"
        prefix = f"{owner}: " if owner else ""
        raise ValueError(f"{prefix}{name} must be a positive int (at most {high}), got {got}")
    return int(value)


def host_array(value, name: str):
    """A torch tensor's data as a numpy array (detached, on the CPU); anything else unchanged. ValueError naming
    ``name`` for a meta tensor, which has no data."""
    import torch

    if isinstance(value, torch.Tensor):
        if value.device.type == "meta":
            raise ValueError(f"{name} is a meta tensor (no data): pass a CPU or CUDA tensor or a numpy array")
        return value.detach().cpu().numpy()
    return value
