"""A small run of the CUDA atrous convolution for compute-sanitizer (a script, not collected by pytest).

    compute-sanitizer --tool memcheck  --error-exitcode 1 python tests/cuda/sanitize_atrous_conv.py
    compute-sanitizer --tool racecheck --error-exitcode 1 python tests/cuda/sanitize_atrous_conv.py

It runs deeplab_fast::atrous_conv2d on CUDA on the CUTLASS samples of tests/samples.py (channels_last bf16 / fp16 /
fp32-TF32: rate 18 at 17x17 with padding 18, every region; stride 2; a spatial crop of a larger channels_last
tensor; a region with no in-bounds tap) with tap skipping on and off, checks each plan says "cutlass", compares
each result with the float64 CPU reference (the sample's relative tolerance: 2e-2 for 16-bit, 5e-3 for TF32;
finite) and prints OK. Exit status: 0 OK, 1 a mismatch, 2 no CUDA or no CUDA kernel.
DEEPLAB_FAST_POISON defaults to 1 (outputs start as NaN). Use PYTORCH_NO_CUDA_MEMORY_CACHING=1 with memcheck.
"""
import os
import sys
from pathlib import Path

os.environ.setdefault("DEEPLAB_FAST_POISON", "1")  # read once, at the first op call
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: samples.py

import torch  # noqa: E402

import deeplab_fast  # noqa: E402,F401
from deeplab_fast.ops import atrous_conv2d_plan, tap_skipping  # noqa: E402
from samples import atrous_conv2d_inputs, reference  # noqa: E402


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA device")
        return 2
    if not torch._C._dispatch_has_kernel_for_dispatch_key("deeplab_fast::atrous_conv2d", "CUDA"):
        print("deeplab_fast::atrous_conv2d has no CUDA kernel (CPU-only build)")
        return 2
    torch.backends.cudnn.allow_tf32 = True
    bad = 0
    for sample in atrous_conv2d_inputs("cuda"):
        if not sample.cutlass:
            continue
        ref = reference("atrous_conv2d", sample)
        for skip in (False, True):
            with tap_skipping(skip):
                plan = atrous_conv2d_plan(*sample.args)
                y = torch.ops.deeplab_fast.atrous_conv2d(*sample.args)
            torch.cuda.synchronize()
            err = ((y.double().cpu() - ref).abs().max() / ref.abs().max().clamp_min(1e-6)).item()
            ok = plan["path"] == "cutlass" and bool(torch.isfinite(y).all()) and err <= sample.tol
            print(f"{'ok ' if ok else 'BAD'} {sample.name} skip={skip}: path {plan['path']}, tile {plan.get('tile')}, "
                  f"rel err {err:.2e}")
            bad += not ok
    print("OK" if bad == 0 else f"FAIL: {bad} mismatches")
    return 0 if bad == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
