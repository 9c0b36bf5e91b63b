#!/usr/bin/env bash
# Checks that the CUDA kernels leave ptxas no mul+add to contract: in the PTX of
# every csrc/cuda/*.cu file, no floating-point multiply without an explicit
# rounding mode (mul.f32 / mul.f64; the kernels use fma_rn / mul_rn / add_rn of
# common.cuh). Then the Single, Coop and Multi kernels, which inline the same
# phases, round alike whatever ptxas decides per kernel. Needs nvcc, no GPU.
#   PYTHON=.venv/bin/python tools/gpu/check_rounding.sh
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
PY=${PYTHON:-python3}
NVCC=${CUDA_HOME:-/usr/local/cuda}/bin/nvcc
SP=$("$PY" -c "import os, torch; print(os.path.dirname(os.path.dirname(torch.__file__)))")
INC=(-I"$ROOT/csrc" -I"$SP/torch/include" -I"$SP/torch/include/torch/csrc/api/include")
for d in "$SP"/nvidia/cu13/include "$SP"/nvidia/cuda_runtime/include; do [ -d "$d" ] && INC+=(-I"$d"); done
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
bad=0
for cu in "$ROOT"/csrc/cuda/*.cu; do
  ptx=$TMP/$(basename "$cu" .cu).ptx
  "$NVCC" -std=c++20 -arch=sm_90 --ptx -O3 --expt-relaxed-constexpr "${INC[@]}" "$cu" -o "$ptx" 2>"$TMP/err" ||
    { cat "$TMP/err"; exit 1; }
  plain=$(grep -cE '^\s*mul\.f(32|64)\s' "$ptx" || true)
  counts=$({ grep -oE '\b(fma\.rn|mul\.rn|add\.rn|sub\.rn|div\.rn|add|mul)\.f(32|64)\b' "$ptx" || true; } | sort | uniq -c | awk '{printf "%s %s; ", $2, $1}')
  echo "$(basename "$cu"): plain multiplies: $plain; $counts"
  if [ "$plain" -ne 0 ]; then
    grep -nE -B3 '^\s*mul\.f(32|64)\s' "$ptx" | head -n 20
    bad=1
  fi
done
[ "$bad" -eq 0 ] && echo "OK: no contractible multiply in csrc/cuda"
exit "$bad"
