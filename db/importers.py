"""Imports into the store: a folder of PNG/JPEG/DICOM, COCO JSON, NIH ChestX-ray14 CSVs, VinDr-CXR train.csv.

Every importer references images in place, skips what the store already has (same path, or same
SHA-256 content when the file was read), reports progress through ``progress(done, total)``, and returns
an :class:`ImportReport` listing imported items, skipped items and errors, each with its reason. An item
(one image with all its labels and boxes) is imported whole or not at all; a file-level problem (a CSV
with missing columns, unreadable JSON) imports nothing. Everything is written in the caller's
transaction, so a batch that fails half-way leaves the store unchanged::

    with Session.begin() as session:
        report = import_coco(session, "boxes.json", images="images/")
    print(report.summary())
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import bindparam, false, func, insert, select, update
from sqlalchemy.orm import Session

from db.lifecycle import EMPTY_STATE, box_error, box_state, derive_granularity, make_state
from db.models import AuditEntry, Box, FileStatus, Image, ImageLabel, LabelClass, Project, Split, utcnow
from db.repository import DEFAULT_PROJECT, ensure_project, get_annotator, get_project
from oxnet.classes import NIH_BOX_CLASSES, NO_FINDING
from oxnet.data.imaging import MAX_PIXELS, ImageInfo, probe_image
from oxnet.vocabulary import FULL, GRANULARITIES, UNLABELED, WEAK

#: ``progress(done, total)``, called as items are read.
Progress = Callable[[int, int], None]

#: Size of the PNGs NIH distributes (its BBox_List coordinates are in these pixels).
NIH_IMAGE_SIZE = 1024
#: Data_Entry_2017*.csv columns the importer needs (the file has more: age, gender, pixel spacing ...).
NIH_DATA_ENTRY_COLUMNS = ("Image Index", "Finding Labels", "Patient ID", "View Position")
#: NIH's box list spells one finding differently from its Data_Entry labels.
NIH_BOX_ALIASES = {"Infiltrate": "Infiltration"}
#: The 14 local findings of VinDr-CXR's train.csv (class_id 0..13); class 14 is "No finding".
VINDR_CLASSES: tuple[str, ...] = (
    "Aortic enlargement", "Atelectasis", "Calcification", "Cardiomegaly", "Consolidation", "ILD",
    "Infiltration", "Lung Opacity", "Nodule/Mass", "Other lesion", "Pleural effusion",
    "Pleural thickening", "Pneumothorax", "Pulmonary fibrosis",
)
VINDR_NO_FINDING = "No finding"
VINDR_COLUMNS = ("image_id", "class_name", "rad_id", "x_min", "y_min", "x_max", "y_max")
#: File name endings tried for a VinDr image id.
VINDR_SUFFIXES = (".dicom", ".dcm", ".png", ".jpg")


def report_summary(head: str, skipped: Sequence[tuple[str, str]], errors: Sequence[tuple[str, str]], limit: int = 20) -> str:
    """``head``, then the first ``limit`` skipped items and errors with their reasons (import and export reports)."""
    lines = [head]
    for title, items in (("skipped", skipped), ("error", errors)):
        lines += [f"  {title}: {item}: {reason}" for item, reason in items[:limit]]
        if len(items) > limit:
            lines.append(f"  ... and {len(items) - limit} more {title} items")
    return "\n".join(lines)


@dataclass
class ImportReport:
    """What an import did. ``skipped`` were already in the store; ``errors`` are bad input, not imported."""

    imported: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    errors: list[tuple[str, str]] = field(default_factory=list)

    def summary(self, limit: int = 20) -> str:
        """Human-readable counts plus the first ``limit`` skipped items and errors with their reasons."""
        head = f"imported {len(self.imported)}, skipped {len(self.skipped)}, errors {len(self.errors)}"
        return report_summary(head, self.skipped, self.errors, limit)

    def as_dict(self) -> dict[str, Any]:
        return {"imported": self.imported, "skipped": [list(s) for s in self.skipped], "errors": [list(e) for e in self.errors]}


@dataclass
class _Item:
    """One image to import, with everything known about it (validated before anything is written)."""

    name: str
    path: Path
    width: int
    height: int
    source: str
    sha256: str | None = None
    bit_depth: int | None = None
    photometric: str | None = None
    patient_id: str | None = None
    view: str | None = None
    file_status: FileStatus = FileStatus.OK
    split: Split | None = None
    labels: dict[str, bool] = field(default_factory=dict)
    no_finding: bool = False
    boxes: list[tuple[str, float, float, float, float, str]] = field(default_factory=list)
    boxes_complete: bool = False

    def add_info(self, info: ImageInfo) -> None:
        self.sha256, self.bit_depth, self.photometric = info.sha256, info.bit_depth, info.photometric
        self.patient_id = self.patient_id or info.patient_id
        self.view = self.view or info.view

    def error(self, classes: Iterable[str]) -> str | None:
        """Why the item cannot be imported as it is, or None."""
        known = set(classes)
        unknown = sorted({n for n in self.labels if n not in known} | {b[0] for b in self.boxes if b[0] not in known})
        if unknown:
            return f"unknown class {unknown[0]!r} (known: {sorted(known)})" if len(unknown) == 1 else f"unknown classes {unknown}"
        for name, *coords, _ in self.boxes:
            reason = box_error(*coords, self.width, self.height)
            if reason:
                return f"class {name!r}: {reason}"
        absent = sorted({b[0] for b in self.boxes if self.labels.get(b[0]) is False})
        if absent:
            return f"boxes of {absent}, which the labels say are absent"
        if self.no_finding and (self.boxes or any(self.labels.values())):
            return f"{NO_FINDING!r} together with findings"
        return None


#: Environment variable holding the pseudonymisation salt (a secret: never on a command line or in a file).
SALT_ENV = "OXNET_PSEUDONYM_SALT"


def pseudonymize(patient_id: str | None, salt: str | None) -> str | None:
    """``patient_id`` unchanged when ``salt`` is None, else a salted SHA-256 pseudonym (16 hex digits)."""
    if patient_id is None or salt is None:
        return patient_id
    return hashlib.sha256(f"{salt}\x00{patient_id}".encode()).hexdigest()[:16]


def _split(value: Any, where: str) -> Split | None:
    if value is None:
        return None
    try:
        return Split(value)
    except ValueError:
        raise ValueError(f"{where}: split must be one of {[s.value for s in Split]}, got {value!r}") from None


def _write(
    session: Session,
    project_name: str,
    vocabulary: Sequence[str] | None,
    items: Sequence[_Item],
    annotator: str,
    report: ImportReport,
) -> None:
    """Validate, de-duplicate and bulk-insert items with their labels, boxes and audit entries.

    The store's write lock is taken first, so two runs of the same import never both insert one path:
    the second waits, then finds the first one's images and skips them.
    """
    _lock_for_import(session)
    project = ensure_project(session, project_name, vocabulary)
    class_ids = dict(session.execute(select(LabelClass.name, LabelClass.id).where(LabelClass.project_id == project.id)).all())
    by_path: dict[str, int] = {}
    by_hash: dict[str, str] = {}
    for image_id, path, sha in session.execute(select(Image.id, Image.path, Image.sha256).where(Image.project_id == project.id)):
        by_path[path] = image_id
        if sha:
            by_hash[sha] = path
    accepted: list[_Item] = []
    earlier: dict[str, str] = {}  # path or content hash -> name of the item of this import that has it
    for item in items:
        path = str(item.path)
        if path in earlier:
            report.errors.append((item.name, f"the same file as {earlier[path]} earlier in this import; "
                                             "only the first entry is imported"))
            continue
        if path in by_path:
            report.skipped.append((item.name, f"already in the store (image {by_path[path]})"))
            continue
        if item.sha256 and item.sha256 in earlier:
            report.skipped.append((item.name, f"same content as {earlier[item.sha256]} earlier in this import"))
            continue
        if item.sha256 and item.sha256 in by_hash:
            report.skipped.append((item.name, f"same content as {by_hash[item.sha256]}, already in the store"))
            continue
        reason = item.error(class_ids)
        if reason:
            report.errors.append((item.name, reason))
            continue
        earlier[path] = item.name
        if item.sha256:
            earlier[item.sha256] = item.name
        accepted.append(item)
    if not accepted:
        return

    annotator_ids = {annotator: get_annotator(session, annotator, "import").id}
    for item in accepted:
        for *_, who in item.boxes:
            if who not in annotator_ids:
                annotator_ids[who] = get_annotator(session, who, "import").id
    now = utcnow()
    image_rows = [
        {
            "project_id": project.id, "path": str(item.path), "sha256": item.sha256, "width": item.width,
            "height": item.height, "bit_depth": item.bit_depth, "photometric": item.photometric,
            "patient_id": item.patient_id, "view": item.view, "split": item.split, "source": item.source,
            "file_status": item.file_status, "file_error": None, "no_finding": item.no_finding,
            "boxes_complete": item.boxes_complete,
            "granularity": derive_granularity(
                boxes_complete=item.boxes_complete, no_finding=item.no_finding,
                has_labels=bool(item.labels), has_boxes=bool(item.boxes),
            ),
            "version": 1, "created_at": now, "updated_at": now,
        }
        for item in accepted
    ]
    table = Image.__table__
    ids = list(session.scalars(insert(table).returning(table.c.id, sort_by_parameter_order=True), image_rows))
    label_rows, box_rows, audit_rows = [], [], []
    importer_id = annotator_ids[annotator]
    for image_id, item in zip(ids, accepted, strict=True):
        label_rows += [
            {"image_id": image_id, "class_id": class_ids[name], "present": present, "annotator_id": importer_id}
            for name, present in item.labels.items()
        ]
        box_rows += [
            {"image_id": image_id, "class_id": class_ids[name], "x1": x1, "y1": y1, "x2": x2, "y2": y2,
             "annotator_id": annotator_ids[who], "created_at": now}
            for name, x1, y1, x2, y2, who in item.boxes
        ]
        after = make_state(item.labels, item.no_finding, item.boxes_complete, [box_state(*b) for b in item.boxes])
        audit_rows.append({"at": now, "annotator_id": importer_id, "image_id": image_id, "action": "import",
                           "note": item.source, "before": EMPTY_STATE, "after": after})
        report.imported.append(item.name)
    for model, rows in ((ImageLabel, label_rows), (Box, box_rows), (AuditEntry, audit_rows)):
        if rows:
            session.execute(insert(model.__table__), rows)


#: Key of the PostgreSQL advisory lock that serialises imports.
_IMPORT_LOCK_KEY = 0x0A12_1D0C


def _lock_for_import(session: Session) -> None:
    """Serialise imports before they read what is already stored.

    SQLite: a write statement that changes nothing takes the database's write lock now (waiting up to
    the busy timeout for another writer); the reads that follow then see everything committed before.
    PostgreSQL: a transaction-scoped advisory lock. Other databases: nothing (a racing import may then
    fail on the unique constraints and change nothing).
    """
    dialect = session.get_bind().dialect.name
    if dialect == "sqlite":
        session.execute(update(Project).where(false()).values(name=Project.name).execution_options(synchronize_session=False))
    elif dialect == "postgresql":
        session.execute(select(func.pg_advisory_xact_lock(_IMPORT_LOCK_KEY)))


def _existing_paths(session: Session, project: str) -> set[str]:
    """Paths of the project's images (empty when the project does not exist yet)."""
    query = select(Image.path).join(Project, Project.id == Image.project_id).where(Project.name == project)
    return set(session.scalars(query))


def _each(items: Sequence[Any], progress: Progress | None) -> Iterable[Any]:
    total = len(items)
    for done, item in enumerate(items, 1):
        yield item
        if progress is not None:
            progress(done, total)


def _read_csv(path: Path, required: Sequence[str]) -> list[dict[str, str]]:
    """Rows of a CSV file as dicts; ValueError naming the file when it is unreadable or lacks ``required`` columns."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            columns = reader.fieldnames or []
            missing = [c for c in required if c not in columns]
            if missing:
                raise ValueError(f"missing columns {missing} (has {columns})")
            return list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise ValueError(f"cannot read CSV ({e})") from e


# --- folder ---------------------------------------------------------------------------------------


def import_folder(
    session: Session,
    folder: str | Path,
    *,
    project: str = DEFAULT_PROJECT,
    annotator: str = "import:folder",
    split: str | None = None,
    patient_salt: str | None = None,
    max_pixels: int = MAX_PIXELS,
    progress: Progress | None = None,
) -> ImportReport:
    """Import every PNG, JPEG and DICOM file under ``folder`` (recursively) as unlabeled images.

    Every file is read, hashed and decoded; anything that is not a readable image is an error in the
    report. From DICOM headers only the patient id (pseudonymised when ``patient_salt`` is set), view,
    size, bit depth and photometric interpretation are kept. Hidden files (``.name``) are ignored.
    """
    report = ImportReport()
    root = Path(folder).expanduser().resolve()
    if not root.is_dir():
        report.errors.append((str(folder), "not a folder"))
        return report
    files = sorted(p for p in root.rglob("*") if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts))
    split_ = _split(split, "split")
    existing = _existing_paths(session, project)
    items = []
    for path in _each(files, progress):
        item = _Item(name=str(path), path=path, width=0, height=0, source="folder", split=split_)
        if str(path) in existing:
            items.append(item)  # reported as skipped, the file is not read again
            continue
        try:
            info = probe_image(path, verify=True, max_pixels=max_pixels)
        except ValueError as e:
            report.errors.append((str(path), str(e).removeprefix(f"{path}: ")))
            continue
        item.width, item.height = info.width, info.height
        item.add_info(info)
        item.patient_id = pseudonymize(item.patient_id, patient_salt)
        items.append(item)
    _write(session, project, None, items, annotator, report)
    return report


# --- COCO -----------------------------------------------------------------------------------------


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
        split_ = _split(split, "split")
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

    existing = _existing_paths(session, project)
    items = []
    for image in _each(coco["images"], progress):
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
    _write(session, project, vocabulary, items, annotator, report)
    return report


def _coco_item(
    image: Mapping[str, Any],
    annotations: Sequence[Mapping[str, Any]],
    categories: Mapping[int, str],
    root: Path,
    annotator: str,
    split: Split | None,
) -> _Item:
    for key in ("id", "file_name", "width", "height"):
        if key not in image:
            raise ValueError(f"missing field {key!r}")
    width, height = int(image["width"]), int(image["height"])
    item = _Item(
        name="", path=_resolve_under(root, image["file_name"]), width=width, height=height, source="coco",
        patient_id=None if image.get("patient_id") is None else str(image["patient_id"]),
        view=image.get("view_position") or image.get("view"),
        split=split or _split(image.get("split"), "split"),
    )
    for ann in annotations:
        category = categories.get(ann.get("category_id"))
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


# --- NIH ChestX-ray14 -----------------------------------------------------------------------------


def _index_files(folders: Sequence[Path]) -> dict[str, Path]:
    """File name -> path for every file under ``folders`` (names only; nothing is opened)."""
    found: dict[str, Path] = {}
    for folder in folders:
        for directory, _, names in os.walk(folder):
            for name in names:
                found.setdefault(name, Path(directory) / name)
    return found


def _read_nih_boxes(path: Path) -> dict[str, list[list[str]]]:
    """BBox_List_2017.csv as {image name: [[line number, label, x, y, w, h], ...]}."""
    boxes: dict[str, list[list[str]]] = {}
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            header = next(reader, [])
            if len(header) < 6 or header[0] != "Image Index" or header[1] != "Finding Label":
                raise ValueError(f"missing columns: expected 'Image Index', 'Finding Label', 'Bbox [x', 'y', 'w', 'h]', got {header}")
            for line, row in enumerate(reader, 2):
                if row:
                    boxes.setdefault(row[0], []).append([str(line), *row[1:6]])
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise ValueError(f"cannot read CSV ({e})") from e
    return boxes


def import_nih(
    session: Session,
    data_entry: str | Path | Sequence[str | Path],
    *,
    images: str | Path | Sequence[str | Path],
    bbox_list: str | Path | None = None,
    project: str = DEFAULT_PROJECT,
    annotator: str = "import:nih",
    image_size: int = NIH_IMAGE_SIZE,
    boxes_complete: bool = True,
    verify: bool = False,
    split: str | None = None,
    patient_salt: str | None = None,
    progress: Progress | None = None,
) -> ImportReport:
    """Import NIH ChestX-ray14: Data_Entry_2017*.csv (+ BBox_List_2017.csv) with its image folders.

    Every row becomes a weak image: its "Finding Labels" present, NIH's other box classes absent
    (``"No Finding"`` = explicitly negative). Images of the box list get their boxes ("Infiltrate" is
    NIH's "Infiltration") and, with ``boxes_complete`` (the dataset's convention), count as full.
    Files are checked lazily: nothing is opened unless ``verify``; the size is NIH's ``image_size`` (1024)
    and ``python -m db check`` verifies the files later. Images are looked up by name under every
    folder of ``images`` (NIH ships images_001 ... images_012); a name found nowhere is placed under the
    first folder.
    """
    report = ImportReport()
    entries = [Path(p) for p in ([data_entry] if isinstance(data_entry, (str, Path)) else data_entry)]
    folders = [Path(p).expanduser().resolve() for p in ([images] if isinstance(images, (str, Path)) else images)]
    if not folders:
        raise ValueError("images: give at least one image folder")
    split_ = _split(split, "split")
    rows: list[dict[str, str]] = []
    for path in entries:
        try:
            rows += _read_csv(path, NIH_DATA_ENTRY_COLUMNS)
        except ValueError as e:
            report.errors.append((str(path), str(e)))
    boxes: dict[str, list[list[str]]] = {}
    if bbox_list is not None:
        try:
            boxes = _read_nih_boxes(Path(bbox_list))
        except ValueError as e:
            report.errors.append((str(bbox_list), str(e)))
    if report.errors:
        return report

    files = _index_files(folders)
    seen: set[str] = set()
    items = []
    for row in _each(rows, progress):
        name = row["Image Index"]
        try:
            if not name:
                raise ValueError("empty 'Image Index'")
            if name in seen:
                raise ValueError("appears twice in Data_Entry")
            seen.add(name)
            findings = {f.strip() for f in row["Finding Labels"].split("|") if f.strip()}
            item = _Item(
                name=name, path=files.get(name, folders[0] / name), width=image_size, height=image_size,
                source="nih", patient_id=pseudonymize(row["Patient ID"].strip() or None, patient_salt),
                view=row["View Position"].strip() or None, split=split_, file_status=FileStatus.UNCHECKED,
            )
            item.no_finding = NO_FINDING in findings
            if not item.no_finding:
                item.labels = {c: c in findings for c in NIH_BOX_CLASSES}
            for line, label, *coords in boxes.pop(name, []):
                label = NIH_BOX_ALIASES.get(label.strip(), label.strip())
                try:
                    x, y, w, h = (float(v) for v in coords)
                except ValueError:
                    raise ValueError(f"BBox_List line {line}: box must be 4 numbers, got {coords}") from None
                item.boxes.append((label, x, y, x + w, y + h, annotator))
                item.labels[label] = True
            if item.boxes:
                item.boxes_complete = boxes_complete
            if verify:
                info = probe_image(item.path, verify=True)
                if (info.width, info.height) != (image_size, image_size):
                    raise ValueError(f"the file is {info.width}x{info.height}, expected {image_size}x{image_size}")
                item.add_info(info)
                item.file_status = FileStatus.OK
        except ValueError as e:
            report.errors.append((name, str(e)))
            continue
        items.append(item)
    for name in boxes:
        report.errors.append((name, "in BBox_List but not in Data_Entry"))
    _write(session, project, NIH_BOX_CLASSES, items, annotator, report)
    return report


# --- VinDr-CXR ------------------------------------------------------------------------------------


def import_vindr(
    session: Session,
    train_csv: str | Path,
    *,
    images: str | Path,
    project: str = DEFAULT_PROJECT,
    reader_prefix: str = "vindr",
    verify: bool = True,
    split: str | None = None,
    patient_salt: str | None = None,
    max_pixels: int = MAX_PIXELS,
    progress: Progress | None = None,
) -> ImportReport:
    """Import VinDr-CXR's train.csv (image_id, class_name, rad_id, x_min, y_min, x_max, y_max) and its DICOMs.

    Each reader (``rad_id``) is kept as a separate annotator (``vindr:R8``). An image with boxes is full
    (VinDr's readers marked every finding): its boxed classes present, the other classes absent. An
    image whose readers all wrote "No finding" is a weak negative. Images are ``images/<image_id>.dicom``
    (or .dcm, .png, .jpg).
    """
    report = ImportReport()
    folder = Path(images).expanduser().resolve()
    try:
        split_ = _split(split, "split")
        rows = _read_csv(Path(train_csv), VINDR_COLUMNS)
    except ValueError as e:
        report.errors.append((str(train_csv), str(e)))
        return report
    by_image: dict[str, list[dict[str, str]]] = {}
    for row in rows:
        by_image.setdefault(row["image_id"].strip(), []).append(row)
    existing = _existing_paths(session, project)
    items = []
    for image_id in _each(list(by_image), progress):
        try:
            if not image_id:
                raise ValueError("empty image_id")
            path = next((folder / f"{image_id}{s}" for s in VINDR_SUFFIXES if (folder / f"{image_id}{s}").exists()), None)
            if path is None:
                raise ValueError(f"no image file {image_id}{{{','.join(VINDR_SUFFIXES)}}} in {folder}")
            item = _Item(name=image_id, path=path, width=0, height=0, source="vindr", split=split_)
            if str(path) not in existing:
                info = probe_image(path, verify=verify, max_pixels=max_pixels)
                item.width, item.height = info.width, info.height
                item.add_info(info)
                item.patient_id = pseudonymize(item.patient_id, patient_salt)
            for row in by_image[image_id]:
                label = row["class_name"].strip()
                if label == VINDR_NO_FINDING:
                    continue
                try:
                    coords = [float(row[k]) for k in ("x_min", "y_min", "x_max", "y_max")]
                except ValueError:
                    raise ValueError(f"{label!r} box of {row['rad_id']} has no coordinates") from None
                item.boxes.append((label, *coords, f"{reader_prefix}:{row['rad_id'].strip()}"))
            if item.boxes:
                boxed = {b[0] for b in item.boxes}
                item.labels = {c: c in boxed for c in VINDR_CLASSES} | {c: True for c in boxed}
                item.boxes_complete = True
            else:
                item.no_finding = True
        except ValueError as e:
            report.errors.append((image_id, str(e).removeprefix(f"{folder}/")))
            continue
        items.append(item)
    _write(session, project, VINDR_CLASSES, items, f"import:{reader_prefix}", report)
    return report


# --- lazy file checks -----------------------------------------------------------------------------


def check_files(
    session: Session,
    project: str = DEFAULT_PROJECT,
    *,
    recheck: bool = False,
    max_pixels: int = MAX_PIXELS,
    progress: Progress | None = None,
) -> ImportReport:
    """Read, hash and decode the project's unchecked files (every file with ``recheck``).

    Sets ``file_status`` to ok, missing or corrupt (with the reason in ``file_error``) and fills
    ``sha256``, ``bit_depth`` and ``photometric``. Annotation versions do not change. Exports leave out
    missing and corrupt images. The report lists good files as imported and bad ones as errors.
    """
    report = ImportReport()
    project_id = get_project(session, project).id
    query = select(Image.id, Image.path, Image.width, Image.height).where(Image.project_id == project_id)
    if not recheck:
        query = query.where(Image.file_status == FileStatus.UNCHECKED)
    rows = session.execute(query.order_by(Image.id)).all()
    hashes = dict(session.execute(
        select(Image.sha256, Image.id).where(Image.project_id == project_id, Image.sha256.is_not(None))
    ).all())
    updates = []
    for image_id, path, width, height in _each(rows, progress):
        values = {"b_id": image_id, "sha256": None, "bit_depth": None, "photometric": None,
                  "file_status": FileStatus.OK, "file_error": None}
        try:
            if not Path(path).is_file():
                values["file_status"] = FileStatus.MISSING
                raise ValueError("file not found")
            info = probe_image(path, verify=True, max_pixels=max_pixels)
            if (info.width, info.height) != (width, height):
                raise ValueError(f"the file is {info.width}x{info.height}, the store says {width}x{height}")
            if hashes.get(info.sha256, image_id) != image_id:
                raise ValueError(f"same content as image {hashes[info.sha256]}")
            hashes[info.sha256] = image_id
            values.update(sha256=info.sha256, bit_depth=info.bit_depth, photometric=info.photometric)
            report.imported.append(path)
        except ValueError as e:
            reason = str(e).removeprefix(f"{path}: ")
            if values["file_status"] is FileStatus.OK:
                values["file_status"] = FileStatus.CORRUPT
            values["file_error"] = reason
            report.errors.append((path, reason))
        updates.append(values)
    if updates:
        table = Image.__table__
        session.execute(
            update(table).where(table.c.id == bindparam("b_id")).values(
                {k: bindparam(k) for k in ("sha256", "bit_depth", "photometric", "file_status", "file_error")}
            ),
            updates,
        )
    return report
