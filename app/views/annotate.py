"""Annotate: findings as present / absent / not assessed, boxes on a canvas, the model's boxes as suggestions, save.

Per-browser state lives in ``st.session_state`` under ``annotate_*`` keys; the logic (opening an image,
defaults, the canvas content and its undo history, view maths, draft (de)serialisation, suggestion
numbering) is in :mod:`app.annotate_state`; this page renders and wires it. Each image load
gets a counter (``annotate_load``) that keys the findings widgets and the canvas. The canvas is redrawn
from ``annotate_base`` (boxes in original pixels) whenever ``annotate_rev`` grows (an accepted
suggestion, a deleted box, undo, a new view). What the annotator has not saved (``annotate_draft``) is
written to the store's ``draft`` table on every change (:mod:`db.drafts`) and restored when the same
annotator opens the image again, after a page change, a reload or a restart; saving or discarding
deletes it. The open image id rides in the URL (``?image=..``; the logged-in user never does) so a
reload comes back to the same image after the login, with its lease, and the draft. With several
readers per image (:mod:`db.readers`) the page shows and saves the annotator's own read; opened from
Review (``annotate_review`` holds the image id) a reviewer edits the image's label itself.
"""

from __future__ import annotations

import time
from typing import Any

import streamlit as st
from streamlit_drawable_canvas import CanvasResult, boxes_to_drawing, st_canvas

from app.annotate_state import (
    ACTION_KEY,
    DIRTY_KEY,
    IMAGE_KEY,
    STATE_HELP,
    View,
    accept,
    all_others_absent,
    boxes_to_canvas,
    canvas_key,
    canvas_to_boxes,
    current_draft,
    fit_view,
    is_dirty,
    numbered_suggestions,
    queue_action,
    redraw,
    same_boxes,
    split_findings,
    split_small,
    start_editing,
    to_payload,
    undo,
)
from app.browser import column_room, leave_guard
from app.imaging import compose, render
from app.store import CURRENT_PAGE_KEY, PREVIOUS_PAGE_KEY, annotator, sessions, store_url
from app.widgets import plain, require_project_and_name
from db.service import (
    DEFAULT_SCORE_THRESHOLD,
    FINDING_STATES,
    MIN_BOX_PX,
    NOT_ASSESSED,
    PRESENT,
    ConflictError,
    ImageDetail,
    SuggestedAction,
    annotation_view,
    discard_draft,
    drafts_of,
    leave_image,
    model_output,
    next_image,
    project_exists,
    read_draft,
    save_from_draft,
    take_image,
    write_draft,
)

Box = tuple[str, float, float, float, float]

#: Image id a reviewer opened from Review to edit its label (not their own read).
REVIEW_KEY = "annotate_review"
#: URL query parameter holding the open image (a reload reopens it).
IMAGE_PARAM = "image"
PAGE_TITLE = "Annotate"
CANVAS_SIZES = (384, 512, 640, 768, 896, 1024, 1280)
DEFAULT_CANVAS = 640
STROKE = "#ff3b30"
FILL = "rgba(255, 59, 48, 0.06)"
FONT_SIZE = 13


def _state() -> Any:
    return st.session_state


def _reviewing(image_id: int | None) -> bool:
    """Whether the open image is a reviewer's edit (opened from Review)."""
    return image_id is not None and _state().get(REVIEW_KEY) == image_id


def _load(detail: ImageDetail, who: str, *, restore: bool = True) -> None:
    """Start editing ``detail``: from the annotator's stored draft when there is one, else from the store."""
    stored = read_draft(sessions(), detail.id, who) if restore else None
    start_editing(_state(), detail, stored, opened_at=time.monotonic())


def _canvas_key() -> str:
    return canvas_key(_state())


def _canvas_boxes(view: View, width: int, height: int) -> list[Box] | None:
    """The boxes on the canvas now, in original pixels (clamped to the image); None before any edit."""
    value = _state().get(_canvas_key())
    if not isinstance(value, dict) or not isinstance(value.get("drawing"), dict):
        return None
    result = CanvasResult(json_data=value["drawing"].get("raw"), image_data_url=None, return_image_data=False)
    return canvas_to_boxes(result.boxes, view, width, height)


def _drawing(boxes: list[Box], view: View) -> dict[str, Any]:
    """The canvas drawing (Fabric JSON) of ``boxes`` given in original pixels, as ``view`` shows them."""
    drawing = boxes_to_drawing(boxes_to_canvas(boxes, view), stroke_color=STROKE, stroke_width=2, fill_color=FILL)
    for obj in drawing["objects"]:
        obj["fontSize"] = FONT_SIZE  # as the boxes drawn by hand (boxes_to_drawing leaves Fabric's default 20)
    return drawing


def _redraw(boxes: list[Box], *, undoable: bool = True) -> None:
    """Make ``boxes`` the canvas content (undoable with the Undo button)."""
    redraw(_state(), boxes, undoable=undoable)


def _go_to(image_id: int | None, who: str) -> None:
    """Leave the current image (giving its lease back) and open ``image_id`` (None: the picker)."""
    s = _state()
    current = s.get(IMAGE_KEY)
    if current is not None and current != image_id:
        leave_image(sessions(), current, who, actor=who)
    if s.get(REVIEW_KEY) != image_id:
        s.pop(REVIEW_KEY, None)
    s[IMAGE_KEY] = image_id
    s.pop("annotate_loaded_id", None)
    if image_id is None:
        st.query_params.pop(IMAGE_PARAM, None)
    else:
        st.query_params[IMAGE_PARAM] = str(image_id)


def _discard(image_id: int, who: str) -> None:
    discard_draft(sessions(), image_id, who, actor=who)
    _state()["annotate_written"] = None


def _next_image(action: str, who: str, exclude: list[int]) -> int | None:
    return next_image(sessions(), action, who, exclude, actor=who)


def _open_by_id(image_id: int, who: str) -> bool:
    """Take the image's lease (yours again after a reload) and open it; False when someone else holds it.
    An image id that does not exist is said so on the page (and the script stops)."""
    try:
        taken = take_image(sessions(), image_id, who, review=_reviewing(image_id), actor=who)
    except ValueError as e:  # no such image
        st.error(str(e))
        st.stop()
    if taken:
        _state().pop(ACTION_KEY, None)  # the task follows the image's granularity
        _go_to(image_id, who)
    return taken


@st.cache_data(ttl=30, show_spinner=False)
def _model_output(url: str, image_id: int):
    with sessions()() as session:
        return model_output(session, image_id)


st.title("Annotate")
url = store_url()
with sessions()() as session:
    has_project = project_exists(session)
who = require_project_and_name(has_project, annotator(), why="every label and box is saved under your name")

s = _state()
if s.get("annotate_who") not in (None, who):  # another user at this browser: the open image and its draft were the other's
    _go_to(None, who)  # (their lease stays theirs until it expires: nobody gives it back in their name)
s["annotate_who"] = who
if s.get(IMAGE_KEY) is None and (wanted_param := st.query_params.get(IMAGE_PARAM)):
    st.query_params.pop(IMAGE_PARAM, None)
    if wanted_param.isdigit() and not _open_by_id(int(wanted_param), who):
        st.warning(f"Image {wanted_param} is being annotated by someone else.")
notice = s.get("annotate_notice")
if notice and notice[0] == s.get(IMAGE_KEY):
    st.success(notice[1])

if s.get(IMAGE_KEY) is None:
    st.markdown("Take the best image of the queue, or open one by its id.")
    left, right = st.columns(2)
    chosen = left.selectbox("Action", [a.value for a in SuggestedAction], key="annotate_pick_action")
    if left.button("Take the next image", type="primary", key="annotate_take_next"):
        image_id = _next_image(chosen, who, [])
        if image_id is None:
            left.info("The queue is empty for this action.")
        else:
            s[ACTION_KEY] = chosen
            _go_to(image_id, who)
            st.rerun()
    wanted = right.number_input("Image id", min_value=1, step=1, value=None, key="annotate_pick_id")
    if right.button("Open", key="annotate_open_id", disabled=wanted is None) and wanted is not None:
        if _open_by_id(int(wanted), who):
            st.rerun()
        right.warning(f"Image {wanted} is being annotated by someone else.")
    drafts = drafts_of(sessions(), who)
    if drafts:
        st.markdown("**Your unsaved drafts**")
        with st.container(horizontal=True, gap="small"):
            for image_id, at in drafts:
                if st.button(f"Resume #{image_id}", key=f"annotate_resume_{image_id}", help=f"last change {at:%Y-%m-%d %H:%M} UTC"):
                    if _open_by_id(image_id, who):
                        st.rerun()
                    st.warning(f"Image {image_id} is being annotated by someone else.")
    st.stop()

try:
    detail = annotation_view(sessions(), s[IMAGE_KEY], who, review=_reviewing(s[IMAGE_KEY]))
except ValueError as e:
    st.error(str(e))
    _go_to(None, who)
    st.button("Back to the picker", key="annotate_back")
    st.stop()
if st.query_params.get(IMAGE_PARAM) != str(detail.id):
    st.query_params[IMAGE_PARAM] = str(detail.id)

if s.get("annotate_loaded_id") != detail.id:
    _load(detail, who)
elif detail.version != s["annotate_version"] and not s.get(DIRTY_KEY):
    _discard(detail.id, who)
    _load(detail, who, restore=False)
    st.info("This image was saved by someone else since you opened it; you now see their version.")

base_state, draft = s["annotate_baseline"], s["annotate_draft"]
load, task = s["annotate_load"], s["annotate_task"]
if s.get(PREVIOUS_PAGE_KEY) != PAGE_TITLE and s.get(CURRENT_PAGE_KEY) == PAGE_TITLE:
    # back from another page (its widget states are gone): redraw the canvas from the draft
    if not same_boxes(draft["boxes"], s["annotate_base"]) or _canvas_key() not in s:
        _redraw([tuple(b) for b in draft["boxes"]], undoable=False)

if restored := s.get("annotate_restored"):
    if restored[0] == detail.id and s.get(DIRTY_KEY):
        st.info(f"Restored your unsaved draft of image {detail.id} (last change {restored[1]:%Y-%m-%d %H:%M:%S} UTC).")

if detail.version != s["annotate_version"]:
    st.error(f"Someone else saved image {detail.id} after you opened it (you edit version {s['annotate_version']}, "
             f"the store has {detail.version}). Your changes are not saved; reload to see theirs, then redo yours.")
    if st.button("Reload their version (discard mine)", key="annotate_reload"):
        _discard(detail.id, who)
        _load(detail, who, restore=False)
        st.rerun()
if detail.leased_by:
    st.warning(f"{plain(detail.leased_by)} is annotating this image too (they hold its lease). Saves are version-checked.")

if _reviewing(detail.id):
    st.info("Reviewing: your save becomes this image's training label (the readers' reads stay as they are).")
st.caption(f"Image **#{detail.id}** · {detail.width}x{detail.height} px · {detail.granularity} · "
           f"{detail.split or 'no split'} · version {detail.version} · task: **{task}** · `{detail.path}`")

# --- view controls -----------------------------------------------------------------------------
with st.expander("View: window / level, invert, size, zoom", expanded=False):
    c1, c2, c3, c4 = st.columns(4)
    level = c1.slider("Level (%)", 0, 100, 50, key="annotate_level")
    window_width = c2.slider("Window (%)", 1, 100, 100, key="annotate_window")
    invert = c3.toggle("Invert", key="annotate_invert")
    max_side = c4.select_slider("Canvas size (px)", CANVAS_SIZES, value=DEFAULT_CANVAS, key="annotate_size",
                                help="the largest side of the canvas; it never gets wider than its column, nor taller than the window below its top")
    z1, z2, z3 = st.columns([1, 2, 2])
    zoom = z1.select_slider("Zoom", (1, 2, 3, 4), value=1, key="annotate_zoom", format_func=lambda z: f"{z}x",
                            help="shows a part of the image, resampled from the original pixels")
    centre_x = z2.slider("Zoom centre, left to right (%)", 0, 100, 50, key="annotate_zoom_x", disabled=zoom == 1)
    centre_y = z3.slider("Zoom centre, top to bottom (%)", 0, 100, 50, key="annotate_zoom_y", disabled=zoom == 1)

output = _model_output(url, detail.id)
handled = s["annotate_handled"]

main, side = st.columns([3, 2], gap="medium")
with main:
    column, room = column_room("annotate_column_width")
view = fit_view(detail.width, detail.height, max_side, column, room, zoom=zoom, centre=(centre_x / 100, centre_y / 100))
if s.get("annotate_view") not in (None, view):
    _redraw([tuple(b) for b in draft["boxes"]], undoable=False)
s["annotate_view"] = view

actions = side.container()  # Save buttons and messages, filled in once the draft of this run is known

with side:
    if output.model_version_id is None:
        st.info("No model version yet: model suggestions appear after the trainer's first round.")
        show_boxes, attention_class, threshold = False, None, DEFAULT_SCORE_THRESHOLD
    else:
        t1, t2 = st.columns(2)
        show_boxes = t1.toggle("Show model boxes", value=True, key="annotate_show_suggestions")
        default_threshold = output.score_threshold if output.score_threshold is not None else DEFAULT_SCORE_THRESHOLD
        threshold = st.slider(
            "Suggestion score threshold", 0.0, 1.0, float(default_threshold), 0.05, key="annotate_threshold",
            help="boxes scoring below it are hidden" + (" (default: the model's val threshold)" if output.score_threshold is not None
                                                          else f" (default {DEFAULT_SCORE_THRESHOLD}: the model recorded no val threshold)"),
        )
        if output.attention:
            attention_on = t2.toggle("Attention map", key="annotate_attention")
            attention_class = st.selectbox("Attention of", sorted(output.attention), key="annotate_attention_class") if attention_on else None
        else:
            t2.toggle("Attention map", value=False, disabled=True, key="annotate_attention_none",
                      help="This model version stored no attention maps for this image.")
            st.caption("No attention maps are available for this image.")
            attention_class = None

open_suggestions = numbered_suggestions(output.boxes, handled, threshold)
try:
    base_image = render(detail.path, (view.width, view.height), float(level), float(window_width), bool(invert),
                        crop=view.crop if zoom > 1 else None)
except ValueError as e:
    st.error(f"Cannot show image {detail.id}: {e}")
    st.stop()
background = compose(
    base_image, view.scale,
    [b for _, b in open_suggestions] if show_boxes else [],
    output.attention.get(attention_class) if attention_class else None,
    origin=(view.x0, view.y0), image_size=(detail.width, detail.height),
)

classes = detail.classes
current_class = s.get("annotate_class") if s.get("annotate_class") in classes else classes[0]
with main:
    st_canvas(
        background_image=background, width=view.width, height=view.height, drawing_mode="labeled_rect", label=current_class,
        initial_drawing=_drawing(s["annotate_base"], view),
        stroke_color=STROKE, stroke_width=2, fill_color=FILL, font_size=FONT_SIZE,
        key=_canvas_key(),
    )
    with st.container(horizontal=True, gap="small"):  # below the canvas, so the image starts high on the page
        for k, name in enumerate(classes[:9], 1):
            st.button(f"{name}", key=f"annotate_cls_{k}", shortcut=str(k), type="primary" if name == current_class else "secondary",
                      on_click=lambda n=name: s.__setitem__("annotate_class", n), help=f"draw {name} boxes (key {k})")
    zoom_note = f" Zoomed {zoom}x: x {view.x0:.0f}-{view.x1:.0f}, y {view.y0:.0f}-{view.y1:.0f} px." if zoom > 1 else ""
    st.caption("Draw a box by dragging; the class is the highlighted button (keys 1-9). Toolbar: Edit to move, resize or "
               "relabel a box, Delete selected, Undo / Redo. Yellow dashed boxes are the model's suggestions." + zoom_note)

drawn = _canvas_boxes(view, detail.width, detail.height)
live = list(s["annotate_base"]) if drawn is None else drawn
live, small = split_small(live, MIN_BOX_PX)
if small:
    sizes = ", ".join(f"{b[3] - b[1]:.1f} x {b[4] - b[2]:.1f} px" for b in small)
    s["annotate_box_notice"] = (f"Not kept: a box of {sizes} is smaller than the minimum {MIN_BOX_PX:g} px per side "
                                "(image pixels). Drag to draw a box; a click is not a box.")
    _redraw(live, undoable=False)
    st.rerun()

with side:
    st.markdown("**Findings**")
    st.caption(" · ".join(f"**{state}**: {meaning}" for state, meaning in STATE_HELP.items()))
    boxed = {b[0] for b in live}
    findings = {}
    gen = f"{load}x{s['annotate_findgen']}"  # "All others absent" starts a new generation of these widgets
    for k, name in enumerate(classes):
        # The widgets take their value from the draft (index=) and their state is never written from here:
        # Streamlit drops a widget state written through session_state when a rerun interrupts the first
        # render, and then a radio showed its first option ("present") for every class.
        if name in boxed:
            st.radio(name, FINDING_STATES, index=0, key=f"annotate_find_{gen}_{k}_boxed", horizontal=True, disabled=True,
                     help="present: a box of this class is drawn")
            findings[name] = PRESENT
        else:
            chosen = st.radio(name, FINDING_STATES, index=FINDING_STATES.index(draft["findings"].get(name, NOT_ASSESSED)),
                              key=f"annotate_find_{gen}_{k}", horizontal=True)
            findings[name] = chosen if chosen in FINDING_STATES else NOT_ASSESSED

    def _all_others_absent() -> None:
        current = s["annotate_draft"]
        current["findings"] = all_others_absent(current["findings"], current["boxes"])
        s["annotate_findgen"] += 1

    st.button("All others absent", key=f"annotate_others_absent_{load}", on_click=_all_others_absent,
              help="every class not marked present (and without a box) becomes absent")
    no_finding = st.checkbox("No finding (every class absent, no box)", value=draft["no_finding"], key=f"annotate_nofind_{load}")
    complete = st.checkbox("All lesions are boxed (image becomes full)", value=draft["complete"], key=f"annotate_complete_{load}",
                           help="ticked only when every lesion of every present finding has its box")

    if output.model_version_id is not None:
        st.markdown(f"**Model suggestions** (version {output.model_version_id})")
        if output.image_probs:
            top = sorted(output.image_probs.items(), key=lambda kv: -kv[1])[:3]
            st.caption("Image-level: " + ", ".join(f"{n} {p:.2f}" for n, p in top))
        hidden = sum(1 for k, b in enumerate(output.boxes) if k not in handled and float(b.get("score", 0)) < threshold)
        if not open_suggestions:
            st.caption("No (more) boxes suggested for this image" + (f" at or above {threshold:.2f} ({hidden} below)." if hidden else "."))
        else:
            with st.container(horizontal=True, gap="small"):
                if st.button(f"Accept all {len(open_suggestions)} at or above {threshold:.2f}", key=f"annotate_accept_all_{load}"):
                    boxes = list(live)
                    for k, box in open_suggestions:
                        boxes = accept(boxes, box)
                        handled.append(k)
                    _redraw(boxes)
                    st.rerun()
                if st.button(f"Reject all {len(open_suggestions)}", key=f"annotate_reject_all_{load}"):
                    handled.extend(k for k, _ in open_suggestions)
                    st.rerun()
            if hidden:
                st.caption(f"{hidden} more below the threshold.")
        for k, box in open_suggestions:
            with st.container(horizontal=True, gap="small", vertical_alignment="center"):
                st.markdown(f"**S{box['number']}** {box.get('class')} · {float(box.get('score', 0)):.2f}")
                if st.button("Accept", key=f"annotate_accept_{load}_{k}", help="add it to your boxes; adjust it with Edit"):
                    _redraw(accept(live, box))
                    handled.append(k)
                    st.rerun()
                if st.button("Reject", key=f"annotate_reject_{load}_{k}"):
                    handled.append(k)
                    st.rerun()

    st.markdown(f"**Boxes** ({len(live)})")
    for k, (name, x1, y1, x2, y2) in enumerate(live):
        with st.container(horizontal=True, gap="small", vertical_alignment="center"):
            st.caption(f"{k + 1}. {name or '(no class)'} ({x1:.0f}, {y1:.0f}) - ({x2:.0f}, {y2:.0f})")
            if st.button("Delete", key=f"annotate_delete_{load}_{s['annotate_rev']}_{k}"):
                _redraw(live[:k] + live[k + 1 :])
                st.rerun()
    if s["annotate_history"] and st.button("Undo last accept/delete", key="annotate_undo"):
        undo(s)
        st.rerun()

draft = current_draft(findings, no_finding, complete, live, task)
s["annotate_draft"] = draft
dirty = is_dirty(draft, base_state)
s[DIRTY_KEY] = dirty
payload = to_payload(draft)
if dirty and payload != s.get("annotate_written"):
    write_draft(sessions(), detail.id, who, payload, base_version=s["annotate_version"], actor=who)
    s["annotate_written"] = payload
elif not dirty and s.get("annotate_written") is not None:
    _discard(detail.id, who)
leave_guard(dirty, key="annotate_leave_guard")


def _save() -> str | None:
    """Save the draft (and drop it from the store); the image's new granularity, or None (refused: the message stays)."""
    present, absent = split_findings(draft["findings"])
    try:
        granularity = save_from_draft(
            sessions(), detail.id, present=present, absent=absent, no_finding=no_finding, boxes=live, complete=complete,
            annotator=who, expected_version=s["annotate_version"], action=queue_action(task), before=detail.granularity,
            seconds=time.monotonic() - s.get("annotate_opened_at", time.monotonic()), review=_reviewing(detail.id),
            actor=who,
        )
    except (ConflictError, ValueError, PermissionError) as e:  # PermissionError: the role changed (db.roles)
        s["annotate_error"] = (f"Not saved: {e}", payload)
        return None
    s["annotate_written"] = None
    s.pop("annotate_loaded_id", None)
    s.pop("annotate_restored", None)
    return granularity


with actions:
    with st.container(horizontal=True, gap="small"):
        save = st.button("Save", type="primary", key="annotate_save", shortcut="Ctrl+Enter")
        save_next = st.button("Save & next", key="annotate_save_next", shortcut="Shift+Enter")
        skip = st.button("Next", key="annotate_skip", shortcut="Ctrl+Right", help="leave this image unchanged")
    error = s.get("annotate_error")
    if error and error[1] != payload:
        s.pop("annotate_error")  # the annotator changed something since the refusal
    elif error:
        st.error(error[0])
        st.button("Dismiss", key="annotate_dismiss_error", on_click=lambda: s.pop("annotate_error", None))
    if box_notice := s.get("annotate_box_notice"):
        st.warning(box_notice)
        st.button("OK", key="annotate_dismiss_box_notice", on_click=lambda: s.pop("annotate_box_notice", None))
    if dirty:
        st.warning("Unsaved changes (kept as your draft in the store until you save or discard them).")

if save or save_next:
    reviewed = _reviewing(detail.id)
    granularity = _save()
    if granularity is not None:
        message = f"Saved image {detail.id} ({granularity})."
        target: int | None = detail.id
        if save_next and reviewed:  # the next image to review is on Review, not in the annotation queue
            _go_to(None, who)
            target, message = None, message + " Pick the next image to review on **Review**."
        elif save_next:
            target = _next_image(queue_action(task), who, [detail.id])
            _go_to(target, who)
            message += " The queue is empty." if target is None else ""
        s["annotate_notice"] = (target, message)
    st.rerun()
if skip:
    if dirty:
        s["annotate_confirm_leave"] = True
    else:
        _go_to(_next_image(queue_action(task), who, [detail.id]), who)
        st.rerun()
if s.get("annotate_confirm_leave"):
    with actions:
        st.warning("This image has unsaved changes. Leave it anyway?")
        if st.button("Discard changes and go to the next image", key="annotate_discard"):
            _discard(detail.id, who)
            _go_to(_next_image(queue_action(task), who, [detail.id]), who)
            st.rerun()
