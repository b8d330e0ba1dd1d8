"""Import VinDr-CXR: its train.csv (one row per reader and finding) and its DICOM files."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy.orm import Session

from db.importers.write import ImportItem, ImportReport, Progress, each, existing_paths, parse_split, probed_item, read_csv, write_items
from db.projects import DEFAULT_PROJECT
from oxnet.data.imaging import MAX_PIXELS


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
        split_ = parse_split(split, "split")
        rows = read_csv(Path(train_csv), VINDR_COLUMNS)
    except ValueError as e:
        report.errors.append((str(train_csv), str(e)))
        return report
    by_image: dict[str, list[dict[str, str]]] = {}
    for row in rows:
        by_image.setdefault(row["image_id"].strip(), []).append(row)
    existing = existing_paths(session, project)
    items = []
    for image_id in each(list(by_image), progress):
        try:
            if not image_id:
                raise ValueError("empty image_id")
            path = next((folder / f"{image_id}{s}" for s in VINDR_SUFFIXES if (folder / f"{image_id}{s}").exists()), None)
            if path is None:
                raise ValueError(f"no image file {image_id}{{{','.join(VINDR_SUFFIXES)}}} in {folder}")
            if str(path) in existing:  # reported as skipped, the file is not read again
                item = ImportItem(name=image_id, path=path, width=0, height=0, source="vindr", split=split_)
            else:
                item = probed_item(image_id, path, source="vindr", split=split_, patient_salt=patient_salt,
                                   verify=verify, max_pixels=max_pixels)
            for row in by_image[image_id]:
                label = row["class_name"].strip()
                if label == VINDR_NO_FINDING:
                    continue
                try:
                    x1, y1, x2, y2 = (float(row[k]) for k in ("x_min", "y_min", "x_max", "y_max"))
                except ValueError:
                    raise ValueError(f"{label!r} box of {row['rad_id']} has no coordinates") from None
                item.boxes.append((label, x1, y1, x2, y2, f"{reader_prefix}:{row['rad_id'].strip()}"))
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
    write_items(session, project, VINDR_CLASSES, items, f"import:{reader_prefix}", report)
    return report
