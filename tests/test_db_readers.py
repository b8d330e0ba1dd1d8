"""Several readers per image (db.readers): the queue and leases per reader, blind reads, the consensus
rule written as the training label, review actions with their audit, and agreement. Runs on SQLite and
PostgreSQL (the ``db_sessionmaker`` fixture)."""

from __future__ import annotations

import json
import threading
import time
from datetime import timedelta

import pytest
from sqlalchemy import select

from db.export import export_coco
from db.lifecycle import ConflictError, replay_audit
from db.models import AuditEntry, Image, ImageReview, Lease, ReaderLease, Reading, utcnow
from db.readers import (
    CONSENSUS,
    CONSENSUS_ANNOTATOR,
    REVIEWED,
    Read,
    _at_least,
    accept_read,
    annotation_detail,
    consensus,
    fuse_boxes,
    merge_reads,
    project_agreement,
    readers_per_image,
    reads,
    release_image,
    review_detail,
    review_queue,
    save_for,
    save_read,
    set_readers_per_image,
    take_image,
    take_reader_lease,
)
from db.projects import ensure_project
from db.queue import claim_next, queue
from db.service import image_detail

CLASSES = ["Nodule", "Mass", "Effusion"]
ADD, BOXES = "add image-level labels", "draw boxes"
NODULE = ("Nodule", 10.0, 10.0, 30.0, 30.0)
NODULE_B = ("Nodule", 11.0, 10.0, 31.0, 31.0)  # IoU with NODULE about 0.86
MASS = ("Mass", 40.0, 40.0, 60.0, 60.0)


def _claimed(session, action, **kwargs):
    """The image id :func:`db.queue.claim_next` leased (None: the queue was empty)."""
    item = claim_next(session, action, **kwargs)
    return item.image_id if item is not None else None


def _images(S, n, readers=2):
    with S.begin() as s:
        project = ensure_project(s, classes=CLASSES)
        images = [Image(project_id=project.id, path=f"/x/{i}.png", width=64, height=64, source="t") for i in range(n)]
        s.add_all(images)
        s.flush()
        if readers != 1:
            set_readers_per_image(s, readers, annotator="admin")
        return [i.id for i in images]


def _read(S, image_id, who, *, present=(), absent=(), boxes=(), no_finding=False, complete=False, revision=0):
    with S.begin() as s:
        return save_read(s, image_id, annotator=who, present=list(present), absent=list(absent), boxes=list(boxes),
                         no_finding=no_finding, complete=complete, expected_revision=revision).id


def _version(S, image_id):
    with S() as s:
        return image_detail(s, image_id).version


# --- the setting and the queue -------------------------------------------------------------------


def test_one_reader_by_default_keeps_todays_queue_and_save(db_sessionmaker):
    S = db_sessionmaker
    a, b = _images(S, 2, readers=1)
    with S.begin() as s:
        assert readers_per_image(s) == 1
        assert _claimed(s, ADD, annotator="dr.a") == a
        assert _claimed(s, ADD, annotator="dr.b") == b  # a is leased to dr.a: one reader at a time
        assert save_for(s, a, annotator="dr.a", present=["Nodule"], no_finding=False, boxes=[], complete=False,
                        expected_version=image_detail(s, a).version) == "weak"
        assert image_detail(s, a).labels == {"Nodule": True}
        assert s.scalars(select(Reading)).all() == [] and s.scalars(select(ReaderLease)).all() == []
        assert {row.image_id for row in s.scalars(select(Lease))} == {a, b}


@pytest.mark.parametrize("bad", [0, 11, 2.5, True, "2"])
def test_readers_per_image_must_be_a_small_whole_number(db_sessionmaker, bad):
    _images(db_sessionmaker, 1, readers=1)
    with pytest.raises(ValueError, match="whole number from 1 to 10"), db_sessionmaker.begin() as s:
        set_readers_per_image(s, bad, annotator="admin")
    with db_sessionmaker() as s:
        assert readers_per_image(s) == 1


def test_the_role_hooks_check_the_logged_in_users_account(db_sessionmaker):
    """The review writes need a reviewer (db.accounts' roles), the setting an admin, each acting under
    their own name; a system actor (``actor=None``: the command line) is trusted, as by every write."""
    from db.accounts import create_user
    from db.roles import PermissionDenied

    S = db_sessionmaker
    (image,) = _images(S, 1)
    read_a, _ = _two_reads(S, image, agree=True)
    with S.begin() as s:
        for name, role in (("dr.a", "annotator"), ("dr.rev", "reviewer"), ("dr.boss", "admin")):
            create_user(s, name, role, password="correct horse battery")
    with pytest.raises(PermissionDenied, match="dr.a .annotator. may not review reads: that needs the reviewer role"), \
            S.begin() as s:
        accept_read(s, image, read_id=read_a, reviewer="dr.a", expected_version=image_detail(s, image).version,
                    actor="dr.a")
    with pytest.raises(PermissionDenied, match="needs the admin role"), S.begin() as s:
        set_readers_per_image(s, 3, annotator="dr.rev", actor="dr.rev")
    with pytest.raises(PermissionDenied, match="own name"), S.begin() as s:
        accept_read(s, image, read_id=read_a, reviewer="dr.boss", expected_version=image_detail(s, image).version,
                    actor="dr.rev")
    with S() as s:
        assert readers_per_image(s) == 2 and review_detail(s, image)["status"] == CONSENSUS
    with S.begin() as s:
        accept_read(s, image, read_id=read_a, reviewer="dr.rev", expected_version=image_detail(s, image).version,
                    actor="dr.rev")
        set_readers_per_image(s, 3, annotator="dr.boss", actor="dr.boss")
    with S() as s:
        assert readers_per_image(s) == 3 and review_detail(s, image)["status"] == REVIEWED


def test_two_readers_queue_hands_an_image_to_two_annotators_never_twice_to_one(db_sessionmaker):
    S = db_sessionmaker
    first, second = _images(S, 2)
    with S.begin() as s:
        assert _claimed(s, ADD, annotator="dr.a") == first
        assert _claimed(s, ADD, annotator="dr.b") == first  # the second reader of the same image
        assert _claimed(s, ADD, annotator="dr.c") == second  # first has its two readers
        assert [i.image_id for i in queue(s, ADD, annotator="dr.d")] == [second]
        assert take_reader_lease(s, first, "dr.d") is False
    _read(S, first, "dr.a", present=["Nodule"])
    with S.begin() as s:
        # dr.a read it: never handed to dr.a again, whatever the lease state
        assert first not in [i.image_id for i in queue(s, ADD, annotator="dr.a")]
        assert _claimed(s, ADD, annotator="dr.a") == second
        assert take_reader_lease(s, first, "dr.d") is False  # one read + dr.b's lease fill the two places
        later = utcnow() + timedelta(hours=1)  # dr.b's lease has expired by then
        assert take_reader_lease(s, first, "dr.d", now=later) is True
        assert take_image(s, first, "dr.a") is True  # the reader may reopen their own read


def test_the_last_place_is_not_taken_twice(db_sessionmaker):
    S = db_sessionmaker
    (image,) = _images(S, 1)
    with S.begin() as s:
        assert take_reader_lease(s, image, "dr.a") and take_reader_lease(s, image, "dr.b")
    with pytest.raises(ValueError, match="already has its 2 readers"):
        _read(S, image, "dr.c", present=["Nodule"])  # without a place, a save is refused too
    with S() as s:
        assert s.scalars(select(Reading)).all() == []


def test_two_annotators_racing_for_the_last_place_get_it_once(db_sessionmaker):
    S = db_sessionmaker
    (image,) = _images(S, 1)
    _read(S, image, "dr.x", present=["Nodule"])  # one of the two places is taken
    with S.begin() as s:  # both annotators exist already (their rows are not what is raced for)
        for name in ("dr.a", "dr.b"):
            take_image(s, image, name, review=True) and release_image(s, image, name)
    holding, results = threading.Event(), {}

    def first():
        with S.begin() as s:
            results["a"] = take_reader_lease(s, image, "dr.a")
            holding.set()
            time.sleep(0.5)  # still uncommitted while dr.b tries

    def second():
        holding.wait(10)
        with S.begin() as s:
            results["b"] = take_reader_lease(s, image, "dr.b")

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert results == {"a": True, "b": False}


# --- blind reads ---------------------------------------------------------------------------------


def test_reads_are_blind(db_sessionmaker):
    S = db_sessionmaker
    (image,) = _images(S, 1)
    with S.begin() as s:
        take_reader_lease(s, image, "dr.a")
        take_reader_lease(s, image, "dr.b")
    _read(S, image, "dr.a", present=["Nodule", "Mass"], absent=["Effusion"], boxes=[NODULE, MASS], complete=True)
    with S() as s:
        mine = annotation_detail(s, image, annotator="dr.a")
        theirs = annotation_detail(s, image, annotator="dr.b")
        stored = image_detail(s, image)
    assert mine.labels == {"Nodule": True, "Mass": True, "Effusion": False} and len(mine.boxes) == 2
    assert mine.granularity == "full" and mine.version == 1
    # dr.b sees nothing of dr.a's read: no labels, no boxes, no flags, no name, version 0
    assert (theirs.labels, theirs.boxes, theirs.no_finding, theirs.boxes_complete) == ({}, [], False, False)
    assert theirs.granularity == "unlabeled" and theirs.version == 0 and theirs.leased_by is None
    assert "dr.a" not in repr(theirs)
    # nor does the image itself carry it before the last read (no consensus yet)
    assert stored.labels == {} and stored.boxes == [] and stored.granularity == "unlabeled"


def test_a_stale_read_is_a_conflict(db_sessionmaker):
    S = db_sessionmaker
    (image,) = _images(S, 1, readers=3)
    _read(S, image, "dr.a", present=["Nodule"])
    with pytest.raises(ConflictError):
        _read(S, image, "dr.a", present=["Mass"], revision=0)
    _read(S, image, "dr.a", present=["Mass"], revision=1)
    with S() as s:
        assert annotation_detail(s, image, annotator="dr.a").labels == {"Mass": True}


def test_a_bad_read_saves_nothing(db_sessionmaker):
    S = db_sessionmaker
    (image,) = _images(S, 1)
    with pytest.raises(ValueError, match="unknown class"):
        _read(S, image, "dr.a", boxes=[("Cardiomegaly", 1.0, 1.0, 20.0, 20.0)])
    with pytest.raises(ValueError, match="nothing labelled"):
        _read(S, image, "dr.a")
    with S() as s:
        assert s.scalars(select(Reading)).all() == []


# --- the consensus rule --------------------------------------------------------------------------


def _r(k, *, labels=None, boxes=(), no_finding=False, complete=False):
    return Read(id=k, reader=f"r{k}", labels=labels or {}, no_finding=no_finding, complete=complete, boxes=list(boxes),
                revision=1, saved_at=utcnow())


def test_consensus_majority_labels_with_ties_present():
    rule = consensus([_r(1, labels={"Nodule": True, "Mass": False}),
                      _r(2, labels={"Nodule": False, "Mass": False, "Effusion": True}),
                      _r(3, labels={"Mass": True})], CLASSES, 64, 64)
    # Nodule 1:1 (a tie) -> present; Mass 1 present : 2 absent -> absent; Effusion 1:0 -> present
    assert rule["present"] == ["Effusion", "Nodule"] and rule["absent"] == ["Mass"]
    assert rule["boxes"] == [] and not rule["no_finding"] and not rule["complete"]
    # a class nobody assessed stays unassessed; "No finding" counts as absent for every class
    rule = consensus([_r(1, no_finding=True), _r(2, no_finding=True, complete=True), _r(3, labels={"Mass": True})],
                     CLASSES, 64, 64)
    assert rule["present"] == [] and rule["absent"] == CLASSES and rule["no_finding"]


def test_consensus_fuses_only_boxes_two_readers_agree_on():
    lone = ("Nodule", 40.0, 5.0, 55.0, 20.0)
    rule = consensus([_r(1, boxes=[NODULE, lone, MASS], complete=True), _r(2, boxes=[NODULE_B], complete=True)],
                     CLASSES, 64, 64)
    assert len(rule["boxes"]) == 1  # the lone Nodule and the Mass only one reader drew are left out
    name, *coords = rule["boxes"][0]
    assert name == "Nodule" and coords == pytest.approx([10.5, 10.0, 30.5, 30.5], abs=0.02)  # the mean (equal weights)
    # Mass is present by the tie rule but lost its box: not every present class is boxed -> not complete
    assert rule["present"] == ["Mass", "Nodule"] and not rule["complete"]
    both = consensus([_r(1, boxes=[NODULE], complete=True), _r(2, boxes=[NODULE_B], complete=True)], CLASSES, 64, 64)
    assert both["complete"] and both["present"] == ["Nodule"]
    # complete needs more than half the readers: 1 of 2 is a tie -> weak
    assert not consensus([_r(1, boxes=[NODULE], complete=True), _r(2, boxes=[NODULE_B])], CLASSES, 64, 64)["complete"]


def test_fusion_of_boxes_one_reader_drew_twice_is_not_agreement():
    twice = [NODULE, NODULE_B]
    assert fuse_boxes([twice, []], 64, 64, min_readers=2) == []
    assert len(fuse_boxes([twice, []], 64, 64, min_readers=1)) == 1
    fused = fuse_boxes([[("Nodule", 0.0, 0.0, 64.0, 64.0)], [("Nodule", 0.0, 0.0, 64.0, 64.0)]], 64, 64)
    assert fused == [("Nodule", 0.0, 0.0, 64.0, 64.0)]  # back in pixels, inside the image
    # the smallest box a save accepts stays savable on a large image (the library computes in float32)
    small = ("Nodule", 2999.37, 1000.11, 3003.37, 1004.11)
    (fused,) = fuse_boxes([[small], [small]], 4096, 4096)
    assert fused[1:] == pytest.approx(small[1:], abs=0.02)
    # a fused side a rounding left under the minimum is widened about its centre, inside the image
    assert _at_least(10.0, 13.99, 4096) == pytest.approx((9.995, 13.995))
    assert _at_least(0.0, 3.99, 64) == (0.0, 4.0) and _at_least(61.0, 64.0, 64) == (60.0, 64.0)
    assert _at_least(10.0, 20.0, 64) == (10.0, 20.0)


def test_the_last_read_writes_the_consensus_as_the_training_label(db_sessionmaker):
    S = db_sessionmaker
    (image,) = _images(S, 1)
    _read(S, image, "dr.a", present=["Nodule"], absent=["Mass"], boxes=[NODULE], complete=True)
    with S() as s:
        assert s.get(ImageReview, image) is None
    read_b = _read(S, image, "dr.b", present=["Nodule"], absent=["Mass"], boxes=[NODULE_B], complete=True)
    with S() as s:
        detail = image_detail(s, image)
        review = s.get(ImageReview, image)
        entries = s.scalars(select(AuditEntry).where(AuditEntry.image_id == image).order_by(AuditEntry.id)).all()
        assert detail.granularity == "full" and detail.labels == {"Nodule": True, "Mass": False}
        assert len(detail.boxes) == 1 and detail.boxes[0][0] == "Nodule"
        assert review.status == CONSENSUS and review.disagree is False
        assert {e.annotator.name for e in entries} == {CONSENSUS_ANNOTATOR}
        assert entries[-1].action == "consensus"
        assert json.loads(entries[-1].note)["readers"] == ["dr.a", "dr.b"]
        assert replay_audit(s, image) == entries[-1].after  # the log still replays
        # the trainer and exports read the image's label as always
        coco = export_coco(s)
        assert [a["category_id"] for a in coco["annotations"]] == [1]
    with pytest.raises(ValueError, match="has all its 2 reads"):
        _read(S, image, "dr.c", present=["Mass"])
    with pytest.raises(ValueError, match="has all its 2 reads"):
        _read(S, image, "dr.b", present=["Mass"], revision=1)
    with S() as s:
        assert [r.id for r in reads(s, image)][-1] == read_b


def test_lowering_the_setting_settles_images_with_enough_reads(db_sessionmaker):
    S = db_sessionmaker
    (image,) = _images(S, 1, readers=3)
    _read(S, image, "dr.a", present=["Nodule"])
    _read(S, image, "dr.b", present=["Nodule"])
    with S.begin() as s:
        assert set_readers_per_image(s, 2, annotator="admin") == 1
    with S() as s:
        assert s.get(ImageReview, image).status == CONSENSUS
        assert image_detail(s, image).labels == {"Nodule": True}


# --- review --------------------------------------------------------------------------------------


def _two_reads(S, image, *, agree):
    _read(S, image, "dr.a", present=["Nodule"], boxes=[NODULE], complete=True)
    if agree:
        _read(S, image, "dr.b", present=["Nodule"], boxes=[NODULE_B], complete=True)
    else:
        _read(S, image, "dr.b", present=["Mass"], boxes=[MASS], complete=True)
    with S() as s:
        return [r.id for r in reads(s, image)]


def test_review_queue_lists_finished_images_disagreement_first(db_sessionmaker):
    S = db_sessionmaker
    agreed, disputed, unfinished = _images(S, 3)
    _two_reads(S, agreed, agree=True)
    _two_reads(S, disputed, agree=False)
    _read(S, unfinished, "dr.a", present=["Nodule"])
    with S() as s:
        rows = review_queue(s)
    assert [r["image_id"] for r in rows] == [disputed, agreed]
    assert rows[0]["disagree"] and "Mass" in rows[0]["reason"] and rows[0]["box_f1"] == 0.0
    assert not rows[1]["disagree"] and rows[1]["box_f1"] == 1.0 and rows[1]["readers"] == ["dr.a", "dr.b"]


def test_review_accept_writes_the_read_as_label_with_an_audit(db_sessionmaker):
    S = db_sessionmaker
    (image,) = _images(S, 1)
    _, read_b = _two_reads(S, image, agree=False)
    with S() as s:
        before = image_detail(s, image)
    assert before.labels == {"Nodule": True, "Mass": True} and before.boxes == []  # the tie rule, no agreed box
    with pytest.raises(ConflictError), S.begin() as s:
        accept_read(s, image, read_id=read_b, reviewer="dr.rev", expected_version=before.version - 1)
    with S.begin() as s:
        accept_read(s, image, read_id=read_b, reviewer="dr.rev", expected_version=before.version)
    with S() as s:
        detail = image_detail(s, image)
        assert detail.labels == {"Mass": True} and detail.boxes == [MASS] and detail.granularity == "full"
        review = s.get(ImageReview, image)
        assert review.status == REVIEWED and review.sources == {"reads": [read_b], "readers": ["dr.b"]}
        last = s.scalars(select(AuditEntry).where(AuditEntry.image_id == image).order_by(AuditEntry.id.desc())).first()
        assert (last.action, last.annotator.name) == ("review_accept", "dr.rev")
        assert json.loads(last.note) == {"reads": [read_b], "readers": ["dr.b"]}
        assert {e.annotator.name for e in s.scalars(select(AuditEntry).where(AuditEntry.image_id == image,
                                                                             AuditEntry.action == "set_boxes"))} == {"dr.rev"}
        assert replay_audit(s, image) == last.after
        assert review_queue(s) == []  # reviewed: out of the queue


def test_review_merge_fuses_every_box(db_sessionmaker):
    S = db_sessionmaker
    (image,) = _images(S, 1)
    ids = _two_reads(S, image, agree=False)
    with S.begin() as s:
        merge_reads(s, image, reviewer="dr.rev", expected_version=image_detail(s, image).version)
    with S() as s:
        detail = image_detail(s, image)
        assert [b[0] for b in detail.boxes] == ["Mass", "Nodule"]  # one reader's box each, kept by the merge
        assert detail.labels == {"Nodule": True, "Mass": True} and detail.granularity == "full"
        assert s.get(ImageReview, image).sources["reads"] == ids
        assert review_detail(s, image)["status"] == REVIEWED
    with pytest.raises(ValueError, match="are not all reads"), S.begin() as s:
        merge_reads(s, image, reviewer="dr.rev", expected_version=image_detail(s, image).version, read_ids=[999])


def test_review_edit_is_the_reviewers_own_label(db_sessionmaker):
    S = db_sessionmaker
    image, unfinished = _images(S, 2)
    _two_reads(S, image, agree=False)
    with S.begin() as s:
        assert take_image(s, image, "dr.rev", review=True)  # the reviewer's edit takes the image's own lease
        save_for(s, image, annotator="dr.rev", review=True, present=[], absent=CLASSES, no_finding=True, boxes=[],
                 complete=True, expected_version=image_detail(s, image).version)
    with S() as s:
        detail = image_detail(s, image)
        assert detail.no_finding and detail.boxes == [] and detail.granularity == "full"
        last = s.scalars(select(AuditEntry).where(AuditEntry.image_id == image).order_by(AuditEntry.id.desc())).first()
        assert (last.action, last.annotator.name) == ("review_edit", "dr.rev")
    with pytest.raises(ValueError, match="nothing to review"), S.begin() as s:
        save_for(s, unfinished, annotator="dr.rev", review=True, present=["Nodule"], no_finding=False, boxes=[],
                 complete=False, expected_version=image_detail(s, unfinished).version)


def test_review_refuses_a_reserved_name(db_sessionmaker):
    S = db_sessionmaker
    (image,) = _images(S, 1)
    read_a, _ = _two_reads(S, image, agree=True)
    with pytest.raises(ValueError, match="reserved"), S.begin() as s:
        accept_read(s, image, read_id=read_a, reviewer="trainer", expected_version=image_detail(s, image).version)
    with S() as s:
        assert s.get(ImageReview, image).status == CONSENSUS


# --- agreement -----------------------------------------------------------------------------------


def test_project_agreement(db_sessionmaker):
    S = db_sessionmaker
    images = _images(S, 4)
    # Nodule: a and b agree on 3 of 4 images (1,1,0 / 1,0,0 pattern below); Mass: always absent for both
    answers = [(True, True), (True, False), (False, False), (False, False)]
    for image, (a, b) in zip(images, answers):
        _read(S, image, "dr.a", present=["Nodule"] if a else [], absent=["Mass"] + ([] if a else ["Nodule"]),
              boxes=[NODULE] if a else [])
        _read(S, image, "dr.b", present=["Nodule"] if b else [], absent=["Mass"] + ([] if b else ["Nodule"]),
              boxes=[NODULE_B] if b else [])
    with S() as s:
        result = project_agreement(s)
    rows = {r["class"]: r for r in result["per_class"]}
    # Cohen: p_o = 3/4, p_a = 1/2, p_b = 1/4, p_e = 1/8 + 3/8 = 1/2 -> kappa = 0.5
    assert rows["Nodule"]["cohen_kappa"] == pytest.approx(0.5)
    # Fleiss: P_bar = 3/4, p_present = 3/8, P_e = 9/64 + 25/64 = 34/64 -> (48/64 - 34/64) / (30/64) = 14/30
    assert rows["Nodule"]["fleiss_kappa"] == pytest.approx(14 / 30)
    assert rows["Mass"]["cohen_kappa"] is None and rows["Mass"]["fleiss_kappa"] is None  # constant: undefined
    assert rows["Effusion"]["cohen_kappa"] is None  # never assessed
    assert rows["Nodule"]["box_f1"] == pytest.approx(2 * 1 / 3) and rows["Mass"]["box_f1"] is None
    assert result["box_f1"] == pytest.approx(2 / 3) and result["images"] == 4 and result["disagree"] == 1
