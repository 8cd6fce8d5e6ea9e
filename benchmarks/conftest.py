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
    """Stores a finished benchmark's median under RESULTS[group][impl]."""
    stats = getattr(benchmark, "stats", None)
    median = stats.stats.median if stats is not None and not getattr(benchmark, "disabled", False) else None
    benchmark.extra_info.update(device=device_description(), threads=threads, **info)
    RESULTS.setdefault(group, {})[impl] = dict(median_s=median, threads=threads, **info)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not RESULTS:
        return
    measured = any(v["median_s"] for g in RESULTS.values() for v in g.values())
    tr = terminalreporter
    tr.section("deeplab_fast benchmarks: ours vs peers (same process, same input)")
    tr.write_line(f"device: {device_description()}")
    rows = []
    for group, impls in RESULTS.items():
        peer = next((v["median_s"] for k, v in impls.items() if not k.startswith("deeplab_fast")), None)
        for impl, v in impls.items():
            t = v["median_s"]
            ratio = (peer / t) if (peer and t) else None
            rows.append(dict(group=group, impl=impl, threads=v["threads"], median_ms=t and 1e3 * t,
                             fps=t and 1.0 / t, speedup_vs_peer=ratio))
            tr.write_line(f"  {group:38s} {impl:28s} "
                          + (f"{1e3 * t:9.1f} ms  {1 / t:7.2f} fps  x{ratio:5.2f}" if t else "(not timed)")
                          if t is None or ratio is not None else
                          f"  {group:38s} {impl:28s} {1e3 * t:9.1f} ms  {1 / t:7.2f} fps")
    if measured:
        out = Path(__file__).parent / "results"
        out.mkdir(exist_ok=True)
        name = os.environ.get("DEEPLAB_FAST_BENCH_NAME", f"cpu-{platform.node() or 'host'}")
        path = out / f"{name}.json"
        path.write_text(json.dumps(dict(device=device_description(), date=time.strftime("%Y-%m-%d"),
                                        rows=rows), indent=2) + "\n")
        tr.write_line(f"written: {path}")
