"""The annotation queue and its leases: an image handed to one annotator is not handed to another until
the lease expires or is given back. Each function takes a Session; the caller owns the transaction.

:func:`queue` is the one queue: the Queue and Annotate pages, the trainer's tests and the queue
benchmark (``app/benchmarks/queue.py``) all run it; :func:`claim_next` leases its top.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime, timedelta
import typing
from typing import Any

from sqlalchemy import String, cast, delete, exists, or_, select, update
from sqlalchemy.engine import CursorResult
from sqlalchemy.orm import Session

from db.engine import insert_ignore
from db.models import (
    Granularity,
    Image,
    ImageLabel,
    LabelClass,
    Lease,
    Role,
    Split,
    SuggestedAction,
    Suggestion,
    utcnow,
)
from db.people import get_annotator
from db.projects import DEFAULT_PROJECT, get_project
from db.roles import check_actor
from db.versions import serving_model_version


#: How long an image handed to an annotator stays theirs.
DEFAULT_LEASE = timedelta(minutes=30)


def take_lease(
    session: Session, image_id: int, annotator: str, *, ttl: timedelta = DEFAULT_LEASE, now: datetime | None = None,
    actor: str | None = None,
) -> bool:
    """Hand the image to ``annotator`` until now + ``ttl``. False when someone else holds an unexpired lease.

    Taking your own lease again extends it.

    Raises:
        ValueError: there is no image with id ``image_id``.
        PermissionDenied: ``actor`` (the logged-in user; None: a system actor) may not annotate, or is
            not ``annotator`` (:func:`db.roles.check_actor`).
    """
    check_actor(session, actor, Role.ANNOTATOR, action="take an image", annotator=annotator)
    if session.get(Image, image_id) is None:
        raise ValueError(f"no image with id {image_id}")
    now = now or utcnow()
    who = get_annotator(session, annotator).id
    extended = typing.cast(CursorResult[Any], session.execute(
        update(Lease)
        .where(Lease.image_id == image_id, or_(Lease.annotator_id == who, Lease.expires_at <= now))
        .values(annotator_id=who, taken_at=now, expires_at=now + ttl)
        .execution_options(synchronize_session=False)
    ))
    if extended.rowcount:
        return True
    # No lease row yet, or another's unexpired one. Two annotators can get here at once for the same
    # image: the insert ignores a row that appeared meanwhile (PostgreSQL would raise a unique
    # violation), and whoever's row is there holds the lease. On PostgreSQL the holder can also give
    # the image back between our insert and our read (its delete commits in between): then the image
    # is free and the insert is tried again.
    for _ in range(3):
        insert_ignore(session, Lease.__table__, {"image_id": image_id, "annotator_id": who, "taken_at": now,
                                                  "expires_at": now + ttl}, key=["image_id"])
        holder = session.execute(select(Lease.annotator_id).where(Lease.image_id == image_id)).scalar_one_or_none()
        if holder is not None:
            return holder == who
    return False  # three holders came and went meanwhile: busy, as if held


def release_lease(session: Session, image_id: int, annotator: str, *, actor: str | None = None) -> bool:
    """Give the image back (only its holder can). True when a lease was released."""
    check_actor(session, actor, Role.ANNOTATOR, action="give an image back", annotator=annotator)
    who = get_annotator(session, annotator).id
    result = typing.cast(CursorResult[Any], session.execute(delete(Lease).where(Lease.image_id == image_id, Lease.annotator_id == who)))
    return bool(result.rowcount)


@dataclass(frozen=True)
class QueueItem:
    """One image of the annotation queue. ``score`` is None when no model has ranked the queue yet.

    ``strategy``, ``cost`` (units), ``gain`` (expected mAP, 0-1), ``gain_per_unit`` and
    ``gain_per_minute`` (None while the costs are not measured) come from the strategy that ranked the
    queue (:func:`oxnet.active.strategies.describe`); None where it made no estimate.
    """

    image_id: int
    path: str
    width: int
    height: int
    granularity: str
    split: str | None
    action: str
    score: float | None
    reason: str
    classes: tuple[str, ...] = ()
    strategy: str | None = None
    cost: float | None = None
    gain: float | None = None
    gain_per_unit: float | None = None
    gain_per_minute: float | None = None
    #: The model version whose suggestion this is (None before any model).
    model_version_id: int | None = None


def _free_for(annotator_id: int, now: datetime):
    """SQL condition: the image (outer-joined ``Lease``) is not leased to someone else right now."""
    return or_(Lease.image_id.is_(None), Lease.expires_at <= now, Lease.annotator_id == annotator_id)


def queue(
    session: Session,
    action: SuggestedAction | str,
    *,
    annotator: str,
    project: str = DEFAULT_PROJECT,
    class_name: str | None = None,
    split: Split | str | None = None,
    limit: int = 24,
    offset: int = 0,
    exclude: Collection[int] = (),
    now: datetime | None = None,
) -> list[QueueItem]:
    """Images waiting for ``action``, best first, skipping images leased to other annotators.

    With a serving model version (:func:`db.versions.serving_model_version`; a candidate does not
    serve): its suggestions by score (``class_name`` keeps suggestions whose reason
    names the class). Before any model: images below the action's target granularity in store order
    (``class_name`` keeps images labelled with the class), reason "no model yet". Images already at or
    past the action's target are never listed.
    """
    action = SuggestedAction(action)
    project_row = get_project(session, project)
    project_id = project_row.id
    who = get_annotator(session, annotator).id
    now = now or utcnow()
    below = [g for g in Granularity if g.rank < action.target.rank]
    version = serving_model_version(session, project)
    columns = (Image.id, Image.path, Image.width, Image.height, Image.granularity, Image.split)
    if version is not None:
        query = (
            select(*columns, Suggestion.score, Suggestion.reason)
            .join(Image, Image.id == Suggestion.image_id)
            .where(Suggestion.model_version_id == version.id, Suggestion.action == action)
            .order_by(Suggestion.score.desc(), Suggestion.id)
        )
        if class_name:
            query = query.where(cast(Suggestion.reason, String).like(f'%"{_like_escape(class_name)}"%', escape="\\"))
    else:
        query = select(*columns).where(Image.project_id == project_id).order_by(Image.id)
        if class_name:
            query = query.where(
                exists().where(
                    ImageLabel.image_id == Image.id, ImageLabel.present,
                    ImageLabel.class_id == LabelClass.id, LabelClass.name == class_name,
                )
            )
    if project_row.readers_per_image > 1:  # several blind readers: db.readers says who may still read an image
        from db.readers import open_to_reader  # here: db.readers builds on this module

        query = query.where(Image.granularity.in_(below), open_to_reader(who, project_row.readers_per_image, now))
    else:
        query = query.outerjoin(Lease, Lease.image_id == Image.id).where(Image.granularity.in_(below), _free_for(who, now))
    if split:
        query = query.where(Image.split == Split(split))
    if exclude:
        query = query.where(Image.id.not_in(list(exclude)))
    items = []
    for row in session.execute(query.limit(limit).offset(offset)):
        score, reason = (row[6], row[7] or {}) if version is not None else (None, {"text": "no model yet: images in store order"})
        items.append(QueueItem(
            image_id=row.id, path=row.path, width=row.width, height=row.height, granularity=row.granularity.value,
            split=row.split.value if row.split else None, action=action.value, score=score,
            reason=str(reason.get("text", "")), classes=tuple(reason.get("classes") or ()),
            strategy=reason.get("strategy"), cost=_number(reason.get("cost")), gain=_number(reason.get("gain")),
            gain_per_unit=_number(reason.get("gain_per_unit")), gain_per_minute=_number(reason.get("gain_per_minute")),
            model_version_id=version.id if version is not None else None,
        ))
    return items


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _like_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def claim_next(
    session: Session,
    action: SuggestedAction | str,
    *,
    annotator: str,
    project: str = DEFAULT_PROJECT,
    exclude: Collection[int] = (),
    class_name: str | None = None,
    split: Split | str | None = None,
    ttl: timedelta = DEFAULT_LEASE,
    now: datetime | None = None,
    actor: str | None = None,
) -> QueueItem | None:
    """Lease the top of the queue (:func:`queue`) to ``annotator`` for ``ttl`` and return it (None: empty).
    With several readers per image the lease is a reader's (:func:`db.readers.take_reader_lease`).
    Raises :class:`~db.roles.PermissionDenied` when ``actor`` (None: a system actor) may not annotate."""
    check_actor(session, actor, Role.ANNOTATOR, action="take an image", annotator=annotator)
    take = take_lease
    if get_project(session, project).readers_per_image > 1:
        from db.readers import take_reader_lease as take  # here: db.readers builds on this module
    for item in queue(session, action, annotator=annotator, project=project, class_name=class_name, split=split,
                      limit=20, exclude=exclude, now=now):
        if take(session, item.image_id, annotator, ttl=ttl, now=now):
            return item
    return None
