#!/usr/bin/env bash
# Sourced by scripts/test.sh and scripts/bench.sh: makes a virtual environment
# (default .venv; BSN_VENV overrides) with torch and the tools, then builds
# bsn_cuda in place. CUDA ops are built when torch is a CUDA build and a CUDA
# toolkit is found (see setup.py); no GPU is needed to build them.
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

echo "== installing dependencies"
python -m pip install -q --upgrade pip setuptools wheel
if ! python -c "import torch" 2>/dev/null; then
  python -m pip install "torch>=2.4"
fi
python -m pip install -q ninja pybind11 numpy pytest pytest-benchmark hypothesis matplotlib tqdm

echo "== building bsn_cuda (MAX_JOBS=${MAX_JOBS:=$(nproc)}, TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-default})"
export MAX_JOBS
python -m pip install --no-build-isolation --no-deps -e "$BSN_ROOT"

# The tests must run the extension built just now from this checkout.
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
