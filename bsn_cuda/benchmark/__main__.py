"""``python -m bsn_cuda.benchmark``: see :mod:`bsn_cuda.benchmark.cli`."""

import sys

from .cli import main

sys.exit(main())
