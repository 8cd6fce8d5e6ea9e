#!/usr/bin/env bash
# Checks the CUDA kernel files (csrc/**/cuda/*.cu) without torch and without a GPU:
#   bash .ci/compile_cuda_kernels.sh            the include rule, then each kernel preprocessed by nvcc (fast)
#   bash .ci/compile_cuda_kernels.sh --compile  the include rule, then each kernel compiled for sm_80 and sm_90
#
# Kernel files (.cu / .cuh) never include torch, ATen or c10 headers, by design: they see plain pointers and
# sizes (see csrc/dense_crf/dense_crf.h) and the torch glue lives in .cpp files. This script checks that: a direct
# include fails the grep, and an indirect one fails nvcc, since only csrc/ and CUTLASS are on the include path.
# CI preprocesses only: its next step builds the whole extension, kernels and glue, against torch's CUDA wheel
# (.ci/run step 8), which compiles every kernel for sm_80 and sm_90 anyway. --compile is for a machine without
# a CUDA torch.
#
# Environment:
#   NVCC             the nvcc to use (default: nvcc on PATH, then $CUDA_HOME/bin/nvcc, /usr/local/cuda/bin/nvcc)
#   CI_REQUIRE_NVCC  1: fail when nvcc is missing (default: warn and exit 0)
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
mode=preprocess
case "${1:-}" in
  "") ;;
  --compile) mode=compile ;;
  *) echo "usage: bash .ci/compile_cuda_kernels.sh [--compile]" >&2; exit 2 ;;
esac

# 1. No torch headers in CUDA kernel sources or headers.
bad=$(find csrc -type f \( -name '*.cu' -o -name '*.cuh' \) -print0 |
  xargs -0 -r grep -nE '^[[:space:]]*#[[:space:]]*include[[:space:]]*[<"](torch|ATen|c10)/' || true)
if [[ -n "$bad" ]]; then
  echo "error: CUDA kernel files must not include torch/ATen/c10 headers (keep the torch glue in .cpp files):" >&2
  echo "$bad" >&2
  exit 1
fi

# 2. The kernel files: *.cu directly inside a folder named cuda/ under csrc/ (as setup.py and CMake take them).
mapfile -t kernels < <(find csrc -type f -path '*/cuda/*.cu' | while read -r f; do
  [[ "$(basename "$(dirname "$f")")" == cuda ]] && echo "$f"
done | sort)
if [[ ${#kernels[@]} -eq 0 ]]; then
  echo "no CUDA kernel files yet"
  exit 0
fi

# 3. nvcc.
nvcc=""
if [[ -n "${NVCC:-}" ]]; then
  candidates=("$NVCC")
else
  candidates=("$(command -v nvcc || true)" "${CUDA_HOME:+$CUDA_HOME/bin/nvcc}" /usr/local/cuda/bin/nvcc)
fi
for candidate in "${candidates[@]}"; do
  if [[ -n "$candidate" && -x "$candidate" ]]; then nvcc="$candidate"; break; fi
done
if [[ -z "$nvcc" ]]; then
  if [[ "${CI_REQUIRE_NVCC:-0}" == 1 ]]; then
    echo "error: nvcc not found (CI_REQUIRE_NVCC=1): cannot compile ${#kernels[@]} CUDA kernel file(s)" >&2
    exit 1
  fi
  echo "warning: nvcc not found: skipping the compilation of ${#kernels[@]} CUDA kernel file(s)" >&2
  exit 0
fi
echo "checking ${#kernels[@]} CUDA kernel file(s) ($mode) with $nvcc ($("$nvcc" --version | tail -n 1))"

# 3b. CUTLASS headers (the atrous conv kernels): $CUTLASS_PATH/include, else the nvidia-cutlass wheel's copy.
py=${PYTHON:-python}
cutlass_include=""
if [[ -n "${CUTLASS_PATH:-}" ]]; then
  cutlass_include="$CUTLASS_PATH/include"
else
  cutlass_include=$("$py" -c 'import cutlass_library, os; print(os.path.join(os.path.dirname(cutlass_library.__file__), "source", "include"))' 2>/dev/null || true)
fi
if [[ -z "$cutlass_include" || ! -f "$cutlass_include/cutlass/cutlass.h" ]]; then
  if grep -lq 'include "cutlass/' "${kernels[@]}" csrc/*/cuda/*.cuh 2>/dev/null; then
    echo "error: the CUTLASS headers were not found (pip install nvidia-cutlass, or set CUTLASS_PATH)" >&2
    exit 1
  fi
  cutlass_include=""
else
  echo "CUTLASS headers: $cutlass_include"
fi

# 4. Preprocess (or compile) each one, with setup.py's nvcc flags.
out=$(mktemp -d "${TMPDIR:-/tmp}/deeplab_fast-cuda.XXXXXX")
trap 'rm -rf "$out"' EXIT
failed=0
for f in "${kernels[@]}"; do
  obj="$out/$(echo "$f" | tr '/' '_').o"
  start=$SECONDS
  if [[ $mode == compile ]]; then
    cmd=("$nvcc" -gencode=arch=compute_80,code=sm_80 -gencode=arch=compute_90,code=sm_90 -c -o "$obj")
  else
    cmd=("$nvcc" -gencode=arch=compute_90,code=sm_90 -E -o /dev/null)
  fi
  if "${cmd[@]}" -std=c++17 -O3 --fmad=false --expt-relaxed-constexpr -Icsrc \
      ${cutlass_include:+-I"$cutlass_include"} "$f"; then
    echo "ok   $f ($mode, $((SECONDS - start)) s)"
  else
    echo "FAIL $f ($mode)" >&2
    failed=$((failed + 1))
  fi
done
if [[ $failed -ne 0 ]]; then
  echo "error: $failed of ${#kernels[@]} CUDA kernel file(s) failed ($mode)" >&2
  exit 1
fi
if [[ $mode == compile ]]; then
  echo "all ${#kernels[@]} CUDA kernel file(s) compiled for sm_80 and sm_90"
else
  echo "all ${#kernels[@]} CUDA kernel file(s) preprocess with csrc/ and CUTLASS alone on the include path"
fi
