"""The annotation queue and its leases: an image handed to one annotator is not handed to another until
the lease expires or is given back. Each function takes a Session; the caller owns the transaction."""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import delete, or_, select, update
from sqlalchemy.orm import Session

from db.engine import insert_ignore
from db.models import Granularity, Image, Lease, SuggestedAction, Suggestion, utcnow
from db.people import get_annotator
from db.projects import DEFAULT_PROJECT
from db.versions import serving_model_version


#: How long an image handed to an annotator stays theirs.
DEFAULT_LEASE = timedelta(minutes=30)


def take_lease(
    session: Session, image_id: int, annotator: str, *, ttl: timedelta = DEFAULT_LEASE, now: datetime | None = None
) -> bool:
    """Hand the image to ``annotator`` until now + ``ttl``. False when someone else holds an unexpired lease.

    Taking your own lease again extends it.

    Raises:
        ValueError: there is no image with id ``image_id``.
    """
    if session.get(Image, image_id) is None:
        raise ValueError(f"no image with id {image_id}")
    now = now or utcnow()
    who = get_annotator(session, annotator).id
    extended = session.execute(
        update(Lease)
        .where(Lease.image_id == image_id, or_(Lease.annotator_id == who, Lease.expires_at <= now))
        .values(annotator_id=who, taken_at=now, expires_at=now + ttl)
        .execution_options(synchronize_session=False)
    )
    if extended.rowcount:
        return True
    # No lease row yet, or another's unexpired one. Two annotators can get here at once for the same
    # image: the insert ignores a row that appeared meanwhile (PostgreSQL would raise a unique
    # violation), and whoever's row is there holds the lease.
    insert_ignore(session, Lease.__table__, {"image_id": image_id, "annotator_id": who, "taken_at": now,
                                              "expires_at": now + ttl}, key=["image_id"])
    holder = session.execute(select(Lease.annotator_id).where(Lease.image_id == image_id)).scalar_one()
    return holder == who


def release_lease(session: Session, image_id: int, annotator: str) -> bool:
    """Give the image back (only its holder can). True when a lease was released."""
    who = get_annotator(session, annotator).id
    result = session.execute(delete(Lease).where(Lease.image_id == image_id, Lease.annotator_id == who))
    return bool(result.rowcount)


def expire_leases(session: Session, now: datetime | None = None) -> int:
    """Delete expired leases; returns how many."""
    return session.execute(delete(Lease).where(Lease.expires_at <= (now or utcnow()))).rowcount


def next_suggestions(
    session: Session,
    action: SuggestedAction | str,
    *,
    annotator: str,
    project: str = DEFAULT_PROJECT,
    limit: int = 50,
    now: datetime | None = None,
) -> list[Suggestion]:
    """The top ``limit`` suggestions for ``action`` of the serving model version, best score first.

    Leaves out images leased to another annotator (unexpired) and images already at or past the
    action's target granularity (labels for unlabeled images; boxes for unlabeled and weak ones).
    Served by the (model_version_id, action, score) index.
    """
    action = SuggestedAction(action)
    version = serving_model_version(session, project)
    if version is None:
        return []
    now = now or utcnow()
    who = get_annotator(session, annotator).id
    below = [g for g in Granularity if g.rank < action.target.rank]
    query = (
        select(Suggestion)
        .join(Image, Image.id == Suggestion.image_id)
        .outerjoin(Lease, Lease.image_id == Suggestion.image_id)
        .where(
            Suggestion.model_version_id == version.id,
            Suggestion.action == action,
            Image.granularity.in_(below),
            or_(Lease.image_id.is_(None), Lease.expires_at <= now, Lease.annotator_id == who),
        )
        .order_by(Suggestion.score.desc())
        .limit(limit)
    )
    return list(session.scalars(query))


def claim_next(
    session: Session,
    action: SuggestedAction | str,
    *,
    annotator: str,
    project: str = DEFAULT_PROJECT,
    ttl: timedelta = DEFAULT_LEASE,
    now: datetime | None = None,
) -> Suggestion | None:
    """Lease the best available suggestion for ``action`` to ``annotator`` and return it (None if none)."""
    for suggestion in next_suggestions(session, action, annotator=annotator, project=project, now=now):
        if take_lease(session, suggestion.image_id, annotator, ttl=ttl, now=now):
            return suggestion
    return None
