"""Every page through ``streamlit.testing.v1.AppTest``: empty store, demo store, error states.

AppTest runs no JavaScript: the canvas is fed by setting its session-state value to what the browser
would send (``{"drawing": {"raw": fabric_json}, "backgroundFit": ...}``).
"""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import streamlit as st
from PIL import Image as PILImage
from sqlalchemy import select
from streamlit.testing.v1 import AppTest

import app.trainer_control as trainer_control
from app.jobs import absolute_url, list_jobs
from db.demo import seed_demo
from db.engine import init_db, make_sessionmaker
from db.drafts import get_draft
from db.lifecycle import set_boxes, set_image_labels
from db.models import (
    AnnotationTime,
    AuditEntry,
    Box,
    Granularity,
    Image,
    Lease,
    ModelStatus,
    Split,
    SuggestedAction,
    utcnow,
)
from db.people import get_annotator
from db.queue import take_lease
from db.trainer_lock import acquire_trainer_lock, release_trainer_lock, trainer_heartbeat
from tests.logins import PASSWORD, TOKEN_KEY, session_token
from db.versions import (
    create_model_version,
    finish_model_version,
    record_metrics,
    record_sweep_result,
    write_predictions,
    write_suggestions,
)

MAIN = str(Path(__file__).resolve().parent.parent / "app" / "main.py")
PAGES = ["views/overview.py", "views/queue.py", "views/annotate.py", "views/review.py", "views/metrics.py", "views/data.py"]
SIZE = 64  # demo image side; the canvas shows it at 640 px (scale 10)


@pytest.fixture
def demo(empty):
    seed_demo(empty, n=10, size=SIZE)
    return empty


def _sessions(url):
    return make_sessionmaker(init_db(url))


def _app(page: str | None = None, annotator: str | None = "dr.test", role: str = "admin") -> AppTest:
    at = AppTest.from_file(MAIN, default_timeout=60)
    if annotator:  # logged in as this (created) user, by default an admin: every page and button is there
        at.session_state[TOKEN_KEY] = session_token(annotator, role)
    at.run()
    if page:
        at.switch_page(page)
        at.run()
    assert not at.exception, at.exception
    return at


def _texts(at: AppTest) -> str:
    parts = [e.value for kind in ("markdown", "caption", "info", "warning", "error", "success") for e in getattr(at, kind)]
    return "\n".join(str(p) for p in parts)


def _wait_for_jobs(url, timeout: float = 120) -> list[dict]:
    """The store's jobs once none is running any more."""
    deadline = time.monotonic() + timeout
    while not (jobs := list_jobs(url)) or any(j["status"] == "running" for j in jobs):
        assert time.monotonic() < deadline, jobs
        time.sleep(0.3)
    return jobs


def _unlabeled_ids(url) -> list[int]:
    with _sessions(url)() as session:
        return list(session.scalars(
            select(Image.id).where(Image.split == Split.TRAIN, Image.granularity == Granularity.UNLABELED).order_by(Image.id)
        ))


def _model(url, image_ids, boxes=()):
    with _sessions(url).begin() as session:
        version = create_model_version(session, config={})
        finish_model_version(session, version.id, status=ModelStatus.READY)
        write_suggestions(session, version.id, [
            {"image_id": i, "action": SuggestedAction.ADD_LABELS, "score": 1 - k / 100, "reason": {"text": "disagree on Nodule", "classes": ["Nodule"]}}
            for k, i in enumerate(image_ids)
        ])
        write_predictions(session, version.id, [{"image_id": i, "boxes": list(boxes), "image_probs": {"Nodule": 0.7}} for i in image_ids])
        return version.id


# --- empty store ---------------------------------------------------------------------------------


@pytest.mark.parametrize("page", PAGES)
def test_every_page_renders_on_an_empty_store(empty, page):
    at = _app(page)
    if page.endswith("overview.py"):
        assert "store is empty" in _texts(at)
        assert at.button(key="overview_seed").label == "Create the demo project"
    elif not page.endswith("data.py"):
        assert "no project yet" in _texts(at)


def test_first_run_seeds_the_demo_in_a_background_job(empty, monkeypatch):
    monkeypatch.setenv("OXNET_DEMO", "1")
    monkeypatch.setenv("OXNET_DEMO_IMAGES", "4")
    _app()
    jobs = _wait_for_jobs(empty)
    assert jobs[0]["command"] == "seed" and jobs[0]["status"] == "done", jobs[0]
    at = _app("views/overview.py")  # a second session starts no second job (the status file makes it exclusive)
    assert len(list_jobs(empty, "seed")) == 1
    assert [m.value for m in at.metric][:1] == ["4"]


def test_create_demo_button_starts_the_job_once(empty, monkeypatch):
    monkeypatch.setenv("OXNET_DEMO_IMAGES", "2")
    at = _app("views/overview.py")
    at.button(key="overview_seed").click().run()
    jobs = list_jobs(empty, "seed")
    assert len(jobs) == 1 and jobs[0]["args"] == ["--n", "2"]
    assert at.progress or "Demo project" in _texts(at)
    _wait_for_jobs(empty)
    at.run()
    assert len(list_jobs(empty, "seed")) == 1 and list_jobs(empty, "seed")[0]["status"] == "done"


# --- demo store ----------------------------------------------------------------------------------


def test_overview_counts_and_trainer_states(demo):
    at = _app("views/overview.py")
    assert [m.value for m in at.metric][:1] == ["10"]
    assert "Not running" in _texts(at) and not at.button(key="overview_start").disabled
    assert "No model version yet" in _texts(at)

    Session = _sessions(demo)
    with Session.begin() as session:
        assert acquire_trainer_lock(session, "host:1")
        trainer_heartbeat(session, "host:1", round=3, progress=0.25, phase="training", error="CUDA out of memory")
    at.run()
    assert "**Running** (`host:1`), round 3, training" in _texts(at)
    assert at.progress[0].value == 25
    assert "CUDA out of memory" in _texts(at)

    with Session.begin() as session:
        trainer_heartbeat(session, "host:1", now=utcnow() - timedelta(hours=1))
    at.run()
    assert "**Stale**" in _texts(at)


def test_overview_starts_and_stops_a_stub_trainer(demo, monkeypatch, tmp_path):
    stub = tmp_path / "scripts" / "trainer.py"
    stub.parent.mkdir()
    stub.write_text("import sys, time\nassert sys.argv[1:3] == ['--preset', 'cpu'] or sys.argv[2] == 'paper'\ntime.sleep(120)\n")
    monkeypatch.setattr(trainer_control, "TRAINER_COMMAND", [sys.executable, str(stub)])
    at = _app("views/overview.py")
    assert at.button(key="overview_stop").disabled
    at.button(key="overview_start").click().run()
    assert not at.exception, at.exception
    pid = trainer_control.trainer_pid(None, demo)
    assert pid is not None and "Trainer started" in str([t.value for t in at.toast])
    with _sessions(demo).begin() as session:  # the trainer names itself in the lock; its pid is what stop uses
        acquire_trainer_lock(session, f"testhost:{pid}")
    at.run()
    assert not at.button(key="overview_stop").disabled
    at.button(key="overview_stop_after_round").click().run()
    with _sessions(demo)() as session:
        assert session.scalars(select(AuditEntry.action).where(AuditEntry.action == "trainer_stop_after_round")).all()
    assert "once the round in progress is saved" in str([t.value for t in at.toast])
    at.button(key="overview_stop").click().run()
    assert "the round in progress is discarded" in str([t.value for t in at.toast])
    deadline = time.monotonic() + 20
    while trainer_control.trainer_pid(None, demo) is not None:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    with _sessions(demo).begin() as session:
        release_trainer_lock(session, f"testhost:{pid}")


def test_trainer_pid_ignores_a_lock_owner_that_is_not_a_trainer(demo):
    assert trainer_control.trainer_pid(f"host:{os.getpid()}", demo) is None  # pytest is not trainer.py
    assert trainer_control.stop_trainer("host:999999999", demo) is None


def test_queue_before_any_model_and_without_a_name(demo):
    at = _app("views/queue.py", annotator=None)  # nobody logged in: the login form instead of the page
    assert "Log in with the name and password" in _texts(at) and not at.title[0].value == "Queue"
    assert not any(b.label.startswith("Open #") for b in at.button)
    at = _app("views/queue.py")
    assert "No model has ranked the images yet" in _texts(at)
    assert any(b.label.startswith("Open #") for b in at.button)


def test_queue_lists_suggestions_and_open_takes_the_lease(demo):
    ids = _unlabeled_ids(demo)
    _model(demo, ids)
    at = _app("views/queue.py")
    opens = [b for b in at.button if b.label.startswith("Open #")]
    assert [int(b.label[6:]) for b in opens] == ids
    assert "disagree on Nodule" in _texts(at)
    at.selectbox(key="queue_class").select("Fracture").run()
    assert not [b for b in at.button if b.label.startswith("Open #")]
    assert "Nothing waiting" in _texts(at)
    at.selectbox(key="queue_class").select("any class").run()
    at.button(key=f"queue_open_{ids[0]}").click().run()
    assert not at.exception, at.exception
    assert at.session_state["annotate_image_id"] == ids[0]
    with _sessions(demo)() as session:
        assert session.get(Lease, ids[0]) is not None


def test_queue_shows_the_strategys_action_gain_and_reason(demo):
    """Suggestions ranked by the cost-aware strategy: each card names the action, the expected gain
    (per unit while saves are untimed, per minute once the costs are measured) and the reason, in the
    strategy's order."""
    from oxnet.active.strategies import Context, CostModel, ImageState, describe, get_strategy

    ids = _unlabeled_ids(demo)
    images = [ImageState(i, "unlabeled", score=0.1 * k, image_probs=np.full(2, 0.2 + 0.05 * k)) for k, i in enumerate(ids)]
    for costs, unit in ((CostModel(), "per unit"), (CostModel(seconds_per_unit=20.0), "per minute")):
        picks = get_strategy("cost_aware")(images, Context(costs=costs, batch_units=3))
        with _sessions(demo).begin() as session:
            version = create_model_version(session, config={})
            finish_model_version(session, version.id, status=ModelStatus.READY)
            rows = describe(picks, costs, "cost_aware")
            write_suggestions(session, version.id, [{**r, "action": SuggestedAction(r["action"])} for r in rows])
        st.cache_data.clear()  # the page caches its rows for a few seconds
        at = _app("views/queue.py")
        for action in (SuggestedAction.ADD_LABELS.value, SuggestedAction.DRAW_BOXES.value):
            at.selectbox(key="queue_action").select(action).run()
            opens = [int(b.label[6:]) for b in at.button if b.label.startswith("Open #")]
            assert opens == [p.image_id for p in picks if p.action == action][:24]
            if opens:
                first = next(p for p in picks if p.action == action)
                value = first.gain / first.cost * (60 / 20.0 if unit == "per minute" else 1)
                assert f"**+{100 * value:.3f}** mAP points {unit}" in _texts(at)
                assert f"**{action}**" in _texts(at) and first.reason in _texts(at)


def test_queue_refuses_an_image_leased_to_someone_else(demo):
    ids = _unlabeled_ids(demo)
    _model(demo, ids)
    at = _app("views/queue.py")
    with _sessions(demo).begin() as session:
        take_lease(session, ids[0], "dr.other")
    at.button(key=f"queue_open_{ids[0]}").click().run()
    assert "being annotated by someone else" in _texts(at)
    assert "annotate_image_id" not in at.session_state


# --- annotate ------------------------------------------------------------------------------------


def _open(image_id: int, action: str = SuggestedAction.ADD_LABELS.value) -> AppTest:
    at = AppTest.from_file(MAIN, default_timeout=60)
    at.session_state[TOKEN_KEY] = session_token("dr.test")
    at.session_state["annotate_image_id"] = image_id
    at.session_state["annotate_action"] = action
    at.run()
    at.switch_page("views/annotate.py").run()
    assert not at.exception, at.exception
    return at


def _draw(at: AppTest, *boxes: tuple[str, float, float, float, float]) -> AppTest:
    """Put labelled rectangles (canvas pixels: label, left, top, width, height) on the canvas and rerun."""
    key = f"annotate_canvas_{at.session_state['annotate_load']}_{at.session_state['annotate_rev']}"
    objects = [{"type": "LabeledRect", "label": label, "left": left, "top": top, "width": w, "height": h,
                "scaleX": 1, "scaleY": 1, "originX": "left", "originY": "top"} for label, left, top, w, h in boxes]
    at.session_state[key] = {"drawing": {"raw": {"objects": objects}, "data": None},
                             "backgroundFit": {"naturalWidth": 640, "naturalHeight": 640, "scaleX": 1, "scaleY": 1, "offsetX": 0, "offsetY": 0}}
    return at.run()


def _finding(at: AppTest, k: int):
    """The present / absent / not assessed radio of class ``k`` (its key carries the load and widget generation)."""
    gen = f"{at.session_state['annotate_load']}x{at.session_state['annotate_findgen']}"
    keys = {f"annotate_find_{gen}_{k}", f"annotate_find_{gen}_{k}_boxed"}
    (radio,) = [r for r in at.radio if r.key in keys]
    return radio


def test_annotate_picker_without_an_image(demo):
    at = _app("views/annotate.py")
    assert "Take the best image of the queue" in _texts(at)
    at.button(key="annotate_take_next").click().run()
    assert at.session_state["annotate_image_id"] == _unlabeled_ids(demo)[0]  # before a model: store order


def test_annotate_saves_a_drawn_box_in_original_pixels(demo):
    image_id = _unlabeled_ids(demo)[0]
    at = _open(image_id)
    assert "No model version yet" in _texts(at)
    at.button(key="annotate_cls_5").click().run()  # Nodule (key 5)
    _draw(at, ("Nodule", 100, 150, 200, 120))  # canvas 640 px for a 64 px image: scale 10
    assert "Boxes** (1)" in _texts(at) and "Unsaved changes" in _texts(at)
    at.button(key="annotate_save").click().run()
    assert not at.exception, at.exception
    assert f"Saved image {image_id} (weak)" in _texts(at)
    with _sessions(demo)() as session:
        (box,) = session.scalars(select(Box).where(Box.image_id == image_id)).all()
        assert (box.label_class.name, box.x1, box.y1, box.x2, box.y2) == ("Nodule", 10, 15, 30, 27)
        assert box.annotator.name == "dr.test"


def test_annotate_box_without_class_shows_a_message_and_saves_nothing(demo):
    image_id = _unlabeled_ids(demo)[0]
    at = _draw(_open(image_id), ("", 100, 150, 50, 50))
    at.button(key="annotate_save").click().run()
    assert "has no class" in _texts(at) and "Not saved" in _texts(at)
    with _sessions(demo)() as session:
        image = session.get(Image, image_id)
        assert image.version == 1 and image.granularity is Granularity.UNLABELED and not image.boxes
        assert session.scalars(select(AnnotationTime)).all() == []  # a refused save costs nothing


@pytest.mark.parametrize("size", [0, 16, 39])  # canvas px at scale 10: 0, 1.6 and 3.9 image px
def test_annotate_refuses_a_box_under_the_minimum_size(demo, size):
    image_id = _unlabeled_ids(demo)[0]
    at = _draw(_open(image_id), ("Nodule", 100, 150, size, 40))
    assert not at.exception, at.exception
    assert "smaller than the minimum 4 px" in _texts(at) and "Boxes** (0)" in _texts(at)
    at.run()  # the message stays until the user acts
    assert "smaller than the minimum 4 px" in _texts(at)
    at.button(key="annotate_dismiss_box_notice").click().run()
    assert "smaller than the minimum" not in _texts(at)
    _draw(at, ("Nodule", 100, 150, 40, 40))  # 4 x 4 image px is a box
    assert "Boxes** (1)" in _texts(at)


def test_annotate_zoom_shows_a_crop_and_boxes_stay_in_image_pixels(demo):
    image_id = _unlabeled_ids(demo)[0]
    at = _open(image_id)
    at.select_slider(key="annotate_zoom").set_value(2).run()
    at.slider(key="annotate_zoom_x").set_value(100).run()  # the right half, vertically centred: x 32-64, y 16-48
    at.slider(key="annotate_zoom_y").set_value(50).run()
    assert not at.exception, at.exception
    assert "Zoomed 2x: x 32-64, y 16-48 px" in _texts(at)
    _draw(at, ("Nodule", 100, 200, 200, 100))  # canvas 640 px for 32 image px: scale 20
    assert "(37, 26) - (47, 31)" in _texts(at)
    at.select_slider(key="annotate_zoom").set_value(1).run()  # back to the whole image: the box is where it was
    assert "(37, 26) - (47, 31)" in _texts(at)
    at.button(key="annotate_save").click().run()
    with _sessions(demo)() as session:
        (box,) = session.scalars(select(Box).where(Box.image_id == image_id)).all()
        assert (box.x1, box.y1, box.x2, box.y2) == (37, 26, 47, 31)


def test_annotate_switching_annotator_leaves_the_image_and_keeps_the_draft(demo):
    image_id = _unlabeled_ids(demo)[0]
    at = _open(image_id)
    _draw(at, ("Nodule", 100, 150, 200, 120))
    at.button(key="main_logout").click().run()  # another person logs in at this browser
    at.session_state[TOKEN_KEY] = session_token("dr.other")
    at.run()
    assert not at.exception, at.exception
    assert "Take the best image of the queue" in _texts(at)
    with _sessions(demo)() as session:
        assert session.get(Lease, image_id) is None
        assert get_draft(session, image_id, "dr.test") is not None and get_draft(session, image_id, "dr.other") is None


def test_annotate_refused_save_keeps_its_message_until_the_user_acts(demo):
    image_id = _unlabeled_ids(demo)[0]
    at = _open(image_id)
    load = at.session_state["annotate_load"]
    _finding(at, 4).set_value("present").run()  # Nodule, no box
    at.checkbox(key=f"annotate_complete_{load}").check().run()
    at.button(key="annotate_save").click().run()
    refused = "have no box"
    assert refused in _texts(at)
    for _ in range(3):  # reruns (the canvas reporting its size, a timer) do not wipe it
        at.run()
        assert refused in _texts(at) and "Unsaved changes" in _texts(at)
    at.checkbox(key=f"annotate_complete_{load}").uncheck().run()  # acting on it clears it
    assert refused not in _texts(at)
    at.checkbox(key=f"annotate_complete_{load}").check().run()
    at.button(key="annotate_save").click().run()
    at.button(key="annotate_dismiss_error").click().run()
    assert refused not in _texts(at)
    with _sessions(demo)() as session:
        assert session.get(Image, image_id).version == 1


def test_annotate_findings_save_and_next_loads_the_next_image(demo):
    first, second = _unlabeled_ids(demo)[:2]
    at = _open(first)
    assert "annotate_load" in at.session_state
    _finding(at, 5).set_value("present").run()  # Pleural effusion
    at.button(key="annotate_save_next").click().run()
    assert not at.exception, at.exception
    assert at.session_state["annotate_image_id"] == second
    assert f"Image **#{second}**" in _texts(at)
    with _sessions(demo)() as session:
        image = session.get(Image, first)
        assert image.granularity is Granularity.WEAK
        assert {lb.label_class.name: lb.present for lb in image.labels} == {"Pleural effusion": True}  # the rest: not assessed
        assert session.get(Lease, first) is None and session.get(Lease, second) is not None
        (timed,) = session.scalars(select(AnnotationTime)).all()  # the save's active seconds (db.costs)
        assert (timed.image_id, timed.upgrade, timed.annotator_id) == (first, "unlabeled->weak", image.labels[0].annotator_id)
        assert 0 <= timed.seconds < 120


def test_annotate_findings_are_present_absent_or_not_assessed(demo):
    image_id = _unlabeled_ids(demo)[0]
    at = _open(image_id)
    assert "annotate_load" in at.session_state
    assert {_finding(at, k).value for k in range(9)} == {"not assessed"}
    assert "training ignores the class" in _texts(at)  # the page says what the states mean
    _finding(at, 2).set_value("absent").run()  # Fracture
    _draw(at, ("Nodule", 100, 150, 200, 120))
    assert _finding(at, 4).value == "present"  # the box makes Nodule present
    at.button(key="annotate_save").click().run()
    with _sessions(demo)() as session:
        labels = {lb.label_class.name: lb.present for lb in session.get(Image, image_id).labels}
    assert labels == {"Fracture": False, "Nodule": True}  # one box does not make eight classes absent


def test_annotate_all_others_absent(demo):
    image_id = _unlabeled_ids(demo)[0]
    at = _open(image_id)
    load = at.session_state["annotate_load"]
    _finding(at, 3).set_value("present").run()  # Mass
    at.button(key=f"annotate_others_absent_{load}").click().run()
    values = [_finding(at, k).value for k in range(9)]
    assert values == ["absent"] * 3 + ["present"] + ["absent"] * 5
    at.button(key="annotate_save").click().run()
    with _sessions(demo)() as session:
        image = session.get(Image, image_id)
        labels = {lb.label_class.name: lb.present for lb in image.labels}
        assert labels["Mass"] is True and sum(not v for v in labels.values()) == 8
        assert image.granularity is Granularity.WEAK


@pytest.mark.parametrize("granularity", ["unlabeled", "weak", "full"])
def test_annotate_task_and_complete_follow_the_granularity(demo, granularity):
    image_id = _unlabeled_ids(demo)[0]
    with _sessions(demo).begin() as session:
        if granularity != "unlabeled":
            set_image_labels(session, image_id, {"Nodule": True}, annotator="dr.other")
        if granularity == "full":
            set_boxes(session, image_id, [("Nodule", 1, 1, 20, 20)], annotator="dr.other", complete=True)
    at = AppTest.from_file(MAIN, default_timeout=60)
    at.session_state[TOKEN_KEY] = session_token("dr.test")
    at.run()
    at.switch_page("views/annotate.py").run()
    at.number_input(key="annotate_pick_id").set_value(image_id).run()
    at.button(key="annotate_open_id").click().run()
    assert not at.exception, at.exception
    task = {"unlabeled": "add image-level labels", "weak": "draw boxes", "full": "edit boxes"}[granularity]
    assert f"task: **{task}**" in _texts(at)
    assert at.checkbox(key=f"annotate_complete_{at.session_state['annotate_load']}").value is (granularity == "full")


def test_annotate_conflict_with_another_annotator(demo):
    image_id = _unlabeled_ids(demo)[0]
    at = _open(image_id)
    assert "annotate_load" in at.session_state
    _finding(at, 3).set_value("present").run()  # Mass, not saved yet
    with _sessions(demo).begin() as session:
        set_image_labels(session, image_id, {"Nodule": True}, annotator="dr.other")
    at.run()
    assert "Someone else saved image" in _texts(at)
    at.button(key="annotate_save").click().run()
    assert "changed by someone else" in _texts(at)
    with _sessions(demo)() as session:
        assert {lb.label_class.name for lb in session.get(Image, image_id).labels if lb.present} == {"Nodule"}
    at.button(key="annotate_reload").click().run()
    assert "Someone else saved" not in _texts(at)


def test_annotate_unsaved_changes_warn_before_leaving(demo):
    image_id = _unlabeled_ids(demo)[0]
    at = _open(image_id)
    assert "annotate_load" in at.session_state
    _finding(at, 3).set_value("present").run()
    at.button(key="annotate_skip").click().run()
    assert "unsaved changes. Leave it anyway?" in _texts(at)
    assert at.session_state["annotate_image_id"] == image_id
    at.button(key="annotate_discard").click().run()
    assert at.session_state["annotate_image_id"] != image_id
    with _sessions(demo)() as session:
        assert get_draft(session, image_id, "dr.test") is None  # discarding drops the draft


def test_annotate_draft_survives_a_page_switch_and_a_reload(demo):
    image_id = _unlabeled_ids(demo)[0]
    at = _open(image_id)
    assert "annotate_load" in at.session_state
    _finding(at, 3).set_value("absent").run()  # Mass
    _draw(at, ("Nodule", 100, 150, 200, 120))  # only boxes and one finding, nothing saved
    assert "Unsaved changes" in _texts(at)
    with _sessions(demo)() as session:
        stored = get_draft(session, image_id, "dr.test")
    assert stored is not None and stored.payload["boxes"] == [["Nodule", 10.0, 15.0, 30.0, 27.0]]
    assert stored.payload["findings"]["Mass"] == "absent" and stored.base_version == 1

    at.switch_page("views/queue.py").run()
    at.switch_page("views/annotate.py").run()
    assert not at.exception, at.exception
    assert "Boxes** (1)" in _texts(at) and "Unsaved changes" in _texts(at)

    reloaded = AppTest.from_file(MAIN, default_timeout=60)  # a browser reload: a new session, the same URL
    reloaded.query_params["image"] = str(image_id)
    reloaded.run()  # asks to log in again (the login lives in the session only)
    reloaded.text_input[0].input("dr.test")
    reloaded.text_input[1].input(PASSWORD)
    reloaded.button[0].click().run()
    reloaded.switch_page("views/annotate.py").run()
    assert not reloaded.exception, reloaded.exception
    assert reloaded.session_state["main_user"].name == "dr.test"
    assert f"Image **#{image_id}**" in _texts(reloaded) and "Restored your unsaved draft" in _texts(reloaded)
    assert "Boxes** (1)" in _texts(reloaded)
    assert "annotate_load" in reloaded.session_state
    assert _finding(reloaded, 3).value == "absent"
    with _sessions(demo)() as session:
        lease = session.get(Lease, image_id)
        assert lease is not None and lease.annotator_id == get_annotator(session, "dr.test").id
    reloaded.button(key="annotate_save").click().run()
    with _sessions(demo)() as session:
        assert get_draft(session, image_id, "dr.test") is None
        image = session.get(Image, image_id)
        assert [(b.label_class.name, b.x1, b.y1, b.x2, b.y2) for b in image.boxes] == [("Nodule", 10, 15, 30, 27)]
        assert {lb.label_class.name: lb.present for lb in image.labels} == {"Mass": False, "Nodule": True}


def test_annotate_accepts_and_rejects_model_suggestions(demo):
    ids = _unlabeled_ids(demo)
    suggested = [{"class": "Nodule", "bbox": [10, 12, 20, 30], "score": 0.9}, {"class": "Mass", "bbox": [30, 30, 50, 50], "score": 0.4}]
    version = _model(demo, ids, boxes=suggested)
    at = _open(ids[0])
    assert f"**Model suggestions** (version {version})" in _texts(at)
    assert "No attention maps are available" in _texts(at)
    at.slider(key="annotate_threshold").set_value(0.3).run()
    at.button(key=f"annotate_reject_{at.session_state['annotate_load']}_1").click().run()
    at.button(key=f"annotate_accept_{at.session_state['annotate_load']}_0").click().run()
    assert "No (more) boxes suggested" in _texts(at)
    at.button(key="annotate_save").click().run()
    with _sessions(demo)() as session:
        boxes = [(b.label_class.name, b.x1, b.y1, b.x2, b.y2) for b in session.scalars(select(Box).where(Box.image_id == ids[0]))]
    assert boxes == [("Nodule", 10, 12, 20, 30)]


def test_annotate_suggestions_keep_their_numbers_and_obey_the_threshold(demo):
    ids = _unlabeled_ids(demo)
    suggested = [{"class": "Nodule", "bbox": [10 + 4 * k, 10, 14 + 4 * k, 20], "score": 0.9 - 0.1 * k} for k in range(6)]
    _model(demo, ids, boxes=suggested)  # scores 0.9 .. 0.4; the model recorded no val threshold: 0.5
    at = _open(ids[0])
    load = at.session_state["annotate_load"]
    assert at.slider(key="annotate_threshold").value == 0.5
    listed = lambda: [m.value.split()[0] for m in at.markdown if m.value.startswith("**S")]  # noqa: E731
    assert listed() == ["**S1**", "**S2**", "**S3**", "**S4**", "**S5**"] and "1 more below the threshold" in _texts(at)
    at.button(key=f"annotate_reject_{load}_0").click().run()
    at.button(key=f"annotate_accept_{load}_2").click().run()
    assert listed() == ["**S2**", "**S4**", "**S5**"]  # numbers do not restart after accept/reject
    at.button(key=f"annotate_accept_all_{load}").click().run()
    assert listed() == [] and "Boxes** (4)" in _texts(at)
    at.slider(key="annotate_threshold").set_value(0.0).run()
    assert listed() == ["**S6**"]
    at.button(key=f"annotate_reject_all_{load}").click().run()
    assert listed() == [] and "Boxes** (4)" in _texts(at)


def test_annotate_threshold_default_from_the_models_val_metric(demo):
    ids = _unlabeled_ids(demo)
    version = _model(demo, ids, boxes=[{"class": "Nodule", "bbox": [10, 10, 20, 20], "score": 0.3}])
    with _sessions(demo).begin() as session:
        record_metrics(session, version, Split.VAL, {"score_threshold": 0.25})
    at = _open(ids[0])
    assert at.slider(key="annotate_threshold").value == 0.25
    assert any(m.value.startswith("**S1**") for m in at.markdown)


def test_annotate_attention_overlay_when_the_prediction_has_one(demo):
    ids = _unlabeled_ids(demo)
    with _sessions(demo).begin() as session:
        version = create_model_version(session, config={})
        finish_model_version(session, version.id, status=ModelStatus.READY)
        write_predictions(session, version.id, [{"image_id": ids[0], "boxes": [],
                                                 "image_probs": {"Nodule": 0.6, "attention": {"Nodule": [[0, 1], [0.5, 0]]}}}])
    at = _open(ids[0])
    at.toggle(key="annotate_attention").set_value(True).run()
    assert not at.exception, at.exception
    assert at.selectbox(key="annotate_attention_class").value == "Nodule"


def test_annotate_missing_image_file(demo):
    image_id = _unlabeled_ids(demo)[0]
    with _sessions(demo)() as session:
        Path(session.get(Image, image_id).path).unlink()
    at = _open(image_id)
    assert "Cannot show image" in _texts(at)


# --- metrics and data ----------------------------------------------------------------------------


def test_metrics_plots_versions_sweeps_and_losses(demo):
    Session = _sessions(demo)
    with Session.begin() as session:
        for round_ in range(2):
            version = create_model_version(session, config={}, round=round_)
            finish_model_version(session, version.id, status=ModelStatus.READY)
            record_metrics(session, version.id, Split.VAL, {"mAP": 3.0 + round_, "per_class_AP/Nodule": 4.0, "image_auc/Nodule": 0.7, "mean_image_auc": 0.7})
            record_metrics(session, version.id, Split.TRAIN, {"loss/total": 1.0 / (round_ + 1)})
        for seed in range(2):
            record_sweep_result(session, method="oxnet", n_full=10, n_weak=90, n_unlabeled=0, metrics={"mAP": 5.0 + seed}, seed=seed)
    at = _app("views/metrics.py")
    charts = at.get("plotly_chart")
    assert len(charts) == 6  # mAP vs full, vs weak, sweep, per-class AP, AUC, losses
    assert "No " not in " ".join(i.value for i in at.info)


@pytest.mark.parametrize("count", [1, 100])
def test_metrics_charts_stay_readable_from_one_to_a_hundred_versions(demo, count):
    """Lines through the versions, integer count axes, both axes from 0, labels only while they fit."""
    Session = _sessions(demo)
    with Session.begin() as session:
        for round_ in range(count):
            version = create_model_version(session, config={}, round=round_ + 1)
            version.label_counts = {"full": 10 + round_, "weak": 20 + 2 * round_, "unlabeled": 0}
            finish_model_version(session, version.id, status=ModelStatus.READY)
            record_metrics(session, version.id, Split.VAL, {"mAP": 0.1 + 0.001 * round_})
            record_metrics(session, version.id, Split.TRAIN, {"loss/total": 1.0 / (round_ + 1)})
    at = _app("views/metrics.py")
    assert not at.exception, at.exception
    specs = [json.loads(chart.proto.spec) for chart in at.get("plotly_chart")]
    versus = [s for s in specs if s["layout"]["title"]["text"].startswith("mAP (val) vs")]
    losses = [s for s in specs if s["layout"]["title"]["text"] == "mean loss per round"]
    assert len(versus) == 2 and len(losses) == 1
    for spec in versus + losses:
        layout = spec["layout"]
        assert layout["xaxis"]["rangemode"] == "tozero" and layout["yaxis"]["rangemode"] == "tozero"
        assert layout["xaxis"]["tickformat"] == "d"
        assert all("lines" in trace["mode"] for trace in spec["data"])
    for spec in versus:
        [trace] = spec["data"]
        x = trace["x"]  # plotly sends numeric arrays as typed binary: {"dtype", "bdata"}
        points = len(np.frombuffer(base64.b64decode(x["bdata"]), dtype=x["dtype"])) if isinstance(x, dict) else len(x)
        assert points == count and ("text" in trace) == (count <= 15)


def test_metrics_without_models(demo):
    at = _app("views/metrics.py")
    assert "No evaluated model version yet" in _texts(at) and "No sweep results yet" in _texts(at)


def test_data_import_of_a_missing_path_says_so_and_starts_nothing(demo):
    at = _app("views/data.py")
    at.text_input[1].input("/no/such/folder")  # [0] is the pseudonymisation salt
    next(b for b in at.get("button") if getattr(b, "label", "") == "Start import").click().run()
    assert "Not found on the server" in _texts(at)
    assert list_jobs(demo) == []


def test_data_import_job_reports_progress_and_result(demo, tmp_path):
    folder = tmp_path / "new"
    folder.mkdir()
    for k in range(2):
        PILImage.new("L", (32, 32), 40 * k).save(folder / f"x{k}.png")
    (folder / "notes.txt").write_text("not an image")
    at = _app("views/data.py")
    at.text_input[1].input(str(folder))
    next(b for b in at.get("button") if getattr(b, "label", "") == "Start import").click().run()
    job = _wait_for_jobs(demo)[0]
    assert job["status"] == "done" and len(job["result"]["imported"]) == 2 and len(job["result"]["errors"]) == 1
    assert "--assign-splits" in job["args"]
    with _sessions(demo)() as session:
        assert None not in set(session.scalars(select(Image.split).where(Image.source == "folder")))
    at.run()
    assert "1 items not imported" in str([e.label for e in at.expander])


def test_data_upload_runs_the_import_job_with_its_report_and_a_split(demo):
    """An upload is imported by the background folder import (not in the page run), whose report lists
    the file it could not read; the new image gets a split by patient, and the page says so."""
    png = io.BytesIO()
    PILImage.new("L", (16, 16), 99).save(png, format="PNG")
    at = _app("views/data.py")
    assert "put in train/val/test by patient" in _texts(at)
    uploader = at.get("file_uploader")[0]
    uploader.set_value([("scan.png", png.getvalue(), "image/png"), ("report.png", b"%PDF-1.4 not a png", "image/png")]).run()
    at.button(key="data_upload_go").click().run()
    assert not at.exception, at.exception
    job = _wait_for_jobs(demo)[0]
    assert job["command"] == "import" and job["args"][0] == "folder" and "--assign-splits" in job["args"]
    assert job["status"] == "done" and len(job["result"]["imported"]) == 1 and len(job["result"]["errors"]) == 1
    with _sessions(demo)() as session:
        rows = session.execute(select(Image.path, Image.split).where(Image.source == "folder")).all()
    assert [Path(p).name for p, _ in rows] == ["scan.png"] and rows[0][1] is not None
    at.run()
    assert "1 items not imported" in str([e.label for e in at.expander])


def test_data_keeping_images_unsplit_says_what_that_means(demo):
    at = _app("views/data.py")
    at.selectbox(key="data_split").select("keep the file's splits, assign none").run()
    assert "never trained on, scored or queued" in _texts(at)


def test_finished_jobs_are_reaped_without_any_page_polling(demo, tmp_path, monkeypatch):
    """A finished job and a stopped trainer started from the UI leave no zombie behind."""
    import psutil

    from app.jobs import start_job

    def gone(pid: int) -> bool:  # a zombie still exists (as psutil.STATUS_ZOMBIE) until it is reaped
        try:
            psutil.Process(pid)
        except psutil.NoSuchProcess:
            return True
        return False

    path = start_job("export", [str(tmp_path / "e.json")], url=demo)
    job_pid = int(path.with_suffix(".pid").read_text())
    script = tmp_path / "trainer.py"  # a stand-in trainer that ends at once
    script.write_text("import sys; sys.exit(0)\n")
    monkeypatch.setattr(trainer_control, "TRAINER_COMMAND", [sys.executable, str(script)])
    trainer = trainer_control.start_trainer(demo, preset="tiny")
    deadline = time.monotonic() + 120
    while not (gone(job_pid) and gone(trainer)):
        assert time.monotonic() < deadline, [psutil.Process(p).status() for p in (job_pid, trainer) if psutil.pid_exists(p)]
        time.sleep(0.3)


def test_overview_shows_the_newest_model_version(demo):
    def ready(round_: int) -> int:
        with _sessions(demo).begin() as session:
            version = create_model_version(session, config={}, round=round_)
            finish_model_version(session, version.id, status=ModelStatus.READY)
            record_metrics(session, version.id, "val", {"mAP": round_ / 10})
            return version.id

    first = ready(1)
    at = _app()
    assert f"Version **{first}**" in _texts(at)
    newest = [ready(2), ready(3)][-1]
    at.run()
    assert f"Version **{newest}**" in _texts(at) and f"Version **{first}**" not in _texts(at)


def test_jobs_cli_runs_an_export_without_patient_ids(demo, tmp_path):
    out = tmp_path / "export.json"
    status = tmp_path / "job.json"
    status.write_text(json.dumps({"id": "x", "status": "running"}))
    subprocess.run([sys.executable, "-m", "app.jobs", "--status", str(status), "export", str(out), "--granularity", "full"],
                   check=True, env={**os.environ, "OXNET_DB_URL": demo}, cwd=Path(MAIN).parent.parent)
    data = json.loads(out.read_text())
    assert data["images"] and all("patient_id" not in i and i["granularity"] == "full" for i in data["images"])
    assert json.loads(status.read_text())["status"] == "done"


def test_jobs_and_trainer_get_an_absolute_store_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert absolute_url("sqlite:///workbench.db") == f"sqlite:///{tmp_path / 'workbench.db'}"
    assert absolute_url("sqlite://") == "sqlite://"


def test_annotate_opening_an_image_id_that_does_not_exist_says_so(demo):
    """A non-existent id once gave an IntegrityError traceback (the lease's foreign key)."""
    at = _app("views/annotate.py")
    at.number_input(key="annotate_pick_id").set_value(99_999).run()
    at.button(key="annotate_open_id").click().run()
    assert not at.exception, at.exception
    assert "no image with id 99999" in _texts(at)
    assert "Take the best image of the queue" in _texts(at)  # still the picker
    with _sessions(demo)() as session:
        assert session.scalars(select(Lease)).all() == []


def test_data_page_lists_unreadable_files_with_their_reason(demo):
    """A file the trainer found corrupt is shown with the reason on the Data page."""
    from db.models import FileStatus

    image_id = _unlabeled_ids(demo)[0]
    with _sessions(demo).begin() as session:
        image = session.get(Image, image_id)
        image.file_status, image.file_error = FileStatus.CORRUPT, "not a PNG, JPEG or DICOM file (found by the trainer)"
    at = _app("views/data.py")
    assert "Files that cannot be read" in [h.value for h in at.subheader]
    [table] = [d.value for d in at.dataframe if "status" in d.value.columns]
    assert table.to_dict("records") == [{"id": image_id, "path": image.path, "status": "corrupt",
                                         "reason": "not a PNG, JPEG or DICOM file (found by the trainer)"}]


def test_a_read_only_store_renders_and_a_save_says_so_in_one_sentence(demo, monkeypatch):
    """The UI reads a read-only store; a write shows one sentence, not SQL."""
    path = demo.removeprefix("sqlite:///")
    token = session_token("dr.test")  # logged in while the store was writable (a read-only one records no login)
    monkeypatch.setattr(sys.modules[__name__], "session_token", lambda *args, **kwargs: token)
    monkeypatch.setenv("OXNET_DB_URL", f"sqlite:///file:{path}?mode=ro&uri=true")
    for page in PAGES:
        at = _app(page)  # asserts no exception
    at = _app("views/annotate.py")
    at.number_input(key="annotate_pick_id").set_value(_unlabeled_ids(demo)[0]).run()
    at.button(key="annotate_open_id").click().run()
    assert not at.exception, at.exception
    assert f"The store {path} is read-only, so this change cannot be saved" in _texts(at)
    assert "INSERT" not in _texts(at) and "sqlalchemy" not in _texts(at).lower()


def test_overview_shows_the_disk_use_of_the_models_folder(demo):
    """The disk use of the model checkpoints is on the Overview page."""
    from db.demo import data_dir

    folder = data_dir(demo) / "models" / "default" / "version-00001"
    folder.mkdir(parents=True)
    (folder / "model.pt").write_bytes(b"\0" * (3 << 20))
    at = _app("views/overview.py")
    assert f"Model checkpoints use 3.0 MiB in `{data_dir(demo) / 'models'}`" in _texts(at)
