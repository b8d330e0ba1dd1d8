"""The store as the pages see it: one engine per store URL for the whole server, the logged-in user.

The engine and sessionmaker come from :func:`st.cache_resource` (shared by every session of the
server); the logged-in user (:mod:`app.auth`, checked against the store at the start of every script
run by ``app/main.py``) lives in the browser session's ``st.session_state``.
"""

from __future__ import annotations

import streamlit as st
from sqlalchemy.orm import Session, sessionmaker

from db.engine import database_url, display_url, init_db, is_read_only, make_sessionmaker, store_error_message
from db.models import Role

#: ``st.session_state`` key of the logged-in user (a :class:`db.accounts.SessionUser`) of this script run.
USER_KEY = "main_user"
#: ``st.session_state`` keys of the page this script run shows and the one the previous run showed.
CURRENT_PAGE_KEY = "main_page"
PREVIOUS_PAGE_KEY = "main_previous_page"


def store_url() -> str:
    """The store's URL: ``$OXNET_DB_URL`` or ``sqlite:///workbench.db`` (created on first use)."""
    return database_url()


@st.cache_resource(show_spinner=False)
def _sessionmaker(url: str) -> sessionmaker[Session]:
    return make_sessionmaker(init_db(url))


def sessions() -> sessionmaker[Session]:
    """The sessionmaker of the store at :func:`store_url` (schema created or upgraded once per server)."""
    return _sessionmaker(store_url())


def read_only() -> bool:
    """Whether the store was opened read-only (a SQLite ``mode=ro`` URL): nothing is written, not even the demo."""
    return is_read_only(sessions().kw["bind"])


def store_error(error: BaseException) -> str | None:
    """One sentence for a locked, read-only, full or unopenable store (:func:`db.engine.store_error_message`);
    None for any other error (a bug: let it show)."""
    return store_error_message(error, store_url())


def annotator() -> str | None:
    """The logged-in user's name (every label, box, lease and audit entry is recorded under it), or None
    before the login. Never typed: it is the account's name."""
    user = st.session_state.get(USER_KEY)
    return user.name if user is not None else None


def role() -> Role | None:
    """The logged-in user's role, or None before the login (pages hide what it may not do; the write
    functions check it again in their transaction)."""
    user = st.session_state.get(USER_KEY)
    return user.role if user is not None else None


def may(needed: Role | str) -> bool:
    """Whether the logged-in user's role is ``needed`` or above."""
    current = role()
    return current is not None and current.rank >= Role(needed).rank


def shown_store_url() -> str:
    """The store's URL as the pages may show it (password masked)."""
    return display_url(store_url())
