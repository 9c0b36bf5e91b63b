#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the speed benchmark. Extra arguments go to
# `python -m bsn_cuda.benchmark` (default: --quick; see --help).
set -euo pipefail
# shellcheck source=setup.sh
. "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
cd "$BSN_ROOT"
echo "== running the benchmark"
if [ "$#" -eq 0 ]; then set -- --quick; fi
python -m bsn_cuda.benchmark "$@"
