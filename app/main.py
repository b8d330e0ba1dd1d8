"""The OXnet workbench UI: ``streamlit run app/main.py``.

Routes the pages of ``app/views`` with ``st.navigation``, behind a login (:mod:`app.auth`: checked
against the store on every script run; the first start creates ``admin`` with a one-time password on
the server's stderr), shows only the pages the user's role may use, and on a store without a project
starts seeding the synthetic demo project as a background job (set ``OXNET_DEMO=0`` to only offer it
on the Overview page).

Patient data stays on this machine: ``app/.streamlit/config.toml`` (read beside this script from any
current folder) makes the server listen on 127.0.0.1. Started with another ``server.address`` (a flag,
``STREAMLIT_SERVER_ADDRESS``), the app shows nothing but a message unless ``OXNET_ALLOW_REMOTE=1`` says
that was meant (e.g. behind an authenticating reverse proxy).
"""

from __future__ import annotations

import ipaddress
import os

import streamlit as st
from sqlalchemy.exc import ArgumentError

from app import auth
from app.jobs import AUTO_DEMO_ENV, start_demo_job
from app.store import CURRENT_PAGE_KEY, PREVIOUS_PAGE_KEY, read_only, sessions, shown_store_url, store_error, store_url
from app.views import login
from app.widgets import page_icon, plain
from db.models import Role
from db.service import project_exists

st.set_page_config(page_title="OXnet workbench", page_icon=page_icon(), layout="wide")

#: Environment variable: "1" lets the app serve on a non-loopback address (behind a reverse proxy).
ALLOW_REMOTE_ENV = "OXNET_ALLOW_REMOTE"


def loopback(address: str | None) -> bool:
    """Whether a ``server.address`` listens on this machine only (empty means every interface)."""
    if not address:
        return False
    if address == "localhost":
        return True
    try:
        return ipaddress.ip_address(address.strip("[]")).is_loopback
    except ValueError:
        return False


address = st.get_option("server.address")
if not loopback(address) and os.environ.get(ALLOW_REMOTE_ENV) != "1":
    st.error(f"This server listens on {address or 'every network interface'}, not only on this machine, and the "
             f"workbench shows patient data. Restart it with `--server.address 127.0.0.1` (the default of "
             f"app/.streamlit/config.toml), or set {ALLOW_REMOTE_ENV}=1 if it sits behind an authenticating "
             "reverse proxy on purpose.")
    st.stop()

PAGES = [
    st.Page("views/overview.py", title="Overview", icon=":material/dashboard:", default=True),
    st.Page("views/queue.py", title="Queue", icon=":material/view_module:"),
    st.Page("views/annotate.py", title="Annotate", icon=":material/edit_square:"),
    st.Page("views/review.py", title="Review", icon=":material/rule:"),
    st.Page("views/metrics.py", title="Metrics", icon=":material/monitoring:"),
    st.Page("views/data.py", title="Data", icon=":material/database:"),
    st.Page("views/admin.py", title="Users", icon=":material/group:"),
]
#: Pages only an admin sees (imports and exports; users). Their writes check the role again.
ADMIN_PAGES = {"Data", "Users"}


def _store_error(e: Exception) -> None:
    """A store that cannot be read or written: one sentence (a bug re-raises)."""
    if isinstance(e, ArgumentError):  # its message repeats the URL, password included
        st.error(f"Cannot parse the store URL `{shown_store_url()}`: set OXNET_DB_URL to an SQLAlchemy URL and restart.")
        return
    if isinstance(e, PermissionError):  # a write refused by the role check (db.roles): the role changed meanwhile
        st.error(f"Not done: {e}.")
        return
    message = store_error(e)
    if message is None:
        raise e
    st.error(message)


account_box = st.sidebar.container()  # who is logged in, filled below
st.sidebar.caption(f"Store: `{shown_store_url()}`")  # shown before the store is opened (and may fail)

try:
    auth.ensure_first_admin_once()
    with sessions()() as session:
        fresh = not project_exists(session)
    if fresh and os.environ.get(AUTO_DEMO_ENV, "1") != "0" and not read_only():
        start_demo_job(store_url())  # the server's own first run (a system actor); no-op when it ran or runs already
    user = auth.current_user()
except Exception as e:  # noqa: BLE001 - see _store_error
    st.navigation(PAGES, position="hidden")
    _store_error(e)
    st.stop()

if user is None or user.must_change_password:
    st.navigation(PAGES, position="hidden")  # the URL's page and query stay for after the login
    with account_box:
        if user is not None and st.button("Log out", key="main_logout"):
            auth.logout()
            st.rerun()
    try:
        login.render(user)
    except Exception as e:  # noqa: BLE001 - see _store_error
        _store_error(e)
    st.stop()

page = st.navigation([p for p in PAGES if user.role is Role.ADMIN or p.title not in ADMIN_PAGES])

with account_box:
    st.markdown(f"Signed in as **{plain(user.name)}** ({user.role.value})")
    if st.button("Log out", key="main_logout"):
        auth.logout()
        st.rerun()

try:
    st.session_state[PREVIOUS_PAGE_KEY] = st.session_state.get(CURRENT_PAGE_KEY)
    st.session_state[CURRENT_PAGE_KEY] = page.title
    page.run()
except Exception as e:  # noqa: BLE001 - a locked, read-only or full store is one sentence, not a traceback
    _store_error(e)
