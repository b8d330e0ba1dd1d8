"""The write path every importer shares: items checked, de-duplicated and bulk-inserted with their labels,
boxes and audit entries in the caller's transaction; image files probed; patient ids pseudonymised; the
report of what was imported, skipped and refused.

An importer (one module per format in this package, and :mod:`db.dicomweb`) turns its input into
:class:`ImportItem` values, using :func:`probed_item` for a file it reads, and hands them to
:func:`write_items`.
"""

from __future__ import annotations

import csv
import hashlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from sqlalchemy import Table, false, func, insert, select, update
from sqlalchemy.orm import Session

from db.lifecycle import EMPTY_STATE, box_state, derive_granularity, make_state
from db.models import AuditEntry, Box, FileStatus, Image, ImageLabel, LabelClass, Project, Split, utcnow
from db.people import get_annotator
from db.projects import ensure_project
from oxnet.classes import NO_FINDING
from oxnet.data.annotation import annotation_problems
from oxnet.data.imaging import MAX_PIXELS, ImageInfo, probe_image


#: ``progress(done, total)``, called as items are read.
Progress = Callable[[int, int], None]

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
class ImportItem:
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
        problems = annotation_problems(
            [b[:5] for b in self.boxes], classes=known, width=self.width, height=self.height,
            present=[n for n, v in self.labels.items() if v], absent=[n for n, v in self.labels.items() if not v],
            no_finding=self.no_finding,
        )
        kinds = {p.kind: p for p in reversed(problems)}  # the first problem of each kind
        unknown = sorted({n for p in problems if p.kind in ("no_class", "unknown_class", "unknown_finding") for n in p.names})
        if unknown:
            return f"unknown class {unknown[0]!r} (known: {sorted(known)})" if len(unknown) == 1 else f"unknown classes {unknown}"
        if "box" in kinds:
            return f"class {kinds['box'].names[0]!r}: {kinds['box'].reason}"
        if "absent_and_present" in kinds:
            return f"boxes of {list(kinds['absent_and_present'].names)}, which the labels say are absent"
        if "no_finding_with_findings" in kinds:
            return f"{NO_FINDING!r} together with findings"
        return None


#: Environment variable holding the pseudonymisation salt (a secret: never on a command line or in a file).
SALT_ENV = "OXNET_PSEUDONYM_SALT"


def pseudonymize(patient_id: str | None, salt: str | None) -> str | None:
    """``patient_id`` unchanged when ``salt`` is None, else a salted SHA-256 pseudonym (16 hex digits)."""
    if patient_id is None or salt is None:
        return patient_id
    return hashlib.sha256(f"{salt}\x00{patient_id}".encode()).hexdigest()[:16]


def probed_item(
    name: str,
    path: Path,
    *,
    source: str,
    split: Split | None,
    patient_salt: str | None,
    verify: bool = True,
    max_pixels: int = MAX_PIXELS,
) -> ImportItem:
    """The item of an image file read by :func:`~oxnet.data.imaging.probe_image` (decoded too with
    ``verify``): size, content hash, bit depth, photometric interpretation, view and patient id from
    the file, the patient id pseudonymised with ``patient_salt``. ValueError when the file is not a
    readable image."""
    info = probe_image(path, verify=verify, max_pixels=max_pixels)
    item = ImportItem(name=name, path=path, width=info.width, height=info.height, source=source, split=split)
    item.add_info(info)
    item.patient_id = pseudonymize(item.patient_id, patient_salt)
    return item


def parse_split(value: Any, where: str) -> Split | None:
    if value is None:
        return None
    try:
        return Split(value)
    except ValueError:
        raise ValueError(f"{where}: split must be one of {[s.value for s in Split]}, got {value!r}") from None


def write_items(
    session: Session,
    project_name: str,
    vocabulary: Sequence[str] | None,
    items: Sequence[ImportItem],
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
    accepted: list[ImportItem] = []
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
    table = cast(Table, Image.__table__)
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
            session.execute(insert(cast(Table, model.__table__)), rows)


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


def existing_paths(session: Session, project: str) -> set[str]:
    """Paths of the project's images (empty when the project does not exist yet)."""
    query = select(Image.path).join(Project, Project.id == Image.project_id).where(Project.name == project)
    return set(session.scalars(query))


def each(items: Sequence[Any], progress: Progress | None) -> Iterable[Any]:
    total = len(items)
    for done, item in enumerate(items, 1):
        yield item
        if progress is not None:
            progress(done, total)


def read_csv(path: Path, required: Sequence[str]) -> list[dict[str, str]]:
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
