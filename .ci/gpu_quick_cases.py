"""Small GPU cases for .ci/gpu_quick.sh (a script, not collected by pytest).

    python .ci/gpu_quick_cases.py small [--ops crf,conv,aspp] [--graph on|off]
        one small case per op on CUDA (the samples of tests/samples.py), each compared with the CPU op or the
        plain-torch reference; prints OK. Made to run under compute-sanitizer (memcheck with
        PYTORCH_NO_CUDA_MEMORY_CACHING=1; racecheck):
          crf   dense_crf 1x21x37x29, 3 iterations, default kernels (max |dQ| <= 1e-4 against the CPU op), and the
                backward of 1x21x11x13 with a matrix and a Potts compatibility (1e-3 relative)
          conv  atrous_conv2d, bf16 channels_last, N1 C16 17x17 K24, rate 18, padding 18 (every tap region),
                tap skipping on (relative error <= 2e-2 against float64)
          aspp  ASPP(64, (2, 4, 6), 32) eval, bf16 channels_last 1x64x9x9, the fused path (Triton) against the
                module's plain-torch path in float32 (relative error <= 3e-2)
    python .ci/gpu_quick_cases.py profile
        DEEPLAB_FAST_PROFILE=1 per-stage split (CUDA events, printed by the op to stderr) of dense_crf,
        10 iterations, 21 labels: 500x375 with the default and the DeepLab-v2 kernels, and a batch of 16 at
        512x512 (default kernels), each after a warm-up call; prints each call's CUDA-event time too.

Exit status: 0 OK, 1 a mismatch or error, 2 no CUDA or a build without CUDA kernels.
"""
import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("DEEPLAB_FAST_POISON", "1")  # outputs start as NaN (read once, at the first op call)
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # samples.py

import torch  # noqa: E402

from samples import DEEPLAB_V2_KERNELS, DEFAULT_KERNELS, INPUTS, crf_problem, on_device, reference  # noqa: E402

KERNEL_SETS = {"default": DEFAULT_KERNELS, "deeplab_v2": DEEPLAB_V2_KERNELS}


def log(msg: str) -> None:
    print(msg, flush=True)


def sample(op: str, name: str, device: str = "cuda", requires_grad: bool = False):
    return next(s for s in INPUTS[op](device, requires_grad) if s.name == name)


def case_crf(gen) -> bool:
    op = torch.ops.deeplab_fast.dense_crf
    s = sample("dense_crf", "1x21x37x29_default")
    got = op(*s.args).cpu()
    ref = reference("dense_crf", s)
    finite = bool(torch.isfinite(got).all())
    diff = (got - ref).abs().max().item() if finite else float("nan")
    ok = finite and diff <= 1e-4
    graph = os.environ.get("DEEPLAB_FAST_CUDA_GRAPH", "1")
    log(f"{'ok  ' if ok else 'FAIL'} crf: dense_crf {s.name} it=3, graph {graph}: max |dQ| {diff:.3g}")
    # The backward (kept history, a matrix and a Potts compatibility) against the CPU op's.
    grads = {}
    for device in ("cuda", "cpu"):
        s = sample("dense_crf", "1x21x11x13_matrix_potts", device, requires_grad=True)
        q = op(*s.args)
        weights = torch.arange(q.shape[1], dtype=torch.float32, device=q.device).view(1, -1, 1, 1)
        (q * weights).sum().backward()
        grads[device] = [s.args[i].grad.cpu() for i in (0, 4, 7)]
    rel = max(((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()
              for a, b in zip(grads["cuda"], grads["cpu"]))
    finite = all(bool(torch.isfinite(g).all()) for g in grads["cuda"])
    ok_grad = finite and rel <= 1e-3
    log(f"{'ok  ' if ok_grad else 'FAIL'} crf: backward {s.name} it=3 (matrix + Potts): max relative "
        f"difference to the CPU op {rel:.3g}")
    return ok and ok_grad


def case_conv(gen) -> bool:
    from deeplab_fast.ops import atrous_conv2d_plan, tap_skipping

    s = sample("atrous_conv2d", "cutlass_bf16_rate18_every_region")
    ref = reference("atrous_conv2d", s)
    with tap_skipping(True):
        plan = atrous_conv2d_plan(*s.args)
        y = torch.ops.deeplab_fast.atrous_conv2d(*s.args)
    torch.cuda.synchronize()
    finite = bool(torch.isfinite(y).all())
    err = ((y.double().cpu() - ref).abs().max() / ref.abs().max().clamp_min(1e-6)).item() if finite else float("nan")
    ok = finite and err <= s.tol and plan["path"] == "cutlass"
    log(f"{'ok  ' if ok else 'FAIL'} conv: atrous_conv2d {s.name}, path {plan['path']}: rel err {err:.3g}")
    return ok


def case_aspp(gen) -> bool:
    from deeplab_fast.nn import ASPP

    torch.manual_seed(0)
    head = ASPP(64, (2, 4, 6), 32, dropout=0.0)
    for m in head.modules():  # non-trivial BN statistics, so the fold is exercised
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    head = head.eval().cuda()
    x = torch.randn(1, 64, 9, 9, generator=gen).cuda()
    with torch.no_grad():
        ref = head.reference_forward(x)  # float32, plain torch
        xb = x.to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
        y = head.to(torch.bfloat16).fused_forward(xb).float()
    torch.cuda.synchronize()
    finite = bool(torch.isfinite(y).all())
    err = ((y - ref).abs().max() / ref.abs().max().clamp_min(1e-6)).item() if finite else float("nan")
    ok = finite and err <= 3e-2
    log(f"{'ok  ' if ok else 'FAIL'} aspp: ASPP(64, (2, 4, 6), 32) fused bf16 1x64x9x9: rel err {err:.3g}")
    return ok


CASES = {"crf": case_crf, "conv": case_conv, "aspp": case_aspp}
KERNELS = {"crf": "dense_crf", "conv": "atrous_conv2d"}


def small(ops, graph) -> int:
    os.environ["DEEPLAB_FAST_CUDA_GRAPH"] = "1" if graph == "on" else "0"  # read per call
    import deeplab_fast  # noqa: F401  (loads the ops)

    bad = []
    for op in ops:
        if op in KERNELS and not torch._C._dispatch_has_kernel_for_dispatch_key(f"deeplab_fast::{KERNELS[op]}",
                                                                                 "CUDA"):
            log(f"error: deeplab_fast::{KERNELS[op]} has no CUDA kernel (a CPU-only build)")
            return 2
        try:
            ok = CASES[op](torch.Generator().manual_seed(0))
        except Exception as e:  # noqa: BLE001  (report and go on to the next op)
            log(f"FAIL {op}: {type(e).__name__}: {e}")
            ok = False
        if not ok:
            bad.append(op)
    torch.cuda.synchronize()
    log("OK" if not bad else f"FAILED: {', '.join(bad)}")
    return 1 if bad else 0


def profile() -> int:
    import deeplab_fast  # noqa: F401
    from deeplab_fast.ops import dense_crf

    bad = 0
    for seed, (B, H, W, name) in enumerate([(1, 375, 500, "default"), (1, 375, 500, "deeplab_v2"),
                                            (16, 512, 512, "default")]):
        unary, image = (on_device(t, "cuda") for t in crf_problem(seed, B, 21, H, W))
        gs, gc, bs, bsrgb, bc = KERNEL_SETS[name]
        kernels = dict(gaussian_sxy=gs, gaussian_compat=gc, bilateral_sxy=bs, bilateral_srgb=bsrgb,
                       bilateral_compat=bc)
        os.environ["DEEPLAB_FAST_PROFILE"] = "0"
        dense_crf(unary, image, iterations=10, **kernels)  # warm-up (and the graph-on result)
        torch.cuda.synchronize()
        log(f"--- DEEPLAB_FAST_PROFILE=1: dense_crf {B}x21x{H}x{W}, 10 iterations, {name} kernels")
        sys.stderr.flush()
        os.environ["DEEPLAB_FAST_PROFILE"] = "1"
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        q = dense_crf(unary, image, iterations=10, **kernels)
        end.record()
        end.synchronize()
        sys.stderr.flush()
        ok = bool(torch.isfinite(q).all())
        bad += not ok
        log(f"    the profiled call: {start.elapsed_time(end):.3f} ms (CUDA events, profiling on, graph off)"
            f"{'' if ok else ', NON-FINITE OUTPUT'}")
    os.environ["DEEPLAB_FAST_PROFILE"] = "0"
    return 1 if bad else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("small", help="one small case per op (for compute-sanitizer)")
    p.add_argument("--ops", default="crf,conv,aspp", help="comma-separated: crf, conv, aspp")
    p.add_argument("--graph", choices=["on", "off"], default="on", help="the CRF's CUDA graph")
    sub.add_parser("profile", help="DEEPLAB_FAST_PROFILE=1 per-stage split of the headline CRF cases")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        log("error: CUDA is not available")
        return 2
    log(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}")
    if args.cmd == "small":
        ops = [o for o in args.ops.split(",") if o]
        unknown = [o for o in ops if o not in CASES]
        if unknown:
            parser.error(f"unknown op(s) {unknown}; choose from {sorted(CASES)}")
        return small(ops, args.graph)
    return profile()


if __name__ == "__main__":
    sys.exit(main())
