"""Fused depthwise-separable atrous convolution with folded BatchNorms and ReLUs (DeepLab v3+).

Source: Chen et al., "Encoder-Decoder with Atrous Separable Convolution for Semantic Image Segmentation", ECCV
2018, sec. 3.1 ("atrous separable convolution", fig. 3) and sec. 3.2 (the modified Xception: "extra batch
normalization and ReLU activation are added after each 3 x 3 depthwise convolution"); the official TensorFlow
code's ``split_separable_conv2d`` (tensorflow/models, research/deeplab/core/utils.py). The op computes

    y1 = dw_relu?( depthwise_conv2d(input, dw_weight, stride, padding, dilation) * dw_scale[c] + dw_bias[c] )
    y  = pw_relu?( conv1x1(y1, pw_weight) * pw_scale[k] + pw_bias[k] )

with ``depthwise_conv2d`` = ``F.conv2d(..., groups=C)``, i.e. an eval-mode BatchNorm after each conv when
``scale = gamma / sqrt(running_var + eps)`` and ``bias = beta - running_mean * scale``.

- **CPU:** the depthwise pass (in-bounds taps only) writes a tile of output pixels x channels to a per-thread
  buffer that stays in cache, and the pointwise conv is a GEMM on that tile (MKL / oneDNN): the intermediate
  ``[N, C, P, Q]`` tensor is never written out.
- **CUDA:** one kernel: each threadblock computes the depthwise result of a tile of pixels into shared memory,
  channel chunk by channel chunk, and accumulates the pointwise product from it.
``separable_conv2d_plan`` says which path a call takes and why.
"""
from __future__ import annotations

import json
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F

from ._common import c10_dtype, c10_shape, check_device, check_value, scale_bias_relu
from .atrous_conv import (_check_bool, _check_finite, _check_tensor, _pair, check_conv_params, check_input_dtype,
                          check_per_channel, output_extent, output_format)

__all__ = ["separable_conv2d", "separable_conv2d_plan", "separable_conv2d_reference"]

IntPair = Union[int, Sequence[int]]
_OP = "separable_conv2d"
_TENSORS = ("input", "dw_weight", "dw_bias", "dw_scale", "pw_weight", "pw_bias", "pw_scale")


def _check_python_args(args, dw_relu, pw_relu) -> None:
    """The wrappers' type checks (the op's schema would accept dw_relu=1 and raise TypeError on a non-tensor)."""
    for name, t in zip(_TENSORS, args):
        _check_tensor(t, name, optional=name not in ("input", "dw_weight", "pw_weight"), op=_OP)
    _check_bool(dw_relu, "dw_relu", _OP)
    _check_bool(pw_relu, "pw_relu", _OP)


def _op_args(input, dw_weight, dw_bias, dw_scale, pw_weight, pw_bias, pw_scale, stride, padding, dilation, dw_relu,
             pw_relu):
    tensors = (input, dw_weight, dw_bias, dw_scale, pw_weight, pw_bias, pw_scale)
    _check_python_args(tensors, dw_relu, pw_relu)
    return (*tensors, _pair(stride, "stride", _OP), _pair(padding, "padding", _OP), _pair(dilation, "dilation", _OP),
            dw_relu, pw_relu)


def separable_conv2d(input: torch.Tensor, dw_weight: torch.Tensor, dw_bias: Optional[torch.Tensor],
                     dw_scale: Optional[torch.Tensor], pw_weight: torch.Tensor, pw_bias: Optional[torch.Tensor] = None,
                     pw_scale: Optional[torch.Tensor] = None, stride: IntPair = 1, padding: IntPair = 0,
                     dilation: IntPair = 1, dw_relu: bool = True, pw_relu: bool = True,
                     check_finite: bool = False) -> torch.Tensor:
    """Depthwise atrous conv + scale + bias [+ ReLU], then pointwise 1x1 conv + scale + bias [+ ReLU], fused.

    Args:
        input (Tensor[N, C, H, W]): float32, float64, bfloat16 or float16, on the CPU or CUDA. Any strides;
            channels_last is the fast layout on both devices (a contiguous input is transposed once).
        dw_weight (Tensor[C, 1, R, S]): the depthwise filter (one R x S filter per input channel, as
            ``nn.Conv2d(C, C, (R, S), groups=C).weight``); same dtype and device.
        dw_bias, dw_scale (Tensor[C], optional): per input channel, after the depthwise conv: ``* dw_scale +
            dw_bias`` (a folded BatchNorm). None: 0 and 1.
        pw_weight (Tensor[K, C, 1, 1]): the pointwise filter (``nn.Conv2d(C, K, 1).weight``).
        pw_bias, pw_scale (Tensor[K], optional): per output channel, after the pointwise conv. None: 0 and 1.
        stride, padding, dilation (int or (int, int)): of the depthwise conv, as ``F.conv2d``; dilation is the atrous
            rate. Defaults 1, 0, 1. Ranges: stride and dilation in [1, 2^31 - 1], padding in [0, 2^31 - 1], the
            padded input at most 2^62 per axis. ``padding = dilation * (R - 1) // 2`` keeps the size.
        dw_relu, pw_relu (bool): ReLU after the depthwise and after the pointwise step. Defaults True (the
            paper's layout); ``dw_relu=False`` with no dw_bias / dw_scale is segmentation_models_pytorch's layout.
        check_finite (bool): raise ``ValueError`` when any tensor argument holds NaN or Inf. Default False (an
            extra read of every argument; NaN propagates otherwise, as in ``F.conv2d``).

    Returns:
        Tensor[N, K, P, Q] of the input's dtype and device, channels_last when the input is.
        ``P = (H + 2 pad_h - dilation_h (R - 1) - 1) // stride_h + 1``, Q likewise. The depthwise result is
        rounded to the input's dtype before the pointwise conv, as the unfused layers round their intermediate
        tensor; both convs accumulate in float32 (float64 for float64).

    Raises:
        ValueError: naming the argument: a non-tensor or non-bool argument; a malformed or out-of-range stride /
            padding / dilation; wrong dims, dtype or device (every tensor on the input's device, the CPU or CUDA;
            a meta tensor is refused, as in the fake kernel, which runs the same checks); dw_weight not
            ``[C, 1, R, S]`` or pw_weight not ``[K, C, 1, 1]``; dw_bias / dw_scale not ``[C]``, pw_bias / pw_scale
            not ``[K]``; an empty batch or output; an output over 2^63 - 1 bytes; (``check_finite``) NaN or Inf.

    Gradients flow to every tensor argument (a composite of ATen's convolution backward; the ReLU masks come from
    the output and from the recomputed depthwise result).
    """
    args = _op_args(input, dw_weight, dw_bias, dw_scale, pw_weight, pw_bias, pw_scale, stride, padding, dilation,
                    dw_relu, pw_relu)
    if check_finite:
        _check_finite(zip(_TENSORS, args[:7]), _OP)
    return torch.ops.deeplab_fast.separable_conv2d(*args)


def separable_conv2d_plan(input: torch.Tensor, dw_weight: torch.Tensor, dw_bias: Optional[torch.Tensor],
                          dw_scale: Optional[torch.Tensor], pw_weight: torch.Tensor,
                          pw_bias: Optional[torch.Tensor] = None, pw_scale: Optional[torch.Tensor] = None,
                          stride: IntPair = 1, padding: IntPair = 0, dilation: IntPair = 1, dw_relu: bool = True,
                          pw_relu: bool = True) -> dict:
    """The path ``separable_conv2d`` takes for these arguments, without running it (a debug query).

    Returns a dict with ``device`` ("cpu" or "cuda"), ``path`` (CPU: "tiles", the depthwise result a tile of
    pixels at a time into a cache-sized buffer, or "whole"; CUDA: "fused"), ``reason`` and ``tile_pixels`` (the
    pixels per tile). The arguments are checked as by ``separable_conv2d``. A fake or meta tensor has no plan:
    RuntimeError.
    """
    args = _op_args(input, dw_weight, dw_bias, dw_scale, pw_weight, pw_bias, pw_scale, stride, padding, dilation,
                    dw_relu, pw_relu)
    return json.loads(torch.ops.deeplab_fast.separable_conv2d_plan(*args))


def separable_conv2d_reference(input, dw_weight, dw_bias, dw_scale, pw_weight, pw_bias=None, pw_scale=None,
                               stride: IntPair = 1, padding: IntPair = 0, dilation: IntPair = 1, dw_relu: bool = True,
                               pw_relu: bool = True) -> torch.Tensor:
    """The op written as standard torch ops (``F.conv2d(groups=C)``, ``* scale + bias``, ``relu``, ``F.conv2d``
    1x1, ...), in the arguments' dtype: what the layers export (``torch.export``, ONNX) instead of the op, and
    the op's semantics. No argument checks beyond torch's own."""
    y = F.conv2d(input, dw_weight, None, stride, padding, dilation, input.shape[1])
    y = scale_bias_relu(y, dw_scale, dw_bias, dw_relu)
    return scale_bias_relu(F.conv2d(y, pw_weight), pw_scale, pw_bias, pw_relu)


# ---------------------------------------------------------------------------------------------------------
# Fake kernels. separable_output() is the op's argument checks (check_args of
# csrc/separable_conv/separable_conv_args.cpp: the same messages, in the same order, ValueError; held to the C++ by
# tests/test_op_device_checks.py on the bad calls of tests/samples.py) and its output; the shared conv checks are
# atrous_conv's (as in C++: atrous_conv::checks).


def separable_output(input, dw_weight, dw_bias, dw_scale, pw_weight, pw_bias, pw_scale, stride, padding,
                     dilation) -> tuple[list, torch.memory_format]:
    """The checks of the op's arguments and its output's shape [N, K, P, Q] and memory format."""
    named = (("dw_weight", dw_weight), ("dw_bias", dw_bias), ("dw_scale", dw_scale), ("pw_weight", pw_weight),
             ("pw_bias", pw_bias), ("pw_scale", pw_scale))
    for name, t in named:
        if t is not None:
            check_device(t, input, _OP, name, "input")
    check_value(input.dim() == 4, _OP, lambda: f"input must be 4-D [N, C, H, W], got {input.dim()}-D with shape "
                                               f"{c10_shape(input.shape)}")
    for name, w, layout in (("dw_weight", dw_weight, "[C, 1, R, S]"), ("pw_weight", pw_weight, "[K, C, 1, 1]")):
        check_value(w.dim() == 4, _OP, lambda: f"{name} must be 4-D {layout}, got {w.dim()}-D with shape "
                                               f"{c10_shape(w.shape)}")
    check_input_dtype(_OP, input)
    for name, w in (("dw_weight", dw_weight), ("pw_weight", pw_weight)):
        check_value(w.dtype == input.dtype, _OP, lambda: f"{name} must have the input's dtype "
                                                         f"({c10_dtype(input.dtype)}), got {c10_dtype(w.dtype)}")
    n, c, h, w = input.shape
    check_value(n > 0, _OP, lambda: "input has an empty batch (N = 0)")
    check_value(c > 0 and h > 0 and w > 0, _OP, lambda: f"input must have C, H, W > 0, got shape "
                                                        f"{c10_shape(input.shape)}")
    c_d, one, r, s = dw_weight.shape
    check_value(c_d == c and one == 1 and r > 0 and s > 0, _OP,
                lambda: f"dw_weight must be [C, 1, R, S] with C = {c} (one filter per input channel) and R, S > 0, "
                        f"got shape {c10_shape(dw_weight.shape)}")
    k, c_p, r_p, s_p = pw_weight.shape
    check_value(k > 0 and c_p == c and r_p == 1 and s_p == 1, _OP,
                lambda: f"pw_weight must be [K, C, 1, 1] with C = {c} and K > 0, got shape "
                        f"{c10_shape(pw_weight.shape)}")
    check_conv_params(_OP, stride, padding, dilation)
    check_per_channel(_OP, dw_bias, input, c, "dw_bias", "input")
    check_per_channel(_OP, dw_scale, input, c, "dw_scale", "input")
    check_per_channel(_OP, pw_bias, input, k, "pw_bias", "output")
    check_per_channel(_OP, pw_scale, input, k, "pw_scale", "output")
    p, q = output_extent(_OP, input, k, r, s, stride, padding, dilation)
    return [n, k, p, q], output_format(input)


@torch.library.register_fake("deeplab_fast::separable_conv2d")
def _separable_conv2d_fake(input, dw_weight, dw_bias, dw_scale, pw_weight, pw_bias, pw_scale, stride, padding,
                           dilation, dw_relu, pw_relu):
    shape, memory_format = separable_output(input, dw_weight, dw_bias, dw_scale, pw_weight, pw_bias, pw_scale,
                                            stride, padding, dilation)
    return input.new_empty(shape).contiguous(memory_format=memory_format)


@torch.library.register_fake("deeplab_fast::separable_conv2d_plan")
def _separable_conv2d_plan_fake(input, dw_weight, dw_bias, dw_scale, pw_weight, pw_bias, pw_scale, stride, padding,
                                dilation, dw_relu, pw_relu):
    separable_output(input, dw_weight, dw_bias, dw_scale, pw_weight, pw_bias, pw_scale, stride, padding, dilation)
    raise RuntimeError(f"separable_conv2d_plan is a debug query of concrete tensors; it cannot be traced (the input "
                       f"is a fake or meta tensor on {input.device})")


# ---------------------------------------------------------------------------------------------------------
# Autograd: a composite of torch ops. With z1 = dwconv(x, w_d) (recomputed), y1 = dw_relu?(z1 s_d + b_d),
# z2 = conv1x1(y1, w_p) and y = pw_relu?(z2 s_p + b_p); g = dL/dy masked by y > 0, g1 = dL/dy1 masked by y1 > 0:
#   dL/db_p = sum g;   G_p = conv_weight_backward(g, y1);   dL/dw_p = G_p s_p;   dL/ds_p = sum_c G_p w_p
#   dL/dy1  = conv_input_backward(g s_p, w_p)
#   dL/db_d = sum g1;  G_d = conv_weight_backward(g1, x);   dL/dw_d = G_d s_d;   dL/ds_d = sum_rs G_d w_d
#   dL/dx   = conv_input_backward(g1 s_d, w_d)             (groups = C)
# (dL/ds = sum over pixels of g z, and z is linear in w, so z2 is never formed.)


def _setup_context(ctx, inputs, output):
    input, dw_weight, dw_bias, dw_scale, pw_weight, pw_bias, pw_scale, stride, padding, dilation, dw_relu, pw_relu \
        = inputs
    ctx.conv_args = (list(stride), list(padding), list(dilation))
    ctx.relu = (dw_relu, pw_relu)
    ctx.has_bias = (dw_bias is not None, pw_bias is not None)
    ctx.save_for_backward(input, dw_weight, dw_bias, dw_scale, pw_weight, pw_scale, output if pw_relu else None)


def _scaled(w, scale):
    return w if scale is None else w * scale.view(-1, 1, 1, 1)


def _backward(ctx, grad):
    input, dw_weight, dw_bias, dw_scale, pw_weight, pw_scale, output = ctx.saved_tensors
    stride, padding, dilation = ctx.conv_args
    dw_relu, pw_relu = ctx.relu
    needs = ctx.needs_input_grad
    c = input.shape[1]
    grads = [None] * 12
    y1 = scale_bias_relu(F.conv2d(input, dw_weight, None, stride, padding, dilation, c), dw_scale, dw_bias, dw_relu)
    g = grad * (output > 0) if pw_relu else grad
    if needs[5] and ctx.has_bias[1]:
        grads[5] = g.sum(dim=(0, 2, 3))
    if needs[4] or (needs[6] and pw_scale is not None):
        gw = torch.ops.aten.convolution_backward(g, y1, pw_weight, None, [1, 1], [0, 0], [1, 1], False, [0, 0], 1,
                                                 [False, True, False])[1]
        if needs[4]:
            grads[4] = _scaled(gw, pw_scale)
        if needs[6] and pw_scale is not None:
            grads[6] = (gw * pw_weight).sum(dim=(1, 2, 3))
    if not any(needs[:4]):
        return tuple(grads)
    g_in = g if pw_scale is None else g * pw_scale.view(1, -1, 1, 1)
    g1 = torch.ops.aten.convolution_backward(g_in, y1, pw_weight, None, [1, 1], [0, 0], [1, 1], False, [0, 0], 1,
                                             [True, False, False])[0]
    if dw_relu:
        g1 = g1 * (y1 > 0)
    if needs[2] and ctx.has_bias[0]:
        grads[2] = g1.sum(dim=(0, 2, 3))
    if needs[1] or (needs[3] and dw_scale is not None):
        gw = torch.ops.aten.convolution_backward(g1, input, dw_weight, None, stride, padding, dilation, False, [0, 0],
                                                 c, [False, True, False])[1]
        if needs[1]:
            grads[1] = _scaled(gw, dw_scale)
        if needs[3] and dw_scale is not None:
            grads[3] = (gw * dw_weight).sum(dim=(1, 2, 3))
    if needs[0]:
        g_x = g1 if dw_scale is None else g1 * dw_scale.view(1, -1, 1, 1)
        grads[0] = torch.ops.aten.convolution_backward(g_x, input, dw_weight, None, stride, padding, dilation, False,
                                                       [0, 0], c, [True, False, False])[0]
    return tuple(grads)


torch.library.register_autograd("deeplab_fast::separable_conv2d", _backward, setup_context=_setup_context)
