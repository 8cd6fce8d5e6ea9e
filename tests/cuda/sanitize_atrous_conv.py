"""A small run of the CUDA atrous convolution for compute-sanitizer (a script, not collected by pytest).

    compute-sanitizer --tool memcheck  --error-exitcode 1 python tests/cuda/sanitize_atrous_conv.py
    compute-sanitizer --tool racecheck --error-exitcode 1 python tests/cuda/sanitize_atrous_conv.py

It runs deeplab_fast.ops.atrous_conv2d on CUDA (CUTLASS path: channels_last bf16 / fp16 / fp32-TF32) for a few
small shapes with tap skipping on and off (rate 18 at 17x17 with padding 18: every region; stride 2; a spatial
crop of a larger channels_last tensor; a region with no in-bounds tap), checks each plan says "cutlass", compares
each result with the float64 CPU reference (relative max error <= 2e-2 for 16-bit, 5e-3 for TF32, finite) and
prints OK. Exit status: 0 OK, 1 a mismatch, 2 no CUDA or no CUDA kernel.
DEEPLAB_FAST_POISON defaults to 1 (outputs start as NaN). Use PYTORCH_NO_CUDA_MEMORY_CACHING=1 with memcheck.
"""
import os
import sys

os.environ.setdefault("DEEPLAB_FAST_POISON", "1")  # read once, at the first op call

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import deeplab_fast  # noqa: E402,F401
from deeplab_fast.ops import atrous_conv2d, atrous_conv2d_plan, tap_skipping  # noqa: E402

# (N, C, H, W, K, kernel, stride, padding, dilation, crop)
CASES = [
    (1, 16, 17, 17, 24, 3, 1, 18, 18, False),
    (2, 32, 20, 13, 16, 3, 2, 4, 4, False),
    (1, 8, 12, 12, 8, 3, 1, 2, 2, True),
    (1, 8, 4, 4, 8, 3, 1, 7, 5, False),
]


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA device")
        return 2
    if not torch._C._dispatch_has_kernel_for_dispatch_key("deeplab_fast::atrous_conv2d", "CUDA"):
        print("deeplab_fast::atrous_conv2d has no CUDA kernel (CPU-only build)")
        return 2
    torch.backends.cudnn.allow_tf32 = True
    g = torch.Generator().manual_seed(0)
    bad = 0
    for dtype, tol in ((torch.bfloat16, 2e-2), (torch.float16, 2e-2), (torch.float32, 5e-3)):
        for n, c, h, w, k, ks, s, p, d, crop in CASES:
            x64 = torch.randn(n, c, h + 4 * crop, w + 4 * crop, generator=g, dtype=torch.float64)
            w64 = torch.randn(k, c, ks, ks, generator=g, dtype=torch.float64) / (c * ks * ks) ** 0.5
            b64 = torch.randn(k, generator=g, dtype=torch.float64)
            x = x64.to(dtype).cuda().contiguous(memory_format=torch.channels_last)
            if crop:
                x, x64 = x[:, :, 2:2 + h, 1:1 + w], x64[:, :, 2:2 + h, 1:1 + w]
            wt, bt = w64.to(dtype).cuda(), b64.to(dtype).cuda()
            ref = F.relu(F.conv2d(x.double().cpu(), wt.double().cpu(), bt.double().cpu(), s, p, d))
            for skip in (False, True):
                with tap_skipping(skip):
                    plan = atrous_conv2d_plan(x, wt, bt, None, s, p, d, True)
                    y = atrous_conv2d(x, wt, bt, None, s, p, d, relu=True)
                torch.cuda.synchronize()
                err = ((y.double().cpu() - ref).abs().max() / ref.abs().max().clamp_min(1e-6)).item()
                ok = plan["path"] == "cutlass" and bool(torch.isfinite(y).all()) and err <= tol
                print(f"{'ok ' if ok else 'BAD'} {dtype} N{n} C{c} {h}x{w} K{k} s{s} p{p} d{d} crop={crop} "
                      f"skip={skip}: path {plan['path']}, tile {plan.get('tile')}, rel err {err:.2e}")
                bad += not ok
    print("OK" if bad == 0 else f"FAIL: {bad} mismatches")
    return 0 if bad == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
