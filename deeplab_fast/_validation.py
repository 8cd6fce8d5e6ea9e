"""Argument checks shared by the library's Python code: one copy of each, with messages that name the argument.

``owner`` (optional) prefixes the message as ``"owner: name must be ..."``, the house style of the modules and
model builders; without it the message starts with the argument's name (the pydensecrf drop-in's style).
"""
from __future__ import annotations

import numbers

__all__ = ["is_int", "positive_int", "host_array", "MAX_INT32"]

MAX_INT32 = 2**31 - 1


def is_int(value) -> bool:
    """An integral number that is not a bool (Python int, numpy integer, ...)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


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
