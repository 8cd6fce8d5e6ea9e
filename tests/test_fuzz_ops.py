"""Property-based fuzzing (hypothesis) of every public op and of the pydensecrf drop-in (issue 14, "Keep it so").

Each test draws shapes, dtypes, devices (meta included, in any argument position), layouts (channels_last,
sliced, transposed and expanded views), values (NaN / Inf included), parameter values (huge ints, bools, floats,
numpy scalars, None) and non-tensor arguments (numpy arrays, floats, lists), calls the public function, and
asserts one of:

- a valid result: the atrous conv close to ``F.conv2d`` (+ scale, bias, ReLU) in float64, the ASPP ops close
  to their float64 formulas, CRF marginals finite and summing to 1 over the labels; the output finite whenever
  the inputs are;
- a ``ValueError`` or ``RuntimeError`` whose message names an argument of the function (``*_NAMES`` below).

Any other exception (``ZeroDivisionError``, ``TypeError``, ``AttributeError``, ...) fails the test; the one
exception is the drop-in's ``inference(niter)``, whose ``TypeError`` for a non-int ``niter`` is pydensecrf's and
documented. Each example has at most one fault (or none: a valid call, which must then succeed, so that about
half the examples reach the kernels); the atrous conv and the ASPP ops are also checked against a full model of
their argument rules (valid exactly when the model says so).

Time: the profile below (``derandomize=True``: the same examples on every run, so CI is reproducible) keeps the
whole file under about a minute on a 2-core machine. ``DEEPLAB_FAST_FUZZ_SCALE=10 pytest tests/test_fuzz_ops.py``
runs ten times the examples (and ``DEEPLAB_FAST_FUZZ_RANDOM=1`` fresh random ones) for a longer local hunt.

The bugs the fuzzers found are fixed; their minimal reproductions are regression tests at the end.
"""
from __future__ import annotations

import functools
import math
import os
import re

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, note, settings
from hypothesis import strategies as st

import deeplab_fast.densecrf as dcrf
from deeplab_fast.ops import (atrous_conv2d, atrous_conv2d_plan, dense_crf, dense_crf_features,
                              dense_crf_pairwise_energy, tap_skipping)
from deeplab_fast.ops.aspp import HAVE_TRITON, aspp_project, aspp_sum
from samples import conv_reference

# ----------------------------------------------------------------------------------------------------------
# The settings profile: bounded, reproducible.

_SCALE = float(os.environ.get("DEEPLAB_FAST_FUZZ_SCALE", "1"))
settings.register_profile(
    "deeplab_fast_fuzz",
    deadline=None,
    derandomize=os.environ.get("DEEPLAB_FAST_FUZZ_RANDOM", "0") != "1",
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)
_PROFILE = settings.get_profile("deeplab_fast_fuzz")


def fuzz(examples: int):
    """The profile with ``examples`` examples (times DEEPLAB_FAST_FUZZ_SCALE)."""
    return settings(_PROFILE, max_examples=max(1, round(examples * _SCALE)))


# ----------------------------------------------------------------------------------------------------------
# Outcomes

CONV_NAMES = ("input", "weight", "bias", "scale", "stride", "padding", "dilation", "relu", "check_finite")
PROJECT_NAMES = ("branches", "branch", "weight", "pool_bias", "scale", "shift")
SUM_NAMES = ("branches", "branch", "bias")
CRF_NAMES = ("unary", "image", "iterations", "gaussian_sxy", "gaussian_compat", "bilateral_sxy", "bilateral_srgb",
             "bilateral_compat", "checkpoint")
FEATURES_NAMES = ("unary", "features", "compat", "normalization", "iterations", "q_init", "checkpoint")
ENERGY_NAMES = ("q", "features", "compat", "normalization")
DROPIN_NAMES = ("w", "h", "nlabels", "nvar", "u", "unary", "features", "compat", "kernel", "normalization", "sxy",
                "srgb", "rgbim", "niter", "Q")


def _names(message: str, names) -> bool:
    return any(re.search(rf"(?<![A-Za-z_]){re.escape(n)}(?![A-Za-z_])", message) for n in names)


def outcome(fn, names, errors=(ValueError, RuntimeError)):
    """(result, None) or (None, error) for an error of type ``errors`` naming one of ``names``; any other
    exception propagates and fails the test."""
    try:
        result = fn()
        event("result")
        return result, None
    except errors as e:
        event(type(e).__name__)
        note(f"{type(e).__name__}: {e}")
        assert _names(str(e), names), f"{type(e).__name__} names none of {names}: {e}"
        return None, e


HUGE_INTS = (2**31 - 1, 2**31, 2**62, 2**63 - 1, 2**63, 2**64, -2**31, -2**63, -2**63 - 1)
NOT_INTS = (True, False, 1.0, 2.5, float("nan"), None, "1", np.float32(1.0))

FLOATS = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
TOL = {torch.float64: 1e-9, torch.float32: 2e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}


def _gen(draw) -> torch.Generator:
    return torch.Generator().manual_seed(draw(st.integers(0, 2**16)))


def make_tensor(draw, shape, dtype, *, layout=None, special=0.0, scale=1.0):
    """A tensor of ``shape`` and ``dtype`` (random values; with probability ``special`` one NaN / +-Inf), as a
    contiguous, channels_last, sliced, transposed or expanded view."""
    g = _gen(draw)
    layout = layout or draw(st.sampled_from(["contiguous", "contiguous", "channels_last", "sliced", "transposed",
                                             "expanded"]))
    shape = tuple(shape)
    dims = len(shape)
    if layout == "sliced" and dims >= 1:  # every other element of the last dim of a wider tensor
        base = _values(g, shape[:-1] + (2 * shape[-1] + 1,), dtype, scale)
        t = base[..., 1::2]
    elif layout == "transposed" and dims >= 2:
        t = _values(g, shape[:-2] + (shape[-1], shape[-2]), dtype, scale).transpose(-1, -2)
    elif layout == "expanded" and dims >= 1 and shape[0] > 0:
        t = _values(g, (1,) + shape[1:], dtype, scale).expand(shape)
    else:
        t = _values(g, shape, dtype, scale)
        if layout == "channels_last" and dims == 4:
            t = t.contiguous(memory_format=torch.channels_last)
    if t.numel() and t.is_floating_point() and draw(st.floats(0, 1)) < special:
        t = t.clone()  # keeps the view's strides (an expanded view becomes dense)
        index = tuple(int(i) for i in np.unravel_index(draw(st.integers(0, t.numel() - 1)), shape))
        t[index] = draw(st.sampled_from([math.nan, math.inf, -math.inf]))
    assert tuple(t.shape) == shape
    return t


def _values(g, shape, dtype, scale):
    if dtype.is_floating_point:
        return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)
    if dtype == torch.bool:
        return torch.rand(shape, generator=g) < 0.5
    return torch.randint(-3, 4, shape, generator=g).to(dtype)


def finite(*tensors) -> bool:
    return all(t is None or not t.is_floating_point() or bool(torch.isfinite(t).all()) for t in tensors)


def devices_of(*tensors):
    return {t.device.type for t in tensors if isinstance(t, torch.Tensor)}


def assert_close(out, ref, dtype, what):
    ref = ref.double()
    err = (out.double() - ref).abs()
    bound = TOL[dtype] * (ref.abs().max().item() + ref.abs() + 1e-30) + (1e-30 if dtype == torch.float64 else 0)
    if dtype in (torch.float16, torch.bfloat16):  # the inputs' rounding to 16 bits is in ref; the output's too
        bound = bound + TOL[dtype] * 1e-3
    assert bool((err <= bound).all()), f"{what}: max |out - ref| = {err.max().item():.3g}, max |ref| = " \
                                       f"{ref.abs().max().item():.3g}"


def fault(draw, kinds, clean: float = 0.45):
    """None (a valid call) with probability ``clean``, else one fault kind: one thing wrong per example, so that
    about half the examples reach the kernels (shrinking goes towards the valid call)."""
    if draw(st.integers(0, 99)) < clean * 100:
        return None
    return draw(st.sampled_from(kinds))


def inject_nonfinite(draw, t):
    """``t`` with one element NaN, +Inf or -Inf (a copy; the view's strides kept)."""
    if t is None or not t.numel() or not t.is_floating_point() or t.device.type == "meta":
        return t
    t = t.clone()
    index = tuple(int(i) for i in np.unravel_index(draw(st.integers(0, t.numel() - 1)), tuple(t.shape)))
    t[index] = draw(st.sampled_from([math.nan, math.inf, -math.inf]))
    return t


def not_a_tensor(draw, t):
    """What a caller might pass instead of the tensor ``t``: its numpy array, a float, a list or None."""
    kind = draw(st.sampled_from(["numpy", "float", "list", "none"]))
    if kind == "numpy":
        return t.detach().float().numpy() if t is not None and t.device.type == "cpu" else np.zeros(2)
    return {"float": 0.5, "list": [0.5], "none": None}[kind]


def bad_int(draw, low: int):
    """A value where an int (or a pair) >= low is expected that is not one: out of range, huge, not an int."""
    v = draw(st.sampled_from((low - 1, -1, *HUGE_INTS[1:], *NOT_INTS, np.float64(2.0), [low], (low, low, low),
                              (low, 2**63), [low, True], (low, 1.5))))
    return v if isinstance(v, (list, tuple)) or draw(st.booleans()) else (low, v)


# ----------------------------------------------------------------------------------------------------------
# atrous_conv2d and atrous_conv2d_plan

MAX_PARAM = 2**31 - 1
CONV_FAULTS = ("empty", "channels", "dtype", "bias", "scale", "stride", "padding", "dilation", "output", "device",
               "nontensor", "relu", "nan", "nan")


def _pair_value(v, low):
    """The [h, w] the op takes, or None when ``v`` is malformed or out of range (a ValueError or RuntimeError)."""
    if isinstance(v, (bool, np.bool_)):
        return None
    if isinstance(v, (int, np.integer)):
        v = (int(v), int(v))
    elif isinstance(v, (tuple, list)) and len(v) == 2 and all(
            isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_)) for x in v):
        v = (int(v[0]), int(v[1]))
    else:
        return None
    return v if all(low <= x <= MAX_PARAM for x in v) else None


def _small_pair(draw, low, high):
    if draw(st.booleans()):
        return draw(st.integers(low, high))
    return (draw(st.integers(low, high)), draw(st.integers(low, high)))


@st.composite
def conv_case(draw):
    """(kwargs for atrous_conv2d, whether the model of the argument rules says the call is valid, the output
    shape it predicts). One fault at most; the model judges the actual values, whatever the fault meant."""
    f = fault(draw, CONV_FAULTS)
    note(f"fault: {f}")
    dtype = draw(st.sampled_from(FLOATS))
    n, c, h, w = draw(st.integers(1, 2)), draw(st.integers(1, 3)), draw(st.integers(1, 6)), draw(st.integers(1, 6))
    k, r, s = draw(st.integers(1, 3)), draw(st.integers(1, 3)), draw(st.integers(1, 3))
    wc, wdtype = c, dtype
    if f == "empty":
        which = draw(st.sampled_from(["n", "c", "h", "w", "k", "r", "s"]))
        n, c, wc, h, w, k, r, s = ((0 if which == name else v) for name, v in
                                   zip("n c wc h w k r s".split(), (n, c, wc, h, w, k, r, s)))
        c = wc = 0 if which == "c" else c
    elif f == "channels":
        wc = c + draw(st.sampled_from([-1, 1])) if c > 1 else c + 1
    elif f == "dtype":
        if draw(st.booleans()):
            dtype = wdtype = draw(st.sampled_from([torch.int32, torch.int64, torch.bool, torch.uint8]))
        else:
            wdtype = draw(st.sampled_from([d for d in FLOATS if d != dtype]))
    x = make_tensor(draw, (n, c, h, w), dtype)
    wt = make_tensor(draw, (k, wc, r, s), wdtype)
    vectors = {}
    for name in ("bias", "scale"):
        vectors[name] = make_tensor(draw, (k,), dtype, layout=draw(st.sampled_from(["contiguous", "sliced"]))) \
            if draw(st.integers(0, 3)) else None
        if f == name:
            vectors[name] = draw(st.sampled_from([
                lambda: make_tensor(draw, (k + 1,), dtype), lambda: make_tensor(draw, (1, k), dtype),
                lambda: make_tensor(draw, (k,), draw(st.sampled_from([d for d in FLOATS if d != dtype]))),
                lambda: make_tensor(draw, (), dtype)]))()
    stride, padding, dilation = _small_pair(draw, 1, 3), _small_pair(draw, 0, 3), _small_pair(draw, 1, 3)
    if draw(st.integers(0, 9)) == 0:  # the largest valid values
        big = draw(st.sampled_from(["stride", "dilation", "padding"]))
        if big == "stride":
            stride = (MAX_PARAM, 1) if draw(st.booleans()) else MAX_PARAM
        elif big == "dilation":
            r, s = 1, 1
            wt = make_tensor(draw, (k, wc, 1, 1), wdtype)
            dilation = MAX_PARAM
        else:
            padding = (MAX_PARAM, draw(st.integers(0, 2)))  # valid: 2^32 output rows, so run on meta
    if f in ("stride", "padding", "dilation"):
        value = bad_int(draw, 1 if f != "padding" else 0)
        stride, padding, dilation = (value if f == name else v for name, v in
                                     zip(("stride", "padding", "dilation"), (stride, padding, dilation)))
    elif f == "output":
        if draw(st.booleans()):
            dilation, r = draw(st.sampled_from([10, MAX_PARAM])), 3
            wt = make_tensor(draw, (k, wc, 3, s), wdtype)
        else:
            padding = MAX_PARAM  # 2^64 output pixels: more than 2^63 bytes
    relu = draw(st.booleans()) if f != "relu" else draw(st.sampled_from([1, 0, None, "yes", np.bool_(True)]))
    kwargs = dict(input=x, weight=wt, bias=vectors["bias"], scale=vectors["scale"], stride=stride, padding=padding,
                  dilation=dilation, relu=relu)
    names = ("input", "weight", "bias", "scale")
    present = [m for m in names if kwargs[m] is not None]
    if draw(st.integers(0, 9)) == 0:  # all on meta: the fake kernels
        kwargs.update({m: kwargs[m].to("meta") for m in present})
    if f == "device":
        odd = draw(st.sampled_from(present))
        if draw(st.booleans()):
            kwargs[odd] = kwargs[odd].to("meta")
        else:  # one on the CPU among meta ones
            kwargs.update({m: kwargs[m].to("meta") for m in present if m != odd})
    elif f == "nontensor":
        odd = draw(st.sampled_from(names))
        kwargs[odd] = not_a_tensor(draw, kwargs[odd]) if kwargs[odd] is not None else 1.5
    elif f == "nan":
        odd = draw(st.sampled_from(present))
        kwargs[odd] = inject_nonfinite(draw, kwargs[odd])
    # The model of atrous_conv_args.cpp.
    tensors = [kwargs[m] for m in names]
    sp, pp, dp = _pair_value(stride, 1), _pair_value(padding, 0), _pair_value(dilation, 1)
    ok = (all(isinstance(t, torch.Tensor) for t in tensors[:2])
          and all(t is None or isinstance(t, torch.Tensor) for t in tensors[2:])
          and isinstance(relu, bool) and None not in (sp, pp, dp))
    shape = None
    if ok:
        x, wt, b, sc = tensors
        ok = (len(devices_of(*tensors)) == 1 and x.dtype in FLOATS and wt.dtype == x.dtype and x.dim() == 4
              and wt.dim() == 4 and min(x.shape) > 0 and min(wt.shape) > 0 and wt.shape[1] == x.shape[1]
              and all(v is None or (v.shape == (wt.shape[0],) and v.dtype == x.dtype) for v in (b, sc)))
        if ok:
            (n, c, h, w), (k, _, r, s) = x.shape, wt.shape
            p = (h + 2 * pp[0] - dp[0] * (r - 1) - 1) // sp[0] + 1
            q = (w + 2 * pp[1] - dp[1] * (s - 1) - 1) // sp[1] + 1
            shape = (n, k, p, q)
            ok = p > 0 and q > 0 and n * k * p * q * x.element_size() <= 2**63 - 1
    return kwargs, ok, shape


def _to_meta(kwargs, names=("input", "weight", "bias", "scale")):
    return {**kwargs, **{m: kwargs[m].to("meta") for m in names if isinstance(kwargs[m], torch.Tensor)}}


@fuzz(300)
@given(case=conv_case(), check_finite=st.sampled_from([False] * 3 + [True]),
       skip=st.sampled_from([None] * 3 + [True]))
def test_fuzz_atrous_conv2d(case, check_finite, skip):
    kwargs, ok, shape = case
    if ok and math.prod(shape) > 2e5:  # valid but large (padding 2^31 - 1): the fake kernel only
        kwargs = _to_meta(kwargs)
    tensors = [kwargs[m] for m in ("input", "weight", "bias", "scale")]
    nonfinite = not finite(*[t for t in tensors if isinstance(t, torch.Tensor) and t.device.type == "cpu"])
    with tap_skipping(skip if skip is not None else "auto"):
        out, err = outcome(lambda: atrous_conv2d(**kwargs, check_finite=check_finite), CONV_NAMES)
    expect_ok = ok and not (check_finite and nonfinite)
    assert (err is None) == expect_ok, f"the model says {'valid' if expect_ok else 'invalid'}, got {err!r}"
    if out is None:
        return
    x, w, b, s = tensors
    assert out.shape == shape and out.dtype == x.dtype and out.device == x.device
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        assert out.is_contiguous(memory_format=torch.channels_last)
    if x.device.type == "meta" or nonfinite:
        return
    assert torch.isfinite(out).all(), "a finite call gave a non-finite (or unwritten, NaN-poisoned) output"
    ref = conv_reference(x, w, b, s, _pair_value(kwargs["stride"], 1), _pair_value(kwargs["padding"], 0),
                          _pair_value(kwargs["dilation"], 1), kwargs["relu"])
    assert_close(out, ref, x.dtype, "atrous_conv2d vs F.conv2d in float64")


def _brute_force_taps(o, size, taps, stride, pad, dilation):
    valid = [t for t in range(taps) if 0 <= o * stride - pad + t * dilation < size]
    return (valid[0], valid[-1] + 1) if valid else None


@fuzz(150)
@given(case=conv_case())
def test_fuzz_atrous_conv2d_plan(case):
    kwargs, ok, shape = case
    is_meta = "meta" in devices_of(*kwargs.values())
    plan, err = outcome(lambda: atrous_conv2d_plan(**kwargs), CONV_NAMES)
    assert (err is None) == (ok and not is_meta), f"the model says {'valid' if ok else 'invalid'}, got {err!r}"
    if plan is None:
        return
    (_, _, p, q), (_, _, h, w), (_, _, r, s) = shape, kwargs["input"].shape, kwargs["weight"].shape
    (sh, sw), (ph, pw), (dh, dw) = (_pair_value(kwargs["stride"], 1), _pair_value(kwargs["padding"], 0),
                                    _pair_value(kwargs["dilation"], 1))
    assert 0.0 <= plan["kept_fraction"] <= 1.0 and math.isfinite(plan["kept_fraction"])
    area = 0
    for g in plan["regions"]:
        (p0, p1), (q0, q1), (r0, r1), (s0, s1) = g["rows"], g["cols"], g["tap_rows"], g["tap_cols"]
        assert 0 <= p0 < p1 <= p and 0 <= q0 < q1 <= q and 0 <= r0 <= r1 <= r and 0 <= s0 <= s1 <= s, g
        area += (p1 - p0) * (q1 - q0)
        for o in {p0, p1 - 1}:  # the band's ends (the huge-padding bands are 2^31 rows long)
            assert _brute_force_taps(o, h, r, sh, ph, dh) in ({(r0, r1)} if r0 < r1 else {None, (r0, r1)}), g
        for o in {q0, q1 - 1}:
            assert _brute_force_taps(o, w, s, sw, pw, dw) in ({(s0, s1)} if s0 < s1 else {None, (s0, s1)}), g
    assert area == p * q, "the regions do not tile the output"


# ----------------------------------------------------------------------------------------------------------
# aspp_project and aspp_sum (Triton; on CPU tensors under TRITON_INTERPRET=1: tiny shapes)

needs_triton = pytest.mark.skipif(not HAVE_TRITON, reason="the ASPP ops need triton")
ASPP_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
ASPP_FAULTS = ("empty", "branch", "dtype", "weight", "vector", "vector", "device", "nontensor", "count", "nan")


@functools.lru_cache(maxsize=None)
def project_values_checkable(dtype: torch.dtype) -> bool:
    """Whether aspp_project's values can be checked in this dtype here: triton 3.9's interpreter computes a
    bfloat16 tl.dot ~1e10 off (tests/test_aspp.py, interpreter_bf16_dot_ok), so on the CPU the bfloat16 values
    are checked only where a one-element projection comes out right (shapes, dtypes and errors always are)."""
    if dtype != torch.bfloat16 or os.environ.get("TRITON_INTERPRET") != "1":
        return True
    one = torch.ones(1, 1, 1, 1, dtype=dtype)
    out = aspp_project([one] * 4, torch.ones(1, 4, dtype=dtype), torch.zeros(1, 1), torch.ones(1), torch.zeros(1))
    return out.item() == 4.0


def aspp_case(draw, project: bool):
    """(branches, the other arguments, valid by the model of the checks, expected output shape) for one ASPP
    op: aspp_project's weight, pool_bias, scale, shift, or aspp_sum's bias."""
    f = fault(draw, ASPP_FAULTS)
    note(f"fault: {f}")
    dtype = draw(st.sampled_from(ASPP_DTYPES))
    n, c, h, w, cout = (draw(st.integers(1, 2)), draw(st.integers(1, 3)), draw(st.integers(1, 3)),
                        draw(st.integers(1, 3)), draw(st.integers(1, 3)) if project else 0)
    if f == "empty":
        which = draw(st.sampled_from(["n", "c", "h", "w"] + (["cout"] if project else [])))
        n, c, h, w, cout = (0 if which == name else v for name, v in
                            zip(("n", "c", "h", "w", "cout"), (n, c, h, w, cout)))
    if f == "dtype":
        dtype = draw(st.sampled_from([torch.float64, torch.int32]))
    layout = draw(st.sampled_from(["contiguous", "channels_last", "sliced", "transposed"]))
    branches = [make_tensor(draw, (n, c, h, w), dtype, layout=layout if draw(st.integers(0, 3)) else None)
                for _ in range(4)]
    if f == "branch":
        i = draw(st.integers(0, 3))
        branches[i] = draw(st.sampled_from([
            lambda t: t[..., :max(w - 1, 0)], lambda t: t[:, :max(c - 1, 0)], lambda t: t[0],
            lambda t: t.double(), lambda t: t.float() if t.dtype != torch.float32 else t.half()]))(branches[i])
    if project:
        weight = make_tensor(draw, (cout, 4 * c + draw(st.integers(0, 2))), dtype,
                             layout=draw(st.sampled_from(["contiguous", "sliced", "transposed"])))
        others = [weight, make_tensor(draw, (n, cout), torch.float32, scale=0.5),
                  make_tensor(draw, (cout,), torch.float32, scale=0.5) * 0.5 + 1,
                  make_tensor(draw, (cout,), torch.float32, scale=0.5)]  # weight, pool_bias, scale, shift
    else:
        others = [make_tensor(draw, (c,), torch.float32, layout=draw(st.sampled_from(["contiguous", "sliced"])))]
    if f == "weight" and project:
        others[0] = draw(st.sampled_from([
            lambda t: t[:, :max(4 * c - 1, 0)], lambda t: t.float() if t.dtype != torch.float32 else t.half(),
            lambda t: t[0], lambda t: t[None]]))(others[0])
    elif f == "vector" or (f == "weight" and not project):
        i = draw(st.integers(0, len(others) - 1)) if project else 0
        others[i] = draw(st.sampled_from([lambda t: t[..., :-1] if t.shape[-1] else t[None], lambda t: t.double(),
                                          lambda t: t.to(dtype) if dtype != torch.float32 else t.half(),
                                          lambda t: t[None]]))(others[i])
    tensors = branches + others
    if draw(st.integers(0, 9)) == 0:  # all on meta: the fake kernels
        tensors = [t.to("meta") for t in tensors]
    if f == "device":  # one on meta among CPU ones, or one on the CPU among meta ones
        odd = draw(st.integers(0, len(tensors) - 1))
        if draw(st.booleans()):
            tensors = [t if i == odd else t.to("meta") for i, t in enumerate(branches + others)]
        else:
            tensors = [t.to("meta") if i == odd else t for i, t in enumerate(branches + others)]
    branches, others = tensors[:4], tensors[4:]
    if f == "nontensor":
        odd = draw(st.integers(0, len(others)))
        if odd == len(others):
            branches[draw(st.integers(0, 3))] = draw(st.sampled_from([None, 1.0]))
            if draw(st.booleans()):  # numpy arrays in place of the tensors
                branches = [np.zeros(tuple(b.shape), np.float32) if isinstance(b, torch.Tensor) else b
                            for b in branches]
        else:
            others[odd] = not_a_tensor(draw, others[odd])
    elif f == "count":
        branches = branches[:3] if draw(st.booleans()) else branches + branches[:1]
    elif f == "nan":
        i = draw(st.integers(0, 3 + len(others)))
        if i < 4:
            branches[i] = inject_nonfinite(draw, branches[i])
        else:
            others[i - 4] = inject_nonfinite(draw, others[i - 4])
    # The model of the ops' checks (deeplab_fast/ops/aspp.py).
    flat = [*branches, *others]
    ok = (len(branches) == 4 and all(isinstance(t, torch.Tensor) for t in flat) and len(devices_of(*flat)) == 1
          and dtype in ASPP_DTYPES and all(b.shape == (n, c, h, w) and b.dtype == dtype for b in branches)
          and n * c * h * w > 0)
    if ok and project:
        weight, pool_bias, scale, shift = others
        ok = (weight.dim() == 2 and weight.shape[0] == cout and weight.shape[1] >= 4 * c and weight.dtype == dtype
              and cout > 0 and pool_bias.shape == (n, cout) and scale.shape == (cout,) and shift.shape == (cout,)
              and all(t.dtype == torch.float32 for t in (pool_bias, scale, shift)))
    elif ok:
        ok = others[0].shape == (c,) and others[0].dtype == torch.float32
    return branches, others, ok, (n, cout if project else c, h, w)


def _check_aspp_result(out, shape, dtype, inputs, ref):
    assert out.shape == shape and out.dtype == dtype
    if out.device.type == "meta" or not finite(*inputs):
        return
    assert torch.isfinite(out).all(), "finite inputs gave a non-finite (or unwritten, NaN-poisoned) output"
    if ref is not None:
        assert_close(out, ref(), dtype if dtype != torch.float32 else torch.float16, "vs float64")


@needs_triton
@fuzz(100)
@given(data=st.data())
def test_fuzz_aspp_project(data):
    branches, others, ok, shape = aspp_case(data.draw, project=True)
    out, err = outcome(lambda: aspp_project(branches, *others), PROJECT_NAMES)
    assert (err is None) == ok, f"the model says {'valid' if ok else 'invalid'}, got {err!r}"
    if out is None:
        return
    weight, pool_bias, scale, shift = others
    n, cout, h, w = shape
    cb = branches[0].shape[1]

    def ref():
        acc = pool_bias.double()[:, :, None, None].expand(n, cout, h, w).clone()
        for i, b in enumerate(branches):
            acc += torch.einsum("nchw,kc->nkhw", b.double().relu(), weight[:, i * cb:(i + 1) * cb].double())
        return (acc * scale.double()[:, None, None] + shift.double()[:, None, None]).relu()

    dtype = branches[0].dtype
    _check_aspp_result(out, shape, dtype, [*branches, *others], ref if project_values_checkable(dtype) else None)


@needs_triton
@fuzz(100)
@given(data=st.data())
def test_fuzz_aspp_sum(data):
    branches, (bias,), ok, shape = aspp_case(data.draw, project=False)
    out, err = outcome(lambda: aspp_sum(branches, bias), SUM_NAMES)
    assert (err is None) == ok, f"the model says {'valid' if ok else 'invalid'}, got {err!r}"
    if out is not None:
        _check_aspp_result(out, shape, branches[0].dtype, [*branches, bias],
                           lambda: sum(b.double() for b in branches) + bias.double()[:, None, None])


# ----------------------------------------------------------------------------------------------------------
# The dense CRF ops. Valid calls must succeed (one fault at most per example; none: a valid call).

CRF_FAULTS = ("empty", "dtype", "image", "iterations", "sd", "compat", "device", "nontensor", "unary_values")
FEATURE_FAULTS = ("empty", "dtype", "features", "count", "normalization", "compat", "q_init", "iterations",
                  "device", "nontensor", "unary_values")


def iterations_value(draw, bad: bool, meta: bool = False):
    """Small valid counts (numpy ints too; 2^31 - 1 only on meta: on the CPU it would run for hours), or bad."""
    if not bad:
        return draw(st.sampled_from([0, 1, 2, 3, np.int64(2)] + ([2**31 - 1] if meta else [])))
    return draw(st.sampled_from([-1, 2**31, 2**62, 2**63 - 1, 2**63, -2**63 - 1, True, 1.5, None, "2"]))


def sd_value(draw, bad: bool = False):
    if not bad:
        return draw(st.sampled_from([draw(st.floats(0.5, 100.0)), 3, np.float32(2.5), np.float64(13.0)]))
    return draw(st.sampled_from([0.0, -1.0, math.nan, math.inf, 1e-30, True, "3", None, [3.0]]))


def compat_value(draw, labels: int, bad: bool = False, meta_ok: bool = True, special: bool = True):
    """A compatibility: a Potts float, a 0-d tensor, a diagonal [L] or a matrix [L, L] (tensor or numpy array);
    or (bad) one of the wrong shape, dtype or value."""
    if not bad:
        kind = draw(st.integers(0, 4))
        if kind == 0:
            return draw(st.floats(-20.0, 20.0))
        if kind == 1:
            return torch.tensor(draw(st.floats(-20.0, 20.0)))
        if kind == 2:
            return make_tensor(draw, (labels,), torch.float32, layout="contiguous") * 3
        if kind == 3:
            return (make_tensor(draw, (labels, labels), draw(st.sampled_from([torch.float32, torch.float64]))) * 3
                    ).numpy()
        return (make_tensor(draw, (labels, labels), torch.float32, layout="transposed") * 3)
    options = [lambda: make_tensor(draw, (labels + 1,), torch.float32), lambda: torch.ones(2, 2, 2),
               lambda: math.nan, lambda: math.inf, lambda: 3.5e38, lambda: True, lambda: None, lambda: "3",
               lambda: np.arange(max(labels, 1)), lambda: torch.ones(labels, dtype=torch.int64)]
    if meta_ok:
        options.append(lambda: torch.ones(labels, labels, device="meta"))
    if special:
        options.append(lambda: inject_nonfinite(draw, torch.ones(labels)) if labels else torch.ones(1))
    return draw(st.sampled_from(options))()


def unary_tensor(draw, shape, dtype, bad_values: bool = False):
    """Unary energies; one +inf (an impossible label) at times, where the pixel keeps a finite label; with
    ``bad_values`` a NaN, a -inf, or a pixel with every label +inf."""
    u = make_tensor(draw, shape, dtype, scale=2.0)
    if not u.numel() or not u.is_floating_point():
        return u
    u = u.clone()
    index = [int(i) for i in np.unravel_index(draw(st.integers(0, u.numel() - 1)), tuple(u.shape))]
    if bad_values:
        kind = draw(st.sampled_from(["nan", "-inf", "all+inf"]))
        if kind == "all+inf":
            index[1] = slice(None)
        u[tuple(index)] = {"nan": math.nan, "-inf": -math.inf, "all+inf": math.inf}[kind]
    elif shape[1] >= 2 and draw(st.integers(0, 4)) == 0:
        u[tuple(index)] = math.inf
    return u


def check_marginals(q, unary, dim=1):
    assert q.shape == unary.shape and q.dtype == unary.dtype
    if q.device.type == "meta":
        return
    assert torch.isfinite(q).all(), "the marginals are not finite (or were not written: NaN-poisoned)"
    assert bool((q >= 0).all())
    tol = 1e-5 if q.dtype == torch.float32 else 1e-12
    torch.testing.assert_close(q.double().sum(dim), torch.ones_like(q.double().sum(dim)), rtol=0, atol=tol)


def _crf_size(draw, f, dims):
    sizes = [draw(st.integers(1, 2)), draw(st.integers(1, 4))] + [draw(st.integers(1, 4)) for _ in range(dims - 2)]
    if f == "empty":
        sizes[draw(st.integers(0, dims - 1))] = 0
    return sizes


def _crf_dtype(draw, f):
    if f == "dtype":
        return draw(st.sampled_from([torch.float16, torch.bfloat16, torch.int64, torch.int32]))
    return draw(st.sampled_from([torch.float32, torch.float32, torch.float64]))


@fuzz(150)
@given(data=st.data())
def test_fuzz_dense_crf(data):
    draw = data.draw
    f = fault(draw, CRF_FAULTS)
    note(f"fault: {f}")
    b, l, h, w = _crf_size(draw, f, 4)
    unary = unary_tensor(draw, (b, l, h, w), _crf_dtype(draw, f), bad_values=f == "unary_values")
    shape = (b, 3, h, w)
    if f == "image":
        shape = draw(st.sampled_from([(b + 1, 3, h, w), (b, 1, h, w), (b, 4, h, w), (b, 3, h + 1, w),
                                      (b, 3, h, w + 1), (b, 3, h * w), "float"]))
    image = make_tensor(draw, shape if shape != "float" else (b, 3, h, w), torch.int16)
    image = (image * 40 + 128).clamp(0, 255).to(torch.uint8 if shape != "float" else torch.float32)
    sd_bad = draw(st.sampled_from(["gaussian_sxy", "bilateral_sxy", "bilateral_srgb"])) if f == "sd" else None
    compat_bad = draw(st.sampled_from(["gaussian_compat", "bilateral_compat"])) if f == "compat" else None
    meta = draw(st.integers(0, 9)) == 0
    kwargs = dict(iterations=iterations_value(draw, f == "iterations", meta),
                  checkpoint=draw(st.booleans()),
                  **{name: sd_value(draw, sd_bad == name) for name in ("gaussian_sxy", "bilateral_sxy",
                                                                        "bilateral_srgb")},
                  **{name: compat_value(draw, l, compat_bad == name)
                     for name in ("gaussian_compat", "bilateral_compat")})
    args = [unary, image]
    if meta:  # all on meta
        args = [t.to("meta") for t in args]
    if f == "device":  # one on meta among CPU ones, or one on the CPU among meta ones
        odd = draw(st.integers(0, 1))
        args[odd] = (unary, image)[odd] if meta else args[odd].to("meta")
    elif f == "nontensor":
        args[draw(st.integers(0, 1))] = draw(st.sampled_from([None, 1.0, np.zeros((1, 2, 2, 2), np.float32)]))
    grad = draw(st.integers(0, 3)) == 0 and isinstance(args[0], torch.Tensor) and args[0].is_floating_point()
    if grad:
        args[0] = args[0].detach().requires_grad_()
    q, err = outcome(lambda: dense_crf(*args, **kwargs), CRF_NAMES)
    all_meta = devices_of(*args) == {"meta"}
    if f is None and not all_meta:
        assert err is None, f"a valid call failed: {err!r}"
    if q is not None:
        check_marginals(q.detach(), args[0])
        if grad and q.device.type != "meta":
            (q * torch.randn(q.shape, dtype=q.dtype)).sum().backward()
            assert torch.isfinite(args[0].grad).all()


def _feature_call(draw, energy: bool):
    """(positional args, kwargs, fault) for dense_crf_features (or dense_crf_pairwise_energy)."""
    f = fault(draw, FEATURE_FAULTS if not energy else ("empty", "dtype", "features", "count", "normalization",
                                                       "compat", "device", "nontensor", "unary_values"))
    note(f"fault: {f}")
    b, l, n = _crf_size(draw, f, 3)
    dtype = _crf_dtype(draw, f)
    unary = unary_tensor(draw, (b, l, n), dtype, bad_values=f == "unary_values")
    count = draw(st.integers(1 if f in ("features", "compat", "normalization") else 0, 2))
    features = []
    for _ in range(count):
        features.append(make_tensor(draw, (b, draw(st.integers(1, 5)), n),
                                    draw(st.sampled_from([torch.float32, torch.float32, torch.float64])),
                                    scale=draw(st.sampled_from([0.3, 1.0, 3.0]))))
    bad_term = draw(st.integers(0, count - 1)) if count else None
    if f == "features":
        features[bad_term] = draw(st.sampled_from([
            lambda t: t[:, :0], lambda t: torch.zeros(b, 17, n), lambda t: t[:, :, :-1] if n else t[None],
            lambda t: torch.cat([t, t]), lambda t: t.to(torch.int32), lambda t: t[0],
            lambda t: inject_nonfinite(draw, t)]))(features[bad_term])
    compat = [compat_value(draw, l, bad=f == "compat" and k == bad_term) for k in range(count)]
    normalization = [draw(st.integers(0, 3)) for _ in range(count)]
    if f == "normalization":
        normalization[bad_term] = draw(st.sampled_from([4, -1, True, 2**62, 1.0, None]))
    if f == "count":
        which = draw(st.sampled_from(["compat", "normalization"]))
        (compat if which == "compat" else normalization).append(
            1.0 if which == "compat" else 3)
    if f not in ("normalization", "count") and all(v == 3 for v in normalization) and draw(st.booleans()):
        normalization = None  # the default: symmetric
    meta = draw(st.integers(0, 9)) == 0
    q_init = None
    if not energy and draw(st.integers(0, 2)) == 0 and unary.is_floating_point() and unary.numel():
        q_init = torch.softmax(-torch.nan_to_num(unary.double(), posinf=50.0), 1).to(unary.dtype)
    if f == "q_init":
        base = q_init if q_init is not None else torch.full_like(unary, 0.5)
        q_init = draw(st.sampled_from([lambda t: t.to("meta"), lambda t: t[..., :-1], lambda t: t.half(),
                                       lambda t: t.transpose(1, 2), lambda t: t[0]]))(base)
    first = unary if not energy else (torch.softmax(-torch.nan_to_num(unary.double(), posinf=50.0), 1).to(dtype)
                                      if unary.is_floating_point() and f != "unary_values" else unary)
    tensors = [first, *features] + ([q_init] if q_init is not None else [])
    if meta:  # all on meta: the fake kernels (compatibilities may stay on the CPU)
        tensors = [t.to("meta") for t in tensors]
    if f == "device":  # one on meta among CPU ones, or one on the CPU among meta ones
        odd = draw(st.integers(0, len(tensors) - 1))
        cpu = [first, *features] + ([q_init] if q_init is not None else [])
        tensors[odd] = cpu[odd] if meta else tensors[odd].to("meta")
    first, features = tensors[0], tensors[1:1 + len(features)]
    q_init = tensors[-1] if q_init is not None else None
    if f == "nontensor":
        which = draw(st.sampled_from(["first", "features", "feature"] + (["q_init"] if not energy else [])))
        if which == "first":
            first = not_a_tensor(draw, first)
        elif which == "features":
            features = features[0] if features else torch.zeros(1, 1, 1)
        elif which == "feature" and features:
            features[0] = features[0].numpy() if features[0].device.type == "cpu" else None
        elif which == "q_init":
            q_init = 0.5
    kwargs = {} if energy else dict(iterations=iterations_value(draw, f == "iterations", meta), q_init=q_init,
                                    checkpoint=draw(st.booleans()))
    return [first, features, compat, normalization], kwargs, f


@fuzz(150)
@given(data=st.data())
def test_fuzz_dense_crf_features(data):
    args, kwargs, f = _feature_call(data.draw, energy=False)
    unary = args[0]
    grad = data.draw(st.integers(0, 3)) == 0 and isinstance(unary, torch.Tensor) and unary.is_floating_point()
    if grad:
        args[0] = unary = unary.detach().requires_grad_()
    q, err = outcome(lambda: dense_crf_features(*args, **kwargs), FEATURES_NAMES)
    if f is None:
        assert err is None, f"a valid call failed: {err!r}"
    if q is not None:
        check_marginals(q.detach(), unary)
        if grad and q.device.type != "meta":
            (q * torch.randn(q.shape, dtype=q.dtype)).sum().backward()
            assert torch.isfinite(unary.grad).all()


@fuzz(100)
@given(data=st.data())
def test_fuzz_dense_crf_pairwise_energy(data):
    args, _, f = _feature_call(data.draw, energy=True)
    e, err = outcome(lambda: dense_crf_pairwise_energy(*args), ENERGY_NAMES)
    if f is None:
        assert err is None, f"a valid call failed: {err!r}"
    if e is not None:
        q = args[0]
        assert e.shape == q.shape and e.dtype == q.dtype
        if e.device.type != "meta" and finite(q, *args[1]):
            assert torch.isfinite(e).all(), "finite inputs gave non-finite (or unwritten) messages"


# ----------------------------------------------------------------------------------------------------------
# The pydensecrf drop-in (numpy in, numpy out)

DROPIN_FAULTS = ("size", "unary", "features", "sd", "rgbim", "compat", "kernel", "normalization", "niter")


def np_array(draw, shape, dtype=None):
    """An array argument: mostly a float32 numpy array, else float64, a (CPU) torch tensor or nested lists."""
    t = make_tensor(draw, shape, dtype or draw(st.sampled_from([torch.float32] * 4 + [torch.float64])), scale=2.0)
    form = draw(st.integers(0, 9))
    return t if form == 0 else t.tolist() if form == 1 else t.numpy()


@fuzz(150)
@given(data=st.data())
def test_fuzz_densecrf_dropin(data):
    draw = data.draw
    f = fault(draw, DROPIN_FAULTS)
    note(f"fault: {f}")
    generic = draw(st.booleans())
    sizes = [draw(st.integers(1, 4)), draw(st.integers(1, 4)), draw(st.integers(1, 4))]
    if f == "size":
        sizes[draw(st.integers(0, 2))] = draw(st.sampled_from([0, -1, True, 2.0, None, -2**63, 2**31, 2**63]))
    w, h, labels = sizes
    crf, err = outcome(lambda: dcrf.DenseCRF(w, labels) if generic else dcrf.DenseCRF2D(w, h, labels),
                       DROPIN_NAMES)
    if crf is None:
        assert f == "size"
        return
    nvar = int(w) if generic else int(w) * int(h)
    steps = draw(st.lists(st.sampled_from(["unary", "unary_obj"] + (["energy"] if generic else
                                                                    ["gaussian", "bilateral", "energy"])),
                          min_size=1, max_size=3))
    bad_step = draw(st.integers(0, len(steps) - 1))
    unary_finite = True
    for i, step in enumerate(steps):
        bad = f if i == bad_step else None
        if step in ("unary", "unary_obj"):
            if bad == "unary":
                u = draw(st.sampled_from([
                    lambda: np_array(draw, (labels + 1, nvar)), lambda: np_array(draw, (labels, nvar + 1)),
                    lambda: np_array(draw, (labels, nvar), torch.int32), lambda: np_array(draw, (labels * nvar,)),
                    lambda: unary_tensor(draw, (1, labels, nvar), torch.float32, bad_values=True)[0].numpy()]))()
            else:
                u = unary_tensor(draw, (1, labels, nvar), torch.float32)[0]
                u = u.numpy() if draw(st.integers(0, 4)) else u.double()
            call = (lambda: crf.setUnaryEnergy(u)) if step == "unary" else (lambda: crf.setUnary(dcrf.ConstUnary(u)))
        elif step in ("gaussian", "bilateral"):
            compat = compat_value(draw, labels, bad=bad == "compat", meta_ok=False)
            sxy = sd_value(draw, bad == "sd") if draw(st.booleans()) else (sd_value(draw), sd_value(draw, bad == "sd"))
            kernel = draw(st.sampled_from([dcrf.DIAG_KERNEL, dcrf.CONST_KERNEL, dcrf.FULL_KERNEL]))
            if bad == "kernel":
                kernel = draw(st.sampled_from([7, -1, True, 1.0, None]))
            norm = draw(st.sampled_from(list(dcrf.NormalizationType)))
            if bad == "normalization":
                norm = draw(st.sampled_from([4, -1, True, 3.0, None]))
            if step == "gaussian":
                call = lambda: crf.addPairwiseGaussian(sxy=sxy, compat=compat, kernel=kernel,  # noqa: E731
                                                       normalization=norm)
            else:
                shape = (h, w, 3) if bad != "rgbim" else draw(st.sampled_from([(h, w), (h, w, 4), (w + 1, h, 3)]))
                im = (np.asarray(np_array(draw, shape, torch.float32)) * 40 + 128).clip(0, 255)
                im = im.astype(np.uint8) if bad != "rgbim" or draw(st.booleans()) else im
                srgb = sd_value(draw) if draw(st.booleans()) else tuple(sd_value(draw) for _ in range(3))
                call = lambda: crf.addPairwiseBilateral(sxy=sxy, srgb=srgb, rgbim=im,  # noqa: E731
                                                        compat=compat, kernel=kernel, normalization=norm)
        else:
            d = draw(st.integers(1, 4))
            feats = np_array(draw, (d, nvar))
            if bad == "features":
                feats = draw(st.sampled_from([
                    lambda: np_array(draw, (d, nvar + 1)), lambda: np_array(draw, (0, nvar)),
                    lambda: np_array(draw, (17, nvar)), lambda: np_array(draw, (nvar,)),
                    lambda: inject_nonfinite(draw, torch.ones(d, nvar)).numpy()]))()
            compat = compat_value(draw, labels, bad=bad == "compat", meta_ok=False)
            call = lambda: crf.addPairwiseEnergy(feats, compat)  # noqa: E731
        _, err = outcome(call, DROPIN_NAMES, errors=(ValueError, RuntimeError))
        if err is not None:
            assert bad is not None, f"a valid step failed: {err!r}"
        elif step in ("unary", "unary_obj"):
            unary_finite = bool(np.isfinite(np.asarray(u, dtype=np.float64)).all())
    # niter: pydensecrf raises TypeError for a non-int (documented), we add ValueError for 2^31 and more.
    niter = draw(st.integers(-2, 3)) if f != "niter" else draw(st.sampled_from([True, 1.5, None, "2", 2**31]))
    q, err = outcome(lambda: crf.inference(niter), DROPIN_NAMES, errors=(ValueError, RuntimeError, TypeError))
    if isinstance(err, TypeError):
        assert f == "niter" and "niter" in str(err)
    elif err is not None:
        assert f is not None, f"a valid call failed: {err!r}"
    if q is None:
        return
    assert isinstance(q, np.ndarray) and q.shape == (labels, nvar) and q.dtype == np.float32
    assert np.isfinite(q).all() and (q >= 0).all(), "the marginals are not finite"
    np.testing.assert_allclose(q.astype(np.float64).sum(0), 1.0, atol=1e-5)
    kl, err = outcome(lambda: crf.klDivergence(q), DROPIN_NAMES)
    # An impossible label (+inf unary, Q = 0 there) makes the KL NaN (0 * inf), as pydensecrf's Eigen sum does.
    assert err is None and (math.isfinite(kl) or not unary_finite), (err, kl)
    q0, _, _ = crf.startInference()
    _, err = outcome(lambda: crf.stepInference(q0), DROPIN_NAMES)
    assert err is None or f is not None
    assert np.isfinite(q0).all()
    np.testing.assert_allclose(q0.astype(np.float64).sum(0), 1.0, atol=1e-5)



# ----------------------------------------------------------------------------------------------------------
# Bugs the fuzzers found (now fixed): their minimal reproductions, kept as regression tests.

@pytest.mark.parametrize("image_shape", [(2, 3, 3, 3), (1, 3, 2, 3)], ids=["batch", "size"])
def test_dense_crf_grad_image_mismatch_named(image_shape):
    unary = torch.randn(1, 2, 3, 3, requires_grad=True)
    image = torch.zeros(image_shape, dtype=torch.uint8)
    with pytest.raises(ValueError) as info:
        dense_crf(unary, image, iterations=1)
    assert "image" in str(info.value), str(info.value)


@pytest.mark.parametrize("call", ["nvar", "nlabels", "w"])
def test_dropin_huge_sizes_named(call):
    with pytest.raises((ValueError, RuntimeError)) as info:
        if call == "nvar":
            dcrf.DenseCRF(2**63, 2).inference(1)
        elif call == "nlabels":
            dcrf.DenseCRF(2, 2**63).inference(0)
        else:
            dcrf.DenseCRF2D(2**63, 1, 2).addPairwiseGaussian(sxy=3, compat=3)
    assert _names(str(info.value), (call,)), str(info.value)


@pytest.mark.parametrize("arg", ["compat", "u", "features"])
def test_dropin_meta_tensor_named(arg):
    crf = dcrf.DenseCRF2D(2, 2, 2)
    meta = torch.ones(2, 4, device="meta")
    with pytest.raises((ValueError, RuntimeError)) as info:
        if arg == "compat":
            crf.addPairwiseGaussian(sxy=3, compat=torch.ones(2, device="meta"))
        elif arg == "u":
            crf.setUnaryEnergy(meta)
        else:
            crf.addPairwiseEnergy(meta, compat=3)
    assert _names(str(info.value), (arg,)), str(info.value)


def test_dropin_huge_niter_named():
    with pytest.raises(ValueError) as info:
        dcrf.DenseCRF2D(2, 2, 2).inference(2**31)
    assert "niter" in str(info.value), str(info.value)


@pytest.mark.parametrize("arg", ["gaussian_compat", "bilateral_compat"])
@pytest.mark.parametrize("form", ["tensor", "numpy"])
def test_dense_crf_nan_compat_named(arg, form):
    compat = torch.tensor([math.nan, 1.0])
    kwargs = {arg: compat if form == "tensor" else compat.numpy()}
    with pytest.raises((ValueError, RuntimeError)) as info:
        dense_crf(torch.randn(1, 2, 3, 3), torch.zeros(1, 3, 3, 3, dtype=torch.uint8), iterations=1, **kwargs)
    assert arg in str(info.value), str(info.value)


@pytest.mark.parametrize("checkpoint", [False, True])
def test_dense_crf_features_grad_without_terms(checkpoint):
    unary = torch.randn(1, 2, 3, requires_grad=True)
    q = dense_crf_features(unary, [], [], [], iterations=1, checkpoint=checkpoint)
    q.sum().backward()
    assert unary.grad is not None
