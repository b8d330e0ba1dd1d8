"""Measured annotation cost (db.costs): the saves' active seconds, the medians the strategies use, the
Overview table, and the history and pool hints the trainer reads from the store."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import select

from db.costs import MAX_ACTIVE_SECONDS, annotation_costs, cost_rows, cost_summary, record_save, upgrade_of
from db.demo import seed_demo
from db.engine import init_db, make_sessionmaker
from db.lifecycle import set_image_labels
from db.models import AnnotationTime, Granularity, Image
from oxnet.active.strategies import CostModel
from tests.logins import TOKEN_KEY, session_token


@pytest.fixture
def store(tmp_path):
    url = f"sqlite:///{tmp_path / 'store.db'}"
    seed_demo(url, n=16, size=64)
    return make_sessionmaker(init_db(url))


def _unlabeled(session):
    return session.scalars(select(Image.id).where(Image.granularity == Granularity.UNLABELED).order_by(Image.id)).all()


def test_upgrade_names():
    assert upgrade_of("unlabeled", "weak") == "unlabeled->weak"
    assert upgrade_of(Granularity.UNLABELED, Granularity.FULL) == "unlabeled->full"
    assert upgrade_of("weak", "weak") == "edit" and upgrade_of("full", "weak") == "edit"


def test_a_save_records_its_upgrade_and_capped_seconds(store):
    with store.begin() as session:
        image_id = _unlabeled(session)[0]
        set_image_labels(session, image_id, {"Nodule": True}, annotator="dr.a")
        row = record_save(session, image_id, annotator="dr.a", action="add image-level labels", before="unlabeled",
                          seconds=12.5)
        assert (row.upgrade, row.seconds, row.action) == ("unlabeled->weak", 12.5, "add image-level labels")
        long = record_save(session, image_id, annotator="dr.a", action="add image-level labels", before="weak",
                           seconds=10_000)
        assert long.upgrade == "edit" and long.seconds == MAX_ACTIVE_SECONDS
        for bad in (-1.0, float("nan"), float("inf")):
            with pytest.raises(ValueError, match="seconds"):
                record_save(session, image_id, annotator="dr.a", action="draw boxes", before="weak", seconds=bad)
        with pytest.raises(ValueError, match="no image"):
            record_save(session, 10_000, annotator="dr.a", action="draw boxes", before="weak", seconds=1)
        assert len(session.scalars(select(AnnotationTime)).all()) == 2


def test_costs_stay_default_until_enough_saves_then_use_medians(store):
    with store.begin() as session:
        ids = _unlabeled(session)
        assert annotation_costs(session) == CostModel()
        for k, image_id in enumerate(ids[:5]):
            set_image_labels(session, image_id, {"Nodule": True}, annotator="dr.a")
            record_save(session, image_id, annotator="dr.a", action="add image-level labels", before="unlabeled",
                        seconds=[10, 20, 30, 40, 1000][k])
        costs = annotation_costs(session)
        assert costs.seconds_per_unit == 30 and costs.labels == 1 and costs.boxes == 5  # boxes: not enough saves
        assert costs.labels_and_boxes == 6
        summary = cost_summary(session)
        assert summary["unlabeled->weak"] == {"saves": 5, "median_seconds": 30}
        assert summary["weak->full"] == {"saves": 0, "median_seconds": None}
        for image_id in ids[:5]:  # boxes: rows written directly (the upgrade is what the page saw)
            session.add(AnnotationTime(project_id=1, image_id=image_id, annotator_id=1, action="draw boxes",
                                       upgrade="weak->full", seconds=90))
        session.flush()
        costs = annotation_costs(session)
        assert costs.boxes == pytest.approx(3.0) and costs.measured["weak->full"] == 5
        assert costs.per_minute(0.01) == pytest.approx(0.01 * 60 / 30)
        rows = {r["upgrade"]: r for r in cost_rows(session)}
        assert rows["weak->full"]["source"] == "measured" and rows["weak->full"]["units"] == 3.0
        assert rows["unlabeled->full"]["source"] == "default" and rows["unlabeled->full"]["units"] == 4.0


def test_overview_shows_the_cost_table(tmp_path, monkeypatch):
    from streamlit.testing.v1 import AppTest

    url = f"sqlite:///{tmp_path / 'workbench.db'}"
    monkeypatch.setenv("OXNET_DB_URL", url)
    seed_demo(url, n=10, size=64)
    with make_sessionmaker(init_db(url)).begin() as session:
        image_id = _unlabeled(session)[0]
        set_image_labels(session, image_id, {"Nodule": True}, annotator="dr.a")
        record_save(session, image_id, annotator="dr.a", action="add image-level labels", before="unlabeled", seconds=7)
    at = AppTest.from_file(str(Path(__file__).parents[1] / "app" / "main.py"), default_timeout=60)
    at.session_state[TOKEN_KEY] = session_token("dr.a")
    at.run()
    at.switch_page("views/overview.py").run()
    assert not at.exception, at.exception
    table = next(df.value for df in at.dataframe if "upgrade" in df.value.columns)
    assert list(table["upgrade"]) == ["unlabeled->weak", "weak->full", "unlabeled->full"]
    assert list(table["saves"]) == [1, 0, 0] and list(table["source"]) == ["default"] * 3
    assert "Annotation cost" in [h.value for h in at.subheader]
