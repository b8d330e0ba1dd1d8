"""Concurrent writer processes (two annotators and the trainer) on one SQLite file: no "database is locked",
no lost edit; conflicting saves of the same image are detected and retried."""

import multiprocessing

import pytest
from sqlalchemy import func, select

from db.engine import make_engine, make_sessionmaker
from db.lifecycle import ConflictError, granularity_mismatches, image_state, replay_audit, set_image_labels
from db.models import Image, ModelVersion, Suggestion
from db.repository import (
    acquire_trainer_lock,
    create_model_version,
    ensure_project,
    finish_model_version,
    record_metrics,
    trainer_heartbeat,
    write_suggestions,
)

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
