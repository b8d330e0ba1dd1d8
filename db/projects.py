"""Projects, their classes, image counts and the train / val / test splits. Each function takes a
Session; the caller owns the transaction (``with Session.begin() as session: ...``).

Annotation edits (labels, boxes, downgrades) live in :mod:`db.lifecycle`; imports in :mod:`db.importers`;
exports in :mod:`db.export`; model versions in :mod:`db.versions`; the queue in :mod:`db.queue`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

from sqlalchemy import Table, bindparam, func, select, update
from sqlalchemy.orm import Session

from db.models import Granularity, Image, LabelClass, Project, Split
from db.people import log_event
from oxnet.classes import PAPER_CLASSES
from oxnet.data.splits import check_fractions, patient_key, split_of


#: Name of the project used when none is given.
DEFAULT_PROJECT = "default"


def get_project(session: Session, name: str = DEFAULT_PROJECT) -> Project:
    """The project called ``name``; ValueError naming the existing projects when there is none."""
    project = session.scalars(select(Project).where(Project.name == name)).one_or_none()
    if project is None:
        names = list(session.scalars(select(Project.name).order_by(Project.name)))
        raise ValueError(f"no project {name!r} in the store (projects: {names or 'none; import images first'})")
    return project


def ensure_project(session: Session, name: str = DEFAULT_PROJECT, classes: Sequence[str] | None = None) -> Project:
    """Get or create a project and make sure it has ``classes``.

    A new project gets ``classes`` (the paper's nine when None); an existing one gets the classes it
    lacks appended (an NIH import brings NIH's eight), so existing category ids never change.
    """
    if classes is not None and len(set(classes)) != len(classes):
        raise ValueError(f"duplicate class names in {list(classes)}")
    project = session.scalars(select(Project).where(Project.name == name)).one_or_none()
    if project is None:
        project = Project(name=name)
        session.add(project)
        classes = PAPER_CLASSES if classes is None else classes
    known = [c.name for c in project.classes]
    for name_ in classes or ():
        if name_ not in known:
            known.append(name_)
            project.classes.append(LabelClass(name=name_, ordinal=len(known)))
    session.flush()
    return project


def class_names(session: Session, project: Project) -> list[str]:
    """The project's class names in category-id order (id = index + 1)."""
    return list(session.scalars(select(LabelClass.name).where(LabelClass.project_id == project.id).order_by(LabelClass.ordinal)))


def stats(session: Session, project: str = DEFAULT_PROJECT) -> dict[str, Any]:
    """Image counts: ``{"total": n, "granularity": {g: n}, "split": {"train"|...|"unassigned": {g: n}}}``."""
    project_id = get_project(session, project).id
    rows = session.execute(
        select(Image.granularity, Image.split, func.count())
        .where(Image.project_id == project_id)
        .group_by(Image.granularity, Image.split)
    )
    result: dict[str, Any] = {"total": 0, "granularity": {g.value: 0 for g in Granularity}, "split": {}}
    for granularity, split, count in rows:
        result["total"] += count
        result["granularity"][granularity.value] += count
        per_split = result["split"].setdefault(split.value if split else "unassigned", {g.value: 0 for g in Granularity})
        per_split[granularity.value] += count
    return result


def assign_splits(
    session: Session,
    project: str = DEFAULT_PROJECT,
    *,
    fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
    seed: int = 0,
    reassign: bool = False,
    annotator: str = "system",
) -> dict[str, int]:
    """Put every image without a split into train / val / test, all images of a patient together.

    A patient who already has images in a split keeps it (new images join their patient); other
    patients are placed by the one patient split, :func:`oxnet.data.splits.split_of` (a seeded hash of
    their id), so the result is reproducible and stable as images arrive. Images without a patient id
    count as their own patient (:func:`oxnet.data.splits.patient_key`). ``reassign=True`` redoes every
    image. Returns the number of images newly assigned per split.
    """
    check_fractions(fractions)
    project_id = get_project(session, project).id
    rows = session.execute(select(Image.id, Image.patient_id, Image.split).where(Image.project_id == project_id)).all()
    known: dict[str, Split] = {}
    if not reassign:
        for _, patient, split in rows:
            if patient is not None and split is not None:
                known.setdefault(patient, split)
    updates, counts = [], {s.value: 0 for s in Split}
    for image_id, patient, split in rows:
        if split is not None and not reassign:
            continue
        key = patient_key(patient, image_id)
        chosen = known.get(key)
        if chosen is None:
            chosen = Split(split_of(key, seed=seed, fractions=fractions))
            if patient is not None:
                known[patient] = chosen
        updates.append({"b_id": image_id, "b_split": chosen.value})
        counts[chosen.value] += 1
    if updates:
        table = cast(Table, Image.__table__)
        session.execute(update(table).where(table.c.id == bindparam("b_id")).values(split=bindparam("b_split")), updates)
        log_event(session, annotator, "assign_splits", {"counts": counts, "seed": seed, "fractions": list(fractions)})
    return counts
