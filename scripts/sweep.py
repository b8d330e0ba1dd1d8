"""The granularity study (the paper's Table 2). Logic: oxnet.sweep. Run with --help.

    python scripts/sweep.py --dataset boxes.json --test-fold 3 --full 0.25,0.5 --seeds 2 --out runs/sweep
    python scripts/sweep.py ... --store      # also record each run in the workbench store (OXNET_DB_URL)
"""

import logging
import sys

from oxnet.sweep import main


def _store_rows():
    """Record each finished run as a SweepResult in the workbench store, so the UI plots it."""
    from db.engine import init_db, make_sessionmaker
    from db.repository import record_sweep_result

    sessions = make_sessionmaker(init_db())

    def on_row(row: dict) -> None:
        with sessions.begin() as session:
            record_sweep_result(
                session, method=row["method"], seed=row["seed"], n_full=row["n_full"], n_weak=row["n_weak"],
                n_unlabeled=row["n_unlabeled"], metrics={k: v for k, v in row.items() if k.startswith(("mAP", "AP"))},
                config={"full_fraction": row["full_fraction"]},
            )

    return on_row


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    argv = sys.argv[1:]
    store = "--store" in argv
    main([a for a in argv if a != "--store"], on_row=_store_rows() if store else None)
