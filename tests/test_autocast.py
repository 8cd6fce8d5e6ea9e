"""Mixed precision: the fused layers under ``torch.autocast`` (CPU bfloat16; CUDA float16 and bfloat16).

The cast policy (``deeplab_fast.nn.atrous``): ``deeplab_fast.ops.atrous_conv2d`` takes one dtype, so under autocast
the fused layers cast the input, weight, scale and bias to the autocast dtype and run the op in it, as autocast runs
``F.conv2d``; the Triton ASPP path runs in the autocast dtype too. Each case is checked against the float32 layer
without autocast (tolerance 3e-2 of the largest value, bfloat16's 8-bit mantissa through a few reductions), and
the output dtype is the autocast dtype. The CUDA cases skip without a GPU (owed on a GPU machine).
"""
from __future__ import annotations

import os
import sys

import pytest
import torch
from torch import nn

from deeplab_fast import models, optimize
from deeplab_fast.nn import ASPP, ASPPv2, AtrousConv2dReLU, AtrousSeparableConv2d
from deeplab_fast.ops import aspp as aspp_ops

sys.path.insert(0, os.path.dirname(__file__))
from helpers import assert_matches, on_cuda, randomize_  # noqa: E402

TOL = 3e-2
CASES = [("cpu", torch.bfloat16), on_cuda("cuda", torch.float16, id="cuda-float16"),
         on_cuda("cuda", torch.bfloat16, id="cuda-bfloat16")]


def _x(c, h, w, device, seed=1):
    return torch.randn(2, c, h, w, generator=torch.Generator().manual_seed(seed)).to(device)


def _check(layer, x, device, dtype, what, call=None):
    call = call or layer
    with torch.no_grad():
        expected = call(x)
        with torch.autocast(device, dtype=dtype):
            out = call(x)
    assert out.dtype == dtype, f"{what}: {out.dtype}"
    assert_matches(out.float(), expected, TOL, what)


@pytest.mark.parametrize("device,dtype", CASES)
def test_atrous_conv2d_relu(device, dtype):
    conv, bn = nn.Conv2d(8, 16, 3, padding=2, dilation=2), nn.BatchNorm2d(16)
    seq = randomize_(nn.Sequential(conv, bn), 3).eval()
    layer = AtrousConv2dReLU.from_modules(seq[0], seq[1], nn.ReLU()).to(device)
    _check(layer, _x(8, 13, 11, device), device, dtype, "AtrousConv2dReLU (BN folded)")
    kept = AtrousConv2dReLU.from_modules(nn.Conv2d(8, 16, 3, padding=1).to(device), None, nn.ReLU())
    _check(kept, _x(8, 13, 11, device, 2), device, dtype, "AtrousConv2dReLU (no BN)")


@pytest.mark.parametrize("depthwise_bn", [True, False])
@pytest.mark.parametrize("device,dtype", CASES)
def test_separable(device, dtype, depthwise_bn):
    layer = randomize_(AtrousSeparableConv2d(8, 12, 3, dilation=3, depthwise_bn=depthwise_bn), 4).eval().to(device)
    _check(layer, _x(8, 15, 9, device), device, dtype, f"AtrousSeparableConv2d depthwise_bn={depthwise_bn}")


# The Triton paths, on the CPU in triton's interpreter (TRITON_INTERPRET=1 from conftest.py). triton 3.9's
# interpreter computes a bfloat16 tl.dot ~1e10 off (tests/test_aspp.py: interpreter_bf16_dot_ok), so the v3
# kernel (a GEMM) is checked on the CPU under float16 autocast, the same cast policy; bfloat16 on CUDA.
@pytest.mark.skipif(not aspp_ops.HAVE_TRITON, reason="triton is not installed")
@pytest.mark.parametrize("device,dtype", [("cpu", torch.float16)] + CASES[1:])
def test_aspp_fused_path(device, dtype):
    v3 = randomize_(ASPP(8, (1, 2, 3), 4), 5).eval().to(device)
    _check(v3, _x(8, 7, 6, device), device, dtype, "ASPP fused", call=v3.fused_forward)


@pytest.mark.skipif(not aspp_ops.HAVE_TRITON, reason="triton is not installed")
@pytest.mark.parametrize("device,dtype", [("cpu", torch.float16)] + CASES)
def test_aspp_v2_fused_path(device, dtype):
    v2 = randomize_(ASPPv2(8, 3, (1, 2, 3, 4)), 6).eval().to(device)
    _check(v2, _x(8, 7, 6, device), device, dtype, "ASPPv2 fused", call=v2.fused_forward)


@pytest.mark.parametrize("name", ["deeplab_v3plus_mobilenet_v2", "lraspp_mobilenet_v3_large"])
@pytest.mark.parametrize("device,dtype", CASES)
def test_models_after_optimize(name, device, dtype):
    # gain 1: a random MobileNet with He-scaled weights amplifies bfloat16 rounding to O(1) in eager torch too
    model = randomize_(models.get_model(name, num_classes=3), 7).eval()
    model = optimize(model).to(device)
    x = _x(3, 65, 65, device)
    with torch.no_grad():
        expected = model(x)["out"]
        with torch.autocast(device, dtype=dtype):
            out = model(x)["out"]
    assert out.dtype in (dtype, torch.float32)  # the final resize may run in float32 under autocast
    assert_matches(out.float(), expected, 5e-2, f"{name} after optimize")


def test_without_autocast_dtypes_must_match():
    """Outside autocast the op's dtype rule stands: a clear error, no silent cast."""
    layer = AtrousConv2dReLU(4, 4, 3, padding=1)
    with pytest.raises(ValueError, match="dtype"):
        layer(torch.randn(1, 4, 5, 5, dtype=torch.float64))
