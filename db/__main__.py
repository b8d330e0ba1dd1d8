"""Command line of the workbench store: ``python -m db --help``."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from sqlalchemy.exc import ArgumentError
from tqdm import tqdm

from db.accounts import USER_ACTIONS, users_command
from db.engine import DB_URL_ENV, DEFAULT_DB_URL, database_url, display_url, init_db, make_sessionmaker, store_error_message
from db.export import INCLUDE_PATIENT_IDS, export_coco, export_training_mix, file_mapping, write_file_map, write_json
from db.importers import SALT_ENV, ImportReport, check_files, import_coco, import_folder, import_nih, import_vindr
from db.projects import DEFAULT_PROJECT, assign_splits, stats
from db.dicomweb import DEFAULT_MODALITIES, NETRC_ENV, PASSWORD_ENV, USER_ENV, export_sr, import_dicomweb, store_sr
from db.demo import data_dir
from oxnet.vocabulary import GRANULARITIES
from db.models import Role

DESCRIPTION = f"""\
The OXnet workbench store: the database that remembers your images, their labels and boxes, and the
models trained on them. Images stay where they are; the store only records their paths.

Where the store is: the SQLAlchemy URL in the environment variable {DB_URL_ENV}, or --db.
Default: {DEFAULT_DB_URL} (a file workbench.db in the current folder, created on first use).
Examples:
  python -m db import folder /data/xrays                  every PNG, JPEG and DICOM under the folder
  python -m db import coco boxes.json --images /data/png  a COCO JSON whose file names are under /data/png
  python -m db import nih Data_Entry_2017_v2020.csv --bbox BBox_List_2017.csv --images /data/nih/images_*
  python -m db import vindr train.csv --images /data/vindr/train
  python -m db split                                      train/val/test by patient
  python -m db stats                                      counts per granularity and split
  python -m db users add dr.lee --role reviewer           a UI account (one-time password on stderr)
  python -m db export coco out.json --granularity full    boxes of the fully labelled images
  python -m db import dicomweb http://pacs:8042/dicom-web --modality CR,DX --since 2026-01-01
  python -m db export sr OUTDIR [--model-version N] [--stow URL]   boxes and findings as DICOM SR
Archive credentials: {USER_ENV} and {PASSWORD_ENV}, or a netrc file
readable by you only ({NETRC_ENV}, default ~/.netrc); never on the command line.
Patient ids can be replaced by salted hashes: set {SALT_ENV} when importing (never on the command
line, where every user of the machine can read it). New images get a split by patient unless --split
or --no-assign-splits says otherwise. Exports leave patient ids out and write neutral file names
(image-<id>.<ext>) unless --include-patient-ids; --file-map writes the real paths separately.
Each import is one transaction: if it stops half-way, nothing of it is stored. Bad files are listed
with the reason and the rest is imported; the exit status is 1 when there were errors, 2 for bad
input, 3 when the store is locked, read-only, full or cannot be opened (one sentence says which)."""


def _progress(description: str) -> tuple[Callable[[int, int], None], Callable[[], None]]:
    bar = tqdm(desc=description, unit="item", file=sys.stderr, disable=None)

    def update(done: int, total: int) -> None:
        bar.total, bar.n = total, done
        if done == total or done % 500 == 0:
            bar.refresh()

    return update, bar.close


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m db", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--db", metavar="URL", help=f"store URL (default: ${DB_URL_ENV} or {DEFAULT_DB_URL})")
    parser.add_argument("--project", default=DEFAULT_PROJECT, help="project name (default: %(default)s)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    commands.add_parser("init", help="create the store, or bring an existing one up to date")

    imports = commands.add_parser("import", help="add images and their labels").add_subparsers(dest="kind", required=True, metavar="KIND")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--split", choices=["train", "val", "test"], help="put every imported image in this split")
    common.add_argument("--no-assign-splits", action="store_true",
                        help="leave new images without a split (default: train/val/test by patient; unsplit images are never trained on)")
    common.add_argument("--pseudonymize-salt", metavar="SALT", help=argparse.SUPPRESS)  # refused: see main()
    common.add_argument("--report", metavar="FILE", help="also write the full report (every item and reason) as JSON")

    folder = imports.add_parser("folder", parents=[common], help="every PNG, JPEG and DICOM file under a folder (unlabeled)")
    folder.add_argument("folder", metavar="DIR")

    coco = imports.add_parser("coco", parents=[common], help="a COCO JSON file (boxes, image_labels)")
    coco.add_argument("file", metavar="FILE")
    coco.add_argument("--images", metavar="DIR", help="folder the file names are relative to (default: the JSON's folder)")
    coco.add_argument("--no-verify", action="store_true", help="do not read every image now (faster; run 'check' later)")

    nih = imports.add_parser("nih", parents=[common], help="NIH ChestX-ray14 Data_Entry CSV(s), box list and image folders")
    nih.add_argument("data_entry", nargs="+", metavar="DATA_ENTRY.csv")
    nih.add_argument("--images", nargs="+", required=True, metavar="DIR", help="image folder(s) (images_001 ... images_012)")
    nih.add_argument("--bbox", metavar="BBox_List_2017.csv", help="NIH's box list")
    nih.add_argument("--verify", action="store_true", help="read every image now (default: later, with 'check')")

    vindr = imports.add_parser("vindr", parents=[common], help="VinDr-CXR train.csv and its DICOM folder")
    vindr.add_argument("csv", metavar="train.csv")
    vindr.add_argument("--images", required=True, metavar="DIR", help="folder with <image_id>.dicom files")

    dicomweb = imports.add_parser("dicomweb", parents=[common], help="CR/DX instances from a DICOM archive (QIDO-RS search, WADO-RS retrieve)")
    dicomweb.add_argument("url", metavar="URL", help="the DICOMweb service root, e.g. http://127.0.0.1:8042/dicom-web")
    dicomweb.add_argument("--study", nargs="+", default=[], metavar="UID", help="only these Study Instance UIDs")
    dicomweb.add_argument("--modality", default=",".join(DEFAULT_MODALITIES), help="series modalities to import (default: %(default)s)")
    dicomweb.add_argument("--since", metavar="YYYY-MM-DD", help="only studies from this day on (StudyDate)")
    dicomweb.add_argument("--cache", metavar="DIR", help="where retrieved files are kept (default: <data dir>/dicomweb beside the store)")

    export = commands.add_parser("export", help="write labels out").add_subparsers(dest="kind", required=True, metavar="KIND")
    coco_out = export.add_parser("coco", help="a COCO JSON file (with image_labels and granularity per image)")
    coco_out.add_argument("out", metavar="OUT")
    coco_out.add_argument("--granularity", choices=[*GRANULARITIES, "all"], default="all")
    coco_out.add_argument("--split", choices=["train", "val", "test"])
    coco_out.add_argument("--images-root", metavar="DIR", help="with --include-patient-ids: write file names relative to this folder")
    coco_out.add_argument("--include-patient-ids", action="store_true", default=INCLUDE_PATIENT_IDS,
                          help="keep patient ids and real file names (identifying; default: left out, names image-<id>.<ext>)")
    coco_out.add_argument("--file-map", metavar="CSV", help="also write id, neutral file name and real path (identifying) to this CSV")
    mix = export.add_parser("mix", help="train.json, val.json and test.json: what the trainer learns from (real paths, no patient ids)")
    mix.add_argument("out", metavar="OUTDIR")
    mix.add_argument("--include-patient-ids", action="store_true", default=INCLUDE_PATIENT_IDS, help="keep patient ids (identifying)")

    sr = export.add_parser("sr", help="DICOM Structured Reports (TID 1500) of the DICOM images' boxes and findings")
    sr.add_argument("out", metavar="OUTDIR")
    sr.add_argument("--model-version", type=int, metavar="N", help="that model version's detections instead of the annotations")
    sr.add_argument("--stow", metavar="URL", help="also store them in this DICOMweb archive (STOW-RS; keeps the source's patient ids)")
    sr.add_argument("--include-patient-ids", action="store_true", default=INCLUDE_PATIENT_IDS,
                    help="keep the source's patient name and ids in the files (identifying; default: left out)")
    sr.add_argument("--report", metavar="FILE", help="also write the full report as JSON")

    commands.add_parser("stats", help="image counts per granularity and split (JSON)")
    users = commands.add_parser("users", help="accounts of the UI (the command line is trusted: no login needed)")
    users.add_argument("action", choices=USER_ACTIONS)
    users.add_argument("name", nargs="?", help="the user (not for 'list'); a new one-time password goes to stderr")
    users.add_argument("--role", choices=[r.value for r in Role], default="annotator", help="for add and set-role")

    split = commands.add_parser("split", help="assign train/val/test to images without a split, by patient")
    split.add_argument("--fractions", nargs=3, type=float, default=(0.8, 0.1, 0.1), metavar=("TRAIN", "VAL", "TEST"))
    split.add_argument("--seed", type=int, default=0)
    split.add_argument("--reassign", action="store_true", help="redo every image, not only new ones")

    check = commands.add_parser("check", help="read the files imported without reading them (NIH) and mark missing or corrupt ones")
    check.add_argument("--recheck", action="store_true", help="check every file again")
    return parser


def _finish(report: ImportReport, args: argparse.Namespace) -> int:
    print(report.summary())
    if getattr(args, "report", None):
        write_json(report.as_dict(), args.report)
    return 1 if report.errors else 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if getattr(args, "pseudonymize_salt", None) is not None:
        print(f"error: --pseudonymize-salt is refused: a salt on the command line is readable by every user of this "
              f"machine (/proc/<pid>/cmdline, shell history). Set the environment variable {SALT_ENV} instead.", file=sys.stderr)
        return 2
    url = database_url(args.db)
    try:
        return _run(args, url)
    except ArgumentError:  # its message repeats the URL, password included
        print(f"error: cannot parse the store URL {display_url(url)} (set {DB_URL_ENV} or --db to an SQLAlchemy URL)", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - a locked, read-only or full store is one sentence, not SQL
        message = store_error_message(e, url)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        return 3


def _run(args: argparse.Namespace, url: str) -> int:
    Session = make_sessionmaker(init_db(url))
    salt = os.environ.get(SALT_ENV) or None
    progress, close = _progress(f"{args.command} {getattr(args, 'kind', '')}".strip())
    try:
        with Session.begin() as session:
            if args.command == "init":
                print(f"store ready: {display_url(url)}")
                return 0
            if args.command == "import":
                options = {"project": args.project, "split": args.split, "patient_salt": salt, "progress": progress}
                if args.kind == "folder":
                    report = import_folder(session, args.folder, **options)
                elif args.kind == "coco":
                    report = import_coco(session, args.file, images=args.images, verify=not args.no_verify, **options)
                elif args.kind == "dicomweb":
                    cache = args.cache or data_dir(url) / "dicomweb"
                    modalities = [m.strip() for m in args.modality.split(",") if m.strip()]
                    report = import_dicomweb(session, args.url, cache_dir=cache, studies=args.study, modalities=modalities,
                                             since=args.since, **options)
                elif args.kind == "nih":
                    report = import_nih(session, args.data_entry, images=args.images, bbox_list=args.bbox, verify=args.verify, **options)
                else:
                    report = import_vindr(session, args.csv, images=args.images, **options)
                close()
                if report.imported and not args.split and not args.no_assign_splits:
                    counts = assign_splits(session, args.project)
                    print(f"split by patient: {counts}")
                return _finish(report, args)
            if args.command == "check":
                report = check_files(session, args.project, recheck=args.recheck, progress=progress)
                close()
                return _finish(report, args)
            if args.command == "export":
                if args.kind == "sr":
                    keep_ids = args.include_patient_ids or bool(args.stow)
                    sr_report, datasets = export_sr(session, args.out, project=args.project, model_version=args.model_version,
                                                    with_patient_ids=keep_ids)
                    if args.stow:
                        store_sr(args.stow, datasets, sr_report)
                    print(sr_report.summary())
                    if args.report:
                        write_json(sr_report.as_dict(), args.report)
                    return 1 if sr_report.errors else 0
                if args.kind == "coco":
                    data = export_coco(session, split=args.split, granularity=args.granularity, project=args.project,
                                       images_root=args.images_root, include_patient_ids=args.include_patient_ids)
                    write_json(data, args.out)
                    print(f"wrote {len(data['images'])} images, {len(data['annotations'])} boxes to {args.out}")
                    if args.file_map:
                        write_file_map(file_mapping(session, data), args.file_map)
                        print(f"wrote the file names' real paths (identifying) to {args.file_map}")
                else:
                    for name, data in export_training_mix(session, project=args.project,
                                                          include_patient_ids=args.include_patient_ids).items():
                        write_json(data, Path(args.out) / f"{name}.json")
                        print(f"{name}: {len(data['images'])} images -> {Path(args.out) / f'{name}.json'}")
                return 0
            if args.command == "users":
                return users_command(session, args.action, args.name, role=args.role)
            if args.command == "split":
                counts = assign_splits(session, args.project, fractions=tuple(args.fractions), seed=args.seed, reassign=args.reassign)
                print(json.dumps({"assigned": counts}))
                return 0
            print(json.dumps(stats(session, args.project), indent=2))
            return 0
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        close()


if __name__ == "__main__":
    sys.exit(main())
