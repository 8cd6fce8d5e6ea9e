"""Shared test setup.

- DEEPLAB_FAST_POISON=1 makes every op fill its output with NaN before the kernel writes it, so a test that
  checks for finite outputs catches any element a kernel forgot to write. It must be set before the first op
  call (the extension reads it once).
- ``densecrf_data``: the folder of real photos and pydensecrf reference outputs (../shared/data/densecrf
  beside the repository); tests that need it skip when it is missing.
"""
import os
from pathlib import Path

os.environ.setdefault("DEEPLAB_FAST_POISON", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "densecrf"


@pytest.fixture(scope="session")
def densecrf_data() -> Path:
    if not (DATA / "im1.png").exists():
        pytest.skip(f"shared test data not found at {DATA}")
    return DATA


def load_rgb(path) -> np.ndarray:
    """An image file as a C-contiguous uint8 [H, W, 3] array."""
    from PIL import Image

    return np.ascontiguousarray(np.array(Image.open(path).convert("RGB")))
