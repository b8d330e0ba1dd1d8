"""Queue: the images worth labelling next, best first, as a thumbnail grid; a click opens Annotate."""

from __future__ import annotations

import streamlit as st

from app.annotate_state import ACTION_KEY, DIRTY_KEY, IMAGE_KEY
from app.imaging import thumbnail
from app.store import annotator, sessions, store_url
from app.widgets import require_project_and_name
from db.service import Split, SuggestedAction, project_classes, project_exists, queue, take_image

COLUMNS = 4
PER_PAGE = 24


@st.cache_data(ttl=5, show_spinner=False)
def _page(url: str, action: str, who: str, class_name: str | None, split: str | None, page: int) -> list:
    with sessions()() as session:
        return queue(session, action, annotator=who, class_name=class_name, split=split, limit=PER_PAGE, offset=page * PER_PAGE)


@st.cache_data(ttl=60, show_spinner=False)
def _classes(url: str) -> list[str]:
    with sessions()() as session:
        return project_classes(session) if project_exists(session) else []


def gain_text(item) -> str:
    """"expected +0.12 mAP points per minute (2.0 min)", per unit while costs are not measured, or the
    ranking's name when the strategy makes no estimate."""
    if item.gain_per_minute is not None:
        return f"expected **+{100 * item.gain_per_minute:.3f}** mAP points per minute · cost {item.cost:g} units"
    if item.gain_per_unit is not None:
        return (f"expected **+{100 * item.gain_per_unit:.3f}** mAP points per unit · cost {item.cost:g} units "
                "(per minute once saves are timed)")
    if item.strategy:
        return f"ranked by {item.strategy} (no gain estimate)"
    return "not ranked yet"


def _open(image_id: int, action: str, who: str) -> None:
    """Take the image's lease and switch to Annotate (refused while someone else holds it)."""
    if not take_image(sessions(), image_id, who, actor=who):
        st.session_state["queue_message"] = f"Image {image_id} is being annotated by someone else; pick another."
        _page.clear()
        st.rerun()
    st.session_state[IMAGE_KEY] = image_id
    st.session_state[ACTION_KEY] = action
    st.session_state[DIRTY_KEY] = False
    st.switch_page("views/annotate.py")


st.title("Queue")
url = store_url()
classes = _classes(url)
who = require_project_and_name(bool(classes), annotator(), why="the queue hands each image to one annotator at a time")

left, middle, right, pager = st.columns([2, 2, 1, 1])
action = left.selectbox("Action", [a.value for a in SuggestedAction], key="queue_action",
                        help="add image-level labels: unlabeled images; draw boxes: unlabeled and weak images")
class_name = middle.selectbox("Class", ["any class", *classes], key="queue_class")
split = right.selectbox("Split", ["any split", *[s.value for s in Split]], key="queue_split")
page = pager.number_input("Page", min_value=1, value=1, step=1, key="queue_page") - 1
items = _page(url, action, who, None if class_name == "any class" else class_name, None if split == "any split" else split, page)

if message := st.session_state.pop("queue_message", None):
    st.warning(message)
if st.session_state.get(DIRTY_KEY) and st.session_state.get(IMAGE_KEY) is not None:
    st.warning(f"Image {st.session_state[IMAGE_KEY]} has unsaved changes on **Annotate**; they stay your draft of it if you open another image.")
if not items:
    st.info("Nothing waiting for this action and these filters." if page == 0 else "No more images: go back a page.")
    st.stop()
if items[0].score is None:
    st.caption("No model has ranked the images yet: they are listed in store order until the trainer's first round.")

for start in range(0, len(items), COLUMNS):
    for col, item in zip(st.columns(COLUMNS), items[start : start + COLUMNS], strict=False):
        with col.container(border=True):
            data = thumbnail(item.path)
            if data is None:
                st.error("file not readable")
            else:
                st.image(data, width="stretch")
            st.markdown(f"**#{item.image_id}** · {item.granularity} · {item.split or 'no split'} · **{item.action}**")
            st.markdown(gain_text(item))
            st.caption(item.reason or "")
            if st.button(f"Open #{item.image_id}", key=f"queue_open_{item.image_id}", width="stretch"):
                _open(item.image_id, action, who)
