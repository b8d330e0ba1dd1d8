"""Import a folder of PNG, JPEG and DICOM files as unlabeled images."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy.orm import Session

from db.importers.write import ImportItem, ImportReport, Progress, each, existing_paths, parse_split, probed_item, write_items
from db.projects import DEFAULT_PROJECT
from oxnet.data.imaging import MAX_PIXELS


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
    split_ = parse_split(split, "split")
    existing = existing_paths(session, project)
    items = []
    for path in each(files, progress):
        if str(path) in existing:  # reported as skipped, the file is not read again
            items.append(ImportItem(name=str(path), path=path, width=0, height=0, source="folder", split=split_))
            continue
        try:
            item = probed_item(str(path), path, source="folder", split=split_, patient_salt=patient_salt, max_pixels=max_pixels)
        except ValueError as e:
            report.errors.append((str(path), str(e).removeprefix(f"{path}: ")))
            continue
        items.append(item)
    write_items(session, project, None, items, annotator, report)
    return report
