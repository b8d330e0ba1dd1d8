"""The background trainer on a tiny synthetic store: a whole round end to end, resilience (kill -9 and
restart, a second instance refused, OOM, a failing round, stop), labels saved during a round, leases."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from sqlalchemy import select

from db.engine import init_db, make_sessionmaker
from db.importers import import_coco
from db.lifecycle import set_image_labels
from db.models import Granularity, Image, Metric, ModelStatus, ModelVersion, Prediction, Score, Split, Suggestion
from db.queue import claim_next, take_lease
from db.trainer_lock import trainer_state
from db.workbench import SqlStore, request_stop
from oxnet.training import engine
from oxnet.training.checkpoint import load_checkpoint
from oxnet.data.synthetic import write_coco
from oxnet.active.loop import STOPPED_MESSAGE, TRAINER_PRESETS, AlreadyRunning, Trainer, round_eta
from oxnet.experiments.simulate import hide_labels

pytestmark = pytest.mark.slow  # processes, whole training runs: deselect with -m 'not slow'

ROOT = Path(__file__).resolve().parent.parent
#: (split, granularity) of the 12 images of the tiny store.
PLAN = [("val", "full")] * 3 + [("train", "full")] * 3 + [("train", "weak")] * 3 + [("train", "unlabeled")] * 3
SETTINGS = replace(TRAINER_PRESETS["tiny"], steps_per_epoch=1, pretrain_epochs=0, min_interval_s=0.0,
                   retry_delay_s=0.0, heartbeat_s=0.2, max_rounds=1, device="cpu")


def make_store(folder: Path) -> str:
    """A store of 12 synthetic 64 px images planned by PLAN; returns its URL."""
    paths = write_coco(folder / "synth", len(PLAN), size=64, seed=3)
    truth = json.loads(paths["synthetic"].read_text())
    coco = hide_labels(truth, {image["id"]: plan for image, plan in zip(truth["images"], PLAN)})
    url = f"sqlite:///{folder / 'store.db'}"
    engine = init_db(url)
    with make_sessionmaker(engine).begin() as session:
        report = import_coco(session, coco, images=folder / "synth" / "images")
        assert not report.errors, report.errors
    engine.dispose()  # checkpoints the WAL into store.db, which the tests copy
    return url


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("template")
    make_store(folder)
    return folder


@pytest.fixture
def store_url(template, tmp_path) -> str:
    """A fresh copy of the template store (the images stay in the template folder)."""
    (tmp_path / "store.db").write_bytes((template / "store.db").read_bytes())
    return f"sqlite:///{tmp_path / 'store.db'}"


def _session(url):
    return make_sessionmaker(init_db(url))


def _versions(url):
    with _session(url).begin() as session:
        return [(v.id, v.round, v.status, dict(v.label_counts), v.checkpoint_path, dict(v.config))
                for v in session.scalars(select(ModelVersion).order_by(ModelVersion.id))]


def _granularities(url):
    with _session(url).begin() as session:
        return dict(session.execute(select(Image.id, Image.granularity)).all())


def test_rounds_end_to_end_new_labels_next_round_and_stop_flag(store_url):
    """Two rounds, the second warm-started from the first; a label saved during round 1 does not restart
    it and is learnt by round 2; every not-full train image gets a score, a prediction and a suggestion;
    claims respect leases; a stop request in the store ends the trainer, which gives its lock back."""
    sessions = _session(store_url)
    with sessions.begin() as session:
        unlabeled = session.scalars(select(Image.id).where(Image.split == Split.TRAIN,
                                                           Image.granularity == Granularity.UNLABELED)).first()
    store = SqlStore.open(store_url)
    write_results = store.write_results
    calls = []

    def label_during_round(version_id, classes, results, suggestions):
        if not calls:  # round 1, after training: an annotator saves labels
            with sessions.begin() as session:
                set_image_labels(session, unlabeled, {"Nodule": True}, annotator="dr.lee")
        calls.append(version_id)
        write_results(version_id, classes, results, suggestions)

    store.write_results = label_during_round
    rounds = []

    def on_round(result):
        rounds.append(result)
        if len(rounds) == 2:
            with sessions.begin() as session:
                request_stop(session)

    settings = replace(SETTINGS, max_rounds=None)
    results = Trainer(store, settings, on_round=on_round).run()

    assert [r.status for r in results] == ["ready", "ready"]
    versions = _versions(store_url)
    assert [(v[1], v[2]) for v in versions] == [(1, ModelStatus.READY), (2, ModelStatus.READY)]
    assert versions[0][3] == {"full": 3, "weak": 3, "unlabeled": 3}  # the snapshot of round 1
    assert versions[1][3] == {"full": 3, "weak": 4, "unlabeled": 2}  # round 2 learnt the new label
    assert versions[0][5]["warm_start"] is None and versions[1][5]["warm_start"] == versions[0][4]
    for _, _, _, _, checkpoint, _ in versions:
        state = load_checkpoint(checkpoint)
        assert state["student"] and state["teacher"] and "optimizer" not in state
        assert sorted(p.name for p in Path(checkpoint).parent.iterdir()) == ["model.pt"]

    now = _granularities(store_url)
    with sessions.begin() as session:
        train = set(session.scalars(select(Image.id).where(Image.split == Split.TRAIN)))
        for version_id, *_ in versions:
            seen = {**now, unlabeled: Granularity.UNLABELED} if version_id == versions[0][0] else now
            pending = {i for i in train if seen[i] is not Granularity.FULL}
            scores = dict(session.execute(select(Score.image_id, Score.value).where(Score.model_version_id == version_id)).all())
            assert set(scores) == pending and all(v >= 0 for v in scores.values())
            suggestions = session.scalars(select(Suggestion).where(Suggestion.model_version_id == version_id)).all()
            assert {s.image_id for s in suggestions} == pending
            for s in suggestions:  # the default strategy (cost_aware) picks the upgrade
                allowed = {"add image-level labels", "draw boxes"} if seen[s.image_id] is Granularity.UNLABELED else {"draw boxes"}
                assert s.action.value in allowed, (s.image_id, s.action)
                assert s.reason["strategy"] == "cost_aware" and s.reason["gain"] is not None
                assert s.reason["cost"] == (1.0 if s.action.value == "add image-level labels" else
                                            5.0 if seen[s.image_id] is Granularity.WEAK else 6.0)
                assert "mAP points expected" in s.reason["text"]
            predictions = session.scalars(select(Prediction).where(Prediction.model_version_id == version_id)).all()
            assert {p.image_id for p in predictions} == pending
            for p in predictions:
                image = session.get(Image, p.image_id)
                for box in p.boxes:  # original pixels
                    x1, y1, x2, y2 = box["bbox"]
                    assert 0 <= x1 <= x2 <= image.width and 0 <= y1 <= y2 <= image.height
                assert len(p.image_probs["attention"]) == 9
            metrics = dict(session.execute(select(Metric.name, Metric.value).where(
                Metric.model_version_id == version_id, Metric.split == Split.VAL)).all())
            assert 0.0 <= metrics["mAP"] <= 1.0 and "num_gt_boxes" in metrics
        state = trainer_state(session)
        assert state.lock_owner is None and state.round == 2 and not state.last_error
        # the queue hands an image to one annotator at a time
        first = claim_next(session, "draw boxes", annotator="a")
        second = claim_next(session, "draw boxes", annotator="b")
        assert first is not None and second is not None and first.image_id != second.image_id
        assert first.model_version_id == versions[1][0] and first.score >= second.score
        assert not take_lease(session, first.image_id, "b")
        assert claim_next(session, "draw boxes", annotator="a").image_id == first.image_id


def test_second_trainer_refused_and_dead_owner_taken_over(store_url, tmp_path):
    alive = SqlStore.open(store_url, owner="elsewhere:1")
    assert alive.acquire()
    with pytest.raises(AlreadyRunning):
        Trainer(SqlStore.open(store_url), SETTINGS).run()
    alive.release()
    # a store held by a live process of this host refuses the script (exit status 3)
    here = SqlStore.open(store_url)  # owner "<host>:<this pid>"
    assert here.acquire()
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "trainer.py"), "--preset", "tiny"],
                          env={**os.environ, "OXNET_DB_URL": store_url}, capture_output=True, text=True, timeout=120)
    assert done.returncode == 3, done.stderr
    assert "refused" in done.stderr
    here.release()
    # the lock of a process that died (kill -9: fresh heartbeat) is taken over at once
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    ghost = SqlStore.open(store_url, owner=f"{here.owner.rpartition(':')[0]}:{dead.pid}")
    assert ghost.acquire()
    assert SqlStore.open(store_url).acquire()


def test_failed_round_recorded_then_retried_and_oom_halves_batch(store_url, monkeypatch):
    import oxnet.active.loop

    real_fit, real_step = oxnet.active.loop.fit, engine.train_one_round
    fits, steps = [], []

    def failing_once(*args, **kwargs):
        fits.append(args[2].batch_size)
        if len(fits) == 1:
            raise RuntimeError("disk full")
        return real_fit(*args, **kwargs)

    def oom_once(*args, **kwargs):
        steps.append(1)
        if len(steps) == 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_step(*args, **kwargs)

    monkeypatch.setattr(oxnet.active.loop, "fit", failing_once)
    monkeypatch.setattr(engine, "train_one_round", oom_once)
    errors = []
    store = SqlStore.open(store_url)
    heartbeat = store.heartbeat
    store.heartbeat = lambda *a, **k: (errors.append(a[3] if len(a) > 3 else k.get("error")), heartbeat(*a, **k))
    results = Trainer(store, replace(SETTINGS, max_rounds=2, max_interval_s=0.1)).run()

    assert [r.status for r in results] == ["failed", "ready"]
    assert "disk full" in results[0].error
    assert fits == [2, 2, 1] and results[1].batch_size == 1
    versions = _versions(store_url)
    assert [v[2] for v in versions] == [ModelStatus.FAILED, ModelStatus.READY]
    assert "disk full" in versions[0][5]["error"]
    assert any(e and "disk full" in e for e in errors)  # recorded in TrainerState.last_error
    with _session(store_url).begin() as session:
        assert trainer_state(session).last_error == ""  # cleared by the successful round


def _wait_for_training(url, process, timeout=180.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()
        with _session(url).begin() as session:
            state = trainer_state(session)
            if (state is not None and (state.lock_owner or "").endswith(f":{process.pid}") and state.phase
                    and state.phase.startswith(("pretrain", "train "))):
                return
        time.sleep(0.2)
    raise AssertionError("the trainer never reached a training step")


def test_sigterm_stops_cleanly_and_kill_9_resumes(store_url, tmp_path):
    env = {**os.environ, "OXNET_DB_URL": store_url}
    command = [sys.executable, str(ROOT / "scripts" / "trainer.py"), "--preset", "tiny", "--steps-per-epoch", "1",
               "--max-rounds", "1", "--min-interval", "0"]
    before = _granularities(store_url)
    log = open(tmp_path / "trainer.log", "w")

    trainer = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    _wait_for_training(store_url, trainer)
    trainer.send_signal(signal.SIGTERM)
    assert trainer.wait(timeout=120) == 0
    with _session(store_url).begin() as session:
        assert trainer_state(session).lock_owner is None
    assert [(v[2], v[5]["error"]) for v in _versions(store_url)] == [(ModelStatus.FAILED, STOPPED_MESSAGE)]

    trainer = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    _wait_for_training(store_url, trainer)
    trainer.kill()  # SIGKILL mid-round: the version row stays "training", the lock stays held
    trainer.wait()
    assert [v[2] for v in _versions(store_url)] == [ModelStatus.FAILED, ModelStatus.TRAINING]

    assert subprocess.run(command, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=300).returncode == 0
    versions = _versions(store_url)
    assert [(v[1], v[2]) for v in versions] == [(1, ModelStatus.FAILED), (2, ModelStatus.FAILED), (3, ModelStatus.READY)]
    assert versions[1][5]["error"].startswith("abandoned")
    load_checkpoint(versions[2][4])  # complete and readable
    assert versions[2][5]["train"]["pretrain_epochs"] == 1  # no ready model yet: RetinaNet on the full images first
    assert _granularities(store_url) == before  # no label lost


def test_stop_after_this_round_finishes_and_saves_the_round_then_exits(store_url):
    """A "stop after this round" request during round 1 lets that round finish ready, then the trainer
    exits (a later round would start after max_interval_s without it)."""
    sessions = _session(store_url)
    store = SqlStore.open(store_url)
    write_results = store.write_results

    def ask_during_round(version_id, classes, results, *ranked):
        with sessions.begin() as session:
            request_stop(session, after_round=True)
        write_results(version_id, classes, results, *ranked)

    store.write_results = ask_during_round
    settings = replace(SETTINGS, max_rounds=None, max_interval_s=0.5)
    results = Trainer(store, settings).run()

    assert [r.status for r in results] == ["ready"]
    assert [(v[1], v[2]) for v in _versions(store_url)] == [(1, ModelStatus.READY)]
    with sessions.begin() as session:
        assert trainer_state(session).lock_owner is None


def test_round_eta_covers_evaluation_saving_scoring_and_writing(store_url):
    """The first round's phase text says its ETA covers training only; the second round's ETA adds the
    first round's measured later phases, scaled by the images to score."""
    assert round_eta(10.0, None, 5) is None
    previous = {"train": 100.0, "save": 2.0, "evaluate": 8.0, "score": 40.0, "write": 10.0, "scored": 10.0}
    assert round_eta(10.0, previous, 20) == pytest.approx(10.0 + 2.0 + 8.0 + (40.0 + 10.0) / 10 * 20)

    phases: list[tuple[int, str]] = []

    class Recording(Trainer):
        def _set(self, **values):
            super()._set(**values)
            if "phase" in values:
                phases.append((self._status["round"], values["phase"]))

    results = Recording(SqlStore.open(store_url), replace(SETTINGS, max_rounds=2, max_interval_s=0.1)).run()
    assert [r.status for r in results] == ["ready", "ready"]
    assert set(results[0].durations) >= {"train", "save", "evaluate", "score", "write", "scored"}
    assert results[0].durations["scored"] == 6  # the not-full train images
    training = [(n, text) for n, text in phases if text.startswith(("train ", "pretrain "))]
    assert training and all("+scoring" in text for n, text in training if n == 1)
    assert any("round eta" in text for n, text in training if n == 2)
    assert all(len(text) <= 64 for _, text in phases)  # the store's phase column
    assert _versions(store_url)[0][5]["durations"]["scored"] == 6
@pytest.mark.parametrize("strategy", ["cost_aware", "uncertainty_diversity"])
def test_the_queue_shows_exactly_the_strategys_order(store_url, monkeypatch, strategy):
    """The trainer ranks with the strategy object and the Queue page reads that order back: the same
    code path the simulation measures (no second ranking in SQL)."""
    import oxnet.active.loop as loop
    from db.queue import queue
    from oxnet.active.strategies import get_strategy

    seen = []

    def recording(name):
        inner = get_strategy(name)

        class Recorder(type(inner)):
            def __call__(self, images, context):
                picks = inner(images, context)
                seen.append((images, context, picks))
                return picks

        recorder = Recorder.__new__(Recorder)
        recorder.__dict__.update(inner.__dict__)
        return recorder

    monkeypatch.setattr(loop, "get_strategy", recording)
    store = SqlStore.open(store_url)
    [result] = Trainer(store, replace(SETTINGS, strategy=strategy, batch_units=7)).run()
    assert result.status == "ready" and set(result.durations) == {"train", "save", "evaluate", "score", "rank", "write", "scored"}
    [(images, context, picks)] = seen
    assert len(images) == 6 and all(im.embedding is not None and im.image_probs is not None for im in images)
    assert context.counts["full"] == 3 and context.batch_units == 7 and len(context.history) == 1  # this round's val mAP
    with _session(store_url).begin() as session:
        for action in ("add image-level labels", "draw boxes"):
            listed = [(item.image_id, item.action) for item in queue(session, action, annotator="a", limit=50)]
            assert listed == [(p.image_id, p.action) for p in picks if p.action == action]


def test_a_bounded_pool_scores_changed_images_and_previous_top_first(store_url):
    """pool_size 3 of 6 not-full images: round 1 scores a random 3; an image labelled after round 1 and
    round 1's top suggestions make round 2's pool (its random share is 0 here)."""
    settings = replace(SETTINGS, pool_size=3, pool_random_share=0.0, strategy="disagreement")
    store = SqlStore.open(store_url)
    [first] = Trainer(store, settings).run()
    assert first.status == "ready" and first.scored == 3
    sessions = _session(store_url)
    with sessions.begin() as session:
        scored = set(session.scalars(select(Score.image_id).where(Score.model_version_id == first.version_id)))
        top = session.scalars(select(Suggestion.image_id).where(Suggestion.model_version_id == first.version_id)
                              .order_by(Suggestion.score.desc())).all()
        unscored = session.scalars(select(Image.id).where(Image.split == Split.TRAIN, Image.granularity == Granularity.UNLABELED,
                                                          Image.id.not_in(scored))).first()
        assert unscored is not None and len(top) == 3
        set_image_labels(session, unscored, {"Nodule": True}, annotator="dr.lee")
    assert store.pool_hints(3) == ([unscored], top)
    [second] = Trainer(store, settings).run()
    with sessions.begin() as session:
        again = set(session.scalars(select(Score.image_id).where(Score.model_version_id == second.version_id)))
    assert second.scored == 3 and unscored in again and again == {unscored, *top[:2]}


def test_scoring_stops_at_its_share_of_the_training_time(store_url):
    """score_time_share: the pool is scored in chunks, most wanted first, and the round stops scoring
    once the share of its training time is used (a tiny share: one chunk of 4 of the 6 images)."""
    settings = replace(SETTINGS, score_time_share=1e-9, score_batch_size=1, strategy="disagreement")
    [result] = Trainer(SqlStore.open(store_url), settings).run()
    assert result.status == "ready" and result.scored == 4
    with _session(store_url).begin() as session:
        assert len(session.scalars(select(Suggestion).where(Suggestion.model_version_id == result.version_id)).all()) == 4
    with pytest.raises(ValueError, match="score_time_share"):
        replace(SETTINGS, score_time_share=0.0)
