"""The CPU dense CRF on a busy machine (issue 14): 2 threads against 1, with other work running beside them.

Users run the CRF beside data loaders and other jobs. Before, ~120 OpenMP parallel regions per call ended in
barriers where the threads spun while one of them was descheduled: with one busy core, 2 threads took 1.5-1.9x
the time of 1 on the 2-core CI machine (680-840 ms against 430-450 ms at 512x512x21), and 2.8x beside a
heavier multithreaded job. deeplab_fast's own worker pool (csrc/common/parallel.h) takes chunks dynamically and
waits passively.

The benchmark starts its own load: one or two single-threaded busy processes (``while True: pass``), or a
2-thread torch matmul loop (the "heavier multithreaded job"), then times
1 and 2 threads alternately (so both see the same load), on the real 512x512 photo with 21 labels and 10
iterations (the dense CRF fps benchmark's input). Target: with one core busy, 2 threads <= 1.1x the time of 1
(the "x median" column of the 2-thread row is 1 thread / 2 threads: >= 0.91). Every call's marginals must equal the
first call's bit for bit, whatever the thread count and the load. On an idle machine, benchmarks/test_crf_fps.py
shows the speed-up over pydensecrf2. A case of the full sweep (``pytest benchmarks --full``), about a minute.
"""
import statistics
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from deeplab_fast.ops import dense_crf

from conftest import FULL, RESULTS, record, set_target

skdata = pytest.importorskip("skimage.data")
pytestmark = FULL
TARGET_RATIO = 1.1  # with one core busy, 2 threads <= 1.1x the time of 1

SPIN = "while True: pass"
MATMUL = "import torch\ntorch.set_num_threads(2)\na = torch.randn(1500, 1500)\nwhile True: a @ a"
LOADS = {"1 busy core": [SPIN], "2 busy cores": [SPIN, SPIN], "2-thread torch job": [MATMUL]}
ITERATIONS, LABELS, ROUNDS = 10, 21, 7


@pytest.fixture(scope="module")
def problem(request):
    img = np.ascontiguousarray(skdata.astronaut())
    if request.config.getoption("benchmark_disable", False):
        img = np.ascontiguousarray(img[:128, :160])  # the smoke run: small, same checks
    H, W, _ = img.shape
    g = torch.Generator().manual_seed(0)
    low = torch.randn(1, LABELS, max(1, H // 8), max(1, W // 8), generator=g) * 3
    logits = torch.nn.functional.interpolate(low, size=(H, W), mode="bilinear", align_corners=False)
    return dict(unary=(-torch.log_softmax(logits, 1)).contiguous(),
                image=torch.from_numpy(img).permute(2, 0, 1)[None].contiguous(), H=H, W=W)


def busy_processes(scripts):
    procs = [subprocess.Popen([sys.executable, "-c", s]) for s in scripts]
    time.sleep(1.0)  # let them get going (the torch job imports torch first)
    return procs


@pytest.mark.parametrize("load", list(LOADS))
def test_two_threads_beside_other_work(benchmark, problem, load):
    disabled = getattr(benchmark, "disabled", False)
    rounds = 1 if disabled else ROUNDS
    before = torch.get_num_threads()
    procs = busy_processes(LOADS[load])
    times = {1: [], 2: []}
    first = None
    try:
        for r in range(rounds + 1):  # round 0 warms up
            for threads in (1, 2):
                torch.set_num_threads(threads)
                t0 = time.perf_counter()
                q = dense_crf(problem["unary"], problem["image"], iterations=ITERATIONS)
                elapsed = time.perf_counter() - t0
                if first is None:
                    first = q
                assert torch.equal(q, first), f"{threads} threads under load differ from the first call"
                if r > 0:
                    times[threads].append(elapsed)
    finally:
        torch.set_num_threads(before)
        for p in procs:
            p.kill()
            p.wait()
    group = f"crf {problem['W']}x{problem['H']} L=21 it=10, {load}"
    ratio = statistics.median(times[2]) / statistics.median(times[1]) if times[1] and times[2] else None
    for threads, impl in ((1, "same op, 1 thread"), (2, "deeplab_fast (2 thr)")):
        record(benchmark, group, impl, threads=threads, times_s=times[threads], timer="wall clock (alternating)",
               load=load, two_over_one=ratio, target_note="2 threads <= 1.1x 1 thread (1 busy core)")
    if ratio is not None and load == "1 busy core":
        set_target(RESULTS[group]["deeplab_fast (2 thr)"], f"2 thr / 1 thr {ratio:.2f} <= {TARGET_RATIO:g}",
                   ratio <= TARGET_RATIO)
