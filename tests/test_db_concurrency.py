"""Concurrent writer processes (two annotators and the trainer) on one SQLite file: no "database is locked",
no lost edit; conflicting saves of the same image are detected and retried."""

import multiprocessing

import pytest

from sqlalchemy import func, select

from db.engine import make_engine, make_sessionmaker
from db.lifecycle import ConflictError, granularity_mismatches, image_state, replay_audit, set_image_labels
from db.models import Image, ModelVersion, Suggestion
from db.projects import ensure_project
from db.trainer_lock import acquire_trainer_lock, trainer_heartbeat
from db.versions import create_model_version, finish_model_version, record_metrics, write_suggestions

pytestmark = pytest.mark.slow  # processes, whole training runs: deselect with -m 'not slow'

ROUNDS = 12


def annotator_process(url: str, name: str, own: list[int], shared: int) -> None:
    Session = make_sessionmaker(make_engine(url))
    for r in range(ROUNDS):
        for image_id in own:
            with Session.begin() as s:
                set_image_labels(s, image_id, {"Mass": r % 2 == 0, "Nodule": True}, annotator=name)
        while True:  # the UI's save: load, edit, save with the loaded version; reload on conflict
            with Session() as s:
                version = s.get(Image, shared).version
            try:
                with Session.begin() as s:
                    set_image_labels(s, shared, {"Mass": name == "alice", "Nodule": r % 2 == 1}, annotator=name,
                                     expected_version=version)
                break
            except ConflictError:
                continue


def trainer_process(url: str, image_ids: list[int]) -> None:
    Session = make_sessionmaker(make_engine(url))
    with Session.begin() as s:
        assert acquire_trainer_lock(s, "trainer")
    for r in range(ROUNDS):
        with Session.begin() as s:
            version = create_model_version(s, config={"round": r}, round=r)
            write_suggestions(s, version.id, [{"image_id": i, "action": "draw boxes", "score": (i * 7 + r) % 11} for i in image_ids])
            record_metrics(s, version.id, "val", {"mAP": r / 100})
            finish_model_version(s, version.id)
        with Session.begin() as s:
            trainer_heartbeat(s, "trainer", round=r, progress=(r + 1) / ROUNDS)


def test_concurrent_writer_processes(db_sessionmaker, db_url):
    with db_sessionmaker.begin() as s:
        project = ensure_project(s)
        images = [Image(project_id=project.id, path=f"/x/{i}.png", width=64, height=64, source="t") for i in range(7)]
        s.add_all(images)
        s.flush()
        ids = [i.id for i in images]
    shared = ids[6]
    context = multiprocessing.get_context("spawn")
    processes = [
        context.Process(target=annotator_process, args=(db_url, "alice", ids[0:3], shared)),
        context.Process(target=annotator_process, args=(db_url, "bob", ids[3:6], shared)),
        context.Process(target=trainer_process, args=(db_url, ids)),
    ]
    for p in processes:
        p.start()
    for p in processes:
        p.join(timeout=240)
    assert [p.exitcode for p in processes] == [0, 0, 0]

    with db_sessionmaker() as s:
        versions = dict(s.execute(select(Image.id, Image.version)).all())
        assert [versions[i] for i in ids[:6]] == [1 + ROUNDS] * 6
        assert versions[shared] == 1 + 2 * ROUNDS  # every save of both annotators landed, none overwritten silently
        for image_id in ids:
            assert replay_audit(s, image_id) == image_state(s.get(Image, image_id))
        assert granularity_mismatches(s) == []
        assert s.scalar(select(func.count()).select_from(ModelVersion)) == ROUNDS
        assert s.scalar(select(func.count()).select_from(Suggestion)) == ROUNDS * len(ids)


def import_process(url: str, folder: str, coco: str, start, results) -> None:
    """One run of ``python -m db import``-like work: a folder import, then a COCO import (own transactions)."""
    from db.importers import import_coco, import_folder

    Session = make_sessionmaker(make_engine(url))
    start.wait()
    out = []
    for run in (lambda s: import_folder(s, folder), lambda s: import_coco(s, coco)):
        with Session.begin() as s:
            report = run(s)
        out.append((len(report.imported), len(report.skipped), len(report.errors)))
    results.put(out)


@pytest.mark.slow
def test_concurrent_runs_of_the_same_import_skip_instead_of_crashing(tmp_path):
    """Racing imports of one folder (and one COCO file) used to crash with an IntegrityError; now
    each image is imported exactly once and the other runs skip it. The project is new, so its creation
    races too."""
    import json

    import numpy as np
    from PIL import Image as PILImage

    from db.engine import init_db
    from db.lifecycle import replay_audit
    from db.models import AuditEntry, Box

    url = f"sqlite:///{tmp_path / 'race.db'}"
    init_db(url).dispose()
    folder, boxes = tmp_path / "folder", tmp_path / "coco"
    folder.mkdir()
    boxes.mkdir()
    for i in range(30):
        PILImage.fromarray(np.full((24, 32), i, np.uint8)).save(folder / f"{i}.png")
        PILImage.fromarray(np.full((24, 32), 100 + i, np.uint8)).save(boxes / f"{i}.png")
    coco = {"images": [{"id": i, "file_name": f"{i}.png", "width": 32, "height": 24} for i in range(30)],
            "annotations": [{"id": i, "image_id": i, "category_id": 1, "bbox": [1, 1, 5, 5]} for i in range(30)],
            "categories": [{"id": 1, "name": "Nodule"}]}
    (boxes / "boxes.json").write_text(json.dumps(coco))
    context = multiprocessing.get_context("spawn")
    start, results = context.Event(), context.Queue()
    processes = [context.Process(target=import_process, args=(url, str(folder), str(boxes / "boxes.json"), start, results))
                 for _ in range(4)]
    for p in processes:
        p.start()
    start.set()
    outcomes = [results.get(timeout=240) for _ in processes]
    for p in processes:
        p.join(timeout=60)
    assert [p.exitcode for p in processes] == [0] * 4
    assert sorted(o[0][0] for o in outcomes) == [0, 0, 0, 30] and sorted(o[1][0] for o in outcomes) == [0, 0, 0, 30]
    assert all(o[0][2] == 0 and o[1][2] == 0 for o in outcomes)  # no errors, only skips
    assert all(o[0][0] + o[0][1] == 30 and o[1][0] + o[1][1] == 30 for o in outcomes)
    with make_sessionmaker(make_engine(url))() as s:
        assert s.scalar(select(func.count()).select_from(Image)) == 60
        assert s.scalar(select(func.count()).select_from(Box)) == 30
        assert s.scalar(select(func.count()).select_from(AuditEntry).where(AuditEntry.action == "import")) == 60
        for image_id in s.scalars(select(Image.id)):
            assert replay_audit(s, image_id) == image_state(s.get(Image, image_id))
