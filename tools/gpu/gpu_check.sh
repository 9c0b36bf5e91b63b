#!/usr/bin/env bash
# One-shot check of the CUDA backend on a GPU machine (torch installed, no network),
# sized for one device call: the whole run, build included, stays within
# BSN_CHECK_BUDGET (470 s by default; under 8 minutes on an H200).
#
#   tools/gpu/gpu_check.sh [--dry-run] OUTDIR
#
# Steps, in order of what they tell (each under `timeout`, capped; the caps add
# up to the budget, so a step only runs out of time if it runs past its own cap):
#   build       python setup.py build_ext --inplace (BSN_CUDA_BUILD=1, MAX_JOBS=16)     125 s
#   pytest      tests/cuda/test_cuda.py, then the CUDA parametrizations of the others 120 s
#   memcheck    compute-sanitizer on tools/gpu/sanitize_ops.py --quick (float32, float64) 55 s
#   bench       python -m bsn_cuda.benchmark --device cuda --quick: the goal table      80 s
#   racecheck / initcheck / synccheck   sanitize_ops.py --quick, float32            35/30/25 s
#   the rest, only with time left over: memcheck on every dtype and the moderate
#   weights; the BigGAN discriminator's training forward (fused SN and BSN).
#
# OUTDIR gets at most 8 files, no folders: summary.txt (steps with PASS / FAIL /
# TIMEOUT / SKIP, then the first failing test with its assertion, each
# sanitizer's first report, the goal table), build.log, pytest.log,
# sanitize.log, bench.log, bench.json, bench.md, rest.log. Exit status: 0 when
# every step passed or was skipped.
#
# --dry-run runs the same logic on a machine without a GPU: nvidia-smi and
# compute-sanitizer are stubs (the stub runs the program it is given, and with
# GPU_CHECK_FAKE_REPORT=TOOL prints a made-up report for that tool and fails),
# sanitize_ops.py and the benchmark run on the CPU, and the CUDA tests skip;
# GPU_CHECK_FAKE_FAILURE=1 adds a failing test, to see how a failure is reported.
#
# Environment: PYTHON (default python3), BSN_CHECK_BUDGET (seconds, default 470),
# MAX_JOBS (default 16), TORCH_CUDA_ARCH_LIST (default 9.0).
set -uo pipefail

DRY=0
if [ "${1:-}" = "--dry-run" ]; then
  DRY=1
  shift
fi
if [ "$#" -ne 1 ]; then
  echo "usage: $0 [--dry-run] OUTDIR" >&2
  exit 2
fi
OUTDIR=$1
mkdir -p "$OUTDIR"
OUTDIR=$(cd "$OUTDIR" && pwd)
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$ROOT" || exit 2

PYTHON=${PYTHON:-python3}  # the GPU image's python3 is the one with torch
BUDGET=${BSN_CHECK_BUDGET:-470}
START=$(date +%s)
SUMMARY=$OUTDIR/summary.txt
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
FAILED=0
DEV=cuda
export PYTHONUNBUFFERED=1

if [ "$DRY" -eq 1 ]; then
  # Stubs first on the PATH. The sanitizer stub drops its own options and runs
  # the program (what follows the first argument that is not an option).
  mkdir -p "$WORK/bin"
  cat >"$WORK/bin/nvidia-smi" <<'EOF'
#!/usr/bin/env bash
echo "DRY RUN (no GPU), stub nvidia-smi"
EOF
  cat >"$WORK/bin/compute-sanitizer" <<'EOF'
#!/usr/bin/env bash
tool=memcheck
while [ "$#" -gt 0 ]; do
  case "$1" in
    --tool) tool=$2; shift 2 ;;
    --error-exitcode | --racecheck-report | --track-unused-memory | --print-limit) shift 2 ;;
    -*) shift ;;
    *) break ;;
  esac
done
echo "========= COMPUTE-SANITIZER (dry-run stub, $tool)"
"$@"
rc=$?
if [ "${GPU_CHECK_FAKE_REPORT:-}" = "$tool" ]; then
  echo "========= Invalid __global__ read of size 4 bytes (made up by the dry-run stub)"
  echo "=========     at phase_a_impl+0x1a0 in forward.cu:123"
  echo "=========     by thread (3,0,0) in block (1,0,0)"
  echo "========= ERROR SUMMARY: 1 error"
  exit 1
fi
echo "========= ERROR SUMMARY: 0 errors"
exit $rc
EOF
  chmod +x "$WORK/bin/nvidia-smi" "$WORK/bin/compute-sanitizer"
  export PATH="$WORK/bin:$PATH"
  DEV=cpu
fi

remaining() { echo $((BUDGET - ($(date +%s) - START))); }

# Step caps (seconds); they add up to the default budget.
declare -A CAP=([build]=125 [pytest]=120 [memcheck]=55 [bench]=80 [racecheck]=35 [initcheck]=30 [synccheck]=25)
CAP_SUM=0
for c in "${CAP[@]}"; do CAP_SUM=$((CAP_SUM + c)); done

record() {  # record NAME STATUS SECONDS [NOTE]
  printf '%-10s %-8s %4ss  %s\n' "$1" "$2" "$3" "${4:-}" | tee -a "$SUMMARY"
  case "$2" in PASS | SKIP) ;; *) FAILED=1 ;; esac
}

# run_step NAME CAP LOG CMD...: runs CMD under a timeout of min(CAP, time left),
# its output appended to LOG (and kept in $WORK/NAME.out for the summary).
run_step() {
  local name=$1 cap=$2 log=$3
  shift 3
  local left
  left=$(remaining)
  if [ "$left" -lt 10 ]; then
    record "$name" TIMEOUT 0 "not started: no time left in the ${BUDGET}s budget"
    return 124
  fi
  local limit=$((cap < left ? cap : left))
  echo "== $name (timeout ${limit}s): $*" >>"$log"
  echo "== $name (timeout ${limit}s)"
  local t0 rc
  t0=$(date +%s)
  timeout --kill-after=5 "$limit" "$@" >"$WORK/$name.out" 2>&1
  rc=$?
  cat "$WORK/$name.out" >>"$log"
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

# The first report of a sanitizer run: from the first '=========' line that is
# not the banner or the summary, 25 lines.
first_report() {
  grep -n '^========= ' "$1" | grep -v 'COMPUTE-SANITIZER\|ERROR SUMMARY: 0 errors\|RACECHECK SUMMARY: 0 hazards' |
    head -n 1 | cut -d: -f1 | while read -r n; do sed -n "${n},$((n + 24))p" "$1"; done
}

: >"$SUMMARY"
{
  echo "bsn_cuda GPU check$([ "$DRY" -eq 1 ] && echo ' (DRY RUN: no GPU, stubs and CPU)')"
  echo "date:   $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
  if command -v git >/dev/null 2>&1 && git -C "$ROOT" rev-parse HEAD >/dev/null 2>&1; then
    echo "commit: $(git -C "$ROOT" rev-parse HEAD)$(git -C "$ROOT" diff --quiet HEAD 2>/dev/null || echo ' (+ uncommitted changes)')"
  else
    echo "commit: unknown (no git metadata)"
  fi
  if command -v nvidia-smi >/dev/null 2>&1; then
    echo "gpu:    $(timeout 20 nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader 2>&1 | head -n 4 | tr '\n' ';')"
  else
    echo "gpu:    (nvidia-smi not found)"
  fi
  echo "torch:  $(timeout 60 "$PYTHON" -c 'import torch; print(torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())' 2>&1 | tail -n 1)"
  echo "nvcc:   $({ "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc" --version || nvcc --version; } 2>/dev/null | grep -o 'release [0-9.]*' | head -n 1)"
  echo "budget: ${BUDGET}s (step caps add up to ${CAP_SUM}s$([ "$CAP_SUM" -gt "$BUDGET" ] && echo ': the last steps may be cut'))"
  echo
} | tee -a "$SUMMARY"

# 1. Build in place (no pip: nothing is installed into the image's Python).
export MAX_JOBS=${MAX_JOBS:-16}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export BSN_CUDA_BUILD=1
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then export CUDA_HOME=/usr/local/cuda; fi
if ! run_step build "${CAP[build]}" "$OUTDIR/build.log" "$PYTHON" setup.py build_ext --inplace; then
  tail -n 30 "$WORK/build.out" | grep -i -m 5 'error' | sed 's/^/  /' | tee -a "$SUMMARY"
  echo "build failed: the other steps would test a stale or missing extension" | tee -a "$SUMMARY"
  exit 1
fi
timeout 60 "$PYTHON" - <<'PY' 2>&1 | tee -a "$OUTDIR/build.log" "$SUMMARY"
import torch, bsn_cuda
ok = bsn_cuda.HAS_EXTENSION and torch._C._dispatch_has_kernel_for_dispatch_key("bsn_cuda::sn_forward", "CUDA")
print(f"extension loaded: {bsn_cuda.HAS_EXTENSION}; CUDA kernels registered: {ok}")
PY

# 2. The CUDA tests: tests/cuda/test_cuda.py first, then every test whose id says
#    cuda (tests/cuda/, the device parametrizations of the other files) and the
#    whole-model reduce-overhead test of tests/training/test_compile.py. CI runs the rest.
# -v: a killed run still names every test that had failed by then.
PYTEST_ARGS=(-v -p no:cacheprovider -rfE --tb=short --durations=10 --maxfail=25 --junitxml="$WORK/junit.xml")
if "$PYTHON" -c 'import pytest_timeout' >/dev/null 2>&1; then PYTEST_ARGS+=(--timeout=60); fi
PYTEST_FILES=(tests/cuda/test_cuda.py tests)
if [ "$DRY" -eq 1 ] && [ -n "${GPU_CHECK_FAKE_FAILURE:-}" ]; then
  printf 'def test_fake_cuda_failure():\n    x = 1\n    assert x == 2, "made up by gpu_check.sh --dry-run"\n' >"$WORK/test_fake_cuda.py"
  PYTEST_FILES+=("$WORK/test_fake_cuda.py")
fi
run_step pytest "${CAP[pytest]}" "$OUTDIR/pytest.log" "$PYTHON" -m pytest "${PYTEST_ARGS[@]}" \
  "${PYTEST_FILES[@]}" -k "cuda or test_torch_compile_reduce_overhead_matches_eager" --ignore=tests/cuda/test_cuda_plans.py
PYTEST_RC=$?

# 3. compute-sanitizer. PYTORCH_NO_CUDA_MEMORY_CACHING: every tensor its own
#    allocation, so out-of-bounds accesses do not land in a cached block.
SANITIZER=$(command -v compute-sanitizer || true)
if [ -z "$SANITIZER" ] && [ -x "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer" ]; then
  SANITIZER=${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer
fi
SAN_LOG=$OUTDIR/sanitize.log
SAN_OK=1
SAN_OPS=(tools/gpu/sanitize_ops.py --device "$DEV" --quick)
sanitize() {  # sanitize NAME CAP TOOL_ARGS... -- OPS_ARGS...
  local name=$1 cap=$2
  shift 2
  local tool_args=()
  while [ "$1" != "--" ]; do tool_args+=("$1"); shift; done
  shift
  if [ -z "$SANITIZER" ]; then record "$name" SKIP 0 "compute-sanitizer not found"; return; fi
  if [ "$SAN_OK" -eq 0 ]; then record "$name" SKIP 0 "compute-sanitizer cannot use this GPU (see memcheck)"; return; fi
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 run_step "$name" "$cap" "$SAN_LOG" "$SANITIZER" "${tool_args[@]}" \
    --error-exitcode 1 "$PYTHON" "$@"
  local rc=$?
  if grep -q 'Device not supported\|Unable to find injection library\|Target application terminated before first instrumented API call' "$WORK/$name.out"; then
    SAN_OK=0  # e.g. gVisor: the sanitizer refuses the device; not a finding about the kernels
    echo "  $name: compute-sanitizer cannot instrument this GPU/runtime; sanitizer steps skipped" | tee -a "$SUMMARY"
  elif [ "$rc" -ne 0 ]; then
    first_report "$WORK/$name.out" >"$WORK/$name.report"
  fi
}
sanitize memcheck "${CAP[memcheck]}" --tool memcheck --print-limit 20 -- "${SAN_OPS[@]}" --dtypes float32,float64

# 4. The benchmark's goal table (SNGAN CNN layers, end-to-end step).
BENCH=(-m bsn_cuda.benchmark --device "$DEV" --quick --no-progress --json "$OUTDIR/bench.json" --markdown "$OUTDIR/bench.md")
if [ "$DRY" -eq 1 ]; then BENCH+=(--suite sngan_cnn --mode train --impls torch_sn,fused_sn); fi
run_step bench "${CAP[bench]}" "$OUTDIR/bench.log" "$PYTHON" "${BENCH[@]}"

# 5. The other sanitizers.
sanitize racecheck "${CAP[racecheck]}" --tool racecheck --racecheck-report all -- "${SAN_OPS[@]}" --dtypes float32
sanitize initcheck "${CAP[initcheck]}" --tool initcheck --track-unused-memory no -- "${SAN_OPS[@]}" --dtypes float32
sanitize synccheck "${CAP[synccheck]}" --tool synccheck -- "${SAN_OPS[@]}" --dtypes float32

# 6. The rest, with whatever time is left (not counted as failures when cut short).
rest_step() {  # rest_step NAME CMD...
  local name=$1
  shift
  local left
  left=$(remaining)
  if [ "$left" -lt 30 ]; then
    printf '%-10s %-8s %4ss  %s\n' "$name" "NOT RUN" 0 "only ${left}s left" | tee -a "$SUMMARY"
    return
  fi
  echo "== $name (timeout $((left - 5))s): $*" >>"$OUTDIR/rest.log"
  local t0 rc dt
  t0=$(date +%s)
  timeout --kill-after=5 $((left - 5)) "$@" >>"$OUTDIR/rest.log" 2>&1
  rc=$?
  dt=$(($(date +%s) - t0))
  case "$rc" in
    0) printf '%-10s %-8s %4ss\n' "$name" PASS "$dt" | tee -a "$SUMMARY" ;;
    124 | 137) printf '%-10s %-8s %4ss  %s\n' "$name" CUT "$dt" "out of time (see rest.log)" | tee -a "$SUMMARY" ;;
    *) record "$name" FAIL "$dt" "exit $rc (see rest.log)" ;;
  esac
}
# Registers, spills and shared memory per kernel, and the instruction mix
# (FFMA/FMUL/FADD, vector loads) of the machine code that ran.
sass_report() {
  local so
  so=$(ls bsn_cuda/_C*.so | head -n 1)
  local demangle=cat
  if command -v c++filt >/dev/null 2>&1; then demangle=c++filt; fi
  cuobjdump -res-usage "$so" | grep -A1 'Function' |
    grep -o 'Function [^:]*\|REG:[0-9]*\|STACK:[0-9]*\|SHARED:[0-9]*\|LOCAL:[0-9]*' |
    paste -d' ' - - - - - | "$demangle" | sed 's/bsn::cuda:://g; s/(anonymous namespace):://g' | sort -u
  cuobjdump -sass "$so" | sass_opcodes | grep -E '^(FFMA|FMUL|FADD|DFMA|DMUL|DADD|LDG|STG|LDS|STS|LD|ST)(\.|$)' |
    sort | uniq -c | sort -rn | head -n 30
}
sass_opcodes() {  # opcode (with its suffixes) of every SASS instruction, predicates dropped
  sed -nE 's#^ +/\*[0-9a-f]{4}\*/ +(@!?U?P[0-9T] +)?([A-Z][A-Z0-9]*(\.[A-Z0-9_]+)*).*#\2#p'
}
export -f sass_opcodes
export -f sass_report
if command -v cuobjdump >/dev/null 2>&1; then rest_step sass bash -c sass_report; fi
if [ -n "$SANITIZER" ] && [ "$SAN_OK" -eq 1 ]; then
  rest_step memcheck+ env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SANITIZER" --tool memcheck --print-limit 20 \
    --error-exitcode 1 "$PYTHON" tools/gpu/sanitize_ops.py --device "$DEV"
fi
REST_BENCH=(-m bsn_cuda.benchmark --device "$DEV" --suite biggan_d --mode train --impls fused_sn,fused_bsn --no-progress)
if [ "$DRY" -eq 1 ]; then REST_BENCH=(-m bsn_cuda.benchmark --device cpu --suite sngan_resnet --mode eval --impls fused_sn --quick --no-progress); fi
rest_step biggan "$PYTHON" "${REST_BENCH[@]}"

# Summary: what failed, in the words of the tools.
{
  echo
  echo "total: $(($(date +%s) - START))s of ${BUDGET}s; $([ "$FAILED" -eq 0 ] && echo 'ALL PASSED' || echo 'SOME STEPS DID NOT PASS')"
  if [ "$PYTEST_RC" -ne 0 ]; then
    echo
    echo "-- first failing test (pytest.log has all of them):"
    if [ -s "$WORK/junit.xml" ]; then
      "$PYTHON" - "$WORK/junit.xml" <<'PY'
import sys, xml.etree.ElementTree as ET
for case in ET.parse(sys.argv[1]).getroot().iter("testcase"):
    for tag in ("failure", "error"):
        node = case.find(tag)
        if node is not None:
            print(f"{case.get('classname')}::{case.get('name')} ({tag})")
            print("\n".join(("  " + l) for l in (node.text or node.get("message") or "").splitlines()[-25:]))
            sys.exit(0)
print("  (no failing test case in the JUnit report: see pytest.log)")
PY
    fi
    grep -E '^(FAILED|ERROR) |(FAILED|ERROR)( +\[)' "$WORK/pytest.out" | head -n 10 | sed 's/^/  /'
  fi
  for tool in memcheck racecheck initcheck synccheck; do
    if [ -s "$WORK/$tool.report" ]; then
      echo
      echo "-- $tool: first report (sanitize.log has all of them):"
      sed 's/^/  /' "$WORK/$tool.report"
    fi
  done
  echo
  echo "-- goal table (bench.log, bench.md):"
  goals=$([ -s "$WORK/bench.out" ] && awk '/^== goals/ {p = 1} p && NF == 0 {exit} p' "$WORK/bench.out" | head -n 40)
  if [ -n "$goals" ]; then
    echo "$goals" | sed 's/^/  /'
  else
    echo "  (none: the benchmark did not finish; bench.log has what it measured)"
  fi
  echo
  echo "model vs measurement: tools/gpu/model_predictions.md"
} | tee -a "$SUMMARY"
exit "$FAILED"
