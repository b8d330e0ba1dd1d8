"""``python -m oxnet`` (and ``torchrun -m oxnet``): the ``oxnet`` command line."""

from oxnet.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
