"""Review: images whose readers have all read them (disagreements first), the reads side by side with
their boxes, and the reviewer's accept / merge (weighted box fusion) / edit; the project's readers per
image and the readers' agreement. The logic is :mod:`db.readers`; each write checks the reviewer there."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from app.imaging import fit, outline, render
from app.store import annotator, may, sessions
from app.widgets import plain
from db.lifecycle import ConflictError
from db.readers import (
    MAX_READERS,
    accept_read,
    merge_reads,
    project_agreement,
    readers_per_image,
    release_image,
    review_detail,
    review_queue,
    set_readers_per_image,
    take_image,
)
from db.service import image_detail, project_exists

#: Side (px) of each read's picture.
SIDE = 320
SELECTED_KEY = "review_image_id"
MESSAGE_KEY = "review_message"  # a review's outcome, shown by the reads
SETTING_MESSAGE_KEY = "review_setting_message"  # the readers setting's, shown under it
REQUEST_KEY = "review_request"
#: Annotate's keys (app/views/annotate.py) set to open an image there as the reviewer's edit.
OPEN_IMAGE_KEY, OPEN_REVIEW_KEY = "annotate_image_id", "annotate_review"


def _number(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _picture(path: str, width: int, height: int, boxes) -> None:
    size = fit(width, height, SIDE, SIDE)
    try:
        st.image(outline(render(path, size), size[0] / width, boxes), width=size[0])
    except ValueError as e:  # the file is missing or unreadable: the boxes are still listed
        st.caption(f"Image not shown: {e}")


def _findings(labels: dict[str, bool], no_finding: bool, complete: bool, boxes) -> str:
    present = sorted({n for n, p in labels.items() if p} | {b[0] for b in boxes})
    absent = sorted(n for n, p in labels.items() if not p and n not in present)
    parts = ["**No finding**" if no_finding else f"present: {', '.join(present) or '-'}"]
    if absent:
        parts.append(f"absent: {', '.join(absent)}")
    parts.append(f"{len(boxes)} box(es)" + (", all lesions boxed" if complete else ""))
    return " · ".join(parts)


def _show_message(key: str) -> None:
    if message := st.session_state.pop(key, None):
        (st.success if message[0] == "success" else st.error)(message[1])


def _request(action: str, image_id: int, version: int, read_id: int | None = None) -> None:
    """A review button's callback: remember what the click was for (the image and the version the page
    showed when it drew the button). The page body carries it out after the login check, so a click
    after someone else reviewed the image is refused as a conflict instead of acting on whatever image
    the list shows by then."""
    st.session_state[REQUEST_KEY] = (action, image_id, version, read_id)


def _act(image_id: int, write) -> None:
    """Run one review write (``write(session)``, passing the logged-in user as ``actor``) in its own
    transaction; its refusal (stale version, no reviewer right: a :class:`~db.roles.PermissionDenied`,
    bad input) becomes a message."""
    try:
        with sessions().begin() as session:
            write(session)
        st.session_state[MESSAGE_KEY] = ("success", f"Image {image_id}: saved as its training label.")
    except (ConflictError, ValueError, PermissionError) as e:
        st.session_state[MESSAGE_KEY] = ("error", f"Not saved: {e}")


def _carry_out(request: tuple[str, int, int, int | None], who: str) -> None:
    action, image_id, version, read_id = request
    if action == "accept" and read_id is not None:
        _act(image_id, lambda session: accept_read(session, image_id, read_id=read_id, reviewer=who,
                                                   expected_version=version, actor=who))
    elif action == "merge":
        _act(image_id, lambda session: merge_reads(session, image_id, reviewer=who, expected_version=version, actor=who))
    elif action == "edit":
        _edit(image_id, version, who)


def _edit(image_id: int, version: int, who: str) -> None:
    """Open the image in Annotate as the reviewer's edit of its label (refused with a message for a
    user who is no reviewer, or when the image changed since the page showed it at ``version``)."""
    try:
        with sessions().begin() as session:
            if image_detail(session, image_id).version != version:
                st.session_state[MESSAGE_KEY] = ("error", f"Image {image_id} was reviewed by someone else meanwhile: "
                                                 "look at its label again before editing it.")
                return
            current = st.session_state.get(OPEN_IMAGE_KEY)
            if current is not None and current != image_id:
                release_image(session, current, who, actor=who)
            taken = take_image(session, image_id, who, review=True, actor=who)
    except PermissionError as e:
        st.session_state[MESSAGE_KEY] = ("error", f"Not opened: {e}")
        return
    if not taken:
        st.session_state[MESSAGE_KEY] = ("error", f"Image {image_id} is being edited by someone else.")
        return
    st.session_state[OPEN_IMAGE_KEY] = image_id
    st.session_state[OPEN_REVIEW_KEY] = image_id
    st.session_state.pop("annotate_action", None)
    st.session_state.pop("annotate_loaded_id", None)
    st.switch_page("views/annotate.py")


st.title("Review")
with sessions()() as session:
    has_project = project_exists(session)
if not has_project:
    st.info("The store has no project yet: see **Overview**.")
    st.stop()
who = annotator()
if (request := st.session_state.pop(REQUEST_KEY, None)) and who:
    _carry_out(request, who)  # a message, or Annotate opens

with sessions()() as session:
    n = readers_per_image(session)
    agreement = project_agreement(session)
with st.expander(f"Readers per image: **{n}**", expanded=n == 1):
    st.caption("With more than one, the queue hands each image to that many different annotators, each reading "
               "blind; their consensus trains until a reviewer resolves the image here.")
    wanted = st.number_input("Readers per image", min_value=1, max_value=MAX_READERS, value=n, step=1, key="review_readers")
    if not may("admin"):
        st.caption("An admin can change it.")
    elif st.button("Set", key="review_set_readers", disabled=not who or wanted == n) and who:  # who: disabled without one
        try:
            with sessions().begin() as session:
                settled = set_readers_per_image(session, int(wanted), annotator=who, actor=who)
            st.session_state[SETTING_MESSAGE_KEY] = ("success", f"Readers per image: {int(wanted)}"
                                             + (f"; {settled} image(s) got their consensus." if settled else "."))
        except (ValueError, PermissionError) as e:
            st.session_state[SETTING_MESSAGE_KEY] = ("error", str(e))
        st.rerun()

_show_message(SETTING_MESSAGE_KEY)

if not agreement["images"]:
    st.caption("Agreement between readers: no image has all its reads yet.")
else:  # folded: the review below is the page's work, the statistics are for looking up
    with st.expander(f"Agreement between readers: {agreement['images']} image(s) with all {agreement['readers']} "
                     f"reads, readers disagree on {agreement['disagree']}, box F1 {_number(agreement['box_f1'])}"):
        st.caption("Box F1 at IoU 0.4 over every pair of readers. Kappa is n/a where undefined (every reader gave "
                   "one same answer, or nobody assessed the class).")
        st.dataframe(pd.DataFrame([{"class": r["class"], "Cohen's kappa": _number(r["cohen_kappa"]),
                                    "Fleiss' kappa": _number(r["fleiss_kappa"]), "box F1": _number(r["box_f1"]),
                                    "boxes": r["boxes"]} for r in agreement["per_class"]]),
                     hide_index=True, key="review_agreement")

st.subheader("Waiting for review")
include_reviewed = st.toggle("Also reviewed images", key="review_include_reviewed")
with sessions()() as session:
    rows = review_queue(session, include_reviewed=include_reviewed)
if not rows:
    _show_message(MESSAGE_KEY)
    st.info("Nothing to review: images appear here once all their readers have read them.")
    st.stop()
st.dataframe(pd.DataFrame([{"image": r["image_id"], "status": r["status"], "reason": r["reason"],
                            "readers": ", ".join(r["readers"]), "label agreement": _number(r["label_agreement"]),
                            "box F1": _number(r["box_f1"])} for r in rows]), hide_index=True, key="review_table")
ids = [r["image_id"] for r in rows]
if st.session_state.get(SELECTED_KEY) not in ids:
    st.session_state[SELECTED_KEY] = ids[0]
image_id = st.selectbox("Image", ids, key=SELECTED_KEY,
                        format_func=lambda i: f"#{i} · " + next(r["reason"] for r in rows if r["image_id"] == i))
if not who:
    st.warning("Log in first: a review is saved under your name.")
    st.stop()
reviewer = may("reviewer")  # the buttons are a reviewer's; the writes check the role again
if not reviewer:
    st.caption("A reviewer can accept, merge or edit these reads.")

_show_message(MESSAGE_KEY)  # by the reads and their buttons, where the click was
with sessions()() as session:
    detail = review_detail(session, image_id)
image, image_reads = detail["image"], detail["reads"]
status = "reviewed" if detail["status"] == "reviewed" else "consensus, not reviewed"
st.caption(f"Image **#{image.id}** · {image.width}x{image.height} px · training label now: **{status}** "
           f"({image.granularity}) · version {image.version} · `{image.path}`")

columns = st.columns(len(image_reads) + 1, gap="small")
for column, read in zip(columns, image_reads):
    with column:
        st.markdown(f"**{plain(read.reader)}**")
        _picture(image.path, image.width, image.height, read.boxes)
        st.markdown(_findings(read.labels, read.no_finding, read.complete, read.boxes))
        st.caption(f"read {read.id}, saved {read.saved_at:%Y-%m-%d %H:%M} UTC")
        if reviewer:
            st.button("Accept this read", key=f"review_accept_{read.id}", on_click=_request,
                      args=("accept", image.id, image.version, read.id))
with columns[-1]:
    st.markdown(f"**Training label ({status})**")
    _picture(image.path, image.width, image.height, image.boxes)
    st.markdown(_findings(image.labels, image.no_finding, image.boxes_complete, image.boxes))
    if reviewer:
        st.button("Merge boxes (weighted box fusion)", key="review_merge",
                  help="every reader's boxes fused at IoU 0.4; findings by majority (ties present)",
                  on_click=_request, args=("merge", image.id, image.version))
        st.button("Edit in Annotate", key="review_edit", help="open the image in Annotate; your save becomes its label",
                  on_click=_request, args=("edit", image.id, image.version))
