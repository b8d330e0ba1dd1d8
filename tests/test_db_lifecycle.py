"""The granularity lifecycle: derivation, edits, downgrades, audit replay and version conflicts."""

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import select

from db.lifecycle import (
    ConflictError,
    derive_granularity,
    downgrade,
    granularity_mismatches,
    image_state,
    mark_boxes_complete,
    replay_audit,
    set_boxes,
    set_image_labels,
)
from db.models import AuditEntry, Granularity, Image
from db.projects import ensure_project

CLASSES = ("Mass", "Nodule", "Fracture")


def _new_image(Session, size=(100, 80)) -> int:
    with Session.begin() as session:
        project = ensure_project(session, "default", CLASSES)
        n = len(session.scalars(select(Image.id)).all())
        image = Image(project_id=project.id, path=f"/img/{n}.png", width=size[0], height=size[1], source="test")
        session.add(image)
        session.flush()
        return image.id


def _state(Session, image_id):
    with Session() as session:
        image = session.get(Image, image_id)
        return image_state(image), image.granularity, image.version


def test_derive_granularity_rule():
    assert derive_granularity(boxes_complete=False, no_finding=False, has_labels=False, has_boxes=False) == "unlabeled"
    assert derive_granularity(boxes_complete=False, no_finding=True, has_labels=False, has_boxes=False) == "weak"
    assert derive_granularity(boxes_complete=False, no_finding=False, has_labels=True, has_boxes=False) == "weak"
    assert derive_granularity(boxes_complete=True, no_finding=True, has_labels=False, has_boxes=False) == "full"


def test_upgrade_path_and_box_implies_label(db_sessionmaker):
    S = db_sessionmaker
    image_id = _new_image(S)
    with S.begin() as s:
        assert set_image_labels(s, image_id, {"Mass": False}, annotator="ann").granularity is Granularity.WEAK
    with S.begin() as s:
        image = set_boxes(s, image_id, [("Nodule", 10, 10, 20, 30)], annotator="ann")
        assert image.granularity is Granularity.WEAK
        assert image_state(image)["labels"] == {"Mass": False, "Nodule": True}
    with S.begin() as s:
        assert mark_boxes_complete(s, image_id, annotator="ann", expected_version=3).granularity is Granularity.FULL
    state, granularity, version = _state(S, image_id)
    assert (granularity, version) == (Granularity.FULL, 4)


def test_no_finding_confirmed_with_zero_boxes_is_full(db_sessionmaker):
    S = db_sessionmaker
    image_id = _new_image(S)
    with S.begin() as s:
        set_image_labels(s, image_id, {}, annotator="ann", no_finding=True)
        assert set_boxes(s, image_id, [], annotator="ann", complete=True).granularity is Granularity.FULL
    with S.begin() as s, pytest.raises(ValueError, match="No Finding"):
        set_boxes(s, image_id, [("Mass", 1, 1, 5, 5)], annotator="ann")


@pytest.mark.parametrize(
    "box, message",
    [
        (("Mass", 50, 10, 20, 30), "inverted"),
        (("Mass", -1, 10, 20, 30), "outside"),
        (("Mass", 10, 10, 20, 90), "outside"),
        (("Tumour", 1, 1, 5, 5), "unknown class"),
        (("Mass", float("nan"), 1, 5, 5), "not finite"),
    ],
)
def test_bad_boxes_are_refused_and_change_nothing(db_sessionmaker, box, message):
    S = db_sessionmaker
    image_id = _new_image(S)
    before = _state(S, image_id)
    with S.begin() as s, pytest.raises(ValueError, match=message):
        set_boxes(s, image_id, [box], annotator="ann")
    assert _state(S, image_id) == before


def test_downgrades_only_explicit_and_logged(db_sessionmaker):
    S = db_sessionmaker
    image_id = _new_image(S)
    with S.begin() as s:
        set_boxes(s, image_id, [("Mass", 1, 1, 9, 9)], annotator="ann", complete=True)
    with S.begin() as s, pytest.raises(ValueError, match="downgrade"):
        set_image_labels(s, image_id, {}, annotator="ann")  # allowed: the box keeps Mass present
        set_boxes(s, image_id, [], annotator="ann")
        set_image_labels(s, image_id, {}, annotator="ann")
    with S.begin() as s, pytest.raises(ValueError, match="reason"):
        downgrade(s, image_id, "weak", annotator="lead", reason=" ")
    with S.begin() as s:
        assert downgrade(s, image_id, "weak", annotator="lead", reason="box misses the lesion").granularity is Granularity.WEAK
    with S.begin() as s:
        entry = s.scalars(select(AuditEntry).where(AuditEntry.action == "downgrade")).one()
        assert (entry.annotator.name, entry.note, entry.before["boxes_complete"]) == ("lead", "box misses the lesion", True)
        assert downgrade(s, image_id, "unlabeled", annotator="lead", reason="wrong patient").granularity is Granularity.UNLABELED
        assert replay_audit(s, image_id) == image_state(s.get(Image, image_id))


def test_second_save_of_same_version_conflicts_and_first_is_kept(db_sessionmaker):
    S = db_sessionmaker
    image_id = _new_image(S)
    version = _state(S, image_id)[2]
    with S.begin() as s:
        set_image_labels(s, image_id, {"Mass": True}, annotator="alice", expected_version=version)
    with pytest.raises(ConflictError, match="changed by someone else"), S.begin() as s:
        set_image_labels(s, image_id, {"Nodule": True}, annotator="bob", expected_version=version)
    state, _, new_version = _state(S, image_id)
    assert state["labels"] == {"Mass": True} and new_version == version + 1


def test_version_column_catches_a_race_between_load_and_flush(db_sessionmaker):
    """Two writers that both passed the version check: the database-level check stops the second."""
    S = db_sessionmaker
    image_id = _new_image(S)
    slow = S()
    stale = slow.get(Image, image_id)
    with S.begin() as s:
        set_image_labels(s, image_id, {"Mass": True}, annotator="alice")
    stale.no_finding = True
    with pytest.raises(Exception, match="expected to update 1 row"):
        slow.flush()
    slow.rollback()
    slow.close()
    assert _state(S, image_id)[0]["no_finding"] is False


# --- property: stored granularity == derived, audit log replays to the state --------------------

box_strategy = st.tuples(
    st.sampled_from(CLASSES + ("Unknown",)),
    st.integers(-5, 100), st.integers(-5, 80), st.integers(-5, 105), st.integers(-5, 85),
)
edit_strategy = st.one_of(
    st.tuples(st.just("labels"), st.dictionaries(st.sampled_from(CLASSES), st.booleans(), max_size=3), st.booleans()),
    st.tuples(st.just("boxes"), st.lists(box_strategy, max_size=3), st.booleans()),
    st.tuples(st.just("complete")),
    st.tuples(st.just("downgrade"), st.sampled_from(["weak", "unlabeled"])),
    st.tuples(st.just("stale")),
)


def _apply(session, image_id, edit, version):
    kind = edit[0]
    if kind == "labels":
        set_image_labels(session, image_id, edit[1], annotator="a", no_finding=edit[2], expected_version=version)
    elif kind == "boxes":
        set_boxes(session, image_id, edit[1], annotator="b", complete=edit[2], expected_version=version)
    elif kind == "complete":
        mark_boxes_complete(session, image_id, annotator="c", expected_version=version)
    elif kind == "downgrade":
        downgrade(session, image_id, edit[1], annotator="d", reason="test", expected_version=version)
    else:
        set_image_labels(session, image_id, {"Mass": True}, annotator="a", expected_version=version - 1)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(edits=st.lists(edit_strategy, min_size=1, max_size=8))
def test_random_edit_sequences_keep_the_invariants(db_sessionmaker, edits):
    S = db_sessionmaker
    image_id = _new_image(S)
    for edit in edits:
        state, granularity, version = _state(S, image_id)
        try:
            with S.begin() as s:
                _apply(s, image_id, edit, version)
            succeeded = True
        except (ValueError, ConflictError):
            succeeded = False
        new_state, new_granularity, new_version = _state(S, image_id)
        if not succeeded:
            assert (new_state, new_granularity, new_version) == (state, granularity, version)
        else:
            assert new_version == version + 1
            if edit[0] != "downgrade":
                assert new_granularity.rank >= granularity.rank
        # boxes imply their labels; "No Finding" excludes findings
        assert all(new_state["labels"].get(box[0]) is True for box in new_state["boxes"])
        assert not (new_state["no_finding"] and (new_state["boxes"] or any(new_state["labels"].values())))
        with S() as s:
            assert granularity_mismatches(s) == []
            assert replay_audit(s, image_id) == new_state
