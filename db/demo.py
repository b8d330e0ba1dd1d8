"""The synthetic demo project: about 300 synthetic chest X-rays at every annotation granularity.

:func:`seed_demo` draws images with :func:`oxnet.data.synthetic.generate`, writes them as PNGs into a
data folder beside the store (:func:`data_dir`, e.g. ``workbench_data/demo/`` next to
``workbench.db``) and imports them with :func:`db.importers.import_coco`, each with the granularity a
fresh annotation project has: a fully labelled validation split, and a training split that is mostly
unlabeled, with some weak (image-level labels only, boxes dropped) and some full images::

    report = seed_demo("sqlite:///workbench.db", n=300, progress=lambda done, total: ...)

:func:`fill_scale_store` writes ``n`` image rows with suggestions and model versions in bulk, so the
UI's responsiveness can be measured at 100,000 images (``python scripts/bench.py ui``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np
from PIL import Image as PILImage
from sqlalchemy import Table, insert, select
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session

from db.engine import database_url, init_db, make_sessionmaker
from db.importers import ImportReport, import_coco
from db.models import Granularity, Image, ModelStatus, Split, SuggestedAction, utcnow
from db.projects import DEFAULT_PROJECT, ensure_project
from db.versions import (
    create_model_version,
    finish_model_version,
    record_metrics,
    record_sweep_result,
    write_predictions,
    write_suggestions,
)
from oxnet.classes import NO_FINDING, PAPER_CLASSES
from oxnet.files import write_json
from oxnet.vocabulary import AP40, IMAGE_AUC_PREFIX, MAP, MEAN_IMAGE_AUC

#: ``progress(done, total)``.
Progress = Callable[[int, int], None]

#: Folder (beside a SQLite store, else in the working directory) for the demo images, jobs and pid files.
DATA_DIR_NAME = "workbench_data"
#: Share of the demo images in the fully labelled validation split.
VAL_FRACTION = 0.15
#: Shares of the training images that are full and weak; the rest is unlabeled.
TRAIN_FULL_FRACTION = 0.1
TRAIN_WEAK_FRACTION = 0.25
#: Images drawn per call of the generator (progress is reported after each chunk).
_CHUNK = 10


def data_dir(url: str | None = None) -> Path:
    """The workbench's data folder for the store at ``url`` (see :func:`db.engine.database_url`).

    ``<folder of the SQLite file>/workbench_data`` for a file-backed SQLite store, else
    ``./workbench_data``. Not created here.
    """
    parsed = make_url(database_url(url))
    database = parsed.database
    if parsed.get_backend_name() == "sqlite" and database and database != ":memory:" and not database.startswith("file:"):
        return Path(database).expanduser().resolve().parent / DATA_DIR_NAME
    return Path.cwd() / DATA_DIR_NAME


def demo_plan(n: int, seed: int = 0) -> list[tuple[Split, Granularity]]:
    """The (split, granularity) of each of ``n`` demo images, shuffled reproducibly by ``seed``.

    ``VAL_FRACTION`` of the images are full in ``val``; of the rest, ``TRAIN_FULL_FRACTION`` are full,
    ``TRAIN_WEAK_FRACTION`` weak and the remainder unlabeled, all in ``train``. Each group gets at
    least one image when ``n`` allows it.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    n_val = min(n, max(1, round(n * VAL_FRACTION))) if n else 0
    n_train = n - n_val
    n_full = min(n_train, max(1, round(n_train * TRAIN_FULL_FRACTION))) if n_train else 0
    n_weak = min(n_train - n_full, max(1, round(n_train * TRAIN_WEAK_FRACTION))) if n_train - n_full else 0
    plan = (
        [(Split.VAL, Granularity.FULL)] * n_val
        + [(Split.TRAIN, Granularity.FULL)] * n_full
        + [(Split.TRAIN, Granularity.WEAK)] * n_weak
        + [(Split.TRAIN, Granularity.UNLABELED)] * (n_train - n_full - n_weak)
    )
    order = np.random.default_rng(seed).permutation(n)
    return [plan[i] for i in order]


def write_demo_images(
    out_dir: str | Path, n: int, *, seed: int = 0, size: int = 512, progress: Progress | None = None
) -> dict[str, Any]:
    """Draw ``n`` synthetic chest X-rays into ``out_dir`` as PNGs and return their COCO dict.

    Every image carries its planned ``split`` and ``granularity`` (:func:`demo_plan`): full images keep
    their boxes (``bbox`` = [x, y, w, h] in pixels), weak ones only ``image_labels`` (``["No Finding"]``
    for normal films), unlabeled ones neither. The dict's ``images_root`` is ``out_dir``; the same dict
    is written to ``out_dir/demo.json``.
    """
    from oxnet.data.synthetic import generate  # here, not at import: the store's other commands never draw

    out = Path(out_dir).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    plan = demo_plan(n, seed)
    categories = [{"id": i + 1, "name": name} for i, name in enumerate(PAPER_CLASSES)]
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    chunks = math.ceil(n / _CHUNK)
    for chunk in range(chunks):
        count = min(_CHUNK, n - chunk * _CHUNK)
        for offset, sample in enumerate(generate(count, size, seed * 100_003 + chunk)):
            index = chunk * _CHUNK + offset
            split, granularity = plan[index]
            file_name = f"demo_{seed}_{index:05d}.png"
            PILImage.fromarray(sample.image).save(out / file_name)
            names = [PAPER_CLASSES[c] for c in sample.image_labels]
            record: dict[str, Any] = {
                "id": index + 1, "file_name": file_name, "width": size, "height": size,
                "patient_id": f"demo-{index:05d}", "split": split.value, "granularity": granularity.value,
            }
            if granularity is not Granularity.UNLABELED:
                record["image_labels"] = names or [NO_FINDING]
            if granularity is Granularity.FULL:
                for box, label in zip(sample.boxes.tolist(), sample.labels.tolist(), strict=True):
                    x1, y1, x2, y2 = box
                    annotations.append({
                        "id": len(annotations) + 1, "image_id": index + 1, "category_id": label + 1,
                        "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1), "iscrowd": 0,
                    })
            images.append(record)
        if progress is not None:
            progress(min(n, (chunk + 1) * _CHUNK), n)
    coco = {"images_root": str(out), "categories": categories, "images": images, "annotations": annotations}
    write_json(out / "demo.json", coco, indent=None)
    return coco


def seed_demo(
    store: Session | str | None = None,
    out_dir: str | Path | None = None,
    n: int = 300,
    seed: int = 0,
    *,
    size: int = 512,
    project: str = DEFAULT_PROJECT,
    progress: Progress | None = None,
) -> ImportReport:
    """Create the demo project: ``n`` synthetic images written to ``out_dir`` and imported.

    Args:
        store: a Session (the caller owns the transaction) or a store URL (None: ``$OXNET_DB_URL`` or
            ``sqlite:///workbench.db``; the schema is created and the import committed here).
        out_dir: where the PNGs go; default ``data_dir(url) / "demo"`` (a Session's bind URL is used).
        n: number of images; seed: random seed; size: side of the square images in pixels.
        progress: called with (done, 2 * n): the first n steps draw the images, the next n import them.

    Returns:
        The import report (``imported`` names every image).
    """
    if n < 1:
        raise ValueError(f"the demo needs at least one image, got n={n}")
    if isinstance(store, Session):
        return _seed(store, out_dir, n, seed, size, project, progress)
    url = database_url(store)
    with make_sessionmaker(init_db(url)).begin() as session:
        return _seed(session, out_dir, n, seed, size, project, progress)


def _seed(
    session: Session, out_dir: str | Path | None, n: int, seed: int, size: int, project: str, progress: Progress | None
) -> ImportReport:
    if out_dir is None:
        out_dir = data_dir(session.get_bind().engine.url.render_as_string(hide_password=False)) / "demo"
    draw = None if progress is None else (lambda done, total: progress(done, 2 * n))
    coco = write_demo_images(out_dir, n, seed=seed, size=size, progress=draw)
    ensure_project(session, project, PAPER_CLASSES)
    load = None if progress is None else (lambda done, total: progress(n + done, 2 * n))
    report = import_coco(session, coco, project=project, annotator="import:demo", progress=load)
    if report.errors:
        raise ValueError(f"demo import failed: {report.summary(limit=5)}")
    return report


def fill_scale_store(
    session: Session,
    n: int,
    image_paths: Sequence[str | Path],
    *,
    project: str = DEFAULT_PROJECT,
    size: int = 512,
    versions: int = 3,
    seed: int = 0,
) -> dict[str, int]:
    """Bulk-write a large store for measuring the UI: ``n`` images, ``versions`` ready model versions.

    Image rows point at ``image_paths`` (one per image, e.g. links to a few real PNGs) with the demo's
    mix of splits and granularities; the newest version gets a suggestion of each action for every
    not-full training image, with predictions for the top-scored ones, and the project gets a sweep
    over three label mixes. No files are read. Returns the counts written.
    """
    if len(image_paths) != n:
        raise ValueError(f"need one path per image: n={n}, got {len(image_paths)} paths")
    rng = np.random.default_rng(seed)
    project_row = ensure_project(session, project, PAPER_CLASSES)
    plan = demo_plan(n, seed)
    now = utcnow()
    rows = [
        {
            "project_id": project_row.id, "path": str(path), "sha256": None, "width": size, "height": size,
            "bit_depth": 8, "photometric": "MONOCHROME2", "patient_id": None, "view": "PA", "split": split,
            "source": "bench", "file_status": "ok", "no_finding": False,
            "boxes_complete": granularity is Granularity.FULL, "granularity": granularity, "version": 1,
            "created_at": now, "updated_at": now,
        }
        for path, (split, granularity) in zip(image_paths, plan, strict=True)
    ]
    table = cast(Table, Image.__table__)
    for start in range(0, n, 20_000):
        session.execute(insert(table), rows[start : start + 20_000])
    ids = session.execute(select(Image.id, Image.split, Image.granularity).where(Image.project_id == project_row.id)).all()
    candidates = [image_id for image_id, split, granularity in ids if split is Split.TRAIN and granularity is not Granularity.FULL]
    for round_ in range(versions):
        version = create_model_version(session, project, config={"preset": "bench"}, round=round_)
        finish_model_version(session, version.id, status=ModelStatus.READY)
        metrics = {MAP: 5.0 + 3 * round_, AP40: 9.0 + 3 * round_, MEAN_IMAGE_AUC: 0.6 + 0.05 * round_}
        metrics |= {f"per_class_AP/{c}": float(rng.uniform(0, 20)) for c in PAPER_CLASSES}
        metrics |= {f"{IMAGE_AUC_PREFIX}{c}": float(rng.uniform(0.5, 0.9)) for c in PAPER_CLASSES}
        record_metrics(session, version.id, Split.VAL, metrics)
        record_metrics(session, version.id, Split.TRAIN, {"loss/total": 2.0 / (round_ + 1), "loss/classification": 1.0 / (round_ + 1)})
    scores = rng.random(len(candidates))
    suggestions = []
    for image_id, score in zip(candidates, scores.tolist(), strict=True):
        cls = PAPER_CLASSES[int(score * 1e6) % len(PAPER_CLASSES)]
        reason = {"text": f"teacher and student disagree on {cls}", "classes": [cls]}
        suggestions.append({"image_id": image_id, "action": SuggestedAction.ADD_LABELS, "score": score, "reason": reason})
        suggestions.append({"image_id": image_id, "action": SuggestedAction.DRAW_BOXES, "score": score, "reason": reason})
    write_suggestions(session, version.id, suggestions)
    top = [candidates[i] for i in np.argsort(-scores)[:1000]]
    box = {"class": PAPER_CLASSES[4], "bbox": [size * 0.3, size * 0.3, size * 0.4, size * 0.42], "score": 0.8}
    write_predictions(session, version.id, ({"image_id": i, "boxes": [box], "image_probs": {PAPER_CLASSES[4]: 0.8}} for i in top))
    for n_full, n_weak in ((50, 950), (100, 900), (200, 800)):
        for method, gain in (("retinanet", 0.0), ("oxnet", 2.0)):
            record_sweep_result(
                session, project, method=method, n_full=n_full, n_weak=n_weak if method == "oxnet" else 0,
                n_unlabeled=0, metrics={MAP: 5.0 + n_full / 20 + gain},
            )
    return {"images": n, "suggestions": len(suggestions), "predictions": len(top), "versions": versions}

