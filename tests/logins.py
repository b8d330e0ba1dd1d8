"""Log a test in as a created user: what the login form does, without typing (for AppTest and browsers)."""

from __future__ import annotations

from sqlalchemy import select

from db.accounts import create_user, open_session
from db.engine import database_url, init_db, make_sessionmaker
from db.models import UserAccount

#: The password of every user made here.
PASSWORD = "test-password-123"
#: ``st.session_state`` key of the login session's token (app/auth.py).
TOKEN_KEY = "main_session_token"


def ensure_user(name: str, role: str = "admin", url: str | None = None) -> None:
    """Create ``name`` with ``role`` and :data:`PASSWORD` unless it exists (already past the first login)."""
    engine = init_db(database_url(url))
    with make_sessionmaker(engine).begin() as session:
        if session.scalars(select(UserAccount).where(UserAccount.name == name)).one_or_none() is None:
            create_user(session, name, role, password=PASSWORD, must_change_password=False)
    engine.dispose()


def session_token(name: str, role: str = "admin", url: str | None = None) -> str:
    """A fresh login session of ``name`` (created with ``role`` when new) on the store at ``url``
    (default ``$OXNET_DB_URL``): put it in ``at.session_state[TOKEN_KEY]`` to be logged in."""
    ensure_user(name, role, url)
    engine = init_db(database_url(url))
    with make_sessionmaker(engine).begin() as session:
        token, _ = open_session(session, name)
    engine.dispose()
    return token
