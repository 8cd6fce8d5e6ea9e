#!/usr/bin/env bash
# GPU runbook for deeplab_fast, on a machine with an NVIDIA GPU (such as the lent H100 / H200: torch 2.11+cu130,
# nvcc 13, compute-sanitizer, no internet). CI never runs this; it has no GPU.
# The setup it shares with the other GPU script (carried wheels, photos, the machine report, the pytest
# verdict) is .ci/gpu_common.sh, sourced.
#
# Usage: bash .ci/gpu_checks.sh [STEP ...]       (no step: all of them, in this order)
#   env         always runs first: GPU, driver, torch, nvcc, compute-sanitizer; installs what CARRY_DIR holds;
#               reports the Python packages still missing (pydensecrf2, pytest-benchmark, scikit-image)
#   build       pip install --no-build-isolation -v -e . ; the log must say "building CUDA + CPU extension",
#               and the ops must have CUDA kernels
#   cuda-tests  pytest -k cuda over tests/test_{dense_crf,atrous_conv,aspp}*.py (the *_cuda.py files, or tests
#               with "cuda" in their ids; some test must pass: all-skipped is a failure)
#   tests       the full pytest
#   sanitize    compute-sanitizer memcheck (PYTORCH_NO_CUDA_MEMORY_CACHING=1) and racecheck on
#               tests/cuda/sanitize_dense_crf.py and tests/cuda/sanitize_atrous_conv.py; initcheck and synccheck
#               too, reported but never failing
#   bench       DEEPLAB_FAST_BENCH_NAME=gpu-<device> pytest benchmarks --full -k "cuda or gpu": the JSON (one file
#               per benchmark file, benchmarks/results/gpu-<device>-<file>.json) is copied beside the logs
# A device call runs at most 10 minutes: split the steps over two calls if needed (or use .ci/gpu_quick.sh, the
# quick form that fits one call), e.g.
#   bash .ci/gpu_checks.sh build cuda-tests sanitize      then      bash .ci/gpu_checks.sh build tests bench
# (a second build on a machine still warm is incremental).
#
# Environment:
#   GPU_CHECKS_OUT  folder for the logs (default: $OUT where set, else gpu-checks/ in the repository). At most 7
#                   files: env.log build.log tests.log sanitizer.log bench.log <bench name>-<file>.json summary.txt
#   CARRY_DIR       carried files (default: .whl): *.whl (nvidia_cutlass-*.whl: the CUTLASS headers the build
#                   needs; pytest_benchmark, ...) are installed with pip --no-index into a private
#                   folder put on PYTHONPATH; a pydensecrf2-*.tar.gz source is built (needs a compiler and
#                   Cython or its pre-generated .cpp); densecrf/ (im1.png, ...) becomes ../shared/data/densecrf,
#                   the tests' photos
#   PYTHON          the Python to use (default: python3)
#   MAX_JOBS        parallel compile jobs for the build (default: all cores)
#   BENCH_ARGS      more pytest arguments for the benchmarks (e.g. --benchmark-disable for a quick check)
#   SANITIZER_TIMEOUT  seconds per compute-sanitizer run (default 600)
# Exit status: 0 when every step run passed, 1 otherwise; a summary table ends the output.
set -u
set -o pipefail

# shellcheck source=.ci/gpu_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/gpu_common.sh" deeplab_fast-gpu-checks-site
LOGS="${GPU_CHECKS_OUT:-${OUT:-$REPO/gpu-checks}}"
export MAX_JOBS="${MAX_JOBS:-$(nproc 2>/dev/null || echo 8)}"
mkdir -p "$LOGS"

ALL_STEPS=(build cuda-tests tests sanitize bench)
if [[ $# -gt 0 ]]; then STEPS=("$@"); else STEPS=("${ALL_STEPS[@]}"); fi
for s in "${STEPS[@]}"; do
  case "$s" in
    env | build | cuda-tests | tests | sanitize | bench) ;;
    *) echo "unknown step '$s' (steps: env ${ALL_STEPS[*]})" >&2; exit 2 ;;
  esac
done

# ---- bookkeeping: one line per step in the summary ----
NAMES=() STATUS=() TIMES=() NOTES=()
START=0
begin() { START=$SECONDS; echo; echo "=== [gpu] $1"; }
# end NAME STATUS [NOTE]: STATUS is PASS, FAIL, WARN or SKIP
end() {
  NAMES+=("$1") STATUS+=("$2") TIMES+=("$((SECONDS - START))") NOTES+=("${3:-}")
  echo "=== [gpu] $1: $2${3:+ ($3)}"
}

# ---- env: the machine, carried packages and data, what is missing ----
step_env() {
  begin "env"
  local missing=() note=""
  machine_report 2>&1 | tee "$LOGS/env.log"

  # Carried wheels, then a pydensecrf2 source package, into a private folder on PYTHONPATH.
  install_carried_wheels > >(tee -a "$LOGS/env.log") 2>&1 || note="carried wheels failed to install"
  if sdist="$(pydensecrf_sdist)"; then
    bash .ci/build_pydensecrf.sh "$sdist" "$SITE" "$PY" 2>&1 | tee -a "$LOGS/env.log"
  fi

  # The tests' shared photos (tests/conftest.py looks in ../shared/data/densecrf).
  copy_carried_photos 2>&1 | tee -a "$LOGS/env.log"
  [[ -e "$DATA/im1.png" ]] || missing+=("the shared photos ($DATA; carry them as $CARRY/densecrf): photo tests skip")

  pyok "import torch; assert torch.cuda.is_available()" || missing+=("a CUDA GPU visible to torch")
  pyok "import pytest" || missing+=("pytest")
  pyok "import pytest_benchmark" || missing+=("pytest-benchmark: no benchmarks")
  pyok "import skimage.data" || missing+=("scikit-image: no benchmarks, the photo tests skip")
  pyok "import pydensecrf.densecrf" || missing+=("pydensecrf2: GPU checked against the CPU op only; no pydensecrf2 row")
  pyok "import cutlass_library" || missing+=("nvidia-cutlass (carry its wheel): the CUDA build needs the CUTLASS headers")
  pyok "import triton" || missing+=("triton: the ASPP kernels are skipped")
  pyok "import torchvision" || missing+=("torchvision: no ASPP reference")
  [[ -n "$(sanitizer_bin)" ]] || missing+=("compute-sanitizer")
  if [[ ${#missing[@]} -gt 0 ]]; then
    printf 'MISSING: %s\n' "${missing[@]}" | tee -a "$LOGS/env.log"
  fi
  if ! pyok "import torch; assert torch.cuda.is_available()"; then
    end env FAIL "no CUDA GPU"
  elif [[ ${#missing[@]} -gt 0 || -n "$note" ]]; then
    end env WARN "${#missing[@]} missing${note:+; $note}"
  else
    end env PASS
  fi
}

# ---- build ----
step_build() {
  begin "build: pip install --no-build-isolation -v -e ."
  local rc=0
  "$PY" -m pip install --no-index --no-build-isolation -v -e . >"$LOGS/build.log" 2>&1 || rc=$?
  grep -E "^deeplab_fast: building|error|Error" "$LOGS/build.log" | grep -v "Werror" | tail -n 20
  if [[ $rc -ne 0 ]]; then
    tail -n 40 "$LOGS/build.log"
    end build FAIL "pip exit $rc, see build.log"
  elif ! grep -q "building CUDA + CPU extension" "$LOGS/build.log"; then
    end build FAIL "the build log does not say 'building CUDA + CPU extension'"
  elif ! "$PY" .ci/check_cuda_build.py 2>&1 | tee -a "$LOGS/build.log"; then
    end build FAIL "ops without CUDA kernels"
  else
    end build PASS
  fi
}

# pytest with its output in tests.log too; FAIL unless it exits 0 with at least one test passed.
run_pytest() {
  local name="$1" rc=0
  shift
  echo "\$ pytest $*" >>"$LOGS/tests.log"
  "$PY" -m pytest "$@" 2>&1 | tee -a "$LOGS/tests.log" || rc=$?
  local verdict
  verdict="$(pytest_verdict "$rc" <"$LOGS/tests.log")"
  end "$name" "${verdict%% *}" "${verdict#* }"
}

step_cuda_tests() {
  begin "cuda-tests: pytest -k cuda tests/test_{dense_crf,atrous_conv,aspp}*.py"
  local files
  mapfile -t files < <(ls tests/test_dense_crf*.py tests/test_atrous_conv*.py tests/test_aspp*.py)
  run_pytest cuda-tests "${files[@]}" -k cuda -q -rfEs --durations=10
}

step_tests() {
  begin "tests: pytest (the full suite)"
  run_pytest tests -q -rfEs
}

# ---- compute-sanitizer ----
step_sanitize() {
  begin "sanitize: compute-sanitizer on tests/cuda/sanitize_*.py"
  local bin failed=0 warned=0 tool fatal extra rc before spec script
  if ! bin="$(sanitizer_bin)"; then
    end sanitize FAIL "compute-sanitizer not found"
    return
  fi
  : >"$LOGS/sanitizer.log"
  # tool, whether a failure fails the step, extra environment
  for spec in "memcheck 1 PYTORCH_NO_CUDA_MEMORY_CACHING=1" "racecheck 1" "initcheck 0 DEEPLAB_FAST_POISON=0" \
    "synccheck 0"; do
    read -r tool fatal extra <<<"$spec"
    for script in tests/cuda/sanitize_dense_crf.py tests/cuda/sanitize_atrous_conv.py; do
    echo "--- $tool ${extra:-} $script" | tee -a "$LOGS/sanitizer.log"
    before=$(wc -l <"$LOGS/sanitizer.log")
    rc=0
    # shellcheck disable=SC2086  # extra: zero or one VAR=value word
    env ${extra:-} timeout "${SANITIZER_TIMEOUT:-600}" "$bin" --tool "$tool" --error-exitcode 1 \
      --target-processes all "$PY" "$script" >>"$LOGS/sanitizer.log" 2>&1 || rc=$?
    tail -n +"$((before + 1))" "$LOGS/sanitizer.log" | grep -E "ERROR SUMMARY|RACECHECK SUMMARY|^OK$|^FAIL|^error"
    if [[ $rc -eq 0 ]]; then
      echo "$tool $script: clean"
    elif [[ $fatal == 1 ]]; then
      echo "$tool $script: FAILED (exit $rc)"
      failed=$((failed + 1))
    else
      echo "$tool $script: reported problems (exit $rc; informational)"
      warned=$((warned + 1))
    fi
    done
  done
  if [[ $failed -gt 0 ]]; then
    end sanitize FAIL "$failed of memcheck/racecheck failed, see sanitizer.log"
  elif [[ $warned -gt 0 ]]; then
    end sanitize WARN "memcheck and racecheck clean; initcheck/synccheck reported, see sanitizer.log"
  else
    end sanitize PASS "memcheck, racecheck, initcheck, synccheck clean"
  fi
}

# ---- benchmarks ----
step_bench() {
  begin "bench: pytest benchmarks -k 'cuda or gpu'"
  if ! pyok "import pytest_benchmark"; then
    end bench FAIL "pytest-benchmark is missing"
    return
  fi
  local slug name rc=0
  slug="$("$PY" -c 'import re, torch; print(re.sub("[^a-z0-9]+", "-", torch.cuda.get_device_name().lower()).strip("-"))')"
  name="${DEEPLAB_FAST_BENCH_NAME:-gpu-$slug}"
  rm -f "benchmarks/results/$name"-*.json
  # shellcheck disable=SC2086  # BENCH_ARGS is a list of words
  DEEPLAB_FAST_BENCH_NAME="$name" "$PY" -m pytest benchmarks --full -k "cuda or gpu" -q -rfEs ${BENCH_ARGS:-} 2>&1 |
    tee "$LOGS/bench.log" || rc=$?
  local written=()
  mapfile -t written < <(compgen -G "benchmarks/results/$name-*.json" || true)
  if [[ ${#written[@]} -gt 0 ]]; then cp "${written[@]}" "$LOGS/"; fi
  if [[ $rc -ne 0 ]]; then
    end bench FAIL "pytest exit $rc, see bench.log"
  elif ! grep -qE '[0-9]+ passed' "$LOGS/bench.log"; then
    end bench FAIL "no benchmark passed"
  elif [[ ${#written[@]} -gt 0 ]]; then
    end bench PASS "${written[*]}"
  else
    end bench PASS "not timed (no JSON)"
  fi
}

# ---- run ----
: >"$LOGS/tests.log"
step_env
CUDA_OK=0
[[ "${STATUS[0]}" != FAIL ]] && CUDA_OK=1
BUILD_OK=1
for s in "${STEPS[@]}"; do
  [[ "$s" == env ]] && continue
  if [[ $CUDA_OK -ne 1 ]]; then
    START=$SECONDS; end "$s" SKIP "no CUDA GPU"; continue
  fi
  if [[ $BUILD_OK -ne 1 ]]; then
    START=$SECONDS; end "$s" SKIP "the build failed"; continue
  fi
  case "$s" in
    build) step_build; [[ "${STATUS[-1]}" == PASS ]] || BUILD_OK=0 ;;
    cuda-tests) step_cuda_tests ;;
    tests) step_tests ;;
    sanitize) step_sanitize ;;
    bench) step_bench ;;
  esac
done

# ---- summary ----
{
  echo
  echo "=== [gpu] summary ($(date -u '+%Y-%m-%d %H:%M UTC'); logs in $LOGS)"
  rc=0
  for i in "${!NAMES[@]}"; do
    printf '=== [gpu]   %-11s %-4s %5ss  %s\n' "${NAMES[$i]}" "${STATUS[$i]}" "${TIMES[$i]}" "${NOTES[$i]}"
    [[ "${STATUS[$i]}" == FAIL || "${STATUS[$i]}" == SKIP ]] && rc=1
  done
  if [[ $rc -eq 0 ]]; then echo "=== [gpu] all steps passed"; else echo "=== [gpu] FAILED"; fi
} | tee "$LOGS/summary.txt"
grep -q "all steps passed" "$LOGS/summary.txt"
