"""The granularity lifecycle: annotation edits with a version check, derived granularity and an audit trail.

An image is ``unlabeled`` until image-level labels (or "No Finding") are set, then ``weak``; it becomes
``full`` when an annotator marks its boxes complete (a "No Finding" image confirmed with zero boxes is
full). A box implies the image-level label of its class. Nothing here lowers the granularity except
:func:`downgrade`, which needs a reason and is logged like every other edit.

Each edit function loads the image, refuses the save with :class:`ConflictError` when the image changed
since the caller loaded it (``expected_version``), applies the change, re-derives the granularity,
appends an :class:`~db.models.AuditEntry` holding the state before and after, and flushes. The caller
owns the transaction::

    with Session.begin() as session:
        set_image_labels(session, image_id, {"Nodule": True}, annotator="dr.lee", expected_version=3)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy import case, exists, or_, select
from sqlalchemy.orm import Session, selectinload
from sqlalchemy.orm.exc import StaleDataError

from db.models import Annotator, AuditEntry, Box, Granularity, Image, ImageLabel, LabelClass, utcnow
from db.people import get_annotator
from oxnet.data.annotation import BoxInput, annotation_problems

#: The annotation state of an image that has never been labelled.
EMPTY_STATE: dict[str, Any] = {"labels": {}, "no_finding": False, "boxes_complete": False, "boxes": []}


class ConflictError(RuntimeError):
    """The image was saved by someone else after the caller loaded it; reload and redo the edit."""

    def __init__(self, image_id: int, expected: int | None, actual: int | None) -> None:
        now = f"version {actual}" if actual is not None else "a newer version"
        super().__init__(
            f"image {image_id} was changed by someone else (you edited version {expected}, the store has "
            f"{now}); reload the image and apply your change again - nothing was saved"
        )
        self.image_id, self.expected, self.actual = image_id, expected, actual


class AuditError(RuntimeError):
    """The audit log of an image does not replay (an entry's ``before`` differs from the previous ``after``)."""


def derive_granularity(*, boxes_complete: bool, no_finding: bool, has_labels: bool, has_boxes: bool) -> Granularity:
    """The granularity implied by an image's annotation facts (the single rule the store follows)."""
    if boxes_complete:
        return Granularity.FULL
    if no_finding or has_labels or has_boxes:
        return Granularity.WEAK
    return Granularity.UNLABELED


def state_granularity(state: Mapping[str, Any]) -> Granularity:
    """:func:`derive_granularity` of a state dict as returned by :func:`image_state`."""
    return derive_granularity(
        boxes_complete=state["boxes_complete"],
        no_finding=state["no_finding"],
        has_labels=bool(state["labels"]),
        has_boxes=bool(state["boxes"]),
    )


def box_state(name: str, x1: float, y1: float, x2: float, y2: float, annotator: str) -> list:
    """One box as it appears in a state: ``[class, x1, y1, x2, y2, annotator]``."""
    return [name, float(x1), float(y1), float(x2), float(y2), annotator]


def make_state(
    labels: Mapping[str, bool], no_finding: bool, boxes_complete: bool, boxes: Sequence[Sequence[Any]]
) -> dict[str, Any]:
    """The canonical (sorted, JSON-ready) annotation state; boxes as :func:`box_state` lists."""
    return {
        "labels": {name: bool(labels[name]) for name in sorted(labels)},
        "no_finding": bool(no_finding),
        "boxes_complete": bool(boxes_complete),
        "boxes": sorted(list(b) for b in boxes),
    }


def image_state(image: Image) -> dict[str, Any]:
    """The annotation state of a loaded image: what the audit log records before and after each edit."""
    return make_state(
        {label.label_class.name: label.present for label in image.labels},
        image.no_finding,
        image.boxes_complete,
        [box_state(b.label_class.name, b.x1, b.y1, b.x2, b.y2, b.annotator.name) for b in image.boxes],
    )


def _load(session: Session, image_id: int, expected_version: int | None) -> Image:
    image = session.scalars(
        select(Image)
        .where(Image.id == image_id)
        .options(selectinload(Image.labels), selectinload(Image.boxes))
        .execution_options(populate_existing=True)
    ).one_or_none()
    if image is None:
        raise ValueError(f"no image with id {image_id}")
    if expected_version is not None and image.version != expected_version:
        raise ConflictError(image_id, expected_version, image.version)
    return image


def _classes(session: Session, image: Image) -> dict[str, LabelClass]:
    return {c.name: c for c in session.scalars(select(LabelClass).where(LabelClass.project_id == image.project_id))}


def _check_class(name: str, classes: Mapping[str, LabelClass], image: Image) -> LabelClass:
    try:
        return classes[name]
    except KeyError:
        raise ValueError(f"image {image.id}: unknown class {name!r}; the project's classes are {sorted(classes)}") from None


def _save(session: Session, image: Image, before: dict[str, Any], who: Annotator, action: str, note: str | None) -> Image:
    """Re-derive the granularity, append the audit entry and flush (the version check runs here)."""
    after = image_state(image)
    image.granularity = state_granularity(after)
    image.updated_at = utcnow()
    image_id, expected = image.id, image.version
    session.add(AuditEntry(annotator=who, image_id=image_id, action=action, note=note, before=before, after=after))
    try:
        session.flush()
    except StaleDataError:  # another writer saved between our load and this flush
        raise ConflictError(image_id, expected, None) from None
    return image


def _set_label(image: Image, cls: LabelClass, present: bool, who: Annotator) -> None:
    for label in image.labels:
        if label.class_id == cls.id:
            label.present = present
            return
    image.labels.append(ImageLabel(class_id=cls.id, label_class=cls, present=present, annotator=who))


def set_image_labels(
    session: Session,
    image_id: int,
    labels: Mapping[str, bool],
    *,
    annotator: str,
    expected_version: int | None = None,
    no_finding: bool = False,
) -> Image:
    """Replace the image-level labels: ``labels`` maps class names to present (True) or absent (False).

    Classes left out become unknown, except classes with boxes, which stay present (a box implies its
    label). ``no_finding=True`` marks the image explicitly negative and allows no present class and no
    box. Raises ValueError for an unknown class, a contradiction, or an edit that would remove every
    label (that is a downgrade: use :func:`downgrade`), and :class:`ConflictError` on a stale version.
    """
    image = _load(session, image_id, expected_version)
    classes = _classes(session, image)
    for name in labels:
        _check_class(name, classes, image)
    boxed = {b.label_class.name for b in image.boxes}
    contradicted = sorted(name for name in boxed if labels.get(name) is False)
    if contradicted:
        raise ValueError(f"image {image_id}: {contradicted} cannot be absent, the image has boxes of them")
    if no_finding and (boxed or any(labels.values())):
        raise ValueError(f"image {image_id}: 'No Finding' together with findings {sorted(boxed | {n for n, p in labels.items() if p})}")
    wanted = {**labels, **{name: True for name in boxed}}
    if not wanted and not no_finding and image.granularity != Granularity.UNLABELED:
        raise ValueError(f"image {image_id}: removing every label downgrades it; use downgrade() with a reason")
    who = get_annotator(session, annotator)
    before = image_state(image)
    image.labels[:] = [label for label in image.labels if label.label_class.name in wanted]
    for name, present in wanted.items():
        _set_label(image, classes[name], present, who)
    image.no_finding = no_finding
    return _save(session, image, before, who, "set_labels", None)


def set_boxes(
    session: Session,
    image_id: int,
    boxes: Sequence[BoxInput],
    *,
    annotator: str,
    expected_version: int | None = None,
    complete: bool = False,
) -> Image:
    """Replace the image's boxes with ``boxes`` ((class, x1, y1, x2, y2), original pixels).

    Boxes equal to existing ones keep their original annotator; new ones are ``annotator``'s. The class
    of every box becomes a present image-level label. ``complete=True`` also marks the boxes complete
    (weak -> full); ``complete=False`` leaves that mark as it was. Raises ValueError for an unknown
    class, a box outside the image or inverted, boxes on a "No Finding" image, or completing an image
    with no labels at all; :class:`ConflictError` on a stale version.
    """
    image = _load(session, image_id, expected_version)
    classes = _classes(session, image)
    problems = annotation_problems(boxes, classes=classes, width=image.width, height=image.height,
                                   absent={lb.label_class.name for lb in image.labels if not lb.present},
                                   no_finding=image.no_finding)
    kinds = {p.kind: p for p in reversed(problems)}  # the first problem of each kind
    for problem in problems:
        if problem.kind in ("no_class", "unknown_class"):
            _check_class(problem.names[0], classes, image)
        if problem.kind == "box":
            raise ValueError(f"image {image_id}, class {problem.names[0]!r}: {problem.reason}")
    if "no_finding_with_findings" in kinds:
        raise ValueError(f"image {image_id} is marked 'No Finding'; clear that before drawing boxes")
    if "absent_and_present" in kinds:
        absent = list(kinds["absent_and_present"].names)
        raise ValueError(f"image {image_id}: {absent} are labelled absent; set them present before drawing boxes")
    if complete and not (boxes or image.labels or image.no_finding):
        raise ValueError(f"image {image_id} has no image-level labels; set them (or 'No Finding') before marking boxes complete")
    before = image_state(image)
    existing: dict[tuple, list[Box]] = {}
    for box in image.boxes:
        existing.setdefault((box.label_class.name, box.x1, box.y1, box.x2, box.y2), []).append(box)
    who = get_annotator(session, annotator)
    kept: list[Box] = []
    for name, x1, y1, x2, y2 in boxes:
        key = (name, float(x1), float(y1), float(x2), float(y2))
        if existing.get(key):
            kept.append(existing[key].pop())
        else:
            cls = classes[name]
            kept.append(Box(class_id=cls.id, label_class=cls, x1=key[1], y1=key[2], x2=key[3], y2=key[4], annotator=who))
    image.boxes[:] = kept
    for name in {name for name, *_ in boxes}:
        _set_label(image, classes[name], True, who)
    if complete:
        image.boxes_complete = True
    return _save(session, image, before, who, "set_boxes", None)


def mark_boxes_complete(
    session: Session, image_id: int, *, annotator: str, expected_version: int | None = None
) -> Image:
    """Confirm that the image's boxes are all there is (weak -> full; zero boxes = no lesion)."""
    image = _load(session, image_id, expected_version)
    if image.boxes_complete:
        raise ValueError(f"image {image_id} is already full")
    if not (image.labels or image.no_finding or image.boxes):
        raise ValueError(f"image {image_id} has no image-level labels; set them (or 'No Finding') first")
    who = get_annotator(session, annotator)
    before = image_state(image)
    image.boxes_complete = True
    return _save(session, image, before, who, "mark_complete", None)


def downgrade(
    session: Session,
    image_id: int,
    to: Granularity | str,
    *,
    annotator: str,
    reason: str,
    expected_version: int | None = None,
) -> Image:
    """Lower an image's granularity on purpose, with a reason in the audit log.

    ``to="weak"``: the boxes stay but are no longer complete. ``to="unlabeled"``: labels, "No Finding"
    and boxes are removed (the audit log keeps them in ``before``).
    """
    to = Granularity(to)
    if not reason or not reason.strip():
        raise ValueError("downgrade needs a reason for the audit log")
    image = _load(session, image_id, expected_version)
    if to.rank >= image.granularity.rank:
        raise ValueError(f"image {image_id} is {image.granularity.value}; {to.value} is not a downgrade")
    who = get_annotator(session, annotator)
    before = image_state(image)
    image.boxes_complete = False
    if to is Granularity.UNLABELED:
        image.labels[:] = []
        image.boxes[:] = []
        image.no_finding = False
    return _save(session, image, before, who, "downgrade", reason)


def replay_audit(session: Session, image_id: int) -> dict[str, Any]:
    """The state obtained by replaying the image's audit log from the empty state.

    Raises :class:`AuditError` when an entry does not start where the previous one ended.
    """
    state = EMPTY_STATE
    entries = session.scalars(select(AuditEntry).where(AuditEntry.image_id == image_id).order_by(AuditEntry.id))
    for entry in entries:
        if entry.before != state:
            raise AuditError(f"image {image_id}: audit entry {entry.id} ({entry.action}) does not follow the previous one")
        if entry.after is None:
            raise AuditError(f"image {image_id}: audit entry {entry.id} ({entry.action}) records no resulting state")
        state = entry.after
    return state


def granularity_mismatches(session: Session) -> list[int]:
    """Ids of images whose stored granularity differs from the one derived from their rows (should be [])."""
    has_label = exists().where(ImageLabel.image_id == Image.id)
    has_box = exists().where(Box.image_id == Image.id)
    derived = case(
        (Image.boxes_complete, Granularity.FULL.value),
        (or_(Image.no_finding, has_label, has_box), Granularity.WEAK.value),
        else_=Granularity.UNLABELED.value,
    )
    return list(session.scalars(select(Image.id).where(Image.granularity != derived).order_by(Image.id)))
