"""The store as the pages see it: one engine per store URL for the whole server, the user's name.

The engine and sessionmaker come from :func:`st.cache_resource` (shared by every session of the
server); the annotator's name lives in the browser session's ``st.session_state``.
"""

from __future__ import annotations

import streamlit as st
from sqlalchemy.orm import Session, sessionmaker

from db.engine import database_url, display_url, init_db, make_sessionmaker
from db.repository import annotator_name

#: ``st.session_state`` key of the annotator's name (chosen once per browser session).
ANNOTATOR_KEY = "main_annotator"


def store_url() -> str:
    """The store's URL: ``$OXNET_DB_URL`` or ``sqlite:///workbench.db`` (created on first use)."""
    return database_url()


@st.cache_resource(show_spinner=False)
def _sessionmaker(url: str) -> sessionmaker[Session]:
    return make_sessionmaker(init_db(url))


def sessions() -> sessionmaker[Session]:
    """The sessionmaker of the store at :func:`store_url` (schema created or upgraded once per server)."""
    return _sessionmaker(store_url())


def annotator() -> str | None:
    """The name the user entered for this browser session, or None before they did."""
    return st.session_state.get(ANNOTATOR_KEY)


def shown_store_url() -> str:
    """The store's URL as the pages may show it (password masked)."""
    return display_url(store_url())


def set_annotator(name: str) -> None:
    """Remember ``name`` as this browser session's annotator, normalised by :func:`db.repository.annotator_name`.

    Raises:
        ValueError: an empty, too long or reserved name (``trainer``, ``import:...``), or one with
            control characters.
    """
    st.session_state[ANNOTATOR_KEY] = annotator_name(name)
