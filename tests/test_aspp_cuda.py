"""deeplab_fast.nn.ASPP / ASPPv2 and the Triton ops deeplab_fast::aspp_project / aspp_sum on CUDA.

Contract (deeplab_fast/nn/aspp.py, deeplab_fast/ops/aspp.py):
- In eval mode on CUDA tensors, when no gradient is needed, ``forward`` takes the fused path: BN folded into
  the branch convs (deeplab_fast.ops.atrous_conv2d), then one Triton kernel for the concat + projection (v3,
  ``aspp_project``) or the sum (v2, ``aspp_sum``). In training mode or with gradients it runs the plain-torch
  reference (torchvision's formulation).
- float32 Triton dots use TF32 when ``torch.backends.cuda.matmul.allow_tf32`` is set; the branch convs follow
  ``torch.backends.cudnn.allow_tf32`` (test_atrous_conv_cuda.py). "tf32 on/off" below sets both.

References: torchvision's ``ASPP`` (the real one on the GPU machine), loaded with ``load_state_dict``, run in
float64 on the GPU on the same (dtype-rounded) weights and inputs; the float64 re-statement of the head and
the float64 op formulas of test_aspp.py. Every weight and BN statistic is random (test_aspp.randomize_).
Tolerances, per element ``|out - ref| <= tol * (max|ref| + |ref|)``: the whole head in bfloat16 2e-2, float32
with TF32 off 1e-4, with TF32 on 2e-3; the ops alone bfloat16 1e-2, float16 2e-3, TF32 1e-3, float32 1e-5.

Every test skips where CUDA is not available. tests/conftest.py sets DEEPLAB_FAST_POISON=1, so op outputs
start as NaN and the finiteness checks catch elements that no kernel wrote. Library bugs are marked
``xfail(strict=True)`` with the reason (see also test_aspp.py).
"""
from __future__ import annotations

import contextlib
import copy
import os

import pytest
import torch

import deeplab_fast.ops.aspp as aspp_ops
from deeplab_fast.nn import ASPP, ASPP_L, ASPP_S, ASPPv2
from deeplab_fast.ops.aspp import aspp_project, aspp_sum

import test_aspp as cpu  # the CPU tests' helpers and references (its tests are not re-collected here)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="CUDA is not available: the CUDA ASPP tests need a GPU")

DEV = "cuda"
F64 = torch.float64
# name -> (dtype, TF32 on, tolerance for the whole head, tolerance for one op)
DTYPES = {
    "bf16": (torch.bfloat16, True, 2e-2, 1e-2),
    "fp16": (torch.float16, True, 2e-2, 2e-3),
    "tf32": (torch.float32, True, 2e-3, 1e-3),
    "fp32": (torch.float32, False, 1e-4, 1e-5),
}
# DeepLab v3 at output stride 16 (33x33 for a 513x513 crop) and 8 (65x65); ResNet-101's 2048 channels.
RATES_FOR_SIZE = {33: (6, 12, 18), 65: (12, 24, 36)}
C_IN, C_OUT = 2048, 256


@pytest.fixture(autouse=True)
def _restore_tf32():
    """Each test starts with TF32 on for cuDNN and matmuls and gets the old settings back."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


@contextlib.contextmanager
def tf32(enabled: bool):
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


@pytest.fixture
def spy(monkeypatch):
    """Counts the calls of deeplab_fast.ops.aspp.aspp_project / aspp_sum (where the modules' fused paths call
    them), still running them."""
    calls = {"aspp_project": 0, "aspp_sum": 0}
    for name in calls:
        original = getattr(aspp_ops, name)

        def wrapper(*args, _original=original, _name=name, **kwargs):
            calls[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(aspp_ops, name, wrapper)
    return calls


def cuda_input(N, C, H, W, seed, dtype=torch.float32, channels_last=True):
    g = torch.Generator(device=DEV).manual_seed(seed)
    x = (torch.randn(N, C, H, W, generator=g, device=DEV, dtype=torch.float32) + 0.2).to(dtype)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


_TV_CACHE: dict = {}


def tv_cuda(in_channels, rates, out_channels, seed):
    """A randomised float32 torchvision ASPP on the GPU, eval mode (built once per configuration; tests copy
    it before changing anything)."""
    key = (in_channels, tuple(rates), out_channels, seed)
    if key not in _TV_CACHE:
        _TV_CACHE[key] = cpu.tv_aspp(in_channels, rates, out_channels, seed).to(DEV)
    return _TV_CACHE[key]


def float64_torchvision(m) -> torch.nn.Module:
    """torchvision's ASPP in float64 on the GPU holding m's (possibly dtype-rounded) weights and statistics."""
    ref = cpu.TorchvisionASPP(m.in_channels, list(m.atrous_rates), m.out_channels).to(DEV, F64).eval()
    ref.load_state_dict({k: v.double() for k, v in m.state_dict().items()}, strict=True)
    return ref


def test_environment():
    assert os.environ.get("DEEPLAB_FAST_POISON") == "1"
    assert aspp_ops.HAVE_TRITON, "triton is a test dependency (pip install -e .[test])"
    assert os.environ.get("TRITON_INTERPRET", "0") != "1", "the CUDA tests must compile the kernels"
    for op in ("aspp_project", "aspp_sum"):
        assert hasattr(torch.ops.deeplab_fast, op), op


# ----------------------------------------------------------------------------------------------------------
# ASPP: the fused path at DeepLab v3's shapes against torchvision


@pytest.mark.parametrize("N,S", [(1, 33), (16, 33), (1, 65), (16, 65)])
def test_aspp_fused_bf16_channels_last_matches_torchvision(spy, N, S):
    rates = RATES_FOR_SIZE[S]
    tv = tv_cuda(C_IN, rates, C_OUT, seed=S)
    m = ASPP(C_IN, rates, C_OUT).to(DEV)
    m.load_state_dict(tv.state_dict(), strict=True)
    m = m.to(torch.bfloat16, memory_format=torch.channels_last).eval()
    x = cuda_input(N, C_IN, S, S, seed=N * S, dtype=torch.bfloat16)
    with torch.no_grad():
        out = m(x)
        assert spy["aspp_project"] == 1, "eval + no_grad on CUDA must take the fused path"
        ref = float64_torchvision(m)(x.double())
    assert out.dtype == torch.bfloat16 and out.shape == (N, C_OUT, S, S)
    assert out.is_contiguous(memory_format=torch.channels_last)
    cpu.assert_matches(out, ref, DTYPES["bf16"][2], f"bf16 N={N} {S}x{S}")
    cpu.assert_relu_clips_and_keeps(out)


@pytest.mark.parametrize("key", ["fp32", "tf32"])
@pytest.mark.parametrize("N,S,channels_last", [(1, 33, True), (2, 65, False), (16, 33, True)])
def test_aspp_fused_float32_matches_torchvision(spy, key, N, S, channels_last):
    _, tf32_on, tol, _ = DTYPES[key]
    rates = RATES_FOR_SIZE[S]
    tv = tv_cuda(C_IN, rates, C_OUT, seed=S)
    m = ASPP.from_torchvision(tv).eval()
    assert next(m.parameters()).is_cuda
    x = cuda_input(N, C_IN, S, S, seed=N + S, channels_last=channels_last)
    with torch.no_grad(), tf32(tf32_on):
        out = m(x)
    assert spy["aspp_project"] == 1
    with torch.no_grad():
        ref = float64_torchvision(m)(x.double())
    assert out.dtype == torch.float32
    cpu.assert_matches(out, ref, tol, f"{key} N={N} {S}x{S}")
    cpu.assert_relu_clips_and_keeps(out)
    # the same head written out in float64 (independent of torchvision)
    cpu.assert_matches(out, cpu.aspp_eval_reference(m, x, rates), tol, f"{key} vs the float64 re-statement")


def test_aspp_fused_forward_equals_forward(spy):
    tv = tv_cuda(C_IN, (6, 12, 18), C_OUT, seed=33)
    m = ASPP.from_torchvision(tv).eval().requires_grad_(False).to(torch.bfloat16)
    x = cuda_input(2, C_IN, 33, 33, seed=1, dtype=torch.bfloat16)
    with torch.no_grad():
        a = m(x)
        b = m.fused_forward(x)
    assert spy["aspp_project"] == 2
    assert torch.equal(a, b)
    with torch.no_grad():
        cpu.assert_matches(a, float64_torchvision(m)(x.double()), DTYPES["bf16"][2], "forward")
    # frozen parameters, grad mode on, input without grad: nothing needs a gradient -> fused
    a2 = m(x)
    assert spy["aspp_project"] == 3 and torch.equal(a2, a)


@pytest.mark.parametrize("how", ["params_require_grad", "input_requires_grad", "train_no_grad"])
def test_aspp_reference_path_when_gradients_or_training(spy, how):
    """Gradients needed, or training mode: the plain-torch path, equal to torchvision."""
    tv = tv_cuda(256, (6, 12, 18), 64, seed=2)
    m = ASPP.from_torchvision(tv).eval()
    x = cuda_input(2, 256, 33, 33, seed=3)
    with tf32(False):
        if how == "params_require_grad":
            out = m(x)
            with torch.no_grad():
                expected = tv(x)
            assert out.requires_grad
        elif how == "input_requires_grad":
            m.requires_grad_(False)
            xg = x.clone().requires_grad_()
            out = m(xg)
            with torch.no_grad():
                expected = tv(x)
            out.sum().backward()
            assert xg.grad is not None and torch.isfinite(xg.grad).all()
        else:
            m.train()
            tv_train = copy.deepcopy(tv).train()
            with torch.no_grad():
                torch.manual_seed(11)
                out = m(x)
                torch.manual_seed(11)
                expected = tv_train(x)
    assert spy["aspp_project"] == 0, "the fused path was taken"
    cpu.assert_matches(out, expected, 5e-5, how)


def test_aspp_train_matches_torchvision_cuda(spy):
    """Training on CUDA: output (dropout seeded alike), running statistics and gradients as torchvision's."""
    tv = copy.deepcopy(tv_cuda(C_IN, (6, 12, 18), C_OUT, seed=4)).train()
    m = ASPP.from_torchvision(tv)
    assert m.training
    x = cuda_input(4, C_IN, 33, 33, seed=5)
    g = torch.randn(4, C_OUT, 33, 33, device=DEV, generator=torch.Generator(device=DEV).manual_seed(6))
    with tf32(False):
        xt, xm = x.clone().requires_grad_(), x.clone().requires_grad_()
        torch.manual_seed(12)
        expected = tv(xt)
        torch.manual_seed(12)
        out = m(xm)
        (expected * g).sum().backward()
        (out * g).sum().backward()
    assert spy["aspp_project"] == 0
    cpu.assert_matches(out, expected, 5e-5, "train output")
    assert (out == 0).float().mean() > 0.4, "dropout (p=0.5) and ReLU should zero about half of the output"
    for (name, a), (name_tv, b) in zip(m.named_buffers(), tv.named_buffers()):
        assert name == name_tv
        if name.endswith("num_batches_tracked"):
            assert int(a) == int(b)
        else:
            cpu.assert_matches(a, b, 5e-5, name)
    cpu.assert_matches(xm.grad, xt.grad, 5e-5, "input grad")
    for (name, p), (_, q) in zip(m.named_parameters(), tv.named_parameters()):
        cpu.assert_matches(p.grad, q.grad, 5e-5, f"grad of {name}")


def test_aspp_eval_after_training_step_cuda(spy):
    m = cpu.randomize_(ASPP(64, (2, 4, 6), 32, dropout=0.0), 7).to(DEV).eval()
    x = cuda_input(2, 64, 17, 17, seed=8)
    with torch.no_grad(), tf32(False):
        m(x)  # fused: fills the fold cache
        m.train()
        m(cuda_input(2, 64, 17, 17, seed=9) * 3 + 1)  # one training step: new running statistics
        m.eval()
        out = m(x)
    assert spy["aspp_project"] == 2
    cpu.assert_matches(out, cpu.aspp_eval_reference(m, x, (2, 4, 6)), 1e-4, "eval after a training step")


def test_aspp_float64_eval_cuda():
    m = ASPP.from_torchvision(tv_cuda(64, (2, 4, 6), 32, seed=10)).double().eval()
    x = cuda_input(2, 64, 17, 17, seed=11, dtype=F64)
    with torch.no_grad():
        out = m(x)
    cpu.assert_matches(out, cpu.aspp_eval_reference(m, x, (2, 4, 6)), 1e-10, "float64 eval")


# ----------------------------------------------------------------------------------------------------------
# The ops at real shapes


@pytest.mark.parametrize("key", ["bf16", "fp16", "tf32", "fp32"])
@pytest.mark.parametrize("N,S,layout", [(2, 65, "channels_last"), (16, 33, "channels_last"), (2, 33, "contiguous"),
                                        (1, 65, "mixed"), (2, 33, "channel_slice")])
def test_aspp_project_real_shapes(key, N, S, layout):
    dtype, tf32_on, _, tol = DTYPES[key]
    branches, weight, pool_bias, scale, shift = [
        [t.to(DEV) for t in a] if isinstance(a, list) else a.to(DEV)
        for a in cpu.project_args(N, C_OUT, S, S, C_OUT, dtype, seed=N * S)]
    make, fmt = cpu.BRANCH_LAYOUTS[layout]
    with tf32(tf32_on):
        out = aspp_project(make(branches), weight, pool_bias, scale, shift)
    assert out.dtype == dtype and out.shape == (N, C_OUT, S, S) and out.is_cuda
    assert out.is_contiguous(memory_format=fmt)
    ref = cpu.project_reference(branches, weight, pool_bias, scale, shift)
    cpu.assert_matches(out, ref, tol, f"aspp_project {key} N={N} {S}x{S} {layout}")
    cpu.assert_relu_clips_and_keeps(out)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("N,C,S,layout", [(2, 21, 65, "channels_last"), (2, 21, 65, "contiguous"),
                                          (16, 256, 33, "channels_last"), (1, 60, 65, "mixed")])
def test_aspp_sum_real_shapes(dtype, N, C, S, layout):
    branches, bias = cpu.sum_args(N, C, S, S, dtype, seed=C + S)
    branches, bias = [b.to(DEV) for b in branches], bias.to(DEV)
    make, fmt = cpu.BRANCH_LAYOUTS[layout]
    out = aspp_sum(make(branches), bias)
    assert out.dtype == dtype and out.is_contiguous(memory_format=fmt)
    cpu.assert_matches(out, cpu.sum_reference(branches, bias), cpu.TOL[dtype], f"aspp_sum {dtype} {layout}")


def test_aspp_sum_expanded_branches_cuda():
    branches, bias = cpu.sum_args(1, 21, 33, 33, torch.float32, seed=13)
    expanded = [b.to(DEV).expand(2, -1, -1, -1) for b in branches]
    out = aspp_sum(expanded, bias.to(DEV))
    cpu.assert_matches(out, cpu.sum_reference(expanded, bias.to(DEV)), 1e-5, "aspp_sum of expanded branches")


def test_ops_have_no_backward_cuda():
    branches, weight, pool_bias, scale, shift = cpu.project_args(1, 16, 5, 5, 24, torch.float32, seed=12)
    branches = [b.to(DEV).requires_grad_() for b in branches]
    out = aspp_project(branches, weight.to(DEV), pool_bias.to(DEV), scale.to(DEV), shift.to(DEV))
    with pytest.raises(NotImplementedError, match="no backward"):
        out.sum().backward()


# ----------------------------------------------------------------------------------------------------------
# Custom-op machinery on CUDA


def _project_args_cuda(N, CB, H, W, CO, dtype, seed, layout="contiguous"):
    branches, weight, pool_bias, scale, shift = cpu.project_args(N, CB, H, W, CO, dtype, seed)
    branches = cpu.BRANCH_LAYOUTS[layout][0]([b.to(DEV) for b in branches])
    return (*branches, weight.to(DEV), pool_bias.to(DEV), scale.to(DEV), shift.to(DEV))


def _sum_args_cuda(N, C, H, W, dtype, seed, layout="contiguous"):
    branches, bias = cpu.sum_args(N, C, H, W, dtype, seed)
    return (*cpu.BRANCH_LAYOUTS[layout][0]([b.to(DEV) for b in branches]), bias.to(DEV))


OPCHECK_CASES = [
    pytest.param("project", (2, 24, 5, 7, 40, torch.float32, 20, "contiguous"), id="project_fp32_contiguous"),
    pytest.param("project", (2, 64, 9, 9, 48, torch.bfloat16, 21, "channels_last"), id="project_bf16_cl"),
    pytest.param("project", (1, 32, 7, 5, 16, torch.float16, 22, "mixed"), id="project_fp16_mixed"),
    pytest.param("sum", (2, 21, 9, 7, torch.float32, 23, "contiguous"), id="sum_fp32_contiguous"),
    pytest.param("sum", (2, 21, 9, 7, torch.bfloat16, 24, "channels_last"), id="sum_bf16_cl"),
    pytest.param("sum", (1, 16, 5, 6, torch.float16, 25, "mixed"), id="sum_fp16_mixed"),
]


@pytest.mark.parametrize("which,spec", OPCHECK_CASES)
def test_opcheck_full(which, spec):
    """Every opcheck test, test_aot_dispatch_dynamic included (on the GPU the kernels run under AOT tracing).
    Inputs without requires_grad: with it, the AOT check would run the backward, which the ops deliberately
    refuse (NotImplementedError; see test_opcheck_autograd_registration)."""
    if which == "project":
        op, args = torch.ops.deeplab_fast.aspp_project.default, _project_args_cuda(*spec)
    else:
        op, args = torch.ops.deeplab_fast.aspp_sum.default, _sum_args_cuda(*spec)
    result = torch.library.opcheck(op, args)
    assert result and all(v == "SUCCESS" for v in result.values()), result


def test_opcheck_autograd_registration():
    args = [t.clone().requires_grad_() if i < 5 else t
            for i, t in enumerate(_project_args_cuda(2, 24, 5, 7, 40, torch.float32, 26))]
    result = torch.library.opcheck(torch.ops.deeplab_fast.aspp_project.default, tuple(args),
                                   test_utils=cpu.OPCHECK_CPU)
    assert all(v == "SUCCESS" for v in result.values()), result
    args = [t.clone().requires_grad_() for t in _sum_args_cuda(2, 21, 5, 7, torch.float32, 27)]
    result = torch.library.opcheck(torch.ops.deeplab_fast.aspp_sum.default, tuple(args), test_utils=cpu.OPCHECK_CPU)
    assert all(v == "SUCCESS" for v in result.values()), result


@pytest.mark.parametrize("key", ["bf16", "fp32"])
def test_torch_compile_ops_inductor(key):
    dtype, tf32_on, _, tol = DTYPES[key]
    b0, b1, b2, b3, weight, pool_bias, scale, shift = _project_args_cuda(2, 256, 33, 33, 256, dtype, 28,
                                                                         "channels_last")
    s0, s1, s2, s3, bias = _sum_args_cuda(2, 256, 33, 33, dtype, 29, "channels_last")

    def head(bs, w, pb, s, t, sb, bias):
        y = aspp_project([b * 2 for b in bs], w, pb, s, t)
        z = aspp_sum([b - 1 for b in sb], bias)
        return y + 1, z.float().mean(dim=1)

    args = ([b0, b1, b2, b3], weight, pool_bias, scale, shift, [s0, s1, s2, s3], bias)
    with tf32(tf32_on):
        eager = head(*args)
        compiled = torch.compile(head, fullgraph=True)(*args)
    ref_y = cpu.project_reference([b * 2 for b in (b0, b1, b2, b3)], weight, pool_bias, scale, shift) + 1
    ref_z = cpu.sum_reference([b - 1 for b in (s0, s1, s2, s3)], bias).mean(dim=1)
    cpu.assert_matches(compiled[0], ref_y, tol, "compiled aspp_project")
    cpu.assert_matches(compiled[1], ref_z, cpu.TOL[dtype], "compiled aspp_sum")
    cpu.assert_matches(compiled[0], eager[0].double(), tol, "compiled vs eager aspp_project")
    cpu.assert_matches(compiled[1], eager[1].double(), cpu.TOL[dtype], "compiled vs eager aspp_sum")


@pytest.mark.parametrize("key", ["bf16", "tf32"])
def test_torch_compile_module_inductor_eval(key):
    """torch.compile(fullgraph=True) of the module in eval mode (the fused path traced into inductor)."""
    dtype, tf32_on, tol, _ = DTYPES[key]
    tv = tv_cuda(C_IN, (6, 12, 18), C_OUT, seed=33)
    m = ASPP.from_torchvision(tv).to(dtype, memory_format=torch.channels_last).eval()
    x = cuda_input(2, C_IN, 33, 33, seed=30, dtype=dtype)
    with torch.no_grad(), tf32(tf32_on):
        eager = m(x)
        compiled = torch.compile(m, fullgraph=True)(x)
        ref = float64_torchvision(m)(x.double())
    assert compiled.dtype == dtype
    cpu.assert_matches(compiled, ref, tol, f"compiled module {key}")
    cpu.assert_matches(compiled, eager.double(), tol, f"compiled vs eager module {key}")


# ----------------------------------------------------------------------------------------------------------
# ASPPv2 (DeepLab v2) fused on CUDA


@pytest.mark.parametrize("key", ["bf16", "fp32", "tf32"])
@pytest.mark.parametrize("rates", [ASPP_L, ASPP_S], ids=["ASPP-L", "ASPP-S"])
def test_aspp_v2_fused_matches_reference(spy, key, rates):
    dtype, tf32_on, tol, _ = DTYPES[key]
    m = cpu.randomize_v2_(ASPPv2(C_IN, 21, rates), seed=len(rates) + rates[0]).to(DEV, dtype)
    x = cuda_input(2, C_IN, 65, 65, seed=31, dtype=dtype)
    with torch.no_grad(), tf32(tf32_on):
        out = m(x)
        fused = m.fused_forward(x)
    assert spy["aspp_sum"] == 2, "eval + no_grad on CUDA must take the fused path"
    assert out.dtype == dtype and out.shape == (2, 21, 65, 65)
    assert torch.equal(out, fused)
    with torch.no_grad():
        ref = cpu.v2_reference(m, x)
    cpu.assert_matches(out, ref, tol, f"ASPPv2 {key}")
    # with gradients: the reference path, same values
    with tf32(False):
        out_grad = m.float()(x.float())
    assert spy["aspp_sum"] == 2 and out_grad.requires_grad
    cpu.assert_matches(out_grad, cpu.v2_reference(m, x.float()), 1e-4, "ASPPv2 reference path")


def test_aspp_v2_float64_cuda():
    m = cpu.randomize_v2_(ASPPv2(64, 5), seed=32).to(DEV, F64)
    x = cuda_input(1, 64, 17, 17, seed=33, dtype=F64)
    with torch.no_grad():
        out = m(x)
    cpu.assert_matches(out, cpu.v2_reference(m, x), 1e-10, "ASPPv2 float64")


def test_aspp_v2_from_state_dict_cuda_inference():
    """A kazuto1011-style checkpoint's head, loaded and run fused on the GPU."""
    sd = cpu._kazuto_checkpoint(C_IN, 21, seed=34)
    m = ASPPv2.from_state_dict(sd).to(DEV)
    x = cuda_input(1, C_IN, 33, 33, seed=35)
    with torch.no_grad(), tf32(False):
        out = m(x)
    cpu.assert_matches(out, cpu.v2_reference(m, x), 1e-4, "from_state_dict fused")
