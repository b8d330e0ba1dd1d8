"""Every page through ``streamlit.testing.v1.AppTest``: empty store, demo store, error states.

AppTest runs no JavaScript: the canvas is fed by setting its session-state value to what the browser
would send (``{"drawing": {"raw": fabric_json}, "backgroundFit": ...}``).
"""

from __future__ import annotations

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
from db.lifecycle import set_image_labels
from db.models import (
    AnnotationTime,
    Box,
    Granularity,
    Image,
    Lease,
    ModelStatus,
    Split,
    SuggestedAction,
    utcnow,
)
from db.repository import (
    acquire_trainer_lock,
    create_model_version,
    finish_model_version,
    record_metrics,
    record_sweep_result,
    release_trainer_lock,
    take_lease,
    trainer_heartbeat,
    write_predictions,
    write_suggestions,
)

MAIN = str(Path(__file__).resolve().parent.parent / "app" / "main.py")
PAGES = ["views/overview.py", "views/queue.py", "views/annotate.py", "views/metrics.py", "views/data.py"]
SIZE = 64  # demo image side; the canvas shows it at 640 px (scale 10)


@pytest.fixture
def empty(tmp_path, monkeypatch):
    url = f"sqlite:///{tmp_path / 'workbench.db'}"
    monkeypatch.setenv("OXNET_DB_URL", url)
    monkeypatch.setenv("OXNET_DEMO", "0")
    return url


@pytest.fixture
def demo(empty):
    seed_demo(empty, n=10, size=SIZE)
    return empty


def _sessions(url):
    return make_sessionmaker(init_db(url))


def _app(page: str | None = None, annotator: str | None = "dr.test") -> AppTest:
    at = AppTest.from_file(MAIN, default_timeout=60)
    if annotator:
        at.session_state["main_annotator"] = annotator
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


def test_overview_counts_and_trainer_states(demo, monkeypatch, tmp_path):
    monkeypatch.setattr(trainer_control, "TRAINER_SCRIPT", tmp_path / "missing" / "trainer.py")
    at = _app("views/overview.py")
    assert [m.value for m in at.metric][:1] == ["10"]
    assert "Not running" in _texts(at) and "missing from this checkout" in _texts(at)
    assert at.button(key="overview_start_missing").disabled
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
    monkeypatch.setattr(trainer_control, "TRAINER_SCRIPT", stub)
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
    at.button(key="overview_stop").click().run()
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
    at = _app("views/queue.py", annotator=None)
    assert "Enter your name" in _texts(at)
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
    from oxnet.strategies import Context, CostModel, ImageState, describe, get_strategy

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
    at.session_state["main_annotator"] = "dr.test"
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


@pytest.mark.parametrize(
    ("box", "message"),
    [(("Nodule", 100, 150, 0, 0), "inverted or empty"), (("", 100, 150, 50, 50), "has no class")],
)
def test_annotate_bad_box_shows_a_message_and_saves_nothing(demo, box, message):
    image_id = _unlabeled_ids(demo)[0]
    at = _draw(_open(image_id), box)
    at.button(key="annotate_save").click().run()
    assert message in _texts(at) and "Not saved" in _texts(at)
    with _sessions(demo)() as session:
        image = session.get(Image, image_id)
        assert image.version == 1 and image.granularity is Granularity.UNLABELED and not image.boxes
        assert session.scalars(select(AnnotationTime)).all() == []  # a refused save costs nothing


def test_annotate_findings_save_and_next_loads_the_next_image(demo):
    first, second = _unlabeled_ids(demo)[:2]
    at = _open(first)
    load = at.session_state["annotate_load"]
    at.checkbox(key=f"annotate_find_{load}_5").check().run()  # Pleural effusion
    at.button(key="annotate_save_next").click().run()
    assert not at.exception, at.exception
    assert at.session_state["annotate_image_id"] == second
    assert f"Image **#{second}**" in _texts(at)
    with _sessions(demo)() as session:
        image = session.get(Image, first)
        assert image.granularity is Granularity.WEAK
        assert {lb.label_class.name for lb in image.labels if lb.present} == {"Pleural effusion"}
        assert session.get(Lease, first) is None and session.get(Lease, second) is not None
        (timed,) = session.scalars(select(AnnotationTime)).all()  # the save's active seconds (issue 14)
        assert (timed.image_id, timed.upgrade, timed.annotator_id) == (first, "unlabeled->weak", image.labels[0].annotator_id)
        assert 0 <= timed.seconds < 120


def test_annotate_conflict_with_another_annotator(demo):
    image_id = _unlabeled_ids(demo)[0]
    at = _open(image_id)
    load = at.session_state["annotate_load"]
    at.checkbox(key=f"annotate_find_{load}_3").check().run()  # Mass, not saved yet
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
    load = at.session_state["annotate_load"]
    at.checkbox(key=f"annotate_find_{load}_3").check().run()
    at.button(key="annotate_skip").click().run()
    assert "unsaved changes. Leave it anyway?" in _texts(at)
    assert at.session_state["annotate_image_id"] == image_id
    at.button(key="annotate_discard").click().run()
    assert at.session_state["annotate_image_id"] != image_id


def test_annotate_accepts_and_rejects_model_suggestions(demo):
    ids = _unlabeled_ids(demo)
    suggested = [{"class": "Nodule", "bbox": [10, 12, 20, 30], "score": 0.9}, {"class": "Mass", "bbox": [30, 30, 50, 50], "score": 0.4}]
    version = _model(demo, ids, boxes=suggested)
    at = _open(ids[0])
    assert f"**Model suggestions** (version {version})" in _texts(at)
    assert "No attention maps are available" in _texts(at)
    at.button(key=f"annotate_reject_{at.session_state['annotate_load']}_1").click().run()
    at.button(key=f"annotate_accept_{at.session_state['annotate_load']}_0").click().run()
    assert "No (more) boxes suggested" in _texts(at)
    at.button(key="annotate_save").click().run()
    with _sessions(demo)() as session:
        boxes = [(b.label_class.name, b.x1, b.y1, b.x2, b.y2) for b in session.scalars(select(Box).where(Box.image_id == ids[0]))]
    assert boxes == [("Nodule", 10, 12, 20, 30)]


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


def test_data_upload_rejects_a_non_image_and_imports_the_image(demo):
    png = io.BytesIO()
    PILImage.new("L", (16, 16), 99).save(png, format="PNG")
    at = _app("views/data.py")
    uploader = at.get("file_uploader")[0]
    uploader.set_value([("scan.png", png.getvalue(), "image/png"), ("report.png", b"%PDF-1.4 not a png", "image/png")]).run()
    at.button(key="data_upload_go").click().run()
    assert not at.exception, at.exception
    assert "`report.png` is not an image we can read" in _texts(at)
    assert "Imported 1" in _texts(at)
    with _sessions(demo)() as session:
        paths = list(session.scalars(select(Image.path).where(Image.source == "folder")))
    assert [Path(p).name for p in paths] == ["scan.png"]


def test_jobs_cli_runs_an_export_without_patient_ids(demo, tmp_path):
    out = tmp_path / "export.json"
    status = tmp_path / "job.json"
    status.write_text(json.dumps({"id": "x", "status": "running"}))
    subprocess.run([sys.executable, "-m", "app.jobs", "--status", str(status), "export", str(out), "--granularity", "full"],
                   check=True, env={**os.environ, "OXNET_DB_URL": demo}, cwd=Path(MAIN).parent.parent)
    data = json.loads(out.read_text())
    assert data["images"] and all(i["patient_id"] is None and i["granularity"] == "full" for i in data["images"])
    assert json.loads(status.read_text())["status"] == "done"


def test_jobs_and_trainer_get_an_absolute_store_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert absolute_url("sqlite:///workbench.db") == f"sqlite:///{tmp_path / 'workbench.db'}"
    assert absolute_url("sqlite://") == "sqlite://"
