"""The volumetric dense CRF: ``deeplab_fast.ops.dense_crf_3d`` against pydensecrf2's generic ``DenseCRF`` fed the
same 3-D (Gaussian) and 4-D (bilateral: positions and one intensity) features, in the same process, on the same
input (issue 20).

Input, made at test time: ``deeplab_fast.data.synthetic_volume`` (ellipsoidal blobs with their own intensity, a
bias field and noise of 10 levels in an 8-bit MR-like image; a noisy probability map: the true class +1.5 in the
logits, a smooth random field and voxel noise), the unary ``-log(max(p, 1e-5))``. The model: dense3dCrf's defaults
(Kamnitsas et al. 2017: 5 iterations, smoothness 3 mm / Potts 3, appearance 5 mm, 3 levels / Potts 5, symmetric
normalisation), 1 mm voxels. Each call builds everything (ours: the features and the lattices; pydensecrf2: the
``DenseCRF`` with its unary and two pairwise terms, whose features are prepared once outside the timed call, then
``inference(5)``).

Cases: 64x128x128 with 2, 3 and 4 labels; 128x256x256 with 2 and 4 labels only in a full run
(``DEEPLAB_FAST_BENCH_FULL=1``); ours with one and two threads (``torch.set_num_threads``; pydensecrf2 is
single-threaded and is timed once per case). Reported per row: the median time, ns per voxel x label x
iteration, the peak memory and the ratio to pydensecrf2; wall clock, and the process CPU time of each call (for
the one-thread rows the figure that a busy machine does not inflate; the targets use it).

Targets (issue 20; printed as met or MISS, never asserted), 64x128x128, 3 labels, one thread: at least 3x
pydensecrf2, at most 30 ns per voxel x label x iteration, peak memory no more than pydensecrf2's.

Peak memory: one call in a fresh process (``python benchmarks/test_crf3d.py --probe SPEC``) that builds the input,
warms the implementation up on a tiny volume, then resets the kernel's high-water mark (``/proc/self/clear_refs``)
and reads ``VmHWM`` after the call; the peak is that minus ``VmRSS`` before the call. Ours counts the features it
builds; pydensecrf2's features are inputs made before the call (7 floats per voxel, 28 bytes), so its figure
leaves them out.

Correctness (always, also with ``--benchmark-disable``): ours equals pydensecrf2's marginals within 1e-4 on every
case it times (bit-exact in practice). The smoke run (``--benchmark-disable``, as CI runs it) shrinks the volume to
16x32x32, makes one call per row and probes the memory of one row.

GPU rows (``-k cuda``; skip without CUDA, listed as owed until run on a GPU): ours on CUDA at 64x128x128 (3 labels),
128x256x256 (2 labels) and MONAI issue 2098's 1x2x512x512x96 (two labels, one channel), timed with CUDA events.

Run: ``DEEPLAB_FAST_BENCH_NAME=cpu-<machine>-crf3d pytest benchmarks/test_crf3d.py`` (about 3 minutes on 2 cores;
the full run about 20).
"""
from __future__ import annotations

import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from deeplab_fast.data import synthetic_volume
from deeplab_fast.ops import dense_crf_3d
from deeplab_fast.ops.dense_crf_3d import DEFAULTS_3D

try:  # the harness's table and JSON (benchmarks/conftest.py); the rows below print their own summary too
    from conftest import record
except ImportError:  # pragma: no cover - run outside the benchmarks folder
    record = None

FULL = os.environ.get("DEEPLAB_FAST_BENCH_FULL", "") not in ("", "0")
ITERATIONS = DEFAULTS_3D["iterations"]
SMALL, LARGE, SMOKE = (64, 128, 128), (128, 256, 256), (16, 32, 32)
CASES = [(SMALL, 2), (SMALL, 3), (SMALL, 4)] + ([(LARGE, 2), (LARGE, 4)] if FULL else [])
THREADS = (1, 2)
ROUNDS = {SMALL: 5, LARGE: 2}
TARGET = dict(shape=SMALL, labels=3, threads=1, speedup=3.0, ns=30.0)
OURS, PEER = "deeplab_fast dense_crf_3d", "pydensecrf2 DenseCRF (3-D + 4-D features)"
GPU_CASES = [((1, 64, 128, 128), 3, 1), ((1, 128, 256, 256), 2, 1), ((1, 512, 512, 96), 2, 1)]  # MONAI #2098 last

ROWS: dict = {}  # (shape, labels, impl, threads) -> dict(median_s, ns, peak_mb, ...)


def _shape(shape) -> str:
    return "x".join(map(str, shape))


# ----------------------------------------------------------------------------------------------------------
# The problem and the two implementations


def make_problem(shape, labels: int, seed: int = 0) -> dict:
    v = synthetic_volume(shape, labels, 1, seed=seed)
    unary = -np.log(np.maximum(v.probabilities, 1e-5)).astype(np.float32)  # [L, D, H, W]
    return dict(shape=tuple(shape), labels=labels, unary=unary, image=v.image, truth=v.truth)


def peer_features(p: dict):
    """The features dense_crf_3d builds, by its definition (positions / sigma along D, H, W; intensity / sigma)."""
    d, h, w = p["shape"]
    idx = np.meshgrid(np.arange(d), np.arange(h), np.arange(w), indexing="ij")
    pos = lambda s: [(i.astype(np.float64) / np.float64(np.float32(s))).astype(np.float32).reshape(-1)  # noqa: E731
                     for i in idx]
    gauss = np.stack(pos(DEFAULTS_3D["gaussian_sigma"]))
    intensity = p["image"].reshape(1, -1).astype(np.float32) / np.float32(DEFAULTS_3D["intensity_sigma"])
    bilateral = np.concatenate([np.stack(pos(DEFAULTS_3D["bilateral_sigma"])), intensity])
    return np.ascontiguousarray(gauss), np.ascontiguousarray(bilateral)


def run_ours(p: dict, device: str = "cpu") -> np.ndarray:
    unary = torch.from_numpy(p["unary"])[None].to(device)
    image = torch.from_numpy(p["image"])[None].to(device)
    return dense_crf_3d(unary, image)[0]


def run_peer(p: dict) -> np.ndarray:
    import pydensecrf.densecrf as dcrf

    gauss, bilateral = p.setdefault("peer_features", peer_features(p))
    L = p["labels"]
    d = dcrf.DenseCRF(int(np.prod(p["shape"])), L)
    d.setUnaryEnergy(np.ascontiguousarray(p["unary"].reshape(L, -1)))
    d.addPairwiseEnergy(gauss, compat=DEFAULTS_3D["gaussian_compat"])
    d.addPairwiseEnergy(bilateral, compat=DEFAULTS_3D["bilateral_compat"])
    return np.array(d.inference(ITERATIONS)).reshape(L, *p["shape"])


def call(impl: str, p: dict):
    return run_ours(p).numpy() if impl == OURS else run_peer(p)


# ----------------------------------------------------------------------------------------------------------
# Peak memory: one call in a fresh process


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _probe_main(spec: dict) -> dict:
    torch.set_num_threads(spec["threads"])
    p = make_problem(spec["shape"], spec["labels"])
    if spec["impl"] == PEER:
        p["peer_features"] = peer_features(p)  # inputs, made before the call
    call(spec["impl"], make_problem((4, 8, 8), spec["labels"]))  # lazy initialisation, not counted
    gc.collect()
    before = _status_kb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    t0 = time.perf_counter()
    call(spec["impl"], p)
    return dict(peak_kb=_status_kb("VmHWM") - before, seconds=time.perf_counter() - t0)


def measure_memory(impl: str, shape, labels: int, threads: int) -> float | None:
    """Peak MiB of one call (see the module docstring); None where /proc/self/clear_refs cannot be written."""
    if not os.access("/proc/self/clear_refs", os.W_OK):
        return None
    here = str(Path(__file__).parent)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads),
               PYTHONPATH=os.pathsep.join(filter(None, [here, os.environ.get("PYTHONPATH")])))
    spec = dict(impl=impl, shape=list(shape), labels=labels, threads=threads)
    r = subprocess.run([sys.executable, __file__, "--probe", json.dumps(spec)], capture_output=True, text=True,
                       env=env, cwd=here, timeout=1800)
    assert r.returncode == 0, f"memory probe failed ({r.returncode}): {r.stderr[-2000:]}"
    return json.loads(r.stdout.strip().splitlines()[-1])["peak_kb"] / 1024.0


# ----------------------------------------------------------------------------------------------------------
# CPU rows

_PROBLEMS: dict = {}
_PEER_Q: dict = {}


def _problem(shape, labels):
    key = (shape, labels)
    if key not in _PROBLEMS:
        _PROBLEMS.clear()
        _PROBLEMS[key] = make_problem(shape, labels)
    return _PROBLEMS[key]


def _params():
    for shape, labels in CASES:
        yield pytest.param(shape, labels, PEER, 1, id=f"{_shape(shape)}-L{labels}-pydensecrf2")
        for t in THREADS:
            yield pytest.param(shape, labels, OURS, t, id=f"{_shape(shape)}-L{labels}-ours-{t}thr")


@pytest.mark.parametrize("shape,labels,impl,threads", list(_params()))
def test_crf3d_cpu(benchmark, shape, labels, impl, threads):
    pytest.importorskip("pydensecrf.densecrf")
    smoke = benchmark.disabled
    shape_run = SMOKE if smoke else shape
    p = _problem(shape_run, labels)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    cpu = []

    def timed():
        t0 = time.process_time()
        out = call(impl, p)
        cpu.append(time.process_time() - t0)
        return out

    try:
        rounds = 1 if smoke else ROUNDS[shape]
        q = benchmark.pedantic(timed, rounds=rounds, warmup_rounds=0 if smoke else 1)
    finally:
        torch.set_num_threads(previous)
    key = (shape_run, labels)
    if impl == PEER:
        _PEER_Q[key] = q
    else:  # correctness: ours equals the peer's marginals
        ref = _PEER_Q.get(key)
        if ref is None:
            ref = run_peer(p)
        diff = float(np.abs(q - ref).max())
        assert diff <= 1e-4, f"max |Q - Q_pydensecrf2| = {diff:.3g}"
    n = int(np.prod(shape_run))
    row = dict(n=n, labels=labels, threads=threads)
    if not smoke:
        med = benchmark.stats.stats.median
        cpu_med = statistics.median(cpu[-rounds:])
        row.update(median_s=med, ns=1e9 * med / (n * labels * ITERATIONS), cpu_s=cpu_med,
                   cpu_ns=1e9 * cpu_med / (n * labels * ITERATIONS), load=os.getloadavg()[0])
        row["peak_mb"] = measure_memory(impl, shape_run, labels, threads)
    elif impl == OURS and threads == 1 and labels == 3:  # the smoke run probes one row
        row["peak_mb"] = measure_memory(impl, shape_run, labels, threads)
    ROWS[(shape_run, labels, impl, threads)] = row
    if record is not None:
        record(benchmark, f"crf3d {_shape(shape_run)} L={labels}", f"{impl} {threads}thr", threads,
               ns_per_voxel_label_iteration=row.get("ns"), cpu_s=row.get("cpu_s"),
               cpu_ns_per_voxel_label_iteration=row.get("cpu_ns"), peak_mb=row.get("peak_mb"),
               load_average_1min=row.get("load"), iterations=ITERATIONS)


# ----------------------------------------------------------------------------------------------------------
# GPU rows (owed without a GPU)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available: GPU rows owed")
@pytest.mark.parametrize("shape,labels,channels", GPU_CASES, ids=[f"cuda-{_shape(s)}-L{l}" for s, l, _ in GPU_CASES])
def test_crf3d_cuda(benchmark, shape, labels, channels):
    b, d, h, w = shape
    v = synthetic_volume((d, h, w), labels, channels, seed=1)
    unary = -torch.log(torch.from_numpy(v.probabilities).clamp(min=1e-5))[None].expand(b, -1, -1, -1, -1).cuda()
    image = torch.from_numpy(v.image)[None].expand(b, -1, -1, -1, -1).cuda()
    dense_crf_3d(unary, image)  # warm-up
    torch.cuda.synchronize()
    times = []

    def timed():
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = dense_crf_3d(unary, image)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
        return out

    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    q = benchmark.pedantic(timed, rounds=1 if benchmark.disabled else 5, warmup_rounds=0)
    assert torch.isfinite(q).all()
    n = d * h * w * b
    med = statistics.median(times)
    ROWS[((d, h, w), labels, f"{OURS} cuda b={b}", 0)] = dict(
        n=n, labels=labels, threads=0, median_s=med, ns=1e9 * med / (n * labels * ITERATIONS),
        peak_mb=(torch.cuda.max_memory_allocated() - base) / 2**20, device=torch.cuda.get_device_name())


# ----------------------------------------------------------------------------------------------------------
# Summary


def test_zz_summary(capsys):
    """Prints every row (time, ns per voxel x label x iteration, peak memory, ratio to pydensecrf2) and the
    targets as met or MISS. Never fails on a timing."""
    lines = []
    for (shape, labels, impl, threads), row in ROWS.items():
        peer = ROWS.get((shape, labels, PEER, 1), {})
        med = row.get("median_s")
        ratio = peer.get("median_s") / med if med and peer.get("median_s") and impl != PEER else None
        mem = row.get("peak_mb")
        cpu_ratio = (peer.get("cpu_s") / row["cpu_s"] if row.get("cpu_s") and peer.get("cpu_s") and impl != PEER
                     and threads == 1 else None)
        lines.append(f"  {_shape(shape):12s} L={labels} {impl:42s} {threads or 'gpu'!s:>3} "
                     + (f"{1e3 * med:9.1f} ms {row['ns']:7.1f} ns" if med else f"{'(not timed)':>23s}")
                     + (f" | CPU {1e3 * row['cpu_s']:9.1f} ms {row['cpu_ns']:7.1f} ns" if row.get("cpu_s") else "")
                     + (f" {mem:8.1f} MB" if mem is not None else f" {'':11s}")
                     + (f"  {ratio:5.2f}x pydensecrf2" if ratio else "")
                     + (f" (CPU time {cpu_ratio:5.2f}x)" if cpu_ratio else "")
                     + (f"  load {row['load']:.1f}" if row.get("load") is not None else ""))
    t = TARGET
    ours = ROWS.get((t["shape"], t["labels"], OURS, t["threads"]), {})
    peer = ROWS.get((t["shape"], t["labels"], PEER, 1), {})
    with capsys.disabled():
        print(f"\ncrf3d: {ITERATIONS} iterations, dense3dCrf's defaults; wall-clock median of the calls and the "
              "process CPU time (one-thread rows: the figure to trust on a busy machine); ns per voxel x label x "
              "iteration; peak = the call's own memory (fresh process); load = 1-minute load average")
        for line in lines:
            print(line)
        if ours.get("median_s") and peer.get("median_s"):
            speedup = peer["cpu_s"] / ours["cpu_s"]  # one thread: CPU time, robust to the machine's load
            checks = [(f"speed >= {t['speedup']:g}x pydensecrf2 (CPU time)", speedup >= t["speedup"],
                       f"{speedup:.2f}x"),
                      (f"<= {t['ns']:g} ns per voxel x label x iteration (CPU time)", ours["cpu_ns"] <= t["ns"],
                       f"{ours['cpu_ns']:.1f}")]
            if ours.get("peak_mb") is not None and peer.get("peak_mb") is not None:
                checks.append(("peak memory <= pydensecrf2's", ours["peak_mb"] <= peer["peak_mb"],
                               f"{ours['peak_mb']:.0f} vs {peer['peak_mb']:.0f} MB"))
            print(f"targets ({_shape(t['shape'])}, {t['labels']} labels, one thread):")
            for name, met, value in checks:
                print(f"  {name:44s} {value:>22s}  {'met' if met else 'MISS'}")
        if not torch.cuda.is_available():
            print("owed (no GPU): " + ", ".join(f"cuda {_shape(s)} L={l}" for s, l, _ in GPU_CASES))


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--probe":
        print(json.dumps(_probe_main(json.loads(sys.argv[2]))))
    else:
        sys.exit(f"usage: {sys.argv[0]} --probe SPEC (run the benchmarks with pytest)")
