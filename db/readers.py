"""Several readers per image: blind reads, their consensus, agreement and a reviewer's adjudication.

A project's ``readers_per_image`` (N, default 1) says how many different annotators read each image.
With N = 1 nothing here is used: the queue, leases and saves are the single-reader ones of
:mod:`db.service` and :mod:`db.queue`. With N > 1:

- **Blind reads.** The queue hands an image to up to N different annotators at once (a
  :class:`~db.models.ReaderLease` each) and never to one who already read it. Each reader's save is
  their own :class:`~db.models.Reading` (labels, "No finding", boxes, complete); their draft is their
  own already (drafts belong to (annotator, image)). A reader's Annotate page shows only their own
  read (:func:`annotation_detail`), nothing of the other readers nor of the image's stored label.
- **Consensus.** When the N-th read is saved, :func:`consensus` of the N reads is written as the
  image's label through the normal save (:func:`db.service.save_annotation`, audited as
  :data:`CONSENSUS_ANNOTATOR` with the reads it came from) and the image is marked "consensus, not
  reviewed" (:class:`~db.models.ImageReview`). Training and exports read the image's label as always,
  so until a review they learn from the consensus. The rule:

  * a class is present when at least half of the readers who assessed it say present (a tie counts as
    present: a missed finding is the costlier error), absent when more say absent, not assessed when
    nobody assessed it; a reader's box makes its class present, "No finding" makes every class absent;
  * boxes: per class, the boxes that at least two readers agree on (a box of another reader at IoU >=
    0.4) are fused with weighted box fusion (``ensemble_boxes.weighted_boxes_fusion``, every box weight 1,
    IoU 0.4), and a fused box is kept only when it joins boxes of two readers or more;
  * "No finding" when no class is present and more than half of the readers said "No finding";
  * "all lesions boxed" (full) when more than half of the readers said so and every present class kept
    a fused box; otherwise the image is weak.
- **Review.** Images whose N reads are in wait for a reviewer, those where readers disagree first
  (:func:`review_queue`). A reviewer accepts one read (:func:`accept_read`), merges the reads' boxes
  by weighted box fusion (:func:`merge_reads`: every box, no agreement needed) or edits the label in
  Annotate (:func:`save_for` with ``review=True``). The result replaces the consensus as the image's
  label, audited with the reviewer's name and the source reads, and the image is "reviewed".
- Once an image has its N reads, reads can no longer change; only a reviewer changes its label.

Reviewer rights go through :func:`require_reviewer` and the setting through :func:`require_admin`: the
accounts' role check (:func:`db.roles.check_actor`) of the logged-in user passed as ``actor``.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from itertools import combinations
from typing import Any, cast

import numpy as np
from sqlalchemy import and_, delete, exists, func, select, update
from sqlalchemy.engine import CursorResult
from sqlalchemy.orm import Session

from db.agreement import BOX_IOU, box_matches, cohen_kappa, fleiss_kappa, iou_matrix, mean_pairwise_box_f1
from db.lifecycle import BoxInput, ConflictError, derive_granularity, image_state
from db.models import Annotator, AuditEntry, Image, ImageReview, LabelClass, Project, ReaderLease, Reading, Role, utcnow
from db.engine import insert_ignore
from db.people import annotator_name, get_annotator, log_event
from db.projects import DEFAULT_PROJECT, get_project
from db.queue import DEFAULT_LEASE, release_lease, take_lease
from db.roles import check_actor
from db.service import MIN_BOX_PX, ImageDetail, image_detail, save_annotation, validate_annotation

#: Who the consensus label is attributed to (a system writer: names with ":" are not a person's).
CONSENSUS_ANNOTATOR = "consensus:readers"
#: ``ImageReview.status`` values.
CONSENSUS, REVIEWED = "consensus", "reviewed"
#: The largest readers-per-image setting accepted.
MAX_READERS = 10
#: Audit actions of this module.
SETTING_ACTION, CONSENSUS_ACTION = "set_readers_per_image", "consensus"
ACCEPT_ACTION, MERGE_ACTION, EDIT_ACTION = "review_accept", "review_merge", "review_edit"


# --- the role check ------------------------------------------------------------------------------


def _require_role(session: Session, name: str, role: Role | str, *, actor: str | None, action: str) -> str:
    """``name`` (a valid person's name; a reserved or malformed one raises ValueError) when it may act
    as ``role``: a system actor (``actor`` None: the command line, scripts) is trusted as every write
    function trusts it; a logged-in user (``actor``) must hold ``role``
    (:func:`db.accounts.require_role`) and act under their own name, else
    :class:`~db.roles.PermissionDenied` (:func:`db.roles.check_actor`)."""
    name = annotator_name(name)
    check_actor(session, actor, role, action=action, annotator=name)
    return name


def require_reviewer(session: Session, name: str, *, actor: str | None = None) -> str:
    """The reviewer's name when ``name`` may adjudicate reads (every review write calls this first)."""
    return _require_role(session, name, Role.REVIEWER, actor=actor, action="review reads")


def require_admin(session: Session, name: str, *, actor: str | None = None) -> str:
    """The admin's name when ``name`` may change the project's readers-per-image setting."""
    return _require_role(session, name, Role.ADMIN, actor=actor, action="change the readers per image")


# --- the setting ---------------------------------------------------------------------------------


def readers_per_image(session: Session, project: str = DEFAULT_PROJECT) -> int:
    """The project's readers-per-image setting (1: one reader, today's behaviour)."""
    return int(get_project(session, project).readers_per_image or 1)


def _image_readers(session: Session, image_id: int) -> int:
    n = session.execute(
        select(Project.readers_per_image).join(Image, Image.project_id == Project.id).where(Image.id == image_id)
    ).scalar()
    if n is None:
        raise ValueError(f"no image with id {image_id}")
    return int(n or 1)


def set_readers_per_image(session: Session, n: int, *, annotator: str, project: str = DEFAULT_PROJECT,
                          actor: str | None = None) -> int:
    """Set how many readers read each image (1 to :data:`MAX_READERS`), audited.

    Images that already have ``n`` reads or more and no consensus yet (the setting was lowered) get
    their consensus now. Returns how many did. ValueError for a bad ``n``.
    """
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_READERS:
        raise ValueError(f"readers per image must be a whole number from 1 to {MAX_READERS}, got {n!r}")
    annotator = require_admin(session, annotator, actor=actor)
    row = get_project(session, project)
    before = row.readers_per_image
    row.readers_per_image = n
    session.flush()
    log_event(session, annotator, SETTING_ACTION, {"project": project, "readers_per_image": n, "before": before})
    if n == 1:
        return 0
    reads = select(func.count()).where(Reading.image_id == Image.id).scalar_subquery()
    waiting = session.scalars(
        select(Image.id).where(Image.project_id == row.id, reads >= n,
                               ~exists().where(ImageReview.image_id == Image.id)).order_by(Image.id)
    ).all()
    for image_id in waiting:
        write_consensus(session, image_id)
    return len(waiting)


# --- reads ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Read:
    """One reader's read as the review shows it. ``boxes``: (class, x1, y1, x2, y2), original pixels."""

    id: int
    reader: str
    labels: dict[str, bool]
    no_finding: bool
    complete: bool
    boxes: list[tuple[str, float, float, float, float]]
    revision: int
    saved_at: datetime

    def present(self) -> set[str]:
        """The classes this reader says are present (ticked or boxed)."""
        return {n for n, p in self.labels.items() if p} | {b[0] for b in self.boxes}


def _read(row: Reading) -> Read:
    return Read(id=row.id, reader=row.annotator.name, labels={str(k): bool(v) for k, v in (row.labels or {}).items()},
                no_finding=bool(row.no_finding), complete=bool(row.complete),
                boxes=[(str(b[0]), float(b[1]), float(b[2]), float(b[3]), float(b[4])) for b in row.boxes or []],
                revision=row.revision, saved_at=row.saved_at)


def reads(session: Session, image_id: int) -> list[Read]:
    """Every saved read of the image, in the order they were first saved."""
    rows = session.scalars(select(Reading).where(Reading.image_id == image_id).order_by(Reading.id)
                           .execution_options(populate_existing=True))
    return [_read(r) for r in rows]


def _own_reading(session: Session, image_id: int, who: int) -> Reading | None:
    return session.scalars(select(Reading).where(Reading.image_id == image_id, Reading.annotator_id == who)
                           .execution_options(populate_existing=True)).one_or_none()


# --- leases and the queue ------------------------------------------------------------------------


def open_to_reader(who: int, n: int, now: datetime):
    """SQL condition on ``Image``: annotator ``who`` may read it (has no read of it, and its reads plus
    other readers' unexpired leases leave a place among the ``n``). Used by :func:`db.queue.queue`."""
    done = select(func.count()).where(Reading.image_id == Image.id).scalar_subquery()
    held = (select(func.count()).where(ReaderLease.image_id == Image.id, ReaderLease.annotator_id != who,
                                       ReaderLease.expires_at > now).scalar_subquery())
    return and_(~exists().where(Reading.image_id == Image.id, Reading.annotator_id == who), done + held < n)


def take_reader_lease(
    session: Session, image_id: int, annotator: str, *, ttl: timedelta = DEFAULT_LEASE, now: datetime | None = None,
    actor: str | None = None,
) -> bool:
    """Hand the image to ``annotator`` as one of its readers until now + ``ttl``; True when they may read it.

    True also when they already read it (they see and, while reads are missing, edit their own read);
    False when its N places are taken by reads and other readers' unexpired leases. The image row is
    locked (``FOR UPDATE`` on PostgreSQL; SQLite has one writer at a time) so two annotators cannot
    both take the last place.
    """
    check_actor(session, actor, Role.ANNOTATOR, action="take an image", annotator=annotator)
    if session.execute(select(Image.id).where(Image.id == image_id).with_for_update()).first() is None:
        raise ValueError(f"no image with id {image_id}")
    now = now or utcnow()
    n = _image_readers(session, image_id)
    who = get_annotator(session, annotator).id  # on SQLite its INSERT takes the write lock before the counts below
    if _own_reading(session, image_id, who) is not None:
        return True
    done = session.scalars(select(func.count()).where(Reading.image_id == image_id)).one()
    held = session.scalars(select(func.count()).where(ReaderLease.image_id == image_id, ReaderLease.annotator_id != who,
                                                      ReaderLease.expires_at > now)).one()
    if done + held >= n:
        return False
    extended = cast(CursorResult[Any], session.execute(
        update(ReaderLease).where(ReaderLease.image_id == image_id, ReaderLease.annotator_id == who)
        .values(taken_at=now, expires_at=now + ttl).execution_options(synchronize_session=False)
    ))
    if not extended.rowcount:
        insert_ignore(session, ReaderLease.__table__, {"image_id": image_id, "annotator_id": who, "taken_at": now,
                                                         "expires_at": now + ttl}, key=["image_id", "annotator_id"])
    return True


def release_reader_lease(session: Session, image_id: int, annotator: str, *, actor: str | None = None) -> bool:
    """Give back ``annotator``'s reader lease of the image; True when there was one."""
    check_actor(session, actor, Role.ANNOTATOR, action="give an image back", annotator=annotator)
    who = get_annotator(session, annotator).id
    deleted = cast(CursorResult[Any], session.execute(
        delete(ReaderLease).where(ReaderLease.image_id == image_id, ReaderLease.annotator_id == who)))
    return bool(deleted.rowcount)


# --- what the Annotate page calls ----------------------------------------------------------------


def take_image(session: Session, image_id: int, annotator: str, *, review: bool = False,
               actor: str | None = None) -> bool:
    """The lease the Annotate page takes: a reader lease with several readers, else (and for a
    reviewer's edit, which needs the reviewer role) the single :func:`db.queue.take_lease`."""
    if review:
        require_reviewer(session, annotator, actor=actor)
    if not review and _image_readers(session, image_id) > 1:
        return take_reader_lease(session, image_id, annotator, actor=actor)
    return take_lease(session, image_id, annotator, actor=actor)


def release_image(session: Session, image_id: int, annotator: str, *, actor: str | None = None) -> bool:
    """Give back whichever lease ``annotator`` holds on the image."""
    return (release_lease(session, image_id, annotator, actor=actor)
            | release_reader_lease(session, image_id, annotator, actor=actor))


def annotation_detail(session: Session, image_id: int, *, annotator: str, review: bool = False) -> ImageDetail:
    """What the Annotate page edits: the image's label (one reader, or a reviewer's edit), or with
    several readers the annotator's own read only (empty before they saved one), versioned by its
    revision (0 before the first save) and naming no other reader."""
    detail = image_detail(session, image_id, annotator=annotator)
    if review or _image_readers(session, image_id) == 1:
        return detail
    who = session.execute(select(Annotator.id).where(Annotator.name == annotator_name(annotator, person=False))).scalar()
    own = _own_reading(session, image_id, who) if who is not None else None
    read = _read(own) if own is not None else None
    labels = read.labels if read else {}
    boxes = sorted(read.boxes) if read else []
    no_finding, complete = (read.no_finding, read.complete) if read else (False, False)
    granularity = derive_granularity(boxes_complete=complete, no_finding=no_finding, has_labels=bool(labels),
                                     has_boxes=bool(boxes))
    return ImageDetail(
        id=detail.id, path=detail.path, width=detail.width, height=detail.height, version=read.revision if read else 0,
        granularity=granularity.value, split=detail.split, file_status=detail.file_status, no_finding=no_finding,
        boxes_complete=complete, labels=labels, boxes=boxes, classes=detail.classes, leased_by=None,
    )


def save_for(
    session: Session,
    image_id: int,
    *,
    annotator: str,
    present: Collection[str],
    no_finding: bool,
    boxes: Sequence[BoxInput],
    complete: bool,
    expected_version: int,
    absent: Collection[str] = (),
    review: bool = False,
    actor: str | None = None,
) -> str:
    """The Annotate page's save; returns the granularity to report.

    One reader: :func:`db.service.save_annotation`, unchanged. Several readers: the annotator's read
    (:func:`save_read`; the granularity of their read). ``review=True``: a reviewer's edit of the
    image's label (:func:`review_edit`).
    """
    annotation: dict[str, Any] = {"present": present, "no_finding": no_finding, "boxes": boxes, "complete": complete, "absent": absent}
    if review:
        return review_edit(session, image_id, reviewer=annotator, expected_version=expected_version, actor=actor,
                           **annotation).granularity.value
    if _image_readers(session, image_id) == 1:
        return save_annotation(session, image_id, annotator=annotator, expected_version=expected_version, actor=actor,
                               **annotation).granularity.value
    save_read(session, image_id, annotator=annotator, expected_revision=expected_version, actor=actor, **annotation)
    return annotation_detail(session, image_id, annotator=annotator).granularity


def save_read(
    session: Session,
    image_id: int,
    *,
    annotator: str,
    present: Collection[str],
    no_finding: bool,
    boxes: Sequence[BoxInput],
    complete: bool,
    expected_revision: int,
    absent: Collection[str] = (),
    actor: str | None = None,
) -> Reading:
    """Save ``annotator``'s own read of the image (checked as an annotation is), or nothing.

    ``expected_revision``: the revision the reader edited (0 for a first read); a different one raises
    :class:`~db.lifecycle.ConflictError`. ValueError: a bad annotation, a project with one reader, an
    image whose N reads are in (reads no longer change), or one whose places are taken by others. The
    N-th read writes the consensus (:func:`write_consensus`) in the same transaction.
    """
    check_actor(session, actor, Role.ANNOTATOR, action="save annotations", annotator=annotator)
    n = _image_readers(session, image_id)
    if n == 1:
        raise ValueError(f"image {image_id}'s project has one reader per image: save the annotation itself")
    detail = image_detail(session, image_id)
    problems = validate_annotation(detail.classes, present, no_finding, boxes, detail.width, detail.height,
                                   complete=complete, absent=absent)
    if problems:
        raise ValueError("; ".join(problems))
    session.execute(select(Image.id).where(Image.id == image_id).with_for_update())
    who = get_annotator(session, annotator)
    own = _own_reading(session, image_id, who.id)
    done = session.scalars(select(func.count()).where(Reading.image_id == image_id)).one()
    if done >= n:
        raise ValueError(f"image {image_id} has all its {n} reads: they no longer change; a reviewer resolves it")
    if (own.revision if own else 0) != expected_revision:
        raise ConflictError(image_id, expected_revision, own.revision if own else 0)
    if own is None:
        held = session.scalars(select(func.count()).where(ReaderLease.image_id == image_id, ReaderLease.annotator_id != who.id,
                                                          ReaderLease.expires_at > utcnow())).one()
        if done + held >= n:
            raise ValueError(f"image {image_id} already has its {n} readers; take another image from the queue")
    new_boxes = sorted([str(c), float(a), float(b), float(d), float(e)] for c, a, b, d, e in boxes)
    boxed = {b[0] for b in new_boxes}
    labels = {name: name in present or name in boxed for name in detail.classes
              if name in present or name in boxed or name in absent}
    if own is None:
        own = Reading(image_id=image_id, annotator=who, labels=labels, no_finding=bool(no_finding),
                      complete=bool(complete), boxes=new_boxes, revision=1, saved_at=utcnow())
        session.add(own)
    else:
        own.labels, own.no_finding, own.complete, own.boxes = labels, bool(no_finding), bool(complete), new_boxes
        own.revision, own.saved_at = own.revision + 1, utcnow()
    session.flush()
    session.execute(delete(ReaderLease).where(ReaderLease.image_id == image_id, ReaderLease.annotator_id == who.id))
    if done + (1 if own.revision == 1 else 0) >= n:
        write_consensus(session, image_id)
    return own


# --- consensus and fusion ------------------------------------------------------------------------


def fuse_boxes(
    readers_boxes: Sequence[Sequence[Sequence[Any]]], width: int, height: int, *, min_readers: int = 2,
    iou: float = BOX_IOU,
) -> list[tuple[str, float, float, float, float]]:
    """Weighted box fusion (``ensemble_boxes``) of several readers' boxes, per class.

    ``readers_boxes``: one list of (class, x1, y1, x2, y2) (original pixels) per reader. With
    ``min_readers`` = 2 only boxes another reader agrees with (same class, IoU >= ``iou``) take part and
    a fused box must join at least two boxes; ``min_readers`` = 1 fuses every box. Coordinates are
    normalised to [0, 1] for the library and back, clamped to the image.
    """
    from ensemble_boxes import weighted_boxes_fusion  # numba's start-up only where fusion runs

    if min_readers not in (1, 2):
        raise ValueError(f"min_readers must be 1 or 2, got {min_readers}")
    scale = np.array([width, height, width, height], dtype=np.float64)
    fused: list[tuple[str, float, float, float, float]] = []
    names = sorted({str(b[0]) for boxes in readers_boxes for b in boxes})
    for name in names:
        per_reader = [np.array([b[1:5] for b in boxes if str(b[0]) == name], dtype=np.float64).reshape(-1, 4)
                      for boxes in readers_boxes]
        if min_readers == 2:
            kept = []
            for r, mine in enumerate(per_reader):
                others = [o for k, o in enumerate(per_reader) if k != r and len(o)]
                agree = np.zeros(len(mine), dtype=bool)
                for other in others:
                    agree |= (iou_matrix(mine, other) >= iou).any(axis=1) if len(mine) else agree
                kept.append(mine[agree])
            per_reader = kept
        lists = [(b / scale).clip(0.0, 1.0).tolist() for b in per_reader if len(b)]
        if not lists:
            continue
        boxes, scores, _ = weighted_boxes_fusion(
            lists, [[1.0] * len(b) for b in lists], [[0] * len(b) for b in lists], iou_thr=iou, skip_box_thr=0.0,
        )
        # with every score 1 a fused box's score is (boxes it joins) / (readers with boxes), capped at 1
        joined = np.rint(np.asarray(scores) * len(lists))
        for box, count in zip(np.asarray(boxes).reshape(-1, 4), joined):
            if count < min_readers:
                continue
            x1, y1, x2, y2 = (np.clip(box * scale, 0, scale)).round(2).tolist()
            # averages of boxes of at least MIN_BOX_PX are too, but for float32 rounding in the library
            x1, x2 = _at_least(x1, x2, width)
            y1, y2 = _at_least(y1, y2, height)
            fused.append((name, x1, y1, x2, y2))
    return sorted(fused)


def _at_least(low: float, high: float, side: int) -> tuple[float, float]:
    """(low, high) widened about its centre to :data:`MIN_BOX_PX` when narrower, kept inside [0, side]."""
    if high - low >= MIN_BOX_PX or side < MIN_BOX_PX:
        return low, high
    centre = min(max((low + high) / 2, MIN_BOX_PX / 2), side - MIN_BOX_PX / 2)
    return centre - MIN_BOX_PX / 2, centre + MIN_BOX_PX / 2


def consensus(image_reads: Sequence[Read], classes: Sequence[str], width: int, height: int) -> dict[str, Any]:
    """The documented rule (module docstring) for the reads of one image: ``{"present", "absent",
    "no_finding", "boxes", "complete"}`` in :func:`db.service.save_annotation`'s terms."""
    if not image_reads:
        raise ValueError("a consensus needs at least one read")
    boxes = fuse_boxes([r.boxes for r in image_reads], width, height, min_readers=2)
    present: list[str] = []
    absent: list[str] = []
    for name in classes:
        says_present = sum(1 for r in image_reads if name in r.present())
        says_absent = sum(1 for r in image_reads if name not in r.present() and (r.no_finding or r.labels.get(name) is False))
        if says_present + says_absent == 0:
            continue
        (present if says_present >= says_absent else absent).append(name)
    boxed = {b[0] for b in boxes}
    present = sorted(set(present) | boxed)
    absent = [n for n in absent if n not in boxed]
    majority = len(image_reads) / 2
    no_finding = not present and sum(r.no_finding for r in image_reads) > majority
    complete = sum(r.complete for r in image_reads) > majority and set(present) <= boxed
    return {"present": present, "absent": absent, "no_finding": no_finding, "boxes": boxes, "complete": complete}


def _sources(image_reads: Sequence[Read]) -> dict[str, Any]:
    return {"reads": [r.id for r in image_reads], "readers": [r.reader for r in image_reads]}


def _mark(session: Session, image: Image, *, who: Annotator, action: str, status: str, sources: Mapping[str, Any],
          disagree: bool | None = None) -> None:
    """Record the image's review state and append the audit entry naming the source reads (its before
    and after are the image's state, so the log still replays)."""
    state = image_state(image)
    session.add(AuditEntry(annotator=who, image_id=image.id, action=action, note=json.dumps(dict(sources)),
                           before=state, after=state))
    row = session.get(ImageReview, image.id)
    if row is None:
        row = ImageReview(image_id=image.id, status=status, disagree=bool(disagree), sources=dict(sources))
        session.add(row)
    row.status, row.sources, row.updated_at = status, dict(sources), utcnow()
    row.reviewer_id = who.id if status == REVIEWED else None
    if disagree is not None:
        row.disagree = bool(disagree)
    session.flush()


def write_consensus(session: Session, image_id: int) -> Image:
    """Write the consensus of the image's reads as its label ("consensus, not reviewed"), audited."""
    detail = image_detail(session, image_id)
    image_reads = reads(session, image_id)
    rule = consensus(image_reads, detail.classes, detail.width, detail.height)
    who = get_annotator(session, CONSENSUS_ANNOTATOR, "system")
    image = save_annotation(session, image_id, annotator=who.name, expected_version=detail.version, **rule)
    _mark(session, image, who=who, action=CONSENSUS_ACTION, status=CONSENSUS, sources=_sources(image_reads),
          disagree=image_agreement(image_reads, detail.classes)["disagree"])
    return image


# --- agreement -----------------------------------------------------------------------------------


def _ratings(image_reads: Sequence[Read], classes: Sequence[str]) -> np.ndarray:
    """[readers, classes] of 1 (present), 0 (absent: said so or "No finding") and NaN (not assessed)."""
    out = np.full((len(image_reads), len(classes)), np.nan)
    for r, read in enumerate(image_reads):
        present = read.present()
        for c, name in enumerate(classes):
            if name in present:
                out[r, c] = 1.0
            elif read.no_finding or read.labels.get(name) is False:
                out[r, c] = 0.0
    return out


def image_agreement(image_reads: Sequence[Read], classes: Sequence[str]) -> dict[str, Any]:
    """Agreement on one image: ``label_agreement`` (share of classes on which every reader gives the same
    present / absent / not assessed answer), ``box_f1`` (mean over reader pairs of the box F1 at IoU 0.4;
    1 when nobody drew a box), ``disagree`` (readers differ on which classes are present, or a box of
    one has no partner in another's) and ``classes`` (the classes they differ on)."""
    ratings = _ratings(image_reads, classes)
    same = [len({"n" if np.isnan(v) else v for v in ratings[:, c]}) == 1 for c in range(len(classes))]
    presents = [r.present() for r in image_reads]
    differ = sorted(set().union(*presents) - presents[0].intersection(*presents[1:])) if presents else []
    f1 = mean_pairwise_box_f1([r.boxes for r in image_reads])
    return {"label_agreement": float(np.mean(same)) if classes else 1.0, "box_f1": f1,
            "disagree": bool(differ) or f1 < 1.0, "classes": differ}


def project_agreement(session: Session, project: str = DEFAULT_PROJECT) -> dict[str, Any]:
    """Agreement over the project's images whose N reads are in.

    ``{"readers": N, "images": count, "per_class": [{"class", "cohen_kappa" (N = 2, first read against
    second), "fleiss_kappa", "box_f1" (pooled over images and reader pairs: 2 * matched / boxes),
    "images"}], "box_f1": pooled over every class, "disagree": images whose readers disagree}``;
    a kappa or F1 that is undefined is None (see :mod:`db.agreement`).
    """
    row = get_project(session, project)
    n = int(row.readers_per_image or 1)
    classes = list(session.scalars(select(LabelClass.name).where(LabelClass.project_id == row.id).order_by(LabelClass.ordinal)))
    image_ids = list(session.scalars(
        select(ImageReview.image_id).join(Image, Image.id == ImageReview.image_id).where(Image.project_id == row.id)
        .order_by(ImageReview.image_id)
    ))
    by_image: dict[int, list[Read]] = {i: [] for i in image_ids}
    if image_ids:
        for r in session.scalars(select(Reading).where(Reading.image_id.in_(image_ids)).order_by(Reading.id)):
            by_image[r.image_id].append(_read(r))
    full = [rs[:n] for rs in by_image.values() if len(rs) >= max(n, 2)]
    matched = {c: 0 for c in classes}
    counted = {c: 0 for c in classes}
    disagree = 0
    for rs in full:
        disagree += image_agreement(rs, classes)["disagree"]
        for a, b in combinations(rs, 2):
            for name in classes:
                ba, bb = [x for x in a.boxes if x[0] == name], [x for x in b.boxes if x[0] == name]
                matched[name] += box_matches(ba, bb)
                counted[name] += len(ba) + len(bb)
    if full:
        ratings = np.stack([_ratings(rs, classes) for rs in full])  # [images, readers, classes]
        fleiss = fleiss_kappa(ratings) if n >= 2 else np.full(len(classes), np.nan)
        cohen = cohen_kappa(ratings[:, 0], ratings[:, 1]) if n == 2 else np.full(len(classes), np.nan)
    else:
        fleiss = cohen = np.full(len(classes), np.nan)

    def number(v: float) -> float | None:
        return None if v is None or np.isnan(v) else float(v)

    per_class = [{"class": name, "cohen_kappa": number(cohen[c]), "fleiss_kappa": number(fleiss[c]),
                  "box_f1": 2 * matched[name] / counted[name] if counted[name] else None,
                  "boxes": counted[name]} for c, name in enumerate(classes)]
    total = sum(counted.values())
    return {"readers": n, "images": len(full), "per_class": per_class, "disagree": disagree,
            "box_f1": 2 * sum(matched.values()) / total if total else None}


# --- review --------------------------------------------------------------------------------------


def review_queue(session: Session, project: str = DEFAULT_PROJECT, *, limit: int = 50,
                 include_reviewed: bool = False) -> list[dict[str, Any]]:
    """Images whose N reads are in, waiting for review: those where the readers disagree first, then by
    image id. ``{"image_id", "path", "status", "disagree", "reason", "readers", "label_agreement", "box_f1"}``."""
    row = get_project(session, project)
    query = (select(Image.id, Image.path, ImageReview.status, ImageReview.disagree)
             .join(ImageReview, ImageReview.image_id == Image.id).where(Image.project_id == row.id)
             .order_by(ImageReview.disagree.desc(), Image.id).limit(limit))
    if not include_reviewed:
        query = query.where(ImageReview.status == CONSENSUS)
    classes = list(session.scalars(select(LabelClass.name).where(LabelClass.project_id == row.id).order_by(LabelClass.ordinal)))
    out = []
    for image_id, path, status, disagree in session.execute(query).all():
        image_reads = reads(session, image_id)
        agreement = image_agreement(image_reads, classes)
        reason = ("readers disagree" + (f" on {', '.join(agreement['classes'])}" if agreement["classes"] else " on boxes")
                  if disagree else "readers agree: confirm the consensus")
        out.append({"image_id": image_id, "path": path, "status": status, "disagree": bool(disagree), "reason": reason,
                    "readers": [r.reader for r in image_reads], "label_agreement": agreement["label_agreement"],
                    "box_f1": agreement["box_f1"]})
    return out


def review_detail(session: Session, image_id: int) -> dict[str, Any]:
    """What the Review page shows of an image: ``{"image": ImageDetail (its training label now),
    "reads": [Read], "status", "sources", "agreement", "consensus_rule": consensus of the reads}``."""
    detail = image_detail(session, image_id)
    image_reads = reads(session, image_id)
    row = session.get(ImageReview, image_id, populate_existing=True)
    return {"image": detail, "reads": image_reads, "status": row.status if row else None,
            "sources": dict(row.sources or {}) if row else {},
            "agreement": image_agreement(image_reads, detail.classes) if image_reads else None}


def _reviewable(session: Session, image_id: int, expected_version: int) -> tuple[ImageDetail, list[Read]]:
    detail = image_detail(session, image_id)
    if detail.version != expected_version:
        raise ConflictError(image_id, expected_version, detail.version)
    if session.get(ImageReview, image_id) is None:
        raise ValueError(f"image {image_id} has not got all its reads yet: there is nothing to review")
    return detail, reads(session, image_id)


def accept_read(session: Session, image_id: int, *, read_id: int, reviewer: str, expected_version: int,
                actor: str | None = None) -> Image:
    """A reviewer makes one reader's read the image's label (audited ``review_accept`` with the read)."""
    reviewer = require_reviewer(session, reviewer, actor=actor)
    _, image_reads = _reviewable(session, image_id, expected_version)
    chosen = next((r for r in image_reads if r.id == read_id), None)
    if chosen is None:
        raise ValueError(f"read {read_id} is not a read of image {image_id}")
    image = save_annotation(
        session, image_id, annotator=reviewer, expected_version=expected_version, present=sorted(chosen.present()),
        absent=sorted(n for n, p in chosen.labels.items() if not p), no_finding=chosen.no_finding,
        boxes=chosen.boxes, complete=chosen.complete,
    )
    _mark(session, image, who=get_annotator(session, reviewer), action=ACCEPT_ACTION, status=REVIEWED,
          sources={"reads": [chosen.id], "readers": [chosen.reader]})
    return image


def merge_reads(session: Session, image_id: int, *, reviewer: str, expected_version: int,
                read_ids: Collection[int] | None = None, actor: str | None = None) -> Image:
    """A reviewer merges reads (all by default): their boxes fused by weighted box fusion (every box,
    IoU 0.4), findings by the consensus' majority rule, "all lesions boxed" when every merged reader
    said so. Audited ``review_merge`` with the reads."""
    reviewer = require_reviewer(session, reviewer, actor=actor)
    detail, image_reads = _reviewable(session, image_id, expected_version)
    chosen = [r for r in image_reads if read_ids is None or r.id in read_ids]
    if not chosen or (read_ids is not None and len(chosen) != len(set(read_ids))):
        raise ValueError(f"reads {sorted(read_ids or [])} are not all reads of image {image_id}")
    rule = consensus(chosen, detail.classes, detail.width, detail.height)
    boxes = fuse_boxes([r.boxes for r in chosen], detail.width, detail.height, min_readers=1)
    boxed = {b[0] for b in boxes}
    present = sorted(set(rule["present"]) | boxed)
    complete = all(r.complete for r in chosen) and set(present) <= boxed
    image = save_annotation(
        session, image_id, annotator=reviewer, expected_version=expected_version, present=present,
        absent=[n for n in rule["absent"] if n not in boxed], no_finding=rule["no_finding"] and not present,
        boxes=boxes, complete=complete,
    )
    _mark(session, image, who=get_annotator(session, reviewer), action=MERGE_ACTION, status=REVIEWED,
          sources=_sources(chosen))
    return image


def review_edit(session: Session, image_id: int, *, reviewer: str, expected_version: int, actor: str | None = None,
                **annotation: Any) -> Image:
    """A reviewer's own edit of the image's label (Annotate opened from Review), audited ``review_edit``
    with every read as source. ``annotation``: :func:`db.service.save_annotation`'s fields."""
    reviewer = require_reviewer(session, reviewer, actor=actor)
    _, image_reads = _reviewable(session, image_id, expected_version)
    image = save_annotation(session, image_id, annotator=reviewer, expected_version=expected_version, **annotation)
    _mark(session, image, who=get_annotator(session, reviewer), action=EDIT_ACTION, status=REVIEWED,
          sources=_sources(image_reads))
    return image
