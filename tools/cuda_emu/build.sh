#!/usr/bin/env bash
# Build the CPU emulation of csrc/cuda: tools/cuda_emu/build/libemu${SUFFIX}.so.
# Each .cu file is its own translation unit, as in the real build.
# usage: PYTHON=.venv/bin/python tools/cuda_emu/build.sh [extra g++ flags, e.g. -fsanitize=thread]
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
PY=${PYTHON:-python3}
SP=$("$PY" -c "import os, torch; print(os.path.dirname(os.path.dirname(torch.__file__)))")
CUDA_INC=${CUDA_HOME:-/usr/local/cuda}/include
GEN=$HERE/build/gen${SUFFIX:-}
OBJ=$HERE/build/obj${SUFFIX:-}
mkdir -p "$GEN/cuda" "$OBJ"
for h in "$ROOT"/csrc/cuda/*.cuh; do
  "$PY" "$HERE/gen.py" "$h" "$GEN/cuda/$(basename "$h")"
done
srcs=()
for f in "$ROOT"/csrc/cuda/*.cu; do
  name=$(basename "${f%.cu}")
  "$PY" "$HERE/gen.py" "$f" "$GEN/$name.cpp"
  srcs+=("$GEN/$name.cpp")
done
FLAGS=(-std=c++20 -O1 -g -fPIC -pthread -Wno-unknown-pragmas "$@"
  -I"$GEN" -I"$HERE" -I"$ROOT/csrc" -I"$SP/torch/include" -I"$CUDA_INC")
objs=()
for src in "${srcs[@]}" "$ROOT/csrc/cuda/plan.cpp" "$HERE/harness.cpp"; do
  o=$OBJ/$(basename "${src%.*}").o
  g++ "${FLAGS[@]}" -c "$src" -o "$o" &
  objs+=("$o")
done
wait_all() { local rc=0; for j in $(jobs -p); do wait "$j" || rc=1; done; return $rc; }
wait_all
g++ "${FLAGS[@]}" -shared "${objs[@]}" -o "$HERE/build/libemu${SUFFIX:-}.so" \
  -L"$SP/torch/lib" -lc10 -Wl,-rpath,"$SP/torch/lib" -Wl,-Bsymbolic
echo "built $HERE/build/libemu${SUFFIX:-}.so"
