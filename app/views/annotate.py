"""Annotate: findings as checkboxes, boxes on a canvas, the model's boxes as suggestions, save.

State lives in ``st.session_state`` under ``annotate_*`` keys. Each image load gets a counter
(``annotate_load``): the findings widgets and the canvas are keyed by it, so a new image starts clean.
The canvas is redrawn from ``annotate_base`` (boxes in original pixels) whenever ``annotate_rev`` grows
(a suggestion accepted, a box deleted, undo); what is on the canvas is read back from the component's
state every run into ``annotate_draft``, which survives switching pages.
"""

from __future__ import annotations

import time
from typing import Any

import streamlit as st
from streamlit_drawable_canvas import CanvasResult, boxes_to_drawing, st_canvas

from app.imaging import compose, fit, render
from app.store import annotator, sessions, store_url
from db.costs import record_save
from db.lifecycle import ConflictError
from db.models import SuggestedAction
from db.repository import release_lease, take_lease
from db.ui_queries import ImageDetail, claim_next_image, image_detail, model_output, project_exists, save_annotation

Box = tuple[str, float, float, float, float]

IMAGE_KEY = "annotate_image_id"
ACTION_KEY = "annotate_action"
DIRTY_KEY = "annotate_dirty"
#: Boxes closer than this (original pixels) count as unchanged (canvas round trips move them a little).
TOLERANCE_PX = 0.5
CANVAS_SIZES = (512, 640, 768, 896, 1024, 1280)
STROKE = "#ff3b30"
FILL = "rgba(255, 59, 48, 0.06)"
FONT_SIZE = 13


def _state() -> Any:
    return st.session_state


def _load(detail: ImageDetail, action: str) -> None:
    """Start editing ``detail`` from what the store holds."""
    s = _state()
    s["annotate_load"] = s.get("annotate_load", 0) + 1
    s["annotate_loaded_id"] = detail.id
    s["annotate_version"] = detail.version
    s["annotate_base"] = list(detail.boxes)
    s["annotate_history"] = []
    s["annotate_handled"] = []
    s["annotate_rev"] = 0
    s["annotate_opened_at"] = time.monotonic()  # the save's active seconds (db.costs) count from here
    baseline = {
        "present": sorted(name for name, present in detail.labels.items() if present),
        "no_finding": detail.no_finding,
        "complete": detail.boxes_complete or action == SuggestedAction.DRAW_BOXES.value,
        "boxes": list(detail.boxes),
    }
    s["annotate_baseline"] = baseline
    s["annotate_draft"] = dict(baseline)
    s.pop("annotate_confirm_leave", None)
    s[DIRTY_KEY] = False


def _canvas_key() -> str:
    return f"annotate_canvas_{_state()['annotate_load']}_{_state()['annotate_rev']}"


def _live(scale: float, width: int, height: int) -> list[Box]:
    """The boxes on the canvas now, in original pixels (clamped to the image), or the base before any edit."""
    value = _state().get(_canvas_key())
    if not isinstance(value, dict) or not isinstance(value.get("drawing"), dict):
        return list(_state()["annotate_base"])
    result = CanvasResult(json_data=value["drawing"].get("raw"), image_data_url=None, return_image_data=False)
    boxes = []
    for b in result.boxes:
        x1, y1 = b["left"] / scale, b["top"] / scale
        x2, y2 = (b["left"] + b["width"]) / scale, (b["top"] + b["height"]) / scale
        x1, x2 = sorted((min(max(x1, 0.0), width), min(max(x2, 0.0), width)))
        y1, y2 = sorted((min(max(y1, 0.0), height), min(max(y2, 0.0), height)))
        boxes.append((str(b["label"]), round(x1, 2), round(y1, 2), round(x2, 2), round(y2, 2)))
    return boxes


def _drawing(boxes: list[Box], scale: float) -> dict[str, Any]:
    """The canvas drawing (Fabric JSON) of ``boxes`` given in original pixels, shown ``scale`` times larger."""
    drawing = boxes_to_drawing(
        [{"label": n, "left": x1 * scale, "top": y1 * scale, "width": (x2 - x1) * scale, "height": (y2 - y1) * scale}
         for n, x1, y1, x2, y2 in boxes],
        stroke_color=STROKE, stroke_width=2, fill_color=FILL,
    )
    for obj in drawing["objects"]:
        obj["fontSize"] = FONT_SIZE  # as the boxes drawn by hand (boxes_to_drawing leaves Fabric's default 20)
    return drawing


def _same_boxes(a: list[Box], b: list[Box]) -> bool:
    if len(a) != len(b):
        return False
    return all(p[0] == q[0] and all(abs(u - v) <= TOLERANCE_PX for u, v in zip(p[1:], q[1:], strict=True))
               for p, q in zip(sorted(a), sorted(b), strict=True))


def _dirty(draft: dict, baseline: dict) -> bool:
    return (
        sorted(draft["present"]) != sorted(baseline["present"])
        or draft["no_finding"] != baseline["no_finding"]
        or draft["complete"] != baseline["complete"]
        or not _same_boxes(draft["boxes"], baseline["boxes"])
    )


def _redraw(boxes: list[Box]) -> None:
    """Make ``boxes`` the canvas content (undoable with the Undo button)."""
    s = _state()
    s["annotate_history"].append(list(s["annotate_base"]))
    s["annotate_base"] = list(boxes)
    s["annotate_rev"] += 1


def _go_to(image_id: int | None, who: str) -> None:
    """Leave the current image (giving its lease back) and open ``image_id`` (None: the picker)."""
    s = _state()
    current = s.get(IMAGE_KEY)
    if current is not None and current != image_id:
        with sessions().begin() as session:
            release_lease(session, current, who)
    s[IMAGE_KEY] = image_id
    s.pop("annotate_loaded_id", None)


def _next_image(action: str, who: str, exclude: list[int]) -> int | None:
    with sessions().begin() as session:
        return claim_next_image(session, action, annotator=who, exclude=exclude)


@st.cache_data(ttl=30, show_spinner=False)
def _model_output(url: str, image_id: int):
    with sessions()() as session:
        return model_output(session, image_id)


st.title("Annotate")
url = store_url()
who = annotator()
with sessions()() as session:
    has_project = project_exists(session)
if not has_project:
    st.info("The store has no project yet: see **Overview**.")
    st.stop()
if not who:
    st.warning("Enter your name in the sidebar first: every label and box is saved under it.")
    st.stop()

s = _state()
action = s.get(ACTION_KEY) or SuggestedAction.DRAW_BOXES.value
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
    if right.button("Open", key="annotate_open_id", disabled=wanted is None):
        with sessions().begin() as session:
            taken = take_lease(session, int(wanted), who)
        if taken:
            _go_to(int(wanted), who)
            st.rerun()
        right.warning(f"Image {wanted} is being annotated by someone else.")
    st.stop()

try:
    with sessions()() as session:
        detail = image_detail(session, s[IMAGE_KEY], annotator=who)
except ValueError as e:
    st.error(str(e))
    _go_to(None, who)
    st.button("Back to the picker", key="annotate_back")
    st.stop()

if s.get("annotate_loaded_id") != detail.id:
    _load(detail, action)
elif detail.version != s["annotate_version"] and not s.get(DIRTY_KEY):
    _load(detail, action)
    st.info("This image was saved by someone else since you opened it; you now see their version.")

baseline, draft = s["annotate_baseline"], s["annotate_draft"]
load = s["annotate_load"]

if detail.version != s["annotate_version"]:
    st.error(f"Someone else saved image {detail.id} after you opened it (you edit version {s['annotate_version']}, "
             f"the store has {detail.version}). Your changes are not saved; reload to see theirs, then redo yours.")
    if st.button("Reload their version (discard mine)", key="annotate_reload"):
        _load(detail, action)
        st.rerun()
if error := s.pop("annotate_error", None):
    st.error(error)
if detail.leased_by:
    st.warning(f"{detail.leased_by} is annotating this image too (they hold its lease). Saves are version-checked.")

st.caption(f"Image **#{detail.id}** · {detail.width}x{detail.height} px · {detail.granularity} · "
           f"{detail.split or 'no split'} · version {detail.version} · task: {action} · `{detail.path}`")

# --- view controls -----------------------------------------------------------------------------
with st.expander("View: window / level, invert, size", expanded=False):
    c1, c2, c3, c4 = st.columns(4)
    level = c1.slider("Level (%)", 0, 100, 50, key="annotate_level")
    window_width = c2.slider("Window (%)", 1, 100, 100, key="annotate_window")
    invert = c3.toggle("Invert", key="annotate_invert")
    max_side = c4.select_slider("Canvas size (px)", CANVAS_SIZES, value=640, key="annotate_size",
                                on_change=lambda: _redraw(s["annotate_draft"]["boxes"]))

canvas_w, canvas_h = fit(detail.width, detail.height, max_side, max_side)
scale = canvas_w / detail.width
output = _model_output(url, detail.id)
handled = s["annotate_handled"]
open_suggestions = [(k, b) for k, b in enumerate(output.boxes) if k not in handled]

main, side = st.columns([3, 2], gap="medium")
with side:
    if output.model_version_id is None:
        st.info("No model version yet: model suggestions appear after the trainer's first round.")
        show_boxes, attention_class = False, None
    else:
        show_boxes = st.toggle("Show model boxes", value=True, key="annotate_show_suggestions")
        if output.attention:
            attention_on = st.toggle("Attention map", key="annotate_attention")
            attention_class = st.selectbox("Attention of", sorted(output.attention), key="annotate_attention_class") if attention_on else None
        else:
            st.toggle("Attention map", value=False, disabled=True, key="annotate_attention_none",
                      help="This model version stored no attention maps for this image.")
            st.caption("No attention maps are available for this image.")
            attention_class = None

try:
    base_image = render(detail.path, (canvas_w, canvas_h), float(level), float(window_width), bool(invert))
except ValueError as e:
    st.error(f"Cannot show image {detail.id}: {e}")
    st.stop()
background = compose(
    base_image, scale,
    [b for _, b in open_suggestions] if show_boxes else [],
    output.attention.get(attention_class) if attention_class else None,
)

classes = detail.classes
current_class = s.get("annotate_class") if s.get("annotate_class") in classes else classes[0]
with main:
    with st.container(horizontal=True, gap="small"):
        for k, name in enumerate(classes[:9], 1):
            st.button(f"{name}", key=f"annotate_cls_{k}", shortcut=str(k), type="primary" if name == current_class else "secondary",
                      on_click=lambda n=name: s.__setitem__("annotate_class", n), help=f"draw {name} boxes (key {k})")
    result = st_canvas(
        background_image=background, width=canvas_w, height=canvas_h, drawing_mode="labeled_rect", label=current_class,
        initial_drawing=_drawing(s["annotate_base"], scale),
        stroke_color=STROKE, stroke_width=2, fill_color=FILL, font_size=FONT_SIZE,
        key=_canvas_key(),
    )
    st.caption("Draw a box by dragging; the class is the highlighted button (keys 1-9). Toolbar: Edit to move, resize or "
               "relabel a box, Delete selected, Undo / Redo. Yellow dashed boxes are the model's suggestions.")

live = _live(scale, detail.width, detail.height)

with side:
    st.markdown("**Findings**")
    present = []
    cols = st.columns(2)
    boxed = {b[0] for b in live}
    for k, name in enumerate(classes):
        if cols[k % 2].checkbox(name, value=name in draft["present"], key=f"annotate_find_{load}_{k}"):
            present.append(name)
    no_finding = st.checkbox("No finding", value=draft["no_finding"], key=f"annotate_nofind_{load}")
    missing = sorted(boxed - set(present))
    if missing:
        st.caption(f"Boxes make these present too: {', '.join(missing)}.")
    complete = st.checkbox("All lesions are boxed (image becomes full)", value=draft["complete"], key=f"annotate_complete_{load}")

    if output.model_version_id is not None:
        st.markdown(f"**Model suggestions** (version {output.model_version_id})")
        if output.image_probs:
            top = sorted(output.image_probs.items(), key=lambda kv: -kv[1])[:3]
            st.caption("Image-level: " + ", ".join(f"{n} {p:.2f}" for n, p in top))
        if not open_suggestions:
            st.caption("No (more) boxes suggested for this image.")
        for k, box in open_suggestions:
            a, b, c = st.columns([3, 1, 1])
            a.markdown(f"S{k + 1} {box.get('class')} · {float(box.get('score', 0)):.2f}")
            if b.button("Accept", key=f"annotate_accept_{load}_{k}", help="add it to your boxes; adjust it with Edit"):
                x1, y1, x2, y2 = (float(v) for v in box["bbox"])
                _redraw([*live, (str(box.get("class")), x1, y1, x2, y2)])
                handled.append(k)
                st.rerun()
            if c.button("Reject", key=f"annotate_reject_{load}_{k}"):
                handled.append(k)
                st.rerun()

    st.markdown(f"**Boxes** ({len(live)})")
    for k, (name, x1, y1, x2, y2) in enumerate(live):
        a, b = st.columns([4, 1])
        a.caption(f"{k + 1}. {name or '(no class)'} ({x1:.0f}, {y1:.0f}) - ({x2:.0f}, {y2:.0f})")
        if b.button("Delete", key=f"annotate_delete_{load}_{s['annotate_rev']}_{k}"):
            _redraw(live[:k] + live[k + 1 :])
            st.rerun()
    if s["annotate_history"] and st.button("Undo last accept/delete", key="annotate_undo"):
        s["annotate_base"] = s["annotate_history"].pop()
        s["annotate_rev"] += 1
        st.rerun()

draft = {"present": sorted(present), "no_finding": no_finding, "complete": complete, "boxes": live}
s["annotate_draft"] = draft
dirty = _dirty(draft, baseline)
s[DIRTY_KEY] = dirty


def _save() -> str | None:
    """Save the draft; the image's new granularity, or None (the error is shown after the rerun)."""
    try:
        with sessions().begin() as session:
            image = save_annotation(
                session, detail.id, present=present, no_finding=no_finding, boxes=live, complete=complete,
                annotator=who, expected_version=s["annotate_version"],
            )
            granularity = image.granularity.value
            record_save(session, detail.id, annotator=who, action=action, before=detail.granularity,
                        seconds=time.monotonic() - s.get("annotate_opened_at", time.monotonic()))
    except (ConflictError, ValueError) as e:
        s["annotate_error"] = f"Not saved: {e}"
        return None
    s.pop("annotate_loaded_id", None)
    return granularity


with side:
    if dirty:
        st.warning("Unsaved changes: save them, or they are lost when you leave this image.")
    with st.container(horizontal=True, gap="small"):
        save = st.button("Save", type="primary", key="annotate_save", shortcut="Ctrl+Enter")
        save_next = st.button("Save & next", key="annotate_save_next", shortcut="Shift+Enter")
        skip = st.button("Next", key="annotate_skip", shortcut="Ctrl+Right", help="leave this image unchanged")

if save or save_next:
    granularity = _save()
    if granularity is not None:
        message = f"Saved image {detail.id} ({granularity})."
        target = detail.id
        if save_next:
            target = _next_image(action, who, [detail.id])
            _go_to(target, who)
            message += " The queue is empty." if target is None else ""
        s["annotate_notice"] = (target, message)
    st.rerun()
if skip:
    if dirty:
        s["annotate_confirm_leave"] = True
    else:
        _go_to(_next_image(action, who, [detail.id]), who)
        st.rerun()
if s.get("annotate_confirm_leave"):
    with side:
        st.warning("This image has unsaved changes. Leave it anyway?")
        if st.button("Discard changes and go to the next image", key="annotate_discard"):
            _go_to(_next_image(action, who, [detail.id]), who)
            st.rerun()
