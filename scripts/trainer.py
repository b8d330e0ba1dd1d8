"""The background trainer: ``python scripts/trainer.py --help``. The code is :mod:`app.trainer`
(also ``oxnet-trainer`` and ``python -m app.trainer`` once the package is installed)."""

import sys

from app.trainer import main

if __name__ == "__main__":
    sys.exit(main())
