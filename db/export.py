"""Export: COCO JSON per granularity, and the train/val/test mix the trainer learns from.

The COCO dialect is the one of ``../shared/data/nih-cxr/annotations/*.json`` and
:func:`oxnet.data.records_from_coco`: ``bbox`` = [x, y, w, h] in pixels of the file, and per image
``granularity``, ``image_labels`` (present class names; ``["No Finding"]`` for explicit negatives; empty
for unlabeled images), ``absent_labels`` (the class names assessed absent: every class of a full or
"No Finding" image that is not present; for a weak image the classes stored as absent; empty for
unlabeled images), ``view_position`` and ``split``. A class of a weak image in neither list was not
assessed (no ``ImageLabel`` row): :func:`oxnet.data.records_from_coco` masks it from the image-level
loss. Boxes are exported for full images only (boxes of a weak image are incomplete; their classes are
in ``image_labels``).

Patient data: an export leaves patient ids out unless asked (:data:`INCLUDE_PATIENT_IDS`, the one
default every export path uses: ``python -m db export``, the Data page, ``app.jobs export``). File names
can identify the patient too (NIH's ``00000032_037.png`` is patient 32), so an export without ids
writes neutral file names, ``image-<id>.<ext>`` (:func:`neutral_file_name`); the real paths go to a
separate mapping only when asked (:func:`file_mapping`). With ``include_patient_ids=True`` every image
carries its ``patient_id`` and its real file name.

The trainer's snapshot (:func:`export_training_mix`, ``python -m db export mix``) must open the files,
so it keeps real absolute paths, but carries no patient ids: the split per patient is already in the
store, and nothing in training needs the id.
"""

from __future__ import annotations

import csv
import os
from collections import defaultdict
from pathlib import Path
from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from db.models import Box, FileStatus, Granularity, Image, ImageLabel, LabelClass, Split
from db.projects import DEFAULT_PROJECT, get_project
from oxnet.classes import NO_FINDING
from oxnet import files

#: Whether an export carries patient ids and real file names when the caller does not say (the one default).
INCLUDE_PATIENT_IDS = False

#: Decimals kept in exported coordinates (x2 - x1 of stored floats would otherwise show float noise).
COORD_DECIMALS = 6


def export_coco(
    session: Session,
    split: Split | str | None = None,
    granularity: Granularity | str | None = None,
    *,
    project: str = DEFAULT_PROJECT,
    images_root: str | Path | None = None,
    include_patient_ids: bool = INCLUDE_PATIENT_IDS,
    real_paths: bool | None = None,
) -> dict[str, Any]:
    """The project's images as a COCO dict.

    Args:
        split: only this split (``"train"``, ``"val"``, ``"test"``); None for all images.
        granularity: only this granularity; None or ``"all"`` for all.
        images_root: write ``file_name`` relative to this folder (images outside it keep absolute
            paths); None writes absolute paths. The dict's ``images_root`` key repeats it.
        include_patient_ids: give every image its ``patient_id`` (identifying); left out by default.
        real_paths: write the files' real paths as ``file_name`` (True) or neutral names
            ``image-<id>.<ext>`` (False); default: real paths exactly when patient ids are included.

    Returns:
        ``{"info", "images_root", "categories", "images", "annotations"}``; category ids are the
        project's class order (1-based), image ids the store's. Missing and corrupt files are left out.
    """
    project_ = get_project(session, project)
    query = select(Image).where(Image.project_id == project_.id, Image.file_status.not_in([FileStatus.MISSING, FileStatus.CORRUPT]))
    if split is not None:
        query = query.where(Image.split == Split(split))
    if granularity is not None and granularity != "all":
        query = query.where(Image.granularity == Granularity(granularity))
    images = list(session.scalars(query.order_by(Image.id)))
    classes = list(session.scalars(select(LabelClass).where(LabelClass.project_id == project_.id).order_by(LabelClass.ordinal)))
    name_of = {c.id: c.name for c in classes}
    ordinal_of = {c.id: c.ordinal for c in classes}

    ids = [image.id for image in images]
    present: dict[int, set[int]] = defaultdict(set)
    absent: dict[int, set[int]] = defaultdict(set)
    boxes: dict[int, list[Box]] = defaultdict(list)
    for chunk in (ids[i : i + 20_000] for i in range(0, len(ids), 20_000)):
        for image_id, class_id, is_present in session.execute(
            select(ImageLabel.image_id, ImageLabel.class_id, ImageLabel.present).where(ImageLabel.image_id.in_(chunk))
        ):
            (present if is_present else absent)[image_id].add(class_id)
        for box in session.scalars(select(Box).where(Box.image_id.in_(chunk)).order_by(Box.id)):
            boxes[box.image_id].append(box)

    root = Path(images_root).expanduser().resolve() if images_root is not None else None
    real_paths = include_patient_ids if real_paths is None else real_paths
    coco_images, annotations = [], []
    for image in images:
        full = image.granularity is Granularity.FULL
        class_ids = present[image.id] | ({b.class_id for b in boxes[image.id]} if full else set())
        labels = [name_of[c] for c in sorted(class_ids, key=ordinal_of.__getitem__)]
        if image.granularity is Granularity.UNLABELED:
            absent_ids: set[int] = set()
        elif full or image.no_finding:
            absent_ids = set(name_of) - class_ids  # boxes complete / "No Finding": every other class is absent
        else:
            absent_ids = absent[image.id] - class_ids
        if image.no_finding:
            labels = [NO_FINDING]
        entry = {
            "id": image.id,
            "file_name": _file_name(image.path, root) if real_paths else neutral_file_name(image.id, image.path),
            "width": image.width,
            "height": image.height,
            "view_position": image.view,
            "split": image.split.value if image.split else None,
            "granularity": image.granularity.value,
            "image_labels": labels,
            "absent_labels": [name_of[c] for c in sorted(absent_ids, key=ordinal_of.__getitem__)],
        }
        if include_patient_ids:
            entry["patient_id"] = image.patient_id
        coco_images.append(entry)
        if not full:
            continue
        for box in boxes[image.id]:
            x, y = round(box.x1, COORD_DECIMALS), round(box.y1, COORD_DECIMALS)
            w, h = round(box.x2 - box.x1, COORD_DECIMALS), round(box.y2 - box.y1, COORD_DECIMALS)
            annotations.append({
                "id": box.id, "image_id": image.id, "category_id": ordinal_of[box.class_id],
                "bbox": [x, y, w, h], "area": round(w * h, COORD_DECIMALS), "iscrowd": 0,
            })
    return {
        "info": {"description": f"OXnet workbench store, project {project!r}", "split": str(split) if split else None,
                 "granularity": str(granularity) if granularity else "all", "patient_ids": include_patient_ids,
                 "file_names": "paths" if real_paths else "neutral"},
        "images_root": str(root) if root is not None and real_paths else None,
        "categories": [{"id": c.ordinal, "name": c.name} for c in classes],
        "images": coco_images,
        "annotations": annotations,
    }


def neutral_file_name(image_id: int, path: str) -> str:
    """``image-<id>.<ext>`` (the file's extension, lower case): a name that says nothing of the patient."""
    suffix = Path(path).suffix.lower()
    return f"image-{image_id}{suffix}"


def file_mapping(session: Session, data: dict[str, Any]) -> list[dict[str, Any]]:
    """``[{"id", "file_name", "path"}]`` for the images of an export ``data``: its neutral names and the
    real paths (identifying where the names encode the patient; write it only when asked)."""
    ids = [image["id"] for image in data["images"]]
    paths: dict[int, str] = {}
    for chunk in (ids[i : i + 20_000] for i in range(0, len(ids), 20_000)):
        paths.update((i, p) for i, p in session.execute(select(Image.id, Image.path).where(Image.id.in_(chunk))))
    return [{"id": image["id"], "file_name": image["file_name"], "path": paths[image["id"]]} for image in data["images"]]


def _file_name(path: str, root: Path | None) -> str:
    if root is None:
        return path
    try:
        return Path(path).relative_to(root).as_posix()
    except ValueError:
        return path


def export_training_mix(
    session: Session, *, project: str = DEFAULT_PROJECT, include_patient_ids: bool = INCLUDE_PATIENT_IDS
) -> dict[str, dict[str, Any]]:
    """``{"train": coco, "val": coco, "test": coco}`` of the current label mix, absolute file names.

    The bridge to the trainer: every image carries its granularity and its real path (the trainer
    opens it); patient ids only when asked (the trainer needs none: splits are per patient already).
    Images without a split are left out (run :func:`db.projects.assign_splits`, ``python -m db split``, first).
    """
    return {s.value: export_coco(session, split=s, project=project, include_patient_ids=include_patient_ids, real_paths=True)
            for s in Split}


def write_json(data: dict[str, Any], path: str | Path) -> None:
    """Write ``data`` as JSON atomically (temp file + rename), creating the folder."""
    files.write_json(path, data)


def write_file_map(rows: Sequence[Mapping[str, Any]], path: str | Path) -> None:
    """Write an export's ``id,file_name,path`` mapping (:func:`file_mapping`) as CSV, readable by its owner only (0600)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["id", "file_name", "path"])
        writer.writeheader()
        writer.writerows(rows)
