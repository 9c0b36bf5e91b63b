#!/usr/bin/env bash
# Build the CPU ops with clang (Debian's, the stand-in for Apple clang: no
# OpenMP runtime, so setup.py picks -fopenmp-simd) in a temp copy of the
# sources, and run CPU tests against that build: the ops against the
# reference, bitwise independence of the thread count, the device fallback.
#
#   PYTHON=path/to/python   the Python with torch and pytest (default: python)
#   CLANGXX=...             the compiler (default: clang++; installed with
#                           apt-get when missing and running as root)
#   MAX_JOBS                parallel compile jobs (default 2)
#   Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
root=$PWD
PY=${PYTHON:-python}
CLANGXX=${CLANGXX:-clang++}

if ! command -v "$CLANGXX" >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "== installing clang"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq clang >/dev/null
  else
    echo "build_clang.sh: expected $CLANGXX on PATH (apt-get install clang), got none" >&2
    exit 1
  fi
fi
clangcc=${CLANGCC:-$(echo "$CLANGXX" | sed 's/clang++/clang/')}

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# The sources only: no in-place build of the main tree may leak in.
cp -r setup.py pyproject.toml README.md csrc bsn_cuda tests "$work/"
rm -f "$work"/bsn_cuda/_C*.so "$work"/bsn_cuda/_C*.pyd
cd "$work"

echo "== $("$CLANGXX" --version | head -1)"
CXX=$CLANGXX CC=$clangcc BSN_CUDA_BUILD=0 MAX_JOBS=${MAX_JOBS:-2} "$PY" setup.py -q build_ext --inplace 2>&1 |
  grep -v "^W[0-9]* .*No CUDA runtime is found" || true
[ -f "$(ls bsn_cuda/_C*.so 2>/dev/null | head -1)" ] || { echo "build_clang.sh: the clang build failed" >&2; exit 1; }

# The build's compiler and OpenMP use, read from the binary: clang, no OpenMP runtime.
so=$(ls bsn_cuda/_C*.so | head -1)
if readelf -p .comment "$so" | grep -q "clang"; then echo "== built by clang: $so"; else
  echo "build_clang.sh: $so was not built by clang" >&2; exit 1; fi
if readelf -d "$so" | grep -Eq "NEEDED.*lib(g|i)?omp"; then
  echo "build_clang.sh: $so links an OpenMP runtime, expected none" >&2; exit 1; fi

# Run from the copy, so that `import bsn_cuda` is the clang build (checked).
"$PY" -c "import bsn_cuda, sys; f = bsn_cuda._ops._C.__file__; print('== testing', f); sys.exit(not f.startswith('$work'))"
"$PY" -m pytest -q -p no:cacheprovider \
  tests/ops/test_numerics.py tests/ops/test_autograd.py tests/ops/test_op_registration.py \
  tests/ops/test_determinism.py tests/ops/test_fallback.py tests/training/test_reproducibility.py \
  "tests/ops/test_special_values.py::test_zero_weight_gives_scaled_weight_and_finite_grads" \
  "tests/ops/test_special_values.py::test_non_finite_weight_keeps_buffers" \
  "tests/ops/test_bad_arguments.py::test_bad_inputs_raise_naming_the_argument" \
  -k "not cuda" "$@"
echo "== clang build: tests pass (sources from $root)"
