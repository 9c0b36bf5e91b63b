#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the test suite. Extra arguments go to pytest.
set -euo pipefail
# shellcheck source=setup.sh
. "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
cd "$BSN_ROOT"
echo "== running tests"
python -m pytest -q tests benchmarks/test_bench.py --benchmark-disable "$@"
