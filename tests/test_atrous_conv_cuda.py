"""deeplab_fast.ops.atrous_conv2d and deeplab_fast.nn.AtrousConv2dReLU on CUDA, against a float64 reference.

Contract (see deeplab_fast/ops/atrous_conv.py and csrc/atrous_conv/cuda/atrous_conv_cuda_ops.cpp):
- bfloat16 / float16 / float32 with TF32 allowed (``torch.backends.cudnn.allow_tf32``), channels_last input
  (channels contiguous, n/h/w strides multiples of 8, 16-byte aligned), C and K multiples of 8: the CUTLASS
  path (plan path "cutlass"), tap skipping by default when it keeps <= 95% of the multiply-accumulates.
- Everything else falls back to ATen (plan path "aten", the reason says why): contiguous input, C or K not a
  multiple of 8, float32 with TF32 off, float64.
- Same argument checks and messages as on the CPU, plus "<arg> is on <device> but the input is on <device>".

The reference: ``F.conv2d`` in float64 on the GPU (cuDNN, no TF32 in float64) on the same dtype-rounded inputs,
then ``* scale + bias`` and ReLU in float64 (the helpers of test_atrous_conv.py). Tolerances, per element
``|out - ref| <= tol * (max|ref| + |ref|)``: bfloat16 1e-2, float16 2e-3, TF32 1e-3, float32 without TF32 1e-5,
float64 1e-10.

Every test skips where CUDA is not available (CI). Where CUDA is available, a build without the CUDA kernels
fails every test (it must not pass by skipping). tests/conftest.py sets DEEPLAB_FAST_POISON=1, so outputs
start as NaN and the finiteness checks catch elements that no kernel wrote.
"""
from __future__ import annotations

import contextlib
import copy
import os
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import deeplab_fast
from deeplab_fast.nn import AtrousConv2dReLU
from deeplab_fast.ops import atrous_conv2d, atrous_conv2d_plan, tap_skipping

import test_atrous_conv as cpu  # the CPU tests' helpers and shape tables (its tests are not re-collected here)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="CUDA is not available: the CUDA atrous convolution tests need a GPU")

DEV = "cuda"
F64 = torch.float64
OP = torch.ops.deeplab_fast.atrous_conv2d

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
# The CUTLASS kernels are built for sm_80 and sm_90; older GPUs take the ATen path (the reason says so).
SM80 = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 8
needs_sm80 = pytest.mark.skipif(not SM80, reason="the CUTLASS path needs compute capability >= 8.0")


@pytest.fixture(autouse=True)
def _require_cuda_kernels():
    """Runs only where CUDA is available (pytestmark skips first elsewhere): a CPU-only build fails here."""
    for op in ("atrous_conv2d", "atrous_conv2d_plan"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"deeplab_fast::{op}", "CUDA"), (
            f"CUDA is available but deeplab_fast has no CUDA kernel for {op}: the build is CPU-only. Rebuild with "
            "`pip install --no-build-isolation -v -e .` on a machine with nvcc, or FORCE_CUDA=1.")


@pytest.fixture(autouse=True)
def _default_settings(monkeypatch):
    """Each test starts with the default tap-skipping rule ("auto") and TF32 allowed for cuDNN, and restores
    whatever it changes."""
    monkeypatch.delenv("DEEPLAB_FAST_TAP_SKIPPING", raising=False)
    old = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = old


@contextlib.contextmanager
def cudnn_tf32(enabled: bool):
    old = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = old


# ----------------------------------------------------------------------------------------------------------
# Helpers


def to_dev(*ts):
    return tuple(t.to(DEV) if t is not None else None for t in ts)


def cuda_args(dims, dtype, seed, bias=True, scale=True):
    """cpu.random_args rounded to dtype on the CPU, then moved to the GPU: (x, w, b, s), x contiguous."""
    return to_dev(*cpu.random_args(*dims, bias=bias, scale=scale, dtype=dtype, seed=seed))


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
    ref = cpu.reference(x, w, b, s, stride, padding, dilation, relu)
    cpu.assert_matches(out, ref, dtype, tol, what)
    if relu:
        cpu.assert_relu_clips_and_keeps(out)
    fmt = torch.channels_last if torch._prims_common.suggest_memory_format(xv) == torch.channels_last \
        else torch.contiguous_format
    assert out.is_contiguous(memory_format=fmt), f"{what}: output strides {out.stride()}"
    return out, plan


def auto_rule(plan) -> bool:
    return plan["kept_fraction"] <= MAX_KEPT_FRACTION


def test_build_has_cuda_kernels():
    for op in ("atrous_conv2d", "atrous_conv2d_plan"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"deeplab_fast::{op}", "CUDA"), op
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"deeplab_fast::{op}", "CPU"), op


def test_poison_is_on():
    """The finiteness checks below mean something only if outputs start as NaN (tests/conftest.py)."""
    assert os.environ.get("DEEPLAB_FAST_POISON") == "1"


# ----------------------------------------------------------------------------------------------------------
# Against the reference: the CUTLASS path


@pytest.mark.parametrize("key", TENSOR_CORE)
@pytest.mark.parametrize("dims,stride,padding,dilation", cpu.SHAPE_PARAMS)
def test_cutlass_matches_reference(dims, stride, padding, dilation, key):
    x, w, b, s = cuda_args(dims, DTYPES[key][0], seed=sum(dims) + 100)
    xc = channels_last(x)
    _, plan = check(key, x, w, b, s, stride, padding, dilation, True, "cutlass", xv=xc)
    assert plan["tap_skipping"] is (SM80 and auto_rule(plan))
    check(key, x, w, None, None, stride, padding, dilation, False, "cutlass", xv=xc)
    check(key, x, w, b, None, stride, padding, dilation, True, "cutlass", xv=xc)
    check(key, x, w, None, s, stride, padding, dilation, False, "cutlass", xv=xc)


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


@pytest.mark.parametrize("key", TENSOR_CORE)
@pytest.mark.parametrize("dims,stride,padding,dilation", [cpu.SHAPE_PARAMS[i] for i in (0, 2, 6, 11, 18)])
def test_contiguous_input_falls_back_to_aten(dims, stride, padding, dilation, key):
    x, w, b, s = cuda_args(dims, DTYPES[key][0], seed=sum(dims) + 200)
    check(key, x, w, b, s, stride, padding, dilation, True, "aten", "not channels_last")
    check(key, x, w, None, None, stride, padding, dilation, False, "aten", "not channels_last")


@pytest.mark.parametrize("layout", ["channels_last", "contiguous"])
@pytest.mark.parametrize("dims,stride,padding,dilation", [cpu.SHAPE_PARAMS[i] for i in (0, 2, 6, 11, 18)])
def test_float32_without_tf32_is_aten_float32(dims, stride, padding, dilation, layout):
    x, w, b, s = cuda_args(dims, torch.float32, seed=sum(dims) + 300)
    xv = channels_last(x) if layout == "channels_last" else x
    _, plan = check("fp32", x, w, b, s, stride, padding, dilation, True, "aten", xv=xv)
    if layout == "channels_last":
        assert "allow_tf32" in plan["reason"]


@pytest.mark.parametrize("layout", ["channels_last", "contiguous"])
@pytest.mark.parametrize("dims,stride,padding,dilation", [cpu.SHAPE_PARAMS[i] for i in (0, 2, 6, 12)])
def test_float64_is_aten(dims, stride, padding, dilation, layout):
    x, w, b, s = cuda_args(dims, F64, seed=sum(dims) + 400)
    xv = channels_last(x) if layout == "channels_last" else x
    _, plan = check("fp64", x, w, b, s, stride, padding, dilation, True, "aten", xv=xv)
    if layout == "channels_last":
        assert "float64" in plan["reason"]


@pytest.mark.parametrize("key", TENSOR_CORE)
@pytest.mark.parametrize("C,K", [(8, 21), (256, 21), (3, 64), (12, 16), (64, 20)])
def test_channels_not_multiple_of_8_fall_back(C, K, key):
    """E.g. the 21-class classifier or a 3-channel image: ATen, still correct."""
    x, w, b, s = cuda_args((2, C, K, 17, 13, 3, 3), DTYPES[key][0], seed=C * K)
    check(key, x, w, b, s, 1, 6, 6, True, "aten", "multiples of 8", xv=channels_last(x))
    check(key, x, w, None, None, 2, 1, 1, False, "aten", "multiples of 8", xv=channels_last(x))


# ----------------------------------------------------------------------------------------------------------
# Tap skipping


@needs_sm80
@pytest.mark.parametrize("key", TENSOR_CORE)
@pytest.mark.parametrize("dims,stride,padding,dilation", cpu.TAP_PARAMS)
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
    ref = cpu.reference(x, w, b, s, stride, padding, dilation, True)
    mag = ref.abs().max().item()
    diff = (on.double() - off.double()).abs()
    assert (diff <= 2 * tol * (mag + ref.abs())).all(), f"on vs off: max diff {diff.max().item():.3g}"
    N, C, K, H, W, R, S = dims
    cpu.check_plan(plan_on, H, W, R, S, stride, padding, dilation)


@needs_sm80
def test_plan_matches_cpu_plan():
    """Same regions and kept fraction as the CPU's plan (the shared tap_regions.h), checked by brute force."""
    for seed, (dims, stride, padding, dilation) in enumerate([c[1:] for c in cpu.TAP_CASES]):
        x, w, b, s = cpu.random_args(*dims, seed=seed)
        with tap_skipping(True):
            p_cpu = atrous_conv2d_plan(x, w, b, s, stride, padding, dilation, True)
            p_dev = atrous_conv2d_plan(*to_dev(channels_last(x), w, b, s), stride, padding, dilation, True)
        assert p_dev["regions"] == p_cpu["regions"] and p_dev["kept_fraction"] == p_cpu["kept_fraction"]
        assert p_dev["device"] == "cuda" and p_dev["path"] == "cutlass" and p_dev["tap_skipping"] is True
        N, C, K, H, W, R, S = dims
        cpu.check_plan(p_dev, H, W, R, S, stride, padding, dilation)
    x, w, _, _ = cpu.random_args(1, 8, 8, 33, 33, seed=9)
    plan = atrous_conv2d_plan(*to_dev(channels_last(x), w), padding=18, dilation=18)
    assert len(plan["regions"]) == 9 and plan["kept_fraction"] == pytest.approx(0.405, abs=5e-4)
    assert plan["tap_skipping"] is True  # the auto rule: 40.5% <= 95%


@needs_sm80
@pytest.mark.parametrize("key", ["bf16", "tf32"])
@pytest.mark.parametrize("mode", [True, False])
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("dims,stride,padding,dilation", [
    pytest.param((2, 8, 16, 4, 4, 3, 3), 1, 7, 5, id="4x4_3x3_rate5_pad7"),
    pytest.param((2, 8, 16, 1, 1, 3, 3), 2, 5, 4, id="1x1_stride2_pad5_rate4_all_padding"),
    pytest.param((1, 16, 8, 6, 5, 1, 1), 1, 2, 1, id="1x1_kernel_pad2"),
])
def test_outputs_reading_only_padding(dims, stride, padding, dilation, relu, mode, key):
    """Pixels without any in-bounds tap hold relu?(bias) exactly (regions without taps are not launched)."""
    dtype = DTYPES[key][0]
    N, C, K, H, W, R, S = dims
    x, w, b, s = cuda_args(dims, dtype, seed=600)
    assert (b < 0).any() and (b > 0).any()
    P, Q, taps = cpu.brute_force_taps(H, W, R, S, stride, padding, dilation)
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
        cpu.assert_matches(out, cpu.reference(x, w, b, s, stride, padding, dilation, relu), dtype, DTYPES[key][2])


# ----------------------------------------------------------------------------------------------------------
# Autograd, custom-op machinery, streams


@pytest.mark.parametrize("layout", ["channels_last", "contiguous"])
def test_bf16_backward_matches_reference(layout):
    """bf16 gradients (ATen's convolution backward in bf16) against float64 autograd on the same rounded values,
    within 2% of each gradient's magnitude. The upstream gradient is bf16-exact, and zero where the
    pre-activation is within 2% of its range of 0: there the bf16 output may land on the other side of the
    ReLU than the float64 one, which flips that pixel's whole contribution (not an error of the op)."""
    x, w, b, s = cuda_args((2, 64, 32, 17, 13, 3, 3), torch.bfloat16, seed=700)
    pre = cpu.reference(x, w, b, s, 1, 6, 6, False)
    g = torch.randn(2, 32, 17, 13, generator=cpu.seeded(701), dtype=F64).to(DEV)
    ambiguous = pre.abs() < 2e-2 * pre.abs().max()
    assert ambiguous.float().mean() < 0.2
    g = torch.where(ambiguous, 0, g).to(torch.bfloat16).double()

    def grads(dtype, fn):
        args = [t.to(dtype).clone().requires_grad_() for t in (x, w, b, s)]
        xin = channels_last(args[0]) if layout == "channels_last" else args[0]
        out = fn(xin, *args[1:])
        (out.double() * g).sum().backward()
        return out, [a.grad for a in args]

    out, got = grads(torch.bfloat16, lambda x, w, b, s: atrous_conv2d(x, w, b, s, 1, 6, 6, True))
    ref, expected = grads(F64, lambda x, w, b, s: torch.relu(
        F.conv2d(x, w, None, 1, 6, 6) * s.view(1, -1, 1, 1) + b.view(1, -1, 1, 1)))
    cpu.assert_relu_clips_and_keeps(out)
    cpu.assert_matches(out.detach(), ref.detach(), torch.bfloat16)
    for name, a, e in zip(("input", "weight", "bias", "scale"), got, expected):
        assert a.dtype == torch.bfloat16 and a.device == x.device and torch.isfinite(a).all(), name
        mag = e.abs().max().item()
        err = (a.double() - e).abs().max().item()
        assert mag > 0 and err <= 2e-2 * mag, f"grad of {name}: max error {err:.3g}, magnitude {mag:.3g}"


def test_float32_backward_matches_reference():
    x, w, b, s = cuda_args((2, 16, 24, 15, 13, 3, 3), torch.float32, seed=710)
    g = torch.randn(2, 24, 7, 7, generator=cpu.seeded(711)).to(DEV)  # the output of 15x13, stride 2

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


def _opcheck_args():
    x, w, b, s = cpu.random_args(2, 16, 16, 13, 11, dtype=torch.bfloat16, seed=720)
    xf, wf, bf, sf = cpu.random_args(2, 8, 24, 9, 10, dtype=torch.float32, seed=721)
    xd, wd, bd, sd = cpu.random_args(2, 8, 8, 9, 8, dtype=F64, seed=722)
    return [
        pytest.param(lambda: (channels_last(x), w, b, s, [1, 1], [6, 6], [6, 6], True), id="bf16_cutlass_relu"),
        pytest.param(lambda: (channels_last(x), w, None, None, [2, 1], [1, 3], [3, 2], False),
                     id="bf16_cutlass_plain"),
        pytest.param(lambda: (xf, wf, bf, None, [1, 1], [2, 2], [2, 2], True), id="fp32_contiguous_aten"),
        pytest.param(lambda: (channels_last(x).requires_grad_(), w.clone().requires_grad_(),
                              b.clone().requires_grad_(), s.clone().requires_grad_(), [1, 1], [2, 2], [2, 2], True),
                     id="bf16_requires_grad"),
        pytest.param(lambda: (channels_last(xd).requires_grad_(), wd.clone().requires_grad_(), None,
                              sd.clone().requires_grad_(), [2, 2], [3, 3], [2, 2], False),
                     id="fp64_requires_grad"),
    ]


@pytest.mark.parametrize("make", _opcheck_args())
def test_opcheck_cuda(make):
    def to_dev_leaf(a):  # .to keeps the memory format (preserve_format); requires_grad carries over to the leaf
        return a.detach().to(DEV).requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor) else a

    args = tuple(to_dev_leaf(a) for a in make())
    result = torch.library.opcheck(OP.default, args)
    assert all(v == "SUCCESS" for v in result.values()), result


def test_torch_compile_cuda():
    x, w, b, s = cuda_args((2, 64, 32, 33, 33, 3, 3), torch.bfloat16, seed=730)
    xc = channels_last(x)

    def head(x, w, b, s):
        y = deeplab_fast.ops.atrous_conv2d(x, w, b, s, stride=1, padding=18, dilation=18, relu=True)
        return y.float().mean(dim=1)

    eager = head(xc, w, b, s)
    compiled = torch.compile(head, fullgraph=True)(xc, w, b, s)
    ref = cpu.reference(x, w, b, s, 1, 18, 18, True).mean(dim=1)
    cpu.assert_matches(eager.double(), ref, F64, tol=1e-2, what="eager")
    cpu.assert_matches(compiled.double(), ref, F64, tol=1e-2, what="compiled")
    torch.testing.assert_close(compiled, eager, rtol=1e-2, atol=1e-2 * eager.abs().max().item())


def test_torch_compile_module_cuda():
    torch.manual_seed(731)
    m = AtrousConv2dReLU(64, 64, 3, padding=12, dilation=12).to(DEV, torch.bfloat16)
    x = channels_last(torch.randn(2, 64, 33, 33, generator=cpu.seeded(732)).to(DEV, torch.bfloat16))
    with torch.no_grad():
        eager = m(x)
        compiled = torch.compile(m, fullgraph=True)(x)
    ref = cpu.reference(x, m.weight.detach(), m.bias.detach(), None, 1, 12, 12, True)
    cpu.assert_matches(eager, ref, torch.bfloat16, what="eager")
    cpu.assert_matches(compiled, ref, torch.bfloat16, what="compiled")
    cpu.assert_relu_clips_and_keeps(compiled)


def test_runs_on_the_current_stream():
    x, w, b, s = cuda_args((2, 64, 64, 33, 33, 3, 3), torch.bfloat16, seed=740)
    xc = channels_last(x)
    ref = cpu.reference(x, w, b, s, 1, 18, 18, True)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        outs = [atrous_conv2d(xc, w, b, s, 1, 18, 18, True) for _ in range(3)]
        with tap_skipping(False):
            outs.append(atrous_conv2d(xc, w, b, s, 1, 18, 18, True))
    side.synchronize()
    for out in outs:
        cpu.assert_matches(out, ref, torch.bfloat16)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs a second GPU")
def test_second_device():
    x, w, b, s = cpu.random_args(2, 16, 16, 17, 13, dtype=torch.bfloat16, seed=750)
    dev = torch.device("cuda", 1)
    args = [t.to(dev) for t in (channels_last(x), w, b, s)]
    out = atrous_conv2d(*args, 1, 6, 6, True)
    assert out.device == dev
    cpu.assert_matches(out, cpu.reference(x, w, b, s, 1, 6, 6, True).to(dev), torch.bfloat16)


# ----------------------------------------------------------------------------------------------------------
# Bad input


def good():
    return cuda_args((2, 8, 16, 9, 10, 3, 3), torch.bfloat16, seed=760)


@pytest.mark.parametrize("mutate,match", [
    (lambda x, w, b, s: (x, w.cpu(), b, s), "weight is on cpu but the input is on cuda"),
    (lambda x, w, b, s: (x.cpu(), w, b.cpu(), s.cpu()), "weight is on cuda.* but the input is on cpu"),
    (lambda x, w, b, s: (x, w, b.cpu(), s), "bias is on cpu but the input is on cuda"),
    (lambda x, w, b, s: (x, w, b, s.cpu()), "scale is on cpu but the input is on cuda"),
    (lambda x, w, b, s: (x.cpu(), w.cpu(), b, s.cpu()), "bias is on cuda.* but the input is on cpu"),
    (lambda x, w, b, s: (x, w[:, :7], b, s), "input channels"),
    (lambda x, w, b, s: (x[0], w, b, s), "input must be 4-D"),
    (lambda x, w, b, s: (x, w, b[:5], s), "bias must be a 1-D"),
    (lambda x, w, b, s: (x, w, b, s[:3]), "scale must be a 1-D"),
    (lambda x, w, b, s: (x, w.float(), b, s), "weight must have the input's dtype"),
    (lambda x, w, b, s: (x, w, b.half(), s), "bias must have the input's dtype"),
    (lambda x, w, b, s: (x.int(), w.int(), None, None), "input must be float32"),
    (lambda x, w, b, s: (x[:0], w, b, s), "empty batch"),
])
def test_bad_input(mutate, match):
    x, w, b, s = mutate(*good())
    with pytest.raises(RuntimeError, match=match):
        atrous_conv2d(channels_last(x) if x.dim() == 4 else x, w, b, s, padding=2, dilation=2)
    with pytest.raises(RuntimeError, match=match):
        atrous_conv2d_plan(x, w, b, s, padding=2, dilation=2)


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(dilation=10), RuntimeError, "output would be empty"),
    (dict(stride=0), RuntimeError, "stride must be >= 1"),
    (dict(padding=-1), RuntimeError, "padding must be >= 0"),
    (dict(dilation=0), RuntimeError, "dilation must be >= 1"),
    (dict(stride=(1, 2, 3)), ValueError, "stride must be an int or a pair"),
])
def test_bad_arguments(kwargs, exc, match):
    x, w, b, s = good()
    with pytest.raises(exc, match=match):
        atrous_conv2d(channels_last(x), w, b, s, **kwargs)


@pytest.mark.parametrize("arg", ["input", "weight", "bias", "scale"])
def test_check_finite_cuda(arg):
    x, w, b, s = good()
    tensors = dict(input=channels_last(x), weight=w, bias=b, scale=s)
    t = tensors[arg].clone()
    t[tuple(d // 2 for d in t.shape)] = float("nan")
    tensors[arg] = t
    with pytest.raises(ValueError, match=f"{arg} holds NaN or Inf"):
        atrous_conv2d(tensors["input"], tensors["weight"], tensors["bias"], tensors["scale"], padding=2, dilation=2,
                      check_finite=True)
    out = atrous_conv2d(channels_last(x), w, b, s, padding=2, dilation=2, check_finite=True)
    cpu.assert_matches(out, cpu.reference(x, w, b, s, 1, 2, 2), torch.bfloat16)


def test_nan_propagates_without_check_finite_cuda():
    x, w, b, s = good()
    x = x.clone()
    x[1, 5, 4, 6] = float("nan")
    ref = cpu.reference(x, w, b, s, 1, 2, 2, True)
    nan = torch.isnan(ref)
    assert nan.any() and not nan.all()
    for mode in (True, False):
        with tap_skipping(mode):
            out = atrous_conv2d(channels_last(x), w, b, s, padding=2, dilation=2, relu=True)
        assert torch.equal(torch.isnan(out), nan), mode
        cpu.assert_matches(torch.where(nan, 0, out), torch.where(nan, 0, ref), torch.bfloat16)


# ----------------------------------------------------------------------------------------------------------
# AtrousConv2dReLU on the GPU


@pytest.mark.parametrize("key", TENSOR_CORE)
def test_module_cuda_matches_cpu_float64_module(key):
    """The module in bf16 / fp16 / fp32 on the GPU (channels_last) vs the same module, with the same rounded
    weights, in float64 on the CPU; and vs nn.Conv2d + nn.ReLU in float64."""
    dtype = DTYPES[key][0]
    torch.manual_seed(770)
    m = AtrousConv2dReLU(256, 64, 3, padding=12, dilation=12)
    m_dev = copy.deepcopy(m).to(DEV, dtype)
    m_ref = copy.deepcopy(m_dev).to("cpu", F64)
    x = torch.randn(2, 256, 33, 33, generator=cpu.seeded(771)).to(dtype)
    with torch.no_grad(), cudnn_tf32(True):
        out = m_dev(channels_last(x.to(DEV)))
        ref = m_ref(x.double())
        conv = nn.Conv2d(256, 64, 3, padding=12, dilation=12).double()
        conv.load_state_dict(m_ref.state_dict())
        ref_conv = torch.relu(conv(x.double()))
    assert out.dtype == dtype and out.is_contiguous(memory_format=torch.channels_last)
    cpu.assert_relu_clips_and_keeps(out)
    cpu.assert_matches(out.cpu(), ref, dtype, DTYPES[key][2], "vs the CPU float64 module")
    cpu.assert_matches(out.cpu(), ref_conv, dtype, DTYPES[key][2], "vs nn.Conv2d + nn.ReLU")


def test_module_from_modules_bn_eval_cuda_bf16():
    conv = cpu._conv(64, 32, 3, 1, 6, 6)
    bn = cpu._random_bn(32).eval()
    ref_model = nn.Sequential(copy.deepcopy(conv), copy.deepcopy(bn), nn.ReLU()).double().eval()
    m = AtrousConv2dReLU.from_modules(conv, bn, nn.ReLU()).to(DEV, torch.bfloat16)
    assert m.bn is None
    x = torch.randn(2, 64, 33, 33, generator=cpu.seeded(780)).to(torch.bfloat16)
    with torch.no_grad():
        out = m(channels_last(x.to(DEV)))
        ref = ref_model(x.double())
    cpu.assert_relu_clips_and_keeps(out)
    # The folded weights are rounded to bf16 after folding: compare with a bf16 tolerance.
    cpu.assert_matches(out.cpu(), ref, torch.bfloat16)
