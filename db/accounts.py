"""Accounts, roles, login sessions and login throttling, all in the store.

    >>> with Session.begin() as s:
    ...     one_time = create_user(s, "dr.lee", Role.ANNOTATOR, actor="admin")   # shown to the admin once
    >>> with Session.begin() as s:                     # the login page; the caller commits either way
    ...     result = log_in(s, "dr.lee", typed_password, address="10.0.0.7")
    >>> result.token, result.message                   # the token lives in the browser session's memory only
    >>> with Session.begin() as s:                     # every script run
    ...     user = session_user(s, token)              # None: expired, revoked, or the user was deactivated
    >>> with Session.begin() as s:                     # inside every write, in the write's transaction
    ...     require_role(s, "dr.lee", Role.REVIEWER, action="adjudicate")   # PermissionDenied otherwise

Roles are ordered: an ``annotator`` labels (saves, drafts, leases), a ``reviewer`` may also adjudicate,
an ``admin`` may do everything, including users, projects, imports, the trainer and model promotion.

Who is trusted: a write function's ``actor`` is the logged-in user the UI passes; ``actor=None`` is a
system actor (the command line ``python -m db ...``, the trainer, job processes, scripts), which is not
checked: whoever has a shell on the server can open the store file anyway.

Nothing secret is stored or logged in clear: passwords only as argon2id hashes (argon2-cffi's
:class:`~argon2.PasswordHasher`, rehashed on login when its parameters changed), session tokens only as
their SHA-256, and login attempts only under the SHA-256 of the tried name or the client address.
Every refused login says :data:`WRONG_LOGIN`, whichever of name or password was wrong; a throttled one
says how long to wait (:data:`THROTTLE`), without checking the password.
"""

from __future__ import annotations

import hashlib
import math
import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from typing import Any, cast

from sqlalchemy import delete, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.engine import CursorResult
from sqlalchemy.orm import Session

from db.models import LoginAttempt, Role, UserAccount, UserSession, utcnow
from db.people import annotator_name, get_annotator, log_event
from db.roles import PermissionDenied, check_actor, require_role  # noqa: F401 (re-exported: the role check)

#: The one message of a refused login, whichever of name or password was wrong (or the user inactive).
WRONG_LOGIN = "Wrong name or password"
#: Environment variable: the first admin's password (else a one-time password is generated and printed).
ADMIN_PASSWORD_ENV = "OXNET_ADMIN_PASSWORD"
#: Environment variable: hours a login session holds (default :data:`DEFAULT_SESSION_HOURS`).
SESSION_HOURS_ENV = "OXNET_SESSION_HOURS"
DEFAULT_SESSION_HOURS = 12.0
#: Name of the account made on a store's first start.
FIRST_ADMIN = "admin"
#: Shortest password a person may choose.
MIN_PASSWORD_LENGTH = 10
#: The hasher (argon2id, argon2-cffi's RFC 9106 low-memory defaults). Tests may swap in cheaper
#: parameters; a login with a hash made under other parameters rehashes it.
HASHER = PasswordHasher()
#: A hash checked when the name is unknown, so an unknown name takes as long as a wrong password.
_DUMMY_HASH: str | None = None


@dataclass(frozen=True)
class Throttle:
    """Exponential delay after failed logins of one key (a name, or a client address).

    The first ``free`` failures within ``window`` cost nothing; each further one doubles the wait
    after the last failure, from ``base_s`` up to ``max_s``. For a name, a successful login clears
    the count; for an address, only time does (a proxy's many users share it: give it more ``free``).
    """

    free: int
    base_s: float = 1.0
    max_s: float = 900.0
    window: timedelta = timedelta(minutes=15)

    def delay(self, failures: int) -> float:
        """Seconds to wait after the last of ``failures`` failed attempts."""
        if failures < self.free:
            return 0.0
        return min(self.max_s, self.base_s * 2.0 ** (failures - self.free))


#: Per tried name: 5 free attempts, then 1 s, 2 s, 4 s ... up to 15 min.
USER_THROTTLE = Throttle(free=5)
#: Per client address: 20 free attempts (several people may share one address), then the same doubling.
ADDRESS_THROTTLE = Throttle(free=20)
#: Login attempts older than this are deleted when a new one is recorded.
KEEP_ATTEMPTS = timedelta(days=1)


class AccountError(ValueError):
    """A user-management request that cannot be done (duplicate name, weak password, last admin ...)."""


@dataclass(frozen=True)
class SessionUser:
    """Who a valid session belongs to."""

    name: str
    role: Role
    must_change_password: bool
    expires_at: datetime


@dataclass(frozen=True)
class LoginResult:
    """A login's outcome. On success ``user`` is set and ``token`` is the new session's token (in clear:
    the caller keeps it in the browser session's memory only); else ``message`` says why, and
    ``retry_after`` how many seconds to wait when throttled."""

    user: SessionUser | None = None
    token: str | None = None
    message: str | None = None
    retry_after: float | None = None


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def token_digest(token: str) -> str:
    """What the store keeps of a session token: its SHA-256 (hex)."""
    return _sha256(token)


def new_password() -> str:
    """A random one-time password (20 URL-safe characters, about 120 bits)."""
    return secrets.token_urlsafe(15)


def session_ttl() -> timedelta:
    """How long a login session holds: ``$OXNET_SESSION_HOURS`` (default 12) hours."""
    raw = os.environ.get(SESSION_HOURS_ENV)
    try:
        hours = float(raw) if raw else DEFAULT_SESSION_HOURS
    except ValueError:
        raise ValueError(f"{SESSION_HOURS_ENV} must be a number of hours, got {raw!r}") from None
    if not 0 < hours <= 24 * 30:
        raise ValueError(f"{SESSION_HOURS_ENV} must be between 0 and 720 hours, got {raw!r}")
    return timedelta(hours=hours)


def check_password_strength(password: str, name: str) -> None:
    """AccountError when ``password`` is too short or is the name itself."""
    if not isinstance(password, str) or len(password) < MIN_PASSWORD_LENGTH:
        raise AccountError(f"the password must have at least {MIN_PASSWORD_LENGTH} characters")
    if password.casefold() == name.casefold():
        raise AccountError("the password must not be the user's name")


def _user(session: Session, name: str) -> UserAccount | None:
    return session.scalars(select(UserAccount).where(UserAccount.name == name)).one_or_none()


def _existing(session: Session, name: str) -> UserAccount:
    user = _user(session, name)
    if user is None:
        raise AccountError(f"no user {name!r}")
    return user


def _check_admin(session: Session, actor: str | None, action: str) -> None:
    if actor is not None:
        require_role(session, actor, Role.ADMIN, action=action)


def _active_admins(session: Session) -> int:
    return session.execute(
        select(func.count()).select_from(UserAccount).where(UserAccount.role == Role.ADMIN, UserAccount.active)
    ).scalar_one()


# --- users ---------------------------------------------------------------------------------------


def create_user(
    session: Session,
    name: str,
    role: Role | str = Role.ANNOTATOR,
    *,
    password: str | None = None,
    actor: str | None = None,
    must_change_password: bool | None = None,
) -> str:
    """Add a user; returns the password (a generated one-time password when none is given).

    ``name`` is normalised as every annotator name (:func:`db.people.annotator_name`; reserved names
    like ``trainer`` or ``import:...`` are refused) and stored verbatim otherwise; the account is linked
    to the :class:`~db.models.Annotator` row of that name (an existing one keeps its history). A generated
    password must be changed at first login (``must_change_password``, default: True exactly then).

    Raises:
        AccountError: the name exists (also in another letter case), the role is unknown or the password weak.
        ValueError: the name is empty, too long, reserved or holds control characters.
        PermissionDenied: ``actor`` is not an admin.
    """
    _check_admin(session, actor, "add users")
    name = annotator_name(name)
    try:
        role = Role(role)
    except ValueError:
        raise AccountError(f"unknown role {role!r}: one of {[r.value for r in Role]}") from None
    clash = next((u for u in _names(session) if u.casefold() == name.casefold()), None)
    if clash is not None:
        raise AccountError(f"a user {clash!r} exists already")
    generated = password is None
    if password is None:
        password = new_password()
    else:
        check_password_strength(password, name)
    who = get_annotator(session, name)
    if who.kind != "human":
        raise AccountError(f"{name!r} names one of the workbench's own writers ({who.kind}); choose another name")
    user = UserAccount(name=name, role=role, password_hash=HASHER.hash(password), active=True,
                       must_change_password=generated if must_change_password is None else must_change_password,
                       annotator_id=who.id, created_at=utcnow())
    session.add(user)
    session.flush()
    log_event(session, actor or "system", "user_create", {"user": name, "role": role.value})
    return password


def _names(session: Session) -> list[str]:
    return list(session.scalars(select(UserAccount.name)))


def list_users(session: Session) -> list[dict]:
    """Every user by name: ``{"name", "role", "active", "must_change_password", "created_at", "last_login_at"}``."""
    return [
        {"name": u.name, "role": u.role.value, "active": u.active, "must_change_password": u.must_change_password,
         "created_at": u.created_at, "last_login_at": u.last_login_at}
        for u in session.scalars(select(UserAccount).order_by(UserAccount.name))
    ]


def has_users(session: Session) -> bool:
    return session.execute(select(UserAccount.id).limit(1)).first() is not None


def set_role(session: Session, name: str, role: Role | str, *, actor: str | None = None) -> None:
    """Give ``name`` another role (effective at their next write). The last active admin keeps theirs."""
    _check_admin(session, actor, "set roles")
    user = _existing(session, name)
    role = Role(role)
    if user.role is Role.ADMIN and role is not Role.ADMIN and user.active and _active_admins(session) <= 1:
        raise AccountError(f"{name} is the last active admin: make another admin first")
    before = user.role
    user.role = role
    log_event(session, actor or "system", "user_role", {"user": name, "role": role.value, "before": before.value})


def reset_password(session: Session, name: str, *, actor: str | None = None) -> str:
    """A new one-time password for ``name`` (returned once; to be changed at next login); their sessions end."""
    _check_admin(session, actor, "reset passwords")
    user = _existing(session, name)
    password = new_password()
    user.password_hash, user.must_change_password = HASHER.hash(password), True
    _revoke_all(session, user.id)
    log_event(session, actor or "system", "user_password_reset", {"user": name})
    return password


def change_password(session: Session, name: str, current: str, new: str, *, keep_token: str | None = None) -> None:
    """The user replaces their password (the one-time one included), knowing the current one. Their
    other sessions end (``keep_token``: the session that asked stays). AccountError naming the reason."""
    user = _user(session, name)
    if user is None or not user.active or not _verify(user.password_hash, current):
        raise AccountError("the current password is wrong")
    check_password_strength(new, name)
    if new == current:
        raise AccountError("the new password must differ from the current one")
    user.password_hash, user.must_change_password = HASHER.hash(new), False
    keep = token_digest(keep_token) if keep_token else None
    session.execute(update(UserSession).where(UserSession.user_id == user.id, UserSession.token_sha256 != (keep or ""))
                    .values(revoked=True).execution_options(synchronize_session=False))
    log_event(session, name, "user_password_change", {"user": name})


def deactivate(session: Session, name: str, *, actor: str | None = None) -> None:
    """``name`` can no longer log in; their sessions end at once (the next script run logs them out).
    An admin cannot deactivate themselves nor the last active admin."""
    _check_admin(session, actor, "deactivate users")
    user = _existing(session, name)
    if actor is not None and actor == name:
        raise AccountError("you cannot deactivate yourself")
    if user.role is Role.ADMIN and user.active and _active_admins(session) <= 1:
        raise AccountError(f"{name} is the last active admin: make another admin first")
    user.active = False
    _revoke_all(session, user.id)
    log_event(session, actor or "system", "user_deactivate", {"user": name})


def activate(session: Session, name: str, *, actor: str | None = None) -> None:
    """``name`` may log in again (with their password as it was)."""
    _check_admin(session, actor, "activate users")
    _existing(session, name).active = True
    log_event(session, actor or "system", "user_activate", {"user": name})


def ensure_first_admin(session: Session, *, environ: Mapping[str, str] | None = None) -> tuple[str, str | None] | None:
    """On a store without any user, create :data:`FIRST_ADMIN` (role admin, must change the password at
    first login) and return ``(name, one-time password)``, the password None when it came from
    ``$OXNET_ADMIN_PASSWORD``. None when users exist (or another process made the admin meanwhile)."""
    if has_users(session):
        return None
    environ = os.environ if environ is None else environ
    given = environ.get(ADMIN_PASSWORD_ENV) or None
    try:
        with session.begin_nested():
            password = create_user(session, FIRST_ADMIN, Role.ADMIN, password=given, must_change_password=True)
    except IntegrityError:
        return None
    return FIRST_ADMIN, None if given else password


# --- passwords, throttling, login ----------------------------------------------------------------


def _verify(password_hash: str, password: str) -> bool:
    try:
        return HASHER.verify(password_hash, password)
    except (VerificationError, InvalidHashError):
        return False


def _dummy_verify(password: str) -> None:
    global _DUMMY_HASH
    if _DUMMY_HASH is None:
        _DUMMY_HASH = HASHER.hash(secrets.token_urlsafe(16))
    _verify(_DUMMY_HASH, password)


def _key(kind: str, value: str) -> str:
    return _sha256(f"{kind}\0{value}")


def _wait(session: Session, key: str, throttle: Throttle, now: datetime, *, reset_on_success: bool) -> float:
    """Seconds ``key`` must still wait before its next attempt (0: go)."""
    since = now - throttle.window
    if reset_on_success:
        last_ok = session.execute(
            select(func.max(LoginAttempt.at)).where(LoginAttempt.key == key, LoginAttempt.success)
        ).scalar()
        if last_ok is not None and last_ok > since:
            since = last_ok
    failures, last = session.execute(
        select(func.count(), func.max(LoginAttempt.at))
        .where(LoginAttempt.key == key, ~LoginAttempt.success, LoginAttempt.at > since)
    ).one()
    if not failures:
        return 0.0
    return max(0.0, throttle.delay(failures) - (now - last).total_seconds())


def _record(session: Session, keys: tuple[str, ...], success: bool, now: datetime) -> None:
    session.execute(delete(LoginAttempt).where(LoginAttempt.at < now - KEEP_ATTEMPTS))
    session.add_all(LoginAttempt(key=k, at=now, success=success) for k in keys)
    session.flush()


def authenticate(
    session: Session, name: str, password: str, *, address: str | None = None, now: datetime | None = None
) -> LoginResult:
    """Check a name and password, throttled per name and per client ``address``; records the attempt
    (the caller commits, also when refused). Returns a :class:`LoginResult` without a token
    (:func:`log_in` adds the session)."""
    now = now or utcnow()
    try:
        name = annotator_name(name)
    except ValueError:
        name = " ".join(str(name).split())[:256]
    user_key, address_key = _key("user", name.casefold()), _key("address", address or "unknown")
    wait = max(_wait(session, user_key, USER_THROTTLE, now, reset_on_success=True),
               _wait(session, address_key, ADDRESS_THROTTLE, now, reset_on_success=False))
    if wait > 0:
        seconds = math.ceil(wait)
        return LoginResult(message=f"Too many failed logins: wait {seconds} s and try again", retry_after=float(seconds))
    user = _user(session, name)
    if user is None:
        _dummy_verify(password)
        ok = False
    else:
        ok = _verify(user.password_hash, password) and user.active
    if not ok or user is None:  # no user is never ok; the second test tells the type checker
        _record(session, (user_key, address_key), False, now)
        return LoginResult(message=WRONG_LOGIN)
    if HASHER.check_needs_rehash(user.password_hash):
        user.password_hash = HASHER.hash(password)
    user.last_login_at = now
    _record(session, (user_key,), True, now)
    return LoginResult(user=SessionUser(user.name, user.role, user.must_change_password, now))


def log_in(
    session: Session, name: str, password: str, *, address: str | None = None, ttl: timedelta | None = None,
    now: datetime | None = None,
) -> LoginResult:
    """:func:`authenticate`, then a new session (``ttl``: :func:`session_ttl`); its token is in the result."""
    now = now or utcnow()
    result = authenticate(session, name, password, address=address, now=now)
    if result.user is None:
        return result
    token, user = open_session(session, result.user.name, ttl=ttl, now=now)
    return LoginResult(user=user, token=token)


def open_session(session: Session, name: str, *, ttl: timedelta | None = None, now: datetime | None = None) -> tuple[str, SessionUser]:
    """A new login session of the active user ``name`` (after a password login, or single sign-on):
    ``(token, user)``. The store keeps only the token's SHA-256."""
    now = now or utcnow()
    user = _user(session, name)
    if user is None or not user.active:
        raise PermissionDenied(f"{name!r} is not an active user")
    token = secrets.token_urlsafe(32)
    expires = now + (ttl or session_ttl())
    session.add(UserSession(token_sha256=token_digest(token), user_id=user.id, created_at=now, expires_at=expires, revoked=False))
    session.flush()
    return token, SessionUser(user.name, user.role, user.must_change_password, expires)


def session_user(session: Session, token: str | None, *, now: datetime | None = None) -> SessionUser | None:
    """The user of a valid session: not revoked, not expired, the account active. None otherwise."""
    if not token:
        return None
    now = now or utcnow()
    row = session.execute(
        select(UserAccount, UserSession.expires_at).join(UserSession, UserSession.user_id == UserAccount.id)
        .where(UserSession.token_sha256 == token_digest(token), ~UserSession.revoked, UserSession.expires_at > now,
               UserAccount.active)
    ).first()
    if row is None:
        return None
    user, expires = row
    return SessionUser(user.name, user.role, user.must_change_password, expires)


def revoke_session(session: Session, token: str | None) -> bool:
    """Log out: the session ends (True when there was a live one)."""
    if not token:
        return False
    return bool(cast(CursorResult[Any], session.execute(
        update(UserSession).where(UserSession.token_sha256 == token_digest(token), ~UserSession.revoked)
        .values(revoked=True).execution_options(synchronize_session=False)
    )).rowcount)


def _revoke_all(session: Session, user_id: int) -> None:
    session.execute(update(UserSession).where(UserSession.user_id == user_id).values(revoked=True)
                    .execution_options(synchronize_session=False))


def authorize(
    url: str | None, actor: str | None, role: Role | str, *, action: str, event: str, details: Mapping | None = None
) -> None:
    """The role check of a write that is no store transaction (starting an import job, the trainer):
    in one short transaction on the store at ``url``, :func:`check_actor` and an audit entry ``event``
    by ``actor``. A system actor (None) is neither checked nor audited here. Raises PermissionDenied."""
    if actor is None:
        return
    from db.engine import init_db, make_sessionmaker

    engine = init_db(url)
    try:
        with make_sessionmaker(engine).begin() as session:
            check_actor(session, actor, role, action=action)
            log_event(session, actor, event, dict(details or {}))
    finally:
        engine.dispose()


#: The actions of ``python -m db users`` (:func:`users_command`).
USER_ACTIONS = ("list", "add", "reset-password", "set-role", "deactivate", "activate")


def users_command(session: Session, action: str, name: str | None = None, *, role: str = "annotator", out=None) -> int:
    """``python -m db users ACTION [NAME] [--role ROLE]``: user management from the command line, as a
    trusted system actor (e.g. when the last admin's password is lost). A new one-time password is
    printed once, on stderr. Returns the exit status; AccountError/ValueError for bad input."""
    import json
    import sys

    out = out or sys.stdout
    if action == "list":
        print(json.dumps(list_users(session), default=str, indent=2), file=out)
        return 0
    if not name:
        raise AccountError(f"'users {action}' needs a user name")
    if action == "add":
        password = create_user(session, name, role)
    elif action == "reset-password":
        password = reset_password(session, name)
    else:
        password = None
        {"set-role": lambda: set_role(session, name, role), "deactivate": lambda: deactivate(session, name),
         "activate": lambda: activate(session, name)}[action]()
    if password is not None:
        print(f"one-time password of {name!r} (shown only now; to be changed at the first login): {password}",
              file=sys.stderr, flush=True)
    print(f"users {action} {name}: done", file=out)
    return 0
