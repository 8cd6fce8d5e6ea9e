"""The fused ASPP ops, backed by Triton kernels (``deeplab_fast/triton/aspp_kernels.py``).

- ``aspp_project`` (DeepLab v3, Chen et al. 2017 sec. 3.3): the concat of the four spatial ASPP branches and the
  1x1 projection with its BN and ReLU, without writing the concat.
- ``aspp_sum`` (DeepLab v2, Chen et al. 2016 sec. 3.3): the sum of the four branch outputs and their biases.

Both are ``torch.library.triton_op`` s (``deeplab_fast::aspp_project``, ``deeplab_fast::aspp_sum``), so
``torch.compile`` traces into their kernels. They need triton; without it ``HAVE_TRITON`` is False, the ops do
not exist, and the ASPP modules take their plain-torch path. On CPU tensors the kernels run only under
``TRITON_INTERPRET=1`` (set before deeplab_fast is imported), which the tests use.
"""
from __future__ import annotations

import contextlib
import math

import torch

from .._env import poison_outputs
from ._common import register_no_backward

__all__ = ["HAVE_TRITON", "aspp_project", "aspp_sum"]

try:
    import triton

    from ..triton import aspp_kernels as _kernels

    HAVE_TRITON = True
except ImportError:  # triton is optional: the modules fall back to plain torch
    HAVE_TRITON = False

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _new_output(like: torch.Tensor, shape) -> torch.Tensor:
    """An output with ``like``'s dtype, device and memory format (channels_last when it is), NaN-filled when
    DEEPLAB_FAST_POISON=1."""
    fmt = torch.channels_last if like.is_contiguous(memory_format=torch.channels_last) and not like.is_contiguous() \
        else torch.contiguous_format
    out = torch.empty(shape, dtype=like.dtype, device=like.device, memory_format=fmt)
    if poison_outputs():
        out.fill_(math.nan)
    return out


def _check_branches(branches, op: str):
    b0 = branches[0]
    if b0.dim() != 4:
        raise ValueError(f"{op}: branch 0 must be 4-D [N, C, H, W], got {b0.dim()}-D")
    if b0.dtype not in _DTYPES:
        raise ValueError(f"{op}: branches must be float32, bfloat16 or float16, got {b0.dtype}")
    if b0.numel() == 0:
        raise ValueError(f"{op}: branches are empty (shape {tuple(b0.shape)})")
    for i, b in enumerate(branches[1:], 1):
        if b.shape != b0.shape or b.dtype != b0.dtype or b.device != b0.device:
            raise ValueError(f"{op}: branch {i} is {tuple(b.shape)} {b.dtype} on {b.device}; branch 0 is "
                             f"{tuple(b0.shape)} {b0.dtype} on {b0.device}: all four must match")
    if any(b.stride() != b0.stride() for b in branches[1:]):  # one set of strides for the kernel
        branches = [b.contiguous(memory_format=torch.channels_last) for b in branches]
    return branches


def _check_vector(v: torch.Tensor, name: str, op: str, n: int, ref: torch.Tensor, dtype=torch.float32):
    if v.shape != (n,) or v.dtype != dtype or v.device != ref.device:
        raise ValueError(f"{op}: {name} must be a [{n}] {dtype} tensor on {ref.device}, got {tuple(v.shape)} "
                         f"{v.dtype} on {v.device}")


def _check_project(b0, b1, b2, b3, weight, pool_bias, scale, shift):
    """aspp_project's argument checks, shared by the kernel and the fake kernel: every tensor on branch 0's
    device, then shapes and dtypes. Returns the (possibly re-strided) branches and C_out."""
    op = "aspp_project"
    branches = _check_branches([b0, b1, b2, b3], op)
    b0 = branches[0]
    n, cb, h, w = b0.shape
    if weight.dim() != 2 or weight.shape[1] < 4 * cb or weight.dtype != b0.dtype or weight.device != b0.device:
        raise ValueError(f"{op}: weight must be [C_out, >= 4 * {cb}] {b0.dtype} on {b0.device} (the "
                         f"projection's input columns of the four spatial branches), got {tuple(weight.shape)} "
                         f"{weight.dtype} on {weight.device}")
    cout = weight.shape[0]
    if pool_bias.shape != (n, cout) or pool_bias.dtype != torch.float32 or pool_bias.device != b0.device:
        raise ValueError(f"{op}: pool_bias must be [{n}, {cout}] float32 on {b0.device}, got "
                         f"{tuple(pool_bias.shape)} {pool_bias.dtype} on {pool_bias.device}")
    _check_vector(scale, "scale", op, cout, b0)
    _check_vector(shift, "shift", op, cout, b0)
    if cout == 0:
        raise ValueError(f"{op}: weight has no output channel (C_out = 0)")
    return branches, cout


def _check_sum(b0, b1, b2, b3, bias):
    """aspp_sum's argument checks, shared by the kernel and the fake kernel."""
    branches = _check_branches([b0, b1, b2, b3], "aspp_sum")
    _check_vector(bias, "bias", "aspp_sum", branches[0].shape[1], branches[0])
    return branches


def _precision(dtype: torch.dtype) -> str:
    """tl.dot's input precision: float32 follows torch.backends.cudnn.allow_tf32, as the 1x1 convolution this
    GEMM replaces (and deeplab_fast's atrous conv) does; 16-bit inputs ignore it."""
    if dtype == torch.float32 and not torch.backends.cudnn.allow_tf32:
        return "ieee"
    return "tf32"


def _on_device(t: torch.Tensor):
    """Triton launches on the current CUDA device: make it the tensors' one."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


if HAVE_TRITON:

    @torch.library.triton_op("deeplab_fast::aspp_project", mutates_args=())
    def _aspp_project(b0: torch.Tensor, b1: torch.Tensor, b2: torch.Tensor, b3: torch.Tensor, weight: torch.Tensor,
                      pool_bias: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        (b0, b1, b2, b3), cout = _check_project(b0, b1, b2, b3, weight, pool_bias, scale, shift)
        n, cb, h, w = b0.shape
        pool_bias = pool_bias.contiguous()
        out = _new_output(b0, (n, cout, h, w))
        m = n * h * w

        def grid(meta):
            return (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(cout, meta["BLOCK_N"]))

        with _on_device(b0):
            torch.library.wrap_triton(_kernels.aspp_project_kernel)[grid](
                b0, b1, b2, b3, weight, pool_bias, scale.contiguous(), shift.contiguous(), out,
                m, h * w, w, cout, cb, int(m).bit_length(),
                b0.stride(0), b0.stride(1), b0.stride(2), b0.stride(3),
                weight.stride(0), weight.stride(1),
                out.stride(0), out.stride(1), out.stride(2), out.stride(3),
                INPUT_PRECISION=_precision(b0.dtype))
        return out

    @torch.library.triton_op("deeplab_fast::aspp_sum", mutates_args=())
    def _aspp_sum(b0: torch.Tensor, b1: torch.Tensor, b2: torch.Tensor, b3: torch.Tensor,
                  bias: torch.Tensor) -> torch.Tensor:
        b0, b1, b2, b3 = _check_sum(b0, b1, b2, b3, bias)
        n, c, h, w = b0.shape
        out = _new_output(b0, (n, c, h, w))
        total = b0.numel()
        block = 1024

        def grid(meta):
            return (triton.cdiv(total, meta["BLOCK"]),)

        with _on_device(b0):
            if b0.stride() == out.stride():  # dense branches in the output's layout: flat indexing
                torch.library.wrap_triton(_kernels.aspp_sum_flat_kernel)[grid](
                    b0, b1, b2, b3, bias.contiguous(), out, total, c, out.stride(1), BLOCK=block,
                    INDEX_64=total >= 2**31)
            else:
                torch.library.wrap_triton(_kernels.aspp_sum_kernel)[grid](
                    b0, b1, b2, b3, bias.contiguous(), out, total, c, h * w, w,
                    b0.stride(0), b0.stride(1), b0.stride(2), b0.stride(3),
                    out.stride(0), out.stride(1), out.stride(2), out.stride(3), BLOCK=block)
        return out

    # Fake kernels: the kernels' checks (devices included, so a meta or misplaced argument is refused), then the
    # output's shape, dtype and strides (FakeTensor, torch.compile), without running a kernel.
    @torch.library.register_fake("deeplab_fast::aspp_project")
    def _aspp_project_fake(b0, b1, b2, b3, weight, pool_bias, scale, shift):
        (b0, _, _, _), cout = _check_project(b0, b1, b2, b3, weight, pool_bias, scale, shift)
        n, _, h, w = b0.shape
        return _new_output(b0, (n, cout, h, w))

    @torch.library.register_fake("deeplab_fast::aspp_sum")
    def _aspp_sum_fake(b0, b1, b2, b3, bias):
        b0, _, _, _ = _check_sum(b0, b1, b2, b3, bias)
        return _new_output(b0, tuple(b0.shape))

    for _name in ("aspp_project", "aspp_sum"):
        register_no_backward(
            f"deeplab_fast::{_name}",
            "has no backward: the fused ASPP path is for inference. The ASPP modules take their differentiable "
            "plain-torch path in training mode or when gradients are needed.")


def _require_triton(op: str):
    if not HAVE_TRITON:
        raise RuntimeError(f"{op} needs triton (pip install triton); the ASPP modules work without it")


def _check_call(op: str, branches, count: str, **tensors) -> list:
    """The wrappers' type checks: ``branches`` a sequence of exactly 4 tensors, every other argument a tensor."""
    if isinstance(branches, (str, bytes)) or not hasattr(branches, "__len__") or not hasattr(branches, "__getitem__"):
        raise ValueError(f"{op}: branches must be a sequence of 4 tensors, got {type(branches).__name__}")
    if len(branches) != 4:
        raise ValueError(f"{op}: needs exactly 4 {count}branches, got {len(branches)}")
    branches = list(branches)
    for i, b in enumerate(branches):
        if not isinstance(b, torch.Tensor):
            raise ValueError(f"{op}: branch {i} must be a torch.Tensor, got {type(b).__name__}")
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    return branches


def aspp_project(branches, weight: torch.Tensor, pool_bias: torch.Tensor, scale: torch.Tensor,
                 shift: torch.Tensor) -> torch.Tensor:
    """DeepLab-v3 ASPP concat + 1x1 projection + BN + ReLU, without writing the concat (Triton).

    Args:
        branches (4 x Tensor[N, CB, H, W]): the 1x1 and the three atrous branches, **before** their ReLU
            (their BN folded in), float32 / bfloat16 / float16, one dtype and device; channels_last is the fast
            layout.
        weight (Tensor[C_out, >= 4 CB]): the projection conv's weight as a matrix (``conv.weight.flatten(1)``),
            the branches' dtype; columns [b CB, (b+1) CB) multiply branch b, later columns are ignored (the
            image-pooling branch's, which ``pool_bias`` carries).
        pool_bias (Tensor[N, C_out], float32): the image-pooling branch through its weight columns, per image.
        scale, shift (Tensor[C_out], float32): the projection's BN folded (``gamma / sqrt(var + eps)``,
            ``beta - mean * scale``).

    Returns:
        Tensor[N, C_out, H, W] of the branches' dtype (channels_last when they are):
        ``relu((sum_b relu(branch_b) @ W_b^T + pool_bias) * scale + shift)``, accumulated in float32
        (float32 inputs use TF32 when ``torch.backends.cudnn.allow_tf32`` is set, as for the 1x1 conv it
        replaces).

    Raises ValueError on a non-tensor argument, mismatched shapes, dtypes or devices (every tensor on the
    branches' device; a meta tensor among real ones is refused, and the fake kernel runs the same checks), or
    C_out = 0; RuntimeError without triton.
    """
    _require_triton("aspp_project")
    branches = _check_call("aspp_project", branches, "spatial ", weight=weight, pool_bias=pool_bias, scale=scale,
                           shift=shift)
    return torch.ops.deeplab_fast.aspp_project(*branches, weight, pool_bias, scale, shift)


def aspp_sum(branches, bias: torch.Tensor) -> torch.Tensor:
    """DeepLab-v2 ASPP: the sum of four branch outputs plus a per-channel bias, in one pass (Triton).

    Args:
        branches (4 x Tensor[N, C, H, W]): the branch convs' outputs without their biases, one dtype and device.
        bias (Tensor[C], float32): the sum of the four branch biases.

    Returns:
        Tensor[N, C, H, W], the branches' dtype, channels_last when they are, summed in float32.
    Raises ValueError on a non-tensor argument, mismatched shapes, dtypes or devices (every tensor on the
    branches' device; the fake kernel runs the same checks); RuntimeError without triton.
    """
    _require_triton("aspp_sum")
    branches = _check_call("aspp_sum", branches, "", bias=bias)
    return torch.ops.deeplab_fast.aspp_sum(*branches, bias)
