"""One trainer round on a 100,000-image store, phase by phase: is a round's scoring bounded at scale?

Run ``python scripts/bench.py round [--help]``; :func:`main` returns the JSON-ready dict that script
prints. Everything happens in a temporary folder: ``--labeled`` synthetic images (128 px, boxes) give the
full val and train images and some weak ones; the rest of the ``--images`` are unlabeled training images
whose files are symbolic links to those (the store references files in place, so a link per image is
all a 100k store needs). One round of the ``tiny`` trainer then runs with the cost-aware strategy and a
bounded candidate pool (``--pool``, scored most wanted first and cut once scoring has taken
``--score-share`` of the training time), and the round's phases are timed: snapshot (export and records),
train, evaluate, score (the pool), rank (the strategy), write (predictions, scores, suggestions).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from sqlalchemy import func, select

from db.engine import init_db, make_sessionmaker
from db.importers import ImportReport, import_coco
from db.importers.write import ImportItem, write_items
from db.models import Image, Split, Suggestion
from db.workbench import SqlStore
from oxnet.data.synthetic import write_coco
from oxnet.active.loop import TRAINER_PRESETS, Trainer
from oxnet.machine import describe
from oxnet.vocabulary import FULL, WEAK


def main(argv: list[str]) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="oxnet-bench round", description=__doc__)
    parser.add_argument("--images", type=int, default=100_000, help="images in the store (default %(default)s)")
    parser.add_argument("--labeled", type=int, default=240, help="synthetic images with files (val/train full, weak)")
    parser.add_argument("--pool", type=int, default=1000, help="images scored per round (default %(default)s)")
    parser.add_argument("--strategy", default="cost_aware")
    parser.add_argument("--score-share", type=float, default=1.0,
                        help="stop scoring after this share of the training time (default %(default)s; 0: no limit)")
    parser.add_argument("--steps", type=int, default=20, help="training steps of the round (default %(default)s)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    if args.images <= args.labeled:
        parser.error("--images must be larger than --labeled")

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        start = time.perf_counter()
        paths = write_coco(folder / "synth", args.labeled, size=128, seed=7)
        coco = json.loads(paths["synthetic"].read_text())
        n = len(coco["images"])
        for k, image in enumerate(coco["images"]):  # a quarter val (full), a quarter train full, half train weak
            image["split"] = "val" if k < n // 4 else "train"
            image["granularity"] = FULL if k < n // 2 else WEAK
        url = f"sqlite:///{folder / 'round.db'}"
        sessions = make_sessionmaker(init_db(url))
        with sessions.begin() as session:
            report = import_coco(session, coco, images=folder / "synth" / "images")
            if report.errors:
                raise RuntimeError(f"bench import failed: {report.errors[:3]}")
        files = sorted((folder / "synth" / "images").iterdir())
        links = folder / "links"
        links.mkdir()
        extra = args.images - n
        items = []
        for i in range(extra):
            link = links / f"u{i:06d}.png"
            os.symlink(files[i % len(files)], link)
            items.append(ImportItem(name=link.name, path=link, width=128, height=128, source="bench", split=Split.TRAIN))
        with sessions.begin() as session:
            write_items(session, "default", None, items, "import:bench", ImportReport())
        with sessions() as session:
            total = session.scalar(select(func.count(Image.id)))
        setup_s = time.perf_counter() - start

        settings = replace(TRAINER_PRESETS["tiny"], epochs=1, steps_per_epoch=args.steps, pretrain_epochs=0,
                           device=args.device, max_rounds=1, min_interval_s=0.0, strategy=args.strategy,
                           pool_size=args.pool, score_batch_size=16, score_time_share=args.score_share or None)
        store = SqlStore.open(url, models_dir=folder / "models")
        [result] = Trainer(store, settings).run()
        if result.status != "ready":
            raise RuntimeError(f"the round did not finish: {result.status} {result.error}")
        with sessions() as session:
            suggestions = session.scalar(select(func.count(Suggestion.id)).where(Suggestion.model_version_id == result.version_id))

    measured = {k: v for k, v in result.durations.items() if k != "scored"}  # "scored" is a count
    phases = {k: round(v, 3) for k, v in measured.items()}
    phases["snapshot"] = round(result.seconds - sum(measured.values()), 3)
    return {
        "phases_s": phases,
        "round_s": round(result.seconds, 3),
        "scored_images": result.scored,
        "scoring_images_per_s": round(result.scored / measured["score"], 1) if measured["score"] else None,
        "scoring_within_training": measured["score"] <= measured["train"],
        "suggestions": suggestions,
        "counts": {"images": total, "label_counts": result.label_counts, "pool": args.pool, "train_steps": args.steps,
                   "score_time_share": args.score_share or None},
        "strategy": args.strategy,
        "setup_s": round(setup_s, 1),
        "machine": describe(args.device),
    }
