"""The granularity study: ``python scripts/sweep.py --help``. The code is :mod:`app.sweep` (the study
itself: :mod:`oxnet.experiments.sweep`); also ``oxnet-sweep`` and ``python -m app.sweep`` once installed."""

import sys

from app.sweep import main

if __name__ == "__main__":
    sys.exit(main())
