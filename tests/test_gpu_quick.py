""".ci/gpu_quick.sh and the CI scripts, without a GPU: they parse, the dry run plans and writes its summary, and
the bookkeeping holds when a step times out, the budget runs out or the run is killed.

The dry run runs no step; GPU_QUICK_FAKE_<step>='shell command' makes it run that command in the step's place,
under the step's timeout, which is how the timeout paths are exercised here.
"""
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / ".ci" / "gpu_quick.sh"
STEPS = ["env", "build", "tests", "memcheck", "racecheck", "bench_crf", "profile", "bench_conv", "bench_aspp",
         "tests_compile"]

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="needs bash and timeout")


def quick_env(out: Path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPU_QUICK_")}
    env.update(OUT=str(out), GPU_QUICK_COLLECT="0", PYTHON=sys.executable, CARRY_DIR=str(out / "no-carry"))
    env.update({k: str(v) for k, v in extra.items()})
    return env


def dry_run(out: Path, timeout: float = 60, **extra) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), "--dry-run"], cwd=ROOT, env=quick_env(out, **extra),
                          capture_output=True, text=True, timeout=timeout)


def summary(out: Path) -> dict:
    """{step: (status, rest of the line)} from summary.txt, and its 'result:' under the key 'result'."""
    rows = {}
    for line in (out / "summary.txt").read_text().splitlines():
        parts = line.split(None, 2)
        if line.startswith("  ") and parts and parts[0] in STEPS:
            rows[parts[0]] = (parts[1] if len(parts) > 1 else "", parts[2] if len(parts) > 2 else "")
        elif line.startswith("result:"):
            rows["result"] = line[len("result:"):].strip()
    return rows


@pytest.mark.parametrize("name", ["gpu_quick.sh", "gpu_checks.sh", "gpu_common.sh", "compile_cuda_kernels.sh",
                                  "build_pydensecrf.sh", "run"])
def test_ci_scripts_parse(name):
    subprocess.run(["bash", "-n", str(ROOT / ".ci" / name)], check=True)


def test_ci_python_helpers_compile():
    for name in ("gpu_quick_cases.py", "check_cuda_build.py"):
        compile((ROOT / ".ci" / name).read_text(), name, "exec")


def test_dry_run_plans_every_step(tmp_path):
    r = dry_run(tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    rows = summary(tmp_path)
    assert [s for s in STEPS if rows[s][0] == "DRY"] == STEPS
    assert rows["result"] == "dry run OK"
    assert "budget 450s" in (tmp_path / "summary.txt").read_text()
    # The run tool brings back at most 8 files from $OUT.
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(files) <= 8, files
    assert "timeout 200s" in rows["build"][1]


def test_a_step_that_times_out_is_recorded_and_the_rest_still_run(tmp_path):
    start = time.monotonic()
    r = dry_run(tmp_path, GPU_QUICK_FAKE_tests="echo started; sleep 60", GPU_QUICK_TIMEOUT_tests=2,
                GPU_QUICK_FAKE_memcheck="exit 0")
    assert time.monotonic() - start < 30
    assert r.returncode == 1
    rows = summary(tmp_path)
    assert rows["tests"][0] == "TIMEOUT" and "killed after 2s" in rows["tests"][1]
    assert rows["memcheck"][0] == "PASS"
    assert rows["tests_compile"][0] == "DRY"
    assert rows["result"] == "dry run FAILED"
    assert "started" in (tmp_path / "tests.log").read_text()


def test_a_failing_step_fails_the_run(tmp_path):
    r = dry_run(tmp_path, GPU_QUICK_FAKE_racecheck="echo race; exit 3")
    assert r.returncode == 1
    rows = summary(tmp_path)
    assert rows["racecheck"][0] == "FAIL" and "exit 3" in rows["racecheck"][1]
    assert "race" in (tmp_path / "sanitizer.log").read_text()


def test_the_budget_caps_the_steps(tmp_path):
    start = time.monotonic()
    r = dry_run(tmp_path, GPU_QUICK_BUDGET=6, GPU_QUICK_RESERVE=1, GPU_QUICK_MIN_STEP=2,
                GPU_QUICK_FAKE_build="sleep 60")
    assert time.monotonic() - start < 30
    assert r.returncode == 1
    rows = summary(tmp_path)
    assert rows["build"][0] == "TIMEOUT"
    assert all(rows[s][0] == "SKIP" and "no time left" in rows[s][1] for s in STEPS[2:])


def test_a_budget_over_8_minutes_is_refused(tmp_path):
    r = dry_run(tmp_path, GPU_QUICK_BUDGET=600)
    assert r.returncode == 2 and "at most 480" in r.stderr


def test_killed_run_leaves_a_summary(tmp_path):
    proc = subprocess.Popen(["bash", str(SCRIPT), "--dry-run"], cwd=ROOT,
                            env=quick_env(tmp_path, GPU_QUICK_FAKE_build="sleep 60"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # the summary says RUNNING while the step runs
            s = tmp_path / "summary.txt"
            if s.exists() and summary(tmp_path).get("build", ("",))[0] == "RUNNING":
                break
            time.sleep(0.1)
        else:
            pytest.fail("the summary never showed the build step running")
        assert summary(tmp_path)["result"] == "(in progress)"
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1
    rows = summary(tmp_path)
    assert rows["build"][0] == "INTERRUPTED"
    assert all(rows[s][0] == "NOT" for s in STEPS[2:])  # "NOT RUN"
    assert rows["result"] == "FAILED"


def test_cases_script_without_cuda_exits_2():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is here: the script would run its cases")
    r = subprocess.run([sys.executable, str(ROOT / ".ci" / "gpu_quick_cases.py"), "small", "--ops", "crf"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "CUDA is not available" in r.stdout
