"""Helpers shared by the test files: seeded generators, tolerance checks, randomised weights and BN statistics,
reading test photos, and the device parametrisation (``cpu_and_cuda()``, ``on_cuda``, ``needs_cuda``).

Imported as ``from helpers import ...`` (pytest puts tests/ on sys.path, as for conftest.py).
"""
import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

F64 = torch.float64


def load_rgb(path) -> np.ndarray:
    """An image file as a C-contiguous uint8 [H, W, 3] array."""
    from PIL import Image

    return np.ascontiguousarray(np.array(Image.open(path).convert("RGB")))


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def assert_matches(out, ref, tol, what=""):
    """Per element |out - ref| <= tol * (max|ref| + |ref|), out finite (not NaN-poisoned), ref not all zero."""
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} vs {tuple(ref.shape)}"
    assert torch.isfinite(out).all(), f"{what}: output has unwritten (NaN-poisoned) or non-finite elements"
    ref = ref.detach().double()
    mag = ref.abs().max().item()
    assert mag > 0, f"{what}: the reference is all zeros: the test would be vacuous"
    err = (out.detach().double() - ref).abs()
    bad = err > tol * (mag + ref.abs())
    assert not bad.any(), (f"{what}: {int(bad.sum())} elements off; max |out - ref| = {err.max().item():.3g}, "
                           f"max |ref| = {mag:.3g}, tol {tol:g}")


def signed_uniform(n, g, lo=0.5, hi=1.5, negative=0.2):
    """n values with |v| in [lo, hi], about `negative` of them negative (as a BN gamma may be)."""
    sign = 1 - 2 * (torch.rand(n, generator=g, dtype=F64) < negative).to(F64)
    return (torch.rand(n, generator=g, dtype=F64) * (hi - lo) + lo) * sign


def randomize_(module: nn.Module, seed: int, *, gain: float = 1.0, spread: float = 0.3,
               var_low: float = 0.4) -> nn.Module:
    """In place: conv / linear weights N(0, gain / fan_in) (gain 2: He, O(1) activations through deep nets),
    biases, BN betas and running means N(0, spread^2), BN gammas +-[0.5, 1.5], running variances in
    [var_low, 2], num_batches_tracked random: so that BN folding matters."""
    g = seeded(seed)
    with torch.no_grad():
        for mod in module.modules():
            if isinstance(mod, (nn.Conv2d, nn.Linear)):
                fan_in = mod.weight[0].numel()
                mod.weight.copy_(torch.randn(mod.weight.shape, generator=g, dtype=F64) * math.sqrt(gain / fan_in))
                if mod.bias is not None:
                    mod.bias.copy_(torch.randn(mod.bias.shape, generator=g, dtype=F64) * spread)
            elif isinstance(mod, nn.modules.batchnorm._BatchNorm):
                n = mod.num_features
                mod.weight.copy_(signed_uniform(n, g))
                mod.bias.copy_(torch.randn(n, generator=g, dtype=F64) * spread)
                mod.running_mean.copy_(torch.randn(n, generator=g, dtype=F64) * spread)
                mod.running_var.copy_(torch.rand(n, generator=g, dtype=F64) * (2 - var_low) + var_low)
                mod.num_batches_tracked.fill_(int(torch.randint(1, 1000, (1,), generator=g)))
    return module


# ----------------------------------------------------------------------------------------------------------
# Devices: tests take the device as a parameter, and the CUDA cases skip without a GPU (as torchvision's
# cpu_and_cuda() and extension-cpp's tests do). Where CUDA is available, tests/conftest.py fails the CUDA cases
# of a CPU-only build instead of letting them pass.


CUDA_AVAILABLE = torch.cuda.is_available()
CUDA_MARKS = (pytest.mark.skipif(not CUDA_AVAILABLE, reason="CUDA is not available"), pytest.mark.cuda)


def needs_cuda(test):
    """Decorator: a test that runs on CUDA only (the CUDA marks)."""
    for mark in CUDA_MARKS:
        test = mark(test)
    return test


def on_cuda(*values, id=None):
    """A parametrize case that runs on CUDA only: ``pytest.param(*values)`` with the CUDA marks."""
    return pytest.param(*values, marks=CUDA_MARKS, id=id)


def cpu_and_cuda():
    """The ``device`` values of a test that runs on both: "cpu", and "cuda" where a GPU is available."""
    return ("cpu", on_cuda("cuda"))


def load_setup_py():
    """The repository's setup.py as a fresh module (its setup() call runs only as __main__), for testing its
    toolkit search and flags without building."""
    spec = importlib.util.spec_from_file_location("deeplab_fast_setup", Path(__file__).resolve().parents[1] / "setup.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def volume_features_numpy(image: np.ndarray, spacing, gaussian_sigma, bilateral_sigma, intensity_sigma):
    """dense_crf_3d's features by their definition, with numpy: image [C, D, H, W] -> ([3, N], [3 + C, N]) float32
    (positions float32(i * spacing / sigma) in float64 along D, H, W; intensities float32(x) / float32(sigma))."""
    F32 = np.float32
    c, d, h, w = image.shape
    per = lambda v, n: [v] * n if np.ndim(v) == 0 else list(v)  # noqa: E731
    sp, gs, bs, isg = per(spacing, 3), per(gaussian_sigma, 3), per(bilateral_sigma, 3), per(intensity_sigma, c)
    index = np.meshgrid(np.arange(d), np.arange(h), np.arange(w), indexing="ij")

    def positions(sigmas):
        return np.stack([(index[a].astype(np.float64) * np.float64(F32(sp[a])) / np.float64(F32(sigmas[a])))
                         .astype(F32).reshape(-1) for a in range(3)])

    intensities = np.stack([image[k].astype(F32).reshape(-1) / F32(isg[k]) for k in range(c)])
    return positions(gs), np.concatenate([positions(bs), intensities]).astype(F32)
