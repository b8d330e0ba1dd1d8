"""Annotation cost, measured: the active seconds of every save (:class:`~db.models.AnnotationTime`),
and the cost model the strategies use (:class:`oxnet.active.strategies.CostModel`).

The Annotate page keeps the moment an image opened (or was last saved) in its session state and calls
:func:`record_save` in its save handler; the seconds in between, capped at :data:`MAX_ACTIVE_SECONDS`
(an annotator who walks away does not make labels look expensive), are one row. Once an upgrade has
:data:`MIN_SAVES` rows, :func:`annotation_costs` uses the medians, in units of the median seconds of
image-level labels (so labels stay 1 unit); until then the defaults (1 and 5 units).
"""

from __future__ import annotations

import statistics
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from db.models import AnnotationTime, Granularity, Image, SuggestedAction
from db.people import get_annotator
from db.projects import DEFAULT_PROJECT, get_project
from oxnet.active.strategies import CostModel
from oxnet.vocabulary import EDIT, UNLABELED_TO_FULL, UNLABELED_TO_WEAK, UPGRADE_NAMES, WEAK_TO_FULL

__all__ = ["MAX_ACTIVE_SECONDS", "MIN_SAVES", "annotation_costs", "cost_rows", "cost_summary", "record_save", "upgrade_of"]

#: Seconds of one save at most (longer: the annotator was away).
MAX_ACTIVE_SECONDS = 900.0
#: Saves of an upgrade needed before its median replaces the default.
MIN_SAVES = 5
DEFAULT_COSTS = CostModel()  # frozen: one shared default is safe


def upgrade_of(before: Granularity | str, after: Granularity | str) -> str:
    """"unlabeled->weak", "weak->full", "unlabeled->full", or "edit" when the granularity did not rise."""
    before, after = Granularity(before), Granularity(after)
    return f"{before.value}->{after.value}" if after.rank > before.rank else EDIT


def record_save(session: Session, image_id: int, *, annotator: str, action: SuggestedAction | str,
                before: Granularity | str, seconds: float) -> AnnotationTime:
    """Record one save of ``image_id`` that took ``seconds`` (capped at :data:`MAX_ACTIVE_SECONDS`), the
    upgrade read from ``before`` and the image's granularity now. Raises ValueError for negative or
    non-finite seconds or an unknown image."""
    if not (seconds == seconds and 0 <= seconds < float("inf")):
        raise ValueError(f"seconds must be a finite number >= 0, got {seconds!r}")
    image = session.get(Image, image_id)
    if image is None:
        raise ValueError(f"no image with id {image_id}")
    row = AnnotationTime(project_id=image.project_id, image_id=image_id, annotator_id=get_annotator(session, annotator).id,
                         action=SuggestedAction(action).value, upgrade=upgrade_of(before, image.granularity),
                         seconds=min(float(seconds), MAX_ACTIVE_SECONDS))
    session.add(row)
    session.flush()
    return row


def cost_summary(session: Session, project: str = DEFAULT_PROJECT) -> dict[str, dict[str, Any]]:
    """Per upgrade (and "edit"): ``{"saves": n, "median_seconds": float | None}``."""
    project_id = get_project(session, project).id
    seconds: dict[str, list[float]] = {}
    for upgrade, value in session.execute(
        select(AnnotationTime.upgrade, AnnotationTime.seconds).where(AnnotationTime.project_id == project_id)
    ):
        seconds.setdefault(upgrade, []).append(value)
    names = [*UPGRADE_NAMES, EDIT]
    return {u: {"saves": len(seconds.get(u, [])),
                "median_seconds": statistics.median(seconds[u]) if seconds.get(u) else None} for u in names}


def annotation_costs(session: Session, project: str = DEFAULT_PROJECT, *, min_saves: int = MIN_SAVES,
                     default: CostModel = DEFAULT_COSTS) -> CostModel:
    """The cost model: measured medians once image-level labels and another upgrade each have
    ``min_saves`` saves (units: the labels' median seconds), else ``default``. An upgrade without
    enough saves keeps its default ratio to labels."""
    summary = cost_summary(session, project)
    labels = summary[UNLABELED_TO_WEAK]
    if labels["saves"] < min_saves or not labels["median_seconds"]:
        return default
    unit = float(labels["median_seconds"])

    def units(upgrade: str, fallback: float) -> float:
        entry = summary[upgrade]
        return entry["median_seconds"] / unit if entry["saves"] >= min_saves and entry["median_seconds"] else fallback

    boxes = units(WEAK_TO_FULL, default.boxes)
    both = units(UNLABELED_TO_FULL, 1.0 + boxes)
    return CostModel(labels=1.0, boxes=max(boxes, 1e-3), labels_and_boxes=max(both, 1e-3), seconds_per_unit=unit,
                     measured={u: summary[u]["saves"] for u in UPGRADE_NAMES})


def cost_rows(session: Session, project: str = DEFAULT_PROJECT, *, min_saves: int = MIN_SAVES) -> list[dict[str, Any]]:
    """What the Overview shows: per upgrade ``{"upgrade", "saves", "median seconds", "units", "source"}``
    (``source``: "measured" when the strategies use the median, else "default")."""
    summary = cost_summary(session, project)
    model = annotation_costs(session, project, min_saves=min_saves)
    rows = []
    for upgrade in UPGRADE_NAMES:
        entry = summary[upgrade]
        measured = model.seconds_per_unit is not None and entry["saves"] >= min_saves
        rows.append({"upgrade": upgrade, "saves": entry["saves"], "median seconds": entry["median_seconds"],
                     "units": round(model.cost(upgrade), 2), "source": "measured" if measured else "default"})
    return rows
