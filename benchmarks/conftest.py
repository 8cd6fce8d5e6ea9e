"""Benchmark harness: collects each case's median time, prints ours vs the peers side by side with the
ratio and the device, and writes the table to benchmarks/results/ as JSON.

Run: ``pytest benchmarks`` (measures), or ``pytest benchmarks --benchmark-disable`` (one call per case: a
smoke test that still checks results against the reference). ``pytest benchmarks -k "cuda or gpu"`` runs the
GPU cases alone (they skip without CUDA).

Every row names the device that ran it: this CPU for CPU rows, the GPU with the torch and CUDA versions for
GPU rows. CPU rows are timed by pytest-benchmark (wall clock). GPU rows pass their own per-call times, taken
with CUDA events after warm-up calls (``record(..., times_s=...)``); pytest-benchmark's wall clock of the same
calls (each synchronised) is kept beside them as ``wall_median_ms``.

The JSON goes to ``benchmarks/results/$DEEPLAB_FAST_BENCH_NAME.json``; by default ``gpu-<GPU name>`` when a GPU
row ran, else ``cpu-<host name>``.
"""
import json
import os
import platform
import re
import statistics
import time
from pathlib import Path

import torch

RESULTS: dict = {}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def device_description() -> str:
    """This CPU, as CPU rows name their device."""
    return f"{cpu_name()}, {os.cpu_count()} logical cores, torch {torch.__version__}"


def gpu_name(device=None) -> str:
    return torch.cuda.get_device_name(device)


def gpu_description(device=None) -> str:
    """The GPU, as GPU rows name their device: name, SMs, memory, torch and CUDA versions."""
    p = torch.cuda.get_device_properties(torch.cuda.current_device() if device is None else device)
    return (f"{p.name} ({p.multi_processor_count} SMs, {p.total_memory / 2**30:.0f} GiB), torch {torch.__version__}, "
            f"CUDA {torch.version.cuda}")


def record(benchmark, group: str, impl: str, threads: int | None = None, *, device: str | None = None,
           backend: str = "cpu", times_s: list | None = None, batch: int = 1, target_ms: float | None = None,
           timer: str | None = None, **info):
    """Stores a finished benchmark's median and minimum under RESULTS[group][impl].

    device: what ran it (default: this CPU). backend: "cpu" or "cuda". times_s: per-call times in seconds
    measured by the test (CUDA events, or a wall clock the test ran itself: say which in ``timer``); they replace
    pytest-benchmark's wall-clock statistics, which are kept as wall_median_s. batch: images per call (fps counts images). target_ms: the target for one call, if any.
    Anything else (info) goes to the JSON row's "extra" and to pytest-benchmark's extra_info.
    """
    stats = getattr(benchmark, "stats", None)
    timed = (stats is not None or bool(times_s)) and not getattr(benchmark, "disabled", False)
    device = device or device_description()
    timer = timer or ("cuda events" if times_s is not None else "wall clock")
    wall_median = stats.stats.median if timed and stats is not None else None
    if timed and times_s:
        median, best = statistics.median(times_s), min(times_s)
    elif timed and times_s is None:
        median, best = stats.stats.median, stats.stats.min
    else:
        median = best = None
    benchmark.extra_info.update(device=device, threads=threads, backend=backend, timer=timer, batch=batch,
                                target_ms=target_ms, **info)
    if timed and times_s:
        benchmark.extra_info.update(cuda_event_median_s=median, cuda_event_min_s=best, rounds=len(times_s))
    RESULTS.setdefault(group, {})[impl] = dict(median_s=median, min_s=best, threads=threads, device=device,
                                               backend=backend, timer=timer, wall_median_s=wall_median, batch=batch,
                                               target_ms=target_ms, extra=info)


# ---- GPU timing, shared by the benchmark files ----


def cuda_timed(benchmark, fn, rounds: int, warmup_rounds: int):
    """benchmark.pedantic over fn, each call between two CUDA events on the current stream and synchronised.
    Returns (fn's last result, per-call event times in seconds without the warm-ups; empty when benchmarks are
    disabled). The start event is recorded before the host launches anything, so the time includes the host's
    launch work as well as the GPU's, as a caller waiting for the result sees it."""
    times = []

    def call():
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
        return out

    out = benchmark.pedantic(call, rounds=rounds, warmup_rounds=warmup_rounds)
    return out, ([] if benchmark.disabled else times[warmup_rounds:warmup_rounds + rounds])


def event_times(fn, rounds: int, warmup_rounds: int = 1) -> list:
    """Per-call CUDA event times in seconds, each call synchronised (outside pytest-benchmark): the package's
    own timer, as ``deeplab-fast bench`` uses it."""
    from deeplab_fast.benchmark import time_per_call

    return time_per_call(fn, torch.device("cuda"), rounds, warmup_rounds)


def queued_times(fn, rounds: int) -> list:
    """Per-call CUDA event times in seconds of calls queued back to back, one synchronisation at the end: the
    GPU's time per call when the host keeps ahead of it (as triton.testing.do_bench measures)."""
    torch.cuda.synchronize()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(rounds)]
    for start, end in events:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return [start.elapsed_time(end) / 1e3 for start, end in events]


def no_compile() -> bool:
    """DEEPLAB_FAST_BENCH_NO_COMPILE=1 skips the torch.compile(mode="max-autotune") peers (slow to compile)."""
    return os.environ.get("DEEPLAB_FAST_BENCH_NO_COMPILE", "") not in ("", "0")


def max_autotune_peer(module, x):
    """(fn, compile seconds) for torch.compile(module, mode="max-autotune") on input x: fn runs one compiled call
    (marking a CUDA-graph step). The first call (the compile) runs here, under no_grad; a compile error raises."""
    torch._dynamo.reset()  # a fresh cache: every case recompiles the module for its shapes
    compiled = torch.compile(module, mode="max-autotune")

    def fn():
        torch.compiler.cudagraph_mark_step_begin()
        return compiled(x)

    t0 = time.perf_counter()
    with torch.no_grad():
        fn()
    torch.cuda.synchronize()
    return fn, time.perf_counter() - t0


def one_gpu_case(cache: dict, case: str, build):
    """cache[case], built by build() on first use. Only one case is kept: the rows of a case run one after
    another, so a new case first drops the previous one's tensors and compiled graphs."""
    if case not in cache:
        if cache:
            cache.clear()
            torch._dynamo.reset()
            torch.cuda.empty_cache()
        cache[case] = build()
    return cache[case]


def _ratio(a, b):
    return a / b if (a and b) else None


def _ms(seconds) -> str:
    ms = 1e3 * seconds
    return f"{ms:8.3f}ms" if ms < 10 else f"{ms:8.1f}ms"


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """Prints ours vs the peer per group (median and best of the rounds, and both ratios; for GPU rows also the
    ratio to our CPU op and the target) and writes the JSON."""
    if not RESULTS:
        return
    tr = terminalreporter
    gpu_devices = sorted({v["device"] for impls in RESULTS.values() for v in impls.values() if v["backend"] != "cpu"})
    tr.section("deeplab_fast benchmarks: ours vs peers (same process, same input)")
    tr.write_line(f"device: {device_description()}")
    for d in gpu_devices:
        tr.write_line(f"gpu:    {d}")
    tr.write_line(f"  {'case':38s} {'implementation':30s} {'median':>10s} {'best':>10s} {'fps':>8s} "
                  f"{'x median':>9s} {'x best':>7s}" + (f" {'x our CPU':>9s} {'target':>14s}" if gpu_devices else ""))
    rows, notes = [], []
    for group, impls in RESULTS.items():
        peer = next((v for k, v in impls.items() if not k.startswith("deeplab_fast")), None)
        ours_cpu = next((v for k, v in impls.items() if k.startswith("deeplab_fast") and v["backend"] == "cpu"), None)
        for impl, v in impls.items():
            med, best, batch = v["median_s"], v["min_s"], v["batch"]
            ratio = _ratio(peer and peer["median_s"], med)
            ratio_best = _ratio(peer and peer["min_s"], best)
            gpu_row = v["backend"] != "cpu"
            vs_cpu = _ratio(ours_cpu and ours_cpu["median_s"], med) if gpu_row else None
            vs_cpu_best = _ratio(ours_cpu and ours_cpu["min_s"], best) if gpu_row else None
            meets = (1e3 * med <= v["target_ms"]) if (med and v["target_ms"]) else None
            rows.append(dict(group=group, impl=impl, threads=v["threads"], median_ms=med and 1e3 * med,
                             best_ms=best and 1e3 * best, fps=med and batch / med, speedup_vs_peer=ratio,
                             speedup_vs_peer_best=ratio_best, device=v["device"], backend=v["backend"],
                             timer=v["timer"], batch=batch, per_image_ms=med and 1e3 * med / batch,
                             wall_median_ms=v["wall_median_s"] and 1e3 * v["wall_median_s"],
                             speedup_vs_cpu_op=vs_cpu, speedup_vs_cpu_op_best=vs_cpu_best, target_ms=v["target_ms"],
                             meets_target=meets, extra=v["extra"]))
            if med is None:
                tr.write_line(f"  {group:38s} {impl:30s} (not timed: --benchmark-disable)")
                continue
            ratios = (f"{ratio:8.2f}x {ratio_best:6.2f}x" if ratio is not None and ratio_best is not None
                      else f"{'(no peer timed)':>17s}")
            line = f"  {group:38s} {impl:30s} {_ms(med)} {_ms(best)} {batch / med:8.2f} {ratios}"
            if gpu_devices:
                line += f" {vs_cpu:8.1f}x" if vs_cpu is not None else f" {'':9s}"
                if v["target_ms"]:
                    line += f" {'<= %g ms' % v['target_ms']:>9s} {'ok' if meets else 'MISS':>4s}"
            tr.write_line(line)
            floor = v["extra"].get("iteration_floor")
            if floor and floor.get("per_iteration_us") is not None:
                notes.append(f"  {group} / {impl}: one iteration {floor['per_iteration_us']:.1f} us (from 10 vs 1 "
                             f"iterations); memory floor {floor['floor_us_minimal']:.1f} us minimal "
                             f"({floor['bytes_minimal'] / 1e6:.1f} MB), {floor['floor_us_layout']:.1f} us in our "
                             f"layout ({floor['bytes_layout'] / 1e6:.1f} MB), at {floor['copy_GBps']:.0f} GB/s "
                             f"measured copy bandwidth; lattice points {floor['lattice_points']}")
    for note in notes:
        tr.write_line(note)
    if any(r["median_ms"] for r in rows):
        out = Path(__file__).parent / "results"
        out.mkdir(exist_ok=True)
        default = f"gpu-{_slug(gpu_name())}" if gpu_devices else f"cpu-{platform.node() or 'host'}"
        name = os.environ.get("DEEPLAB_FAST_BENCH_NAME", default)
        path = out / f"{name}.json"
        doc = dict(device=gpu_devices[0] if gpu_devices else device_description(), cpu=device_description())
        if gpu_devices:
            doc["gpu"] = gpu_devices if len(gpu_devices) > 1 else gpu_devices[0]
        doc.update(date=time.strftime("%Y-%m-%d"), rows=rows)
        path.write_text(json.dumps(doc, indent=2, default=str) + "\n")
        tr.write_line(f"written: {path}")
