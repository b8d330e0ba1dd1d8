"""Queue with leases, model versions and their outputs, trainer lock, splits, stats and the export bridge."""

from datetime import timedelta

import pytest
from PIL import Image as PILImage
from sqlalchemy import select

from db.export import export_coco, export_training_mix
from db.lifecycle import set_boxes, set_image_labels
from db.models import Image, Metric, ModelStatus, Split, SuggestedAction, utcnow
from db.projects import assign_splits, ensure_project, stats
from db.queue import claim_next, queue, release_lease, take_lease
from db.trainer_lock import acquire_trainer_lock, release_trainer_lock, trainer_heartbeat, trainer_state
from db.versions import (
    create_model_version,
    finish_model_version,
    record_metrics,
    record_sweep_result,
    write_predictions,
    write_scores,
    write_suggestions,
)
from oxnet.classes import PAPER_CLASSES
from oxnet.data.records import records_from_coco

ADD, BOXES = SuggestedAction.ADD_LABELS, SuggestedAction.DRAW_BOXES


def _images(Session, n, patients=None, folder=None):
    """``n`` unlabeled images (files written to ``folder`` when given)."""
    with Session.begin() as s:
        project = ensure_project(s)
        start = len(s.scalars(select(Image.id)).all())
        paths = [f"{folder or '/x'}/{start + i}.png" for i in range(n)]
        if folder is not None:
            for path in paths:
                PILImage.new("L", (64, 64)).save(path)
        images = [Image(project_id=project.id, path=path, width=64, height=64, source="t",
                        patient_id=patients[i] if patients else None) for i, path in enumerate(paths)]
        s.add_all(images)
        s.flush()
        return [i.id for i in images]


def _ready_version(Session, suggestions):
    with Session.begin() as s:
        version = create_model_version(s, config={"preset": "tiny"}, round=1)
        write_suggestions(s, version.id, suggestions)
        finish_model_version(s, version.id, checkpoint_path="/ckpt/1.pt")
        return version.id


def test_default_project_has_the_papers_classes(db_sessionmaker):
    with db_sessionmaker.begin() as s:
        assert [c.name for c in ensure_project(s).classes] == list(PAPER_CLASSES)
        assert [c.ordinal for c in ensure_project(s, classes=["Extra"]).classes][-1] == len(PAPER_CLASSES) + 1


def test_queue_excludes_leased_and_upgraded_images(db_sessionmaker):
    S = db_sessionmaker
    ids = _images(S, 6)
    _ready_version(S, [{"image_id": i, "action": ADD, "score": float(i), "reason": {"text": "disagree"}} for i in ids]
                   + [{"image_id": i, "action": BOXES, "score": float(i)} for i in ids])
    now = utcnow()
    with S.begin() as s:
        assert take_lease(s, ids[5], "bob", now=now)
        assert not take_lease(s, ids[5], "alice", now=now)
        assert take_lease(s, ids[4], "carol", ttl=timedelta(seconds=1), now=now - timedelta(minutes=1))  # expired
        set_image_labels(s, ids[3], {"Mass": True}, annotator="dan")
    with S() as s:
        alice = [x.image_id for x in queue(s, ADD, annotator="alice", now=now)]
        bob = [x.image_id for x in queue(s, ADD, annotator="bob", now=now)]
        alice_boxes = [x.image_id for x in queue(s, BOXES, annotator="alice", limit=2, now=now)]
    assert alice == [ids[4], ids[2], ids[1], ids[0]]  # 5 leased to bob, 3 already weak
    assert bob == [ids[5], ids[4], ids[2], ids[1], ids[0]]
    assert alice_boxes == [ids[4], ids[3]]  # a weak image still needs boxes


def test_queue_uses_the_latest_ready_version_only(db_sessionmaker):
    S = db_sessionmaker
    ids = _images(S, 3)
    _ready_version(S, [{"image_id": ids[0], "action": ADD, "score": 1.0}])
    _ready_version(S, [{"image_id": ids[1], "action": ADD, "score": 0.5}])
    with S.begin() as s:
        training = create_model_version(s, config={})
        write_suggestions(s, training.id, [{"image_id": ids[2], "action": ADD, "score": 9.0}])
    with S() as s:
        assert [x.image_id for x in queue(s, ADD, annotator="a")] == [ids[1]]


def test_claim_next_hands_each_image_to_one_annotator(db_sessionmaker):
    S = db_sessionmaker
    ids = _images(S, 2)
    _ready_version(S, [{"image_id": i, "action": BOXES, "score": float(i)} for i in ids])
    with S.begin() as s:
        first = claim_next(s, BOXES, annotator="alice").image_id
        second = claim_next(s, BOXES, annotator="bob").image_id
        assert claim_next(s, BOXES, annotator="carol") is None
        assert {first, second} == set(ids)
        assert release_lease(s, first, "alice") and not release_lease(s, second, "alice")
        assert claim_next(s, BOXES, annotator="carol").image_id == first
        later = utcnow() + timedelta(days=1)  # both leases have expired: anyone may take the images
        assert take_lease(s, first, "dave", now=later) and take_lease(s, second, "dave", now=later)


def test_model_version_outputs(db_sessionmaker):
    S = db_sessionmaker
    ids = _images(S, 3, patients=["p1", "p1", "p2"])
    with S.begin() as s:
        set_boxes(s, ids[0], [("Mass", 1, 1, 10, 10)], annotator="a", complete=True)
        assign_splits(s, fractions=(1.0, 0.0, 0.0))
        version = create_model_version(s, config={"lr": 1e-4})
        assert version.label_counts == {"unlabeled": 2, "weak": 0, "full": 1} and version.status is ModelStatus.TRAINING
        record_metrics(s, version.id, "val", {"mAP": 0.1, "AP40": 0.2})
        record_metrics(s, version.id, Split.VAL, {"mAP": 0.3})
        assert write_predictions(s, version.id, [{"image_id": ids[1], "boxes": [{"class": "Mass", "bbox": [1, 2, 3, 4], "score": 0.9}],
                                                  "image_probs": {"Mass": 0.8}}]) == 1
        assert write_scores(s, version.id, [{"image_id": ids[1], "value": 0.7, "details": {"Mass": 0.7}}]) == 1
        with pytest.raises(ValueError, match="missing"):
            write_suggestions(s, version.id, [{"image_id": ids[1], "action": ADD}])
        with pytest.raises(ValueError):
            write_suggestions(s, version.id, [{"image_id": ids[1], "action": "paint it", "score": 1.0}])
        sweep = record_sweep_result(s, method="oxnet", n_full=1, n_weak=0, n_unlabeled=2, metrics={"mAP": 0.3}, seed=1)
        assert sweep.id == 1
        metrics = {m.name: m.value for m in s.scalars(select(Metric).where(Metric.model_version_id == version.id))}
        assert metrics == {"mAP": 0.3, "AP40": 0.2}


def test_trainer_lock_heartbeat_and_takeover(db_sessionmaker):
    S = db_sessionmaker
    _images(S, 1)
    now = utcnow()
    with S.begin() as s:
        assert acquire_trainer_lock(s, "pid1", now=now)
        assert not acquire_trainer_lock(s, "pid2", now=now)
        trainer_heartbeat(s, "pid1", round=2, progress=0.5, phase="train", now=now)
        state = trainer_state(s)
        assert (state.lock_owner, state.round, state.progress, state.phase) == ("pid1", 2, 0.5, "train")
        assert acquire_trainer_lock(s, "pid2", now=now + timedelta(minutes=10))  # pid1's heartbeat is stale
        with pytest.raises(RuntimeError, match="does not hold the lock"):
            trainer_heartbeat(s, "pid1")
        release_trainer_lock(s, "pid2", error="CUDA out of memory")
        state = trainer_state(s)
        assert state.lock_owner is None and state.last_error == "CUDA out of memory"


def test_splits_follow_patients_and_are_stable(db_sessionmaker):
    S = db_sessionmaker
    patients = [f"p{i % 40}" for i in range(200)]
    ids = _images(S, 200, patients)
    with S.begin() as s:
        counts = assign_splits(s, seed=3)
        assert sum(counts.values()) == 200 and min(counts.values()) > 0
        split_of = dict(s.execute(select(Image.id, Image.split)).all())
    by_patient = {}
    for image_id, patient in zip(ids, patients):
        by_patient.setdefault(patient, set()).add(split_of[image_id])
    assert all(len(splits) == 1 for splits in by_patient.values())
    new = _images(S, 1, ["p7"])  # a new image of a known patient joins the patient's split
    with S.begin() as s:
        assert sum(assign_splits(s, seed=99).values()) == 1
        assert s.get(Image, new[0]).split == split_of[ids[7]]
        overview = stats(s)
    assert overview["total"] == 201 and sum(overview["split"][k]["unlabeled"] for k in ("train", "val", "test")) == 201
    with pytest.raises(ValueError, match="fractions"), S.begin() as s:
        assign_splits(s, fractions=(0.5, 0.5, 0.5))


def test_export_bridge_is_read_by_oxnet(db_sessionmaker, tmp_path):
    S = db_sessionmaker
    ids = _images(S, 4, folder=tmp_path)
    with S.begin() as s:
        set_boxes(s, ids[0], [("Mass", 1, 2, 11, 22)], annotator="a", complete=True)
        set_image_labels(s, ids[1], {"Nodule": True}, annotator="a")
        set_boxes(s, ids[1], [("Nodule", 5, 5, 9, 9)], annotator="a")  # partial boxes of a weak image
        set_image_labels(s, ids[2], {}, annotator="a", no_finding=True)
        assign_splits(s, fractions=(1.0, 0.0, 0.0))
        mix = export_training_mix(s)
        weak_only = export_coco(s, granularity="weak")
    assert set(mix) == {"train", "val", "test"} and mix["val"]["images"] == []
    train = {i["id"]: i for i in mix["train"]["images"]}
    assert [train[i]["granularity"] for i in ids] == ["full", "weak", "weak", "unlabeled"]
    assert [train[i]["image_labels"] for i in ids] == [["Mass"], ["Nodule"], ["No Finding"], []]
    assert [(a["image_id"], a["bbox"]) for a in mix["train"]["annotations"]] == [(ids[0], [1.0, 2.0, 10.0, 20.0])]
    assert [i["id"] for i in weak_only["images"]] == [ids[1], ids[2]] and weak_only["annotations"] == []
    records = records_from_coco(mix["train"], classes=list(PAPER_CLASSES))
    assert [r.granularity for r in records] == ["full", "weak", "weak", "unlabeled"]
    assert records[0].boxes.tolist() == [[1.0, 2.0, 11.0, 22.0]] and records[2].negative


def test_export_keeps_not_assessed_apart_from_absent_down_to_the_training_target(db_sessionmaker, tmp_path):
    """present / absent / not assessed in the store -> image_labels / absent_labels -> Record -> mask."""
    from oxnet.data.datasets import OmniDataset

    S = db_sessionmaker
    ids = _images(S, 4, folder=tmp_path)
    with S.begin() as s:
        set_image_labels(s, ids[0], {"Nodule": True, "Mass": False}, annotator="a")  # 7 classes not assessed
        set_boxes(s, ids[1], [("Mass", 1, 2, 11, 22)], annotator="a", complete=True)
        set_image_labels(s, ids[2], {}, annotator="a", no_finding=True)
        assign_splits(s, fractions=(1.0, 0.0, 0.0))
        train = export_training_mix(s)["train"]
    by_id = {i["id"]: i for i in train["images"]}
    assert by_id[ids[0]]["image_labels"] == ["Nodule"] and by_id[ids[0]]["absent_labels"] == ["Mass"]
    assert by_id[ids[1]]["absent_labels"] == [c for c in PAPER_CLASSES if c != "Mass"]  # full: all known
    assert by_id[ids[2]]["absent_labels"] == list(PAPER_CLASSES)  # "No Finding": all absent
    assert by_id[ids[3]]["absent_labels"] == []
    records = records_from_coco(train, classes=list(PAPER_CLASSES))
    nodule, mass = PAPER_CLASSES.index("Nodule"), PAPER_CLASSES.index("Mass")
    assert records[0].unknown_labels == tuple(sorted(set(range(len(PAPER_CLASSES))) - {nodule, mass}))
    assert [r.unknown_labels for r in records[1:]] == [(), (), ()]
    dataset = OmniDataset(records, num_classes=len(PAPER_CLASSES), size=32, train=False)
    masks = [dataset[i][2]["image_label_mask"] for i in range(4)]
    assert masks[0].tolist() == [1.0 if c in (nodule, mass) else 0.0 for c in range(len(PAPER_CLASSES))]
    assert masks[1].tolist() == masks[2].tolist() == [1.0] * len(PAPER_CLASSES)
    assert masks[3].tolist() == [0.0] * len(PAPER_CLASSES)  # unlabeled: nothing known
    assert dataset[0][2]["image_labels"][nodule] == 1 and dataset[0][2]["image_labels"][mass] == 0


def test_export_import_round_trip_keeps_not_assessed(db_sessionmaker, tmp_path):
    from db.engine import init_db, make_sessionmaker
    from db.importers import import_coco
    from db.models import ImageLabel

    ids = _images(db_sessionmaker, 1, folder=tmp_path)
    with db_sessionmaker.begin() as s:
        set_image_labels(s, ids[0], {"Nodule": True, "Mass": False}, annotator="a")
        coco = export_coco(s, images_root=tmp_path, include_patient_ids=True)  # real file names, to import again
    other = make_sessionmaker(init_db(f"sqlite:///{tmp_path / 'other.db'}"))
    with other.begin() as s:
        report = import_coco(s, coco, images=tmp_path)
        assert not report.errors
        rows = {(label.label_class.name, label.present) for label in s.scalars(select(ImageLabel))}
    assert rows == {("Nodule", True), ("Mass", False)}  # the 7 others stay not assessed (no row)
    del coco["images"][0]["absent_labels"]  # the nih-cxr dialect: the others are absent
    with make_sessionmaker(init_db(f"sqlite:///{tmp_path / 'third.db'}")).begin() as s:
        import_coco(s, coco, images=tmp_path)
        assert len(s.scalars(select(ImageLabel)).all()) == len(PAPER_CLASSES)


def test_a_lease_given_back_between_the_insert_and_the_read_is_taken(db_sessionmaker, monkeypatch):
    """On PostgreSQL the holder's release can commit between take_lease's ignored insert and its read of
    the holder: the image is free then, and take_lease must take it instead of failing on a missing row."""
    import db.queue

    ids = _images(db_sessionmaker, 1)
    real, calls = db.queue.insert_ignore, []

    def released_in_between(*args, **kwargs):  # the first insert meets the holder's row, which then goes
        calls.append(1)
        if len(calls) > 1:
            real(*args, **kwargs)

    monkeypatch.setattr(db.queue, "insert_ignore", released_in_between)
    with db_sessionmaker.begin() as s:
        assert take_lease(s, ids[0], "dr.a")
    assert len(calls) == 2
