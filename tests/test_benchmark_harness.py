"""The benchmark harness (benchmarks/conftest.py) on tiny benchmark files: the headline / full selection, a table
per file as soon as the file finishes, one JSON per file merged with earlier runs, the summary, targets printed
as met or missed (never asserted), and a failing measuring process recorded rather than failing the benchmark.

Each test copies the real benchmarks/conftest.py into a fresh folder beside small benchmark files and runs pytest
there in a subprocess (pytest's own ``pytester``).
"""
import json
from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

CONFTEST = Path(__file__).resolve().parents[1] / "benchmarks" / "conftest.py"

FAST = """
import time
import pytest
from conftest import FULL, record

def work():
    time.sleep(0.002)

@pytest.mark.parametrize("impl", ["peer", "deeplab_fast"])
def test_row(benchmark, impl):
    benchmark.pedantic(work, rounds=3, warmup_rounds=0)
    record(benchmark, "tiny case", impl, threads=1, target_speedup=100.0 if impl == "deeplab_fast" else None)

@FULL
def test_only_in_the_sweep(benchmark):
    benchmark.pedantic(work, rounds=2, warmup_rounds=0)
    record(benchmark, "sweep case", "deeplab_fast", threads=1)
"""

SECOND = """
import os
import time
from conftest import record

def test_second(benchmark):
    benchmark.pedantic(time.sleep, args=(0.001,), rounds=2, warmup_rounds=0)
    record(benchmark, "second case", "deeplab_fast", threads=1, full_env=os.environ.get("DEEPLAB_FAST_BENCH_FULL"))
"""


@pytest.fixture
def bench_dir(pytester, monkeypatch):
    monkeypatch.delenv("DEEPLAB_FAST_BENCH_FULL", raising=False)
    monkeypatch.setenv("DEEPLAB_FAST_BENCH_NAME", "tiny")
    pytester.makeconftest(CONFTEST.read_text())
    pytester.makepyfile(test_a_fast=FAST, test_b_second=SECOND)
    return pytester


def _json(pytester, name) -> dict:
    return json.loads((pytester.path / "results" / f"tiny-{name}.json").read_text())


def test_headline_run_tables_per_file_json_and_summary(bench_dir):
    r = bench_dir.runpytest_subprocess("-p", "no:cacheprovider")
    r.assert_outcomes(passed=3, deselected=1)
    out = r.stdout.str()
    # Each file's table comes as soon as the file finishes: the first before the second file's cases run.
    first, second = out.index("test_a_fast.py: ours vs peers"), out.index("test_b_second.py: ours vs peers")
    assert first < out.index("test_b_second.py", first) <= second
    assert "headline run; 1 cases of the full sweep left out (pytest benchmarks --full)" in out
    assert out.index("deeplab_fast benchmarks: summary") > second
    # The target is printed (a 100x target on equal work: missed), and the run still passes.
    assert ">= 100x peer: MISSED" in out
    doc = _json(bench_dir, "a-fast")
    rows = {(row["group"], row["impl"]): row for row in doc["rows"]}
    assert set(rows) == {("tiny case", "peer"), ("tiny case", "deeplab_fast")}
    ours = rows["tiny case", "deeplab_fast"]
    assert ours["median_ms"] > 1 and ours["meets_target"] is False and ours["run"] == "headline"
    assert doc["file"] == "benchmarks/test_a_fast.py" and ours["date"] == doc["date"]
    assert _json(bench_dir, "b-second")["rows"][0]["extra"]["full_env"] is None


def test_full_sweep_runs_every_case_sets_the_variable_and_keeps_earlier_rows(bench_dir):
    bench_dir.runpytest_subprocess("-p", "no:cacheprovider").assert_outcomes(passed=3, deselected=1)
    r = bench_dir.runpytest_subprocess("-p", "no:cacheprovider", "--full", "-k", "sweep or second")
    r.assert_outcomes(passed=2, deselected=2)
    assert "full sweep (--full)" in r.stdout.str()
    doc = _json(bench_dir, "a-fast")
    runs = {(row["group"], row["impl"]): row["run"] for row in doc["rows"]}
    # The sweep's row is added; the headline rows it did not measure stay.
    assert runs == {("tiny case", "peer"): "headline", ("tiny case", "deeplab_fast"): "headline",
                    ("sweep case", "deeplab_fast"): "full"}
    assert _json(bench_dir, "b-second")["rows"][0]["extra"]["full_env"] == "1"


def test_smoke_run_checks_every_case_and_writes_nothing(bench_dir):
    r = bench_dir.runpytest_subprocess("-p", "no:cacheprovider", "--benchmark-disable")
    r.assert_outcomes(passed=4)
    assert "(not timed: --benchmark-disable)" in r.stdout.str()
    assert not (bench_dir.path / "results").exists()


def test_interrupted_file_still_gets_its_table_and_json(bench_dir):
    bench_dir.makepyfile(test_c_fails="""
import time
from conftest import record

def test_timed(benchmark):
    benchmark.pedantic(time.sleep, args=(0.001,), rounds=2, warmup_rounds=0)
    record(benchmark, "before the failure", "deeplab_fast", threads=1)

def test_wrong_result():
    assert 1 == 2, "a wrong result fails its case"
""")
    r = bench_dir.runpytest_subprocess("-p", "no:cacheprovider", "-x", "test_c_fails.py")
    r.assert_outcomes(passed=1, failed=1)
    assert "test_c_fails.py: ours vs peers" in r.stdout.str()
    assert _json(bench_dir, "c-fails")["rows"][0]["group"] == "before the failure"


def test_a_failed_measuring_process_is_reported_not_raised(bench_dir):
    """A fresh process that is killed (as on a loaded machine, for memory) or times out is a ProbeError with the
    reason, which the benchmark records as a figure not measured."""
    bench_dir.makepyfile(test_d_probe="""
import signal
import sys
import pytest
from conftest import ProbeError, probe_process

def test_probe_outcomes():
    assert probe_process([sys.executable, "-c", "import json; print('noise'); print(json.dumps({'peak': 3}))"]) == {
        "peak": 3}
    with pytest.raises(ProbeError, match="killed by signal 9"):
        probe_process([sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"])
    with pytest.raises(ProbeError, match="longer than 0.5 s"):
        probe_process([sys.executable, "-c", "import time; time.sleep(30)"], timeout=0.5)
    with pytest.raises(ProbeError, match="no JSON"):
        probe_process([sys.executable, "-c", "print('done')"])
""")
    bench_dir.runpytest_subprocess("-p", "no:cacheprovider", "test_d_probe.py").assert_outcomes(passed=1)
