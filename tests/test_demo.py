"""The demo project, the scale store and the page queries of db/service.py (no Streamlit)."""

from __future__ import annotations

from collections import Counter

import pytest
from sqlalchemy import select

from db.demo import data_dir, demo_plan, fill_scale_store, seed_demo
from db.engine import init_db, make_sessionmaker
from db.lifecycle import ConflictError, replay_audit, set_image_labels
from db.models import AuditEntry, Granularity, Image, ModelStatus, Split, SuggestedAction
from db.projects import ensure_project, stats
from db.queue import take_lease
from db.versions import create_model_version, finish_model_version, write_suggestions
from db.queue import claim_next, queue
from db.service import image_detail, save_annotation, validate_annotation

pytestmark = pytest.mark.slow  # processes, whole training runs: deselect with -m 'not slow'


@pytest.fixture
def store(tmp_path):
    url = f"sqlite:///{tmp_path / 'workbench.db'}"
    seed_demo(url, n=12, size=64)
    return url, make_sessionmaker(init_db(url))


def test_demo_plan_mixes_granularities_and_keeps_val_full():
    plan = demo_plan(300, seed=0)
    counts = Counter(plan)
    assert counts[(Split.VAL, Granularity.FULL)] == 45
    train = {g: counts[(Split.TRAIN, g)] for g in Granularity}
    assert train[Granularity.UNLABELED] > train[Granularity.WEAK] > train[Granularity.FULL] > 0
    assert sum(counts.values()) == 300
    assert demo_plan(300, seed=0) == plan and demo_plan(300, seed=1) != plan
    with pytest.raises(ValueError, match="n must be"):
        demo_plan(-1)


def test_seed_demo_writes_files_beside_the_store_and_imports_them(store, tmp_path):
    url, Session = store
    folder = tmp_path / "workbench_data" / "demo"
    assert data_dir(url) == tmp_path / "workbench_data"
    assert len(list(folder.glob("*.png"))) == 12 and (folder / "demo.json").is_file()
    with Session() as session:
        counts = stats(session)
        assert counts["total"] == 12
        assert counts["split"]["val"] == {"full": counts["split"]["val"]["full"], "weak": 0, "unlabeled": 0}
        assert counts["split"]["val"]["full"] > 0
        assert all(counts["split"]["train"][g.value] > 0 for g in Granularity)
        weak = session.scalars(select(Image).where(Image.granularity == Granularity.WEAK)).all()
        assert weak and all(not image.boxes for image in weak)  # boxes dropped, labels kept
        assert all(image.labels or image.no_finding for image in weak)
    with pytest.raises(ValueError, match="at least one image"):
        seed_demo(url, n=0)


def test_seed_demo_reports_progress_to_twice_n(tmp_path):
    calls = []
    seed_demo(f"sqlite:///{tmp_path / 's.db'}", n=3, size=48, progress=lambda done, total: calls.append((done, total)))
    assert calls[-1] == (6, 6) and all(total == 6 for _, total in calls)
    assert [done for done, _ in calls] == sorted(done for done, _ in calls)


def test_fill_scale_store_writes_suggestions_for_not_full_training_images(tmp_path):
    Session = make_sessionmaker(init_db(f"sqlite:///{tmp_path / 'big.db'}"))
    with Session.begin() as session:
        counts = fill_scale_store(session, 200, [f"/nowhere/{i}.png" for i in range(200)])
        assert counts["images"] == 200 and counts["versions"] == 3
        items = queue(session, SuggestedAction.DRAW_BOXES, annotator="dr.a", limit=5)
        assert len(items) == 5 and items[0].score >= items[-1].score
        with pytest.raises(ValueError, match="one path per image"):
            fill_scale_store(session, 3, ["a"])


def _version_with_suggestions(session, image_ids, classes=("Nodule",)):
    version = create_model_version(session, config={})
    finish_model_version(session, version.id, status=ModelStatus.READY)
    write_suggestions(session, version.id, [
        {"image_id": i, "action": SuggestedAction.ADD_LABELS, "score": float(10 - k),
         "reason": {"text": "disagree", "classes": [classes[k % len(classes)]]}}
        for k, i in enumerate(image_ids)
    ])
    return version


def test_queue_before_a_model_lists_images_below_the_target_and_skips_leases(store):
    url, Session = store
    with Session.begin() as session:
        items = queue(session, SuggestedAction.ADD_LABELS, annotator="dr.a", limit=100)
        assert items and all(item.granularity == "unlabeled" and item.score is None for item in items)
        assert "no model yet" in items[0].reason
        boxes_queue = queue(session, SuggestedAction.DRAW_BOXES, annotator="dr.a", limit=100)
        assert {i.granularity for i in boxes_queue} <= {"unlabeled", "weak"} and len(boxes_queue) > len(items)
        assert take_lease(session, items[0].image_id, "dr.b")
        assert items[0].image_id not in {i.image_id for i in queue(session, SuggestedAction.ADD_LABELS, annotator="dr.a", limit=100)}
        assert items[0].image_id in {i.image_id for i in queue(session, SuggestedAction.ADD_LABELS, annotator="dr.b", limit=100)}
        assert queue(session, SuggestedAction.ADD_LABELS, annotator="dr.a", split="val") == []


def test_queue_with_a_model_ranks_by_score_and_filters_by_class(store):
    url, Session = store
    with Session.begin() as session:
        unlabeled = list(session.scalars(select(Image.id).where(Image.granularity == Granularity.UNLABELED).order_by(Image.id)))
        _version_with_suggestions(session, unlabeled, classes=("Nodule", "Mass"))
        items = queue(session, SuggestedAction.ADD_LABELS, annotator="dr.a")
        assert [i.image_id for i in items] == unlabeled
        assert [i.score for i in items] == sorted((i.score for i in items), reverse=True)
        nodules = queue(session, SuggestedAction.ADD_LABELS, annotator="dr.a", class_name="Nodule")
        assert nodules and all(i.classes == ("Nodule",) for i in nodules)
        assert queue(session, SuggestedAction.ADD_LABELS, annotator="dr.a", class_name="Fracture") == []
        first = claim_next(session, SuggestedAction.ADD_LABELS, annotator="dr.a").image_id
        assert first == unlabeled[0]
        assert claim_next(session, SuggestedAction.ADD_LABELS, annotator="dr.b").image_id == unlabeled[1]
        assert claim_next(session, SuggestedAction.ADD_LABELS, annotator="dr.a", exclude=[first]).image_id == unlabeled[2]


def _unlabeled(Session) -> Image:
    with Session() as session:
        return session.scalars(select(Image).where(Image.granularity == Granularity.UNLABELED).order_by(Image.id)).first()


def test_save_annotation_boxes_and_findings_in_one_save(store):
    url, Session = store
    image = _unlabeled(Session)
    with Session.begin() as session:
        saved = save_annotation(session, image.id, present={"Mass"}, no_finding=False, boxes=[("Nodule", 1, 2, 10, 12)],
                                complete=False, annotator="dr.a", expected_version=image.version)
        assert saved.granularity is Granularity.WEAK
    with Session() as session:
        detail = image_detail(session, image.id)
        assert detail.boxes == [("Nodule", 1.0, 2.0, 10.0, 12.0)]
        assert detail.labels == {"Mass": True, "Nodule": True}  # unmarked classes stay not assessed (no row)
        assert replay_audit(session, image.id)["boxes"][0][:5] == ["Nodule", 1.0, 2.0, 10.0, 12.0]
    # now: remove the box, untick Nodule, mark complete with a Mass box -> full
    with Session.begin() as session:
        saved = save_annotation(session, image.id, present={"Mass"}, no_finding=False, boxes=[("Mass", 5, 5, 30, 30)],
                                complete=True, annotator="dr.a", expected_version=detail.version)
        assert saved.granularity is Granularity.FULL
    with Session() as session:
        detail = image_detail(session, image.id)
        assert detail.boxes == [("Mass", 5.0, 5.0, 30.0, 30.0)] and detail.labels == {"Mass": True}
    # unticking "all boxed" downgrades to weak, with the reason in the audit log
    with Session.begin() as session:
        saved = save_annotation(session, image.id, present={"Mass"}, no_finding=False, boxes=[("Mass", 5, 5, 30, 30)],
                                complete=False, annotator="dr.a", expected_version=detail.version)
        assert saved.granularity is Granularity.WEAK
        assert session.scalars(select(AuditEntry.action).where(AuditEntry.image_id == image.id).order_by(AuditEntry.id.desc())).first() == "downgrade"


def test_save_annotation_stores_absent_only_when_marked(store):
    url, Session = store
    image = _unlabeled(Session)
    with Session.begin() as session:
        saved = save_annotation(session, image.id, present=set(), absent={"Mass", "Fracture"}, no_finding=False, boxes=[],
                                complete=False, annotator="dr.a", expected_version=image.version)
        assert saved.granularity is Granularity.WEAK
    with Session() as session:
        detail = image_detail(session, image.id)
        assert detail.labels == {"Mass": False, "Fracture": False}
    with pytest.raises(ValueError, match=r"\['Mass'\] marked absent but present"), Session.begin() as session:
        save_annotation(session, image.id, present=set(), absent={"Mass"}, no_finding=False, boxes=[("Mass", 1, 1, 9, 9)],
                        complete=False, annotator="dr.a", expected_version=detail.version)


def test_save_annotation_switches_between_no_finding_and_boxes(store):
    url, Session = store
    image = _unlabeled(Session)
    with Session.begin() as session:
        save_annotation(session, image.id, present=set(), no_finding=True, boxes=[], complete=True,
                        annotator="dr.a", expected_version=image.version)
    with Session() as session:
        detail = image_detail(session, image.id)
        assert detail.no_finding and detail.granularity == "full" and not detail.boxes
    with Session.begin() as session:
        save_annotation(session, image.id, present={"Nodule"}, no_finding=False, boxes=[("Nodule", 1, 1, 9, 9)],
                        complete=True, annotator="dr.b", expected_version=detail.version)
    with Session() as session:
        detail = image_detail(session, image.id)
        assert not detail.no_finding and detail.boxes == [("Nodule", 1.0, 1.0, 9.0, 9.0)]
    with Session.begin() as session:  # and back: the box goes, "No finding" comes
        save_annotation(session, image.id, present=set(), no_finding=True, boxes=[], complete=True,
                        annotator="dr.b", expected_version=detail.version)
    with Session() as session:
        detail = image_detail(session, image.id)
        assert detail.no_finding and not detail.boxes and not any(detail.labels.values())


@pytest.mark.parametrize(
    ("present", "no_finding", "boxes", "complete", "message"),
    [
        (set(), False, [("Nodule", 5, 5, 5, 9)], False, "inverted or empty"),
        (set(), False, [("Nodule", 5, 5, 6.6, 9)], False, r"1.6 x 4.0 px, smaller than the minimum 4 px"),
        (set(), False, [("", 1, 1, 9, 9)], False, "has no class"),
        (set(), False, [("Nodule", 1, 1, 90, 9)], False, "outside"),
        ({"Mass"}, True, [], False, "'No finding' cannot go with"),
        (set(), False, [], False, "nothing labelled"),
        ({"Mass"}, False, [], True, "have no box"),
        ({"Elbow"}, False, [], False, "unknown findings"),
    ],
)
def test_save_annotation_refuses_bad_input_and_saves_nothing(store, present, no_finding, boxes, complete, message):
    url, Session = store
    image = _unlabeled(Session)
    with pytest.raises(ValueError, match=message):
        with Session.begin() as session:
            save_annotation(session, image.id, present=present, no_finding=no_finding, boxes=boxes, complete=complete,
                            annotator="dr.a", expected_version=image.version)
    with Session() as session:
        assert session.get(Image, image.id).version == image.version
        assert session.scalars(select(AuditEntry).where(AuditEntry.image_id == image.id, AuditEntry.action != "import")).all() == []


def test_save_annotation_detects_a_concurrent_save(store):
    url, Session = store
    image = _unlabeled(Session)
    with Session.begin() as session:
        set_image_labels(session, image.id, {"Mass": True}, annotator="dr.b")
    with pytest.raises(ConflictError, match="changed by someone else"):
        with Session.begin() as session:
            save_annotation(session, image.id, present={"Nodule"}, no_finding=False, boxes=[], complete=False,
                            annotator="dr.a", expected_version=image.version)
    with Session() as session:
        assert {n for n, p in image_detail(session, image.id).labels.items() if p} == {"Mass"}


def test_validate_annotation_accepts_a_good_one():
    assert validate_annotation(["Nodule"], {"Nodule"}, False, [("Nodule", 1, 1, 5, 5)], 10, 10, complete=True) == []


def test_image_detail_names_another_annotators_lease(store):
    url, Session = store
    image = _unlabeled(Session)
    with Session.begin() as session:
        ensure_project(session)
        take_lease(session, image.id, "dr.b")
        assert image_detail(session, image.id, annotator="dr.a").leased_by == "dr.b"
        assert image_detail(session, image.id, annotator="dr.b").leased_by is None
        with pytest.raises(ValueError, match="no image with id"):
            image_detail(session, 10_000)
