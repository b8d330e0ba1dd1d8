"""The store as the pages see it: one engine per store URL for the whole server, the user's name.

The engine and sessionmaker come from :func:`st.cache_resource` (shared by every session of the
server); the annotator's name lives in the browser session's ``st.session_state``.
"""

from __future__ import annotations

import streamlit as st
from sqlalchemy.orm import Session, sessionmaker

from db.engine import database_url, init_db, make_sessionmaker

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


def set_annotator(name: str) -> None:
    """Remember ``name`` (stripped, non-empty) as this browser session's annotator."""
    name = name.strip()
    if not name:
        raise ValueError("the annotator name must not be empty")
    st.session_state[ANNOTATOR_KEY] = name
