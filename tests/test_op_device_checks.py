"""Every op refuses a tensor argument on another device (a meta tensor among CPU ones, or a CPU one among meta
ones) with an error naming an argument, in the real kernels and in the fake kernels; and under meta the fake
kernels run the real kernels' shape / dtype / range checks (issue 14, items 1 and 9).

Ops: atrous_conv2d, atrous_conv2d_plan, aspp_project, aspp_sum (Triton, run by the interpreter on CPU tensors;
tests/conftest.py sets TRITON_INTERPRET=1 without a GPU), and the dense CRF ops, whose fake kernels live in
deeplab_fast/ops/_dense_crf_registrations.py. The arguments come from tests/samples.py. Argument mistakes raise
ValueError (DEVELOPERS.md); the plan query of a meta tensor, which cannot be answered, RuntimeError.
"""
from __future__ import annotations

import itertools
import re

import pytest
import torch
import torch.nn.functional as F

from deeplab_fast.ops import (atrous_conv2d, atrous_conv2d_plan, dense_crf, dense_crf_features,
                              dense_crf_pairwise_energy)
from deeplab_fast.ops.aspp import HAVE_TRITON
from helpers import CUDA_MARKS, seeded
from samples import ERRORS, INPUTS, atrous_conv2d_inputs, conv_reference, prefix

CONV_OP = torch.ops.deeplab_fast.atrous_conv2d
PLAN_OP = torch.ops.deeplab_fast.atrous_conv2d_plan
META = torch.device("meta")

needs_triton = pytest.mark.skipif(not HAVE_TRITON, reason="the ASPP ops need triton")


def _names_one_of(err: BaseException, names) -> bool:
    return any(re.search(rf"(?<![A-Za-z_]){re.escape(n)}(?![A-Za-z_])", str(err)) for n in names)


def _raises_naming(exc, names, fn):
    """fn() raises exc (not a ZeroDivisionError or any other type) with a message naming one of names."""
    with pytest.raises(exc) as info:
        fn()
    assert _names_one_of(info.value, names), f"message names none of {names}: {info.value}"
    return info.value


# ----------------------------------------------------------------------------------------------------------
# atrous_conv2d / atrous_conv2d_plan

CONV_NAMES = ("input", "weight", "bias", "scale")


def _conv_args(dtype=torch.float32):
    """input, weight, bias and scale of the first atrous_conv2d sample (tests/samples.py)."""
    return [t.to(dtype) for t in atrous_conv2d_inputs("cpu")[0].args[:4]]


@pytest.mark.parametrize("devices", [d for d in itertools.product(("cpu", "meta"), repeat=4)
                                     if len(set(d)) == 2], ids=lambda d: "-".join(d))
@pytest.mark.parametrize("fn", ["op", "plan", "wrapper", "wrapper_plan"])
def test_conv_mixed_devices_refused(devices, fn):
    """Every CPU/meta mix over (input, weight, bias, scale) is refused, naming a misplaced argument; never a
    result (the issue: an uninitialised CPU tensor)."""
    args = [t.to(d) for t, d in zip(_conv_args(), devices)]
    call = {"op": lambda: CONV_OP(*args, [1, 1], [1, 1], [1, 1], True),
            "plan": lambda: PLAN_OP(*args, [1, 1], [1, 1], [1, 1], True),
            "wrapper": lambda: atrous_conv2d(*args, padding=1, relu=True, check_finite=True),
            "wrapper_plan": lambda: atrous_conv2d_plan(*args, padding=1)}[fn]
    err = _raises_naming(ValueError, CONV_NAMES, call)
    assert re.search(r"\b(is on|must be a CPU or CUDA tensor)\b", str(err)), str(err)
    odd = [n for n, d in zip(CONV_NAMES, devices) if d != devices[0]]
    assert any(n in str(err) for n in odd + ["input"]), str(err)


@pytest.mark.parametrize("position", range(4))
@pytest.mark.parametrize("drop", [None, 2, 3], ids=["all", "no_bias", "no_scale"])
def test_conv_meta_in_each_position_optional_absent(position, drop):
    """One meta tensor among CPU ones, with bias or scale absent too."""
    args = _conv_args()
    args[position] = args[position].to(META)
    if drop is not None and drop != position:
        args[drop] = None
    for op in (CONV_OP, PLAN_OP):
        _raises_naming(ValueError, CONV_NAMES, lambda: op(*args, [1, 1], [0, 0], [1, 1], False))


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("with_bias,with_scale", [(False, False), (True, False), (False, True), (True, True)])
def test_conv_all_meta_matches_cpu(channels_last, with_bias, with_scale):
    """All on meta: the fake kernel gives the CPU kernel's shape, dtype and memory format."""
    x, w, b, s = _conv_args()
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    b = b if with_bias else None
    s = s if with_scale else None
    for stride, padding, dilation in [((1, 1), (0, 0), (1, 1)), ((2, 1), (3, 1), (2, 3)), ((3, 3), (2, 2), (1, 2))]:
        ref = atrous_conv2d(x, w, b, s, stride, padding, dilation, True)
        meta = atrous_conv2d(*[t.to(META) if t is not None else None for t in (x, w, b, s)],
                             stride, padding, dilation, True)
        assert meta.device == META and meta.shape == ref.shape and meta.dtype == ref.dtype
        assert meta.is_contiguous(memory_format=torch.channels_last) == ref.is_contiguous(
            memory_format=torch.channels_last)
        assert meta.stride() == ref.stride()
        ex = conv_reference(x, w, b, s, stride, padding, dilation, True)
        torch.testing.assert_close(ref.double(), ex, rtol=1e-4, atol=1e-4)


def _bad_conv_calls():
    """(id, mutate(args) -> args, (stride, padding, dilation), the names the message may use)."""
    x, w, b, s = _conv_args()
    return [
        ("channels", lambda a: [a[0], a[1][:, :2], a[2], a[3]], ((1, 1), (0, 0), (1, 1)), ("weight", "input")),
        ("batch0", lambda a: [a[0][:0], a[1], a[2], a[3]], ((1, 1), (0, 0), (1, 1)), ("input",)),
        ("c0", lambda a: [a[0][:, :0], a[1][:, :0], a[2], a[3]], ((1, 1), (0, 0), (1, 1)), ("input",)),
        ("h0", lambda a: [a[0][:, :, :0], a[1], a[2], a[3]], ((1, 1), (2, 2), (1, 1)), ("input",)),
        ("k0", lambda a: [a[0], a[1][:0], a[2][:0], a[3][:0]], ((1, 1), (0, 0), (1, 1)), ("weight",)),
        ("r0", lambda a: [a[0], a[1][:, :, :0], a[2], a[3]], ((1, 1), (0, 0), (1, 1)), ("weight",)),
        ("input3d", lambda a: [a[0][0], a[1], a[2], a[3]], ((1, 1), (0, 0), (1, 1)), ("input",)),
        ("weight5d", lambda a: [a[0], a[1][None], a[2], a[3]], ((1, 1), (0, 0), (1, 1)), ("weight",)),
        ("dtype", lambda a: [a[0], a[1].double(), a[2], a[3]], ((1, 1), (0, 0), (1, 1)), ("weight",)),
        ("int_input", lambda a: [a[0].int(), a[1].int(), None, None], ((1, 1), (0, 0), (1, 1)), ("input",)),
        ("bias_shape", lambda a: [a[0], a[1], a[2][:3], a[3]], ((1, 1), (0, 0), (1, 1)), ("bias",)),
        ("bias_dtype", lambda a: [a[0], a[1], a[2].half(), a[3]], ((1, 1), (0, 0), (1, 1)), ("bias",)),
        ("scale_shape", lambda a: [a[0], a[1], a[2], a[3][None]], ((1, 1), (0, 0), (1, 1)), ("scale",)),
        ("stride0", lambda a: a, ((0, 1), (0, 0), (1, 1)), ("stride",)),
        ("stride_neg", lambda a: a, ((1, -3), (0, 0), (1, 1)), ("stride",)),
        ("stride_big", lambda a: a, ((2**31, 1), (0, 0), (1, 1)), ("stride",)),
        ("stride_huge", lambda a: a, ((2**63 - 1, 1), (0, 0), (1, 1)), ("stride",)),
        ("stride_len", lambda a: a, ((1, 1, 1), (0, 0), (1, 1)), ("stride",)),
        ("padding_neg", lambda a: a, ((1, 1), (-1, 0), (1, 1)), ("padding",)),
        ("padding_big", lambda a: a, ((1, 1), (0, 2**31), (1, 1)), ("padding",)),
        ("padding_huge", lambda a: a, ((1, 1), (2**62, 2**62), (1, 1)), ("padding",)),
        ("padding_min", lambda a: a, ((1, 1), (-2**63, 0), (1, 1)), ("padding",)),
        ("padding_output_bytes", lambda a: a, ((1, 1), (2**31 - 1, 2**31 - 1), (1, 1)), ("padding",)),
        ("dilation0", lambda a: a, ((1, 1), (0, 0), (0, 1)), ("dilation",)),
        ("dilation_big", lambda a: a, ((1, 1), (0, 0), (1, 2**31)), ("dilation",)),
        ("empty_output", lambda a: a, ((1, 1), (0, 0), (10, 1)), ("padding", "dilation")),
        ("empty_output_max_dilation", lambda a: a, ((1, 1), (0, 0), (2**31 - 1, 2**31 - 1)),
         ("padding", "dilation")),
    ]


@pytest.mark.parametrize("device", ["cpu", "meta"])
@pytest.mark.parametrize("case", _bad_conv_calls(), ids=lambda c: c[0])
@pytest.mark.parametrize("fn", ["op", "plan"])
def test_conv_checks_real_and_fake_alike(device, case, fn):
    """The C++ kernel (CPU) and the fake kernel (meta) refuse the same calls with the same message, naming the
    argument; under meta no ZeroDivisionError and no unchecked output."""
    _, mutate, (stride, padding, dilation), names = case
    cpu_args = mutate(_conv_args())
    args = [t.to(device) if t is not None else None for t in cpu_args]
    op = CONV_OP if fn == "op" else PLAN_OP
    if any(abs(v) >= 2**63 for v in (*stride, *padding, *dilation)):
        pytest.skip("not an int64: the schema refuses it before any kernel")
    err = _raises_naming(ValueError, names, lambda: op(*args, list(stride), list(padding), list(dilation), False))
    if device == "meta":  # the same message as the C++ check, device names aside
        with pytest.raises(ValueError) as cpu:
            op(*cpu_args, list(stride), list(padding), list(dilation), False)
        assert str(err).splitlines()[0] == str(cpu.value).splitlines()[0]


@pytest.mark.parametrize("device", ["cpu", "meta"])
@pytest.mark.parametrize("kwargs,exc,name", [
    (dict(stride=2**31), ValueError, "stride"),
    (dict(stride=2**63 - 1), ValueError, "stride"),
    (dict(stride=2**64), ValueError, "stride"),
    (dict(padding=2**62), ValueError, "padding"),
    (dict(padding=(0, -2**63 - 1)), ValueError, "padding"),
    (dict(dilation=(1, 2**62)), ValueError, "dilation"),
    (dict(padding=(2**31 - 1, 2**31 - 1)), ValueError, "padding"),
    (dict(dilation=(2**31 - 1, 1)), ValueError, "dilation"),
    (dict(stride=0), ValueError, "stride"),
    (dict(stride=True), ValueError, "stride"),
    (dict(padding=(1, False)), ValueError, "padding"),
    (dict(dilation=2.0), ValueError, "dilation"),
])
def test_conv_huge_ints_name_the_argument(device, kwargs, exc, name):
    """Issue 9: huge ints are refused as such, naming the argument (not "the output would be empty")."""
    args = [t.to(device) for t in _conv_args()]
    for fn in (atrous_conv2d, atrous_conv2d_plan):
        err = _raises_naming(exc, (name,), lambda: fn(*args, **kwargs))
        if name == "padding" and exc is ValueError:
            assert "empty" not in str(err)


def test_conv_largest_parameters_are_exact():
    """The largest accepted values give the right output and plan: stride 2^31 - 1 (one output row), dilation
    2^31 - 1 with a 1-tap filter, and padding 2^31 - 1 along one axis (planned only: the output is 2^32 rows)."""
    g = seeded(1401)
    x = torch.randn(1, 2, 5, 4, generator=g, dtype=torch.float64)
    w = torch.randn(3, 2, 1, 2, generator=g, dtype=torch.float64)
    m = 2**31 - 1
    out = atrous_conv2d(x, w, stride=(m, 1), dilation=(m, 1))
    torch.testing.assert_close(out, F.conv2d(x, w, stride=(m, 1), dilation=(m, 1)))
    plan = atrous_conv2d_plan(x, w, padding=(m, 0))
    rows = sorted(tuple(r["rows"]) for r in plan["regions"])
    assert rows[0][0] == 0 and rows[-1][1] == 5 + 2 * m
    assert 0 < plan["kept_fraction"] < 1e-8
    meta = atrous_conv2d(x.to(META), w.to(META), padding=(m, 0))
    assert meta.shape == (1, 3, 5 + 2 * m, 3)


def test_conv_padded_extent_bound():
    """An expanded (stride-0) input so tall that H + 2 pad passes 2^62 is refused naming the padding, before any
    index arithmetic could overflow; the fake kernel says the same."""
    for device in ("cpu", "meta"):
        x = torch.zeros(1, 1, 1, 1, device=device).expand(1, 1, 2**62 - 1, 1)
        w = torch.zeros(1, 1, 1, 1, device=device)
        _raises_naming(ValueError, ("padding",), lambda: CONV_OP(x, w, None, None, [1, 1], [1, 0], [1, 1], False))
        _raises_naming(ValueError, ("padding",), lambda: PLAN_OP(x, w, None, None, [1, 1], [1, 0], [1, 1], False))


def test_plan_fake_refuses_after_checks():
    args = [t.to(META) for t in _conv_args()]
    _raises_naming(RuntimeError, ("input",), lambda: atrous_conv2d_plan(*args, padding=1))
    _raises_naming(ValueError, ("weight",), lambda: atrous_conv2d_plan(args[0], args[1][:, :1], padding=1))


def test_conv_compiles_with_fake_checks():
    """torch.compile(fullgraph) still traces through the fake kernel, and a bad call fails at trace time with
    the same message."""
    x, w, b, s = _conv_args()

    def f(x, w, b, s):
        return atrous_conv2d(x, w, b, s, padding=1, dilation=1, relu=True)

    out = torch.compile(f, fullgraph=True, backend="eager")(x, w, b, s)
    torch.testing.assert_close(out, f(x, w, b, s))
    with pytest.raises(Exception, match=r"atrous_conv2d: weight has \w+ input channels"):
        torch.compile(f, fullgraph=True, backend="eager")(x, w[:, :2], b, s)


# ----------------------------------------------------------------------------------------------------------
# aspp_project / aspp_sum (ValueError, as the Triton ops' kernels raise it)

PROJECT_NAMES = ("branches", "branch 0", "branch 1", "branch 2", "branch 3", "weight", "pool_bias", "scale", "shift")
SUM_NAMES = ("branches", "branch 0", "branch 1", "branch 2", "branch 3", "bias")


def _project_args():
    g = seeded(1402)
    branches = [torch.randn(1, 2, 3, 2, generator=g) for _ in range(4)]
    return [*branches, torch.randn(3, 9, generator=g), torch.randn(1, 3, generator=g), torch.rand(3, generator=g),
            torch.randn(3, generator=g)]


def _sum_args():
    g = seeded(1403)
    return [*[torch.randn(1, 2, 3, 2, generator=g) for _ in range(4)], torch.randn(2, generator=g)]


@needs_triton
@pytest.mark.parametrize("devices", [d for d in itertools.product(("cpu", "meta"), repeat=8) if len(set(d)) == 2
                                     and (d.count("meta") == 1 or d.count("cpu") == 1)],
                         ids=lambda d: "-".join(x[0] for x in d))
def test_aspp_project_mixed_devices_refused(devices):
    """A meta tensor in each position among CPU ones, and a CPU one in each position among meta ones."""
    args = [t.to(d) for t, d in zip(_project_args(), devices)]
    odd = devices.index("meta") if devices.count("meta") == 1 else devices.index("cpu")
    err = _raises_naming(ValueError, PROJECT_NAMES,
                         lambda: torch.ops.deeplab_fast.aspp_project(*args))
    assert PROJECT_NAMES[1:][odd] in str(err) or "branch" in str(err), str(err)


@needs_triton
@pytest.mark.parametrize("devices", [d for d in itertools.product(("cpu", "meta"), repeat=5) if len(set(d)) == 2],
                         ids=lambda d: "-".join(x[0] for x in d))
def test_aspp_sum_mixed_devices_refused(devices):
    args = [t.to(d) for t, d in zip(_sum_args(), devices)]
    _raises_naming(ValueError, SUM_NAMES, lambda: torch.ops.deeplab_fast.aspp_sum(*args))


@needs_triton
def test_aspp_all_meta_shapes_and_checks():
    pa = [t.to(META) for t in _project_args()]
    out = torch.ops.deeplab_fast.aspp_project(*pa)
    assert out.device == META and out.shape == (1, 3, 3, 2)
    sa = [t.to(META) for t in _sum_args()]
    assert torch.ops.deeplab_fast.aspp_sum(*sa).shape == (1, 2, 3, 2)
    bad_project = [
        (4, lambda t: t[:, :7], "weight"), (4, lambda t: t.half(), "weight"), (5, lambda t: t[:, :2], "pool_bias"),
        (5, lambda t: t.double(), "pool_bias"), (6, lambda t: t[:2], "scale"), (7, lambda t: t.half(), "shift"),
        (0, lambda t: t[:0], "branches"), (2, lambda t: t[:, :1], "branch 2"), (0, lambda t: t.double(), "branches"),
    ]
    for i, mutate, name in bad_project:
        args = list(pa)
        args[i] = mutate(args[i])
        _raises_naming(ValueError, (name,), lambda: torch.ops.deeplab_fast.aspp_project(*args))
    args = list(pa)
    args[4], args[5], args[6], args[7] = args[4][:0], args[5][:, :0], args[6][:0], args[7][:0]
    _raises_naming(ValueError, ("weight",), lambda: torch.ops.deeplab_fast.aspp_project(*args))
    for i, mutate, name in [(4, lambda t: t[:1], "bias"), (4, lambda t: t.double(), "bias"),
                            (1, lambda t: t[:, :, :1], "branch 1"), (0, lambda t: t[:0], "branches")]:
        args = list(sa)
        args[i] = mutate(args[i])
        _raises_naming(ValueError, (name,), lambda: torch.ops.deeplab_fast.aspp_sum(*args))


# ----------------------------------------------------------------------------------------------------------
# The dense CRF ops (their fake kernels: deeplab_fast/ops/_dense_crf_registrations.py)

CRF_NAMES = ("unary", "image", "features[0]", "features[1]", "compat[0]", "compat[1]", "q_init", "q",
             "gaussian_compat", "bilateral_compat")


def _crf_image_args():
    """unary and image of a small dense_crf sample (tests/samples.py)."""
    return sample_args("dense_crf", "2x3x5x6_diagonal_matrix")[:2]


def _crf_feature_args():
    """unary, features, compat (Potts and matrix) and marginals of a dense_crf_features sample."""
    unary, features, compat = sample_args("dense_crf_features", "D3_2_potts_matrix")[:3]
    return unary, features, compat, torch.softmax(-unary, 1)


def sample_args(op, name):
    return next(s for s in INPUTS[op]("cpu") if s.name == name).args


@pytest.mark.parametrize("position", range(2))
def test_dense_crf_meta_in_each_position(position):
    args = list(_crf_image_args())
    args[position] = args[position].to(META)
    _raises_naming(ValueError, CRF_NAMES, lambda: dense_crf(*args, iterations=1))


@pytest.mark.parametrize("position", ["unary", "features0", "features1", "compat1", "q_init"])
@pytest.mark.parametrize("all_meta", [False, True])
def test_dense_crf_features_device_mix(position, all_meta):
    """One argument on meta among CPU ones, or one on the CPU among meta ones. A compatibility may be on the CPU
    whatever the unary's device (it is read on the host), so CPU-among-meta is legal for it."""
    unary, features, compat, q = _crf_feature_args()
    base, odd = (META, torch.device("cpu")) if all_meta else (torch.device("cpu"), META)
    unary, q = unary.to(odd if position == "unary" else base), q.to(odd if position == "q_init" else base)
    features = [f.to(odd if position == f"features{k}" else base) for k, f in enumerate(features)]
    compat = [c.to(base) if not all_meta else c for c in compat]
    if position == "compat1":
        compat[1] = compat[1].to(META)
    call = lambda: dense_crf_features(unary, features, compat, iterations=1, q_init=q)  # noqa: E731
    if all_meta and position == "compat1":  # meta compat with a meta unary: legal; the fake kernel's output
        assert call().device == META
        return
    _raises_naming(ValueError, CRF_NAMES, call)
    if position != "q_init":
        _raises_naming(ValueError, CRF_NAMES, lambda: dense_crf_pairwise_energy(
            q if position != "unary" else unary, features, compat))


# ----------------------------------------------------------------------------------------------------------
# One description of the checks: every bad call of tests/samples.py raises ValueError with its message from the
# real kernel (C++) and, for mistakes in devices, dtypes and shapes, the same first line from the fake kernel
# (deeplab_fast/ops: conv_output, dense_crf's check_*), under FakeTensorMode as torch.compile traces it.


def _bad_calls():
    return [pytest.param(op, case, device, id=f"{op}-{case.name}-{device}", marks=CUDA_MARKS if device == "cuda"
                         else ()) for device in ("cpu", "cuda") for op, errors in ERRORS.items()
            for case in (errors(device) if device == "cpu" or torch.cuda.is_available() else errors("cpu"))]


def _fake(x, mode):
    if isinstance(x, torch.Tensor):
        return mode.from_tensor(x)
    if isinstance(x, list) and x and isinstance(x[0], torch.Tensor):
        return [mode.from_tensor(t) for t in x]
    return x


@pytest.mark.parametrize("op,case,device", _bad_calls())
def test_bad_calls_real_and_fake_alike(op, case, device):
    from torch._subclasses.fake_tensor import FakeTensorMode

    fn = getattr(torch.ops.deeplab_fast, op)
    with pytest.raises(ValueError) as real:
        fn(*case.args)
    message = str(real.value).splitlines()[0]
    assert message.startswith(prefix(op) + case.message), message
    if case.values:
        return
    mode = FakeTensorMode()
    args = [_fake(a, mode) for a in case.args]
    with pytest.raises(ValueError) as fake, mode:
        fn(*args)
    assert str(fake.value).splitlines()[0] == message
