"""Benchmarks. Each prints one JSON object on stdout (seconds, the machine, ratios).

    python scripts/bench.py train-step [--help]   model step time vs torchvision's RetinaNet
    python scripts/bench.py db [--help]           store queries and import at 100k images
    python scripts/bench.py ui [--help]           page server time at 100k images
    python scripts/bench.py load [--help]         annotators saving while the trainer writes (any backend)
    python scripts/bench.py dicomweb [--help]     import throughput from a local Orthanc (instances/s)
    python scripts/bench.py round [--help]        one trainer round's phases at 100k images (tiny model)

The logic lives in the packages (oxnet.experiments.bench, app.benchmarks.queue, app.benchmarks.load, app.benchmarks.ui); this file only dispatches.
"""

import json
import sys
from importlib import import_module

COMMANDS = {"train-step": "oxnet.experiments.bench", "db": "app.benchmarks.queue", "ui": "app.benchmarks.ui", "load": "app.benchmarks.load",
            "dicomweb": "app.benchmarks.dicomweb", "round": "app.benchmarks.round"}


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in COMMANDS:
        print(__doc__, file=sys.stderr)
        return 2
    result = import_module(COMMANDS[argv[0]]).main(argv[1:])
    print(json.dumps(result, indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
