"""Argument checks shared by the library's Python code: one copy of each, with messages that name the argument.

``owner`` (optional) prefixes the message as ``"owner: name must be ..."``, the house style of the modules and
model builders; without it the message starts with the argument's name (the pydensecrf drop-in's style).
"""
from __future__ import annotations

import numbers

__all__ = ["is_int", "positive_int"]


def is_int(value) -> bool:
    """An integral number that is not a bool (Python int, numpy integer, ...)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def positive_int(value, name: str, owner: str | None = None) -> int:
    """``int(value)`` if ``value`` is an integral number > 0 (not a bool); else ValueError naming ``name``."""
    if not is_int(value) or value <= 0:
        got = f"{type(value).__name__} {value!r}" if not is_int(value) else f"{value!r}"
        prefix = f"{owner}: " if owner else ""
        raise ValueError(f"{prefix}{name} must be a positive int, got {got}")
    return int(value)
