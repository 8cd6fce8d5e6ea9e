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
- torchvision (the reference of the ASPP and model tests; not a dependency of deeplab_fast) is imported once here,
  by ``deeplab_fast.benchmark.load_torchvision(python_only=True)``: where its compiled ops cannot load with the
  installed torch (PyPI's CUDA-built torchvision beside a CPU-only torch, as on CI's machine), its Python model code
  is imported without them, and the session header says so. The README's install commands install a matching
  torchvision, for which nothing of that happens.
"""
import os
from pathlib import Path

os.environ.setdefault("DEEPLAB_FAST_POISON", "1")

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from deeplab_fast.benchmark import load_torchvision  # noqa: E402

TORCHVISION, TORCHVISION_NOTE = load_torchvision(python_only=True)


def pytest_report_header(config):
    if TORCHVISION is None:
        return [f"torchvision (reference of the model and ASPP tests): {TORCHVISION_NOTE}; the test files that "
                "import it are not collected"]
    return [f"torchvision {TORCHVISION.__version__}" + (f": {TORCHVISION_NOTE}" if TORCHVISION_NOTE else "")]


def pytest_ignore_collect(collection_path, config):
    """Without torchvision, the test files that import it at module level are left out (the header says so)."""
    if TORCHVISION is not None or collection_path.suffix != ".py" or not collection_path.name.startswith("test_"):
        return None
    text = collection_path.read_text(errors="replace")
    if "\nimport torchvision" in text or "\nfrom torchvision" in text:
        return True
    return None

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
