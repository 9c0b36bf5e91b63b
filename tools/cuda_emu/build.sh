#!/usr/bin/env bash
# Build the CPU emulation of csrc/cuda/kernels.cu: tools/cuda_emu/build/libemu${SUFFIX}.so.
# usage: PYTHON=.venv/bin/python tools/cuda_emu/build.sh [extra g++ flags, e.g. -fsanitize=thread]
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
PY=${PYTHON:-python3}
SP=$("$PY" -c "import os, torch; print(os.path.dirname(os.path.dirname(torch.__file__)))")
CUDA_INC=${CUDA_HOME:-/usr/local/cuda}/include
mkdir -p "$HERE/build"
"$PY" "$HERE/gen.py" "$ROOT/csrc/cuda/kernels.cu" "$HERE/build/kernels_emu.cpp"
g++ -std=c++20 -O1 -g -fPIC -shared -pthread -Wno-unknown-pragmas "$@" \
  -I"$HERE" -I"$ROOT/csrc/cuda" -I"$ROOT/csrc" -I"$SP/torch/include" -I"$CUDA_INC" \
  "$HERE/build/kernels_emu.cpp" -o "$HERE/build/libemu${SUFFIX:-}.so" \
  -L"$SP/torch/lib" -lc10 -Wl,-rpath,"$SP/torch/lib" -Wl,-Bsymbolic
echo "built $HERE/build/libemu${SUFFIX:-}.so"
