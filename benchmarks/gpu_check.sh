#!/usr/bin/env bash
# One-shot check of the CUDA backend on a GPU machine (torch installed, no network).
#
#   benchmarks/gpu_check.sh OUTDIR
#
# Steps (each under `timeout`, all within a ~345 s budget so the whole run stays
# under 6 minutes on one H100; a step that no longer fits is marked TIMEOUT):
#   1. build the extension in place (pip install -e ., fallback setup.py build_ext --inplace)
#   2. python -m pytest -q tests            (the whole suite; tests/test_cuda.py first)
#   3. compute-sanitizer memcheck / racecheck / initcheck / synccheck on
#      benchmarks/sanitize_ops.py (every op, dtype and launch mode)
#   4. the speed benchmark, if bsn_cuda.benchmark exists
# Logs are tee'd into OUTDIR (6 files at most: summary.txt, build.log, pytest.log,
# sanitize.log, bench.log, bench.json). OUTDIR/summary.txt lists PASS / FAIL /
# TIMEOUT / SKIP per step; the exit status is non-zero if any step did not pass
# (SKIP: tool or module not present).
#
# Environment: PYTHON (default: python3), BSN_CHECK_BUDGET (seconds, default 345),
# MAX_JOBS (default 16), TORCH_CUDA_ARCH_LIST (default 9.0).
set -uo pipefail

if [ "$#" -ne 1 ]; then
  echo "usage: $0 OUTDIR" >&2
  exit 2
fi
OUTDIR=$1
mkdir -p "$OUTDIR"
OUTDIR=$(cd "$OUTDIR" && pwd)
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 2

PYTHON=${PYTHON:-python3}  # the GPU image's python3 is the one with torch
BUDGET=${BSN_CHECK_BUDGET:-345}
START=$(date +%s)
SUMMARY=$OUTDIR/summary.txt
FAILED=0

remaining() { echo $((BUDGET - ($(date +%s) - START))); }

record() {  # record NAME STATUS SECONDS [NOTE]
  printf '%-12s %-8s %4ss  %s\n' "$1" "$2" "$3" "${4:-}" | tee -a "$SUMMARY"
  case "$2" in PASS | SKIP) ;; *) FAILED=1 ;; esac
}

# run_step NAME CAP LOG CMD...: runs CMD with a timeout of min(CAP, time left), tee'd to LOG.
run_step() {
  local name=$1 cap=$2 log=$3
  shift 3
  local left
  left=$(remaining)
  if [ "$left" -lt 10 ]; then
    record "$name" TIMEOUT 0 "no time left in the ${BUDGET}s budget"
    return 1
  fi
  local limit=$((cap < left ? cap : left))
  echo "== $name (timeout ${limit}s): $*" | tee -a "$log"
  local t0 rc
  t0=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$log"
  rc=${PIPESTATUS[0]}
  local dt=$(($(date +%s) - t0))
  if [ "$rc" -eq 0 ]; then
    record "$name" PASS "$dt"
  elif [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    record "$name" TIMEOUT "$dt" "killed after ${limit}s (see $(basename "$log"))"
  else
    record "$name" FAIL "$dt" "exit $rc (see $(basename "$log"))"
  fi
  return "$rc"
}

: >"$SUMMARY"
{
  echo "bsn_cuda GPU check"
  echo "date:   $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
  if command -v git >/dev/null 2>&1 && git -C "$ROOT" rev-parse HEAD >/dev/null 2>&1; then
    echo "commit: $(git -C "$ROOT" rev-parse HEAD)$(git -C "$ROOT" diff --quiet HEAD 2>/dev/null || echo ' (+ uncommitted changes)')"
  else
    echo "commit: unknown"
  fi
  if command -v nvidia-smi >/dev/null 2>&1; then
    echo "gpu:    $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | head -n 4 | tr '\n' ';')"
  else
    echo "gpu:    (nvidia-smi not found)"
  fi
  echo "torch:  $("$PYTHON" -c 'import torch; print(torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())' 2>&1 | tail -n 1)"
  echo "budget: ${BUDGET}s"
  echo
} | tee -a "$SUMMARY"

# 1. Build in place.
export MAX_JOBS=${MAX_JOBS:-16}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export BSN_CUDA_BUILD=1
build() {
  if "$PYTHON" -m pip install --no-build-isolation --no-deps -e . ; then
    return 0
  fi
  echo "== pip install failed; falling back to setup.py build_ext --inplace"
  "$PYTHON" setup.py build_ext --inplace
}
export -f build
export PYTHON
if ! run_step build 180 "$OUTDIR/build.log" bash -c build; then
  echo "build failed; the remaining steps would test a stale or missing extension" | tee -a "$SUMMARY"
  exit 1
fi
"$PYTHON" - <<'PY' 2>&1 | tee -a "$OUTDIR/build.log" "$SUMMARY"
import torch, bsn_cuda
ok = bsn_cuda.HAS_EXTENSION and torch._C._dispatch_has_kernel_for_dispatch_key("bsn_cuda::sn_forward", "CUDA")
print(f"extension loaded: {bsn_cuda.HAS_EXTENSION}; CUDA kernels registered: {ok}")
PY

# 2. The test suite: the CUDA backend's tests first (so that they have run if
#    time runs out), then everything else.
run_step pytest-cuda 120 "$OUTDIR/pytest.log" "$PYTHON" -m pytest -q -p no:cacheprovider --durations=10 \
  tests/test_cuda.py
run_step pytest 200 "$OUTDIR/pytest.log" "$PYTHON" -m pytest -q -p no:cacheprovider --durations=10 \
  tests --ignore=tests/test_cuda.py

# 3. compute-sanitizer.
SANITIZER=$(command -v compute-sanitizer || true)
if [ -z "$SANITIZER" ]; then
  for c in "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer" /usr/local/cuda/bin/compute-sanitizer; do
    if [ -x "$c" ]; then SANITIZER=$c; break; fi
  done
fi
SAN_LOG=$OUTDIR/sanitize.log
if [ -z "$SANITIZER" ]; then
  for tool in memcheck racecheck initcheck synccheck; do record "$tool" SKIP 0 "compute-sanitizer not found"; done
else
  # Without the caching allocator every tensor is its own allocation, so memcheck
  # sees out-of-bounds accesses that would otherwise land in a cached block.
  export PYTORCH_NO_CUDA_MEMORY_CACHING=1
  run_step memcheck 70 "$SAN_LOG" "$SANITIZER" --tool memcheck --error-exitcode 1 \
    "$PYTHON" benchmarks/sanitize_ops.py
  run_step racecheck 60 "$SAN_LOG" "$SANITIZER" --tool racecheck --racecheck-report all --error-exitcode 1 \
    "$PYTHON" benchmarks/sanitize_ops.py --dtypes float32,float64,bfloat16 --quick
  run_step initcheck 45 "$SAN_LOG" "$SANITIZER" --tool initcheck --track-unused-memory no --error-exitcode 1 \
    "$PYTHON" benchmarks/sanitize_ops.py --dtypes float32,float16 --quick
  run_step synccheck 45 "$SAN_LOG" "$SANITIZER" --tool synccheck --error-exitcode 1 \
    "$PYTHON" benchmarks/sanitize_ops.py --dtypes float32,float64 --quick
  unset PYTORCH_NO_CUDA_MEMORY_CACHING
fi

# 4. Speed benchmark (written by another part of the project; optional).
if "$PYTHON" -c 'import bsn_cuda.benchmark' >/dev/null 2>&1; then
  run_step bench 60 "$OUTDIR/bench.log" "$PYTHON" -m bsn_cuda.benchmark --device cuda --quick \
    --no-progress --json "$OUTDIR/bench.json"
else
  record bench SKIP 0 "bsn_cuda.benchmark not importable"
fi

echo | tee -a "$SUMMARY"
echo "total: $(($(date +%s) - START))s; $([ "$FAILED" -eq 0 ] && echo 'ALL PASSED' || echo 'SOME STEPS DID NOT PASS')" | tee -a "$SUMMARY"
exit "$FAILED"
