"""Fused atrous convolution (+ folded BN) + ReLU: deeplab_fast.ops.atrous_conv2d vs PyTorch's own paths, side by side.

GPU cases (``-k "cuda or gpu"``; they skip without CUDA). DeepLab's 3x3 atrous layers, stride 1, padding =
dilation (the output keeps the input's size), bias and ReLU, bfloat16, channels_last, batch 1 and 16:
- v1 fc6: 512->1024, rate 12 at 65x65;
- v2 ASPP branches: 2048->1024 and 2048->21, rates 6/12/18/24 at 65x65 (2048->21: K = 21 is not a multiple of
  8, so our op falls back to ATen (cuDNN) + its epilogue; the row's name and its plan say so);
- v3 ASPP: 2048->256, rates 6/12/18 at 33x33 (output stride 16) and 12/24/36 at 65x65 (output stride 8);
- ResNet layer4 3x3: 512->512, rates 2 and 4 at 65x65;
- VGG conv5 (v1 / LargeFOV): 512->512, rate 2 at 65x65 (the same shape as layer4's rate 2; the targets count a
  shape once).
Each layer is an ``nn.Sequential(nn.Conv2d(bias=True), nn.BatchNorm2d (eval, random running statistics),
nn.ReLU())``. Peers, timed in the same run on the same input, all computing the same function:
(a) ``F.relu(F.conv2d(x, w, b, 1, d, d))`` with ``torch.backends.cudnn.benchmark = True``;
(b) ``torch.cudnn_convolution_relu(x, w, b, stride, padding, dilation, groups)``;
(c) ``torch.compile(mode="max-autotune")`` of the unfolded conv + BN + ReLU module (``DEEPLAB_FAST_BENCH_NO_COMPILE=1``
    skips it: max-autotune compiles each shape for a minute or more; a compile error skips the row, with the
    error as the reason, and the rest of the file goes on).
(a) and (b) get the BN folded into ``w`` and ``b``, as ours does: ours is ``AtrousConv2dReLU.from_modules(conv,
bn, relu)``, whose folded weight and bias (bf16) (a) and (b) use too; each of its rows calls
``atrous_conv2d(x, weight, bias, relu=True)`` with them (the module's forward does exactly that; the module is
checked once too). cudnn.benchmark is on for every GPU row, so our ATen fallback gets it as well.

Correctness first: every row's output (peers and ours, the compiled one after its CUDA graph replays) is
checked against a float64 reference of the same module on the same input (stricter than float32, and free of
TF32): max |y - ref| / max |ref| <= 2e-2. Timing (conftest's ``time_gpu_row``): as in test_crf_fps.py, each call between two CUDA events on
the current stream and synchronised, after warm-up calls (cuDNN's benchmark search, the compile, the CUDA
graph), so the time includes the host's launch work as a caller waiting for the result sees it; there is no L2
flush between calls, for any row. The number of timed calls is chosen for about 0.3 s per row (20 to 200). Each
row also keeps the median of the same number of calls queued back to back without a synchronisation between
them (``queued_median_ms``: GPU time, the host's launch cost hidden), as triton's do_bench measures.

Each GPU row records: TFLOP/s counting 2 N K P Q C R S FLOPs (all 9 taps, whether or not they land on the
padding) and "useful" TFLOP/s counting only the in-bounds taps (times ``kept_fraction`` from
``atrous_conv2d_plan``); the fraction of the dense bf16 tensor-core peak (``BF16_DENSE_PEAK_TFLOPS``; None for a
GPU not in it) for both; ours also its plan (path, tile, tap skipping); every row its ratio to the best peer
(``vs_best_peer``, best peer median / row median). The table's "x median" column is against peer (a), the
group's first row, as conftest.py prints it.

Targets (the issue; GPU rows, each distinct shape once; ratio = best peer's median / ours):
- geometric mean over the shapes >= 1.15;
- >= 2x at rates >= 18 at 33x33 (v3 ASPP rate 18, batch 1 and 16);
- no shape below 0.95x.
``test_cuda_atrous_conv_targets`` (run last) prints them and stores them as three result groups ("gpu atrous
targets: ..."), each a best-peer row and an ours row whose times are the geometric means (the first) or the
worst shape's (the others), so the table's ratio is the figure, and the figures, thresholds and per-shape
ratios go to the JSON rows' "extra". Benchmarks report: the targets are not asserted; correctness is.

CPU cases (they run anywhere; ``--benchmark-disable`` makes each one call): float32, batch 1, channels_last,
reduced DeepLab layers at 33x33 (v3 ASPP 2048->256 rate 18; conv5-like 512->512 rate 2; fc6-like 512->1024
rate 12), with bias and ReLU: ours vs ``F.relu(F.conv2d(...))`` on the same input, both checked against a
float64 reference (max |y - ref| / max |ref| <= 1e-4) and timed by pytest-benchmark (wall clock, 9 calls after
2 warm-ups). The CPU path is ATen's convolution (oneDNN, adding the bias) and an in-place ReLU: expect about 1.0x.
"""
import copy
import math
import re
import statistics

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import deeplab_fast  # noqa: F401
from deeplab_fast.nn import AtrousConv2dReLU
from deeplab_fast.ops import atrous_conv2d, atrous_conv2d_plan

from conftest import (PEER_SKIPS, RESULTS, geomean, gpu_description, gpu_name, max_autotune_peer, needs_cuda,
                      no_compile, one_gpu_case, randomise_bn_, record, rel_err, require_cuda_kernels, skip_peer,
                      summary_row, time_gpu_row)

BF16_TOL = 2e-2
FP32_TOL = 1e-4

# Dense (no sparsity) bf16 tensor-core peak in TFLOP/s, from NVIDIA's data sheets; matched in order against
# torch.cuda.get_device_name (e.g. "NVIDIA H100 80GB HBM3" is the SXM part).
BF16_DENSE_PEAK_TFLOPS = [
    (r"H200", 989.0),
    (r"H100.*PCIe", 756.0),
    (r"H100.*NVL", 835.0),
    (r"H100", 989.0),  # SXM (HBM3)
    (r"A100", 312.0),
]


def bf16_peak_tflops(name: str):
    for pattern, peak in BF16_DENSE_PEAK_TFLOPS:
        if re.search(pattern, name):
            return peak
    return None


def conv_flops(N, C, K, P, Q, R=3, S=3) -> int:
    """2 N K P Q C R S: every tap's multiply-accumulate, padding taps included."""
    return 2 * N * K * P * Q * C * R * S


def kept_fraction(H: int, W: int, dilation: int, padding: int, stride: int = 1) -> float:
    """Share of the multiply-accumulates whose tap lands inside the image (a 3x3 filter). It depends on the
    geometry only, so the plan of a small CPU tensor of the same size gives it for any device and channel
    count."""
    x = torch.zeros(1, 8, H, W).contiguous(memory_format=torch.channels_last)
    w = torch.zeros(8, 8, 3, 3)
    return float(atrous_conv2d_plan(x, w, None, None, stride, padding, dilation, True)["kept_fraction"])


# ----------------------------------------------------------------------------------------------------------
# GPU cases

# (layer, C, K, rates, H = W)
GPU_LAYERS = [
    ("v1-fc6", 512, 1024, (12,), 65),
    ("v2-aspp", 2048, 1024, (6, 12, 18, 24), 65),
    ("v2-aspp", 2048, 21, (6, 12, 18, 24), 65),
    ("v3-aspp", 2048, 256, (6, 12, 18), 33),
    ("v3-aspp", 2048, 256, (12, 24, 36), 65),
    ("layer4", 512, 512, (2, 4), 65),
    ("conv5", 512, 512, (2,), 65),
]
GPU_BATCHES = (1, 16)
GPU_CASES = {
    f"{layer}-{C}-{K}-d{d}-{H}x{H}-n{N}": dict(layer=layer, C=C, K=K, dilation=d, H=H, W=H, N=N)
    for N in GPU_BATCHES for layer, C, K, rates, H in GPU_LAYERS for d in rates
}
PEER_CUDNN = "F.conv2d+F.relu (cudnn.bench)"
PEER_CUDNN_RELU = "torch.cudnn_convolution_relu"
PEER_COMPILE = "torch.compile max-autotune"
OURS = "ours"
GPU_IMPLS = (PEER_CUDNN, PEER_CUDNN_RELU, PEER_COMPILE, OURS)
GPU_IMPL_IDS = {PEER_CUDNN: "cudnn", PEER_CUDNN_RELU: "cudnn_relu", PEER_COMPILE: "compile", OURS: "deeplab_fast"}
GPU_GROUP_PREFIX = "gpu atrous "
TARGETS_PREFIX = "gpu atrous targets: "
GPU_WARMUP_ROUNDS = 5
GPU_ROW_SECONDS = 0.3


def gpu_group(case: str) -> str:
    c = GPU_CASES[case]
    return f"{GPU_GROUP_PREFIX}{c['layer']} {c['C']}->{c['K']} d{c['dilation']} {c['H']}x{c['W']} N={c['N']}"


_gpu_cache: dict = {}


def gpu_problem(case: str) -> dict:
    """The case's module, folded module, input and float64 reference output, on the GPU (one case kept at a
    time: the rows of a case run one after another)."""
    return one_gpu_case(_gpu_cache, case, lambda: _build_gpu_problem(case))


def _build_gpu_problem(case: str) -> dict:
    c = GPU_CASES[case]
    N, C, K, d, H, W = c["N"], c["C"], c["K"], c["dilation"], c["H"], c["W"]
    seed = sum(map(ord, case))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        conv = nn.Conv2d(C, K, 3, stride=1, padding=d, dilation=d, bias=True)
        bn = randomise_bn_(nn.BatchNorm2d(K), torch.Generator().manual_seed(seed))
    seq = nn.Sequential(conv, bn, nn.ReLU()).eval().requires_grad_(False)
    seq = seq.to(device="cuda", dtype=torch.bfloat16, memory_format=torch.channels_last)
    fused = AtrousConv2dReLU.from_modules(seq[0], seq[1], seq[2]).requires_grad_(False)
    assert fused.bn is None, "from_modules should fold an eval-mode BatchNorm"
    weight = fused.weight.detach().contiguous(memory_format=torch.channels_last)
    bias = fused.bias.detach().contiguous()
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(N, C, H, W, device="cuda", generator=g).to(torch.bfloat16)
    x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        ref = copy.deepcopy(seq).to(torch.float64)(x.to(torch.float64))
    return dict(c, case=case, seq=seq, fused=fused, weight=weight, bias=bias, x=x, ref=ref,
                            P=ref.shape[2], Q=ref.shape[3])


def gpu_call(impl: str, p: dict):
    """(fn, info) for one implementation on the case's input. Raises pytest.skip for a peer that cannot run."""
    x, w, b, d = p["x"], p["weight"], p["bias"], p["dilation"]
    info = {}
    if impl == PEER_CUDNN:
        return (lambda: F.relu(F.conv2d(x, w, b, 1, d, d))), info
    if impl == PEER_CUDNN_RELU:
        return (lambda: torch.cudnn_convolution_relu(x, w, b, [1, 1], [d, d], [d, d], 1)), info
    if impl == PEER_COMPILE:
        if no_compile():
            _skip_peer(p, impl, "DEEPLAB_FAST_BENCH_NO_COMPILE is set")
        try:
            fn, info["compile_s"] = max_autotune_peer(p["seq"], x)
        except Exception as e:  # noqa: BLE001 - any compile failure skips this row only
            _skip_peer(p, impl, f"torch.compile failed: {type(e).__name__}: {str(e)[:300]}")
        return fn, info
    return (lambda: atrous_conv2d(x, w, b, None, 1, d, d, True)), info


def _skip_peer(p: dict, impl: str, reason: str):
    skip_peer(gpu_group(p["case"]), impl, reason)


def best_peer(group: str):
    """(impl, row) of the group's fastest timed peer, or (None, None)."""
    peers = [(k, v) for k, v in RESULTS.get(group, {}).items()
             if not k.startswith("deeplab_fast") and v["median_s"]]
    return min(peers, key=lambda kv: kv[1]["median_s"]) if peers else (None, None)


def rate_info(p: dict, median_s, kept: float) -> dict:
    flops = conv_flops(p["N"], p["C"], p["K"], p["P"], p["Q"])
    peak = bf16_peak_tflops(gpu_name())
    info = dict(flops_all_taps=flops, kept_fraction=kept, peak_bf16_dense_tflops=peak, gpu_name=gpu_name(),
                flops_note="TFLOP/s counts all 9 taps (2 N K P Q C R S); useful_tflops only the in-bounds taps")
    if median_s:
        tflops = flops / median_s / 1e12
        info.update(tflops=tflops, useful_tflops=tflops * kept,
                    roofline_fraction=peak and tflops / peak, useful_roofline_fraction=peak and tflops * kept / peak)
    return info


@needs_cuda
@pytest.mark.parametrize("case,impl", [pytest.param(case, impl, id=f"cuda-{case}-{GPU_IMPL_IDS[impl]}")
                                       for case in GPU_CASES for impl in GPU_IMPLS])
def test_cuda_atrous_conv(benchmark, cudnn_benchmark, case, impl):
    if impl == OURS:
        require_cuda_kernels("atrous_conv2d")
    p = gpu_problem(case)
    group = gpu_group(case)
    with torch.no_grad():
        fn, info = gpu_call(impl, p)
        # Correctness before timing (the first call is also a warm-up); the compiled peer after 3 more calls,
        # so that its CUDA graph is recorded and replayed.
        try:
            y = fn()
            if impl == PEER_COMPILE:
                for _ in range(3):
                    y = fn()
        except Exception as e:  # noqa: BLE001 - a peer that cannot run skips its row only
            if impl in (PEER_CUDNN_RELU, PEER_COMPILE):
                _skip_peer(p, impl, f"failed: {type(e).__name__}: {str(e)[:300]}")
            raise
        err = rel_err(y, p["ref"])
        assert y.shape == p["ref"].shape and y.dtype == torch.bfloat16
        assert err <= BF16_TOL, f"{group} / {impl}: max |y - ref| / max |ref| = {err:.3g} > {BF16_TOL}"
        info.update(rel_err=err, checked_against="float64 reference of the same module, same input")
        del y
        if impl == OURS:
            err_module = rel_err(p["fused"](p["x"]), p["ref"])
            assert err_module <= BF16_TOL, f"{group}: AtrousConv2dReLU.from_modules: {err_module:.3g}"
            info["rel_err_module"] = err_module
            plan = atrous_conv2d_plan(p["x"], p["weight"], p["bias"], None, 1, p["dilation"], p["dilation"], True)
            info["plan"] = {k: plan.get(k) for k in ("path", "tile", "tap_skipping", "kept_fraction", "reason",
                                                     "split_k")}
            label = plan["path"] + ("+skip" if plan["tap_skipping"] else "")
            impl_name = f"deeplab_fast (CUDA {label})"
        else:
            impl_name = impl
        times, queued = time_gpu_row(benchmark, fn, GPU_WARMUP_ROUNDS, GPU_ROW_SECONDS)
        info.update(queued)
    median = statistics.median(times) if times else None
    kept = info["plan"]["kept_fraction"] if impl == OURS else kept_fraction(p["H"], p["W"], p["dilation"],
                                                                              p["dilation"])
    info.update(rate_info(p, median, kept), layer=p["layer"], C=p["C"], K=p["K"], H=p["H"], W=p["W"], N=p["N"],
                dilation=p["dilation"], dtype="bfloat16", layout="channels_last", cudnn_benchmark=True)
    if impl == OURS:
        peer_name, peer = best_peer(group)
        info.update(best_peer=peer_name, vs_best_peer=median and peer and peer["median_s"] / median,
                    peers_skipped=PEER_SKIPS.get(group, {}))
    record(benchmark, group, impl_name, threads=None, device=gpu_description(), backend="cuda", times_s=times,
           batch=p["N"], **info)


@needs_cuda
def test_cuda_atrous_conv_targets(capsys):
    """The issue's targets over the GPU rows above (run last). Reports; does not assert them."""
    shapes, seen = [], set()
    for group, impls in RESULTS.items():
        if not group.startswith(GPU_GROUP_PREFIX) or group.startswith(TARGETS_PREFIX):
            continue
        ours_name, ours = next(((k, v) for k, v in impls.items() if k.startswith("deeplab_fast")), (None, None))
        peer_name, peer = best_peer(group)
        for v in impls.values():  # every row's ratio to the best peer
            if peer and v["median_s"]:
                v["extra"]["vs_best_peer"] = peer["median_s"] / v["median_s"]
                v["extra"]["best_peer"] = peer_name
        if not (ours and ours["median_s"] and peer):
            continue
        e = ours["extra"]
        key = (e["C"], e["K"], e["dilation"], e["H"], e["W"], e["N"])
        shapes.append(dict(group=group, ours=ours_name, ours_row=ours, peer=peer_name, peer_row=peer,
                           ratio=peer["median_s"] / ours["median_s"], duplicate=key in seen,
                           rate=e["dilation"], H=e["H"], W=e["W"], tflops=e.get("tflops"),
                           useful_tflops=e.get("useful_tflops"), roofline=e.get("roofline_fraction")))
        seen.add(key)
    with capsys.disabled():
        print()
        if not shapes:
            print("atrous_conv targets: no GPU row timed with its peers (--benchmark-disable, or -k left them out)")
            return
        distinct = [s for s in shapes if not s["duplicate"]]
        big_rates = [s for s in distinct if s["rate"] >= 18 and (s["H"], s["W"]) == (33, 33)]
        worst = min(distinct, key=lambda s: s["ratio"])
        gm = geomean(s["ratio"] for s in distinct)
        per_shape = [dict(group=s["group"], ours=s["ours"], best_peer=s["peer"], ratio=s["ratio"],
                          duplicate_shape=s["duplicate"]) for s in shapes]
        figures = dict(
            geomean=dict(value=gm, target=1.15, met=gm >= 1.15, shapes=len(distinct)),
            rate_ge_18_at_33x33=dict(value=big_rates and min(s["ratio"] for s in big_rates), target=2.0,
                                     met=bool(big_rates) and min(s["ratio"] for s in big_rates) >= 2.0,
                                     shapes=[s["group"] for s in big_rates]),
            worst_shape=dict(value=worst["ratio"], target=0.95, met=worst["ratio"] >= 0.95, shape=worst["group"]),
        )
        common = dict(targets=figures, per_shape=per_shape, ratio="best peer median / ours median",
                      note="summary of the GPU rows above; times are geometric means or the worst shape's")

        def gm_of(rows, field):
            return geomean(r[field] for r in rows)

        g = f"{TARGETS_PREFIX}geomean of {len(distinct)} shapes"
        summary_row(g, "best peer per shape (geomean)", gm_of([s["peer_row"] for s in distinct], "median_s"),
                     gm_of([s["peer_row"] for s in distinct], "min_s"), **common)
        summary_row(g, "deeplab_fast (CUDA, geomean)", gm_of([s["ours_row"] for s in distinct], "median_s"),
                     gm_of([s["ours_row"] for s in distinct], "min_s"), **common)
        singles = [("worst shape", worst)]
        if big_rates:
            singles.insert(0, ("rate>=18 at 33x33, worst", min(big_rates, key=lambda s: s["ratio"])))
        for title, s in singles:
            g = f"{TARGETS_PREFIX}{title}: {s['group'][len(GPU_GROUP_PREFIX):]}"
            summary_row(g, f"best peer: {s['peer']}", s["peer_row"]["median_s"], s["peer_row"]["min_s"], **common)
            summary_row(g, s["ours"], s["ours_row"]["median_s"], s["ours_row"]["min_s"], **common)

        def ok(f):
            return "ok" if f["met"] else "MISS"

        print(f"atrous_conv targets on {gpu_description()} (best peer median / ours median, each shape once):")
        print(f"  geometric mean over {len(distinct)} shapes: {gm:.3f}x (target >= 1.15: {ok(figures['geomean'])})")
        if big_rates:
            print(f"  rates >= 18 at 33x33: min {figures['rate_ge_18_at_33x33']['value']:.3f}x over "
                  f"{len(big_rates)} shapes (target >= 2: {ok(figures['rate_ge_18_at_33x33'])})")
        else:
            print("  rates >= 18 at 33x33: no such shape timed")
        print(f"  worst shape: {worst['ratio']:.3f}x, {worst['group']} (target >= 0.95: {ok(figures['worst_shape'])})")
        for s in shapes:
            tf = f"{s['tflops']:7.1f} TFLOP/s ({s['useful_tflops']:6.1f} useful)" if s["tflops"] else ""
            roof = f" {100 * s['roofline']:5.1f}% of peak" if s["roofline"] else ""
            dup = " (same shape as above)" if s["duplicate"] else ""
            print(f"  {s['group']:44s} {s['ours']:34s} {s['ratio']:6.3f}x vs {s['peer']:30s} {tf}{roof}{dup}")
        skips: dict = {}
        for group, skipped in PEER_SKIPS.items():
            for impl, reason in skipped.items():
                skips.setdefault((impl, reason), []).append(group)
        for (impl, reason), groups in skips.items():
            print(f"  {impl} skipped in {len(groups)} case(s) ({groups[0]}, ...): {reason}")


# ----------------------------------------------------------------------------------------------------------
# CPU cases: ours vs F.conv2d + F.relu, float32, batch 1, channels_last, reduced DeepLab layers

CPU_CASES = {
    "v3-aspp-2048-256-d18-33x33": dict(layer="v3-aspp", C=2048, K=256, dilation=18, H=33, W=33),
    "conv5-512-512-d2-33x33": dict(layer="conv5", C=512, K=512, dilation=2, H=33, W=33),
    "fc6-512-1024-d12-33x33": dict(layer="v1-fc6", C=512, K=1024, dilation=12, H=33, W=33),
}
CPU_PEER = "F.conv2d+F.relu"
CPU_IMPLS = (CPU_PEER, "deeplab_fast")
CPU_ROUNDS, CPU_WARMUP_ROUNDS = 9, 2

_cpu_cache: dict = {}


def cpu_problem(case: str) -> dict:
    if case not in _cpu_cache:
        c = CPU_CASES[case]
        C, K, d, H, W = c["C"], c["K"], c["dilation"], c["H"], c["W"]
        g = torch.Generator().manual_seed(sum(map(ord, case)))
        bound = 1 / math.sqrt(C * 9)
        w = ((torch.rand(K, C, 3, 3, generator=g) * 2 - 1) * bound).contiguous(memory_format=torch.channels_last)
        b = (torch.rand(K, generator=g) * 2 - 1) * bound
        x = torch.randn(1, C, H, W, generator=g).contiguous(memory_format=torch.channels_last)
        ref = F.relu(F.conv2d(x.double(), w.double(), b.double(), 1, d, d))
        _cpu_cache[case] = dict(c, x=x, w=w, b=b, ref=ref, P=ref.shape[2], Q=ref.shape[3])
    return _cpu_cache[case]


@pytest.mark.parametrize("case,impl", [pytest.param(case, impl, id=f"{case}-{impl}")
                                       for case in CPU_CASES for impl in CPU_IMPLS])
def test_cpu_atrous_conv(benchmark, case, impl):
    p = cpu_problem(case)
    x, w, b, d = p["x"], p["w"], p["b"], p["dilation"]
    if impl == CPU_PEER:
        def fn():
            return F.relu(F.conv2d(x, w, b, 1, d, d))
    else:
        def fn():
            return atrous_conv2d(x, w, b, None, 1, d, d, True)
    threads = torch.get_num_threads()
    with torch.no_grad():
        y = fn()  # correctness before timing
        err = rel_err(y, p["ref"])
        assert y.shape == p["ref"].shape and y.dtype == torch.float32
        assert err <= FP32_TOL, f"{case} / {impl}: max |y - ref| / max |ref| = {err:.3g} > {FP32_TOL}"
        benchmark.pedantic(fn, rounds=CPU_ROUNDS, warmup_rounds=CPU_WARMUP_ROUNDS)
    plan = atrous_conv2d_plan(x, w, b, None, 1, d, d, True)
    flops = conv_flops(1, p["C"], p["K"], p["P"], p["Q"])
    info = dict(rel_err=err, checked_against="float64 reference, same input", layer=p["layer"], C=p["C"],
                K=p["K"], H=p["H"], W=p["W"], N=1, dilation=d, dtype="float32", layout="channels_last",
                flops_all_taps=flops, kept_fraction=plan["kept_fraction"],
                flops_note="GFLOP/s counts all 9 taps (2 N K P Q C R S); useful_gflops only the in-bounds taps")
    if impl != CPU_PEER:
        info["plan"] = {k: plan.get(k) for k in ("path", "tap_skipping", "kept_fraction", "reason")}
    if benchmark.enabled and benchmark.stats is not None:
        gflops = flops / benchmark.stats.stats.median / 1e9
        info.update(gflops=gflops, useful_gflops=gflops * plan["kept_fraction"])
    group = f"cpu atrous {p['layer']} {p['C']}->{p['K']} d{d} {p['H']}x{p['W']}"
    record(benchmark, group, f"{impl} ({threads} thr)", threads=threads, **info)
