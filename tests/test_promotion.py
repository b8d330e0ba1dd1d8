"""Model versions compared before promotion: serve-or-candidate after validation, the queue and the
Annotate page's model boxes follow the SERVING version, promote and rollback are explicit and audited."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import sqlalchemy as sa
from PIL import Image as PILImage
from sqlalchemy import select
from streamlit.testing.v1 import AppTest

from db.engine import init_db, make_sessionmaker, upgrade
from db.lifecycle import set_image_labels
from db.models import AuditEntry, Image, ServingModel, SuggestedAction
from db.projects import ensure_project
from db.queue import queue
from db.versions import (
    CANDIDATE_ACTION,
    PROMOTE_ACTION,
    ROLLBACK_ACTION,
    candidate_model_versions,
    create_model_version,
    finish_model_version,
    promote_model_version,
    record_metrics,
    serving_model_version,
    write_predictions,
    write_suggestions,
)
from db.service import model_output, model_versions, serving_summary
from db.workbench import SqlStore
from oxnet.data.records import records_from_coco
from oxnet.active.loop import Trainer, decide_promotion
from tests.logins import TOKEN_KEY, session_token

ROOT = Path(__file__).resolve().parent.parent
MAIN = str(ROOT / "app" / "main.py")


# --- the decision (pure) -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "new, serving, serve, words",
    [
        ({"mAP": 0.1}, None, True, "first"),
        ({"mAP": 0.1}, {}, True, "no val mAP"),
        ({"mAP": 0.19}, {"mAP": 0.20}, True, "tolerance 0.02"),  # within the tolerance
        ({"mAP": 0.18}, {"mAP": 0.20}, True, "0.180 vs"),  # exactly at the edge
        ({"mAP": 0.038}, {"mAP": 0.191}, False, "0.153 below"),  # the case
        (None, {"mAP": 0.2}, False, "val split was skipped"),
        ({}, {"mAP": 0.2}, False, "val split was skipped"),
    ],
)
def test_decide_promotion(new, serving, serve, words):
    decision, reason = decide_promotion(new, serving, tolerance=0.02 + 1e-12)
    assert decision is serve and words in reason


def test_decide_promotion_tolerance_and_metric_are_settings():
    assert decide_promotion({"mAP": 0.15}, {"mAP": 0.2}, tolerance=0.1)[0]
    assert not decide_promotion({"mAP": 0.15}, {"mAP": 0.2}, tolerance=0.0)[0]
    assert not decide_promotion({"mAP": 0.3, "AP40": 0.1}, {"mAP": 0.2, "AP40": 0.5}, metric="AP40")[0]


# --- the store -----------------------------------------------------------------------------------


def _images(Session, n, folder):
    with Session.begin() as s:
        project = ensure_project(s)
        paths = [str(folder / f"{i}.png") for i in range(n)]
        for path in paths:
            PILImage.new("L", (64, 64)).save(path)
        rows = [Image(project_id=project.id, path=p, width=64, height=64, source="t", split="train") for p in paths]
        s.add_all(rows)
        s.flush()
        return [r.id for r in rows]


def _finish(store: SqlStore, Session, image_ids, val_map, *, serve_by_rule=True, tolerance=0.02):
    """A version as the trainer finishes one: suggestions (best: image_ids[0]) and predictions written,
    then the serve-or-candidate decision on ``val_map``."""
    version = store.start_version(1, {}, {})
    with Session.begin() as s:
        write_suggestions(s, version.id, [
            {"image_id": i, "action": SuggestedAction.ADD_LABELS, "score": 1.0 - k / 10,
             "reason": {"text": f"v{version.id}", "classes": []}} for k, i in enumerate(image_ids)
        ])
        write_predictions(s, version.id, [{"image_id": i, "boxes": [{"class": "Nodule", "bbox": [1, 1, 9, 9],
                                                                     "score": 0.9}], "image_probs": {}} for i in image_ids])
    serve, reason = decide_promotion({"mAP": val_map}, store.serving_metrics(), tolerance=tolerance)
    store.finish_version(version.id, "/ckpt", {"val": {"mAP": val_map}}, {}, serve=serve, reason=reason)
    return version.id, serve


def test_a_worse_version_stays_candidate_and_the_queue_keeps_the_old_suggestions(db_sessionmaker, tmp_path):
    S = db_sessionmaker
    ids = _images(S, 3, tmp_path)
    store = SqlStore(S, models_dir=tmp_path / "models")
    v1, served1 = _finish(store, S, ids, 0.191)
    v2, served2 = _finish(store, S, ids[::-1], 0.038)  # ranks the images the other way round
    assert served1 and not served2
    with S.begin() as s:
        assert serving_model_version(s).id == v1
        assert [v.id for v in candidate_model_versions(s)] == [v2]
        items = queue(s, SuggestedAction.ADD_LABELS, annotator="a")
        assert [i.image_id for i in items] == ids and all(i.reason == f"v{v1}" for i in items)
        assert [x.model_version_id for x in queue(s, SuggestedAction.ADD_LABELS, annotator="a")] == [v1] * 3
        assert model_output(s, ids[0]).model_version_id == v1
        assert {v["id"]: v["state"] for v in model_versions(s)} == {v1: "serving", v2: "candidate"}
        summary = serving_summary(s)
        assert summary["serving"]["id"] == v1 and [c["id"] for c in summary["candidates"]] == [v2]
        assert "0.153 below" in summary["candidates"][0]["reason"]
        entry = s.scalars(select(AuditEntry).where(AuditEntry.action == CANDIDATE_ACTION)).one()
        assert entry.after["model_version_id"] == v2 and entry.annotator.name == "trainer"
    # a version that is not worse beyond the tolerance serves at once
    v3, served3 = _finish(store, S, ids, 0.18)
    with S.begin() as s:
        assert served3 and serving_model_version(s).id == v3 and candidate_model_versions(s) == []


def test_promote_and_rollback_are_explicit_and_audited(db_sessionmaker, tmp_path):
    S = db_sessionmaker
    ids = _images(S, 2, tmp_path)
    store = SqlStore(S, models_dir=tmp_path / "models")
    v1, _ = _finish(store, S, ids, 0.2)
    v2, _ = _finish(store, S, ids[::-1], 0.05)
    with S.begin() as s:
        promote_model_version(s, v2, annotator="dr.lee")
    with S.begin() as s:
        assert serving_model_version(s).id == v2
        assert [i.image_id for i in queue(s, SuggestedAction.ADD_LABELS, annotator="a")] == ids[::-1]
        promote_model_version(s, v1, annotator="dr.kim", note="v2 misses nodules")
    with S.begin() as s:
        assert serving_model_version(s).id == v1
        entries = s.scalars(select(AuditEntry).where(AuditEntry.action.in_([PROMOTE_ACTION, ROLLBACK_ACTION]))
                            .order_by(AuditEntry.id)).all()
        assert [(e.action, e.annotator.name, e.after["model_version_id"], e.after["previous_model_version_id"])
                for e in entries] == [(PROMOTE_ACTION, "dr.lee", v2, v1), (ROLLBACK_ACTION, "dr.kim", v1, v2)]
        assert entries[1].note == "v2 misses nodules" and entries[1].at is not None
        assert serving_summary(s)["history"][0]["action"] == ROLLBACK_ACTION
        row = s.get(ServingModel, serving_model_version(s).project_id)
        assert row.model_version_id == v1 and row.since is not None
    # refused: already serving, not ready, unknown; nothing changes
    with S.begin() as s:
        failed = create_model_version(s, config={})
        finish_model_version(s, failed.id, status="failed")
        failed_id = failed.id
    for version_id, message in ((v1, "already serves"), (failed_id, "not ready"), (999, "no model version 999")):
        with pytest.raises(ValueError, match=message), S.begin() as s:
            promote_model_version(s, version_id, annotator="dr.lee")
    with S.begin() as s:
        assert serving_model_version(s).id == v1


def test_without_a_serving_row_the_newest_ready_version_serves_and_a_candidate_pins_it(db_sessionmaker, tmp_path):
    S = db_sessionmaker
    ids = _images(S, 1, tmp_path)
    with S.begin() as s:  # a version made without the trainer (no serving row)
        v1 = create_model_version(s, config={})
        finish_model_version(s, v1.id)
        record_metrics(s, v1.id, "val", {"mAP": 0.5})
        v1 = v1.id
        assert serving_model_version(s).id == v1 and s.scalars(select(ServingModel)).first() is None
    store = SqlStore(S, models_dir=tmp_path / "models")
    v2, served = _finish(store, S, ids, 0.1)
    with S.begin() as s:
        assert not served and serving_model_version(s).id == v1  # not the newest ready one
        assert s.scalars(select(ServingModel)).one().model_version_id == v1


def test_migration_makes_the_newest_ready_version_serve_in_an_existing_store(tmp_path):
    url = f"sqlite:///{tmp_path / 'old.db'}"
    engine = sa.create_engine(url)
    upgrade(engine, "0002")  # a store from before this change
    with make_sessionmaker(engine).begin() as s:  # the old schema: rows written as its SQL, not today's models
        s.execute(sa.text("INSERT INTO project (name, created_at) VALUES ('default', CURRENT_TIMESTAMP)"))
        project_id = s.scalars(sa.text("SELECT id FROM project")).one()
        for status in ("ready", "ready", "failed"):
            s.execute(sa.text("INSERT INTO model_version (project_id, round, status, config, label_counts, created_at) "
                              "VALUES (:p, 1, :s, '{}', '{}', CURRENT_TIMESTAMP)"), {"p": project_id, "s": status})
    engine.dispose()
    Session = make_sessionmaker(init_db(url))
    with Session.begin() as s:
        assert s.scalars(select(ServingModel)).one().model_version_id == 2
        assert serving_model_version(s).id == 2


# --- the loop ------------------------------------------------------------------------------------


def test_trainer_keeps_a_worse_round_as_candidate(tmp_path):
    """A real round whose val mAP falls short of the serving version's (set high) is not served."""
    from tests.test_trainer import SETTINGS, make_store

    url = make_store(tmp_path)
    S = make_sessionmaker(init_db(url))
    store = SqlStore.open(url)
    with S.begin() as s:  # one image with two findings assessed and seven not: the round trains on it
        image_id = s.scalars(select(Image.id).where(Image.split == "train", Image.granularity == "unlabeled")).first()
        set_image_labels(s, image_id, {"Nodule": True, "Mass": False}, annotator="dr.lee")
    snapshot = store.snapshot()
    record = next(r for r in records_from_coco(snapshot.train, classes=snapshot.classes) if r.image_id == image_id)
    assert record.granularity == "weak" and len(record.unknown_labels) == len(snapshot.classes) - 2
    first = Trainer(store, SETTINGS).run()[0]
    assert first.status == "ready" and first.serving and first.label_counts["weak"] == 4
    with S.begin() as s:
        record_metrics(s, first.version_id, "val", {"mAP": 2.0})  # no real model reaches this
        before = [(x.image_id, x.score) for x in queue(s, SuggestedAction.ADD_LABELS, annotator="a")]
    second = Trainer(store, replace(SETTINGS, promote_tolerance=0.05)).run()[0]
    assert second.status == "ready" and second.serving is False and "kept as a candidate" in second.notes["promotion"]
    with S.begin() as s:
        assert serving_model_version(s).id == first.version_id
        assert [v.id for v in candidate_model_versions(s)] == [second.version_id]
        after = queue(s, SuggestedAction.ADD_LABELS, annotator="a")
        assert [(x.image_id, x.score) for x in after] == before and {x.model_version_id for x in after} == {first.version_id}


# --- the pages -----------------------------------------------------------------------------------


@pytest.fixture
def two_versions(db_url, db_sessionmaker, monkeypatch, tmp_path):
    monkeypatch.setenv("OXNET_DB_URL", db_url)
    monkeypatch.setenv("OXNET_DEMO", "0")
    ids = _images(db_sessionmaker, 2, tmp_path)
    store = SqlStore(db_sessionmaker, models_dir=tmp_path / "models")
    v1, _ = _finish(store, db_sessionmaker, ids, 0.191)
    v2, _ = _finish(store, db_sessionmaker, ids, 0.038)
    return db_sessionmaker, v1, v2


def _app(page, annotator="dr.test", role="admin"):
    at = AppTest.from_file(MAIN, default_timeout=60)
    if annotator:  # logged in as this (created) admin: promotions are an admin's
        at.session_state[TOKEN_KEY] = session_token(annotator, role)
    at.run()
    at.switch_page(page)
    at.run()
    assert not at.exception, at.exception
    return at


def _texts(at):
    return "\n".join(str(e.value) for kind in ("markdown", "warning", "error", "info") for e in getattr(at, kind))


def test_overview_shows_the_candidate_with_both_numbers_and_promotes_it(two_versions):
    S, v1, v2 = two_versions
    at = _app("views/overview.py")
    assert f"Version **{v1}**" in _texts(at)  # the serving version, not the newest
    warning = next(w.value for w in at.warning if "candidate" in w.value)
    assert f"Version **{v2}**" in warning and "0.038" in warning and "0.191" in warning
    at.button(key=f"overview_promote_{v2}").click().run()
    assert not at.exception, at.exception
    with S.begin() as s:
        assert serving_model_version(s).id == v2
        entry = s.scalars(select(AuditEntry).where(AuditEntry.action == PROMOTE_ACTION)).one()
        assert entry.annotator.name == "dr.test"
    assert f"Version **{v2}**" in _texts(at) and not any("candidate" in w.value for w in at.warning)


def test_overview_promote_needs_an_admin(two_versions):
    """Promotion is an admin's (the function checks it too: tests/test_accounts.py); others see no button."""
    _, _, v2 = two_versions
    at = _app("views/overview.py", annotator="dr.reader", role="reviewer")
    assert f"overview_promote_{v2}" not in {b.key for b in at.button}
    assert "An admin can promote this version" in "\n".join(c.value for c in at.caption)


def test_metrics_rolls_back_and_promotes_any_ready_version(two_versions):
    S, v1, v2 = two_versions
    at = _app("views/metrics.py")
    assert at.selectbox(key="metrics_serve_version").value == v2
    at.button(key=f"metrics_serve_{v2}").click().run()  # promote the candidate
    assert not at.exception, at.exception
    with S.begin() as s:
        assert serving_model_version(s).id == v2
    assert at.selectbox(key="metrics_serve_version").value == v1
    assert at.button(key=f"metrics_serve_{v1}").label == f"Roll back to version {v1}"
    at.button(key=f"metrics_serve_{v1}").click().run()
    with S.begin() as s:
        assert serving_model_version(s).id == v1
        actions = [e.action for e in s.scalars(select(AuditEntry).order_by(AuditEntry.id))]
        assert actions[-2:] == [PROMOTE_ACTION, ROLLBACK_ACTION]


def test_a_promotion_click_acts_on_the_version_its_page_showed(two_versions):
    """Two admins have Metrics open with the candidate chosen. The first promotes it; the second's click
    on their unchanged page ("Promote version 2") must not act on the version the list offers after the
    rerun (a rollback to version 1): it does nothing, and the candidate serves."""
    S, v1, v2 = two_versions
    first, second = _app("views/metrics.py"), _app("views/metrics.py", annotator="dr.other")
    assert first.selectbox(key="metrics_serve_version").value == second.selectbox(key="metrics_serve_version").value == v2
    first.button(key=f"metrics_serve_{v2}").click().run()
    second.button(key=f"metrics_serve_{v2}").click().run()
    assert not second.exception, second.exception
    with S.begin() as s:
        assert serving_model_version(s).id == v2
        assert [e.action for e in s.scalars(select(AuditEntry).order_by(AuditEntry.id))].count(ROLLBACK_ACTION) == 0
    assert second.button(key=f"metrics_serve_{v1}").label == f"Roll back to version {v1}"  # what the page offers now


def test_trainer_script_refuses_a_bad_tolerance_without_a_traceback(capsys):
    import app.trainer as script

    for bad in ("-0.1", "nan", "lots"):
        with pytest.raises(SystemExit) as exit_info:
            script.main(["--promote-tolerance", bad, "--db", "sqlite://"])
        assert exit_info.value.code == 2
        assert "--promote-tolerance" in capsys.readouterr().err
    assert script._parser().parse_args(["--promote-tolerance", "0.05"]).promote_tolerance == 0.05
