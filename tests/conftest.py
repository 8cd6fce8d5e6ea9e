"""Shared test setup.

- DEEPLAB_FAST_POISON=1 makes every op fill its output with NaN before the kernel writes it, so a test that
  checks for finite outputs catches any element a kernel forgot to write. It must be set before the first op
  call (the extension reads it once).
- ``densecrf_data``: the folder of real photos and pydensecrf reference outputs (../shared/data/densecrf
  beside the repository); tests that need it skip when it is missing.
- Without a GPU, TRITON_INTERPRET=1: the Triton kernels (deeplab_fast/triton/) run in triton's interpreter on CPU
  tensors. It must be set before deeplab_fast (and so the kernels) is imported.
- Devices: tests take the device as a parameter (tests/helpers.py: ``cpu_and_cuda()``, ``on_cuda(...)``,
  ``needs_cuda``); the CUDA cases carry the ``cuda`` mark and skip without a GPU. Where CUDA is available, a build
  without CUDA kernels fails them (they must not pass by skipping).
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

import pytest  # noqa: E402

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "densecrf"


@pytest.fixture(scope="session")
def densecrf_data() -> Path:
    if not (DATA / "im1.png").exists():
        pytest.skip(f"shared test data not found at {DATA}")
    return DATA


# The ops with CUDA kernels (dense_crf is a composite of dense_crf_image_features and dense_crf_features).
CUDA_OPS = ("dense_crf_features", "dense_crf_features_with_history", "dense_crf_features_backward",
            "dense_crf_image_features", "dense_crf_pairwise_energy", "atrous_conv2d", "atrous_conv2d_plan")


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: runs on a CUDA device (skips without one; tests/helpers.py)")


def pytest_runtest_setup(item):
    """A CUDA case on a machine with CUDA fails when deeplab_fast was built without its CUDA kernels."""
    if item.get_closest_marker("cuda") is None or not torch.cuda.is_available():
        return
    import deeplab_fast  # noqa: F401  (registers the ops)

    missing = [op for op in CUDA_OPS
               if not torch._C._dispatch_has_kernel_for_dispatch_key(f"deeplab_fast::{op}", "CUDA")]
    if missing:
        pytest.fail(f"CUDA is available but deeplab_fast has no CUDA kernel for {', '.join(missing)}: the build is "
                    "CPU-only. Rebuild with `pip install --no-build-isolation -v -e .` on a machine with nvcc (the "
                    "build log must say 'building CUDA + CPU extension'), or FORCE_CUDA=1.", pytrace=False)
