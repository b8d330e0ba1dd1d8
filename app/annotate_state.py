"""The Annotate page's state logic, kept out of the page script so it can be tested alone.

No Streamlit here: the draft (what the annotator has on screen and has not saved), the defaults that
follow an image's granularity, opening an image for editing, the canvas content with its undo history
(functions on the page's ``st.session_state``, any mutable mapping here), the view (canvas scale, zoom
crop, fitted to the column and the window) and the maths between canvas pixels and original image
pixels, the minimum box size, and the one numbering of model suggestions.
"""

from __future__ import annotations

import math
import copy
from collections.abc import Iterable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from typing import Any

from db.drafts import ABSENT, NOT_ASSESSED, PRESENT, StoredDraft, check_payload
from db.models import Granularity, SuggestedAction
from db.service import ImageDetail

Box = tuple[str, float, float, float, float]

#: The task shown for a full image (its boxes are edited; "Save & next" takes the draw-boxes queue).
EDIT_BOXES = "edit boxes"
#: Boxes closer than this (original pixels) count as unchanged (canvas round trips move them a little).
TOLERANCE_PX = 0.5
#: What each finding state means, as the page says it.
STATE_HELP = {
    PRESENT: "you see it (a box of the class makes it present)",
    ABSENT: "you looked for it and it is not there",
    NOT_ASSESSED: "you did not judge it: nothing is stored and training ignores the class for this image",
}


def default_task(granularity: str) -> str:
    """The task an image opens with when no queue suggestion names one: the next upgrade it needs."""
    return {
        Granularity.UNLABELED.value: SuggestedAction.ADD_LABELS.value,
        Granularity.WEAK.value: SuggestedAction.DRAW_BOXES.value,
    }.get(granularity, EDIT_BOXES)


def queue_action(task: str) -> str:
    """The queue action behind ``task`` (which queue "Save & next" takes from)."""
    return SuggestedAction.ADD_LABELS.value if task == SuggestedAction.ADD_LABELS.value else SuggestedAction.DRAW_BOXES.value


def baseline(detail: ImageDetail, task: str) -> dict[str, Any]:
    """The draft of an image as the store holds it: labels as findings states, its boxes and flags.

    "All lesions are boxed" starts ticked only for a full image (whatever the task).
    """
    findings = {name: NOT_ASSESSED for name in detail.classes}
    for name, present in detail.labels.items():
        if name in findings:
            findings[name] = PRESENT if present else ABSENT
    return {"findings": findings, "no_finding": detail.no_finding, "complete": detail.boxes_complete,
            "boxes": [list(b) for b in detail.boxes], "task": task}


def effective_findings(findings: Mapping[str, str], boxes: Sequence[Sequence[Any]]) -> dict[str, str]:
    """``findings`` with every boxed class present (a box implies its finding)."""
    boxed = {str(b[0]) for b in boxes}
    return {name: PRESENT if name in boxed else state for name, state in findings.items()}


def all_others_absent(findings: Mapping[str, str], boxes: Sequence[Sequence[Any]]) -> dict[str, str]:
    """Every class not present (nor boxed) becomes absent: the one-click "all others absent"."""
    return {name: PRESENT if state == PRESENT else ABSENT for name, state in effective_findings(findings, boxes).items()}


def split_findings(findings: Mapping[str, str]) -> tuple[list[str], list[str]]:
    """(present, absent) class names of ``findings``; the rest is not assessed."""
    return (sorted(n for n, v in findings.items() if v == PRESENT), sorted(n for n, v in findings.items() if v == ABSENT))


def same_boxes(a: Sequence[Sequence[Any]], b: Sequence[Sequence[Any]], tolerance: float = TOLERANCE_PX) -> bool:
    """Whether two box lists are the same up to ``tolerance`` pixels (order does not matter)."""
    if len(a) != len(b):
        return False
    def key(box: Sequence[Any]) -> tuple[str, tuple[float, ...]]:
        return str(box[0]), tuple(float(v) for v in box[1:])

    return all(p[0] == q[0] and all(abs(u - v) <= tolerance for u, v in zip(p[1], q[1], strict=True))
               for p, q in zip(sorted(map(key, a)), sorted(map(key, b)), strict=True))


def is_dirty(draft: Mapping[str, Any], base: Mapping[str, Any]) -> bool:
    """Whether ``draft`` differs from ``base`` in findings, flags or boxes (box-only changes count)."""
    return (
        effective_findings(draft["findings"], draft["boxes"]) != effective_findings(base["findings"], base["boxes"])
        or draft["no_finding"] != base["no_finding"]
        or draft["complete"] != base["complete"]
        or not same_boxes(draft["boxes"], base["boxes"])
    )


def to_payload(draft: Mapping[str, Any]) -> dict[str, Any]:
    """The draft as the JSON payload :func:`db.drafts.save_draft` stores (checked)."""
    return check_payload({key: draft[key] for key in ("findings", "no_finding", "complete", "boxes", "task")})


def from_payload(payload: Mapping[str, Any], classes: Sequence[str]) -> dict[str, Any]:
    """A stored payload as a draft for an image with ``classes``: unknown classes dropped, missing ones not assessed."""
    checked = check_payload(payload)
    findings = {name: checked["findings"].get(name, NOT_ASSESSED) for name in classes}
    return {**checked, "findings": findings}


# --- the page's state: opening an image, the canvas content and its undo history -----------------

#: ``st.session_state`` keys the Queue page sets to open an image here: the image, its queue action, and
#: whether the open image has unsaved changes.
IMAGE_KEY = "annotate_image_id"
ACTION_KEY = "annotate_action"
DIRTY_KEY = "annotate_dirty"


def start_editing(state: MutableMapping[str, Any], detail: ImageDetail, stored: StoredDraft | None, *, opened_at: float) -> None:
    """Make ``detail`` the image being edited in ``state``: from the annotator's ``stored`` draft when
    there is one, else from the store. Each load gets a new ``annotate_load`` (it keys the findings
    widgets and the canvas); the undo history and the handled suggestions start empty; ``opened_at``
    (the monotonic clock) is where the save's active seconds count from."""
    state["annotate_load"] = state.get("annotate_load", 0) + 1
    state["annotate_loaded_id"] = detail.id
    task = state.get(ACTION_KEY) or (stored.payload["task"] if stored else None) or default_task(detail.granularity)
    base = baseline(detail, task)
    state["annotate_baseline"] = base
    if stored is not None:
        draft = from_payload(stored.payload, detail.classes)
        draft["task"] = task
        state["annotate_version"] = stored.base_version
        state["annotate_restored"] = (detail.id, stored.updated_at)
        state["annotate_written"] = to_payload(draft)
    else:
        draft = copy.deepcopy(base)
        state["annotate_version"] = detail.version
        state["annotate_written"] = None
    state["annotate_task"] = task
    state["annotate_draft"] = draft
    state["annotate_base"] = [tuple(b) for b in draft["boxes"]]
    state["annotate_history"] = []
    state["annotate_handled"] = []
    state["annotate_rev"] = 0
    state["annotate_opened_at"] = opened_at
    state["annotate_findgen"] = 0
    state.pop("annotate_view", None)
    for key in ("annotate_confirm_leave", "annotate_error", "annotate_box_notice"):
        state.pop(key, None)
    state[DIRTY_KEY] = is_dirty(draft, base)


def canvas_key(state: Mapping[str, Any]) -> str:
    """The canvas widget's key: new for each load and each redraw (``annotate_rev``), so the canvas starts
    from ``annotate_base``."""
    return f"annotate_canvas_{state['annotate_load']}_{state['annotate_rev']}"


def redraw(state: MutableMapping[str, Any], boxes: Sequence[Box], *, undoable: bool = True) -> None:
    """Make ``boxes`` (original pixels) the canvas content and the draft's boxes; ``undoable`` keeps the
    content before in the undo history."""
    if undoable:
        state["annotate_history"].append(list(state["annotate_base"]))
    state["annotate_base"] = list(boxes)
    state["annotate_draft"]["boxes"] = [list(b) for b in boxes]
    state["annotate_rev"] += 1


def undo(state: MutableMapping[str, Any]) -> None:
    """Back to the canvas content before the last undoable :func:`redraw` (an accept or a delete)."""
    state["annotate_base"] = state["annotate_history"].pop()
    state["annotate_draft"]["boxes"] = [list(b) for b in state["annotate_base"]]
    state["annotate_rev"] += 1


def current_draft(findings: Mapping[str, str], no_finding: bool, complete: bool, boxes: Sequence[Box], task: str) -> dict[str, Any]:
    """The draft as the page shows it now (boxed classes present)."""
    return {"findings": effective_findings(findings, boxes), "no_finding": no_finding, "complete": complete,
            "boxes": [list(b) for b in boxes], "task": task}


# --- the view: canvas pixels <-> image pixels ----------------------------------------------------

#: The canvas is made no taller than the window below its top (less FOLD_MARGIN), but never under MIN_FIT px.
FOLD_MARGIN = 24
MIN_FIT = 320


@dataclass(frozen=True)
class View:
    """What the canvas shows: the crop (x0, y0, x1, y1) of the image in original pixels, drawn ``scale`` times larger."""

    x0: float
    y0: float
    x1: float
    y1: float
    scale: float
    width: int  # canvas px
    height: int

    @property
    def crop(self) -> tuple[int, int, int, int]:
        return (round(self.x0), round(self.y0), round(self.x1), round(self.y1))


def make_view(image_w: int, image_h: int, max_w: int, max_h: int, zoom: int = 1,
              centre: tuple[float, float] = (0.5, 0.5)) -> View:
    """The view of a ``image_w`` x ``image_h`` image on a canvas at most ``max_w`` x ``max_h`` px.

    ``zoom`` > 1 shows 1/zoom of each side around ``centre`` (fractions of the image; the crop is kept
    inside the image), rendered on the server at the canvas size: detail without a bigger canvas.
    """
    if image_w < 1 or image_h < 1:
        raise ValueError(f"image size must be positive, got {image_w}x{image_h}")
    if zoom < 1:
        raise ValueError(f"zoom must be at least 1, got {zoom}")
    crop_w, crop_h = image_w / zoom, image_h / zoom
    x0 = min(max(centre[0] * image_w - crop_w / 2, 0.0), image_w - crop_w)
    y0 = min(max(centre[1] * image_h - crop_h / 2, 0.0), image_h - crop_h)
    x0, y0 = float(round(x0)), float(round(y0))
    scale = min(max(max_w, 1) / crop_w, max(max_h, 1) / crop_h)
    width, height = max(1, math.floor(crop_w * scale)), max(1, math.floor(crop_h * scale))
    return View(x0=x0, y0=y0, x1=min(image_w, x0 + crop_w), y1=min(image_h, y0 + crop_h), scale=scale, width=width, height=height)


def fit_view(image_w: int, image_h: int, max_side: int, column: int | None, room: int | None, *, zoom: int = 1,
             centre: tuple[float, float] = (0.5, 0.5)) -> View:
    """The view of the image on a canvas of at most ``max_side`` px a side that fits its ``column`` (px
    wide) and the window's ``room`` below the canvas's top (less :data:`FOLD_MARGIN`, never under
    :data:`MIN_FIT`: then the page scrolls); None for either: not measured yet."""
    fit_h = max(MIN_FIT, room - FOLD_MARGIN) if room else max_side
    return make_view(image_w, image_h, min(max_side, column) if column else max_side, min(max_side, fit_h),
                     zoom=zoom, centre=centre)


def canvas_to_image(view: View, left: float, top: float, width: float, height: float,
                    image_w: int, image_h: int) -> tuple[float, float, float, float]:
    """A canvas rectangle (px) as (x1, y1, x2, y2) in original pixels, clamped to the image, 2 decimals."""
    x1, x2 = view.x0 + left / view.scale, view.x0 + (left + width) / view.scale
    y1, y2 = view.y0 + top / view.scale, view.y0 + (top + height) / view.scale
    x1, x2 = sorted((min(max(x1, 0.0), image_w), min(max(x2, 0.0), image_w)))
    y1, y2 = sorted((min(max(y1, 0.0), image_h), min(max(y2, 0.0), image_h)))
    return round(x1, 2), round(y1, 2), round(x2, 2), round(y2, 2)


def image_to_canvas(view: View, x1: float, y1: float, x2: float, y2: float) -> dict[str, float]:
    """A box in original pixels as the canvas rectangle {left, top, width, height} (px)."""
    return {"left": (x1 - view.x0) * view.scale, "top": (y1 - view.y0) * view.scale,
            "width": (x2 - x1) * view.scale, "height": (y2 - y1) * view.scale}


def canvas_to_boxes(rects: Iterable[Mapping[str, Any]], view: View, image_w: int, image_h: int) -> list[Box]:
    """The canvas's labelled rectangles (``{label, left, top, width, height}`` in canvas px, as the canvas
    component reports them) as boxes (class, x1, y1, x2, y2) in original pixels, clamped to the image."""
    return [(str(r["label"]), *canvas_to_image(view, r["left"], r["top"], r["width"], r["height"], image_w, image_h))
            for r in rects]


def boxes_to_canvas(boxes: Iterable[Sequence[Any]], view: View) -> list[dict[str, Any]]:
    """Boxes (class, x1, y1, x2, y2) in original pixels as the canvas's ``{label, left, top, width, height}``."""
    return [{"label": name, **image_to_canvas(view, x1, y1, x2, y2)} for name, x1, y1, x2, y2 in boxes]


def split_small(boxes: Sequence[Box], min_box: float) -> tuple[list[Box], list[Box]]:
    """(kept, too small): boxes with a side under ``min_box`` original pixels are a click, not a box."""
    kept: list[Box] = []
    small: list[Box] = []
    for box in boxes:
        (small if min(box[3] - box[1], box[4] - box[2]) < min_box else kept).append(box)
    return kept, small


# --- model suggestions ---------------------------------------------------------------------------


def numbered_suggestions(boxes: Sequence[Mapping[str, Any]], handled: Sequence[int], threshold: float) -> list[tuple[int, dict[str, Any]]]:
    """The open suggestions at or above ``threshold`` as (index, box with ``number``), best first.

    ``number`` is the suggestion's place in the model's list (1-based) and never changes when others
    are accepted or rejected: the image and the list show the same S-number.
    """
    done = set(handled)
    return [(k, {**box, "number": k + 1}) for k, box in enumerate(boxes)
            if k not in done and float(box.get("score", 0.0)) >= threshold]


def accept(boxes: Sequence[Box], suggestion: Mapping[str, Any]) -> list[Box]:
    """``boxes`` plus the suggestion as a box (class, x1, y1, x2, y2)."""
    x1, y1, x2, y2 = (float(v) for v in suggestion["bbox"])
    return [*boxes, (str(suggestion.get("class")), x1, y1, x2, y2)]

