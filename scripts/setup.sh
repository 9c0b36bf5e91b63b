#!/usr/bin/env bash
# Sourced by scripts/test.sh and scripts/bench.sh: makes a virtual environment
# (default .venv; BSN_VENV overrides) with torch and the tools, then builds
# bsn_cuda in place. CUDA ops are built when torch is a CUDA build and a CUDA
# toolkit is found (see setup.py); no GPU is needed to build them.
#
# A second run is quick: the dependency install and the build are skipped when
# a stamp says nothing they depend on changed (for the build: the C++/CUDA
# sources, setup.py, pyproject.toml, the Python and torch versions, the build settings).
# BSN_FORCE_BUILD=1 rebuilds anyway.
set -euo pipefail
BSN_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export BSN_ROOT
BSN_VENV=${BSN_VENV:-$BSN_ROOT/.venv}

if [ ! -x "$BSN_VENV/bin/python" ]; then
  echo "== creating $BSN_VENV"
  "${PYTHON:-python3}" -m venv "$BSN_VENV"
fi
# shellcheck disable=SC1091
. "$BSN_VENV/bin/activate"

# Test and benchmark tools. scikit-learn: the offline data set of examples/train_gan.py;
# onnx, onnxscript, onnxruntime: the ONNX export tests.
BSN_DEPS="ninja pybind11 numpy pytest pytest-benchmark hypothesis matplotlib tqdm scikit-learn onnx onnxscript onnxruntime"
deps_stamp="$BSN_VENV/.bsn_deps_stamp"
deps_key="$BSN_DEPS|$(python -c 'import sys; print(sys.version)')"
if [ -f "$deps_stamp" ] && [ "$(cat "$deps_stamp")" = "$deps_key" ] && python -c "import torch" 2>/dev/null; then
  echo "== dependencies: installed already (stamp $deps_stamp)"
else
  echo "== installing dependencies"
  python -m pip install -q --upgrade pip setuptools wheel
  if ! python -c "import torch" 2>/dev/null; then
    python -m pip install "torch>=2.4"
  fi
  # shellcheck disable=SC2086
  python -m pip install -q $BSN_DEPS
  printf '%s' "$deps_key" >"$deps_stamp"
fi

export MAX_JOBS=${MAX_JOBS:-$(nproc)}
# Everything the compiled extension depends on: a change to any of it rebuilds.
build_key=$(
  cd "$BSN_ROOT"
  {
    python -c 'import sys, torch; print(sys.version); print(torch.__version__, torch.version.cuda, torch.__file__)'
    for var in BSN_CUDA_BUILD TORCH_CUDA_ARCH_LIST CUDA_HOME CUDA_PATH CC CXX CFLAGS CXXFLAGS LDFLAGS; do
      echo "$var=${!var-<unset>}"
    done
    command -v nvcc || true
    find csrc setup.py pyproject.toml -type f \( -name '*.cpp' -o -name '*.cu' -o -name '*.cuh' -o -name '*.h' -o -name '*.py' -o -name '*.toml' \) \
      -print0 | sort -z | xargs -0 sha256sum
  } | sha256sum | cut -d' ' -f1
)
build_stamp="$BSN_VENV/.bsn_build_stamp"
built_here=$(python - <<'PY' 2>/dev/null || true
import glob, os
root = os.environ["BSN_ROOT"]
print("yes" if glob.glob(os.path.join(root, "bsn_cuda", "_C*.so")) else "no")
PY
)
if [ "${BSN_FORCE_BUILD:-0}" != "1" ] && [ "$built_here" = "yes" ] && [ -f "$build_stamp" ] \
   && [ "$(cat "$build_stamp")" = "$BSN_ROOT $build_key" ]; then
  echo "== bsn_cuda: build is up to date (stamp $build_stamp); BSN_FORCE_BUILD=1 rebuilds"
else
  echo "== building bsn_cuda (MAX_JOBS=$MAX_JOBS, TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-default})"
  rm -f "$build_stamp"
  python -m pip install --no-build-isolation --no-deps -e "$BSN_ROOT"
  printf '%s' "$BSN_ROOT $build_key" >"$build_stamp"
fi

# The tests must run the extension built from this checkout.
python - <<'PY'
import os, sys
import torch
import bsn_cuda

root = os.path.realpath(os.environ["BSN_ROOT"])
if not bsn_cuda.HAS_EXTENSION:
    sys.exit("bsn_cuda._C did not load: the compiled ops were not built")
import bsn_cuda._C

so = os.path.realpath(bsn_cuda._C.__file__)
print(f"bsn_cuda._C: {so}")
if not so.startswith(root + os.sep):
    sys.exit(f"bsn_cuda._C was loaded from {so}, not from this checkout ({root})")
want_cuda = os.environ.get("BSN_CUDA_BUILD") == "1"
has_cuda = torch._C._dispatch_has_kernel_for_dispatch_key("bsn_cuda::sn_forward", "CUDA")
print(f"torch {torch.__version__}, CUDA kernels registered: {has_cuda}")
if want_cuda and not has_cuda:
    sys.exit("BSN_CUDA_BUILD=1 but the CUDA kernels are not registered")
PY
