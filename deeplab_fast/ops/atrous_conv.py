"""Fused atrous (dilated) convolution + per-channel scale and bias (a folded BatchNorm) + ReLU.

Source: atrous convolution as in Chen et al., "DeepLab: Semantic Image Segmentation with Deep Convolutional
Nets, Atrous Convolution, and Fully Connected CRFs", TPAMI 2017, sec. 3.1; "Rethinking Atrous Convolution for
Semantic Image Segmentation" (v3), arXiv:1706.05587, sec. 3. The op computes, with groups = 1,

    y = relu?( conv2d(input, weight, stride, padding, dilation) * scale[k] + bias[k] )

- **CPU:** ATen's convolution (oneDNN), then one fused pass for the epilogue.
- **CUDA:** an implicit-GEMM convolution on tensor cores (CUTLASS) with the epilogue fused, run region by
  region with only the filter taps that land inside the image ("tap skipping"), or ATen for the cases it does
  not cover. ``atrous_conv2d_plan`` says which path a call takes and why.
"""
from __future__ import annotations

import contextlib
import json
import numbers
import os
from typing import Iterator, Optional, Sequence, Union

import torch

from ._common import c10_dtype, c10_shape, check_device, check_value

__all__ = ["atrous_conv2d", "atrous_conv2d_plan", "tap_skipping"]

IntPair = Union[int, Sequence[int]]


# stride and dilation in [1, MAX_PARAM], padding in [0, MAX_PARAM] (the C++ op's bounds too: check_args).
MAX_PARAM = 2**31 - 1
# The padded input extent, H + 2 pad_h and W + 2 pad_w, is at most MAX_EXTENT (the C++ op's bound).
MAX_EXTENT = 2**62
_LOWEST = {"stride": 1, "padding": 0, "dilation": 1}


def _pair(v: IntPair, name: str) -> list[int]:
    """``v`` as [height, width]. Values that are not 32-bit ints are refused here (they cannot be in range, and the
    largest do not fit the op's int64); the op checks the bounds, with its own message. Both raise ValueError."""
    if isinstance(v, bool):
        raise ValueError(f"atrous_conv2d: {name} must be an int or a pair of ints, got bool")
    if isinstance(v, numbers.Integral):
        pair = [int(v), int(v)]
    elif isinstance(v, (tuple, list)) and len(v) == 2 and all(
            isinstance(x, numbers.Integral) and not isinstance(x, bool) for x in v):
        pair = [int(v[0]), int(v[1])]
    else:
        raise ValueError(f"atrous_conv2d: {name} must be an int or a pair of ints (height, width), got {v!r}")
    if any(not -MAX_PARAM - 1 <= x <= MAX_PARAM for x in pair):
        raise ValueError(f"atrous_conv2d: {name} must be in [{_LOWEST[name]}, {MAX_PARAM}], got {v!r}")
    return pair


def _check_tensor(x, name: str, optional: bool = False) -> Optional[torch.Tensor]:
    if x is None and optional:
        return None
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"atrous_conv2d: {name} must be a torch.Tensor{' or None' if optional else ''}, "
                         f"got {type(x).__name__}")
    return x


def _check_finite(tensors) -> None:
    for name, t in tensors:
        # A meta tensor has no values to check: the op refuses it (device), so skip it here.
        if t is not None and t.device.type != "meta" and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ValueError(f"atrous_conv2d: {name} holds NaN or Inf")


def _check_python_args(input, weight, bias, scale, relu) -> None:
    """The wrappers' type checks (the op's schema would accept relu=1 and raise TypeError on a non-tensor)."""
    _check_tensor(input, "input")
    _check_tensor(weight, "weight")
    _check_tensor(bias, "bias", optional=True)
    _check_tensor(scale, "scale", optional=True)
    if not isinstance(relu, bool):
        raise ValueError(f"atrous_conv2d: relu must be a bool, got {type(relu).__name__}")


def atrous_conv2d(input: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                  scale: Optional[torch.Tensor] = None, stride: IntPair = 1, padding: IntPair = 0,
                  dilation: IntPair = 1, relu: bool = False, check_finite: bool = False) -> torch.Tensor:
    """Atrous convolution with a fused per-channel scale, bias and ReLU.

    Args:
        input (Tensor[N, C, H, W]): float32, float64, bfloat16 or float16, on the CPU or CUDA. Any strides;
            channels_last is the fast layout on CUDA.
        weight (Tensor[K, C, R, S]): the filter, same dtype and device (groups = 1).
        bias (Tensor[K], optional): added per output channel; same dtype. Default: none.
        scale (Tensor[K], optional): multiplies each output channel before the bias; same dtype. With
            ``scale = gamma / sqrt(var + eps)`` and ``bias = beta - mean * scale``, an eval-mode BatchNorm.
            Default: none (1).
        stride, padding, dilation (int or (int, int)): as ``F.conv2d``; dilation is the atrous rate.
            Defaults 1, 0, 1. Ranges: stride and dilation in [1, 2^31 - 1], padding in [0, 2^31 - 1], and the
            padded input (H + 2 pad_h, W + 2 pad_w) at most 2^62.
        relu (bool): apply ReLU last. Default False.
        check_finite (bool): raise ``ValueError`` when any tensor argument holds NaN or Inf. Default False,
            because it costs an extra read of every argument and, on CUDA, a host synchronisation; without it
            NaN propagates as in ``F.conv2d``.

    Returns:
        Tensor[N, K, P, Q] of the input's dtype and device, channels_last when the input is.
        ``P = (H + 2 pad_h - dilation_h (R - 1) - 1) // stride_h + 1``, Q likewise.

    Raises:
        ValueError: a non-tensor argument; a malformed stride / padding / dilation, or one outside its range
            (stride and dilation in [1, 2^31 - 1], padding in [0, 2^31 - 1]); wrong dims, dtype or device (every
            tensor on the input's device, the CPU or CUDA; a meta tensor is refused, as in the fake kernel, which
            runs the same checks); a channel mismatch (weight dim 1 vs input dim 1); bias or scale not ``[K]``; an
            empty batch or output; a padded input over 2^62 or an output of more than 2^63 - 1 bytes; or
            (``check_finite``) NaN or Inf in an argument.

    Gradients flow to input, weight, bias and scale (through ATen's convolution backward; the ReLU mask is
    taken from the output).
    """
    _check_python_args(input, weight, bias, scale, relu)
    if check_finite:
        _check_finite([("input", input), ("weight", weight), ("bias", bias), ("scale", scale)])
    return torch.ops.deeplab_fast.atrous_conv2d(input, weight, bias, scale, _pair(stride, "stride"),
                                                _pair(padding, "padding"), _pair(dilation, "dilation"), relu)


def atrous_conv2d_plan(input: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                       scale: Optional[torch.Tensor] = None, stride: IntPair = 1, padding: IntPair = 0,
                       dilation: IntPair = 1, relu: bool = False) -> dict:
    """The path ``atrous_conv2d`` takes for these arguments, without running it (a debug query).

    Returns a dict with:
        ``device`` ("cpu" or "cuda"), ``path`` ("aten", "aten-tap-skipping" or "cutlass"), ``reason`` (why,
        e.g. the ATen fallback's cause), ``tap_skipping`` (bool), ``kept_fraction`` (multiply-accumulates
        kept by tap skipping, 1.0 when there is nothing to skip), ``regions`` (each with ``rows``, ``cols``,
        ``tap_rows``, ``tap_cols``: half-open ranges of output rows / columns and of in-bounds filter taps),
        and on CUDA ``tile`` (the CUTLASS threadblock tile) and ``split_k``.
    The arguments are checked as by ``atrous_conv2d``. A fake or meta tensor has no plan: RuntimeError.
    """
    _check_python_args(input, weight, bias, scale, relu)
    return json.loads(torch.ops.deeplab_fast.atrous_conv2d_plan(
        input, weight, bias, scale, _pair(stride, "stride"), _pair(padding, "padding"),
        _pair(dilation, "dilation"), relu))


@contextlib.contextmanager
def tap_skipping(mode: Union[bool, str]) -> Iterator[None]:
    """Forces tap skipping on (True / "on"), off (False / "off") or to the device's rule ("auto") inside a block.

    It sets the ``DEEPLAB_FAST_TAP_SKIPPING`` environment variable (read at every call; process-wide, so not
    for concurrent threads that want different modes). The default rule: on CUDA, skip whenever a region
    loses a tap; on the CPU, never (oneDNN already leaves out the taps that read only padding, and the
    region-by-region calls measured slower).
    """
    value = {True: "1", False: "0", "on": "1", "off": "0", "auto": "auto"}.get(mode)
    if value is None:
        raise ValueError(f"tap_skipping: mode must be True, False, 'on', 'off' or 'auto', got {mode!r}")
    old = os.environ.get("DEEPLAB_FAST_TAP_SKIPPING")
    os.environ["DEEPLAB_FAST_TAP_SKIPPING"] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("DEEPLAB_FAST_TAP_SKIPPING", None)
        else:
            os.environ["DEEPLAB_FAST_TAP_SKIPPING"] = old


# ---------------------------------------------------------------------------------------------------------
# Fake kernels. conv_output() is the op's argument checks on devices, dims, dtypes and sizes (check_args of
# csrc/atrous_conv/atrous_conv_args.cpp: the same messages and ValueError, held to the C++ by
# tests/test_op_device_checks.py on the bad calls of tests/samples.py) and the output it makes; the fake kernels
# call it, so torch.compile traces through the op and a meta or misplaced argument is refused as by the real kernels.

_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
_OP = "atrous_conv2d"


def _check_pair(v, name: str, note: str = "") -> None:
    check_value(len(v) == 2, _OP, lambda: f"{name} must have 2 values (height, width), got {len(v)}")
    low = _LOWEST[name]
    check_value(all(low <= x <= MAX_PARAM for x in v), _OP,
                lambda: f"{name} must be >= {low} and <= {MAX_PARAM}{note}, got {c10_shape(v)}")


def _check_vector(t, input, k: int, name: str) -> None:
    if t is None:
        return
    check_value(t.dim() == 1 and t.shape[0] == k, _OP, lambda: f"{name} must be a 1-D tensor of one value per output "
                                                               f"channel ([{k}]), got shape {c10_shape(t.shape)}")
    check_value(t.dtype == input.dtype, _OP, lambda: f"{name} must have the input's dtype ({c10_dtype(input.dtype)}), "
                                                     f"got {c10_dtype(t.dtype)}")


def _out_size(size: int, taps: int, stride: int, pad: int, dilation: int, axis: str, padding) -> int:
    check_value(size + 2 * pad <= MAX_EXTENT, _OP,
                lambda: f"the padded input {axis} (input {axis} {size} + 2 x padding {pad}) exceeds 2^62; lower the "
                        f"padding {c10_shape(padding)}")
    span = size + 2 * pad - dilation * (taps - 1) - 1  # Python ints: no overflow
    return span // stride + 1 if span >= 0 else 0


def conv_output(input, weight, bias, scale, stride, padding, dilation) -> tuple[list, torch.memory_format]:
    """The checks of the op's arguments (their devices, dims, dtypes and sizes, in the C++ order) and its output's
    shape [N, K, P, Q] and memory format (channels_last iff the input is)."""
    for t, name in ((weight, "weight"), (bias, "bias"), (scale, "scale")):
        if t is not None:
            check_device(t, input, _OP, name, "input")
    check_value(input.dim() == 4, _OP, lambda: f"input must be 4-D [N, C, H, W], got {input.dim()}-D with shape "
                                               f"{c10_shape(input.shape)}")
    check_value(weight.dim() == 4, _OP, lambda: f"weight must be 4-D [K, C, R, S], got {weight.dim()}-D with shape "
                                                f"{c10_shape(weight.shape)}")
    check_value(input.dtype in _DTYPES, _OP, lambda: f"input must be float32, float64, bfloat16 or float16, got "
                                                     f"{c10_dtype(input.dtype)}")
    check_value(weight.dtype == input.dtype, _OP, lambda: f"weight must have the input's dtype "
                                                          f"({c10_dtype(input.dtype)}), got {c10_dtype(weight.dtype)}")
    n, c, h, w = input.shape
    k, c_w, r, s = weight.shape
    check_value(n > 0, _OP, lambda: "input has an empty batch (N = 0)")
    check_value(c > 0 and h > 0 and w > 0, _OP, lambda: f"input must have C, H, W > 0, got shape "
                                                        f"{c10_shape(input.shape)}")
    check_value(k > 0 and r > 0 and s > 0, _OP, lambda: f"weight must have K, R, S > 0, got shape "
                                                        f"{c10_shape(weight.shape)}")
    check_value(c_w == c, _OP, lambda: f"weight has {c_w} input channels (dim 1) but the input has {c} (only "
                                       "groups = 1 is supported)")
    _check_pair(stride, "stride")
    _check_pair(padding, "padding")
    _check_pair(dilation, "dilation", " (the atrous rate)")
    _check_vector(bias, input, k, "bias")
    _check_vector(scale, input, k, "scale")
    p = _out_size(h, r, stride[0], padding[0], dilation[0], "height", padding)
    q = _out_size(w, s, stride[1], padding[1], dilation[1], "width", padding)
    check_value(p > 0 and q > 0, _OP, lambda: f"the output would be empty: input {h}x{w} with a {r}x{s} filter, "
                                              f"padding {c10_shape(padding)} and dilation {c10_shape(dilation)} (the "
                                              f"dilated filter spans {(r - 1) * dilation[0] + 1}x"
                                              f"{(s - 1) * dilation[1] + 1}); pad the input or lower the dilation")
    check_value(n * k * p * q * input.element_size() <= 2**63 - 1, _OP,
                lambda: f"the output [N, K, P, Q] = [{n}, {k}, {p}, {q}] would take more than 2^63 - 1 bytes; lower "
                        f"the padding {c10_shape(padding)} or raise the stride {c10_shape(stride)}")
    channels_last = torch._prims_common.suggest_memory_format(input) == torch.channels_last
    return [n, k, p, q], torch.channels_last if channels_last else torch.contiguous_format


@torch.library.register_fake("deeplab_fast::atrous_conv2d")
def _atrous_conv2d_fake(input, weight, bias, scale, stride, padding, dilation, relu):
    shape, memory_format = conv_output(input, weight, bias, scale, stride, padding, dilation)
    return input.new_empty(shape).contiguous(memory_format=memory_format)


@torch.library.register_fake("deeplab_fast::atrous_conv2d_plan")
def _atrous_conv2d_plan_fake(input, weight, bias, scale, stride, padding, dilation, relu):
    conv_output(input, weight, bias, scale, stride, padding, dilation)
    raise RuntimeError(f"atrous_conv2d_plan is a debug query of concrete tensors; it cannot be traced (the input is "
                       f"a fake or meta tensor on {input.device})")


# ---------------------------------------------------------------------------------------------------------
# Autograd. With z = conv(x, w) the op is y = relu?(z * scale + bias); g = dL/dy masked by y > 0 (ReLU).
#   dL/dbias = sum_{n,p,q} g
#   dL/dx    = conv_input_backward(g * scale, w)
#   dL/dw    = conv_weight_backward(g, x) * scale[k]
#   dL/dscale[k] = sum_{n,p,q} g * z = sum_{c,r,s} w[k] * conv_weight_backward(g, x)[k]   (z is linear in w)
# so z itself is never stored or recomputed.


def _setup_context(ctx, inputs, output):
    input, weight, bias, scale, stride, padding, dilation, relu = inputs
    ctx.conv_args = (list(stride), list(padding), list(dilation))
    ctx.relu = relu
    ctx.has_bias = bias is not None
    ctx.has_scale = scale is not None
    saved_output = output if relu else None
    ctx.save_for_backward(input, weight, scale, saved_output)


def _backward(ctx, grad):
    input, weight, scale, output = ctx.saved_tensors
    stride, padding, dilation = ctx.conv_args
    need_input, need_weight, need_bias, need_scale = ctx.needs_input_grad[:4]
    g = grad * (output > 0) if ctx.relu else grad
    grad_input = grad_weight = grad_bias = grad_scale = None
    if need_bias and ctx.has_bias:
        grad_bias = g.sum(dim=(0, 2, 3))
    if need_input:
        g_in = g * scale.view(1, -1, 1, 1) if ctx.has_scale else g
        grad_input = torch.ops.aten.convolution_backward(
            g_in, input, weight, None, stride, padding, dilation, False, [0, 0], 1, [True, False, False])[0]
    if need_weight or (need_scale and ctx.has_scale):
        gw = torch.ops.aten.convolution_backward(
            g, input, weight, None, stride, padding, dilation, False, [0, 0], 1, [False, True, False])[1]
        if need_weight:
            grad_weight = gw * scale.view(-1, 1, 1, 1) if ctx.has_scale else gw
        if need_scale and ctx.has_scale:
            grad_scale = (gw * weight).sum(dim=(1, 2, 3))
    return grad_input, grad_weight, grad_bias, grad_scale, None, None, None, None


torch.library.register_autograd("deeplab_fast::atrous_conv2d", _backward, setup_context=_setup_context)
