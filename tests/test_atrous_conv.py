"""deeplab_fast.ops.atrous_conv2d (fused atrous convolution + per-channel scale and bias + ReLU) and
deeplab_fast.nn.AtrousConv2dReLU on the CPU and on CUDA (the CUDA tests, at the end, skip without a GPU;
test_bad_input and test_outputs_reading_only_padding take the device as a parameter).

Every result is compared with an independent reference on fresh random inputs (seeded, never zeros):
``F.conv2d`` in float64 on the same (dtype-rounded) inputs, then ``* scale + bias`` and ReLU with plain torch
ops in float64. The modules are compared with ``nn.Conv2d`` [+ ``nn.BatchNorm2d``] + ``nn.ReLU``.

Tolerances follow the dtype (DEVELOPERS.md), per element ``|out - ref| <= tol * (max|ref| + |ref|)``:
float64 1e-10, float32 1e-5, float16 2e-3, bfloat16 1e-2. Tap skipping on vs off: 1e-12 in float64.

tests/conftest.py sets DEEPLAB_FAST_POISON=1, so outputs start as NaN and every finiteness check below catches
elements that no kernel wrote. Inputs given as views of larger tensors have NaN outside the view, so a kernel
that reads outside its input shows too.
"""
from __future__ import annotations

import contextlib
import copy
import itertools
import math
import os
import random
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import deeplab_fast
from deeplab_fast.nn import AtrousConv2dReLU
from deeplab_fast.ops import atrous_conv2d, atrous_conv2d_plan, tap_skipping

from helpers import CUDA_MARKS, cpu_and_cuda, needs_cuda, on_cuda, seeded  # noqa: E402
from samples import atrous_conv2d_inputs
from samples import reference as sample_reference

F64 = torch.float64
TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
OP = torch.ops.deeplab_fast.atrous_conv2d
# The CUTLASS kernels are built for sm_80 and sm_90; older GPUs take the ATen path (the reason says so).
SM80 = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 8
needs_sm80 = pytest.mark.skipif(not SM80, reason="the CUTLASS path needs compute capability >= 8.0")


# ----------------------------------------------------------------------------------------------------------
# Helpers


def random_args(N, C, K, H, W, R=3, S=None, *, bias=True, scale=True, dtype=torch.float32, seed=0):
    """(input, weight, bias, scale) of N(0, 1) activations, a weight scaled so the output is O(1), a bias of
    either sign and a scale in +-[0.25, 1.75] (a fifth of the channels negative, as a BN gamma may be)."""
    S = R if S is None else S
    g = seeded(seed)
    x = torch.randn(N, C, H, W, generator=g, dtype=F64)
    w = torch.randn(K, C, R, S, generator=g, dtype=F64) / math.sqrt(C * R * S)
    b = torch.randn(K, generator=g, dtype=F64) * 0.5
    sign = 1 - 2 * (torch.rand(K, generator=g, dtype=F64) < 0.2).to(F64)
    s = (torch.rand(K, generator=g, dtype=F64) * 1.5 + 0.25) * sign
    return x.to(dtype), w.to(dtype), b.to(dtype) if bias else None, s.to(dtype) if scale else None


def reference(x, w, b=None, s=None, stride=1, padding=0, dilation=1, relu=False):
    """F.conv2d in float64 on the (already rounded) inputs, then * scale + bias and ReLU with plain torch ops."""
    y = F.conv2d(x.double(), w.double(), None, stride, padding, dilation)
    if s is not None:
        y = y * s.double().view(1, -1, 1, 1)
    if b is not None:
        y = y + b.double().view(1, -1, 1, 1)
    return torch.relu(y) if relu else y


def assert_matches(out, ref, dtype, tol=None, what=""):
    tol = TOL[dtype] if tol is None else tol
    assert out.dtype == dtype, f"{what}: output dtype {out.dtype}"
    assert out.shape == ref.shape, f"{what}: output shape {tuple(out.shape)} vs {tuple(ref.shape)}"
    assert torch.isfinite(out).all(), f"{what}: output has unwritten (NaN-poisoned) or non-finite elements"
    mag = ref.abs().max().item()
    assert mag > 0, f"{what}: the reference is all zeros: the test would be vacuous"
    err = (out.double() - ref).abs()
    bad = err > tol * (mag + ref.abs())
    assert not bad.any(), (f"{what}: {int(bad.sum())} elements off; max |out - ref| = {err.max().item():.3g}, "
                           f"max |ref| = {mag:.3g}, tol {tol:g}")


def assert_relu_clips_and_keeps(out):
    """ReLU must have something to do: some outputs clipped to exactly 0, some kept positive."""
    assert (out == 0).any(), "ReLU clipped nothing: the test does not exercise it"
    assert (out > 0).any(), "ReLU kept nothing: the test does not exercise it"


# Layouts: name -> (function making a tensor with x's values in that layout, the expected output format).
def _nan_like(x, *sizes, channels_last=False):
    big = torch.full(sizes, float("nan"), dtype=x.dtype)
    return big.contiguous(memory_format=torch.channels_last) if channels_last else big


def _channel_slice(x, channels_last):
    N, C, H, W = x.shape
    big = _nan_like(x, N, C + 5, H, W, channels_last=channels_last)
    big[:, 2:2 + C] = x
    return big[:, 2:2 + C]


def _spatial_crop(x, channels_last):
    N, C, H, W = x.shape
    big = _nan_like(x, N, C, H + 4, W + 6, channels_last=channels_last)
    big[:, :, 1:1 + H, 3:3 + W] = x
    return big[:, :, 1:1 + H, 3:3 + W]


def _strided_w(x):
    N, C, H, W = x.shape
    big = _nan_like(x, N, C, H, 2 * W)
    big[..., ::2] = x
    return big[..., ::2]


def _batch_slice(x):
    N, C, H, W = x.shape
    big = _nan_like(x, 2 * N, C, H, W)
    big[1::2] = x
    return big[1::2]


LAYOUTS = {
    "contiguous": (lambda x: x.contiguous(), torch.contiguous_format),
    "channels_last": (lambda x: x.contiguous(memory_format=torch.channels_last), torch.channels_last),
    "channel_slice": (lambda x: _channel_slice(x, False), torch.contiguous_format),
    "channel_slice_channels_last": (lambda x: _channel_slice(x, True), torch.channels_last),
    "spatial_crop": (lambda x: _spatial_crop(x, False), torch.contiguous_format),
    "spatial_crop_channels_last": (lambda x: _spatial_crop(x, True), torch.channels_last),
    "strided_w": (_strided_w, torch.contiguous_format),
    "batch_slice": (_batch_slice, torch.contiguous_format),
    "transposed_hw": (lambda x: x.transpose(2, 3).contiguous().transpose(2, 3), torch.contiguous_format),
}


def expected_format(view, how):
    """The output's memory format: the layout's, or for a 1x1 image (ambiguous strides) torch's suggestion."""
    if view.shape[2] * view.shape[3] > 1:
        return LAYOUTS[how][1]
    return torch._prims_common.suggest_memory_format(view)


def in_layout(x, how):
    v = LAYOUTS[how][0](x)
    assert torch.equal(v, x)
    if x.shape[2] * x.shape[3] > 1:  # (a 1x1 image is both contiguous and channels_last)
        assert v.is_contiguous() == (how == "contiguous"), f"{how}: strides {v.stride()}"
    return v


def run_and_check(x, w, b, s, stride, padding, dilation, relu, dtype, how="contiguous", tol=None, what=""):
    """atrous_conv2d on x in layout `how` against the float64 reference; returns the output."""
    xv = in_layout(x, how)
    out = atrous_conv2d(xv, w, b, s, stride, padding, dilation, relu)
    assert_matches(out, reference(x, w, b, s, stride, padding, dilation, relu), dtype, tol, what or how)
    fmt = expected_format(xv, how)
    assert out.is_contiguous(memory_format=fmt), f"{how}: output strides {out.stride()}, expected {fmt}"
    if relu:
        assert_relu_clips_and_keeps(out)
    return out


# ----------------------------------------------------------------------------------------------------------
# Against the reference


# id, (N, C, K, H, W, R, S), stride, padding, dilation
SHAPES = [
    ("odd_17x13_rate2", (2, 8, 8, 17, 13, 3, 3), 1, 2, 2),
    ("odd_17x13_pad0", (2, 8, 64, 17, 13, 3, 3), 1, 0, 2),
    ("smaller_than_rate_5x6_rate12", (2, 8, 64, 5, 6, 3, 3), 1, 12, 12),
    ("smaller_than_rate_5x6_rate24_pad22", (1, 64, 8, 5, 6, 3, 3), 1, 22, 24),
    ("stride2_pad0", (2, 64, 8, 17, 13, 3, 3), 2, 0, 2),
    ("stride2_pad1_rate1", (2, 8, 8, 16, 15, 3, 3), 2, 1, 1),
    ("stride2_asym_pad_1_3", (2, 8, 64, 17, 13, 3, 3), 2, (1, 3), 3),
    ("asym_pad_1_3_rate_2_5", (2, 8, 8, 17, 13, 3, 3), 1, (1, 3), (2, 5)),
    ("pad5_rate3", (2, 8, 8, 11, 12, 3, 3), 1, 5, 3),
    ("stride_2_3", (1, 8, 8, 19, 23, 3, 3), (2, 3), 4, 4),
    ("C256_K256_rate6", (1, 256, 256, 13, 11, 3, 3), 1, 6, 6),
    ("C2048_K64_rate12", (1, 2048, 64, 7, 9, 3, 3), 1, 12, 12),
    ("C8_K2048_rate2", (1, 8, 2048, 9, 7, 3, 3), 1, 2, 2),
    ("C64_K256_stride2", (2, 64, 256, 15, 14, 3, 3), 2, 2, 2),
    ("kernel_1x1", (2, 64, 64, 17, 13, 1, 1), 1, 0, 1),
    ("kernel_1x1_stride2_pad1", (2, 8, 8, 17, 13, 1, 1), 2, 1, 1),
    ("kernel_3x1_rate4", (2, 8, 8, 17, 13, 3, 1), 1, (4, 0), (4, 1)),
    ("kernel_5x5_rate3", (2, 8, 8, 17, 13, 5, 5), 1, 6, 3),
    ("kernel_1x3_stride_2_1", (2, 8, 8, 17, 13, 1, 3), (2, 1), (0, 5), 5),
]
SHAPE_PARAMS = [pytest.param(*case[1:], id=case[0]) for case in SHAPES]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("dims,stride,padding,dilation", SHAPE_PARAMS)
def test_shapes(dims, stride, padding, dilation, dtype):
    x, w, b, s = random_args(*dims, dtype=dtype, seed=sum(dims))
    for how in ("contiguous", "channels_last"):
        run_and_check(x, w, b, s, stride, padding, dilation, True, dtype, how)
    run_and_check(x, w, b, s, stride, padding, dilation, False, dtype)


@pytest.mark.parametrize("padding", ["rate", "half", "zero"])
@pytest.mark.parametrize("rate", [1, 2, 6, 12, 18, 24, 36])
def test_atrous_rates(rate, padding):
    pad = {"rate": rate, "half": rate // 2, "zero": 0}[padding]
    H, W = (33, 33) if padding == "rate" else (2 * rate + 9, 2 * rate + 6)
    x, w, b, s = random_args(2, 32, 24, H, W, seed=rate)
    out = run_and_check(x, w, b, s, 1, pad, rate, True, torch.float32, "channels_last")
    if padding == "rate":
        assert out.shape[-2:] == (H, W)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("how", list(LAYOUTS))
def test_layouts(how, dtype):
    x, w, b, s = random_args(2, 16, 24, 13, 11, seed=7, dtype=dtype)
    run_and_check(x, w, b, s, 1, 3, 3, True, dtype, how)
    run_and_check(x, w, b, s, 2, (1, 3), (2, 3), False, dtype, how)
    run_and_check(x, w, b, None, 1, 3, 3, True, dtype, how)  # no scale: the bias may go into the conv itself
    run_and_check(x, w, None, None, 2, 0, 2, False, dtype, how)


@pytest.mark.parametrize("mode", [False, True])
def test_non_contiguous_weight_bias_scale(mode):
    x, w, b, s = random_args(2, 16, 12, 13, 11, seed=8)
    w_view = w.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)  # a channels_last weight
    b_view = torch.stack([b, torch.full_like(b, float("nan"))], 1)[:, 0]  # stride 2
    s_view = torch.stack([torch.full_like(s, float("nan")), s], 1)[:, 1]
    assert not w_view.is_contiguous() and b_view.stride() == (2,) and s_view.stride() == (2,)
    for how in ("contiguous", "channels_last"):
        with tap_skipping(mode):
            out = atrous_conv2d(in_layout(x, how), w_view, b_view, s_view, 1, 2, 2, True)
        assert_matches(out, reference(x, w, b, s, 1, 2, 2, True), torch.float32)


@pytest.mark.parametrize("bias,scale,relu", list(itertools.product([False, True], repeat=3)))
def test_epilogue_combinations(bias, scale, relu):
    x, w, b, s = random_args(2, 24, 16, 17, 13, bias=bias, scale=scale, seed=11)
    out = run_and_check(x, w, b, s, 1, 6, 6, relu, torch.float32, "channels_last")
    if not relu:
        assert (out < 0).any()
    # The epilogue is really applied: without it the result differs.
    if bias or scale or relu:
        assert not torch.allclose(out.double(), reference(x, w, None, None, 1, 6, 6, False), atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dims,stride,padding,dilation", [
    pytest.param((2, 64, 32, 17, 13, 3, 3), 1, 6, 6, id="rate6"),
    pytest.param((1, 256, 64, 9, 9, 3, 3), 1, 12, 12, id="C256_rate12"),
    pytest.param((2, 8, 16, 17, 13, 3, 3), 2, (1, 3), 3, id="stride2_asym_pad"),
    pytest.param((2, 16, 16, 11, 10, 1, 1), 1, 0, 1, id="1x1"),
])
def test_low_precision(dims, stride, padding, dilation, dtype):
    """bfloat16 / float16: the reference is computed in float64 from the same rounded inputs."""
    x, w, b, s = random_args(*dims, dtype=dtype, seed=sum(dims) + 1)
    for how in ("contiguous", "channels_last"):
        run_and_check(x, w, b, s, stride, padding, dilation, True, dtype, how)
        run_and_check(x, w, b, None, stride, padding, dilation, True, dtype, how)
        with tap_skipping(True):
            run_and_check(x, w, b, s, stride, padding, dilation, False, dtype, how)


def test_output_is_new_and_repeatable():
    x, w, b, s = random_args(2, 8, 8, 9, 9, seed=12)
    x_before, w_before = x.clone(), w.clone()
    out1 = atrous_conv2d(x, w, b, s, 1, 2, 2, True)
    out2 = atrous_conv2d(x, w, b, s, 1, 2, 2, True)
    assert torch.equal(out1, out2) and out1.data_ptr() != out2.data_ptr()
    assert torch.equal(x, x_before) and torch.equal(w, w_before)


def test_op_and_wrapper_argument_forms():
    """torch.ops.deeplab_fast.atrous_conv2d with [h, w] lists, and the wrapper with ints / tuples / lists."""
    x, w, b, s = random_args(2, 8, 8, 17, 13, seed=13)
    ref = reference(x, w, b, s, (2, 1), (1, 3), (2, 4), True)
    assert_matches(OP(x, w, b, s, [2, 1], [1, 3], [2, 4], True), ref, torch.float32)
    assert_matches(atrous_conv2d(x, w, b, s, [2, 1], [1, 3], [2, 4], True), ref, torch.float32)
    assert_matches(atrous_conv2d(x, w, b, s, stride=(2, 1), padding=[1, 3], dilation=(2, 4), relu=True), ref,
                   torch.float32)
    ref = reference(x, w, None, None, 1, 2, 2)
    assert_matches(atrous_conv2d(x, w, padding=2, dilation=2), ref, torch.float32)


# ----------------------------------------------------------------------------------------------------------
# Tap skipping


def brute_force_taps(H, W, R, S, stride, padding, dilation):
    """For every output pixel, the set of in-bounds filter taps (r, s), counted one by one."""
    (sh, sw), (ph, pw), (dh, dw) = (_hw(stride), _hw(padding), _hw(dilation))
    P = (H + 2 * ph - dh * (R - 1) - 1) // sh + 1
    Q = (W + 2 * pw - dw * (S - 1) - 1) // sw + 1
    taps = [[frozenset((r, c) for r in range(R) for c in range(S)
                       if 0 <= p * sh - ph + r * dh < H and 0 <= q * sw - pw + c * dw < W)
             for q in range(Q)] for p in range(P)]
    return P, Q, taps


def _hw(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def check_plan(plan, H, W, R, S, stride, padding, dilation):
    """The plan's regions tile the output exactly, each with the brute-force tap set of every pixel in it, and
    kept_fraction is the brute-force fraction of kept multiply-accumulates."""
    P, Q, taps = brute_force_taps(H, W, R, S, stride, padding, dilation)
    regions = plan["regions"]
    cover = [[0] * Q for _ in range(P)]
    for g in regions:
        (p0, p1), (q0, q1) = g["rows"], g["cols"]
        (r0, r1), (s0, s1) = g["tap_rows"], g["tap_cols"]
        assert 0 <= p0 < p1 <= P and 0 <= q0 < q1 <= Q, g
        region_taps = frozenset(itertools.product(range(r0, r1), range(s0, s1)))
        for p in range(p0, p1):
            for q in range(q0, q1):
                cover[p][q] += 1
                assert taps[p][q] == region_taps, f"pixel ({p}, {q}): taps {sorted(taps[p][q])}, region {g}"
    assert all(c == 1 for row in cover for c in row), "the regions do not tile the output exactly once"
    # A grid of row bands x column bands, at most (2R+1) x (2S+1), adjacent bands with different tap sets.
    row_bands = sorted({tuple(g["rows"]) for g in regions})
    col_bands = sorted({tuple(g["cols"]) for g in regions})
    assert len(regions) == len(row_bands) * len(col_bands) <= (2 * R + 1) * (2 * S + 1)
    for bands in (row_bands, col_bands):
        assert all(a[1] == b[0] for a, b in zip(bands, bands[1:])), bands
    kept_rows = [{r for r in range(R) if 0 <= p * _hw(stride)[0] - _hw(padding)[0] + r * _hw(dilation)[0] < H}
                 for p in range(P)]
    kept_cols = [{c for c in range(S) if 0 <= q * _hw(stride)[1] - _hw(padding)[1] + c * _hw(dilation)[1] < W}
                 for q in range(Q)]
    for a, b in zip(row_bands, row_bands[1:]):
        assert kept_rows[a[0]] != kept_rows[b[0]], f"row bands {a} and {b} have the same taps: not merged"
    for a, b in zip(col_bands, col_bands[1:]):
        assert kept_cols[a[0]] != kept_cols[b[0]], f"column bands {a} and {b} have the same taps: not merged"
    kept = sum(len(t) for row in taps for t in row) / (P * Q * R * S)
    assert plan["kept_fraction"] == pytest.approx(kept, rel=1e-5, abs=1e-6)
    return P, Q, taps


def test_plan_deeplab_aspp_rate18():
    """DeepLab v3 ASPP at output stride 16: 33x33, 3x3, rate 18 = padding: 9 regions, 40.5% of the MACs."""
    x, w, _, _ = random_args(1, 8, 8, 33, 33, seed=14)
    plan = atrous_conv2d_plan(x, w, padding=18, dilation=18)
    assert plan["device"] == "cpu" and plan["path"] == "aten" and plan["tap_skipping"] is False
    assert len(plan["regions"]) == 9
    P, Q, taps = check_plan(plan, 33, 33, 3, 3, 1, 18, 18)
    assert (P, Q) == (33, 33)
    assert plan["kept_fraction"] == pytest.approx((63 / 99) ** 2, rel=1e-5)  # rows: 15x2 + 3x1 + 15x2 of 33x3
    assert plan["kept_fraction"] == pytest.approx(0.405, abs=5e-4)
    bands = sorted({tuple(g["rows"]) for g in plan["regions"]})
    assert bands == [(0, 15), (15, 18), (18, 33)]


@pytest.mark.parametrize("seed", range(10))
def test_plan_random_shapes_brute_force(seed):
    rng = random.Random(seed)
    while True:
        H, W = rng.randint(1, 40), rng.randint(1, 40)
        R, S = rng.randint(1, 5), rng.randint(1, 5)
        stride = (rng.randint(1, 3), rng.randint(1, 3))
        padding = (rng.randint(0, 15), rng.randint(0, 15))
        dilation = (rng.randint(1, 12), rng.randint(1, 12))
        if (H + 2 * padding[0] - dilation[0] * (R - 1) - 1 >= 0
                and W + 2 * padding[1] - dilation[1] * (S - 1) - 1 >= 0):
            break
    x, w, b, s = random_args(1, 3, 4, H, W, R, S, dtype=F64, seed=seed)
    with tap_skipping(True):
        plan = atrous_conv2d_plan(x, w, b, s, stride, padding, dilation, True)
        check_plan(plan, H, W, R, S, stride, padding, dilation)
        assert plan["tap_skipping"] == (plan["kept_fraction"] < 1)
        on = atrous_conv2d(x, w, b, s, stride, padding, dilation, False)
    with tap_skipping(False):
        off = atrous_conv2d(x, w, b, s, stride, padding, dilation, False)
    ref = reference(x, w, b, s, stride, padding, dilation, False)
    assert_matches(on, ref, F64, what=f"on {H}x{W} {R}x{S} {stride} {padding} {dilation}")
    assert_matches(on, off, F64, tol=1e-12, what="on vs off")


# id, (N, C, K, H, W, R, S), stride, padding, dilation
TAP_CASES = [
    ("aspp_33x33_rate18", (1, 16, 8, 33, 33, 3, 3), 1, 18, 18),
    ("odd_17x13_rate6", (2, 8, 8, 17, 13, 3, 3), 1, 6, 6),
    ("smaller_than_rate_5x6_rate12", (2, 8, 8, 5, 6, 3, 3), 1, 12, 12),
    ("rate24_pad24_9x7", (1, 8, 8, 9, 7, 3, 3), 1, 24, 24),
    ("stride2_pad3_rate4", (2, 8, 8, 17, 13, 3, 3), 2, 3, 4),
    ("stride2_asym_pad_1_3", (2, 8, 8, 16, 15, 3, 3), 2, (1, 3), 3),
    ("asym_pad_1_3_rate_2_5", (2, 8, 8, 17, 13, 3, 3), 1, (1, 3), (2, 5)),
    ("pad5_rate3", (2, 8, 8, 11, 12, 3, 3), 1, 5, 3),
    ("no_tap_regions_4x4_rate5_pad7", (2, 8, 8, 4, 4, 3, 3), 1, 7, 5),
    ("all_padding_1x1_stride2_pad5_rate4", (2, 8, 8, 1, 1, 3, 3), 2, 5, 4),
    ("kernel_1x1_pad2", (2, 8, 8, 6, 5, 1, 1), 1, 2, 1),
    ("kernel_5x5_stride3_pad7_rate2", (2, 8, 8, 17, 13, 5, 5), 3, 7, 2),
    ("kernel_3x1_rate4", (2, 8, 8, 17, 13, 3, 1), 1, (4, 0), (4, 1)),
    ("C64_K64_rate12", (1, 64, 64, 21, 19, 3, 3), 1, 12, 12),
]
TAP_PARAMS = [pytest.param(*case[1:], id=case[0]) for case in TAP_CASES]


@pytest.mark.parametrize("dims,stride,padding,dilation", TAP_PARAMS)
def test_tap_skipping_on_equals_off_float64(dims, stride, padding, dilation):
    x, w, b, s = random_args(*dims, dtype=F64, seed=sum(dims) + 2)
    N, C, K, H, W, R, S = dims
    ref = reference(x, w, b, s, stride, padding, dilation, True)
    for how in ("contiguous", "channels_last", "spatial_crop_channels_last"):
        xv = in_layout(x, how)
        with tap_skipping(True):
            plan = atrous_conv2d_plan(xv, w, b, s, stride, padding, dilation, True)
            on = atrous_conv2d(xv, w, b, s, stride, padding, dilation, True)
        with tap_skipping(False):
            assert atrous_conv2d_plan(xv, w, b, s, stride, padding, dilation, True)["tap_skipping"] is False
            off = atrous_conv2d(xv, w, b, s, stride, padding, dilation, True)
        assert plan["tap_skipping"] is True and plan["path"] == "aten-tap-skipping"
        assert plan["kept_fraction"] < 1
        assert_matches(on, ref, F64, what=f"{how}, on")
        assert_matches(off, ref, F64, what=f"{how}, off")
        assert_matches(on, off, F64, tol=1e-12, what=f"{how}, on vs off")
        assert on.is_contiguous(memory_format=expected_format(xv, how))
    check_plan(plan, H, W, R, S, stride, padding, dilation)


@pytest.mark.parametrize("bias,scale,relu", [(True, True, True), (False, False, False), (True, False, True),
                                             (False, True, False)])
@pytest.mark.parametrize("dims,stride,padding,dilation", [TAP_PARAMS[i] for i in (0, 4, 5, 8, 13)])
def test_tap_skipping_on_equals_off_float32(dims, stride, padding, dilation, bias, scale, relu):
    x, w, b, s = random_args(*dims, bias=bias, scale=scale, seed=sum(dims) + 3)
    ref = reference(x, w, b, s, stride, padding, dilation, relu)
    with tap_skipping("on"):
        on = atrous_conv2d(x, w, b, s, stride, padding, dilation, relu)
    with tap_skipping("off"):
        off = atrous_conv2d(x, w, b, s, stride, padding, dilation, relu)
    assert_matches(on, ref, torch.float32, what="on")
    assert_matches(on, off.double(), torch.float32, what="on vs off")
    if relu:
        assert_relu_clips_and_keeps(on)


@pytest.mark.parametrize("device,dims,stride,padding,dilation,key", [
    pytest.param("cpu", (2, 8, 8, 4, 4, 3, 3), 1, 7, 5, None, id="4x4_3x3_rate5_pad7"),
    pytest.param("cpu", (2, 8, 8, 1, 1, 3, 3), 2, 5, 4, None, id="1x1_stride2_pad5_rate4_all_padding"),
    pytest.param("cpu", (1, 8, 8, 6, 5, 1, 1), 1, 2, 1, None, id="1x1_kernel_pad2"),
] + [pytest.param("cuda", dims, stride, padding, dilation, key, marks=(*CUDA_MARKS, needs_sm80), id=f"cuda-{name}-{key}")
     for key in ("bf16", "tf32") for name, dims, stride, padding, dilation in [
         ("4x4_3x3_rate5_pad7", (2, 8, 16, 4, 4, 3, 3), 1, 7, 5),
         ("1x1_stride2_pad5_rate4_all_padding", (2, 8, 16, 1, 1, 3, 3), 2, 5, 4),
         ("1x1_kernel_pad2", (1, 16, 8, 6, 5, 1, 1), 1, 2, 1)]])
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("mode", [True, False])
def test_outputs_reading_only_padding(device, dims, stride, padding, dilation, key, relu, mode):
    """Outputs without any in-bounds tap hold the epilogue of zero, relu?(bias), exactly (the scale is
    irrelevant); on CUDA through the CUTLASS path, whose regions without taps are not launched."""
    if device == "cpu":
        _outputs_reading_only_padding_cpu(dims, stride, padding, dilation, relu, mode)
    else:
        _outputs_reading_only_padding_cuda(dims, stride, padding, dilation, relu, mode, key)


def _outputs_reading_only_padding_cpu(dims, stride, padding, dilation, relu, mode):
    N, C, K, H, W, R, S = dims
    x, w, b, s = random_args(*dims, seed=21)
    assert (b < 0).any() and (b > 0).any()
    plan = atrous_conv2d_plan(x, w, b, s, stride, padding, dilation, relu)
    P, Q, taps = brute_force_taps(H, W, R, S, stride, padding, dilation)
    empty = [g for g in plan["regions"] if not (g["tap_rows"][0] < g["tap_rows"][1]
                                                and g["tap_cols"][0] < g["tap_cols"][1])]
    assert empty, "the case has no region without taps"
    with tap_skipping(mode):
        out = atrous_conv2d(x, w, b, s, stride, padding, dilation, relu)
    assert_matches(out, reference(x, w, b, s, stride, padding, dilation, relu), torch.float32)
    expected = (torch.relu(b) if relu else b).view(1, -1, 1)
    n_empty = 0
    for p in range(P):
        for q in range(Q):
            if not taps[p][q]:
                n_empty += 1
                assert torch.equal(out[:, :, p, q], expected.expand(N, K, 1)[..., 0]), (p, q)
    assert n_empty == sum((g["rows"][1] - g["rows"][0]) * (g["cols"][1] - g["cols"][0]) for g in empty)


def _outputs_reading_only_padding_cuda(dims, stride, padding, dilation, relu, mode, key):
    dtype = DTYPES[key][0]
    N, C, K, H, W, R, S = dims
    x, w, b, s = cuda_args(dims, dtype, seed=600)
    assert (b < 0).any() and (b > 0).any()
    P, Q, taps = brute_force_taps(H, W, R, S, stride, padding, dilation)
    with tap_skipping(mode), cudnn_tf32(True):
        plan = atrous_conv2d_plan(channels_last(x), w, b, s, stride, padding, dilation, relu)
        out = atrous_conv2d(channels_last(x), w, b, s, stride, padding, dilation, relu)
    assert plan["path"] == "cutlass" and plan["tap_skipping"] is mode
    assert torch.isfinite(out).all()
    expected = torch.relu(b) if relu else b
    empty = [(p, q) for p in range(P) for q in range(Q) if not taps[p][q]]
    assert empty
    for p, q in empty:
        assert torch.equal(out[:, :, p, q], expected.expand(N, K)), (p, q)
    if any(taps[p][q] for p in range(P) for q in range(Q)):
        assert_matches(out, reference(x, w, b, s, stride, padding, dilation, relu), dtype, DTYPES[key][2])


def test_plan_paths_on_cpu(monkeypatch):
    x, w, b, s = random_args(1, 8, 8, 17, 13, seed=15)
    monkeypatch.delenv("DEEPLAB_FAST_TAP_SKIPPING", raising=False)
    plan = atrous_conv2d_plan(x, w, b, s, 1, 6, 6, True)
    assert plan["path"] == "aten" and plan["tap_skipping"] is False and plan["kept_fraction"] < 1
    assert set(plan) >= {"device", "path", "reason", "tap_skipping", "kept_fraction", "regions"}
    for mode, path in [(True, "aten-tap-skipping"), ("on", "aten-tap-skipping"), (False, "aten"), ("off", "aten"),
                       ("auto", "aten")]:
        with tap_skipping(mode):
            p = atrous_conv2d_plan(x, w, b, s, 1, 6, 6, True)
        assert p["path"] == path and p["tap_skipping"] == (path == "aten-tap-skipping"), mode
        assert p["regions"] == plan["regions"] and p["kept_fraction"] == plan["kept_fraction"]
    for value, path in [("1", "aten-tap-skipping"), ("on", "aten-tap-skipping"), ("0", "aten"), ("auto", "aten"),
                        ("", "aten")]:
        monkeypatch.setenv("DEEPLAB_FAST_TAP_SKIPPING", value)
        assert atrous_conv2d_plan(x, w, b, s, 1, 6, 6, True)["path"] == path, value
    # Nothing to skip (no padding): plain ATen even when forced on, one region with every tap.
    monkeypatch.setenv("DEEPLAB_FAST_TAP_SKIPPING", "1")
    p = atrous_conv2d_plan(x, w, b, s, 1, 0, 6, True)
    assert p["path"] == "aten" and p["tap_skipping"] is False and p["kept_fraction"] == 1
    assert p["regions"] == [{"rows": [0, 5], "cols": [0, 1], "tap_rows": [0, 3], "tap_cols": [0, 3]}]


def test_plan_kept_fraction_full_precision():
    W = 1_500_000  # a 1x3 filter with padding 1 along a very long row: 2 of 3W taps are skipped
    x = torch.randn(1, 1, 1, W, generator=seeded(16))
    w = torch.randn(1, 1, 1, 3, generator=seeded(17))
    with tap_skipping(True):
        plan = atrous_conv2d_plan(x, w, padding=(0, 1))
    assert plan["tap_skipping"] is True
    assert plan["kept_fraction"] < 1
    assert plan["kept_fraction"] == pytest.approx((3 * W - 2) / (3 * W), rel=1e-12)


def test_tap_skipping_context_restores_env(monkeypatch):
    monkeypatch.delenv("DEEPLAB_FAST_TAP_SKIPPING", raising=False)
    with tap_skipping(True):
        assert os.environ["DEEPLAB_FAST_TAP_SKIPPING"] == "1"
        with tap_skipping("off"):
            assert os.environ["DEEPLAB_FAST_TAP_SKIPPING"] == "0"
        assert os.environ["DEEPLAB_FAST_TAP_SKIPPING"] == "1"
    assert "DEEPLAB_FAST_TAP_SKIPPING" not in os.environ
    monkeypatch.setenv("DEEPLAB_FAST_TAP_SKIPPING", "off")
    with pytest.raises(KeyError):
        with tap_skipping("auto"):
            assert os.environ["DEEPLAB_FAST_TAP_SKIPPING"] == "auto"
            raise KeyError("inside")
    assert os.environ["DEEPLAB_FAST_TAP_SKIPPING"] == "off"


@pytest.mark.parametrize("mode", ["yes", "ON", 2, None, 0.5, "1"])
def test_tap_skipping_bad_mode(mode):
    with pytest.raises(ValueError, match="tap_skipping: mode"):
        with tap_skipping(mode):
            pass


def test_tap_skipping_bad_env_var(monkeypatch):
    x, w, b, s = random_args(1, 8, 8, 9, 9, seed=18)
    monkeypatch.setenv("DEEPLAB_FAST_TAP_SKIPPING", "garbage")
    with pytest.raises(ValueError, match="DEEPLAB_FAST_TAP_SKIPPING.*garbage"):
        atrous_conv2d(x, w, b, s, 1, 2, 2, True)
    with pytest.raises(ValueError, match="DEEPLAB_FAST_TAP_SKIPPING"):
        atrous_conv2d_plan(x, w, b, s, 1, 2, 2, True)
    monkeypatch.delenv("DEEPLAB_FAST_TAP_SKIPPING")
    assert_matches(atrous_conv2d(x, w, b, s, 1, 2, 2, True), reference(x, w, b, s, 1, 2, 2, True), torch.float32)


# ----------------------------------------------------------------------------------------------------------
# Autograd


def _grad_inputs(seed, N=2, C=3, K=4, H=7, W=6, R=3, S=3, relu=True):
    x, w, b, s = random_args(N, C, K, H, W, R, S, dtype=F64, seed=seed)
    return [t.requires_grad_() for t in (x, w, b, s)]


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("stride,padding,dilation,mode", [
    pytest.param(1, 2, 2, False, id="rate2"),
    pytest.param(2, (1, 3), (2, 3), False, id="stride2_asym"),
    pytest.param(1, 4, 3, True, id="rate3_pad4_tap_skipping"),
    pytest.param(2, 3, 2, True, id="stride2_tap_skipping"),
])
def test_gradcheck(stride, padding, dilation, mode, relu):
    x, w, b, s = _grad_inputs(30 + int(relu))
    if relu:
        pre = reference(x.detach(), w.detach(), b.detach(), s.detach(), stride, padding, dilation)
        assert (pre < 0).any() and (pre > 0).any()
        assert pre.abs().min() > 1e-4, "a pre-activation at the ReLU kink would make finite differences unreliable"

    def f(x, w, b, s):
        return atrous_conv2d(x, w, b, s, stride, padding, dilation, relu)

    with tap_skipping(mode):
        assert torch.autograd.gradcheck(f, (x, w, b, s), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_gradcheck_subsets_of_inputs():
    """Gradients for each argument alone (the backward's needs_input_grad branches), no bias / no scale."""
    x, w, b, s = [t.detach() for t in _grad_inputs(32, K=3, H=6, W=5)]
    for wanted in ([0], [1], [2], [3], [0, 3], [1, 2]):
        args = [t.clone().requires_grad_(i in wanted) for i, t in enumerate((x, w, b, s))]
        assert torch.autograd.gradcheck(lambda *a: atrous_conv2d(*a, 1, 2, 2, True), tuple(args)), wanted
    assert torch.autograd.gradcheck(lambda x, w: atrous_conv2d(x, w, None, None, 2, 1, 2, False),
                                    (x.clone().requires_grad_(), w.clone().requires_grad_()))


@pytest.mark.parametrize("mode", [False, True])
@pytest.mark.parametrize("how", ["contiguous", "channels_last"])
def test_float32_gradients_match_reference(how, mode):
    x, w, b, s = random_args(2, 16, 12, 15, 13, seed=33)
    g = torch.randn(2, 12, 15, 13, generator=seeded(34))

    def grads(fn):
        args = [t.clone().requires_grad_() for t in (x, w, b, s)]
        xin = args[0].contiguous(memory_format=torch.channels_last) if how == "channels_last" else args[0]
        out = fn(xin, *args[1:])
        (out * g).sum().backward()
        return out, [a.grad for a in args]

    def ours(x, w, b, s):
        with tap_skipping(mode):
            return atrous_conv2d(x, w, b, s, 1, (3, 4), (3, 4), True)

    def ref(x, w, b, s):
        y = F.conv2d(x, w, None, 1, (3, 4), (3, 4)) * s.view(1, -1, 1, 1) + b.view(1, -1, 1, 1)
        return torch.relu(y)

    out, got = grads(ours)
    out_ref, expected = grads(ref)
    assert_relu_clips_and_keeps(out)
    torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-5)
    for name, a, e in zip(("input", "weight", "bias", "scale"), got, expected):
        assert a is not None and a.shape == e.shape, name
        mag = e.abs().max().item()
        assert mag > 0, name
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5 * mag, msg=lambda m: f"grad of {name}: {m}")


def test_gradgradcheck():
    """The backward is built from differentiable ops, so second derivatives work too."""
    x, w, b, s = _grad_inputs(36, N=1, K=3, H=6, W=5)
    for relu in (False, True):
        assert torch.autograd.gradgradcheck(lambda *a: atrous_conv2d(*a, 2, 2, 2, relu), (x, w, b, s))


@pytest.mark.parametrize("device,layout", [("cpu", "channels_last"), on_cuda("cuda", "channels_last"),
                                           on_cuda("cuda", "contiguous")])
def test_bfloat16_backward_matches_reference(device, layout):
    """bf16 gradients (ATen's convolution backward in bf16) against float64 autograd on the same rounded values,
    within 2% of each gradient's magnitude. The upstream gradient is bf16-exact, and zero where the
    pre-activation is within 2% of its range of 0: there the bf16 output may land on the other side of the ReLU
    than the float64 one, which flips that pixel's whole contribution (not an error of the op)."""
    x, w, b, s = (t.to(device) for t in random_args(2, 64, 32, 17, 13, dtype=torch.bfloat16, seed=37))
    pre = reference(x, w, b, s, 1, 6, 6, False)
    ambiguous = pre.abs() < 2e-2 * pre.abs().max()
    assert ambiguous.float().mean() < 0.2
    g = torch.where(ambiguous, 0, torch.randn(pre.shape, generator=seeded(38), dtype=F64).to(device))
    g = g.to(torch.bfloat16).double()

    def grads(dtype, fn):
        args = [t.to(dtype).clone().requires_grad_() for t in (x, w, b, s)]
        xin = args[0].contiguous(memory_format=torch.channels_last) if layout == "channels_last" else args[0]
        out = fn(xin, *args[1:])
        (out.double() * g).sum().backward()
        return out, [a.grad for a in args]

    out, got = grads(torch.bfloat16, lambda x, w, b, s: atrous_conv2d(x, w, b, s, 1, 6, 6, True))
    ref, expected = grads(F64, lambda x, w, b, s: torch.relu(
        F.conv2d(x, w, None, 1, 6, 6) * s.view(1, -1, 1, 1) + b.view(1, -1, 1, 1)))
    assert_relu_clips_and_keeps(out)
    assert_matches(out.detach(), ref.detach(), torch.bfloat16)
    for name, a, e in zip(("input", "weight", "bias", "scale"), got, expected):
        assert a.dtype == torch.bfloat16 and a.device == x.device and torch.isfinite(a).all(), name
        mag, err = e.abs().max().item(), (a.double() - e).abs().max().item()
        assert mag > 0 and err <= 2e-2 * mag, f"grad of {name}: max error {err:.3g}, magnitude {mag:.3g}"


def test_relu_mask_zeroes_gradient():
    """d(sum of the output)/d(bias) counts each channel's unclipped outputs; clipped ones pass no gradient."""
    x, w, b, s = random_args(2, 8, 8, 9, 9, seed=35)
    b.requires_grad_()
    out = atrous_conv2d(x, w, b, s, 1, 2, 2, True)
    assert_relu_clips_and_keeps(out)
    out.sum().backward()
    counts = (reference(x, w, b.detach(), s, 1, 2, 2, False) > 0).sum(dim=(0, 2, 3))
    assert torch.equal(b.grad, counts.to(b.grad.dtype))


# ----------------------------------------------------------------------------------------------------------
# Custom-op machinery


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("sample", atrous_conv2d_inputs("cpu"), ids=repr)
def test_opcheck(device, sample):
    """torch.library.opcheck on every sample (tests/samples.py), on both devices, with gradients."""
    args = next(s for s in atrous_conv2d_inputs(device, requires_grad=True) if s.name == sample.name).args
    result = torch.library.opcheck(OP.default, args)
    assert all(v == "SUCCESS" for v in result.values()), result


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("sample", atrous_conv2d_inputs("cpu"), ids=repr)
def test_samples_match_reference(device, sample):
    """Every sample against F.conv2d in float64 with the epilogue; on the CPU the 16-bit and TF32 samples run in
    ATen at their own precision."""
    s = next(s for s in atrous_conv2d_inputs(device) if s.name == sample.name)
    tol = {torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float32: 1e-5, F64: 1e-10}[s.args[0].dtype]
    if device != "cpu" and s.cutlass and s.args[0].dtype == torch.float32:
        tol = 1e-3  # TF32 on the CUTLASS path
    with cudnn_tf32(s.cutlass):
        out = OP(*s.args)
    assert out.device == s.args[0].device
    assert_matches(out.double(), sample_reference("atrous_conv2d", s).to(out.device), F64, tol=tol, what=s.name)


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("name", ["f32_bias_scale_relu", "f32_channels_last_crop_rate12", "f64_stride2",
                                  "cutlass_bf16_rate18_every_region"])
def test_torch_compile_samples(device, name):
    """torch.compile(fullgraph=True) through the fake kernel on samples (tests/samples.py): the same result, layout
    and gradients as eager."""
    s = next(s for s in atrous_conv2d_inputs(device, requires_grad=True) if s.name == name)

    def f(*args):
        return OP(*args) * 2.0

    eager = f(*s.args)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")(*s.args)
    assert torch.equal(compiled, eager) and compiled.stride() == eager.stride()
    leaves = [a for a in s.args[:4] if isinstance(a, torch.Tensor)]
    g_eager = torch.autograd.grad(eager.sum(), leaves)
    g_compiled = torch.autograd.grad(compiled.sum(), leaves)
    for a, b in zip(g_compiled, g_eager):
        assert torch.equal(a, b)


def test_opcheck_plan_schema():
    x, w, b, s = random_args(1, 4, 4, 9, 9, seed=43)
    torch.library.opcheck(torch.ops.deeplab_fast.atrous_conv2d_plan.default, (x, w, b, s, [1, 1], [2, 2], [2, 2],
                                                                              True),
                          test_utils=("test_schema",))


def test_torch_compile_fullgraph():
    x, w, b, s = random_args(2, 8, 16, 17, 13, seed=44)

    def head(x, w, b, s):
        y = deeplab_fast.ops.atrous_conv2d(x * 2.0, w, b, s, stride=1, padding=6, dilation=6, relu=True)
        return y.mean(dim=1)

    ref = head(x, w, b, s)
    assert_matches(ref, reference(x * 2.0, w, b, s, 1, 6, 6, True).mean(dim=1), torch.float32)
    assert torch.equal(torch.compile(head, fullgraph=True, backend="aot_eager")(x, w, b, s), ref)
    compiled = torch.compile(head, fullgraph=True)  # inductor
    torch.testing.assert_close(compiled(x, w, b, s), ref, rtol=1e-5, atol=1e-5)
    xc = x.contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(compiled(xc, w, b, s), ref, rtol=1e-5, atol=1e-5)


def test_torch_compile_dynamic_shapes():
    def head(x, w):
        return atrous_conv2d(x, w, None, None, 1, 3, 3, True)

    compiled = torch.compile(head, fullgraph=True, backend="aot_eager", dynamic=True)
    w = torch.randn(4, 3, 3, 3, generator=seeded(48))
    for H, W in [(9, 8), (11, 13), (5, 4), (2, 2)]:
        x = torch.randn(2, 3, H, W, generator=seeded(H * W))
        out = compiled(x, w)
        assert out.shape == (2, 4, H, W)
        assert_matches(out, reference(x, w, None, None, 1, 3, 3, True), torch.float32)


def test_torch_compile_backward():
    x, w, b, s = random_args(2, 8, 8, 11, 9, seed=45)

    def loss(x, w, b, s):
        return (atrous_conv2d(x, w, b, s, 2, 3, 3, True) ** 2).sum()

    def grads(fn):
        args = [t.clone().requires_grad_() for t in (x, w, b, s)]
        fn(*args).backward()
        return [a.grad for a in args]

    for got, expected in zip(grads(torch.compile(loss, fullgraph=True, backend="aot_eager")), grads(loss)):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_torch_compile_module():
    torch.manual_seed(46)
    m = AtrousConv2dReLU(8, 16, 3, padding=12, dilation=12)
    x = torch.randn(2, 8, 17, 13, generator=seeded(47)).contiguous(memory_format=torch.channels_last)
    ref = reference(x, m.weight.detach(), m.bias.detach(), None, 1, 12, 12, True)
    with torch.no_grad():
        out = torch.compile(m, fullgraph=True)(x)
    assert_matches(out, ref, torch.float32)
    assert_relu_clips_and_keeps(out)


# ----------------------------------------------------------------------------------------------------------
# Bad input: a clear error naming the argument


# The op's own checks (C++, and the fake kernel alike): ValueError, and the plan query checks its arguments too.
OP_CHECK = "the op's check"


def good():
    return random_args(2, 8, 6, 9, 10, seed=50)


def _set(t, index, value):
    t = t.clone()
    t[index] = value
    return t


@pytest.mark.parametrize(
    "device,mutate,kwargs,exc,match",
    [
        ("cpu", lambda x, w, b, s: (x, w[:, :7], b, s), {}, OP_CHECK, "input channels"),
        ("cpu", lambda x, w, b, s: (x, torch.cat([w, w[:, :1]], 1), b, s), {}, OP_CHECK, "9 input channels"),
        ("cpu", lambda x, w, b, s: (x[0], w, b, s), {}, OP_CHECK, "input must be 4-D"),
        ("cpu", lambda x, w, b, s: (x[None], w, b, s), {}, OP_CHECK, "input must be 4-D"),
        ("cpu", lambda x, w, b, s: (x, w[0], b, s), {}, OP_CHECK, "weight must be 4-D"),
        ("cpu", lambda x, w, b, s: (x, w, b[:5], s), {}, OP_CHECK, r"bias must be a 1-D tensor .*\[6\]"),
        ("cpu", lambda x, w, b, s: (x, w, b[None], s), {}, OP_CHECK, "bias must be a 1-D"),
        ("cpu", lambda x, w, b, s: (x, w, b, torch.cat([s, s])), {}, OP_CHECK, r"scale must be a 1-D tensor .*\[6\]"),
        ("cpu", lambda x, w, b, s: (x, w, b, s[:1]), {}, OP_CHECK, "scale"),
        ("cpu", lambda x, w, b, s: (x, w.double(), b, s), {}, OP_CHECK, "weight must have the input's dtype"),
        ("cpu", lambda x, w, b, s: (x, w, b.double(), s), {}, OP_CHECK, "bias must have the input's dtype"),
        ("cpu", lambda x, w, b, s: (x, w, b, s.half()), {}, OP_CHECK, "scale must have the input's dtype"),
        ("cpu", lambda x, w, b, s: (x.long(), w.long(), None, None), {}, OP_CHECK, "input must be float32"),
        ("cpu", lambda x, w, b, s: (x.to(torch.uint8), w.to(torch.uint8), None, None), {}, OP_CHECK,
         "input must be float32"),
        ("cpu", lambda x, w, b, s: (x.to(torch.complex64), w.to(torch.complex64), None, None), {}, OP_CHECK,
         "input must be float32"),
        ("cpu", lambda x, w, b, s: (x[:0], w, b, s), {}, OP_CHECK, "empty batch"),
        ("cpu", lambda x, w, b, s: (x[:, :0], w[:, :0], b, s), {}, OP_CHECK, "C, H, W > 0"),
        ("cpu", lambda x, w, b, s: (x[:, :, :0], w, b, s), {"padding": 3}, OP_CHECK, "C, H, W > 0"),
        ("cpu", lambda x, w, b, s: (x, w[:0], b[:0], s[:0]), {}, OP_CHECK, "K, R, S > 0"),
        ("cpu", lambda x, w, b, s: (x, w, b, s), {"dilation": 10}, OP_CHECK, "output would be empty"),
        ("cpu", lambda x, w, b, s: (x, w, b, s), {"dilation": (1, 10), "padding": (0, 4)}, OP_CHECK,
         "output would be empty"),
        ("cpu", lambda x, w, b, s: (x, w, b, s), {"stride": 0}, OP_CHECK, "stride must be >= 1"),
        ("cpu", lambda x, w, b, s: (x, w, b, s), {"stride": (1, -2)}, OP_CHECK, "stride must be >= 1"),
        ("cpu", lambda x, w, b, s: (x, w, b, s), {"padding": -1}, OP_CHECK, "padding must be >= 0"),
        ("cpu", lambda x, w, b, s: (x, w, b, s), {"padding": (2, -3)}, OP_CHECK, "padding must be >= 0"),
        ("cpu", lambda x, w, b, s: (x, w, b, s), {"dilation": 0}, OP_CHECK, "dilation must be >= 1"),
        ("cpu", lambda x, w, b, s: (x, w, b, s), {"dilation": (-1, 1)}, OP_CHECK, "dilation must be >= 1"),
        ("cpu", lambda x, w, b, s: (x, w, b, s), {"stride": (1, 2, 3)}, ValueError, "stride must be an int or a pair"),
        ("cpu", lambda x, w, b, s: (x, w, b, s), {"stride": 1.5}, ValueError, "stride must be an int or a pair"),
        ("cpu", lambda x, w, b, s: (x, w, b, s), {"stride": (1.0, 1)}, ValueError, "stride"),
        ("cpu", lambda x, w, b, s: (x, w, b, s), {"stride": True}, ValueError, "stride must be an int or a pair"),
        ("cpu", lambda x, w, b, s: (x, w, b, s), {"padding": "same"}, ValueError, "padding must be an int or a pair"),
        ("cpu", lambda x, w, b, s: (x, w, b, s), {"padding": [1]}, ValueError, "padding"),
        ("cpu", lambda x, w, b, s: (x, w, b, s), {"dilation": None}, ValueError, "dilation must be an int or a pair"),
        ("cpu", lambda x, w, b, s: (x.numpy(), w, b, s), {}, ValueError, "input must be a torch.Tensor"),
        ("cpu", lambda x, w, b, s: (x, w.tolist(), b, s), {}, ValueError, "weight must be a torch.Tensor"),
        ("cpu", lambda x, w, b, s: (x, w, 0.5, s), {}, ValueError, "bias must be a torch.Tensor or None"),
        ("cpu", lambda x, w, b, s: (x, w, b, s.numpy()), {}, ValueError, "scale must be a torch.Tensor or None"),
        ("cpu", lambda x, w, b, s: (None, w, b, s), {}, ValueError, "input must be a torch.Tensor"),
        ("cpu", lambda x, w, b, s: (x, w, b, s), {"relu": 1}, ValueError, "relu must be a bool"),
        ("cpu", lambda x, w, b, s: (_set(x, (1, 2, 3, 4), float("nan")), w, b, s), {"check_finite": True}, ValueError,
         "input holds NaN or Inf"),
        ("cpu", lambda x, w, b, s: (_set(x, (0, 0, 0, 0), float("-inf")), w, b, s), {"check_finite": True}, ValueError,
         "input holds NaN or Inf"),
        ("cpu", lambda x, w, b, s: (x, _set(w, (2, 3, 1, 1), float("inf")), b, s), {"check_finite": True}, ValueError,
         "weight holds NaN or Inf"),
        ("cpu", lambda x, w, b, s: (x, _set(w, (5, 7, 2, 0), float("nan")), b, s), {"check_finite": True}, ValueError,
         "weight holds NaN or Inf"),
        ("cpu", lambda x, w, b, s: (x, w, _set(b, 3, float("nan")), s), {"check_finite": True}, ValueError,
         "bias holds NaN or Inf"),
        ("cpu", lambda x, w, b, s: (x, w, b, _set(s, 0, float("inf"))), {"check_finite": True}, ValueError,
         "scale holds NaN or Inf"),
        on_cuda("cuda", lambda x, w, b, s: (x, w.cpu(), b, s), {}, OP_CHECK, "weight is on cpu but the input is on cuda"),
        on_cuda("cuda", lambda x, w, b, s: (x.cpu(), w, b.cpu(), s.cpu()), {}, OP_CHECK, "weight is on cuda.* but the input is on cpu"),
        on_cuda("cuda", lambda x, w, b, s: (x, w, b.cpu(), s), {}, OP_CHECK, "bias is on cpu but the input is on cuda"),
        on_cuda("cuda", lambda x, w, b, s: (x, w, b, s.cpu()), {}, OP_CHECK, "scale is on cpu but the input is on cuda"),
        on_cuda("cuda", lambda x, w, b, s: (x.cpu(), w.cpu(), b, s.cpu()), {}, OP_CHECK, "bias is on cuda.* but the input is on cpu"),
        on_cuda("cuda", lambda x, w, b, s: (x, w[:, :7], b, s), {}, OP_CHECK, "input channels"),
        on_cuda("cuda", lambda x, w, b, s: (x[0], w, b, s), {}, OP_CHECK, "input must be 4-D"),
        on_cuda("cuda", lambda x, w, b, s: (x, w, b[:5], s), {}, OP_CHECK, "bias must be a 1-D"),
        on_cuda("cuda", lambda x, w, b, s: (x, w, b, s[:3]), {}, OP_CHECK, "scale must be a 1-D"),
        on_cuda("cuda", lambda x, w, b, s: (x, w.float(), b, s), {}, OP_CHECK, "weight must have the input's dtype"),
        on_cuda("cuda", lambda x, w, b, s: (x, w, b.half(), s), {}, OP_CHECK, "bias must have the input's dtype"),
        on_cuda("cuda", lambda x, w, b, s: (x.int(), w.int(), None, None), {}, OP_CHECK, "input must be float32"),
        on_cuda("cuda", lambda x, w, b, s: (x[:0], w, b, s), {}, OP_CHECK, "empty batch"),
    ],
)
def test_bad_input(device, mutate, kwargs, exc, match):
    x, w, b, s = mutate(*(good() if device == "cpu" else good_cuda()))
    call = dict(padding=2, dilation=2)
    call.update(kwargs)
    # on CUDA the input channels_last, as the fast path wants it
    with pytest.raises(ValueError if exc is OP_CHECK else exc, match=match):
        atrous_conv2d(channels_last(x) if device != "cpu" and x.dim() == 4 else x, w, b, s, **call)
    if exc is OP_CHECK:  # the plan query checks its arguments as the op does
        plan_call = {k: v for k, v in call.items() if k != "check_finite"}
        with pytest.raises(ValueError, match=match):
            atrous_conv2d_plan(x, w, b, s, **plan_call)


def test_op_level_checks_without_python_wrapper():
    """The C++ op itself validates what the Python wrapper would (for C++ and torch.ops users)."""
    x, w, b, s = good()
    with pytest.raises(ValueError, match="stride must have 2 values"):
        OP(x, w, b, s, [1, 1, 1], [0, 0], [1, 1], False)
    with pytest.raises(ValueError, match="stride must be >= 1"):
        OP(x, w, b, s, [0, 1], [0, 0], [1, 1], False)
    with pytest.raises(ValueError, match="padding must be >= 0"):
        OP(x, w, b, s, [1, 1], [0, -1], [1, 1], False)
    with pytest.raises(ValueError, match="dilation must be >= 1"):
        OP(x, w, b, s, [1, 1], [0, 0], [0, 1], False)
    with pytest.raises(ValueError, match="input channels"):
        OP(x[:, :4], w, b, s, [1, 1], [0, 0], [1, 1], False)


def test_check_finite_passes_finite_input():
    x, w, b, s = good()
    out = atrous_conv2d(x, w, b, s, padding=2, dilation=2, relu=True, check_finite=True)
    assert_matches(out, reference(x, w, b, s, 1, 2, 2, True), torch.float32)


@pytest.mark.parametrize("mode", [False, True])
@pytest.mark.parametrize("relu", [False, True])
def test_nan_propagates_without_check_finite(relu, mode):
    """With check_finite=False a NaN in the input reaches exactly the outputs whose taps read it, as in F.conv2d
    (and ReLU keeps it NaN, as torch.relu does)."""
    x, w, b, s = good()
    x = _set(x, (0, 3, 4, 5), float("nan"))
    with tap_skipping(mode):
        out = atrous_conv2d(x, w, b, s, padding=2, dilation=2, relu=relu)
    ref = reference(x, w, b, s, 1, 2, 2, relu)
    nan = torch.isnan(ref)
    assert nan.any() and not nan.all()
    assert torch.equal(torch.isnan(out), nan)
    assert torch.equal(torch.isnan(out), torch.isnan(F.conv2d(x, w, None, 1, 2, 2)))
    assert_matches(torch.where(nan, 0, out), torch.where(nan, 0, ref), torch.float32)


# ----------------------------------------------------------------------------------------------------------
# AtrousConv2dReLU


def _conv(C, K, kernel_size=3, stride=1, padding=0, dilation=1, bias=True, seed=60):
    torch.manual_seed(seed)
    return nn.Conv2d(C, K, kernel_size, stride, padding, dilation, bias=bias)


def _input(N, C, H, W, seed=61, channels_last=False):
    x = torch.randn(N, C, H, W, generator=seeded(seed))
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def _random_bn(K, seed=62, **kwargs):
    """A BatchNorm2d with non-trivial running statistics, weight (some negative) and bias."""
    g = seeded(seed)
    bn = nn.BatchNorm2d(K, **kwargs)
    with torch.no_grad():
        if bn.affine:
            bn.weight.copy_(torch.randn(K, generator=g) * 0.8 + 0.3)
            bn.bias.copy_(torch.randn(K, generator=g) * 0.5)
        if bn.track_running_stats:
            bn.running_mean.copy_(torch.randn(K, generator=g) * 0.3)
            bn.running_var.copy_(torch.rand(K, generator=g) * 1.5 + 0.2)
    return bn


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("kernel_size,stride,padding,dilation", [
    (3, 1, 6, 6), (3, 2, (1, 3), (2, 3)), (1, 1, 0, 1), ((3, 1), 1, (12, 0), (12, 1)), (5, 1, 4, 2)])
def test_module_matches_conv_relu(kernel_size, stride, padding, dilation, channels_last):
    conv = _conv(16, 24, kernel_size, stride, padding, dilation)
    ref_model = nn.Sequential(conv, nn.ReLU())
    m = AtrousConv2dReLU(16, 24, kernel_size, stride, padding, dilation)
    assert [n for n, _ in m.named_parameters()] == ["weight", "bias"]
    assert not torch.equal(m.weight, conv.weight)  # freshly initialised, so the load below matters
    m.load_state_dict(conv.state_dict(), strict=True)
    x = _input(2, 16, 17, 13, channels_last=channels_last)
    with torch.no_grad():
        out, ref = m(x), ref_model(x)
    assert_matches(out, ref.double(), torch.float32)
    assert_matches(out, reference(x, conv.weight.detach(), conv.bias.detach(), None, stride, padding, dilation,
                                  True), torch.float32)
    assert_relu_clips_and_keeps(out)
    assert out.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    # And the other way: a Conv2d loads the fused module's state dict.
    conv2 = _conv(16, 24, kernel_size, stride, padding, dilation, seed=63)
    m2 = AtrousConv2dReLU(16, 24, kernel_size, stride, padding, dilation)
    conv2.load_state_dict(m2.state_dict(), strict=True)
    with torch.no_grad():
        assert_matches(m2(x), torch.relu(conv2(x)).double(), torch.float32)


def test_module_init_like_conv2d():
    """nn.Conv2d's initialisation: same distribution bounds (kaiming-uniform, a = sqrt(5)), on a big layer."""
    torch.manual_seed(66)
    m = AtrousConv2dReLU(256, 64, 3, padding=2, dilation=2)
    bound = 1 / math.sqrt(256 * 9)
    assert m.weight.abs().max() <= bound and m.weight.abs().max() > 0.95 * bound
    assert m.bias.abs().max() <= bound and m.bias.abs().max() > 0.9 * bound
    assert m.weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05)


def test_module_without_bias_and_without_relu():
    conv = _conv(8, 12, 3, 1, 2, 2, bias=False)
    m = AtrousConv2dReLU(8, 12, 3, 1, 2, 2, bias=False)
    assert m.bias is None and [n for n, _ in m.named_parameters()] == ["weight"]
    assert list(m.state_dict()) == ["weight"]
    m.load_state_dict(conv.state_dict(), strict=True)
    x = _input(2, 8, 11, 10)
    with torch.no_grad():
        out = m(x)
        assert_matches(out, torch.relu(conv(x)).double(), torch.float32)
        assert_relu_clips_and_keeps(out)
    conv_b = _conv(8, 12, 3, 1, 2, 2)
    m_lin = AtrousConv2dReLU(8, 12, 3, 1, 2, 2, relu=False)
    m_lin.load_state_dict(conv_b.state_dict())
    with torch.no_grad():
        out = m_lin(x)
        assert (out < 0).any()
        assert_matches(out, conv_b(x).double(), torch.float32)


@pytest.mark.parametrize("kwargs", [dict(in_channels=0), dict(out_channels=-1), dict(in_channels=2.0),
                                    dict(kernel_size=0), dict(stride=0), dict(padding=-1), dict(dilation=0),
                                    dict(kernel_size=(3, 3, 3)), dict(dilation=1.5)])
def test_module_bad_constructor_arguments(kwargs):
    args = dict(in_channels=4, out_channels=4, kernel_size=3)
    args.update(kwargs)
    with pytest.raises(ValueError):
        AtrousConv2dReLU(**args)


def test_module_bad_input():
    m = AtrousConv2dReLU(8, 4, 3, padding=2, dilation=2)
    with pytest.raises(ValueError, match="input channels"):
        m(torch.randn(1, 7, 9, 9))
    with pytest.raises(ValueError, match="dtype"):
        m(torch.randn(1, 8, 9, 9, dtype=F64))


@pytest.mark.parametrize("with_relu", [False, True])
def test_from_modules_shares_parameters(with_relu):
    conv = _conv(8, 12, 3, 1, 6, 6)
    m = AtrousConv2dReLU.from_modules(conv, relu=nn.ReLU() if with_relu else None)
    assert m.weight is conv.weight and m.bias is conv.bias and m.bn is None and m.relu == with_relu
    assert (m.stride, m.padding, m.dilation, m.kernel_size) == ((1, 1), (6, 6), (6, 6), (3, 3))
    x = _input(2, 8, 13, 11)
    with torch.no_grad():
        expected = torch.relu(conv(x)) if with_relu else conv(x)
        assert_matches(m(x), expected.double(), torch.float32)
        conv.weight.mul_(-2)  # shared: the module sees the change
        expected = torch.relu(conv(x)) if with_relu else conv(x)
        assert_matches(m(x), expected.double(), torch.float32)
    # Gradients land on the conv's parameters.
    m(x).sum().backward()
    assert conv.weight.grad is not None and conv.bias.grad is not None


@pytest.mark.parametrize("conv_bias", [True, False])
@pytest.mark.parametrize("affine", [True, False])
def test_from_modules_folds_eval_bn(conv_bias, affine):
    conv = _conv(16, 24, 3, 1, 12, 12, bias=conv_bias)
    bn = _random_bn(24, affine=affine).eval()
    relu = nn.ReLU()
    ref_model = nn.Sequential(copy.deepcopy(conv), copy.deepcopy(bn), nn.ReLU()).eval()
    m = AtrousConv2dReLU.from_modules(conv, bn, relu)
    assert m.bn is None and m.relu and m.bias is not None
    assert m.weight is not conv.weight
    assert [n for n, _ in m.named_parameters()] == ["weight", "bias"]
    x = _input(2, 16, 17, 13, channels_last=True)
    with torch.no_grad():
        out, ref = m(x), ref_model(x)
    assert_relu_clips_and_keeps(out)
    assert_matches(out, ref.double(), torch.float32)
    # The folded model is independent of the originals afterwards.
    with torch.no_grad():
        conv.weight.zero_()
        assert_matches(m(x), ref.double(), torch.float32)


def test_from_modules_folds_eval_bn_float64():
    conv = _conv(8, 12, 3, 2, (1, 3), (2, 3)).double()
    bn = _random_bn(12).double().eval()
    m = AtrousConv2dReLU.from_modules(conv, bn, nn.ReLU())
    assert m.weight.dtype == F64 and m.bn is None
    x = _input(2, 8, 15, 14).double()
    with torch.no_grad():
        expected = torch.relu(bn(conv(x)))
        assert_matches(m(x), expected, F64)


def test_from_modules_train_bn_kept():
    conv = _conv(16, 24, 3, 1, 6, 6)
    bn = _random_bn(24).train()
    relu = nn.ReLU()
    ref_conv, ref_bn = copy.deepcopy(conv), copy.deepcopy(bn)
    ref_model = nn.Sequential(ref_conv, ref_bn, nn.ReLU())
    m = AtrousConv2dReLU.from_modules(conv, bn, relu)
    assert m.bn is bn and m.weight is conv.weight and m.bias is conv.bias
    assert "bn" in dict(m.named_modules())
    x = _input(4, 16, 13, 11, channels_last=True)
    g = torch.randn(4, 24, 13, 11, generator=seeded(64))

    out, ref = m(x), ref_model(x)
    assert_relu_clips_and_keeps(out)
    assert_matches(out.detach(), ref.detach().double(), torch.float32, what="train mode")
    torch.testing.assert_close(bn.running_mean, ref_bn.running_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bn.running_var, ref_bn.running_var, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(bn.running_mean, _random_bn(24).running_mean)  # they did move
    assert int(bn.num_batches_tracked) == int(ref_bn.num_batches_tracked) == 1

    (out * g).sum().backward()
    (ref * g).sum().backward()
    for name, a, e in [("conv.weight", conv.weight.grad, ref_conv.weight.grad),
                       ("bn.weight", bn.weight.grad, ref_bn.weight.grad),
                       ("bn.bias", bn.bias.grad, ref_bn.bias.grad)]:
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-5 * e.abs().max().item(),
                                   msg=lambda msg: f"grad of {name}: {msg}")
    # Batch statistics cancel the conv bias: its gradient is zero up to rounding, in both models.
    small = 1e-4 * bn.bias.grad.abs().max().item()
    assert conv.bias.grad.abs().max() <= small and ref_conv.bias.grad.abs().max() <= small

    # A second training step, then eval mode: the BN's running statistics are folded at every call.
    m(x * 0.5 + 0.1)
    ref_model(x * 0.5 + 0.1)
    m.eval()
    ref_model.eval()
    assert not bn.training and not m.training
    with torch.no_grad():
        out, ref = m(x), ref_model(x)
    assert_relu_clips_and_keeps(out)
    assert_matches(out, ref.double(), torch.float32, what="eval mode")


def test_from_modules_kept_bn_eval_gradients():
    """Eval mode with a kept BN runs the fused op with scale and shift from the BN: its gradients (through the
    op's scale and bias) reach the BN's weight and bias and the conv's parameters as in the unfused model."""
    conv = _conv(8, 12, 3, 1, 2, 2)
    bn = _random_bn(12)
    ref_conv, ref_bn = copy.deepcopy(conv), copy.deepcopy(bn)
    m = AtrousConv2dReLU.from_modules(conv, bn, nn.ReLU()).eval()
    ref_model = nn.Sequential(ref_conv, ref_bn, nn.ReLU()).eval()
    assert m.bn is bn
    x = _input(2, 8, 11, 9)
    g = torch.randn(2, 12, 11, 9, generator=seeded(65))
    out, ref = m(x), ref_model(x)
    assert_relu_clips_and_keeps(out)
    (out * g).sum().backward()
    (ref * g).sum().backward()
    for name, a, e in [("conv.weight", conv.weight.grad, ref_conv.weight.grad),
                       ("conv.bias", conv.bias.grad, ref_conv.bias.grad),
                       ("bn.weight", bn.weight.grad, ref_bn.weight.grad),
                       ("bn.bias", bn.bias.grad, ref_bn.bias.grad)]:
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-5 * e.abs().max().item(),
                                   msg=lambda msg: f"grad of {name}: {msg}")


def test_from_modules_bn_without_running_stats_uses_batch_stats():
    conv = _conv(8, 12, 3, 1, 2, 2)
    bn = _random_bn(12, track_running_stats=False).eval()
    ref_model = nn.Sequential(copy.deepcopy(conv), copy.deepcopy(bn), nn.ReLU()).eval()
    m = AtrousConv2dReLU.from_modules(conv, bn, nn.ReLU())
    assert m.bn is bn
    x = _input(3, 8, 11, 9)
    with torch.no_grad():
        assert_matches(m(x), ref_model(x).double(), torch.float32)


@pytest.mark.parametrize("make,match", [
    (lambda: (nn.Conv2d(8, 8, 3, groups=2), None, None), "groups"),
    (lambda: (nn.Conv2d(8, 8, 3, padding=1, padding_mode="reflect"), None, None), "padding_mode"),
    (lambda: (nn.Conv2d(8, 8, 3, padding="same", dilation=2), None, None), "string padding"),
    (lambda: (nn.Conv2d(8, 8, 3, padding="valid"), None, None), "string padding"),
    (lambda: (nn.Conv2d(8, 8, 3), None, nn.GELU()), "relu must be an nn.ReLU"),
    (lambda: (nn.Conv2d(8, 8, 3), None, nn.ReLU6()), "relu must be an nn.ReLU"),
    (lambda: (nn.Conv2d(8, 8, 3), nn.BatchNorm2d(4), nn.ReLU()), "bn must be a BatchNorm2d over 8"),
    (lambda: (nn.Conv2d(8, 8, 3), nn.LayerNorm(8), nn.ReLU()), "bn must be a BatchNorm2d"),
    (lambda: (nn.Conv1d(8, 8, 3), None, None), "conv must be an nn.Conv2d"),
])
def test_from_modules_errors(make, match):
    conv, bn, relu = make()
    with pytest.raises(ValueError, match=match):
        AtrousConv2dReLU.from_modules(conv, bn, relu)

# ==========================================================================================================
# On CUDA: the CUTLASS path, the ATen fallback, tap skipping on the GPU.
#
# Contract (see deeplab_fast/ops/atrous_conv.py and csrc/atrous_conv/cuda/atrous_conv_cuda_ops.cpp):
# - bfloat16 / float16 / float32 with TF32 allowed (``torch.backends.cudnn.allow_tf32``), channels_last input
#   (channels contiguous, n/h/w strides multiples of 8, 16-byte aligned), C and K multiples of 8: the CUTLASS
#   path (plan path "cutlass"), tap skipping by default when it keeps <= 95% of the multiply-accumulates.
# - Everything else falls back to ATen (plan path "aten", the reason says why): contiguous input, C or K not a
#   multiple of 8, float32 with TF32 off, float64.
# - Same argument checks and messages as on the CPU, plus "<arg> is on <device> but the input is on <device>".
#
# The reference: ``F.conv2d`` in float64 on the GPU (cuDNN, no TF32 in float64) on the same dtype-rounded inputs,
# then ``* scale + bias`` and ReLU in float64 (the helpers of test_atrous_conv.py). Tolerances, per element
# ``|out - ref| <= tol * (max|ref| + |ref|)``: bfloat16 1e-2, float16 2e-3, TF32 1e-3, float32 without TF32 1e-5,
# float64 1e-10.
#
# Every test skips where CUDA is not available (CI). Where CUDA is available, a build without the CUDA kernels
# fails every test (it must not pass by skipping). tests/conftest.py sets DEEPLAB_FAST_POISON=1, so outputs
# start as NaN and the finiteness checks catch elements that no kernel wrote.

DEV = "cuda"  # the device of the CUDA tests

# name -> (dtype, TF32 allowed, tolerance)
DTYPES = {
    "bf16": (torch.bfloat16, True, 1e-2),
    "fp16": (torch.float16, True, 2e-3),
    "tf32": (torch.float32, True, 1e-3),
    "fp32": (torch.float32, False, 1e-5),
    "fp64": (torch.float64, True, 1e-10),
}
TENSOR_CORE = ["bf16", "fp16", "tf32"]
MAX_KEPT_FRACTION = 0.95  # tap skipping by default when it keeps at most this fraction (the "auto" rule)


@contextlib.contextmanager
def cudnn_tf32(enabled: bool):
    old = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = old


@pytest.fixture(autouse=True)
def _default_settings(request, monkeypatch):
    """Each CUDA test starts with the default tap-skipping rule ("auto") and TF32 allowed for cuDNN, and restores
    whatever it changes."""
    if request.node.get_closest_marker("cuda") is None:
        yield
        return
    monkeypatch.delenv("DEEPLAB_FAST_TAP_SKIPPING", raising=False)
    with cudnn_tf32(True):
        yield


# ----------------------------------------------------------------------------------------------------------
# Helpers


def to_dev(*ts):
    return tuple(t.to(DEV) if t is not None else None for t in ts)


def cuda_args(dims, dtype, seed, bias=True, scale=True):
    """random_args rounded to dtype on the CPU, then moved to the GPU: (x, w, b, s), x contiguous."""
    return to_dev(*random_args(*dims, bias=bias, scale=scale, dtype=dtype, seed=seed))


def channels_last(x):
    """x in NHWC strides. A 1x1 image gets them explicitly: .contiguous(channels_last) leaves its contiguous
    strides, which suggest the contiguous format (and so ATen)."""
    N, C, H, W = x.shape
    if H * W == 1:
        return torch.empty_strided(x.shape, (H * W * C, 1, W * C, C), dtype=x.dtype, device=x.device).copy_(x)
    return x.contiguous(memory_format=torch.channels_last)


def check(key, x, w, b, s, stride, padding, dilation, relu, path=None, reason=None, tap_skip=None, xv=None,
          what=""):
    """Runs atrous_conv2d on xv (default x) under the dtype's TF32 setting; checks the plan (path, reason
    fragment, tap_skipping) and the result against the float64 reference. Returns (output, plan)."""
    dtype, tf32, tol = DTYPES[key]
    xv = x if xv is None else xv
    if key in TENSOR_CORE and not SM80:  # every tensor-core dtype falls back, for this reason first
        path, reason, tap_skip = "aten", "compute capability", None
    with cudnn_tf32(tf32):
        plan = atrous_conv2d_plan(xv, w, b, s, stride, padding, dilation, relu)
        out = atrous_conv2d(xv, w, b, s, stride, padding, dilation, relu)
    what = f"{key} {what}: plan {plan['path']} ({plan['reason']})"
    assert plan["device"] == "cuda" and plan["split_k"] == 1, what
    if path is not None:
        assert plan["path"] == path, what
    if reason is not None:
        assert reason in plan["reason"], what
    if plan["path"] == "cutlass":
        assert re.fullmatch(r"\d+x\d+x\d+", plan["tile"]), what
    else:
        assert plan["tile"] is None and plan["tap_skipping"] is False, what
    if tap_skip is not None:
        assert plan["tap_skipping"] is tap_skip, what
    assert out.device == xv.device
    ref = reference(x, w, b, s, stride, padding, dilation, relu)
    assert_matches(out, ref, dtype, tol, what)
    if relu:
        assert_relu_clips_and_keeps(out)
    fmt = torch.channels_last if torch._prims_common.suggest_memory_format(xv) == torch.channels_last \
        else torch.contiguous_format
    assert out.is_contiguous(memory_format=fmt), f"{what}: output strides {out.stride()}"
    return out, plan


def auto_rule(plan) -> bool:
    return plan["kept_fraction"] <= MAX_KEPT_FRACTION


@needs_cuda
def test_build_has_cuda_kernels():
    for op in ("atrous_conv2d", "atrous_conv2d_plan"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"deeplab_fast::{op}", "CUDA"), op
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"deeplab_fast::{op}", "CPU"), op


# ----------------------------------------------------------------------------------------------------------
# Against the reference: the CUTLASS path


@needs_cuda
@pytest.mark.parametrize("key", TENSOR_CORE)
@pytest.mark.parametrize("dims,stride,padding,dilation", SHAPE_PARAMS)
def test_cutlass_matches_reference(dims, stride, padding, dilation, key):
    x, w, b, s = cuda_args(dims, DTYPES[key][0], seed=sum(dims) + 100)
    xc = channels_last(x)
    _, plan = check(key, x, w, b, s, stride, padding, dilation, True, "cutlass", xv=xc)
    assert plan["tap_skipping"] is (SM80 and auto_rule(plan))
    check(key, x, w, None, None, stride, padding, dilation, False, "cutlass", xv=xc)
    check(key, x, w, b, None, stride, padding, dilation, True, "cutlass", xv=xc)
    check(key, x, w, None, s, stride, padding, dilation, False, "cutlass", xv=xc)


@needs_cuda
@pytest.mark.parametrize("key", TENSOR_CORE)
@pytest.mark.parametrize("name,dims,stride,padding,dilation,tap_skip", [
    ("aspp_rate18_2048_256_33x33", (2, 2048, 256, 33, 33, 3, 3), 1, 18, 18, True),
    ("aspp_rate12_2048_256_33x33", (2, 2048, 256, 33, 33, 3, 3), 1, 12, 12, True),
    ("aspp_rate6_2048_256_33x33", (2, 2048, 256, 33, 33, 3, 3), 1, 6, 6, True),
    ("aspp_1x1_2048_256_33x33", (2, 2048, 256, 33, 33, 1, 1), 1, 0, 1, False),
    ("aspp_rate24_256_256_65x65", (2, 256, 256, 65, 65, 3, 3), 1, 24, 24, True),
    ("block4_rate2_512_512_65x65", (2, 512, 512, 65, 65, 3, 3), 1, 2, 2, False),
    ("stride2_256_512_65x65", (2, 256, 512, 65, 65, 3, 3), 2, 1, 1, False),
])
def test_deeplab_layers(name, dims, stride, padding, dilation, tap_skip, key):
    """DeepLab v3 layers at batch 2 (ASPP at output stride 16 and 8, a dilated ResNet block-4 conv)."""
    x, w, b, s = cuda_args(dims, DTYPES[key][0], seed=len(name))
    check(key, x, w, b, s, stride, padding, dilation, True, "cutlass", tap_skip=tap_skip, xv=channels_last(x),
          what=name)


@needs_cuda
@needs_sm80
@pytest.mark.parametrize("key", TENSOR_CORE)
def test_both_tiles(key):
    """A big problem takes the large tile (enough threadblocks for every SM), a tiny one the small tile."""
    x, w, b, s = cuda_args((4, 512, 512, 65, 65, 3, 3), DTYPES[key][0], seed=1)
    _, plan = check(key, x, w, b, s, 1, 2, 2, True, "cutlass", xv=channels_last(x), what="big")
    assert plan["tile"].startswith("128x128x")
    x, w, b, s = cuda_args((1, 8, 8, 17, 13, 3, 3), DTYPES[key][0], seed=2)
    _, plan = check(key, x, w, b, s, 1, 2, 2, True, "cutlass", xv=channels_last(x), what="tiny")
    assert plan["tile"].startswith("64x64x")


@needs_cuda
@pytest.mark.parametrize("key", ["bf16", "tf32"])
@pytest.mark.parametrize("view,path,reason", [
    ("spatial_crop_channels_last", "cutlass", None),
    ("channel_slice_at_8", "cutlass", None),
    ("batch_slice_channels_last", "cutlass", None),
    ("strided_w_channels_last", "cutlass", None),
    ("channel_slice_at_3", "aten", "16-byte aligned"),
    ("channel_slice_of_c_plus_4", "aten", "channels_last"),
    ("transposed_hw_channels_last", "aten", "channels_last"),
    ("channel_slice_contiguous", "aten", "channels_last"),
])
def test_non_contiguous_views(view, path, reason, key):
    """Views of larger tensors (NaN outside the view): channels_last ones with channels contiguous, 8-aligned
    strides and an aligned start run CUTLASS through their strides; the others fall back to ATen. Both match."""
    dtype = DTYPES[key][0]
    x, w, b, s = cuda_args((2, 16, 24, 17, 13, 3, 3), dtype, seed=3)
    N, C, H, W = x.shape

    def nan(*sizes):
        return channels_last(torch.full(sizes, float("nan"), dtype=dtype, device=DEV))

    if view == "spatial_crop_channels_last":
        big = nan(N, C, H + 4, W + 6)
        big[:, :, 1:1 + H, 3:3 + W] = x
        xv = big[:, :, 1:1 + H, 3:3 + W]
    elif view in ("channel_slice_at_8", "channel_slice_at_3"):
        at = 8 if view.endswith("8") else 3
        big = nan(N, C + 16, H, W)
        big[:, at:at + C] = x
        xv = big[:, at:at + C]
    elif view == "channel_slice_of_c_plus_4":
        big = nan(N, C + 4, H, W)
        big[:, :C] = x
        xv = big[:, :C]
    elif view == "batch_slice_channels_last":
        big = nan(2 * N, C, H, W)
        big[1::2] = x
        xv = big[1::2]
    elif view == "strided_w_channels_last":
        big = nan(N, C, H, 2 * W)
        big[..., ::2] = x
        xv = big[..., ::2]
    elif view == "transposed_hw_channels_last":
        xv = channels_last(x.transpose(2, 3)).transpose(2, 3)
    else:  # channel_slice_contiguous
        big = torch.full((N, C + 8, H, W), float("nan"), dtype=dtype, device=DEV)
        big[:, 8:8 + C] = x
        xv = big[:, 8:8 + C]
    assert torch.equal(xv, x) and not xv.is_contiguous()
    for stride, padding, dilation in [(1, 6, 6), (2, (1, 3), (2, 3))]:
        check(key, x, w, b, s, stride, padding, dilation, True, path, reason, xv=xv, what=view)


# ----------------------------------------------------------------------------------------------------------
# The ATen fallback


@needs_cuda
@pytest.mark.parametrize("key", TENSOR_CORE)
@pytest.mark.parametrize("dims,stride,padding,dilation", [SHAPE_PARAMS[i] for i in (0, 2, 6, 11, 18)])
def test_contiguous_input_falls_back_to_aten(dims, stride, padding, dilation, key):
    x, w, b, s = cuda_args(dims, DTYPES[key][0], seed=sum(dims) + 200)
    check(key, x, w, b, s, stride, padding, dilation, True, "aten", "not channels_last")
    check(key, x, w, None, None, stride, padding, dilation, False, "aten", "not channels_last")


@needs_cuda
@pytest.mark.parametrize("layout", ["channels_last", "contiguous"])
@pytest.mark.parametrize("dims,stride,padding,dilation", [SHAPE_PARAMS[i] for i in (0, 2, 6, 11, 18)])
def test_float32_without_tf32_is_aten_float32(dims, stride, padding, dilation, layout):
    x, w, b, s = cuda_args(dims, torch.float32, seed=sum(dims) + 300)
    xv = channels_last(x) if layout == "channels_last" else x
    _, plan = check("fp32", x, w, b, s, stride, padding, dilation, True, "aten", xv=xv)
    if layout == "channels_last":
        assert "allow_tf32" in plan["reason"]


@needs_cuda
@pytest.mark.parametrize("layout", ["channels_last", "contiguous"])
@pytest.mark.parametrize("dims,stride,padding,dilation", [SHAPE_PARAMS[i] for i in (0, 2, 6, 12)])
def test_float64_is_aten(dims, stride, padding, dilation, layout):
    x, w, b, s = cuda_args(dims, F64, seed=sum(dims) + 400)
    xv = channels_last(x) if layout == "channels_last" else x
    _, plan = check("fp64", x, w, b, s, stride, padding, dilation, True, "aten", xv=xv)
    if layout == "channels_last":
        assert "float64" in plan["reason"]


@needs_cuda
@pytest.mark.parametrize("key", TENSOR_CORE)
@pytest.mark.parametrize("C,K", [(8, 21), (256, 21), (3, 64), (12, 16), (64, 20)])
def test_channels_not_multiple_of_8_fall_back(C, K, key):
    """E.g. the 21-class classifier or a 3-channel image: ATen, still correct."""
    x, w, b, s = cuda_args((2, C, K, 17, 13, 3, 3), DTYPES[key][0], seed=C * K)
    check(key, x, w, b, s, 1, 6, 6, True, "aten", "multiples of 8", xv=channels_last(x))
    check(key, x, w, None, None, 2, 1, 1, False, "aten", "multiples of 8", xv=channels_last(x))


# ----------------------------------------------------------------------------------------------------------
# Tap skipping


@needs_cuda
@needs_sm80
@pytest.mark.parametrize("key", TENSOR_CORE)
@pytest.mark.parametrize("dims,stride,padding,dilation", TAP_PARAMS)
def test_tap_skipping_on_equals_off(dims, stride, padding, dilation, key):
    dtype, _, tol = DTYPES[key]
    x, w, b, s = cuda_args(dims, dtype, seed=sum(dims) + 500)
    xc = channels_last(x)
    with tap_skipping(True):
        on, plan_on = check(key, x, w, b, s, stride, padding, dilation, True, "cutlass", tap_skip=True, xv=xc,
                            what="on")
    with tap_skipping(False):
        off, plan_off = check(key, x, w, b, s, stride, padding, dilation, True, "cutlass", tap_skip=False,
                              xv=xc, what="off")
    _, plan_auto = check(key, x, w, b, s, stride, padding, dilation, True, "cutlass", xv=xc, what="auto")
    assert plan_auto["tap_skipping"] is auto_rule(plan_auto)
    assert plan_on["regions"] == plan_off["regions"] and plan_on["kept_fraction"] < 1
    ref = reference(x, w, b, s, stride, padding, dilation, True)
    mag = ref.abs().max().item()
    diff = (on.double() - off.double()).abs()
    assert (diff <= 2 * tol * (mag + ref.abs())).all(), f"on vs off: max diff {diff.max().item():.3g}"
    N, C, K, H, W, R, S = dims
    check_plan(plan_on, H, W, R, S, stride, padding, dilation)


@needs_cuda
@needs_sm80
def test_plan_matches_cpu_plan():
    """Same regions and kept fraction as the CPU's plan (the shared tap_regions.h), checked by brute force."""
    for seed, (dims, stride, padding, dilation) in enumerate([c[1:] for c in TAP_CASES]):
        x, w, b, s = random_args(*dims, seed=seed)
        with tap_skipping(True):
            p_cpu = atrous_conv2d_plan(x, w, b, s, stride, padding, dilation, True)
            p_dev = atrous_conv2d_plan(*to_dev(channels_last(x), w, b, s), stride, padding, dilation, True)
        assert p_dev["regions"] == p_cpu["regions"] and p_dev["kept_fraction"] == p_cpu["kept_fraction"]
        assert p_dev["device"] == "cuda" and p_dev["path"] == "cutlass" and p_dev["tap_skipping"] is True
        N, C, K, H, W, R, S = dims
        check_plan(p_dev, H, W, R, S, stride, padding, dilation)
    x, w, _, _ = random_args(1, 8, 8, 33, 33, seed=9)
    plan = atrous_conv2d_plan(*to_dev(channels_last(x), w), padding=18, dilation=18)
    assert len(plan["regions"]) == 9 and plan["kept_fraction"] == pytest.approx(0.405, abs=5e-4)
    assert plan["tap_skipping"] is True  # the auto rule: 40.5% <= 95%


# ----------------------------------------------------------------------------------------------------------
# Autograd, custom-op machinery, streams


@needs_cuda
def test_float32_backward_matches_reference():
    x, w, b, s = cuda_args((2, 16, 24, 15, 13, 3, 3), torch.float32, seed=710)
    g = torch.randn(2, 24, 7, 7, generator=seeded(711)).to(DEV)  # the output of 15x13, stride 2

    def grads(dtype, fn):
        args = [t.to(dtype).clone().requires_grad_() for t in (x, w, b, s)]
        (fn(channels_last(args[0]), *args[1:]).double() * g.double()).sum().backward()
        return [a.grad for a in args]

    with cudnn_tf32(False):
        got = grads(torch.float32, lambda x, w, b, s: atrous_conv2d(x, w, b, s, 2, (1, 3), (2, 3), True))
    expected = grads(F64, lambda x, w, b, s: torch.relu(
        F.conv2d(x, w, None, 2, (1, 3), (2, 3)) * s.view(1, -1, 1, 1) + b.view(1, -1, 1, 1)))
    for name, a, e in zip(("input", "weight", "bias", "scale"), got, expected):
        torch.testing.assert_close(a.double(), e, rtol=1e-5, atol=1e-5 * e.abs().max().item(),
                                   msg=lambda m: f"grad of {name}: {m}")


@needs_cuda
def test_torch_compile_cuda():
    x, w, b, s = cuda_args((2, 64, 32, 33, 33, 3, 3), torch.bfloat16, seed=730)
    xc = channels_last(x)

    def head(x, w, b, s):
        y = deeplab_fast.ops.atrous_conv2d(x, w, b, s, stride=1, padding=18, dilation=18, relu=True)
        return y.float().mean(dim=1)

    eager = head(xc, w, b, s)
    compiled = torch.compile(head, fullgraph=True)(xc, w, b, s)
    ref = reference(x, w, b, s, 1, 18, 18, True).mean(dim=1)
    assert_matches(eager.double(), ref, F64, tol=1e-2, what="eager")
    assert_matches(compiled.double(), ref, F64, tol=1e-2, what="compiled")
    torch.testing.assert_close(compiled, eager, rtol=1e-2, atol=1e-2 * eager.abs().max().item())


@needs_cuda
def test_torch_compile_module_cuda():
    torch.manual_seed(731)
    m = AtrousConv2dReLU(64, 64, 3, padding=12, dilation=12).to(DEV, torch.bfloat16)
    x = channels_last(torch.randn(2, 64, 33, 33, generator=seeded(732)).to(DEV, torch.bfloat16))
    with torch.no_grad():
        eager = m(x)
        compiled = torch.compile(m, fullgraph=True)(x)
    ref = reference(x, m.weight.detach(), m.bias.detach(), None, 1, 12, 12, True)
    assert_matches(eager, ref, torch.bfloat16, what="eager")
    assert_matches(compiled, ref, torch.bfloat16, what="compiled")
    assert_relu_clips_and_keeps(compiled)


@needs_cuda
def test_runs_on_the_current_stream():
    x, w, b, s = cuda_args((2, 64, 64, 33, 33, 3, 3), torch.bfloat16, seed=740)
    xc = channels_last(x)
    ref = reference(x, w, b, s, 1, 18, 18, True)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        outs = [atrous_conv2d(xc, w, b, s, 1, 18, 18, True) for _ in range(3)]
        with tap_skipping(False):
            outs.append(atrous_conv2d(xc, w, b, s, 1, 18, 18, True))
    side.synchronize()
    for out in outs:
        assert_matches(out, ref, torch.bfloat16)


@needs_cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs a second GPU")
def test_second_device():
    x, w, b, s = random_args(2, 16, 16, 17, 13, dtype=torch.bfloat16, seed=750)
    dev = torch.device("cuda", 1)
    args = [t.to(dev) for t in (channels_last(x), w, b, s)]
    out = atrous_conv2d(*args, 1, 6, 6, True)
    assert out.device == dev
    assert_matches(out, reference(x, w, b, s, 1, 6, 6, True).to(dev), torch.bfloat16)


# ----------------------------------------------------------------------------------------------------------
# Bad input


def good_cuda():
    return cuda_args((2, 8, 16, 9, 10, 3, 3), torch.bfloat16, seed=760)


@needs_cuda
@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(dilation=10), ValueError, "output would be empty"),
    (dict(stride=0), ValueError, "stride must be >= 1"),
    (dict(padding=-1), ValueError, "padding must be >= 0"),
    (dict(dilation=0), ValueError, "dilation must be >= 1"),
    (dict(stride=(1, 2, 3)), ValueError, "stride must be an int or a pair"),
])
def test_bad_arguments(kwargs, exc, match):
    x, w, b, s = good_cuda()
    with pytest.raises(exc, match=match):
        atrous_conv2d(channels_last(x), w, b, s, **kwargs)


@needs_cuda
@pytest.mark.parametrize("arg", ["input", "weight", "bias", "scale"])
def test_check_finite_cuda(arg):
    x, w, b, s = good_cuda()
    tensors = dict(input=channels_last(x), weight=w, bias=b, scale=s)
    t = tensors[arg].clone()
    t[tuple(d // 2 for d in t.shape)] = float("nan")
    tensors[arg] = t
    with pytest.raises(ValueError, match=f"{arg} holds NaN or Inf"):
        atrous_conv2d(tensors["input"], tensors["weight"], tensors["bias"], tensors["scale"], padding=2, dilation=2,
                      check_finite=True)
    out = atrous_conv2d(channels_last(x), w, b, s, padding=2, dilation=2, check_finite=True)
    assert_matches(out, reference(x, w, b, s, 1, 2, 2), torch.bfloat16)


@needs_cuda
def test_nan_propagates_without_check_finite_cuda():
    x, w, b, s = good_cuda()
    x = x.clone()
    x[1, 5, 4, 6] = float("nan")
    ref = reference(x, w, b, s, 1, 2, 2, True)
    nan = torch.isnan(ref)
    assert nan.any() and not nan.all()
    for mode in (True, False):
        with tap_skipping(mode):
            out = atrous_conv2d(channels_last(x), w, b, s, padding=2, dilation=2, relu=True)
        assert torch.equal(torch.isnan(out), nan), mode
        assert_matches(torch.where(nan, 0, out), torch.where(nan, 0, ref), torch.bfloat16)


# ----------------------------------------------------------------------------------------------------------
# AtrousConv2dReLU on the GPU


@needs_cuda
@pytest.mark.parametrize("key", TENSOR_CORE)
def test_module_cuda_matches_cpu_float64_module(key):
    """The module in bf16 / fp16 / fp32 on the GPU (channels_last) vs the same module, with the same rounded
    weights, in float64 on the CPU; and vs nn.Conv2d + nn.ReLU in float64."""
    dtype = DTYPES[key][0]
    torch.manual_seed(770)
    m = AtrousConv2dReLU(256, 64, 3, padding=12, dilation=12)
    m_dev = copy.deepcopy(m).to(DEV, dtype)
    m_ref = copy.deepcopy(m_dev).to("cpu", F64)
    x = torch.randn(2, 256, 33, 33, generator=seeded(771)).to(dtype)
    with torch.no_grad(), cudnn_tf32(True):
        out = m_dev(channels_last(x.to(DEV)))
        ref = m_ref(x.double())
        conv = nn.Conv2d(256, 64, 3, padding=12, dilation=12).double()
        conv.load_state_dict(m_ref.state_dict())
        ref_conv = torch.relu(conv(x.double()))
    assert out.dtype == dtype and out.is_contiguous(memory_format=torch.channels_last)
    assert_relu_clips_and_keeps(out)
    assert_matches(out.cpu(), ref, dtype, DTYPES[key][2], "vs the CPU float64 module")
    assert_matches(out.cpu(), ref_conv, dtype, DTYPES[key][2], "vs nn.Conv2d + nn.ReLU")


@needs_cuda
def test_module_from_modules_bn_eval_cuda_bf16():
    conv = _conv(64, 32, 3, 1, 6, 6)
    bn = _random_bn(32).eval()
    ref_model = nn.Sequential(copy.deepcopy(conv), copy.deepcopy(bn), nn.ReLU()).double().eval()
    m = AtrousConv2dReLU.from_modules(conv, bn, nn.ReLU()).to(DEV, torch.bfloat16)
    assert m.bn is None
    x = torch.randn(2, 64, 33, 33, generator=seeded(780)).to(torch.bfloat16)
    with torch.no_grad():
        out = m(channels_last(x.to(DEV)))
        ref = ref_model(x.double())
    assert_relu_clips_and_keeps(out)
    # The folded weights are rounded to bf16 after folding: compare with a bf16 tolerance.
    assert_matches(out.cpu(), ref, torch.bfloat16)
