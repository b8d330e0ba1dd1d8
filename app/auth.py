"""Who is logged in to this browser session: the login session token, checked against the store on every
script run (:mod:`db.accounts`).

Where the token lives: only in ``st.session_state`` (the server's memory of this browser tab's
session). Streamlit offers no reliable way to set an HTTP-only cookie from a script, and a token in the
URL (``st.query_params``) would leak into the browser history, proxy logs and shared links; so a reload
or a new tab asks to log in again. ``app/main.py`` keeps the requested page and its query (``?image=``)
while it shows the login form, so after the login the reload continues where it was (the open image,
its lease and its draft).

Single sign-on: when ``.streamlit/secrets.toml`` has an ``[auth]`` section, ``st.login()`` (OIDC) can
replace the password. The identity provider only says who the person is (``st.user.email``); the role
comes from the store: a user of that name must exist and be active, else the login is refused.
"""

from __future__ import annotations

import contextlib
import os

import streamlit as st

from app.store import USER_KEY, sessions, store_url
from app.serve import first_admin
from db.accounts import (
    LoginResult,
    SessionUser,
    log_in,
    open_session,
    revoke_session,
    session_user,
)
from db.engine import is_read_only
from db.queue import release_lease

#: ``st.session_state`` keys: the login session's token (clear text: server memory only), and the
#: user it was valid for in this script run.
TOKEN_KEY = "main_session_token"
#: ``st.session_state`` key: the single sign-on identity that has no active account here.
SSO_REFUSED_KEY = "main_sso_refused"
#: Environment variable: "1" when a reverse proxy sets ``X-Forwarded-For`` (then its last entry is the
#: client address for login throttling; without a proxy it would be the client's own claim).
FORWARDED_ENV = "OXNET_FORWARDED_FOR"


@st.cache_resource(show_spinner=False)
def _first_admin(url: str) -> bool:
    """Once per server and store: a store without users gets the ``admin`` account, whose one-time
    password goes to the server's stderr only (not a log file, not a page; :func:`app.serve.first_admin`)."""
    if is_read_only(sessions().kw["bind"]):
        return False
    first_admin(url)
    return True


def ensure_first_admin_once() -> None:
    """Create the first admin when the store has no user (see :func:`_first_admin`)."""
    _first_admin(store_url())


def client_address() -> str | None:
    """The browser's address, for login throttling (behind a proxy: ``X-Forwarded-For``'s last entry
    when ``$OXNET_FORWARDED_FOR`` is 1)."""
    if os.environ.get(FORWARDED_ENV) == "1":
        forwarded = (st.context.headers.get("X-Forwarded-For") or "").split(",")[-1].strip()
        if forwarded:
            return forwarded
    return st.context.ip_address


def _sso_identity() -> str | None:
    """The OIDC identity (email, else name) when ``st.login`` logged this browser in, else None."""
    try:
        if not st.user.get("is_logged_in"):
            return None
        return str(st.user.get("email") or st.user.get("name") or "") or None
    except Exception:  # noqa: BLE001 - no [auth] configured or no user info: no single sign-on
        return None


def current_user() -> SessionUser | None:
    """The user of this browser session, checked against the store now (call once per script run):
    an expired or revoked session, or a deactivated user, is logged out here. A single sign-on
    identity with an active account of that name gets a session."""
    token = st.session_state.get(TOKEN_KEY)
    with sessions()() as session:
        user = session_user(session, token)
    if user is None and token is not None:  # expired, revoked or deactivated: nothing of that login stays here
        st.session_state.clear()
    if user is None and (identity := _sso_identity()) is not None and st.session_state.get(SSO_REFUSED_KEY) != identity:
        try:
            with sessions().begin() as session:
                token, user = open_session(session, identity)
            st.session_state[TOKEN_KEY] = token
        except PermissionError:
            st.session_state[SSO_REFUSED_KEY] = identity
    if user is None:
        st.session_state.pop(USER_KEY, None)
    else:
        st.session_state[USER_KEY] = user
    return user


def user() -> SessionUser | None:
    """The user :func:`current_user` found in this script run (no store read)."""
    return st.session_state.get(USER_KEY)


def login(name: str, password: str) -> LoginResult:
    """Check ``name`` and ``password`` (throttled) and, when right, log this browser session in."""
    with sessions().begin() as session:  # committed also when refused: the failed attempt counts
        result = log_in(session, name, password, address=client_address())
    if result.token is not None:
        st.session_state[TOKEN_KEY] = result.token
        st.session_state[USER_KEY] = result.user
        st.session_state.pop(SSO_REFUSED_KEY, None)
    return result


#: ``st.session_state`` key of the image the Annotate page has open (its lease is given back at logout).
OPEN_IMAGE_KEY = "annotate_image_id"


def logout() -> None:
    """End this browser session's login (revoked in the store) and, after single sign-on, the OIDC one.

    The image the Annotate page has open is given back (its draft stays in the store), and the whole
    session state and the URL's query are cleared: whoever logs in next at this browser sees nothing of
    the last user's work.
    """
    token = st.session_state.get(TOKEN_KEY)
    user = st.session_state.get(USER_KEY)
    open_image = st.session_state.get(OPEN_IMAGE_KEY)
    with sessions().begin() as session:
        if user is not None and open_image is not None:
            with contextlib.suppress(PermissionError):  # refused before writing anything; the lease then expires
                release_lease(session, open_image, user.name, actor=user.name)
        revoke_session(session, token)
    st.session_state.clear()
    st.query_params.clear()  # the open image too: the next person starts afresh
    if _sso_identity() is not None:
        st.logout()


def token() -> str | None:
    """This browser session's token (for a password change that keeps this session)."""
    return st.session_state.get(TOKEN_KEY)
