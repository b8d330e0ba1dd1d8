"""The OXnet workbench UI: ``streamlit run app/main.py``.

Routes the pages of ``app/views`` with ``st.navigation``, asks once per browser session who is
annotating, and on a store without a project starts seeding the synthetic demo project as a
background job (set ``OXNET_DEMO=0`` to only offer it on the Overview page).
"""

from __future__ import annotations

import os

import streamlit as st

from app.jobs import AUTO_DEMO_ENV, start_demo_job
from app.store import CURRENT_PAGE_KEY, PREVIOUS_PAGE_KEY, annotator, forget_annotator, sessions, set_annotator, store_url
from db.ui_queries import project_exists

st.set_page_config(page_title="OXnet workbench", page_icon=":material/radiology:", layout="wide")

PAGES = [
    st.Page("views/overview.py", title="Overview", icon=":material/dashboard:", default=True),
    st.Page("views/queue.py", title="Queue", icon=":material/view_module:"),
    st.Page("views/annotate.py", title="Annotate", icon=":material/edit_square:"),
    st.Page("views/metrics.py", title="Metrics", icon=":material/monitoring:"),
    st.Page("views/data.py", title="Data", icon=":material/database:"),
]
page = st.navigation(PAGES)

with st.sidebar:
    name = annotator()
    if name:
        st.markdown(f"Annotating as **{name}**")
        if st.button("Switch annotator", key="main_switch_annotator"):
            forget_annotator()
            st.rerun()
    else:
        with st.form("main_annotator_form", border=False):
            entered = st.text_input("Your name", placeholder="e.g. dr.lee", help="Recorded with every label and box you save.")
            if st.form_submit_button("Start annotating"):
                try:
                    set_annotator(entered)
                    st.rerun()
                except ValueError as e:
                    st.error(str(e))
    st.caption(f"Store: `{store_url()}`")

with sessions()() as session:
    fresh = not project_exists(session)
if fresh and os.environ.get(AUTO_DEMO_ENV, "1") != "0":
    start_demo_job(store_url())  # no-op when it ran or runs already

st.session_state[PREVIOUS_PAGE_KEY] = st.session_state.get(CURRENT_PAGE_KEY)
st.session_state[CURRENT_PAGE_KEY] = page.title
page.run()
