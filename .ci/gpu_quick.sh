#!/usr/bin/env bash
# The GPU check that fits ONE device call: at most 8 minutes of wall time (GPU_QUICK_BUDGET, default 450 s,
# leaves room for the call's own overhead), with a summary and at most 6 files under $OUT whatever happens.
# The long form, with the full suite and four sanitizer tools, is .ci/gpu_checks.sh.
# The setup it shares with the other GPU script (carried wheels, photos, the machine report, the pytest
# verdict) is .ci/gpu_common.sh, sourced.
#
# Usage: bash .ci/gpu_quick.sh [--dry-run]
#
# Steps, in this order (each under its own `timeout`, capped by what is left of the budget; a step that would get
# under 15 s is skipped as "no time left"). Times in [] are the caps, in seconds:
#   env           [40]  GPU, torch, nvcc, compute-sanitizer; the carried wheels ($CARRY_DIR/*.whl: nvidia-cutlass,
#                       anything else missing) installed with pip --no-index into a private folder on PYTHONPATH;
#                       a carried pydensecrf2 sdist built in the background; the carried photos
#                       ($CARRY_DIR/densecrf or shared/data/densecrf in the tree) copied to ../shared/data/densecrf
#   build        [200]  pip install --no-index --no-build-isolation -v -e . with MAX_JOBS=16; the log must say
#                       "building CUDA + CPU extension"; .ci/check_cuda_build.py --triton (every op with a CPU
#                       kernel has a CUDA kernel; the Triton ASPP module imports)
#   tests        [120]  pytest -k "cuda and not compile and not opcheck" over tests/test_{dense_crf,atrous_conv,
#                       aspp}*.py (the *_cuda.py files, or CUDA-parametrised tests with "cuda" in their ids),
#                       per-test timeout
#   memcheck      [75]  compute-sanitizer memcheck (PYTORCH_NO_CUDA_MEMORY_CACHING=1) on one small case per op:
#                       .ci/gpu_quick_cases.py small --ops crf,conv,aspp
#   racecheck     [60]  compute-sanitizer racecheck on the CRF case with the CUDA graph off
#   bench_crf     [60]  benchmarks/test_crf_fps.py, CUDA rows (CUDA events): 500x375x21 default and DeepLab-v2
#                       kernels, 16 x 512x512, the no-graph row
#   profile       [30]  DEEPLAB_FAST_PROFILE=1 per-stage split of the same CRF cases (.ci/gpu_quick_cases.py profile)
#   bench_conv    [75]  benchmarks/test_atrous_conv.py: the DeepLab layers at batch 1, ours against cuDNN
#                       (F.conv2d + ReLU, cudnn.benchmark), then the targets summary
#   bench_aspp    [60]  benchmarks/test_aspp.py: the v3 heads (output stride 16 and 8, batch 1 and 16), ours
#                       against torchvision's eager ASPP, then the targets summary
#   tests_compile [75]  pytest -k "cuda and (compile or opcheck)": the torch.compile and opcheck cases (opcheck on
#                       every sample of tests/samples.py), last (slow to compile)
# Files under $OUT (the run tool brings back at most 8): summary.txt (rewritten before and after every step, so
# even a killed run leaves one), setup.log (env + build), tests.log, sanitizer.log, bench.log, bench.json (the
# benchmark rows of the three files, merged).
#
# --dry-run (or GPU_QUICK_DRY_RUN=1): no GPU needed. Runs no step; checks that the files the steps use exist,
# that the budget fits, and (GPU_QUICK_COLLECT=1, the default when deeplab_fast imports) that each pytest
# selection collects at least one test; writes the plan and the summary to $OUT. Exit 0 when all that holds.
# For testing the bookkeeping, a dry run runs GPU_QUICK_FAKE_<step>='shell command' in place of that step, under
# its timeout (GPU_QUICK_TIMEOUT_<step> overrides a cap).
#
# Environment: OUT (or GPU_QUICK_OUT; default gpu-quick/ in the repository), CARRY_DIR (default .whl), PYTHON
# (default python3), MAX_JOBS (default 16), GPU_QUICK_BUDGET (seconds, default 450, at most 480),
# GPU_QUICK_PER_TEST (seconds per test, default 60).
# Exit status: 0 when every step passed (a dry run: when the plan checks passed), 1 otherwise.
set -u
set -o pipefail

# shellcheck source=.ci/gpu_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/gpu_common.sh" deeplab_fast-gpu-quick-site
DRY="${GPU_QUICK_DRY_RUN:-0}"
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY=1 ;;
    -h | --help) sed -n '2,/^set -u/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "unknown argument '$arg' (usage: bash .ci/gpu_quick.sh [--dry-run])" >&2; exit 2 ;;
  esac
done
LOGS="${GPU_QUICK_OUT:-${OUT:-$REPO/gpu-quick}}"
BUDGET="${GPU_QUICK_BUDGET:-450}"
PER_TEST="${GPU_QUICK_PER_TEST:-60}"
RESERVE="${GPU_QUICK_RESERVE:-8}"     # seconds kept back for the summary
MIN_STEP="${GPU_QUICK_MIN_STEP:-15}"  # a step that would get less is skipped
export MAX_JOBS="${MAX_JOBS:-16}"
export DEEPLAB_FAST_POISON=1
mkdir -p "$LOGS"
if ((BUDGET > 480)); then
  echo "GPU_QUICK_BUDGET=$BUDGET: at most 480 s (one device call must fit 8 minutes)" >&2
  exit 2
fi
DEADLINE=$((SECONDS + BUDGET))  # reset after a dry run's plan checks, which are not part of the budget
STARTED="$(date -u '+%Y-%m-%d %H:%M:%S UTC')"

STEPS=(env build tests memcheck racecheck bench_crf profile bench_conv bench_aspp tests_compile)
declare -A CAP=([env]=40 [build]=200 [tests]=120 [memcheck]=75 [racecheck]=60 [bench_crf]=60 [profile]=30
  [bench_conv]=75 [bench_aspp]=60 [tests_compile]=75)
declare -A LOGOF=([env]=setup.log [build]=setup.log [tests]=tests.log [memcheck]=sanitizer.log
  [racecheck]=sanitizer.log [bench_crf]=bench.log [profile]=bench.log [bench_conv]=bench.log [bench_aspp]=bench.log
  [tests_compile]=tests.log)
declare -A STATUS=() TOOK=() NOTE=()
CURRENT="" CURRENT_START=0 CURRENT_LIMIT=0 CHILD="" LOG_FROM=1
for f in setup.log tests.log sanitizer.log bench.log; do : >"$LOGS/$f"; done
rm -f "$LOGS/summary.txt" "$LOGS/bench.json"

# ---- the summary: rewritten before and after every step, and on a signal ----
write_summary() {
  local final="${1:-}" s rc=0 tmp="$LOGS/.summary.tmp"
  {
    echo "deeplab_fast gpu_quick ($([[ $DRY == 1 ]] && echo 'DRY RUN' || echo 'GPU run')): started $STARTED, budget ${BUDGET}s, $((SECONDS - (DEADLINE - BUDGET)))s elapsed; commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
    [[ -n "${GPU_LINE:-}" ]] && echo "$GPU_LINE"
    for s in "${STEPS[@]}"; do
      if [[ -n "${STATUS[$s]:-}" ]]; then
        printf '  %-13s %-11s %4ss  %s\n' "$s" "${STATUS[$s]}" "${TOOK[$s]}" "${NOTE[$s]}"
        case "${STATUS[$s]}" in PASS | DRY) ;; *) rc=1 ;; esac
      elif [[ "$s" == "$CURRENT" ]]; then
        printf '  %-13s %-11s %4ss  %s\n' "$s" "${final:-RUNNING}" "$((SECONDS - CURRENT_START))" \
          "timeout ${CURRENT_LIMIT}s; see ${LOGOF[$s]}"
        rc=1
      else
        printf '  %-13s %s\n' "$s" "$([[ -n "$final" ]] && echo 'NOT RUN' || echo pending)"
        [[ -n "$final" ]] && rc=1
      fi
    done
    if [[ -n "$final" ]]; then
      echo "result: $([[ $rc == 0 ]] && echo 'all steps passed' || echo FAILED)"
    else
      echo "result: (in progress)"
    fi
  } >"$tmp"
  mv -f "$tmp" "$LOGS/summary.txt"
  return $rc
}

on_signal() {
  local sig="$1"
  trap - TERM INT HUP
  if [[ -n "$CHILD" ]]; then kill -TERM "$CHILD" 2>/dev/null; fi
  echo "=== [gpu-quick] $sig received during step '${CURRENT:-none}': writing the summary" >&2
  write_summary "INTERRUPTED"
  cat "$LOGS/summary.txt"
  exit 1
}
trap 'on_signal TERM' TERM
trap 'on_signal INT' INT
trap 'on_signal HUP' HUP

record() {  # record STEP STATUS NOTE
  STATUS[$1]="$2" TOOK[$1]="$((SECONDS - CURRENT_START))" NOTE[$1]="$3"
  CURRENT=""
  echo "=== [gpu-quick] $1: $2${3:+ ($3)}" | tee -a "$LOGS/${LOGOF[$1]}"
  write_summary
}

# run_step STEP CMD...: CMD under `timeout` (the step's cap or what is left of the budget), its output appended to
# the step's log. Sets RC (124: timed out). Returns 1 when the step did not run (skipped, dry run).
RC=0
run_step() {
  local step="$1" cap_var="GPU_QUICK_TIMEOUT_$1" fake_var="GPU_QUICK_FAKE_$1" left t
  shift
  local cap="${!cap_var:-${CAP[$step]}}"
  CURRENT_START=$SECONDS
  left=$((DEADLINE - SECONDS - RESERVE))
  if ((left < MIN_STEP)); then
    record "$step" SKIP "no time left (${left}s of the ${BUDGET}s budget)"
    return 1
  fi
  t=$((cap < left ? cap : left))
  CURRENT="$step" CURRENT_LIMIT=$t
  LOG_FROM=$(($(wc -l <"$LOGS/${LOGOF[$step]}") + 1))
  write_summary
  {
    echo
    echo "=== [gpu-quick] $step (timeout ${t}s, $((DEADLINE - SECONDS))s of the budget left): $*"
  } | tee -a "$LOGS/${LOGOF[$step]}"
  if [[ $DRY == 1 ]]; then
    if [[ -z "${!fake_var:-}" ]]; then
      record "$step" DRY "would run under timeout ${t}s"
      return 1
    fi
    set -- bash -c "${!fake_var}"
  fi
  timeout --kill-after=10 "$t" "$@" >>"$LOGS/${LOGOF[$step]}" 2>&1 &
  CHILD=$!
  wait "$CHILD"
  RC=$?
  CHILD=""
  if [[ $RC == 124 || $RC == 137 ]]; then
    record "$step" TIMEOUT "killed after ${t}s; see ${LOGOF[$step]}"
    return 1
  fi
  return 0
}

# judge_pytest STEP: PASS when pytest exited 0 and something passed (its summary line, in the step's part of the log).
judge_pytest() {
  local step="$1" verdict
  verdict="$(tail -n +"$LOG_FROM" "$LOGS/${LOGOF[$step]}" | pytest_verdict "$RC")"
  record "$step" "${verdict%% *}" "${verdict#* }"
}

# The tests of the three ops (file names survive the planned merge of *_cuda.py into the CPU files).
mapfile -t TEST_FILES < <(ls tests/test_dense_crf*.py tests/test_atrous_conv*.py tests/test_aspp*.py 2>/dev/null)
PYTEST_COMMON=(-p no:cacheprovider -rfEs -o "faulthandler_timeout=$PER_TEST")
if "$PY" -c 'import pytest_timeout' >/dev/null 2>&1; then PYTEST_COMMON+=("--timeout=$PER_TEST"); fi
SEL_TESTS="cuda and not compile and not opcheck"
SEL_COMPILE="cuda and (compile or opcheck)"
SEL_CRF="test_gpu_cuda and (500x375 or 16x512x512 or no_graph)"
SEL_CONV="(test_cuda_atrous_conv and n1- and not cudnn_relu and not compile) or test_cuda_atrous_conv_targets"
SEL_ASPP="(test_cuda_aspp and v3 and not compile) or test_cuda_aspp_targets"

merge_bench_json() {
  "$PY" - "$LOGS/bench.json" benchmarks/results/gpu-quick-*.json <<'EOF' 2>/dev/null || true
import json, os, sys
out, docs = sys.argv[1], {}
for path in sys.argv[2:]:
    if os.path.exists(path):
        with open(path) as f:
            docs[os.path.basename(path)[:-5]] = json.load(f)
if docs:
    with open(out, "w") as f:
        json.dump(docs, f, indent=1)
EOF
}

# bench STEP FILE SELECTION NAME: one benchmark file's selected rows, the JSON merged into bench.json.
bench() {
  local step="$1" file="$2" sel="$3" name="$4"
  rm -f "benchmarks/results/$name"-*.json
  if run_step "$step" env DEEPLAB_FAST_BENCH_NAME="$name" DEEPLAB_FAST_BENCH_NO_COMPILE=1 \
    "$PY" -m pytest "$file" -k "$sel" -q "${PYTEST_COMMON[@]}"; then
    merge_bench_json
    judge_pytest "$step"
  fi
}

# ---- dry run: check the plan, run nothing ----
if [[ $DRY == 1 ]]; then
  problems=()
  for f in .ci/gpu_quick_cases.py .ci/check_cuda_build.py benchmarks/test_crf_fps.py benchmarks/test_atrous_conv.py \
    benchmarks/test_aspp.py setup.py; do
    [[ -f "$f" ]] || problems+=("missing $f")
  done
  [[ ${#TEST_FILES[@]} -gt 0 ]] || problems+=("no tests/test_{dense_crf,atrous_conv,aspp}*.py")
  "$PY" -m py_compile .ci/gpu_quick_cases.py .ci/check_cuda_build.py 2>/dev/null || problems+=("a .ci/*.py does not compile")
  caps=0
  for s in "${STEPS[@]}"; do caps=$((caps + CAP[$s])); done
  compgen -G "$CARRY/nvidia_cutlass-*.whl" >/dev/null ||
    echo "note: no $CARRY/nvidia_cutlass-*.whl here: carry it for the GPU run (see CONTRIBUTING.md)" | tee -a "$LOGS/setup.log"
  {
    echo "plan: ${#STEPS[@]} steps, caps summing to ${caps}s, cut to the ${BUDGET}s budget (steps get"
    echo "  min(cap, budget left - ${RESERVE}s)); test files: ${TEST_FILES[*]}"
  } | tee -a "$LOGS/setup.log"
  collect="${GPU_QUICK_COLLECT:-auto}"
  if [[ $collect == auto ]]; then
    collect=0
    "$PY" -c 'import deeplab_fast._C' >/dev/null 2>&1 && collect=1
  fi
  if [[ $collect == 1 ]]; then
    # Each selection must collect at least one test (the CUDA tests skip here, but they must be selected).
    for spec in "tests|$SEL_TESTS|${TEST_FILES[*]}" "tests_compile|$SEL_COMPILE|${TEST_FILES[*]}" \
      "bench_crf|$SEL_CRF|benchmarks/test_crf_fps.py" "bench_conv|$SEL_CONV|benchmarks/test_atrous_conv.py" \
      "bench_aspp|$SEL_ASPP|benchmarks/test_aspp.py"; do
      IFS='|' read -r s sel files <<<"$spec"
      # shellcheck disable=SC2086  # files: a list of paths
      out="$("$PY" -m pytest --collect-only -q -p no:cacheprovider -k "$sel" $files 2>&1)"
      n="$(grep -cE '::' <<<"$out")"
      echo "selection $s: $n test(s) collected (-k \"$sel\")" | tee -a "$LOGS/setup.log"
      if [[ $n -eq 0 ]]; then
        problems+=("selection $s collects nothing;")
        tail -n 15 <<<"$out" >>"$LOGS/setup.log"
      fi
    done
  fi
  GPU_LINE="dry run: ${#problems[@]} problem(s)${problems:+: ${problems[*]}}"
fi

# ---- env ----
[[ $DRY == 1 ]] && DEADLINE=$((SECONDS + BUDGET))
CURRENT_START=$SECONDS
if [[ $DRY == 1 ]]; then
  run_step env true
else
  CURRENT="env" CURRENT_LIMIT=${CAP[env]}
  write_summary
  {
    machine_report
    echo "MAX_JOBS=$MAX_JOBS; per-test timeout ${PER_TEST}s ($("$PY" -c 'import pytest_timeout' 2>/dev/null && echo 'pytest-timeout' || echo 'faulthandler_timeout only'))"
  } 2>&1 | tee -a "$LOGS/setup.log"
  GPU_LINE="$(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null | head -n 1)"
  GPU_LINE="gpu: ${GPU_LINE:-none}"
  env_note=""
  install_carried_wheels >>"$LOGS/setup.log" 2>&1 || env_note="carried wheels failed to install; "
  # pydensecrf2 (the CRF tests' reference): no wheel for the GPU machine's Python, so a carried sdist is built in
  # the background while the extension builds.
  PYDENSECRF_PID=""
  if sdist="$(pydensecrf_sdist)"; then
    timeout 200 bash .ci/build_pydensecrf.sh "$sdist" "$SITE" "$PY" \
      >"${TMPDIR:-/tmp}/deeplab_fast-gpu-quick-pydensecrf.log" 2>&1 &
    PYDENSECRF_PID=$!
  fi
  copy_carried_photos 2>&1 | tee -a "$LOGS/setup.log"
  [[ -e "$DATA/im1.png" ]] || env_note+="no photos (carry $CARRY/densecrf): photo tests skip; "
  pyok 'import cutlass_library' || env_note+="no nvidia-cutlass (carry its wheel); "
  pyok 'import pytest_benchmark' || env_note+="no pytest-benchmark; "
  sanitizer_bin >/dev/null || env_note+="no compute-sanitizer; "
  if ! timeout 30 "$PY" -c 'import torch; assert torch.cuda.is_available()' >/dev/null 2>&1; then
    record env FAIL "no CUDA GPU visible to torch"
  else
    record env PASS "${env_note%; }"
  fi
fi

GPU_OK=1
[[ $DRY == 1 || "${STATUS[env]}" == PASS ]] || GPU_OK=0
if [[ $GPU_OK == 1 ]]; then
  # ---- build ----
  if run_step build bash -c '"$0" -m pip install --no-index --no-build-isolation --no-deps -v -e . &&
      "$0" .ci/check_cuda_build.py --triton' "$PY"; then
    if [[ $RC -ne 0 ]]; then
      record build FAIL "exit $RC; see setup.log"
    elif ! grep -q "building CUDA + CPU extension" "$LOGS/setup.log"; then
      record build FAIL "the build log does not say 'building CUDA + CPU extension'"
    else
      record build PASS "$(grep -oE 'CUDA toolkit [^;]*' "$LOGS/setup.log" | tail -n 1)"
    fi
  fi
  if [[ -n "${PYDENSECRF_PID:-}" ]]; then
    wait "$PYDENSECRF_PID" 2>/dev/null
    cat "${TMPDIR:-/tmp}/deeplab_fast-gpu-quick-pydensecrf.log" >>"$LOGS/setup.log" 2>/dev/null
  fi
fi
if [[ $GPU_OK == 1 && ( $DRY == 1 || "${STATUS[build]}" == PASS ) ]]; then
  # ---- the CUDA tests, torch.compile left for the end ----
  if run_step tests "$PY" -m pytest "${TEST_FILES[@]}" -k "$SEL_TESTS" -v --durations=15 "${PYTEST_COMMON[@]}"; then
    judge_pytest tests
  fi

  # ---- compute-sanitizer ----
  SAN="$(sanitizer_bin || echo compute-sanitizer)"
  if run_step memcheck env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SAN" --tool memcheck --error-exitcode 1 \
    --target-processes all "$PY" .ci/gpu_quick_cases.py small --ops crf,conv,aspp; then
    if [[ $RC == 0 ]]; then record memcheck PASS "crf, conv, aspp clean"; else record memcheck FAIL "exit $RC; see sanitizer.log"; fi
  fi
  if run_step racecheck "$SAN" --tool racecheck --error-exitcode 1 --target-processes all \
    "$PY" .ci/gpu_quick_cases.py small --ops crf --graph off; then
    if [[ $RC == 0 ]]; then record racecheck PASS "crf (graph off) clean"; else record racecheck FAIL "exit $RC; see sanitizer.log"; fi
  fi

  # ---- benchmarks (CUDA events) ----
  bench bench_crf benchmarks/test_crf_fps.py "$SEL_CRF" gpu-quick-crf
  if run_step profile "$PY" .ci/gpu_quick_cases.py profile; then
    if [[ $RC == 0 ]]; then record profile PASS "per-stage split in bench.log"; else record profile FAIL "exit $RC; see bench.log"; fi
  fi
  bench bench_conv benchmarks/test_atrous_conv.py "$SEL_CONV" gpu-quick-atrous-conv
  bench bench_aspp benchmarks/test_aspp.py "$SEL_ASPP" gpu-quick-aspp

  # ---- torch.compile cases ----
  if run_step tests_compile "$PY" -m pytest "${TEST_FILES[@]}" -k "$SEL_COMPILE" -v "${PYTEST_COMMON[@]}"; then
    judge_pytest tests_compile
  fi
else
  for s in "${STEPS[@]}"; do
    if [[ -z "${STATUS[$s]:-}" ]]; then
      CURRENT_START=$SECONDS
      record "$s" SKIP "$([[ $GPU_OK == 1 ]] && echo 'the build failed' || echo 'no CUDA GPU')"
    fi
  done
fi

# ---- summary ----
trap - TERM INT HUP
rc=0
write_summary final || rc=1
if [[ $DRY == 1 ]]; then
  # A dry run passes when its plan checks passed and every step it ran (fakes) passed.
  rc=0
  [[ "$GPU_LINE" == "dry run: 0 problem(s)"* ]] || rc=1
  for s in "${STEPS[@]}"; do
    case "${STATUS[$s]:-}" in DRY | PASS) ;; *) rc=1 ;; esac
  done
  sed -i "s/^result: .*/result: dry run $([[ $rc == 0 ]] && echo 'OK' || echo 'FAILED')/" "$LOGS/summary.txt"
fi
echo
echo "=== [gpu-quick] summary ($LOGS/summary.txt)"
cat "$LOGS/summary.txt"
exit $rc
