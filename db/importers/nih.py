"""Import NIH ChestX-ray14: Data_Entry_2017*.csv, BBox_List_2017.csv and the image folders."""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from pathlib import Path

from sqlalchemy.orm import Session

from db.importers.write import ImportItem, ImportReport, Progress, each, parse_split, pseudonymize, read_csv, write_items
from db.models import FileStatus
from db.projects import DEFAULT_PROJECT
from oxnet.classes import NIH_BOX_CLASSES, NO_FINDING
from oxnet.data.imaging import probe_image


#: Size of the PNGs NIH distributes (its BBox_List coordinates are in these pixels).
NIH_IMAGE_SIZE = 1024
#: Data_Entry_2017*.csv columns the importer needs (the file has more: age, gender, pixel spacing ...).
NIH_DATA_ENTRY_COLUMNS = ("Image Index", "Finding Labels", "Patient ID", "View Position")
#: NIH's box list spells one finding differently from its Data_Entry labels.
NIH_BOX_ALIASES = {"Infiltrate": "Infiltration"}


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
    split_ = parse_split(split, "split")
    rows: list[dict[str, str]] = []
    for path in entries:
        try:
            rows += read_csv(path, NIH_DATA_ENTRY_COLUMNS)
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
    for row in each(rows, progress):
        name = row["Image Index"]
        try:
            if not name:
                raise ValueError("empty 'Image Index'")
            if name in seen:
                raise ValueError("appears twice in Data_Entry")
            seen.add(name)
            findings = {f.strip() for f in row["Finding Labels"].split("|") if f.strip()}
            item = ImportItem(
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
    write_items(session, project, NIH_BOX_CLASSES, items, annotator, report)
    return report
