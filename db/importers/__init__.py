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

One module per format (:mod:`~db.importers.folder`, :mod:`~db.importers.coco`, :mod:`~db.importers.nih`,
:mod:`~db.importers.vindr`) over the write path they share (:mod:`~db.importers.write`: the checks, the
de-duplication, the bulk insert, image probing, pseudonymisation and the report); the lazy file check
is :mod:`~db.importers.check`. This package exports the public names.
"""

from db.importers.check import check_files
from db.importers.coco import import_coco
from db.importers.folder import import_folder
from db.importers.nih import NIH_BOX_ALIASES, NIH_DATA_ENTRY_COLUMNS, NIH_IMAGE_SIZE, import_nih
from db.importers.vindr import VINDR_CLASSES, VINDR_COLUMNS, VINDR_NO_FINDING, VINDR_SUFFIXES, import_vindr
from db.importers.write import SALT_ENV, ImportReport, Progress, pseudonymize, report_summary

__all__ = [
    "NIH_BOX_ALIASES", "NIH_DATA_ENTRY_COLUMNS", "NIH_IMAGE_SIZE", "SALT_ENV", "VINDR_CLASSES", "VINDR_COLUMNS",
    "VINDR_NO_FINDING", "VINDR_SUFFIXES", "ImportReport", "Progress", "check_files", "import_coco", "import_folder",
    "import_nih", "import_vindr", "pseudonymize", "report_summary",
]
