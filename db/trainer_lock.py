"""The trainer's single-instance lock, heartbeat and progress in the store: one trainer per project; a
trainer whose heartbeat is older than :data:`TRAINER_STALE_AFTER` has died and another may take over."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import or_, update
from sqlalchemy.engine import CursorResult
from sqlalchemy.orm import Session

from db.engine import insert_ignore
from db.models import TrainerState, utcnow
from db.projects import DEFAULT_PROJECT, get_project


#: A trainer whose heartbeat is older than this has died; another may take its lock.
TRAINER_STALE_AFTER = timedelta(minutes=5)


def acquire_trainer_lock(
    session: Session,
    owner: str,
    *,
    project: str = DEFAULT_PROJECT,
    stale_after: timedelta = TRAINER_STALE_AFTER,
    now: datetime | None = None,
) -> bool:
    """Make ``owner`` the project's single trainer. False while another trainer's heartbeat is fresh."""
    now = now or utcnow()
    project_id = get_project(session, project).id
    insert_ignore(
        session, TrainerState.__table__,
        {"project_id": project_id, "round": 0, "progress": 0.0, "updated_at": now}, ["project_id"],
    )
    taken = cast(CursorResult[Any], session.execute(
        update(TrainerState)
        .where(
            TrainerState.project_id == project_id,
            or_(
                TrainerState.lock_owner.is_(None),
                TrainerState.lock_owner == owner,
                TrainerState.heartbeat_at < now - stale_after,
            ),
        )
        .values(lock_owner=owner, heartbeat_at=now, updated_at=now)
        .execution_options(synchronize_session=False)
    ))
    return bool(taken.rowcount)


def trainer_heartbeat(
    session: Session,
    owner: str,
    *,
    project: str = DEFAULT_PROJECT,
    round: int | None = None,
    progress: float | None = None,
    phase: str | None = None,
    error: str | None = None,
    now: datetime | None = None,
) -> None:
    """Record that ``owner`` is alive, and where it is. RuntimeError when it no longer holds the lock."""
    now = now or utcnow()
    values: dict[str, Any] = {"heartbeat_at": now, "updated_at": now}
    for key, value in (("round", round), ("progress", progress), ("phase", phase), ("last_error", error)):
        if value is not None:
            values[key] = value
    project_id = get_project(session, project).id
    result = cast(CursorResult[Any], session.execute(
        update(TrainerState)
        .where(TrainerState.project_id == project_id, TrainerState.lock_owner == owner)
        .values(**values)
        .execution_options(synchronize_session=False)
    ))
    if not result.rowcount:
        raise RuntimeError(f"trainer {owner!r} does not hold the lock of project {project!r}")


def release_trainer_lock(session: Session, owner: str, *, project: str = DEFAULT_PROJECT, error: str | None = None) -> None:
    """Give the trainer lock back (on exit or after an error, which is kept in ``last_error``)."""
    project_id = get_project(session, project).id
    values: dict[str, Any] = {"lock_owner": None, "updated_at": utcnow()}
    if error is not None:
        values["last_error"] = error
    session.execute(
        update(TrainerState)
        .where(TrainerState.project_id == project_id, TrainerState.lock_owner == owner)
        .values(**values)
        .execution_options(synchronize_session=False)
    )


def trainer_state(session: Session, project: str = DEFAULT_PROJECT) -> TrainerState | None:
    """The trainer's row of the project (None before any trainer ran)."""
    return session.get(TrainerState, get_project(session, project).id, populate_existing=True)
