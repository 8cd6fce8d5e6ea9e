# The setup the GPU scripts share (.ci/gpu_quick.sh, .ci/gpu_checks.sh): sourced, not run.
#
# After `source .ci/gpu_common.sh SITE_NAME`: REPO (the repository, also the working directory), PY (PYTHON, default
# python3), CARRY (CARRY_DIR, default .whl: the carried files), SITE (a private folder for the carried packages,
# ${TMPDIR:-/tmp}/SITE_NAME, put first on PYTHONPATH by install_carried_wheels), DATA (the tests' photos,
# ../shared/data/densecrf beside the repository), PYTHONUNBUFFERED=1, and the functions below.

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO" || exit 2
PY="${PYTHON:-python3}"
CARRY="${CARRY_DIR:-.whl}"
SITE="${TMPDIR:-/tmp}/${1:?usage: source .ci/gpu_common.sh SITE_NAME}"
DATA="$REPO/../shared/data/densecrf"
export PYTHONUNBUFFERED=1

pyok() { "$PY" -c "$1" >/dev/null 2>&1; }

# compute-sanitizer: on PATH, in $CUDA_HOME/bin or /usr/local/cuda/bin. Prints its path; status 1 when none.
sanitizer_bin() {
  local c
  for c in "$(command -v compute-sanitizer)" "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer" \
    /usr/local/cuda/bin/compute-sanitizer; do
    if [[ -n "$c" && -x "$c" ]]; then echo "$c"; return 0; fi
  done
  return 1
}

# The machine: date, host, cores, commit, GPU and driver, Python and torch, nvcc, compute-sanitizer.
machine_report() {
  echo "date: $(date -u '+%Y-%m-%d %H:%M:%S UTC'), host $(hostname), $(nproc) cores, commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1 || echo "nvidia-smi failed"
  timeout 30 "$PY" -c 'import sys, torch; print("python", sys.version.split()[0], "| torch", torch.__version__, "| CUDA", torch.version.cuda, "| available", torch.cuda.is_available(), "| devices", torch.cuda.device_count())' 2>&1
  echo "nvcc: $( (command -v nvcc && nvcc --version | tail -n 1) 2>&1 | tr '\n' ' ')"
  echo "compute-sanitizer: $(sanitizer_bin || echo 'not found')"
}

# The carried wheels ($CARRY/*.whl: nvidia-cutlass, pytest-benchmark, ...) into $SITE, with pip --no-index, and $SITE
# first on PYTHONPATH. Status 1 when the install failed.
install_carried_wheels() {
  mkdir -p "$SITE"
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
  compgen -G "$CARRY/*.whl" >/dev/null || return 0
  echo "installing carried wheels: $(cd "$CARRY" && ls ./*.whl | tr '\n' ' ')"
  timeout 60 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
    "$CARRY"/*.whl
}

# The carried pydensecrf2 sdist, when pydensecrf2 is missing and one is carried (.ci/build_pydensecrf.sh builds it).
pydensecrf_sdist() {
  pyok "import pydensecrf.densecrf" && return 1
  compgen -G "$CARRY/pydensecrf2-*.tar.gz" >/dev/null || return 1
  ls "$CARRY"/pydensecrf2-*.tar.gz | head -n 1
}

# The tests' photos: $CARRY/densecrf (or shared/data/densecrf in the tree) copied to $DATA when it has none.
# Status 1 when there are none.
copy_carried_photos() {
  local src
  for src in "$CARRY/densecrf" "$REPO/shared/data/densecrf"; do
    if [[ ! -e "$DATA/im1.png" && -e "$src/im1.png" ]]; then
      mkdir -p "$(dirname "$DATA")" 2>/dev/null && cp -r "$src" "$DATA" 2>/dev/null && echo "photos: copied $src to $DATA"
    fi
  done
  [[ -e "$DATA/im1.png" ]]
}

# A pytest run's verdict from its output (stdin) and exit status: "PASS <its summary line>" when it exited 0 and
# something passed, else "FAIL <why>".
pytest_verdict() {
  local rc="$1" last
  last="$(grep -E '(passed|failed|skipped|deselected|error|no tests ran).* in [0-9.]+s' | tail -n 1 |
    sed 's/=//g; s/^ *//; s/ *$//')"
  if [[ $rc -ne 0 ]]; then
    echo "FAIL pytest exit $rc: ${last:-no summary line}"
  elif ! grep -qE '[0-9]+ passed' <<<"$last"; then
    echo "FAIL nothing passed: ${last:-no summary line}"
  else
    echo "PASS $last"
  fi
}
