"""The role check every write function runs (:func:`check_actor`), apart from :mod:`db.accounts` so the
store modules (db.queue, db.versions, db.drafts, db.readers, ...) can import it (accounts itself builds on :mod:`db.people`).

``actor`` is the logged-in user the UI passes to a write; None is a system actor (the command line,
the trainer, job processes, scripts), which is trusted: whoever has a shell on the server can open
the store file anyway.
"""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from db.models import Role, UserAccount


class PermissionDenied(PermissionError):
    """A write by a user whose account may not do it (no such user, inactive, a lower role, or a
    one-time password not yet changed). The message names the user, the action and the role needed."""


def require_role(session: Session, user_name: str, role: Role | str, *, action: str = "do this") -> UserAccount:
    """The active account ``user_name`` if its role is ``role`` or above; else :class:`PermissionDenied`.

    Read in ``session``, so a write that calls it first is checked in its own transaction (a role
    changed or a user deactivated a moment ago counts). An account still holding a one-time password
    may write nothing until it chose its own.
    """
    role = Role(role)
    user = (session.scalars(select(UserAccount).where(UserAccount.name == user_name)).one_or_none()
            if isinstance(user_name, str) else None)
    if user is None or not user.active:
        raise PermissionDenied(f"{user_name!r} is not an active user of this workbench and may not {action}")
    if user.must_change_password:
        raise PermissionDenied(f"{user_name} must change the one-time password before being allowed to {action}")
    if user.role.rank < role.rank:
        raise PermissionDenied(f"{user_name} ({user.role.value}) may not {action}: that needs the {role.value} role")
    return user


def check_actor(session: Session, actor: str | None, role: Role | str, *, action: str, annotator: str | None = None) -> None:
    """The check every write function runs first: a system actor (None) passes; a user must hold
    ``role`` (:func:`require_role`) and may act only under their own name (``annotator``, when the
    write records one)."""
    if actor is None:
        return
    require_role(session, actor, role, action=action)
    if annotator is not None and annotator != actor:
        raise PermissionDenied(f"{actor} may not {action} as {annotator!r}: every edit carries the logged-in user's own name")
