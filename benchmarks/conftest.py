"""Benchmark harness: collects each case's median time, prints ours vs the peers side by side with the
ratio and the device, and writes the table to benchmarks/results/ as JSON.

Run: ``pytest benchmarks`` (measures), or ``pytest benchmarks --benchmark-disable`` (one call per case: a
smoke test that still checks results against the reference).
"""
import json
import os
import platform
import time
from pathlib import Path

import pytest
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
    return f"{cpu_name()}, {os.cpu_count()} logical cores, torch {torch.__version__}"


def record(benchmark, group: str, impl: str, threads: int | None = None, **info):
    """Stores a finished benchmark's median and minimum under RESULTS[group][impl]."""
    stats = getattr(benchmark, "stats", None)
    timed = stats is not None and not getattr(benchmark, "disabled", False)
    benchmark.extra_info.update(device=device_description(), threads=threads, **info)
    RESULTS.setdefault(group, {})[impl] = dict(median_s=stats.stats.median if timed else None,
                                               min_s=stats.stats.min if timed else None, threads=threads, **info)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """Prints ours vs the peer per group (median and best of the rounds, and both ratios) and writes the JSON."""
    if not RESULTS:
        return
    tr = terminalreporter
    tr.section("deeplab_fast benchmarks: ours vs peers (same process, same input)")
    tr.write_line(f"device: {device_description()}")
    tr.write_line(f"  {'case':38s} {'implementation':24s} {'median':>10s} {'best':>10s} {'fps':>7s} "
                  f"{'x median':>9s} {'x best':>7s}")
    rows = []
    for group, impls in RESULTS.items():
        peer = next((v for k, v in impls.items() if not k.startswith("deeplab_fast")), None)
        for impl, v in impls.items():
            med, best = v["median_s"], v["min_s"]
            ratio = peer["median_s"] / med if (peer and peer["median_s"] and med) else None
            ratio_best = peer["min_s"] / best if (peer and peer["min_s"] and best) else None
            rows.append(dict(group=group, impl=impl, threads=v["threads"], median_ms=med and 1e3 * med,
                             best_ms=best and 1e3 * best, fps=med and 1.0 / med, speedup_vs_peer=ratio,
                             speedup_vs_peer_best=ratio_best))
            if med is None:
                tr.write_line(f"  {group:38s} {impl:24s} (not timed: --benchmark-disable)")
            else:
                ratios = (f"{ratio:8.2f}x {ratio_best:6.2f}x" if ratio is not None and ratio_best is not None
                          else "  (no peer timed)")
                tr.write_line(f"  {group:38s} {impl:24s} {1e3 * med:8.1f}ms {1e3 * best:8.1f}ms {1 / med:7.2f} "
                              f"{ratios}")
    if any(r["median_ms"] for r in rows):
        out = Path(__file__).parent / "results"
        out.mkdir(exist_ok=True)
        name = os.environ.get("DEEPLAB_FAST_BENCH_NAME", f"cpu-{platform.node() or 'host'}")
        path = out / f"{name}.json"
        path.write_text(json.dumps(dict(device=device_description(), date=time.strftime("%Y-%m-%d"),
                                        rows=rows), indent=2) + "\n")
        tr.write_line(f"written: {path}")
