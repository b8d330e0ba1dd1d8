"""The store as the pages see it: one engine per store URL for the whole server, the user's name.

The engine and sessionmaker come from :func:`st.cache_resource` (shared by every session of the
server); the annotator's name lives in the browser session's ``st.session_state``.
"""

from __future__ import annotations

import streamlit as st
from sqlalchemy.orm import Session, sessionmaker

from db.engine import database_url, display_url, init_db, is_read_only, make_sessionmaker, store_error_message
from db.service import annotator_name

#: ``st.session_state`` key of the annotator's name (chosen once per browser session).
ANNOTATOR_KEY = "main_annotator"
#: URL query parameter that remembers the annotator's name across a browser reload. It is a
#: convenience, not a login: anyone can type a name (there are no accounts or passwords yet).
ANNOTATOR_PARAM = "annotator"
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
    """The name the user entered for this browser session (or, after a reload, the URL's), or None before they did.

    The name is kept in the URL (``?annotator=``) so a reload of any page keeps it.
    """
    name = st.session_state.get(ANNOTATOR_KEY)
    if name is None:
        try:  # the URL is typed text too: the same rules as the sidebar's field
            remembered = annotator_name(st.query_params.get(ANNOTATOR_PARAM) or "")
        except ValueError:
            remembered = None
        if remembered:
            name = st.session_state[ANNOTATOR_KEY] = remembered
    if name and st.query_params.get(ANNOTATOR_PARAM) != name:
        st.query_params[ANNOTATOR_PARAM] = name
    return name


def shown_store_url() -> str:
    """The store's URL as the pages may show it (password masked)."""
    return display_url(store_url())


def set_annotator(name: str) -> None:
    """Remember ``name`` as this browser session's annotator, normalised by :func:`db.service.annotator_name`,
    in the session and in the page's URL (a reload keeps it).

    Raises:
        ValueError: an empty, too long or reserved name (``trainer``, ``import:...``), or one with
            control characters.
    """
    name = annotator_name(name)
    st.session_state[ANNOTATOR_KEY] = name
    st.query_params[ANNOTATOR_PARAM] = name


def forget_annotator() -> None:
    """Forget this browser session's annotator (session and URL)."""
    st.session_state.pop(ANNOTATOR_KEY, None)
    st.query_params.pop(ANNOTATOR_PARAM, None)
