"""The one annotation check: boxes and image-level labels against the image's size and the class list.

Every place an annotation enters runs it: the importers (:mod:`db.importers`), the UI's save
(:func:`db.service.validate_annotation`), the annotation edits (:func:`db.lifecycle.set_boxes`) and the
COCO reader of training records (:func:`oxnet.data.records.records_from_coco`). Each says a problem in
its own terms (the file and field, the box on the canvas); the rules are here:

- a box is four finite numbers (x1, y1, x2, y2) in the image's pixels with x1 < x2, y1 < y2, inside
  [0, width] x [0, height] (:func:`box_problem`), and of a known class; optionally at least ``min_box``
  pixels on each side;
- findings marked present or absent are known classes; no class is both absent and present (ticked or
  boxed); "No finding" goes with no present finding and no box;
- optionally (``require_label``) something is labelled at all, and (``complete``) a full annotation
  has a box for every present finding.

Also the one box overlap (:func:`iou_matrix`, numpy), shared by the readers' agreement
(:mod:`db.agreement`) and the anchor coverage (:mod:`oxnet.data.anchors`).

Torch-free: the store imports it.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence

import numpy as np
from dataclasses import dataclass

#: A box as edited: (class name, x1, y1, x2, y2) in original pixels.
BoxInput = tuple[str, float, float, float, float]


def box_problem(x1: float, y1: float, x2: float, y2: float, width: float, height: float) -> tuple[str, str] | None:
    """``(kind, message)`` when (x1, y1, x2, y2) is not a valid box on a ``width`` x ``height`` image, else None.

    ``kind`` is "numbers" (not four numbers), "finite", "empty" (inverted or zero size) or "outside".
    """
    try:
        values = [float(v) for v in (x1, y1, x2, y2)]
    except (TypeError, ValueError):
        return "numbers", f"box coordinates must be numbers, got {[x1, y1, x2, y2]!r}"
    if not all(math.isfinite(v) for v in values):
        return "finite", f"box {values} is not finite"
    x1, y1, x2, y2 = values
    if x2 <= x1 or y2 <= y1:
        return "empty", f"box (x1, y1, x2, y2) = {values} is inverted or empty"
    if x1 < 0 or y1 < 0 or x2 > width or y2 > height:
        return "outside", f"box (x1, y1, x2, y2) = {values} lies outside the {width}x{height} image"
    return None


def box_error(x1: float, y1: float, x2: float, y2: float, width: float, height: float) -> str | None:
    """Why (x1, y1, x2, y2) is not a valid box on a ``width`` x ``height`` image, or None when it is."""
    problem = box_problem(x1, y1, x2, y2, width, height)
    return None if problem is None else problem[1]


@dataclass(frozen=True)
class Problem:
    """One reason an annotation cannot be stored.

    ``kind``: "no_class" (a box without a class), "unknown_class" (a box's class is not in the list),
    "box" (see ``reason``), "small_box", "unknown_finding", "absent_and_present",
    "no_finding_with_findings", "nothing" or "unboxed". ``message`` says it to the person drawing
    (boxes numbered from 1); ``box`` is the 0-based index of the box it concerns, ``names`` the classes.
    """

    kind: str
    message: str
    box: int | None = None
    names: tuple[str, ...] = ()
    reason: str | None = None


def annotation_problems(
    boxes: Sequence[BoxInput],
    *,
    classes: Collection[str],
    width: float,
    height: float,
    present: Collection[str] = (),
    absent: Collection[str] = (),
    no_finding: bool = False,
    complete: bool = False,
    require_label: bool = False,
    min_box: float = 0.0,
) -> list[Problem]:
    """Every problem of the annotation (boxes, present / absent findings, "No finding"), in the order:
    each box in turn, unknown findings, absent and present, "No finding" with findings, nothing
    labelled (``require_label``), present findings without a box (``complete``). [] when it is good."""
    problems = []
    known = set(classes)
    for k, (name, x1, y1, x2, y2) in enumerate(boxes, 1):
        if not name:
            problems.append(Problem("no_class", f"box {k} has no class: pick a class for it (or delete it)", k - 1, (name,)))
            continue
        if name not in known:
            problems.append(Problem("unknown_class", f"box {k}: unknown class {name!r}", k - 1, (name,)))
            continue
        reason = box_error(x1, y1, x2, y2, width, height)
        if reason:
            problems.append(Problem("box", f"box {k} ({name}): {reason}; draw it again", k - 1, (name,), reason))
            continue
        x1, y1, x2, y2 = float(x1), float(y1), float(x2), float(y2)
        if min(x2 - x1, y2 - y1) < min_box:
            problems.append(Problem("small_box", f"box {k} ({name}) is {x2 - x1:.1f} x {y2 - y1:.1f} px, smaller than the "
                                    f"minimum {min_box:g} px per side: drag to draw a box (a click is not a box)", k - 1, (name,)))
    boxed = {b[0] for b in boxes}
    unknown = sorted((set(present) | set(absent)) - known)
    if unknown:
        problems.append(Problem("unknown_finding", f"unknown findings {unknown}", names=tuple(unknown)))
    both = sorted(set(absent) & (set(present) | boxed))
    if both:
        problems.append(Problem("absent_and_present", f"{both} marked absent but present (ticked or boxed): choose one",
                                names=tuple(both)))
    if no_finding and (present or boxes):
        problems.append(Problem("no_finding_with_findings",
                                "'No finding' cannot go with ticked findings or boxes: untick one of them"))
    if require_label and not (no_finding or present or boxes or absent):
        problems.append(Problem("nothing", "nothing labelled: mark the findings you assessed (present or absent), or 'No finding'"))
    unboxed = sorted(set(present) & known - boxed)
    if complete and unboxed:
        problems.append(Problem("unboxed", f"'all lesions are boxed' but {unboxed} have no box: draw them, or untick "
                                "'all lesions are boxed'", names=tuple(unboxed)))
    return problems


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every box of ``a`` (Tensor-like [N, 4]) with every box of ``b`` ([M, 4]), (x1, y1, x2, y2) -> [N, M]."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(axis=2)
    area_a = np.clip(a[:, 2:] - a[:, :2], 0, None).prod(axis=1)
    area_b = np.clip(b[:, 2:] - b[:, :2], 0, None).prod(axis=1)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
