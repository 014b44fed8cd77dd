"""
``python -m benchmarks``: see :mod:`benchmarks` and ``--help``.
"""

import sys

from benchmarks.suite import main

sys.exit(main())
