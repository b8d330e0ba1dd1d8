"""Benchmarks: ``python scripts/bench.py COMMAND [--help]`` (train-step, db, ui, load, dicomweb, round). The
code is :mod:`app.benchmarks.__main__` (also ``oxnet-bench`` and ``python -m app.benchmarks`` once installed)."""

import sys

from app.benchmarks.__main__ import main

if __name__ == "__main__":
    sys.exit(main())
