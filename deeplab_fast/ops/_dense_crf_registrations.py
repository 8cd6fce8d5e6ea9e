"""The Python registrations of the dense CRF ops (schemas and kernels: csrc/dense_crf/): their fake kernels and their
autograd formulas. Imported by deeplab_fast.ops.dense_crf, the public wrappers.

The fake kernels share one description of the ops' argument checks on devices, dtypes and shapes (``check_*``
below: those of csrc/dense_crf/dense_crf_args.cpp, with the same messages and ValueError, held to the C++ by
tests/test_op_device_checks.py on the bad calls of tests/samples.py) and make empty outputs, so that torch.compile
and FakeTensor tracing go through the ops and a meta (or misplaced) argument is refused. Checks of values (NaN,
inf) need the data: the real kernels alone make them.
"""
from __future__ import annotations

import math
import struct

import torch

from ._common import c10_dtype, c10_float, c10_shape, check_device, check_value, register_no_backward

__all__ = ["NO_NORMALIZATION", "NORMALIZE_BEFORE", "NORMALIZE_AFTER", "NORMALIZE_SYMMETRIC", "MAX_ITERATIONS",
           "MAX_FEATURE_DIM", "label_stride"]

# Normalisation types, numbered as pydensecrf's NormalizationType.
NO_NORMALIZATION = 0
NORMALIZE_BEFORE = 1
NORMALIZE_AFTER = 2
NORMALIZE_SYMMETRIC = 3

# The most mean-field iterations a call takes, and feature dimensions a lattice takes (the C++ ops' bounds).
MAX_ITERATIONS = 2**31 - 1
MAX_FEATURE_DIM = 16
# The largest scaled image coordinate the lattice's integer keys take (check_sd in dense_crf_args.cpp).
_MAX_FEATURE = 2.0**19
_FLOAT32_TINY = float(torch.finfo(torch.float32).tiny)

_OP = "dense_crf"


def label_stride(num_labels: int, device: torch.device) -> int:
    """The label stride S of the kernels' pixel-major layout: CUDA rounds L up to 4; the CPU keeps L <= 2, takes
    4 for 3 and 4 labels, and rounds larger L up to 8."""
    if torch.device(device).type == "cuda":
        return (num_labels + 3) // 4 * 4
    if num_labels <= 2:
        return num_labels
    return 4 if num_labels <= 4 else (num_labels + 7) // 8 * 8


def _check(cond, message) -> None:
    check_value(cond, _OP, message)


def _check_backward(cond, message) -> None:
    check_value(cond, f"{_OP} backward", message)


def _float32(x: float) -> float:
    """x rounded to float32 (inf beyond its range), as C++'s static_cast<float>."""
    try:
        return struct.unpack("f", struct.pack("f", x))[0]
    except OverflowError:
        return math.copysign(math.inf, x)


def check_value_tensor(t: torch.Tensor, name: str) -> None:
    cuda = t.device.type == "cuda"
    _check(t.dtype == torch.float32 or (t.dtype == torch.float64 and not cuda),
           lambda: f"{name} must be {'float32' if cuda else 'float32 or float64'}, got {c10_dtype(t.dtype)}")


def check_unary(unary: torch.Tensor) -> None:
    check_value_tensor(unary, "unary")
    _check(unary.dim() == 3, lambda: f"unary must be 3-D [B, L, N], got {unary.dim()}-D with shape "
                                     f"{c10_shape(unary.shape)}")
    _check(unary.shape[0] >= 1, lambda: "unary has an empty batch (B = 0)")
    _check(unary.shape[1] >= 1, lambda: "unary must have at least one label (L >= 1), got L = 0")
    _check(unary.shape[2] >= 1, lambda: f"unary must have at least one pixel, got shape {c10_shape(unary.shape)}")


def check_iterations(iterations: int) -> None:
    _check(0 <= iterations <= MAX_ITERATIONS, lambda: f"iterations must be in [0, {MAX_ITERATIONS}], got {iterations}")


def check_compat(c: torch.Tensor, num_labels: int, name: str, ref: torch.Tensor) -> None:
    _check(c.device.type == "cpu" or c.device == ref.device,
           lambda: f"{name} is on {c.device}; it must be on the CPU or on the unary's device ({ref.device})")
    _check(c.is_floating_point(), lambda: f"{name} must be a floating-point tensor, got {c10_dtype(c.dtype)}")
    shape_rule = f"must be a scalar (Potts weight), a vector [L] or a matrix [L, L] with L = {num_labels}"
    _check(c.dim() <= 2, lambda: f"{name} {shape_rule}, got shape {c10_shape(c.shape)}")
    if c.dim() == 1:
        _check(c.shape[0] == num_labels, lambda: f"{name} as a vector must have one weight per label ({num_labels}), "
                                                 f"got {c.shape[0]}")
    elif c.dim() == 2:
        _check(c.shape[0] == num_labels and c.shape[1] == num_labels,
               lambda: f"{name} {shape_rule}, got shape {c10_shape(c.shape)}")


def check_terms(ref: torch.Tensor, features, compat, normalization) -> None:
    b, l, n = ref.shape
    _check(len(features) == len(compat) == len(normalization),
           lambda: f"features, compat and normalization must have one entry per pairwise term, got "
                   f"{len(features)}, {len(compat)} and {len(normalization)}")
    for k, (f, c, norm) in enumerate(zip(features, compat, normalization)):
        name = f"features[{k}]"
        check_device(f, ref, _OP, name, "unary")
        _check(f.dtype in (torch.float32, torch.float64),
               lambda: f"{name} must be float32 or float64, got {c10_dtype(f.dtype)}")
        _check(f.dim() == 3 and f.shape[0] == b and f.shape[2] == n,
               lambda: f"{name} must have shape [B, D, N] = [{b}, D, {n}], got {c10_shape(f.shape)}")
        _check(1 <= f.shape[1] <= MAX_FEATURE_DIM, lambda: f"{name} must have between 1 and {MAX_FEATURE_DIM} feature "
                                                           f"dimensions, got {f.shape[1]}")
        check_compat(c, l, f"compat[{k}]", ref)
        _check(NO_NORMALIZATION <= norm <= NORMALIZE_SYMMETRIC,
               lambda: f"normalization[{k}] must be 0 (none), 1 (before), 2 (after) or 3 (symmetric), got {norm}")


def check_q_init(q_init, unary: torch.Tensor) -> None:
    if q_init is None:
        return
    check_device(q_init, unary, _OP, "q_init", "unary")
    _check(q_init.dtype == unary.dtype, lambda: f"q_init must have the unary's dtype ({c10_dtype(unary.dtype)}), "
                                                f"got {c10_dtype(q_init.dtype)}")
    _check(q_init.shape == unary.shape, lambda: f"q_init must have the unary's shape {c10_shape(unary.shape)}, "
                                                f"got {c10_shape(q_init.shape)}")


def check_call(unary, features, compat, normalization, iterations, q_init) -> None:
    """dense_crf_features(_with_history): check_call of dense_crf_args.cpp."""
    check_unary(unary)
    check_iterations(iterations)
    check_terms(unary, features, compat, normalization)
    check_q_init(q_init, unary)


def check_backward_call(grad_q, q, history, unary, features, compat, normalization, iterations, q_init,
                        compat_grad) -> None:
    """dense_crf_features_backward: check_backward_call of dense_crf_args.cpp."""
    check_unary(unary)
    check_iterations(iterations)
    for t, name in ((grad_q, "grad_q"), (q, "q")):
        check_device(t, unary, _OP, name, "unary")
        _check_backward(t.dtype == unary.dtype and t.shape == unary.shape,
                        lambda: f"{name} must match the unary ({c10_dtype(unary.dtype)}, {c10_shape(unary.shape)}),"
                       f" got {c10_dtype(t.dtype)}, {c10_shape(t.shape)}")
    if history is not None:
        check_device(history, unary, _OP, "history", "unary")
        b, l, n = unary.shape
        want = (b, iterations, n, label_stride(l, unary.device))
        _check_backward(history.dtype == unary.dtype and tuple(history.shape) == want,
                        lambda: f"history must be {c10_dtype(unary.dtype)} {c10_shape(want)} (the forward's), got "
                       f"{c10_dtype(history.dtype)} {c10_shape(history.shape)}")
    _check_backward(len(compat_grad) == len(compat),
                    lambda: f"compat_grad needs one flag per term ({len(compat)}), got {len(compat_grad)}")
    check_call(unary, features, compat, normalization, iterations, q_init)


def check_marginals(q: torch.Tensor) -> None:
    """dense_crf_pairwise_energy's q: check_pairwise_energy_call of dense_crf_args.cpp, values aside."""
    check_value_tensor(q, "q")
    _check(q.dim() == 3 and q.numel() > 0, lambda: f"q must be a non-empty [B, L, N] tensor, got shape "
                                                   f"{c10_shape(q.shape)}")


def _check_sd(sd: float, name: str, extent, what: str) -> None:
    f = _float32(sd)
    _check(math.isfinite(sd) and sd > 0, lambda: f"{name} must be a finite value > 0, got {c10_float(sd)}")
    _check(math.isfinite(f) and f > 0, lambda: f"{name} must be representable in float32 (between 1.2e-38 and "
                                               f"3.4e38), got {c10_float(sd)}")
    smallest = max(extent / _MAX_FEATURE, _FLOAT32_TINY)
    _check(extent / f <= _MAX_FEATURE, lambda: f"{name} must be at least {c10_float(smallest)} for {what} "
                                               f"({c10_float(extent)} / {name} must stay below 2^19 to fit the "
                                               f"lattice), got {c10_float(sd)}")


def check_image(image: torch.Tensor, gaussian_sxy: float, bilateral_sxy: float, bilateral_srgb: float) -> None:
    """dense_crf_image_features: check_image of dense_crf_args.cpp."""
    _check(image.dtype == torch.uint8, lambda: f"image must be uint8 RGB, got {c10_dtype(image.dtype)}")
    _check(image.dim() == 4, lambda: f"image must be 4-D [B, 3, H, W], got shape {c10_shape(image.shape)}")
    _check(image.shape[1] == 3, lambda: f"image must have 3 channels (RGB) in dim 1, got {image.shape[1]} (shape "
                                        f"{c10_shape(image.shape)})")
    _check(image.shape[0] >= 1, lambda: "image has an empty batch (B = 0)")
    _check(image.shape[2] >= 1 and image.shape[3] >= 1,
           lambda: f"image must have at least one pixel, got shape {c10_shape(image.shape)}")
    # The largest coordinate as a number (a symbolic size gives its hint: the check is about magnitudes).
    extent = float(max(int(image.shape[2]), int(image.shape[3])) - 1)
    _check_sd(gaussian_sxy, "gaussian_sxy", max(extent, 1.0), "this image size")
    _check_sd(bilateral_sxy, "bilateral_sxy", max(extent, 1.0), "this image size")
    _check_sd(bilateral_srgb, "bilateral_srgb", 255.0, "8-bit colours")


@torch.library.register_fake("deeplab_fast::dense_crf_features")
def _dense_crf_features_fake(unary, features, compat, normalization, iterations, q_init):
    check_call(unary, features, compat, normalization, iterations, q_init)
    return torch.empty_like(unary, memory_format=torch.contiguous_format)


@torch.library.register_fake("deeplab_fast::dense_crf_features_with_history")
def _dense_crf_features_with_history_fake(unary, features, compat, normalization, iterations, q_init):
    check_call(unary, features, compat, normalization, iterations, q_init)
    b, l, n = unary.shape
    history = unary.new_empty((b, iterations, n, label_stride(l, unary.device)))
    return torch.empty_like(unary, memory_format=torch.contiguous_format), history


@torch.library.register_fake("deeplab_fast::dense_crf_features_backward")
def _dense_crf_features_backward_fake(grad_q, q, history, unary, features, compat, normalization, iterations,
                                      q_init, compat_grad):
    check_backward_call(grad_q, q, history, unary, features, compat, normalization, iterations, q_init,
                        compat_grad)
    grad_q_init = torch.empty_like(unary) if q_init is not None else unary.new_empty((0,))
    return torch.empty_like(unary), [torch.empty_like(c) for c in compat], grad_q_init


@torch.library.register_fake("deeplab_fast::dense_crf_image_features")
def _dense_crf_image_features_fake(image, gaussian_sxy, bilateral_sxy, bilateral_srgb):
    check_image(image, gaussian_sxy, bilateral_sxy, bilateral_srgb)
    b, _, h, w = image.shape
    return (image.new_empty((b, 2, h * w), dtype=torch.float32),
            image.new_empty((b, 5, h * w), dtype=torch.float32))


@torch.library.register_fake("deeplab_fast::dense_crf_pairwise_energy")
def _dense_crf_pairwise_energy_fake(q, features, compat, normalization):
    check_marginals(q)
    check_terms(q, features, compat, normalization)
    return torch.empty_like(q, memory_format=torch.contiguous_format)


# ---------------------------------------------------------------------------------------------------------
# Autograd: the vector-Jacobian product of mean-field inference (dense_crf_features_backward). The plain op
# keeps its inputs and recomputes the iterations in the backward (checkpointing); the history op keeps every
# iteration's marginals.


def _setup_context(ctx, inputs, output):
    unary, features, compat, normalization, iterations, q_init = inputs
    history = None
    if isinstance(output, (tuple, list)):
        q, history = output
        ctx.mark_non_differentiable(history)
    else:
        q = output
    ctx.normalization, ctx.iterations = list(normalization), iterations
    ctx.num_terms, ctx.has_q_init, ctx.has_history = len(features), q_init is not None, history is not None
    ctx.features_need_grad = [f.requires_grad for f in features]
    ctx.compat_need_grad = [c.requires_grad for c in compat]
    ctx.save_for_backward(unary, q, history, q_init, *features, *compat)


def _backward(ctx, grad_q, *unused):
    unary, q, history, q_init, *rest = ctx.saved_tensors
    features, compat = rest[:ctx.num_terms], rest[ctx.num_terms:]
    for k, needed in enumerate(ctx.features_need_grad):
        if needed:
            raise NotImplementedError(
                f"dense_crf: the gradient with respect to features[{k}] (the kernel bandwidths) is not implemented; "
                "detach the features (gradients flow to the unary, q_init and the compatibilities)")
    if grad_q is None:
        grad_q = torch.zeros_like(q)
    grad_unary, grad_compat, grad_q_init = torch.ops.deeplab_fast.dense_crf_features_backward(
        grad_q.contiguous(), q, history if ctx.has_history else None, unary, features, compat, ctx.normalization,
        ctx.iterations, q_init if ctx.has_q_init else None, ctx.compat_need_grad)
    grad_compat = [g if needed else None for g, needed in zip(grad_compat, ctx.compat_need_grad)]
    # torch's structure check takes a non-empty int list as one leaf but an empty one as a list.
    grad_normalization = None if ctx.normalization else []
    return (grad_unary, [None] * ctx.num_terms, grad_compat, grad_normalization, None,
            grad_q_init if ctx.has_q_init else None)


for _name in ("dense_crf_features", "dense_crf_features_with_history"):
    torch.library.register_autograd(f"deeplab_fast::{_name}", _backward, setup_context=_setup_context)
register_no_backward("deeplab_fast::dense_crf_pairwise_energy",
                     "has no backward: the pairwise energy is an inference-time diagnostic (pydensecrf's KL "
                     "divergence); differentiate dense_crf / dense_crf_features instead")
register_no_backward("deeplab_fast::dense_crf_features_backward",
                     "has no backward: second derivatives of the dense CRF are not implemented")
