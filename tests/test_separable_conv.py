"""deeplab_fast.ops.separable_conv2d (the fused depthwise-separable atrous conv) and its layers.

References: the unfused layers in float64 (``F.conv2d(groups=C)`` + scale + bias + ReLU, ``F.conv2d`` 1x1 + ...:
tests/samples.py's ``separable_reference``) on fresh random inputs of odd sizes, several atrous rates, outputs
poisoned with NaN before the kernels write them (DEEPLAB_FAST_POISON=1, tests/conftest.py); the layers against
their own unfused modules with randomised BN statistics and affine parameters. The bad calls of tests/samples.py
are checked (real kernel and fake kernel alike) by tests/test_op_device_checks.py.
"""
from __future__ import annotations

import os
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from deeplab_fast import optimize
from deeplab_fast.nn import ASPP, AtrousSeparableConv2d, FusedSeparableConv2d
from deeplab_fast.ops import separable_conv2d, separable_conv2d_plan, separable_conv2d_reference

sys.path.insert(0, os.path.dirname(__file__))
from helpers import assert_matches, cpu_and_cuda, randomize_, seeded  # noqa: E402
from samples import separable_conv2d_inputs, separable_reference  # noqa: E402

OP = torch.ops.deeplab_fast.separable_conv2d
F64 = torch.float64
# Relative to the reference's largest entry: float32 accumulates in another order than F.conv2d; the 16-bit types
# round the depthwise result and the output to 8 (bfloat16) or 11 (float16) bits.
TOL = {F64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def _sample(device, name, requires_grad=False):
    return next(s for s in separable_conv2d_inputs(device, requires_grad) if s.name == name)


def random_args(seed, N, C, K, H, W, R=3, dtype=torch.float32):
    g = seeded(seed)
    x = torch.randn(N, C, H, W, generator=g)
    wd = torch.randn(C, 1, R, R, generator=g) / R
    wp = torch.randn(K, C, 1, 1, generator=g) / C ** 0.5
    bd, bp = torch.randn(C, generator=g) * 0.3, torch.randn(K, generator=g) * 0.3
    sd, sp = torch.rand(C, generator=g) + 0.5, torch.rand(K, generator=g) + 0.5
    return tuple(t.to(dtype) for t in (x, wd, bd, sd, wp, bp, sp))


# ----------------------------------------------------------------------------------------------------------
# The op against the unfused float64 reference


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("sample", separable_conv2d_inputs("cpu"), ids=repr)
def test_samples_match_reference(device, sample):
    s = _sample(device, sample.name)
    out = OP(*s.args)
    assert out.device == s.args[0].device and out.dtype == s.args[0].dtype
    x = s.args[0]
    channels_last = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    assert out.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    assert bool(torch.isfinite(out).all()), "an output element was never written (poisoned NaN)"
    ref = separable_reference(*[a.cpu() if isinstance(a, torch.Tensor) else a for a in s.args])
    assert_matches(out.double().cpu(), ref, TOL[x.dtype], s.name)
    if s.args[-1]:  # pw_relu: both sides of the ReLU occur
        assert (out == 0).any() and (out > 0).any()


@pytest.mark.parametrize("rate", [1, 2, 6, 12, 18, 24])
@pytest.mark.parametrize("channels_last", [False, True])
def test_rates_odd_sizes(rate, channels_last):
    """ASPP-like shapes at odd sizes (33x33 is a 513 crop at output stride 16), rates up to beyond the image."""
    x, wd, bd, sd, wp, bp, sp = random_args(100 + rate, 2, 40, 24, 33, 21)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    out = separable_conv2d(x, wd, bd, sd, wp, bp, sp, padding=rate, dilation=rate)
    ref = separable_reference(x, wd, bd, sd, wp, bp, sp, [1, 1], [rate, rate], [rate, rate], True, True)
    assert_matches(out.double(), ref, 1e-5, f"rate {rate}")


def test_many_tiles_and_threads():
    """More pixels than several CPU tiles (C = 128: 1024 pixels a tile; 3 images x 45x47), so tiles end inside an
    image and the parallel loop splits them."""
    x, wd, bd, sd, wp, bp, sp = random_args(7, 3, 128, 40, 45, 47)
    plan = separable_conv2d_plan(x, wd, bd, sd, wp, bp, sp, padding=3, dilation=3)
    assert plan["device"] == "cpu" and plan["path"] == "tiles" and plan["tile_pixels"] == 1024, plan
    out = separable_conv2d(x, wd, bd, sd, wp, bp, sp, padding=3, dilation=3)
    ref = separable_reference(x, wd, bd, sd, wp, bp, sp, [1, 1], [3, 3], [3, 3], True, True)
    assert_matches(out.double(), ref, 1e-5, "3 images, several tiles each")


def test_optional_arguments_are_identity():
    """dw_bias / dw_scale / pw_bias / pw_scale absent mean 0 and 1, not stale memory."""
    x, wd, bd, sd, wp, bp, sp = random_args(8, 1, 8, 6, 9, 11)
    out = separable_conv2d(x, wd, None, None, wp, None, None, padding=2, dilation=2, dw_relu=False, pw_relu=False)
    ref = F.conv2d(F.conv2d(x.double(), wd.double(), None, 1, 2, 2, 8), wp.double())
    assert_matches(out.double(), ref, 1e-5, "no affine, no ReLU")


def test_nan_propagates():
    x, wd, bd, sd, wp, bp, sp = random_args(9, 1, 4, 3, 7, 7)
    x[0, 1, 3, 3] = float("nan")
    out = separable_conv2d(x, wd, bd, sd, wp, bp, sp, padding=1)
    assert torch.isnan(out[0, :, 2:5, 2:5]).all() and torch.isfinite(out[0, :, 0, :]).all()
    with pytest.raises(ValueError, match="separable_conv2d: input holds NaN or Inf"):
        separable_conv2d(x, wd, bd, sd, wp, bp, sp, padding=1, check_finite=True)


# ----------------------------------------------------------------------------------------------------------
# Gradients


GRAD_CASES = {  # (stride, padding, dilation, dw_affine, dw_relu, channels_last), small so that gradcheck is quick
    "paper_rate2": (1, 2, 2, True, True, False),
    "smp_rate1": (1, 1, 1, False, False, False),
    "stride2_rate3_channels_last": (2, 3, 3, True, True, True),
    "rate9_beyond_image": (1, 9, 9, True, True, False),
}


@pytest.mark.parametrize("case", list(GRAD_CASES))
def test_gradcheck(case):
    stride, padding, dilation, dw_affine, dw_relu, channels_last = GRAD_CASES[case]
    g = seeded(len(case))
    x = torch.randn(1, 3, 7, 6, generator=g, dtype=F64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    args = [x, torch.randn(3, 1, 3, 3, generator=g, dtype=F64), torch.randn(3, generator=g, dtype=F64) * 0.3,
            torch.rand(3, generator=g, dtype=F64) + 0.5, torch.randn(4, 3, 1, 1, generator=g, dtype=F64),
            torch.randn(4, generator=g, dtype=F64) * 0.3, torch.rand(4, generator=g, dtype=F64) + 0.5]
    if not dw_affine:
        args[2] = args[3] = None
    args = [None if a is None else a.requires_grad_() for a in args]

    def f(*a):
        return separable_conv2d(*a, stride, padding, dilation, dw_relu, True)

    assert torch.autograd.gradcheck(f, tuple(args), eps=1e-6, atol=1e-7, rtol=1e-5)
    # Each input alone (the formula's branches for a subset of needed gradients).
    for i in range(7):
        if args[i] is not None:
            part = [a if j == i or a is None else a.detach() for j, a in enumerate(args)]
            assert torch.autograd.gradcheck(f, tuple(part), eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=True), i


def test_gradcheck_sample_fast_mode():
    s = _sample("cpu", "f64_5x5_rates_2_3_no_pw_affine", requires_grad=True)
    assert torch.autograd.gradcheck(OP, s.args, eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=True)


def test_gradients_match_unfused():
    """Every gradient equals autograd's through the unfused layers (float64)."""
    s = _sample("cpu", "f64_paper_rate2", requires_grad=True)
    leaves = [a for a in s.args if isinstance(a, torch.Tensor)]
    weights = torch.randn(2, 12, 11, 9, generator=seeded(3), dtype=F64)
    got = torch.autograd.grad((OP(*s.args) * weights).sum(), leaves)
    expected = torch.autograd.grad((separable_conv2d_reference(*s.args) * weights).sum(), leaves)
    for name, a, b in zip(("input", "dw_weight", "dw_bias", "dw_scale", "pw_weight", "pw_bias", "pw_scale"), got,
                          expected):
        assert_matches(a, b, 1e-10, name)


# ----------------------------------------------------------------------------------------------------------
# Custom-op machinery


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("sample", separable_conv2d_inputs("cpu"), ids=repr)
def test_opcheck(device, sample):
    s = _sample(device, sample.name, requires_grad=True)
    result = torch.library.opcheck(OP.default, s.args)
    assert all(v == "SUCCESS" for v in result.values()), result


def test_opcheck_plan_schema():
    s = _sample("cpu", "f64_paper_rate2")
    torch.library.opcheck(torch.ops.deeplab_fast.separable_conv2d_plan.default, s.args, test_utils=("test_schema",))
    with pytest.raises(RuntimeError, match="debug query"):
        separable_conv2d_plan(*[a.to("meta") if isinstance(a, torch.Tensor) else a for a in s.args])


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("name", ["f32_cl_rate12", "f64_1x3_crop"])
def test_torch_compile_samples(device, name):
    """torch.compile(fullgraph=True) through the fake kernel: the same result, layout and gradients as eager."""
    s = _sample(device, name, requires_grad=True)

    def f(*args):
        return OP(*args) * 2.0

    eager = f(*s.args)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")(*s.args)
    assert torch.equal(compiled, eager) and compiled.stride() == eager.stride()
    leaves = [a for a in s.args if isinstance(a, torch.Tensor)]
    for a, b in zip(torch.autograd.grad(compiled.sum(), leaves), torch.autograd.grad(eager.sum(), leaves)):
        assert torch.equal(a, b)


def test_torch_compile_inductor_layer():
    layer = randomize_(AtrousSeparableConv2d(16, 24, 3, dilation=6), 5).eval()
    fused = FusedSeparableConv2d.from_module(layer)
    x = torch.randn(2, 16, 19, 17, generator=seeded(6))
    with torch.no_grad():
        ref = layer.reference_forward(x)
        for m in (layer, fused):
            assert_matches(torch.compile(m, fullgraph=True)(x), ref, 1e-5, type(m).__name__)


# ----------------------------------------------------------------------------------------------------------
# Errors of the Python wrapper (the op's own checks: tests/test_op_device_checks.py)


@pytest.mark.parametrize("kwargs,match", [
    ({"dw_relu": 1}, "dw_relu must be a bool"),
    ({"pw_relu": None}, "pw_relu must be a bool"),
    ({"stride": (1, 2, 3)}, "stride must be an int or a pair"),
    ({"dilation": True}, "dilation must be an int or a pair of ints, got bool"),
    ({"padding": 2**40}, "padding must be in"),
    ({"pw_bias": [0.0] * 6}, "pw_bias must be a torch.Tensor or None"),
])
def test_wrapper_errors_name_the_argument(kwargs, match):
    x, wd, bd, sd, wp, bp, sp = random_args(10, 1, 8, 6, 9, 9)
    args = dict(input=x, dw_weight=wd, dw_bias=bd, dw_scale=sd, pw_weight=wp, pw_bias=bp, pw_scale=sp)
    args.update(kwargs)
    for fn in (separable_conv2d, separable_conv2d_plan):
        with pytest.raises(ValueError, match="separable_conv2d: " + match):
            fn(**args)


def test_non_tensor_weight():
    x, wd, bd, sd, wp, bp, sp = random_args(11, 1, 8, 6, 9, 9)
    with pytest.raises(ValueError, match="separable_conv2d: dw_weight must be a torch.Tensor, got list"):
        separable_conv2d(x, wd.tolist(), bd, sd, wp)


# ----------------------------------------------------------------------------------------------------------
# The layers: AtrousSeparableConv2d (eval: BNs folded per call) and FusedSeparableConv2d (folded once)


@pytest.mark.parametrize("depthwise_bn", [True, False])
@pytest.mark.parametrize("rate,stride", [(1, 1), (6, 1), (12, 2)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_layers_equal_unfused_modules(depthwise_bn, rate, stride, channels_last):
    layer = randomize_(AtrousSeparableConv2d(12, 20, 3, dilation=rate, stride=stride, depthwise_bn=depthwise_bn,
                                             bias=not depthwise_bn), 20 + rate).eval()
    x = torch.randn(2, 12, 23, 19, generator=seeded(rate))
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    fused = FusedSeparableConv2d.from_module(layer)
    assert fused.dw_relu == depthwise_bn and (fused.dw_bias is None) == (not depthwise_bn)
    with torch.no_grad():
        ref = layer.reference_forward(x)  # the modules one after the other (float32)
        ref64 = layer.double().reference_forward(x.double())
        layer.float()
        for what, m in (("per-call fold", layer), ("folded once", fused)):
            out = m(x)
            assert out.shape == ref.shape
            assert_matches(out.double(), ref64, 1e-5, f"{what} vs float64 modules")
            assert_matches(out, ref, 1e-5, f"{what} vs float32 modules")


def test_layer_training_mode_keeps_batch_statistics():
    layer = randomize_(AtrousSeparableConv2d(6, 8, 3, dilation=2), 30).train()
    x = torch.randn(4, 6, 9, 9, generator=seeded(31))
    mean = layer.depthwise_bn.running_mean.clone()
    out = layer(x)
    assert not torch.equal(layer.depthwise_bn.running_mean, mean)  # batch statistics, running ones updated
    out.sum().backward()
    assert layer.depthwise.weight.grad is not None
    with pytest.raises(ValueError, match="eval mode"):
        FusedSeparableConv2d.from_module(layer)
    with pytest.raises(ValueError, match="must be an AtrousSeparableConv2d"):
        FusedSeparableConv2d.from_module(nn.Conv2d(3, 3, 1))


def test_fused_layer_gradients_flow():
    layer = randomize_(AtrousSeparableConv2d(6, 8, 3, dilation=2), 32).eval()
    fused = FusedSeparableConv2d.from_module(layer)
    x = torch.randn(1, 6, 9, 9, generator=seeded(33), requires_grad=True)
    fused(x).sum().backward()
    assert all(p.grad is not None for p in fused.parameters()) and x.grad is not None


# ----------------------------------------------------------------------------------------------------------
# optimize: rule 4


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.aspp = ASPP(16, (2, 4, 6), 8, dropout=0.0, separable=True)
        self.decoder = nn.Sequential(AtrousSeparableConv2d(8, 8, 3), AtrousSeparableConv2d(8, 4, 3, depthwise_bn=False))

    def forward(self, x):
        return self.decoder(self.aspp(x))


def test_optimize_replaces_separable_convs(capsys):
    net = randomize_(_Net(), 40).eval()
    x = torch.randn(2, 16, 13, 11, generator=seeded(41))
    fast = optimize(net, verbose=True)
    assert "and 5 separable conv(s) replaced" in capsys.readouterr().out
    kinds = [type(m).__name__ for m in fast.modules()]
    assert kinds.count("FusedSeparableConv2d") == 5 and "AtrousSeparableConv2d" not in kinds, kinds
    # inside the ASPP only the separable branches change: the 1x1 branch, pooling and projection stay torch modules
    assert isinstance(fast.aspp, ASPP) and type(fast.aspp.convs[0][0]) is nn.Conv2d
    assert type(fast.aspp.project[0]) is nn.Conv2d
    with torch.no_grad():
        assert_matches(fast(x), net(x), 1e-5, "optimized")
        ref = net.double()(x.double())
        assert_matches(fast(x).double(), ref, 1e-5, "optimized vs float64")
    # Training mode: left alone (the BNs keep training), and optimize is idempotent.
    train = optimize(randomize_(_Net(), 42))
    assert sum(isinstance(m, AtrousSeparableConv2d) for m in train.modules()) == 5
    again = optimize(fast)
    assert [type(m) for m in again.modules()] == [type(m) for m in fast.modules()]


def test_optimize_leaves_hooked_separable_conv():
    net = randomize_(_Net(), 43).eval()
    net.decoder[0].register_forward_hook(lambda *a: None)
    fast = optimize(net)
    assert isinstance(fast.decoder[0], AtrousSeparableConv2d) and isinstance(fast.decoder[1], FusedSeparableConv2d)
