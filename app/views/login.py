"""The login form, and the password change a one-time password asks for.

Not a page of its own: ``app/main.py`` calls :func:`render` in place of whatever page the URL asks
for while nobody is logged in (or the user still holds a one-time password), so the URL's page and
query (``?image=``) are still there once the login succeeded. Every refusal shows the same message
whichever of name or password was wrong (:data:`db.accounts.WRONG_LOGIN`), or how long to wait after
too many failures. The password fields are cleared on submit (the form's ``clear_on_submit``).
"""

from __future__ import annotations

import streamlit as st

from app import auth
from app.store import sessions
from app.widgets import plain
from db.accounts import MIN_PASSWORD_LENGTH, AccountError, SessionUser, change_password


def _sso_configured() -> bool:
    """Whether ``.streamlit/secrets.toml`` has an ``[auth]`` section (``st.login`` then works)."""
    try:
        return "auth" in st.secrets
    except Exception:  # noqa: BLE001 - no secrets file at all
        return False


def _change_password(user: SessionUser) -> None:
    st.subheader("Choose your password")
    st.info(f"**{plain(user.name)}**, you logged in with a one-time password. Choose your own password "
            f"(at least {MIN_PASSWORD_LENGTH} characters) before you continue.")
    with st.form("login_change_form", clear_on_submit=True):
        current = st.text_input("One-time (current) password", type="password")
        new = st.text_input("New password", type="password")
        again = st.text_input("New password again", type="password")
        submitted = st.form_submit_button("Change password", type="primary")
    if submitted:
        if new != again:
            st.error("The two new passwords differ.")
            return
        try:
            with sessions().begin() as session:
                change_password(session, user.name, current, new, keep_token=auth.token())
        except AccountError as e:
            st.error(f"Password not changed: {e}.")
            return
        st.rerun()


def render(user: SessionUser | None) -> None:
    """The login form (``user`` None) or the one-time password change (``user.must_change_password``)."""
    st.title("OXnet workbench")
    if user is not None:
        _change_password(user)
        return
    st.markdown("Log in with the name and password an administrator gave you.")
    with st.form("login_form", clear_on_submit=True, border=True):
        name = st.text_input("Name", max_chars=64, autocomplete="username")
        password = st.text_input("Password", type="password", autocomplete="current-password")
        submitted = st.form_submit_button("Log in", type="primary")
    if submitted:
        result = auth.login(name, password)
        if result.user is None:
            st.error(result.message)
        else:
            st.rerun()
    if _sso_configured():
        st.button("Log in with single sign-on", key="login_sso", on_click=st.login)
    refused = st.session_state.get(auth.SSO_REFUSED_KEY)
    if refused:
        st.error(f"Single sign-on says you are **{plain(refused)}**, but this workbench has no active user of that "
                 "name: ask an administrator to add one.")
