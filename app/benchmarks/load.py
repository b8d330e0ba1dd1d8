"""Load test of the store: annotator processes saving while the trainer writes model versions.

    python scripts/bench.py load [--db URL] [--annotators 20] [--seconds 120] [--images 2000]

Each annotator process loops for ``--seconds``: lease a random image (``take_lease``; someone else's
lease means pick another), load its version, save image-level labels or boxes with that version (the
UI's save), release the lease. A stale version (``ConflictError``) is the version check doing its job:
reload and save again. Any other database error (SQLite "database is locked", PostgreSQL serialization
failures) is what a user would see: counted as ``user_errors``. Meanwhile the trainer process writes a
model version with a suggestion for every image, its metrics and heartbeats, again and again.

At the end: saves/s (over the ``--seconds`` every process saves for; ``wall_s`` adds process start-up),
p50/p95 save latency, ``lost_writes`` (acknowledged saves missing from the audit
log), and whether replaying every image's audit trail gives its stored state. Prints JSON (one object,
with the machine and backend).
"""

from __future__ import annotations

import argparse
import multiprocessing
import queue
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError

from db.engine import init_db, make_engine, make_sessionmaker
from db.lifecycle import ConflictError, image_state, replay_audit, set_boxes, set_image_labels
from db.models import AuditEntry, Image
from db.projects import ensure_project
from db.queue import release_lease, take_lease
from db.trainer_lock import acquire_trainer_lock, trainer_heartbeat
from db.versions import create_model_version, finish_model_version, record_metrics, write_suggestions
from oxnet.machine import describe
from oxnet.vocabulary import DRAW_BOXES, MAP

CLASSES = ("Mass", "Nodule", "Effusion")


def _annotator(url: str, name: str, image_ids: list[int], seconds: float, seed: int, out) -> None:
    Session = make_sessionmaker(make_engine(url))
    rng = random.Random(seed)
    latencies: list[float] = []
    saves = conflicts = user_errors = busy = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        image_id = rng.choice(image_ids)
        try:
            with Session.begin() as s:
                if not take_lease(s, image_id, name):
                    busy += 1
                    continue
            started = time.perf_counter()
            while True:  # the UI's save: the version the annotator loaded; reload on conflict
                with Session() as s:
                    image = s.get(Image, image_id)
                    assert image is not None  # the benchmark imported every image it loads
                    version, width, height = image.version, image.width, image.height
                    boxed = {box.label_class.name for box in image.boxes}
                    absent = {label.label_class.name for label in image.labels if not label.present}
                    drawable = [c for c in CLASSES if c not in absent]
                try:
                    with Session.begin() as s:
                        if rng.random() < 0.7 or not drawable:  # a box implies its class: those stay present
                            labels = {c: c in boxed or rng.random() < 0.3 for c in CLASSES}
                            set_image_labels(s, image_id, labels, annotator=name, expected_version=version)
                        else:
                            x, y = rng.uniform(0, width / 2), rng.uniform(0, height / 2)
                            box = (rng.choice(drawable), x, y, x + width / 4, y + height / 4)
                            set_boxes(s, image_id, [box], annotator=name, complete=True, expected_version=version)
                    break
                except ConflictError:
                    conflicts += 1
            latencies.append(time.perf_counter() - started)
            saves += 1
            with Session.begin() as s:
                release_lease(s, image_id, name)
        except DBAPIError as e:  # what a user would see: a locked database, a serialization failure
            user_errors += 1
            out.put(("error", name, f"{type(e.orig).__name__}: {e.orig}"))
    out.put(("done", name, {"saves": saves, "conflicts": conflicts, "user_errors": user_errors, "busy": busy,
                            "latencies": latencies}))


def _trainer(url: str, image_ids: list[int], seconds: float, out) -> None:
    Session = make_sessionmaker(make_engine(url))
    with Session.begin() as s:
        acquire_trainer_lock(s, "loadtest:trainer")
    versions = suggestions = errors = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            with Session.begin() as s:
                version = create_model_version(s, config={"loadtest": True}, round=versions + 1)
                suggestions += write_suggestions(s, version.id, [
                    {"image_id": i, "action": DRAW_BOXES, "score": random.random()} for i in image_ids])
                record_metrics(s, version.id, "val", {MAP: random.random()})
                finish_model_version(s, version.id)
            with Session.begin() as s:
                trainer_heartbeat(s, "loadtest:trainer", round=versions + 1, progress=1.0)
            versions += 1
        except DBAPIError as e:
            errors += 1
            out.put(("error", "trainer", f"{type(e.orig).__name__}: {e.orig}"))
    out.put(("done", "trainer", {"versions": versions, "suggestions": suggestions, "user_errors": errors}))


def run(url: str, *, annotators: int, seconds: float, images: int) -> dict[str, Any]:
    engine = init_db(url)
    Session = make_sessionmaker(engine)
    with Session.begin() as s:
        project = ensure_project(s, classes=list(CLASSES))
        rows = [Image(project_id=project.id, path=f"/load/{i}.png", width=1024, height=1024, source="loadtest")
                for i in range(images)]
        s.add_all(rows)
        s.flush()
        image_ids = [r.id for r in rows]
    context = multiprocessing.get_context("spawn")
    out = context.Queue()
    processes = [context.Process(target=_annotator, args=(url, f"reader{k:02d}", image_ids, seconds, k, out))
                 for k in range(annotators)]
    processes.append(context.Process(target=_trainer, args=(url, image_ids, seconds, out)))
    started = time.monotonic()
    for p in processes:
        p.start()
    results: dict[str, Any] = {}
    errors: list[str] = []
    while len(results) < len(processes):
        try:
            kind, name, value = out.get(timeout=5)
        except queue.Empty:
            if all(not p.is_alive() for p in processes):  # one died without reporting: its traceback is on stderr
                raise RuntimeError(f"{len(processes) - len(results)} load-test processes died") from None
            continue
        if kind == "done":
            results[name] = value
        else:
            errors.append(f"{name}: {value}")
    for p in processes:
        p.join(60)
    wall = time.monotonic() - started
    readers = [v for k, v in results.items() if k != "trainer"]
    latencies = sorted(x for r in readers for x in r["latencies"])
    saves = sum(r["saves"] for r in readers)
    with Session() as s:
        audited = s.scalar(select(func.count()).select_from(AuditEntry).where(AuditEntry.action != "import")) or 0
        touched = list(s.scalars(select(Image).where(Image.version > 1)))
        replay_ok = all(replay_audit(s, image.id) == image_state(image) for image in touched)
        saved_versions = sum(image.version - 1 for image in touched)
    engine.dispose()
    return {
        "backend": make_url(url).get_backend_name(), "annotators": annotators, "seconds": seconds,
        "wall_s": round(wall, 1), "images": images, "saves": saves, "saves_per_s": round(saves / seconds, 1),
        "save_p50_ms": round(1000 * statistics.median(latencies), 1) if latencies else None,
        "save_p95_ms": round(1000 * latencies[int(0.95 * (len(latencies) - 1))], 1) if latencies else None,
        "conflicts_retried": sum(r["conflicts"] for r in readers),
        "user_errors": sum(r["user_errors"] for r in results.values()), "error_samples": errors[:5],
        "lost_writes": saves - saved_versions, "audit_rows": audited, "audit_replays_to_state": replay_ok,
        "trainer_versions": results["trainer"]["versions"], "trainer_suggestions": results["trainer"]["suggestions"],
        "machine": describe(),
    }


def main(argv: list[str]) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="oxnet-bench load", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--db", help="store URL (default: a new SQLite file in a temporary folder); it must be empty")
    parser.add_argument("--annotators", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=120.0)
    parser.add_argument("--images", type=int, default=2000)
    args = parser.parse_args(argv)
    if args.db:
        return run(args.db, annotators=args.annotators, seconds=args.seconds, images=args.images)
    with tempfile.TemporaryDirectory() as folder:
        url = f"sqlite:///{Path(folder) / 'load.db'}"
        return run(url, annotators=args.annotators, seconds=args.seconds, images=args.images)
