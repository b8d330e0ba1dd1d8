"""The active-learning simulation: ``python scripts/simulate.py --help``. The code is :mod:`app.simulate`
(also ``oxnet-simulate`` and ``python -m app.simulate`` once the package is installed)."""

import sys

from app.simulate import main

if __name__ == "__main__":
    sys.exit(main())
