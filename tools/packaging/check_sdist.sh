#!/usr/bin/env bash
# The sdist builds and works in a fresh virtual environment that has torch:
#   1. a new venv that sees the torch of $PYTHON's environment (one .pth line to
#      its site-packages: no download, and the same torch the project builds
#      against), with setuptools, wheel, build and ninja from the package index;
#   2. python -m build --sdist --no-isolation  -> bsn_cuda-VERSION.tar.gz;
#   3. pip install --no-build-isolation of that tarball, CPU ops only
#      (BSN_CUDA_BUILD=0, MAX_JOBS=1 unless set: a few minutes on one core);
#   4. from outside the checkout: the installed copy is imported, its compiled
#      ops loaded, and one SN and one BSN layer run forward and backward.
# PYTHON: the interpreter of an environment with torch [.venv/bin/python].
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
PY=${PYTHON:-$root/.venv/bin/python}
work=$(mktemp -d "${TMPDIR:-/tmp}/bsn_sdist.XXXXXX")
trap 'rm -rf "$work"' EXIT

echo "== sdist check in $work (torch from $PY)"
"$PY" -m venv "$work/venv"
venv_py="$work/venv/bin/python"
torch_site=$("$PY" -c 'import os, torch; print(os.path.dirname(os.path.dirname(torch.__file__)))')
"$venv_py" - "$torch_site" <<'PY'
import sys, sysconfig, os
with open(os.path.join(sysconfig.get_paths()["purelib"], "torch_env.pth"), "w") as f:
    f.write(sys.argv[1] + "\n")
PY
"$venv_py" -m pip install -q --upgrade "setuptools>=64" wheel build ninja
export PATH="$work/venv/bin:$PATH"

"$venv_py" -m build --sdist --no-isolation --outdir "$work/dist" "$root" >"$work/sdist.log" 2>&1 \
  || { cat "$work/sdist.log"; exit 1; }
sdist=$(ls "$work"/dist/*.tar.gz)
tar tzf "$sdist" >"$work/files.txt"
echo "== built $(basename "$sdist"): $(wc -l <"$work/files.txt") files"
for need in pyproject.toml setup.py README.md csrc/ops.cpp csrc/cuda/launch.cu bsn_cuda/_version.py; do
  grep -q "/$need\$" "$work/files.txt" || { echo "the sdist lacks $need"; exit 1; }
done
if grep -q '\.so$' "$work/files.txt"; then echo "the sdist carries a compiled .so"; exit 1; fi

echo "== pip install --no-build-isolation $(basename "$sdist") (BSN_CUDA_BUILD=0)"
BSN_CUDA_BUILD=0 MAX_JOBS=${MAX_JOBS:-1} "$venv_py" -m pip install -q --no-build-isolation --no-deps "$sdist" \
  >"$work/install.log" 2>&1 || { tail -40 "$work/install.log"; exit 1; }

cd "$work"
"$venv_py" - "$work/venv" <<'PY'
import os, sys
import torch
import bsn_cuda

assert os.path.realpath(bsn_cuda.__file__).startswith(os.path.realpath(sys.argv[1])), bsn_cuda.__file__
assert bsn_cuda.HAS_EXTENSION, "the compiled ops did not load"
for layer in (bsn_cuda.spectral_norm(torch.nn.Conv2d(3, 8, 3)),
              bsn_cuda.bidirectional_spectral_norm(torch.nn.Conv2d(3, 8, 3), scale=1.4)):
    layer(torch.randn(2, 3, 8, 8)).sum().backward()
    assert torch.isfinite(layer.parametrizations.weight.original.grad).all()
print(f"== sdist OK: bsn_cuda {bsn_cuda.__version__} from {os.path.dirname(bsn_cuda.__file__)}, torch {torch.__version__}")
PY
