"""The OXnet workbench UI: ``streamlit run app/main.py``.

Routes the pages of ``app/views`` with ``st.navigation``, asks once per browser session who is
annotating, and on a store without a project starts seeding the synthetic demo project as a
background job (set ``OXNET_DEMO=0`` to only offer it on the Overview page).

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

from app.jobs import AUTO_DEMO_ENV, start_demo_job
from app.store import (
    CURRENT_PAGE_KEY,
    PREVIOUS_PAGE_KEY,
    annotator,
    forget_annotator,
    read_only,
    sessions,
    set_annotator,
    shown_store_url,
    store_error,
    store_url,
)
from app.widgets import page_icon, plain
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
]
page = st.navigation(PAGES)

with st.sidebar:
    name = annotator()
    if name:
        st.markdown(f"Annotating as **{plain(name)}**")
        if st.button("Switch annotator", key="main_switch_annotator"):
            forget_annotator()
            st.rerun()
    else:
        with st.form("main_annotator_form", border=False):
            entered = st.text_input("Your name", placeholder="e.g. dr.lee", max_chars=64,
                                    help="Recorded with every label and box you save (at most 64 characters; "
                                         "not 'trainer' or a name with ':', which the workbench uses itself).")
            if st.form_submit_button("Start annotating"):
                try:
                    set_annotator(entered)
                    st.rerun()
                except ValueError as e:
                    st.error(str(e))
    st.caption(f"Store: `{shown_store_url()}`")

try:
    with sessions()() as session:
        fresh = not project_exists(session)
    if fresh and os.environ.get(AUTO_DEMO_ENV, "1") != "0" and not read_only():
        start_demo_job(store_url())  # no-op when it ran or runs already
    st.session_state[PREVIOUS_PAGE_KEY] = st.session_state.get(CURRENT_PAGE_KEY)
    st.session_state[CURRENT_PAGE_KEY] = page.title
    page.run()
except ArgumentError:  # its message repeats the URL, password included
    st.error(f"Cannot parse the store URL `{shown_store_url()}`: set OXNET_DB_URL to an SQLAlchemy URL and restart.")
except Exception as e:  # noqa: BLE001 - a locked, read-only or full store is one sentence, not a traceback
    message = store_error(e)
    if message is None:
        raise
    st.error(message)
