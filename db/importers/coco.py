"""Import a COCO detection JSON (the dialect of ``../shared/data/nih-cxr`` and of the store's own export)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from db.importers.write import ImportItem, ImportReport, Progress, each, existing_paths, parse_split, pseudonymize, write_items
from db.models import FileStatus, Split
from db.projects import DEFAULT_PROJECT
from oxnet.classes import NO_FINDING
from oxnet.data.annotation import box_error
from oxnet.data.imaging import MAX_PIXELS, probe_image
from oxnet.vocabulary import FULL, GRANULARITIES, UNLABELED, WEAK


def _resolve_under(root: Path, file_name: Any) -> Path:
    """``file_name`` resolved inside ``root``; ValueError for ``..`` or a path that leaves ``root``."""
    if not isinstance(file_name, str) or not file_name:
        raise ValueError(f"file_name must be a non-empty string, got {file_name!r}")
    relative = Path(file_name)
    if ".." in relative.parts:
        raise ValueError(f"file_name {file_name!r} contains '..'")
    path = (relative if relative.is_absolute() else root / relative).resolve()
    if not path.is_relative_to(root):
        raise ValueError(f"file_name {file_name!r} lies outside the import root {root}")
    return path


def import_coco(
    session: Session,
    coco: str | Path | Mapping[str, Any],
    *,
    images: str | Path | None = None,
    project: str = DEFAULT_PROJECT,
    annotator: str = "import:coco",
    split: str | None = None,
    verify: bool = True,
    patient_salt: str | None = None,
    max_pixels: int = MAX_PIXELS,
    progress: Progress | None = None,
) -> ImportReport:
    """Import a COCO detection JSON (the dialect of ``../shared/data/nih-cxr`` and of :func:`db.export.export_coco`).

    Granularity per image: its own ``granularity`` field when present; else ``full`` when it has
    annotations (boxes complete), ``weak`` when it has an ``image_labels`` list (listed classes present,
    the other categories absent, ``"No Finding"`` = explicitly negative; with an ``absent_labels`` list,
    as the store's export writes, only those are absent and the others stay not assessed), else
    ``unlabeled``.
    ``bbox`` is [x, y, w, h] in pixels of the file. ``patient_id``, ``view_position`` and ``split`` are
    kept when present.

    A file with duplicate image ids is refused as a whole (nothing imported): its annotations cannot be
    told apart. A ``file_name`` listed twice is an error for the second entry (the first is imported).

    Args:
        coco: path of the JSON file, or the dict.
        images: folder that ``file_name`` entries are relative to (default: the dict's ``images_root``,
            else the JSON file's folder). A ``file_name`` with ``..`` or outside this folder is an error.
        project: project to import into; a new one gets the file's categories as classes.
        split: put every imported image in this split (overrides the images' own ``split``).
        verify: read, hash and decode every file (False: header only, sizes from the JSON).
    """
    report = ImportReport()
    source = str(coco) if isinstance(coco, (str, Path)) else "<COCO dict>"
    try:
        if isinstance(coco, (str, Path)):
            with open(coco, encoding="utf-8") as f:
                coco = json.load(f)
        if not isinstance(coco, Mapping) or not isinstance(coco.get("images"), list):
            raise ValueError("no 'images' list (not a COCO file)")
        categories = {int(c["id"]): str(c["name"]) for c in coco.get("categories") or []}
        root_arg = images or coco.get("images_root") or (Path(source).parent if source != "<COCO dict>" else None)
        if root_arg is None:
            raise ValueError("images= is required for a COCO dict without 'images_root'")
        root = Path(root_arg).expanduser().resolve()
        split_ = parse_split(split, "split")
    except (OSError, json.JSONDecodeError, ValueError, KeyError, TypeError) as e:
        report.errors.append((source, f"cannot import: {e}"))
        return report
    vocabulary = [categories[i] for i in sorted(categories)]

    seen_ids: dict[Any, int] = {}
    duplicates: dict[Any, list[int]] = {}
    for position, image in enumerate(coco["images"]):
        if isinstance(image, Mapping) and isinstance(image.get("id"), (int, str)):
            if image["id"] in seen_ids:
                duplicates.setdefault(image["id"], [seen_ids[image["id"]]]).append(position)
            seen_ids.setdefault(image["id"], position)
    if duplicates:  # their annotations would attach to every image of the id: refuse the whole file
        shown = "; ".join(f"id {i!r} at images[{', '.join(map(str, at))}]" for i, at in list(duplicates.items())[:5])
        more = f" and {len(duplicates) - 5} more" if len(duplicates) > 5 else ""
        report.errors.append((source, f"cannot import: duplicate image ids ({shown}{more}); annotations "
                                      "cannot be matched to their image; nothing was imported"))
        return report

    annotations_of: dict[Any, list[Mapping[str, Any]]] = {}
    image_ids = set(seen_ids)
    for ann in coco.get("annotations") or []:
        if not isinstance(ann, Mapping) or ann.get("image_id") not in image_ids:
            report.errors.append((f"{source} annotation {ann.get('id') if isinstance(ann, Mapping) else ann!r}",
                                  f"no image with id {ann.get('image_id') if isinstance(ann, Mapping) else None!r}"))
            continue
        annotations_of.setdefault(ann["image_id"], []).append(ann)

    existing = existing_paths(session, project)
    items = []
    for image in each(coco["images"], progress):
        name = f"{source} image {image.get('id') if isinstance(image, Mapping) else image!r}"
        try:
            item = _coco_item(image, annotations_of.get(image.get("id"), []), categories, root, annotator, split_)
            name = f"{name} ({image['file_name']})"
            item.name = name
            if str(item.path) not in existing:
                info = probe_image(item.path, verify=verify, max_pixels=max_pixels)
                if (info.width, info.height) != (item.width, item.height):
                    raise ValueError(f"the file is {info.width}x{info.height}, the JSON says {item.width}x{item.height}")
                item.add_info(info)
                item.file_status = FileStatus.OK if verify else FileStatus.UNCHECKED
            item.patient_id = pseudonymize(item.patient_id, patient_salt)
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            report.errors.append((name, str(e)))
            continue
        items.append(item)
    write_items(session, project, vocabulary, items, annotator, report)
    return report


def _coco_item(
    image: Mapping[str, Any],
    annotations: Sequence[Mapping[str, Any]],
    categories: Mapping[int, str],
    root: Path,
    annotator: str,
    split: Split | None,
) -> ImportItem:
    for key in ("id", "file_name", "width", "height"):
        if key not in image:
            raise ValueError(f"missing field {key!r}")
    width, height = int(image["width"]), int(image["height"])
    item = ImportItem(
        name="", path=_resolve_under(root, image["file_name"]), width=width, height=height, source="coco",
        patient_id=None if image.get("patient_id") is None else str(image["patient_id"]),
        view=image.get("view_position") or image.get("view"),
        split=split or parse_split(image.get("split"), "split"),
    )
    for ann in annotations:
        category = categories.get(ann["category_id"]) if "category_id" in ann else None
        if category is None:
            raise ValueError(f"annotation {ann.get('id')}: unknown category_id {ann.get('category_id')!r}")
        bbox = ann.get("bbox")
        if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
            raise ValueError(f"annotation {ann.get('id')}: bbox must be [x, y, w, h], got {bbox!r}")
        x, y, w, h = (float(v) for v in bbox)
        reason = box_error(x, y, x + w, y + h, width, height)
        if reason:
            raise ValueError(f"annotation {ann.get('id')} ({category}): {reason}")
        item.boxes.append((category, x, y, x + w, y + h, annotator))
    image_labels = image.get("image_labels")
    if image_labels is not None:
        if not isinstance(image_labels, list):
            raise ValueError(f"image_labels must be a list of class names, got {image_labels!r}")
        item.no_finding = NO_FINDING in image_labels
        present = {str(n) for n in image_labels if n != NO_FINDING}
        absent_labels = image.get("absent_labels")
        if absent_labels is None:  # the nih-cxr dialect: every class not listed is absent
            item.labels = {name: name in present for name in categories.values()}
        else:  # the store's export: classes in neither list were not assessed (no label row)
            if not isinstance(absent_labels, list):
                raise ValueError(f"absent_labels must be a list of class names, got {absent_labels!r}")
            both = sorted(present & {str(n) for n in absent_labels})
            if both:
                raise ValueError(f"classes {both} are in both image_labels and absent_labels")
            item.labels = {str(name): False for name in absent_labels}
        item.labels.update({name: True for name in present})  # unknown names surface as an error
    for name, *_ in item.boxes:
        item.labels[name] = True
    default = FULL if annotations else WEAK if image_labels is not None else UNLABELED
    granularity = image.get("granularity", default)
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be full, weak or unlabeled, got {granularity!r}")
    if granularity == UNLABELED and (item.labels or item.boxes or item.no_finding):
        raise ValueError("granularity 'unlabeled' but the image has labels or boxes")
    if granularity == WEAK and not (item.labels or item.no_finding):
        raise ValueError("granularity 'weak' but the image has no image_labels")
    item.boxes_complete = granularity == FULL
    return item
