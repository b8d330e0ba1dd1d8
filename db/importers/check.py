"""The lazy file check: read, hash and decode the files an import did not open (``python -m db check``)."""

from __future__ import annotations

from pathlib import Path
from typing import cast

from sqlalchemy import Table, bindparam, select, update
from sqlalchemy.orm import Session

from db.importers.write import ImportReport, Progress, each
from db.models import FileStatus, Image
from db.projects import DEFAULT_PROJECT, get_project
from oxnet.data.imaging import MAX_PIXELS, probe_image


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
    for image_id, path, width, height in each(rows, progress):
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
        table = cast(Table, Image.__table__)
        session.execute(
            update(table).where(table.c.id == bindparam("b_id")).values(
                {k: bindparam(k) for k in ("sha256", "bit_depth", "photometric", "file_status", "file_error")}
            ),
            updates,
        )
    return report
