"""The DEEPLAB_FAST_* environment switches, as the C++ extension reads and validates them (csrc/common/env.h is
the one reader; this module asks it). ``check()`` runs at import: a bad value raises ``ValueError`` naming the
variable and what it accepts; a DEEPLAB_FAST_* name that is neither a switch nor one of the test and benchmark
tools' variables gets a warning (a typo would otherwise be ignored)."""
from __future__ import annotations

import functools
import json
import os
import warnings

import torch

__all__ = ["settings", "check", "poison_outputs", "no_memory_check"]

# Switches of the Python layer (not C++): DEEPLAB_FAST_NO_MEMORY_CHECK, 0 or 1 (default 0): dense_crf_3d skips its
# memory estimate (ops/dense_crf_3d.py). Checked here like the C++ switches.
PYTHON_SWITCHES = {"DEEPLAB_FAST_NO_MEMORY_CHECK": ("0", "1")}

# Variables read by the test and benchmark tools, not by the library.
TOOL_VARIABLES = ("DEEPLAB_FAST_BENCH_NAME", "DEEPLAB_FAST_BENCH_BATCHES", "DEEPLAB_FAST_BENCH_NO_COMPILE",
                  "DEEPLAB_FAST_BENCH_FULL",
                  "DEEPLAB_FAST_PYDENSECRF_SDIST", "DEEPLAB_FAST_REFERENCE_CACHE",
                  "DEEPLAB_FAST_SKIP_REFERENCE_BUILD", "DEEPLAB_FAST_CI_VENV")


def settings() -> dict:
    """The switches and their values (None when unset), validated. Raises ValueError on a bad value."""
    try:
        return json.loads(torch.ops.deeplab_fast._environment())
    except (RuntimeError, ValueError) as e:
        raise ValueError(str(e).splitlines()[0]) from None


def no_memory_check() -> bool:
    """DEEPLAB_FAST_NO_MEMORY_CHECK=1: dense_crf_3d skips its memory estimate (read per call)."""
    return os.environ.get("DEEPLAB_FAST_NO_MEMORY_CHECK", "0") == "1"


def check() -> None:
    for name, values in PYTHON_SWITCHES.items():
        value = os.environ.get(name)
        if value is not None and value not in values:
            raise ValueError(f"{name} must be {' or '.join(values)}, got {value!r}")
    known = set(settings()) | set(TOOL_VARIABLES) | set(PYTHON_SWITCHES)
    unknown = sorted(k for k in os.environ if k.startswith("DEEPLAB_FAST_") and k not in known)
    if unknown:
        warnings.warn(f"unknown deeplab_fast environment variable(s) {', '.join(unknown)}: the switches are "
                      f"{', '.join(sorted(settings()))} (csrc/common/env.h)", RuntimeWarning, stacklevel=3)


@functools.lru_cache(maxsize=None)
def poison_outputs() -> bool:
    """DEEPLAB_FAST_POISON=1: ops fill their outputs with NaN before their kernels write them (read once)."""
    return settings()["DEEPLAB_FAST_POISON"] == "1"
