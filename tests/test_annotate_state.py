"""The Annotate page's logic without Streamlit: drafts in the store, defaults, view maths, suggestion numbers."""

from __future__ import annotations

from datetime import datetime

import pytest
from sqlalchemy import select

from app.annotate_state import (
    ACTION_KEY,
    DIRTY_KEY,
    EDIT_BOXES,
    FOLD_MARGIN,
    MIN_FIT,
    all_others_absent,
    baseline,
    boxes_to_canvas,
    canvas_key,
    canvas_to_boxes,
    canvas_to_image,
    current_draft,
    default_task,
    fit_view,
    from_payload,
    image_to_canvas,
    is_dirty,
    make_view,
    numbered_suggestions,
    redraw,
    split_small,
    start_editing,
    to_payload,
    undo,
)
from db.demo import seed_demo
from db.drafts import StoredDraft, check_payload, delete_draft, get_draft, list_drafts, save_draft
from db.engine import init_db, make_sessionmaker
from db.models import Draft, Image
from db.service import ImageDetail

CLASSES = ["Mass", "Nodule", "Fracture"]


def _detail(granularity="unlabeled", labels=None, boxes=(), complete=False) -> ImageDetail:
    return ImageDetail(id=1, path="x.png", width=200, height=100, version=3, granularity=granularity, split="train",
                       file_status="ok", no_finding=False, boxes_complete=complete, labels=dict(labels or {}),
                       boxes=list(boxes), classes=CLASSES)


@pytest.mark.parametrize(("granularity", "task"), [("unlabeled", "add image-level labels"), ("weak", "draw boxes"), ("full", EDIT_BOXES)])
def test_default_task_follows_the_granularity(granularity, task):
    assert default_task(granularity) == task


def test_baseline_maps_labels_to_three_states_and_complete_only_when_full():
    base = baseline(_detail("weak", {"Mass": True, "Fracture": False}), "draw boxes")
    assert base["findings"] == {"Mass": "present", "Nodule": "not assessed", "Fracture": "absent"}
    assert base["complete"] is False
    assert baseline(_detail("full", {"Mass": True}, [("Mass", 1, 1, 9, 9)], complete=True), EDIT_BOXES)["complete"] is True


def test_all_others_absent_keeps_present_and_boxed():
    findings = {"Mass": "present", "Nodule": "not assessed", "Fracture": "not assessed"}
    assert all_others_absent(findings, [["Nodule", 1, 1, 9, 9]]) == {"Mass": "present", "Nodule": "present", "Fracture": "absent"}


def test_a_box_only_change_is_dirty():
    base = baseline(_detail(), "draw boxes")
    assert not is_dirty(base, base)
    assert is_dirty({**base, "boxes": [["Mass", 1, 1, 9, 9]]}, base)
    assert not is_dirty({**base, "boxes": []}, {**base, "boxes": []})


def test_payload_round_trip_and_bad_fields_named():
    draft = {**baseline(_detail(), "draw boxes"), "boxes": [["Mass", 1, 2, 30, 40]]}
    assert from_payload(to_payload(draft), CLASSES) == {**draft, "boxes": [["Mass", 1.0, 2.0, 30.0, 40.0]]}
    assert from_payload({**to_payload(draft), "findings": {"Gone": "absent"}}, CLASSES)["findings"] == dict.fromkeys(CLASSES, "not assessed")
    with pytest.raises(ValueError, match="'findings'"):
        check_payload({**draft, "findings": {"Mass": "maybe"}})
    with pytest.raises(ValueError, match=r"'boxes'\[0\]"):
        check_payload({**draft, "boxes": [["Mass", 1, 2]]})
    with pytest.raises(ValueError, match="lacks"):
        check_payload({"findings": {}})


@pytest.mark.parametrize("zoom", [1, 2, 4])
def test_view_maps_canvas_and_image_pixels_both_ways(zoom):
    view = make_view(2048, 1024, 550, 640, zoom=zoom, centre=(0.7, 0.2))
    assert view.width <= 550 and view.height <= 640
    assert view.x0 >= 0 and view.x1 <= 2048 and view.y0 >= 0 and view.y1 <= 1024
    assert view.x1 - view.x0 == pytest.approx(2048 / zoom)
    box = (view.x0 + 10.0, view.y0 + 20.0, view.x0 + 60.0, view.y0 + 90.0)
    rect = image_to_canvas(view, *box)
    assert canvas_to_image(view, rect["left"], rect["top"], rect["width"], rect["height"], 2048, 1024) == pytest.approx(box, abs=0.01)


def test_view_fits_the_column_and_clamps_to_the_image():
    view = make_view(640, 640, 548, 640)
    assert (view.width, view.height) == (548, 548) and view.scale == pytest.approx(548 / 640)
    assert canvas_to_image(view, -20, 500, 100, 200, 640, 640) == (0.0, pytest.approx(583.94, abs=0.01), pytest.approx(93.43, abs=0.01), 640.0)
    with pytest.raises(ValueError, match="zoom"):
        make_view(10, 10, 100, 100, zoom=0)


def test_split_small_separates_clicks_from_boxes():
    kept, small = split_small([("Mass", 1, 1, 2.6, 2.6), ("Mass", 1, 1, 5, 5), ("Nodule", 0, 0, 3.9, 40)], 4.0)
    assert kept == [("Mass", 1, 1, 5, 5)] and len(small) == 2


def test_suggestion_numbers_stay_with_their_box():
    boxes = [{"class": "Nodule", "bbox": [0, 0, 5, 5], "score": s} for s in (0.9, 0.8, 0.7, 0.3)]
    shown = numbered_suggestions(boxes, handled=[0, 2], threshold=0.5)
    assert [(k, b["number"]) for k, b in shown] == [(1, 2)]
    assert [b["number"] for _, b in numbered_suggestions(boxes, [], 0.0)] == [1, 2, 3, 4]


@pytest.mark.parametrize("zoom", [1, 3])
def test_canvas_rectangles_and_boxes_convert_both_ways(zoom):
    view = make_view(1000, 800, 500, 500, zoom=zoom, centre=(0.4, 0.6))
    x0, y0 = view.x0, view.y0
    boxes = [("Mass", x0 + 10.0, y0 + 20.0, x0 + 110.0, y0 + 70.0), ("Nodule", x0 + 1.0, y0 + 2.0, x0 + 5.0, y0 + 9.0)]
    rects = boxes_to_canvas(boxes, view)
    assert [r["label"] for r in rects] == ["Mass", "Nodule"]
    assert rects[0]["left"] == pytest.approx(10.0 * view.scale) and rects[0]["width"] == pytest.approx(100.0 * view.scale)
    back = canvas_to_boxes(rects, view, 1000, 800)
    assert [b[0] for b in back] == ["Mass", "Nodule"]
    for got, want in zip(back, boxes, strict=True):
        assert got[1:] == pytest.approx(want[1:], abs=0.01)
    assert canvas_to_boxes([{"label": 3, "left": 0, "top": 0, "width": 9, "height": 9}], view, 1000, 800)[0][0] == "3"
    # a rectangle dragged past the canvas's edges is clamped to the image
    assert canvas_to_boxes([{"label": "Mass", "left": -1e5, "top": -1e5, "width": 2e5, "height": 2e5}], view, 1000, 800) == [
        ("Mass", 0.0, 0.0, 1000.0, 800.0)]


def test_fit_view_fits_the_column_and_the_window_but_never_under_min_fit():
    assert (fit_view(640, 640, 640, None, None).width, fit_view(640, 640, 640, None, None).height) == (640, 640)  # not measured yet
    assert fit_view(640, 640, 640, 500, None).width == 500  # the column is narrower
    assert fit_view(640, 640, 640, 900, 424 + FOLD_MARGIN).height == 424  # the window's room below the canvas
    assert fit_view(640, 640, 640, 900, 100).height == MIN_FIT  # a tiny window: scroll rather than a stamp
    zoomed = fit_view(640, 320, 640, 900, 2000, zoom=2, centre=(1.0, 1.0))
    assert (zoomed.x0, zoomed.y0, zoomed.x1, zoomed.y1) == (320.0, 160.0, 640.0, 320.0)


def _opened(stored=None, **state):
    state = dict(state)
    start_editing(state, _detail("weak", {"Mass": True}, [("Mass", 10, 10, 50, 50)]), stored, opened_at=12.5)
    return state


def test_start_editing_from_the_store_and_from_a_stored_draft():
    state = _opened(annotate_load=4, annotate_view="old", annotate_error="old", annotate_confirm_leave=True)
    assert state["annotate_load"] == 5 and state["annotate_loaded_id"] == 1 and state["annotate_task"] == "draw boxes"
    assert state["annotate_version"] == 3 and state["annotate_written"] is None and state[DIRTY_KEY] is False
    assert state["annotate_base"] == [("Mass", 10, 10, 50, 50)] and state["annotate_draft"] == state["annotate_baseline"]
    assert state["annotate_draft"] is not state["annotate_baseline"]  # editing the draft leaves the baseline alone
    assert state["annotate_history"] == [] and state["annotate_rev"] == 0 and state["annotate_opened_at"] == 12.5
    assert not {"annotate_view", "annotate_error", "annotate_confirm_leave"} & set(state)
    assert canvas_key(state) == "annotate_canvas_5_0"

    payload = to_payload({**baseline(_detail(), "add image-level labels"), "boxes": [["Nodule", 1, 2, 30, 40]]})
    when = datetime(2026, 1, 2, 3, 4, 5)
    state = _opened(StoredDraft(image_id=1, payload=payload, base_version=2, updated_at=when))
    assert state["annotate_task"] == "add image-level labels"  # the draft's task
    assert state["annotate_version"] == 2 and state["annotate_restored"] == (1, when) and state[DIRTY_KEY] is True
    assert state["annotate_base"] == [("Nodule", 1.0, 2.0, 30.0, 40.0)] and state["annotate_written"] == to_payload(state["annotate_draft"])
    assert _opened(StoredDraft(1, payload, 2, when), **{ACTION_KEY: "draw boxes"})["annotate_task"] == "draw boxes"  # the queue's


def test_redraw_and_undo_walk_the_history_back():
    state = _opened()
    first, second = ("Nodule", 1.0, 1.0, 9.0, 9.0), ("Mass", 20.0, 20.0, 40.0, 40.0)
    redraw(state, [*state["annotate_base"], first])
    redraw(state, [*state["annotate_base"], second])
    redraw(state, [first], undoable=False)  # a new view: redrawn, not an undo step
    assert state["annotate_rev"] == 3 and len(state["annotate_history"]) == 2
    assert state["annotate_base"] == [first] and state["annotate_draft"]["boxes"] == [list(first)]
    undo(state)
    assert state["annotate_base"] == [("Mass", 10, 10, 50, 50), first] and state["annotate_rev"] == 4
    undo(state)
    assert state["annotate_base"] == [("Mass", 10, 10, 50, 50)] and state["annotate_draft"]["boxes"] == [["Mass", 10, 10, 50, 50]]
    assert state["annotate_history"] == [] and canvas_key(state) == "annotate_canvas_1_5"
    with pytest.raises(IndexError):
        undo(state)


def test_current_draft_marks_boxed_classes_present():
    draft = current_draft({"Mass": "absent", "Nodule": "not assessed"}, False, True, [("Mass", 1.0, 1.0, 9.0, 9.0)], "draw boxes")
    assert draft == {"findings": {"Mass": "present", "Nodule": "not assessed"}, "no_finding": False, "complete": True,
                     "boxes": [["Mass", 1.0, 1.0, 9.0, 9.0]], "task": "draw boxes"}


# --- drafts in the store -------------------------------------------------------------------------


@pytest.fixture
def Session(tmp_path):
    url = f"sqlite:///{tmp_path / 'store.db'}"
    seed_demo(url, n=3, size=32)
    return make_sessionmaker(init_db(url))


def test_drafts_are_per_annotator_and_image(Session):
    with Session() as session:
        image_id = session.scalars(select(Image.id).order_by(Image.id)).first()
    payload = to_payload({**baseline(_detail(), "draw boxes"), "boxes": [["Mass", 1, 2, 3, 4]]})
    with Session.begin() as session:
        save_draft(session, image_id, "dr.a", payload, base_version=1)
        save_draft(session, image_id, "dr.a", {**payload, "complete": True}, base_version=2)  # replaces
        save_draft(session, image_id, "dr.b", payload, base_version=1)
    with Session() as session:
        mine = get_draft(session, image_id, "dr.a")
        assert mine.payload["complete"] is True and mine.base_version == 2
        assert get_draft(session, image_id, "dr.c") is None
        assert [i for i, _ in list_drafts(session, "dr.a")] == [image_id]
        assert len(session.scalars(select(Draft)).all()) == 2
    with Session.begin() as session:
        assert delete_draft(session, image_id, "dr.a") and not delete_draft(session, image_id, "dr.a")
    with Session() as session:
        assert get_draft(session, image_id, "dr.a") is None and get_draft(session, image_id, "dr.b") is not None


def test_save_draft_refuses_bad_input_and_writes_nothing(Session):
    with pytest.raises(ValueError, match="no image with id 999"), Session.begin() as session:
        save_draft(session, 999, "dr.a", to_payload(baseline(_detail(), "x")), base_version=1)
    with pytest.raises(ValueError, match="'no_finding'"), Session.begin() as session:
        save_draft(session, 1, "dr.a", {**to_payload(baseline(_detail(), "x")), "no_finding": "yes"}, base_version=1)
    with Session() as session:
        assert session.scalars(select(Draft)).all() == []
