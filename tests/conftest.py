"""Shared test setup.

- DEEPLAB_FAST_POISON=1 makes every op fill its output with NaN before the kernel writes it, so a test that
  checks for finite outputs catches any element a kernel forgot to write. It must be set before the first op
  call (the extension reads it once).
- ``densecrf_data``: the folder of real photos and pydensecrf reference outputs (../shared/data/densecrf
  beside the repository); tests that need it skip when it is missing.
- Without a GPU, TRITON_INTERPRET=1: the Triton kernels (deeplab_fast/triton/) run in triton's interpreter on CPU
  tensors. It must be set before deeplab_fast (and so the kernels) is imported.
- torchvision (the reference for the ASPP and model tests) cannot load its C ops with the CPU torch wheel; its
  Python model code needs none of them, and with that wheel an empty module in place of
  ``torchvision._meta_registrations`` keeps ``import torchvision`` from registering them.
"""
import os
import sys
import types
from pathlib import Path

os.environ.setdefault("DEEPLAB_FAST_POISON", "1")

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
if torch.version.cuda is None:  # the CPU wheel: torchvision's C ops cannot load
    sys.modules.setdefault("torchvision._meta_registrations", types.ModuleType("torchvision._meta_registrations"))

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
