"""Benchmark harness: ours and the peers in the same process on the same input, the ratio, the device named.

Run:
- ``pytest benchmarks/``: the headline run (the dense CRF against pydensecrf2, forward and forward + backward, the
  fused layers, one model; CPU, and the GPU rows when there is a GPU): about 3 minutes on a 2-core machine.
- ``pytest benchmarks/ --full``: every case of every file (the sweep): about 15 minutes on a 2-core machine.
  ``--full`` also sets ``DEEPLAB_FAST_BENCH_FULL=1``, which opt-in files read; setting that variable is the same
  as ``--full``. Cases that only the sweep runs carry the ``full`` mark (``pytest.param(..., marks=FULL)``).
- ``pytest benchmarks/ --benchmark-disable``: the smoke test (CI): every case once, on reduced inputs where a file
  says so, still checking every result against its reference; nothing is timed or written.
- ``-k "cuda or gpu"`` runs the GPU cases alone (they skip without CUDA).

Output: each file's table is printed as soon as the file finishes, its rows are written to
``benchmarks/results/<device>-<file>.json`` (``<device>``: ``cpu-<cpu>-<n>core``, or ``gpu-<gpu>`` for a file
with GPU rows; ``DEEPLAB_FAST_BENCH_NAME`` replaces it), and one summary table of every file closes the run.
A file's JSON keeps the rows of earlier runs that this run did not measure (a headline run does not erase the
sweep's rows); each row carries its date.

Timing: CPU rows by pytest-benchmark (wall clock). GPU rows pass their own per-call times, taken with CUDA events
after warm-up calls (``record(..., times_s=...)``); pytest-benchmark's wall clock of the same calls is kept as
``wall_median_ms``. A benchmark never fails on a timing: targets are printed as met or missed beside the
figure; only wrong results fail.

This file also holds what the benchmark files share: the GPU helpers (timers, the one-case cache, the
max-autotune peer, the cuDNN benchmark fixture, the CUDA-kernel check, skipped peers, summary rows) and the
torchvision import.
"""
from __future__ import annotations

import json
import math
import os
import platform
import re
import statistics
import subprocess
import time
from pathlib import Path

import pytest
import torch

# torchvision (a peer of the ASPP and model benchmarks): its Python model code, whatever its compiled ops can do
# with this torch (see deeplab_fast.benchmark.load_torchvision); imported before any benchmark file.
from deeplab_fast.benchmark import load_torchvision

TORCHVISION, TORCHVISION_NOTE = load_torchvision(python_only=True)

FULL_ENV = "DEEPLAB_FAST_BENCH_FULL"
FULL = pytest.mark.full
RESULTS_DIR = Path(__file__).parent / "results"

# RESULTS[group][impl]: the rows of this run, each with the file that measured it ("file").
RESULTS: dict = {}
_STATE: dict = dict(file=None, started={}, finished=[], seconds={}, written={})


# ---------------------------------------------------------------------------------------------------------
# Devices


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


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def device_slug(gpu: bool) -> str:
    """The JSON files' device prefix: ``gpu-<gpu name>`` or ``cpu-<cpu name>-<n>core``."""
    if gpu:
        return f"gpu-{_slug(gpu_name())}"
    return f"cpu-{_slug(cpu_name())}-{os.cpu_count()}core"


def file_slug(path) -> str:
    """benchmarks/test_crf_fps.py -> crf-fps."""
    return _slug(Path(path).stem.removeprefix("test_"))


# ---------------------------------------------------------------------------------------------------------
# Options, the headline / full selection, per-file tables


def pytest_addoption(parser):
    parser.addoption("--full", action="store_true", default=False,
                     help=f"deeplab_fast: run the full benchmark sweep (every case; also sets {FULL_ENV}=1), not "
                          "the headline run")


def full_run(config) -> bool:
    return bool(config.getoption("--full", False)) or os.environ.get(FULL_ENV, "") not in ("", "0")


def smoke_run(config) -> bool:
    return bool(config.getoption("benchmark_disable", False))


def pytest_configure(config):
    config.addinivalue_line("markers", "full: a case of the full sweep only (pytest benchmarks --full)")
    if full_run(config):
        os.environ[FULL_ENV] = "1"  # before collection: files that opt in read it at import


@pytest.fixture(scope="session")
def full(request) -> bool:
    """True in the full sweep (``--full`` or DEEPLAB_FAST_BENCH_FULL=1)."""
    return full_run(request.config)


def pytest_collection_modifyitems(config, items):
    """The headline run leaves out the cases marked ``full``; the sweep and the smoke run keep every case."""
    if full_run(config) or smoke_run(config):
        return
    keep, left = [], []
    for item in items:
        (left if item.get_closest_marker("full") else keep).append(item)
    if left:
        config.hook.pytest_deselected(items=left)
        items[:] = keep
        _STATE["left_out"] = len(left)


def pytest_report_header(config):
    mode = ("smoke run (--benchmark-disable): every case once, results checked, nothing timed" if smoke_run(config)
            else "full sweep (--full)" if full_run(config)
            else "headline run (pytest benchmarks --full runs the sweep)")
    lines = [f"deeplab_fast benchmarks: {mode}", f"device: {device_description()}"]
    if TORCHVISION_NOTE:
        lines.append(f"torchvision: {TORCHVISION_NOTE}")
    return lines


def pytest_runtest_setup(item):
    path = str(item.path)
    _STATE["file"] = path
    _STATE["started"].setdefault(path, time.monotonic())


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item, nextitem):
    if nextitem is None or nextitem.path != item.path:  # the file's last case: its table once the case is reported
        _STATE.setdefault("last_of_file", {})[item.nodeid] = (item.config, str(item.path))


def pytest_runtest_logfinish(nodeid, location):
    """After a file's last case (outside output capture): the file's table and JSON."""
    done = _STATE.get("last_of_file", {}).pop(nodeid, None)
    if done is not None:
        _finish_file(*done)


def _rows_of(path: str) -> dict:
    """{group: {impl: row}} of the rows a file recorded."""
    out: dict = {}
    for group, impls in RESULTS.items():
        for impl, v in impls.items():
            if v.get("file") == path:
                out.setdefault(group, {})[impl] = v
    return out


def _finish_file(config, path: str):
    if path in _STATE["finished"]:
        return
    _STATE["finished"].append(path)
    _STATE["seconds"][path] = time.monotonic() - _STATE["started"].get(path, time.monotonic())
    groups = _rows_of(path)
    if not groups:
        return
    tr = config.pluginmanager.get_plugin("terminalreporter")
    rows, lines = table_rows(groups)
    if tr is not None:
        tr.write("\n")
        tr.section(f"{Path(path).name}: ours vs peers ({_STATE['seconds'][path]:.0f} s)", sep="-")
        for line in lines:
            tr.write_line(line)
    written = write_json(path, rows, full_run(config))
    if written is not None:
        _STATE["written"][path] = written
        if tr is not None:
            tr.write_line(f"written: {written}")


# ---------------------------------------------------------------------------------------------------------
# Rows


def record(benchmark, group: str, impl: str, threads: int | None = None, *, device: str | None = None,
           backend: str = "cpu", times_s: list | None = None, batch: int = 1, target_ms: float | None = None,
           target_speedup: float | None = None, timer: str | None = None, **info):
    """Stores a finished benchmark's median and minimum under RESULTS[group][impl].

    device: what ran it (default: this CPU). backend: "cpu" or "cuda". times_s: per-call times in seconds
    measured by the test (CUDA events, or a wall clock the test ran itself: say which in ``timer``); they replace
    pytest-benchmark's wall-clock statistics, which are kept as wall_median_s. batch: images per call (fps counts
    images). target_ms: the target for one call; target_speedup: the target for the group's peer median over
    this row's (e.g. 4.0: at least 4x the peer). Targets are printed as met or missed, never asserted.
    Anything else (info) goes to the JSON row's "extra" and to pytest-benchmark's extra_info. Returns the row
    (for set_target).
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
                                target_ms=target_ms, target_speedup=target_speedup, **info)
    if timed and times_s:
        benchmark.extra_info.update(cuda_event_median_s=median, cuda_event_min_s=best, rounds=len(times_s))
    return add_row(group, impl, median_s=median, min_s=best, threads=threads, device=device, backend=backend,
                   timer=timer, wall_median_s=wall_median, batch=batch, target_ms=target_ms,
                   target_speedup=target_speedup, extra=info)


def add_row(group: str, impl: str, *, median_s, min_s, threads=None, device: str | None = None, backend="cpu",
            timer="wall clock", wall_median_s=None, batch: int = 1, target_ms=None, target_speedup=None,
            extra: dict | None = None) -> dict:
    """A row in RESULTS, attributed to the benchmark file now running; returns it."""
    row = dict(median_s=median_s, min_s=min_s, threads=threads, device=device or device_description(),
               backend=backend, timer=timer, wall_median_s=wall_median_s, batch=batch, target_ms=target_ms,
               target_speedup=target_speedup, target=None, target_met=None, extra=dict(extra or {}),
               file=_STATE["file"])
    RESULTS.setdefault(group, {})[impl] = row
    return row


def summary_row(group: str, impl: str, median_s: float, min_s: float, batch: int = 1, **extra) -> dict:
    """A GPU row computed from other rows (a targets summary), with no benchmark of its own."""
    return add_row(group, impl, median_s=median_s, min_s=min_s, device=gpu_description(), backend="cuda",
                   timer="cuda events", batch=batch, extra=extra)


def set_target(row: dict, text: str, met: bool | None) -> None:
    """A target computed by the file itself (e.g. backward / forward <= 2), printed beside the row."""
    row["target"], row["target_met"] = text, met


def _ratio(a, b):
    return a / b if (a and b) else None


def _ms(seconds) -> str:
    ms = 1e3 * seconds
    return f"{ms:8.3f}ms" if ms < 10 else f"{ms:8.1f}ms"


def _peer(impls: dict):
    return next((v for k, v in impls.items() if not k.startswith("deeplab_fast")), None)


def _target(v: dict, ratio):
    """(text, met) of a row's target, or (None, None)."""
    med = v["median_s"]
    if v.get("target"):
        return v["target"], v.get("target_met")
    if v.get("target_ms") and med:
        return f"<= {v['target_ms']:g} ms", 1e3 * med <= v["target_ms"]
    if v.get("target_speedup") and ratio is not None:
        return f">= {v['target_speedup']:g}x peer", ratio >= v["target_speedup"]
    return None, None


def target_word(met) -> str:
    return "" if met is None else ("met" if met else "MISSED")


def table_rows(groups: dict):
    """(JSON rows, printed lines) of {group: {impl: row}}: median, best, fps, the ratio to the group's peer (the
    first implementation that is not deeplab_fast), for GPU rows also to our CPU op, and the target."""
    gpu = any(v["backend"] != "cpu" for impls in groups.values() for v in impls.values())
    lines = [f"  {'case':38s} {'implementation':38s} {'median':>10s} {'best':>10s} {'fps':>8s} {'x median':>9s} "
             f"{'x best':>7s}" + (f" {'x our CPU':>9s}" if gpu else "") + "  target"]
    rows, notes = [], []
    for group, impls in groups.items():
        peer = _peer(impls)
        ours_cpu = next((v for k, v in impls.items() if k.startswith("deeplab_fast") and v["backend"] == "cpu"), None)
        for impl, v in impls.items():
            med, best, batch = v["median_s"], v["min_s"], v["batch"]
            ratio = _ratio(peer and peer["median_s"], med)
            ratio_best = _ratio(peer and peer["min_s"], best)
            gpu_row = v["backend"] != "cpu"
            vs_cpu = _ratio(ours_cpu and ours_cpu["median_s"], med) if gpu_row else None
            vs_cpu_best = _ratio(ours_cpu and ours_cpu["min_s"], best) if gpu_row else None
            target, met = _target(v, ratio)
            rows.append(dict(group=group, impl=impl, threads=v["threads"], median_ms=med and 1e3 * med,
                             best_ms=best and 1e3 * best, fps=med and batch / med, speedup_vs_peer=ratio,
                             speedup_vs_peer_best=ratio_best, device=v["device"], backend=v["backend"],
                             timer=v["timer"], batch=batch, per_image_ms=med and 1e3 * med / batch,
                             wall_median_ms=v["wall_median_s"] and 1e3 * v["wall_median_s"],
                             speedup_vs_cpu_op=vs_cpu, speedup_vs_cpu_op_best=vs_cpu_best, target_ms=v["target_ms"],
                             target=target, meets_target=met, extra=v["extra"]))
            if med is None:
                lines.append(f"  {group:38s} {impl:38s} (not timed: --benchmark-disable)")
                continue
            ratios = (f"{ratio:8.2f}x {ratio_best:6.2f}x" if ratio is not None and ratio_best is not None
                      else f"{'(no peer timed)':>17s}")
            line = f"  {group:38s} {impl:38s} {_ms(med)} {_ms(best)} {batch / med:8.2f} {ratios}"
            if gpu:
                line += f" {vs_cpu:8.1f}x" if vs_cpu is not None else f" {'':9s}"
            if target:
                line += f"  {target}: {target_word(met)}"
            lines.append(line)
            floor = v["extra"].get("iteration_floor")
            if floor and floor.get("per_iteration_us") is not None:
                notes.append(f"  {group} / {impl}: one iteration {floor['per_iteration_us']:.1f} us (from 10 vs 1 "
                             f"iterations); memory floor {floor['floor_us_minimal']:.1f} us minimal "
                             f"({floor['bytes_minimal'] / 1e6:.1f} MB), {floor['floor_us_layout']:.1f} us in our "
                             f"layout ({floor['bytes_layout'] / 1e6:.1f} MB), at {floor['copy_GBps']:.0f} GB/s "
                             f"measured copy bandwidth; lattice points {floor['lattice_points']}")
    return rows, lines + notes


def _commit() -> str | None:
    try:
        r = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                           text=True, timeout=10)
        return r.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def json_path(bench_file, gpu: bool) -> Path:
    prefix = os.environ.get("DEEPLAB_FAST_BENCH_NAME") or device_slug(gpu)
    return RESULTS_DIR / f"{prefix}-{file_slug(bench_file)}.json"


def write_json(bench_file, rows: list, full: bool) -> Path | None:
    """Writes the timed rows of one benchmark file, merged into its JSON: rows of earlier runs that this run did
    not measure stay (each row keeps its date). Nothing is written when no row was timed."""
    timed = [r for r in rows if r["median_ms"]]
    if not timed:
        return None
    gpu = any(r["backend"] != "cpu" for r in timed)
    path = json_path(bench_file, gpu)
    today, commit = time.strftime("%Y-%m-%d"), _commit()
    for r in timed:
        r.update(date=today, run="full" if full else "headline", commit=commit)
    old = []
    if path.exists():
        try:
            old = json.loads(path.read_text()).get("rows", [])
        except (OSError, ValueError):
            old = []
    new_keys = {(r["group"], r["impl"]) for r in timed}
    kept = [r for r in old if (r.get("group"), r.get("impl")) not in new_keys]
    gpu_devices = sorted({r["device"] for r in timed if r["backend"] != "cpu"})
    doc = dict(file=f"benchmarks/{Path(bench_file).name}", device=gpu_devices[0] if gpu_devices else
               device_description(), cpu=device_description(), date=today, commit=commit, rows=kept + timed)
    if gpu_devices:
        doc["gpu"] = gpu_devices if len(gpu_devices) > 1 else gpu_devices[0]
    RESULTS_DIR.mkdir(exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    os.replace(tmp, path)
    return path


@pytest.hookimpl(trylast=True)  # after pytest-benchmark's own table
def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """Finishes a file the run stopped in (its table and JSON), then one summary table over every file: each of
    our rows against its group's peer, with the target; and each file's time."""
    if _STATE["file"] and _STATE["file"] not in _STATE["finished"]:
        _finish_file(config, _STATE["file"])
    tr = terminalreporter
    if _STATE.get("left_out"):
        tr.write_line(f"deeplab_fast benchmarks: headline run; {_STATE['left_out']} cases of the full sweep left out "
                      "(pytest benchmarks --full)")
    if not RESULTS:
        return
    tr.section("deeplab_fast benchmarks: summary (ours vs the peer, same process, same input)")
    tr.write_line(f"device: {device_description()}")
    tr.write_line(f"  {'file':16s} {'case':38s} {'ours':30s} {'median':>10s} {'peer median':>12s} {'speed-up':>9s}"
                  "  target")
    for group, impls in RESULTS.items():
        peer = _peer(impls)
        for impl, v in impls.items():
            if not impl.startswith("deeplab_fast") or v["median_s"] is None:
                continue
            ratio = _ratio(peer and peer["median_s"], v["median_s"])
            target, met = _target(v, ratio)
            tr.write_line(f"  {file_slug(v['file'] or '?'):16s} {group[:38]:38s} {impl[:30]:30s} "
                          f"{_ms(v['median_s'])} {_ms(peer['median_s']) if peer and peer['median_s'] else '':>12s} "
                          f"{(f'{ratio:.2f}x' if ratio else ''):>9s}" + (f"  {target}: {target_word(met)}"
                                                                         if target else ""))
    for path, seconds in _STATE["seconds"].items():
        written = _STATE["written"].get(path)
        tr.write_line(f"  {Path(path).name}: {seconds:.0f} s" + (f" -> {written}" if written else ""))


# ---------------------------------------------------------------------------------------------------------
# Shared by the files: a measurement in a fresh process


class ProbeError(RuntimeError):
    """A fresh-process measurement that did not come back (its process failed, was killed, or timed out)."""


def probe_process(argv: list, *, env=None, cwd=None, timeout: float = 900) -> dict:
    """Runs a measuring process and returns the JSON object on the last line of its output. A process that fails,
    is killed (on a loaded machine, for memory) or outlives the timeout raises ProbeError, which the caller records
    as a figure not measured: a benchmark never fails on its machine's load."""
    try:
        r = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise ProbeError(f"the measuring process took longer than {timeout:g} s") from None
    if r.returncode != 0:
        how = f"killed by signal {-r.returncode}" if r.returncode < 0 else f"exit {r.returncode}"
        raise ProbeError(f"the measuring process failed ({how}): {r.stderr.strip()[-500:]}")
    try:
        return json.loads(r.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        raise ProbeError(f"the measuring process printed no JSON: {r.stdout.strip()[-300:]!r}") from None


# ---------------------------------------------------------------------------------------------------------
# Shared by the files: numbers


def geomean(values) -> float:
    values = list(values)
    return math.exp(sum(math.log(v) for v in values) / len(values))


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    """max |y - ref| / max |ref|, in float64."""
    ref = ref.to(torch.float64)
    return float((y.to(torch.float64) - ref).abs().max() / ref.abs().max())


def randomise_bn_(module: torch.nn.Module, generator: torch.Generator) -> torch.nn.Module:
    """Random running statistics and affine parameters for every BatchNorm in ``module`` (in place, CPU
    generator): mean U(-0.2, 0.2), var U(0.5, 2), weight U(0.5, 1.5), bias U(-0.1, 0.1)."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                n = m.num_features

                def u(lo, hi):
                    return lo + (hi - lo) * torch.rand(n, generator=generator)

                m.running_mean.copy_(u(-0.2, 0.2))
                m.running_var.copy_(u(0.5, 2.0))
                if m.weight is not None:
                    m.weight.copy_(u(0.5, 1.5))
                if m.bias is not None:
                    m.bias.copy_(u(-0.1, 0.1))
    return module


# ---------------------------------------------------------------------------------------------------------
# Shared by the files: the GPU cases

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")


def require_cuda_kernels(*ops: str, triton: bool = False) -> None:
    """Fails (not skips) a GPU row of ours when CUDA is there but the build lacks the ops' CUDA kernels (or, with
    triton=True, triton is not importable)."""
    if triton:
        import importlib

        assert importlib.import_module("deeplab_fast.ops.aspp").HAVE_TRITON, (
            "CUDA is available but triton is not importable: the ASPP modules cannot fuse")
    missing = [op for op in ops if not torch._C._dispatch_has_kernel_for_dispatch_key(f"deeplab_fast::{op}", "CUDA")]
    assert not missing, (
        f"CUDA is available but deeplab_fast was built without CUDA kernels ({', '.join(missing)}): pip install "
        "--no-build-isolation -v -e . on a machine with nvcc (the build log must say 'building CUDA + CPU "
        "extension')")


@pytest.fixture(scope="module")
def cudnn_benchmark():
    """torch.backends.cudnn.benchmark on for the file's rows (ours falls back to ATen with it too)."""
    old = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    yield
    torch.backends.cudnn.benchmark = old


# Peers that did not run, per group: {group: {impl: reason}}.
PEER_SKIPS: dict = {}


def skip_peer(group: str, impl: str, reason: str):
    """Skips a peer's row (pytest.skip) and keeps the reason (its first line) for the targets' report."""
    reason = (reason.strip().splitlines() or [""])[0][:200]
    PEER_SKIPS.setdefault(group, {})[impl] = reason
    pytest.skip(f"{impl}: {reason}")


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


def time_gpu_row(benchmark, fn, warmup_rounds: int, row_seconds: float = 0.3) -> tuple[list, dict]:
    """Times one GPU row: the number of calls chosen for about row_seconds (20 to 200; 1 when benchmarks are
    disabled), each between CUDA events (cuda_timed), then as many calls queued back to back. Returns (per-call
    times in seconds, {"queued_median_ms": ...} or {})."""
    rounds = 1
    if not benchmark.disabled:
        est = statistics.median(event_times(fn, rounds=3))
        rounds = int(min(200, max(20, row_seconds / max(est, 1e-6))))
    _, times = cuda_timed(benchmark, fn, rounds=rounds, warmup_rounds=warmup_rounds)
    info = {"queued_median_ms": 1e3 * statistics.median(queued_times(fn, rounds))} if times else {}
    return times, info


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

# The peer of the dense CRF benchmarks (pydensecrf2, optional) and the two kernel presets they time: pydensecrf's
# defaults and DeepLab-v2's VOC kernels.
try:
    import pydensecrf.densecrf as dcrf
except ImportError:
    dcrf = None

needs_pydensecrf = pytest.mark.skipif(dcrf is None, reason="pydensecrf2 is not installed")

KERNELS = {
    "default": dict(gaussian_sxy=3.0, gaussian_compat=3.0, bilateral_sxy=80.0, bilateral_srgb=13.0,
                    bilateral_compat=10.0),
    "deeplab_v2": dict(gaussian_sxy=1.0, gaussian_compat=3.0, bilateral_sxy=67.0, bilateral_srgb=3.0,
                       bilateral_compat=4.0),
}
