"""Benchmarks: ``oxnet-bench COMMAND`` (``python -m app.benchmarks``, ``scripts/bench.py``). Each prints one
JSON object on stdout (seconds, the machine, ratios).

    oxnet-bench train-step [--help]   model step time vs torchvision's RetinaNet
    oxnet-bench db [--help]           store queries and import at 100k images
    oxnet-bench ui [--help]           page server time at 100k images
    oxnet-bench load [--help]         annotators saving while the trainer writes (any backend)
    oxnet-bench dicomweb [--help]     import throughput from a local Orthanc (instances/s)
    oxnet-bench round [--help]        one trainer round's phases at 100k images (tiny model)

The logic lives in the benchmark modules (oxnet.experiments.bench, app.benchmarks.queue, .ui, .load,
.dicomweb, .round); this one only dispatches.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from importlib import import_module

COMMANDS = {"train-step": "oxnet.experiments.bench", "db": "app.benchmarks.queue", "ui": "app.benchmarks.ui", "load": "app.benchmarks.load",
            "dicomweb": "app.benchmarks.dicomweb", "round": "app.benchmarks.round"}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["-h"], ["--help"]):
        print(__doc__)
        return 0
    if not argv or argv[0] not in COMMANDS:
        print(__doc__, file=sys.stderr)
        return 2
    result = import_module(COMMANDS[argv[0]]).main(argv[1:])
    print(json.dumps(result, indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
