"""Users (admins only): add users (their one-time password is shown once), set roles, reset passwords,
deactivate and activate. Every change goes through :mod:`db.accounts` with this admin as ``actor``, which
checks the role again in the change's own transaction and audits it."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from app.store import annotator, may, sessions
from app.widgets import plain
from db.accounts import AccountError, activate, create_user, deactivate, list_users, reset_password, set_role
from db.models import Role
from db.roles import PermissionDenied

ROLES = [r.value for r in Role]

st.title("Users")
who = annotator()
if not may(Role.ADMIN):
    st.error("Only an admin manages users.")
    st.stop()


def _one_time(name: str, password: str) -> None:
    """Show a one-time password, this once (it is in no log and cannot be shown again)."""
    st.success(f"One-time password of **{plain(name)}** (shown only now; they must change it at their first login):")
    st.code(password, language=None)


def _do(change, *args) -> str | None:
    """Run ``change(session, *args, actor=who)`` in one transaction; its result, or None after a refusal (said on the page)."""
    try:
        with sessions().begin() as session:
            return change(session, *args, actor=who) or ""
    except (AccountError, PermissionDenied, ValueError) as e:
        st.error(f"Not done: {e}.")
        return None


with st.form("admin_add_form", clear_on_submit=True):
    st.markdown("**Add a user**")
    left, right = st.columns([3, 1])
    name = left.text_input("Name", max_chars=64, help="as it will appear on every label, box and audit entry; "
                           "for single sign-on: the e-mail address the identity provider reports")
    new_role = right.selectbox("Role", ROLES)
    sso_only = st.checkbox("Logs in with single sign-on only (no password is shown; nobody knows it)",
                           help="for users of the hospital's identity provider: their name must be the e-mail "
                                "address it reports")
    if st.form_submit_button("Add user", type="primary"):
        if sso_only:
            if _do(lambda session, *args, actor: create_user(session, *args, actor=actor, must_change_password=False),
                   name, new_role):
                st.success(f"Added **{plain(' '.join(name.split()))}** for single sign-on.")
        else:
            password = _do(create_user, name, new_role)
            if password:
                _one_time(" ".join(name.split()), password)

with sessions()() as _session:
    users = list_users(_session)
st.dataframe(pd.DataFrame(users), hide_index=True, width="stretch", key="admin_users")

names = [u["name"] for u in users]
if names:
    st.markdown("**Change a user**")
    chosen = st.selectbox("User", names, key="admin_user")
    current = next(u for u in users if u["name"] == chosen)
    left, middle, right = st.columns(3)
    chosen_role = left.selectbox("Role", ROLES, index=ROLES.index(current["role"]), key="admin_role")
    if left.button("Set role", key="admin_set_role") and _do(set_role, chosen, chosen_role) is not None:
        st.toast(f"{chosen} is now {chosen_role}.")
        st.rerun()
    if middle.button("Reset password", key="admin_reset",
                     help="a new one-time password; their sessions end at once") and (password := _do(reset_password, chosen)):
        _one_time(chosen, password)
    if current["active"]:
        if right.button("Deactivate", key="admin_deactivate", help="they can no longer log in; their sessions end at once") \
                and _do(deactivate, chosen) is not None:
            st.rerun()
    elif right.button("Activate", key="admin_activate") and _do(activate, chosen) is not None:
        st.rerun()
