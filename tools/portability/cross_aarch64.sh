#!/usr/bin/env bash
# Cross-compile the C++ sources (csrc/*.cpp, csrc/cpu/*.cpp) for aarch64 Linux
# with Debian's g++-aarch64-linux-gnu, against the installed torch's headers,
# with the flags setup.py picks for that compiler. Objects only (-c): linking
# would need libtorch for aarch64. It checks that the x86-only code
# (target_clones in csrc/cpu/vec.cpp) compiles out and that nothing else
# assumes x86, and that every object is an AArch64 ELF without x86 clones.
#
#   PYTHON=path/to/python   the Python with torch (default: python)
#   CXX_AARCH64=...         the cross compiler (default: aarch64-linux-gnu-g++;
#                           installed with apt-get when missing and running as root)
#   BSN_CROSS_OUT=dir       keep the objects there (default: a temp dir, removed)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
PY=${PYTHON:-python}
CXX_AARCH64=${CXX_AARCH64:-aarch64-linux-gnu-g++}

if ! command -v "$CXX_AARCH64" >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "== installing g++-aarch64-linux-gnu"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq g++-aarch64-linux-gnu >/dev/null
  else
    echo "cross_aarch64.sh: expected $CXX_AARCH64 on PATH (apt-get install g++-aarch64-linux-gnu), got none" >&2
    exit 1
  fi
fi

out=${BSN_CROSS_OUT:-}
if [ -z "$out" ]; then
  out=$(mktemp -d)
  trap 'rm -rf "$out"' EXIT
fi
mkdir -p "$out"

flags=$(CXX="$CXX_AARCH64" BSN_PRINT_CXX_FLAGS=1 "$PY" setup.py)
# torch's include folders, Python's headers, and the -std torch's headers need
# (what torch's BuildExtension adds: C++17 up to torch 2.9, C++20 from 2.10).
mapfile -t includes < <("$PY" - <<'EOF'
import sysconfig
import torch
from torch.utils import cpp_extension
for path in cpp_extension.include_paths():
    print("-I" + path)
print("-I" + sysconfig.get_paths()["include"])
major, minor = (int(x) for x in torch.__version__.split(".")[:2])
print("-std=c++20" if (major, minor) >= (2, 10) else "-std=c++17")
EOF
)
echo "== $("$CXX_AARCH64" --version | head -1)"
echo "== flags: $flags ${includes[-1]}"

status=0
for src in csrc/*.cpp csrc/cpu/*.cpp; do
  obj="$out/$(echo "${src%.cpp}" | tr / _).o"
  # shellcheck disable=SC2086  # $flags is a list of flags
  if "$CXX_AARCH64" $flags -fPIC -Wall -DNDEBUG -DTORCH_API_INCLUDE_EXTENSION_H -DTORCH_EXTENSION_NAME=_C \
      -Icsrc "${includes[@]}" -c "$src" -o "$obj"; then
    machine=$(LC_ALL=C readelf -h "$obj" | sed -n 's/^ *Machine: *//p')
    if [ "$machine" != "AArch64" ]; then
      echo "FAIL $src: object for '$machine', expected AArch64" >&2
      status=1
    elif LC_ALL=C readelf -sW "$obj" | grep -Eq '\.(arch_x86_64|avx|resolver)'; then
      echo "FAIL $src: x86 function clones in an aarch64 object" >&2
      status=1
    else
      echo "ok   $src"
    fi
  else
    echo "FAIL $src: does not compile for aarch64" >&2
    status=1
  fi
done
[ "$status" = 0 ] && echo "== aarch64 cross-compile: all sources compile"
exit "$status"
