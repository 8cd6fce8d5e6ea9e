"""Triton kernels of the fused ASPP heads (imported only when triton is installed).

- ``aspp_project_kernel`` (DeepLab v3, Chen et al. 2017 sec. 3.3): the concat of the four spatial branches and
  the 1x1 projection in one GEMM. Output pixel m, channel j:

      out[m, j] = relu( (sum_b sum_c relu(branch_b[m, c]) * W[j, b*CB + c] + pool_bias[n(m), j]) * scale[j]
                        + shift[j] )

  The K loop walks the four branch buffers in turn (ReLU applied on load), so the 4*CB-channel concat is
  never written; the image-pooling branch enters as a per-image bias vector and the projection's BN and ReLU
  are the epilogue.
- ``aspp_sum_kernel`` (DeepLab v2, Chen et al. 2016 sec. 3.3, ASPP-L/ASPP-S): out = b0 + b1 + b2 + b3 + bias in
  one pass.

Both run under ``TRITON_INTERPRET=1`` on CPU tensors (the tests do that on small shapes).
"""
import os

import triton
import triton.language as tl

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Tile candidates for the projection GEMM (M = pixels, N = output channels, K = branch channels per step); none
# spills registers on sm_90 (triton 3.6 and 3.9, offline compile checks). triton.autotune picks one per
# (M bucket, COUT, CB, dtypes) on the GPU; the interpreter takes its single config.
_PROJECT_CONFIGS = [
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 64}, num_warps=2, num_stages=4),
]
if _INTERPRET:
    _PROJECT_CONFIGS = [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16}, num_warps=1, num_stages=1)]


@triton.jit
def _pixel_offsets(rows, HW, W, s_n, s_h, s_w):
    """Memory offsets of output pixels ``rows`` (flattened n, h, w) in a tensor with strides s_n, s_h, s_w."""
    n = rows // HW
    hw = rows - n * HW
    h = hw // W
    w = hw - h * W
    return n.to(tl.int64) * s_n + h.to(tl.int64) * s_h + w.to(tl.int64) * s_w, n


@triton.jit
def _accumulate_branch(acc, b_ptr, row_off, row_mask, w_ptr, w_base, cols, col_mask, s_c, w_s_out, w_s_in, CB,
                       BLOCK_K: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """acc += relu(branch[rows, :CB]) @ W[cols, w_base : w_base + CB]^T."""
    ks = tl.arange(0, BLOCK_K)
    for k0 in range(0, CB, BLOCK_K):
        k = k0 + ks
        k_mask = k < CB
        a = tl.load(b_ptr + row_off[:, None] + k[None, :].to(tl.int64) * s_c,
                    mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        # The branch's ReLU, on load; NaN passes, as torch.relu. The cast back matters: triton 3.6's tl.maximum
        # promotes bf16 to float32, which would turn the dot into a TF32 one.
        a = tl.maximum(a, tl.zeros_like(a), propagate_nan=tl.PropagateNan.ALL).to(b_ptr.dtype.element_ty)
        b = tl.load(w_ptr + (w_base + k)[:, None].to(tl.int64) * w_s_in + cols[None, :].to(tl.int64) * w_s_out,
                    mask=k_mask[:, None] & col_mask[None, :], other=0.0)
        acc = tl.dot(a, b.to(b_ptr.dtype.element_ty), acc, input_precision=INPUT_PRECISION)
    return acc


@triton.autotune(configs=_PROJECT_CONFIGS, key=["M_BUCKET", "COUT", "CB"])
@triton.jit
def aspp_project_kernel(
    b0_ptr, b1_ptr, b2_ptr, b3_ptr,     # the four spatial branches, [N, CB, H, W], pre-activation, shared strides
    w_ptr,                              # projection weight [COUT, >= 4 CB] (its first 4 CB input columns)
    pool_ptr,                           # [N, COUT] float32: the image-pooling branch through its weight slice
    scale_ptr, shift_ptr,               # [COUT] float32: the projection BN, folded
    out_ptr,                            # [N, COUT, H, W]
    M, HW, W, COUT, CB,
    M_BUCKET,                           # M's bit length: the autotune key (a new image size re-tunes only per 2x)
    s_n, s_c, s_h, s_w,                 # branch strides (elements)
    w_s_out, w_s_in,                    # weight strides
    o_n, o_c, o_h, o_w,                 # output strides
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < M
    col_mask = cols < COUT
    row_off, img = _pixel_offsets(rows, HW, W, s_n, s_h, s_w)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc = _accumulate_branch(acc, b0_ptr, row_off, row_mask, w_ptr, 0 * CB, cols, col_mask, s_c, w_s_out, w_s_in,
                             CB, BLOCK_K, INPUT_PRECISION)
    acc = _accumulate_branch(acc, b1_ptr, row_off, row_mask, w_ptr, 1 * CB, cols, col_mask, s_c, w_s_out, w_s_in,
                             CB, BLOCK_K, INPUT_PRECISION)
    acc = _accumulate_branch(acc, b2_ptr, row_off, row_mask, w_ptr, 2 * CB, cols, col_mask, s_c, w_s_out, w_s_in,
                             CB, BLOCK_K, INPUT_PRECISION)
    acc = _accumulate_branch(acc, b3_ptr, row_off, row_mask, w_ptr, 3 * CB, cols, col_mask, s_c, w_s_out, w_s_in,
                             CB, BLOCK_K, INPUT_PRECISION)

    # Epilogue: the image-pooling branch (per image), the projection BN, ReLU.
    mask = row_mask[:, None] & col_mask[None, :]
    pool = tl.load(pool_ptr + img[:, None].to(tl.int64) * COUT + cols[None, :], mask=mask, other=0.0)
    scale = tl.load(scale_ptr + cols, mask=col_mask, other=0.0)
    shift = tl.load(shift_ptr + cols, mask=col_mask, other=0.0)
    y = (acc + pool) * scale[None, :] + shift[None, :]
    y = tl.maximum(y, tl.zeros_like(y), propagate_nan=tl.PropagateNan.ALL)
    out_off, _ = _pixel_offsets(rows, HW, W, o_n, o_h, o_w)
    tl.store(out_ptr + out_off[:, None] + cols[None, :].to(tl.int64) * o_c, y.to(out_ptr.dtype.element_ty),
             mask=mask)


@triton.jit
def aspp_sum_kernel(
    b0_ptr, b1_ptr, b2_ptr, b3_ptr,     # the four branches [N, C, H, W], shared strides
    bias_ptr,                           # [C] float32: the sum of the branch biases
    out_ptr,                            # [N, C, H, W]
    TOTAL, C, HW, W,
    s_n, s_c, s_h, s_w,                 # branch strides
    o_n, o_c, o_h, o_w,                 # output strides
    BLOCK: tl.constexpr,
):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = i < TOTAL
    # Logical index in (n, h, w, c) order, so that channels_last tensors are read contiguously.
    c = i % C
    pix = i // C
    n = pix // HW
    hw = pix - n * HW
    h = hw // W
    w = hw - h * W
    off = n * s_n + h * s_h + w * s_w + c * s_c
    acc = tl.load(bias_ptr + c, mask=mask, other=0.0)
    acc += tl.load(b0_ptr + off, mask=mask, other=0.0).to(tl.float32)
    acc += tl.load(b1_ptr + off, mask=mask, other=0.0).to(tl.float32)
    acc += tl.load(b2_ptr + off, mask=mask, other=0.0).to(tl.float32)
    acc += tl.load(b3_ptr + off, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + n * o_n + h * o_h + w * o_w + c * o_c, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def aspp_sum_flat_kernel(
    b0_ptr, b1_ptr, b2_ptr, b3_ptr,     # four dense branches with the output's strides (NCHW or channels_last)
    bias_ptr,                           # [C] float32
    out_ptr,
    TOTAL, C, s_c,                      # elements, channels, the channel stride
    BLOCK: tl.constexpr, INDEX_64: tl.constexpr,
):
    """The dense fast path of aspp_sum: storage offset i is the same element in every tensor, and its channel
    is (i // s_c) % C in either dense layout; 32-bit index maths unless the tensors need 64."""
    if INDEX_64:
        i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    else:
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = i < TOTAL
    c = (i // s_c) % C
    acc = tl.load(bias_ptr + c, mask=mask, other=0.0)
    acc += tl.load(b0_ptr + i, mask=mask, other=0.0).to(tl.float32)
    acc += tl.load(b1_ptr + i, mask=mask, other=0.0).to(tl.float32)
    acc += tl.load(b2_ptr + i, mask=mask, other=0.0).to(tl.float32)
    acc += tl.load(b3_ptr + i, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + i, acc.to(out_ptr.dtype.element_ty), mask=mask)
