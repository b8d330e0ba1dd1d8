"""The granularity study (the paper's Table 2): ``oxnet-sweep`` (``python -m app.sweep``,
``scripts/sweep.py``). The study's logic is :mod:`oxnet.experiments.sweep`; this module adds what joins it
to the workbench store (``--store``, ``store``). Run with --help.

    oxnet-sweep --dataset boxes.json --test-fold 3 --full 0.25,0.5 --seeds 2 --out runs/sweep
    oxnet-sweep ... --store      # also record each run in the workbench store (OXNET_DB_URL)
    oxnet-sweep merge A/results.json B/results.json --out C     # parts run apart -> one study
    oxnet-sweep store C/results.json    # put a finished sweep's runs in the store (Metrics page)
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from oxnet.experiments.sweep import SCHEMA
from oxnet.experiments.sweep import main as run_study

__all__ = ["main", "store"]


def _sessions():
    from db.engine import init_db, make_sessionmaker

    return make_sessionmaker(init_db())


def _store_rows():
    """Record each finished run as a SweepResult in the workbench store, so the UI plots it."""
    from db.versions import record_sweep_rows

    sessions = _sessions()

    def on_row(row: dict) -> None:
        with sessions.begin() as session:
            record_sweep_rows(session, [row])

    return on_row


def store(argv: list[str]) -> int:
    """``store FILE [FILE ...]``: every run of each results.json into the store, skipping runs already there."""
    from db.projects import DEFAULT_PROJECT
    from db.versions import record_sweep_rows

    parser = argparse.ArgumentParser(prog="oxnet-sweep store", description=store.__doc__)
    parser.add_argument("results", nargs="+", help="results.json files written by a sweep or by merge")
    parser.add_argument("--project", default=DEFAULT_PROJECT)
    args = parser.parse_args(argv)
    loaded = []
    for path in args.results:
        try:
            results = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            parser.error(f"{path}: not a readable results.json ({exc})")
        if results.get("schema") != SCHEMA or not isinstance(results.get("rows"), list):
            parser.error(f"{path}: not a sweep results file (schema {results.get('schema')!r}, expected {SCHEMA!r})")
        loaded.append((path, results["rows"]))
    try:
        with _sessions().begin() as session:  # all files or none
            counts = [(path, *record_sweep_rows(session, rows, args.project, source=path)) for path, rows in loaded]
    except ValueError as exc:
        parser.error(str(exc))
    for path, added, skipped in counts:
        print(f"{path}: stored {added} runs, {skipped} already in the store")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``store FILE ...`` (:func:`store`), else the study (``--store``: each finished run also into the store)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["store"]:
        return store(argv[1:])
    live = "--store" in argv
    run_study([a for a in argv if a != "--store"], on_row=_store_rows() if live else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
