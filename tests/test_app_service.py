"""The pages' door in :mod:`db.service`: each UI event is one session or transaction of its own."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import func, select

from db.demo import seed_demo
from db.engine import init_db, make_sessionmaker
from db.models import AnnotationTime, Granularity, Image, Split
from db.trainer_lock import acquire_trainer_lock, release_trainer_lock
from db.service import (
    TRAINER_STALE_AFTER,
    ConflictError,
    discard_draft,
    drafts_of,
    image_counts,
    leave_image,
    read_draft,
    save_from_draft,
    take_image,
    trainer_status,
    write_draft,
)

PAYLOAD = {"findings": {}, "no_finding": False, "complete": False, "boxes": [["Nodule", 2, 2, 20, 20]], "task": "draw boxes"}


@pytest.fixture
def sessions(tmp_path):
    return make_sessionmaker(init_db(f"sqlite:///{tmp_path / 'store.db'}"))


@pytest.fixture
def demo(sessions):
    seed_demo(sessions.kw["bind"].url.render_as_string(hide_password=False), n=6, size=32)
    return sessions


def _unlabeled(sessions) -> tuple[int, int]:
    """(id, version) of an unlabeled training image."""
    with sessions() as session:
        image = session.scalars(select(Image).where(Image.split == Split.TRAIN, Image.granularity == Granularity.UNLABELED)
                                .order_by(Image.id)).first()
        return image.id, image.version


def test_no_counts_on_a_fresh_store(sessions):
    assert image_counts(sessions) is None


def test_image_counts_of_the_demo_and_no_trainer_before_one_ran(demo):
    counts = image_counts(demo)
    assert counts["total"] == 6 and sum(counts["granularity"].values()) == 6
    assert trainer_status(demo) is None


def test_trainer_status_alive_until_its_heartbeat_is_stale(demo):
    with demo.begin() as session:
        assert acquire_trainer_lock(session, "host:1")
    row = trainer_status(demo)
    assert row["owner"] == "host:1" and row["alive"] and 0 <= row["seconds_ago"] < 60
    later = row["heartbeat_at"] + TRAINER_STALE_AFTER + timedelta(seconds=1)
    stale = trainer_status(demo, now=later)
    assert not stale["alive"] and stale["seconds_ago"] == pytest.approx(TRAINER_STALE_AFTER.total_seconds() + 1)
    with demo.begin() as session:
        release_trainer_lock(session, "host:1")
    assert not trainer_status(demo)["alive"]


def test_a_leased_image_is_refused_to_another_until_given_back(demo):
    image_id, _ = _unlabeled(demo)
    assert take_image(demo, image_id, "dr.a") and take_image(demo, image_id, "dr.a")  # again: extended
    assert not take_image(demo, image_id, "dr.b")
    leave_image(demo, image_id, "dr.b")  # not theirs: nothing happens
    assert not take_image(demo, image_id, "dr.b")
    leave_image(demo, image_id, "dr.a")
    assert take_image(demo, image_id, "dr.b")
    with pytest.raises(ValueError, match="no image with id 99999"):
        take_image(demo, 99999, "dr.a")


def test_drafts_round_trip(demo):
    image_id, version = _unlabeled(demo)
    write_draft(demo, image_id, "dr.a", PAYLOAD, base_version=version)
    stored = read_draft(demo, image_id, "dr.a")
    assert stored.payload["boxes"] == PAYLOAD["boxes"] and stored.base_version == version
    assert [i for i, _ in drafts_of(demo, "dr.a")] == [image_id] and drafts_of(demo, "dr.b") == []
    discard_draft(demo, image_id, "dr.a")
    assert read_draft(demo, image_id, "dr.a") is None


def _save(sessions, image_id, version, **changes):
    arguments = {"present": ["Nodule"], "absent": [], "no_finding": False, "boxes": [("Nodule", 2.0, 2.0, 20.0, 20.0)],
                 "complete": True, "annotator": "dr.a", "expected_version": version, "action": "draw boxes",
                 "before": "unlabeled", "seconds": 12.0, **changes}
    return save_from_draft(sessions, image_id, **arguments)


def _times(sessions, image_id) -> list[tuple[str, float]]:
    with sessions() as session:
        return [(t.upgrade, t.seconds) for t in session.scalars(select(AnnotationTime).where(AnnotationTime.image_id == image_id))]


def test_save_from_draft_saves_drops_the_draft_and_times_the_save_in_one_transaction(demo):
    image_id, version = _unlabeled(demo)
    write_draft(demo, image_id, "dr.a", PAYLOAD, base_version=version)
    assert _save(demo, image_id, version) == "full"
    assert read_draft(demo, image_id, "dr.a") is None
    assert _times(demo, image_id) == [("unlabeled->full", 12.0)]


@pytest.mark.parametrize("refusal", ["invalid", "conflict", "bad seconds"])
def test_a_refused_save_stores_nothing_and_keeps_the_draft(demo, refusal):
    image_id, version = _unlabeled(demo)
    write_draft(demo, image_id, "dr.a", PAYLOAD, base_version=version)
    changes, error = {
        "invalid": ({"boxes": [("Nodule", 2.0, 2.0, 3.0, 3.0)]}, ValueError),  # a click, not a box
        "conflict": ({"expected_version": version - 1}, ConflictError),
        "bad seconds": ({"seconds": float("nan")}, ValueError),  # fails after the annotation was written
    }[refusal]
    with pytest.raises(error):
        _save(demo, image_id, version, **changes)
    assert read_draft(demo, image_id, "dr.a") is not None
    assert _times(demo, image_id) == []
    with demo() as session:
        image = session.get(Image, image_id)
        assert (image.granularity, image.version) == (Granularity.UNLABELED, version)
        assert session.scalar(select(func.count()).select_from(AnnotationTime)) == 0
