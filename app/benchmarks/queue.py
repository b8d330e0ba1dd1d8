"""Store benchmark: NIH import of 112,120 rows, then the queue and overview queries at >100k images.

Run ``python scripts/bench.py db [--help]``; :func:`main` returns the JSON-ready dict that script prints.
Everything happens in a temporary folder: a synthetic Data_Entry CSV with NIH's real columns, a box list,
and a fresh SQLite store (no image files: the NIH import checks files lazily).
"""

from __future__ import annotations

import argparse
import csv
import random
import sqlite3
import statistics
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import sqlalchemy
from sqlalchemy import select

from db.engine import init_db, make_sessionmaker
from db.importers import import_nih
from db.importers.write import ImportItem, write_items
from db.models import Granularity, Image, SuggestedAction
from db.projects import assign_splits, stats
from db.queue import queue, take_lease
from db.versions import create_model_version, finish_model_version, write_suggestions
from oxnet.classes import NO_FINDING
from oxnet.machine import describe

NIH_ROWS = 112_120
NIH_FINDINGS = (
    "Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia", "Pneumothorax",
    "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia",
)
DATA_ENTRY_HEADER = (
    "Image Index", "Finding Labels", "Follow-up #", "Patient ID", "Patient Age", "Patient Gender",
    "View Position", "OriginalImage[Width", "Height]", "OriginalImagePixelSpacing[x", "y]",
)


def write_synthetic_nih(folder: Path, rows: int = NIH_ROWS, boxes: int = 984, seed: int = 0) -> tuple[Path, Path]:
    """A Data_Entry_2017 CSV with ``rows`` rows (real NIH columns) and a BBox_List_2017 CSV with ``boxes`` rows."""
    rng = random.Random(seed)
    entry, bbox = folder / "Data_Entry_2017.csv", folder / "BBox_List_2017.csv"
    names = []
    with open(entry, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(DATA_ENTRY_HEADER)
        patient, follow_up = 1, 0
        for _ in range(rows):
            if rng.random() < 0.27:
                patient, follow_up = patient + 1, 0
            name = f"{patient:08d}_{follow_up:03d}.png"
            follow_up += 1
            findings = NO_FINDING if rng.random() < 0.54 else "|".join(sorted(rng.sample(NIH_FINDINGS, rng.randint(1, 3))))
            writer.writerow([name, findings, follow_up, patient, rng.randint(1, 95), rng.choice("MF"),
                             rng.choice(("PA", "AP")), 2500, 2048, 0.143, 0.143])
            names.append((name, findings))
    with open(bbox, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["Image Index", "Finding Label", "Bbox [x", "y", "w", "h]", "", "", ""])
        candidates = [(n, fs) for n, fs in names if fs != NO_FINDING]
        for name, _findings in rng.sample(candidates, boxes):
            label = rng.choice(("Atelectasis", "Cardiomegaly", "Effusion", "Infiltrate", "Mass", "Nodule", "Pneumonia", "Pneumothorax"))
            x, y = rng.uniform(0, 700), rng.uniform(0, 700)
            writer.writerow([name, label, x, y, rng.uniform(20, 300), rng.uniform(20, 300), "", "", ""])
    return entry, bbox


def _median_ms(fn, repeats: int) -> float:
    fn()  # warm caches
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def main(argv: list[str]) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="oxnet-bench db", description=__doc__)
    parser.add_argument("--rows", type=int, default=NIH_ROWS, help="Data_Entry rows (default: NIH's %(default)s)")
    parser.add_argument("--unlabeled", type=int, default=20_000, help="extra unlabeled images (default: %(default)s)")
    parser.add_argument("--leased", type=int, default=200, help="top suggestions leased to other annotators")
    parser.add_argument("--repeats", type=int, default=20, help="timed repetitions per query (median reported)")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        entry, bbox = write_synthetic_nih(folder, args.rows)
        Session = make_sessionmaker(init_db(f"sqlite:///{folder / 'bench.db'}"))

        start = time.perf_counter()
        with Session.begin() as session:
            report = import_nih(session, entry, images=folder / "images", bbox_list=bbox)
        nih_import_s = time.perf_counter() - start

        rng = random.Random(1)
        with Session.begin() as session:
            items = [ImportItem(name=f"u{i}", path=folder / "extra" / f"u{i:06d}.png", width=1024, height=1024, source="bench")
                     for i in range(args.unlabeled)]
            write_items(session, "default", None, items, "import:bench", report)
            assign_splits(session)
            version = create_model_version(session, config={"bench": True})
            rows = session.execute(select(Image.id, Image.granularity)).all()
            suggestions: list[dict[str, Any]] = [
                {"image_id": image_id, "score": rng.random(), "reason": {"text": "bench", "classes": []},
                 "action": SuggestedAction.ADD_LABELS if g is Granularity.UNLABELED else SuggestedAction.DRAW_BOXES}
                for image_id, g in rows if g is not Granularity.FULL
            ]
            write_suggestions(session, version.id, suggestions)
            finish_model_version(session, version.id)
            by_score = sorted(suggestions, key=lambda s: -s["score"])
            for action in SuggestedAction:
                top = [s["image_id"] for s in by_score if s["action"] is action][: args.leased]
                for i, image_id in enumerate(top):
                    take_lease(session, image_id, f"annotator{i % 5}", ttl=timedelta(hours=1))
        images = len(rows)

        with Session() as session:
            queue_ms = {
                action.value: _median_ms(lambda a=action: queue(session, a, annotator="bench", limit=50), args.repeats)
                for action in SuggestedAction
            }
            stats_ms = _median_ms(lambda: stats(session), args.repeats)
            returned = {a.value: len(queue(session, a, annotator="bench", limit=50)) for a in SuggestedAction}
            overview = stats(session)

    return {
        "queue_ms": max(queue_ms.values()),
        "queue_ms_per_action": queue_ms,
        "stats_ms": stats_ms,
        "nih_import_s": nih_import_s,
        "counts": {
            "images": images,
            "nih_rows": args.rows,
            "nih_imported": len(report.imported) - args.unlabeled,
            "import_errors": len(report.errors),
            "suggestions": len(suggestions),
            "leased_per_action": args.leased,
            "queue_returned": returned,
            "granularity": overview["granularity"],
        },
        "repeats": args.repeats,
        "machine": {**describe(), "sqlalchemy": sqlalchemy.__version__, "sqlite": sqlite3.sqlite_version},
    }
