"""Background jobs of the workbench: demo seeding, imports and exports, each in its own process.

A page never runs long work itself: it calls :func:`start_job`, which launches
``python -m app.jobs <command> ...`` in a new process session and returns at once. The job writes its
progress to a JSON status file in ``<data dir>/jobs/`` (:func:`db.demo.data_dir`), which pages poll::

    {"id", "command", "args", "pid", "status": "running" | "done" | "failed", "done", "total",
     "message", "result", "started_at", "updated_at"}

Command line (what :func:`start_job` runs; the store is ``$OXNET_DB_URL``)::

    python -m app.jobs seed --n 300                      the synthetic demo project
    python -m app.jobs import coco boxes.json --images DIR [--split val | --assign-splits]
    python -m app.jobs import folder DIR | nih CSV... --images DIR... [--bbox CSV] | vindr CSV --images DIR
    python -m app.jobs import dicomweb URL [--study UID...] [--modality CR,DX] [--since YYYY-MM-DD]
    python -m app.jobs export OUT.json [--granularity full] [--split val] [--include-patient-ids] [--file-map CSV]

Secrets never go on the command line (``/proc/<pid>/cmdline`` is readable by every user) nor into the
status file: the pseudonymisation salt reaches an import job in its environment
(``$OXNET_PSEUDONYM_SALT``, :data:`db.importers.SALT_ENV`; ``start_job(..., secrets=...)``), and the
status and pid files are written with mode 0600.

Every process started here (jobs and the trainer, :func:`spawn`) is kept and polled by a reaper
thread of the server, so a finished one never stays behind as a zombie.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil
from sqlalchemy.engine import make_url

from db.accounts import authorize
from db.demo import data_dir, seed_demo
from db.engine import DB_URL_ENV, database_url, init_db, make_sessionmaker
from db.export import INCLUDE_PATIENT_IDS, export_coco, file_mapping, write_file_map, write_json
from db.dicomweb import DEFAULT_MODALITIES, import_dicomweb
from db.importers import SALT_ENV, ImportReport, import_coco, import_folder, import_nih, import_vindr
from db.models import Role
from db.projects import assign_splits
from oxnet import files
from oxnet.vocabulary import GRANULARITIES

#: The repository root (the jobs run with it as working directory, so ``app`` imports).
ROOT = Path(__file__).resolve().parent.parent
#: Name of the demo seeding job (one per store: its status file makes it exclusive).
DEMO_JOB = "demo-seed"
#: Environment variable: "0" turns off seeding the demo project automatically on first run.
AUTO_DEMO_ENV = "OXNET_DEMO"
#: Environment variable: number of demo images (default 300).
DEMO_IMAGES_ENV = "OXNET_DEMO_IMAGES"


def start_demo_job(url: str | None = None, *, actor: str | None = None) -> Path | None:
    """Seed the demo project of the store in the background, once (None: it ran or runs already).
    ``actor``: as :func:`start_job`."""
    return start_job("seed", ["--n", os.environ.get(DEMO_IMAGES_ENV, "300")], url=url, name=DEMO_JOB, actor=actor)
#: Seconds between two writes of a running job's status file.
WRITE_EVERY_S = 0.5
#: Seconds between two polls of the reaper thread.
REAP_EVERY_S = 0.5
#: Mode of the status, pid and log files of jobs (they name files and stores of patient data).
PRIVATE_FILE_MODE = 0o600

# The processes this server started, by pid, until they ended and were reaped. Server-wide on
# purpose (a process is the server's child, whichever browser session started it).
_children: dict[int, subprocess.Popen] = {}
_children_lock = threading.Lock()
_reaper: threading.Thread | None = None


def spawn(command: Sequence[str], *, env: Mapping[str, str], stdout: Any = subprocess.DEVNULL) -> subprocess.Popen:
    """Start ``command`` in a new process session (so a stop can signal its whole group) and keep it
    for the reaper, which polls it until it ended: no zombie stays behind."""
    global _reaper
    process = subprocess.Popen(
        list(command), cwd=ROOT, env=dict(env), start_new_session=True,
        stdin=subprocess.DEVNULL, stdout=stdout, stderr=subprocess.STDOUT if stdout is not subprocess.DEVNULL else subprocess.DEVNULL,
    )
    with _children_lock:
        _children[process.pid] = process
        if _reaper is None or not _reaper.is_alive():
            _reaper = threading.Thread(target=_reap_until_none_left, name="oxnet-reaper", daemon=True)
            _reaper.start()
    return process


def _poll_children() -> int:
    """Poll the kept processes and forget those that ended (the caller holds ``_children_lock``)."""
    for pid, process in list(_children.items()):
        if process.poll() is not None:  # reaps it
            del _children[pid]
    return len(_children)


def _reap_until_none_left() -> None:
    global _reaper
    while True:
        time.sleep(REAP_EVERY_S)
        with _children_lock:
            if not _poll_children():
                _reaper = None
                return


def write_private(path: Path, text: str, *, exclusive: bool = False) -> None:
    """Write ``text`` to ``path`` with mode 0600 (``exclusive``: fail with FileExistsError if it exists)."""
    flags = os.O_WRONLY | os.O_CREAT | (os.O_EXCL if exclusive else os.O_TRUNC)
    fd = os.open(path, flags, PRIVATE_FILE_MODE)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)


def absolute_url(url: str | None = None) -> str:
    """The store URL with a relative SQLite path made absolute, so a process started elsewhere opens the same file."""
    parsed = make_url(database_url(url))
    database = parsed.database
    if parsed.get_backend_name() == "sqlite" and database and database != ":memory:" and not database.startswith("file:"):
        parsed = parsed.set(database=str(Path(database).expanduser().resolve()))
    return parsed.render_as_string(hide_password=False)


def jobs_dir(url: str | None = None) -> Path:
    """Where the status files of the store's jobs live."""
    return data_dir(url) / "jobs"


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _write_status(path: Path, status: dict[str, Any]) -> None:
    files.write_json(path, status, indent=None, private=True, default=str)


def start_job(
    command: str, args: Sequence[str] = (), *, url: str | None = None, name: str | None = None,
    secrets: Mapping[str, str] | None = None, actor: str | None = None,
) -> Path | None:
    """Launch ``python -m app.jobs command *args`` for the store at ``url``; returns its status file.

    ``name`` fixes the status file's name and makes the job exclusive: when a status file of that name
    exists already (the job ran or runs), nothing is launched and None is returned. ``secrets`` are
    environment variables for the job only (e.g. ``{SALT_ENV: salt}``): never in its command line or
    its status file. ``actor``: the logged-in user starting it, who must be an admin (imports, exports
    and the demo project manage the store's data; :class:`db.roles.PermissionDenied` otherwise; the
    start is audited with their name); None: a system actor (the server's own first-run demo, the CLI).
    """
    url = absolute_url(url)
    authorize(url, actor, Role.ADMIN, action=f"start {command} jobs", event="job_start", details={"command": command})
    folder = jobs_dir(url)
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    job_id = name or f"{time.strftime('%Y%m%d-%H%M%S')}-{command}-{uuid.uuid4().hex[:6]}"
    path = folder / f"{job_id}.json"
    status = {"id": job_id, "command": command, "args": list(args), "pid": None, "status": "running", "done": 0,
              "total": 0, "message": "starting", "result": None, "started_at": _now(), "updated_at": _now()}
    try:
        write_private(path, json.dumps(status), exclusive=True)  # exclusive: two browser sessions start one job
    except FileExistsError:
        return None
    process = spawn([sys.executable, "-m", "app.jobs", "--status", str(path), command, *args],
                    env={**os.environ, **(secrets or {}), DB_URL_ENV: url})
    write_private(path.with_suffix(".pid"), str(process.pid))
    return path


def read_job(path: str | Path) -> dict[str, Any] | None:
    """A job's status (None when the file is gone or half-written). A running job whose process died is ``failed``."""
    try:
        status = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    pid = status.get("pid") or _launched_pid(Path(path))
    if status.get("status") == "running" and pid and not process_alive(pid):
        status = {**status, "status": "failed", "message": "the job's process ended without reporting (killed?)"}
    return status


def _launched_pid(path: Path) -> int | None:
    """The pid :func:`start_job` recorded beside the status file (the job writes its own once it runs)."""
    try:
        return int(path.with_suffix(".pid").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a finished child of ours is reaped; a zombie counts as ended)."""
    try:
        finished, _ = os.waitpid(pid, os.WNOHANG)  # reap our own finished children
        if finished:
            return False
    except ChildProcessError:
        pass
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:  # another user's process: it exists
        return True


def list_jobs(url: str | None = None, command: str | None = None, limit: int = 20) -> list[dict[str, Any]]:
    """The newest ``limit`` jobs of the store (of ``command`` when given), newest first."""
    folder = jobs_dir(url)
    if not folder.is_dir():
        return []
    paths = sorted(folder.glob("*.json"), key=lambda p: p.stat().st_mtime, reverse=True)
    jobs = []
    for path in paths:
        status = read_job(path)
        if status is not None and (command is None or status.get("command") == command):
            jobs.append({**status, "path": str(path)})
            if len(jobs) == limit:
                break
    return jobs


class _Reporter:
    """Writes a running job's status file, at most every ``WRITE_EVERY_S`` seconds."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.status = json.loads(path.read_text(encoding="utf-8"))
        self.status["pid"] = os.getpid()
        self.last = 0.0

    def update(self, force: bool = False, **fields: Any) -> None:
        self.status.update(fields, updated_at=_now())
        if force or time.monotonic() - self.last >= WRITE_EVERY_S:
            self.last = time.monotonic()
            _write_status(self.path, self.status)

    def progress(self, message: str) -> Callable[[int, int], None]:
        return lambda done, total: self.update(done=done, total=total, message=message)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m app.jobs", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--status", required=True, metavar="FILE", help="the job's status file (made by start_job)")
    commands = parser.add_subparsers(dest="command", required=True)
    seed = commands.add_parser("seed", help="create the synthetic demo project")
    seed.add_argument("--n", type=int, default=300)
    seed.add_argument("--size", type=int, default=512)
    seed.add_argument("--seed", type=int, default=0)
    imports = commands.add_parser("import", help="import images").add_subparsers(dest="kind", required=True)
    imports.add_parser("folder").add_argument("folder")
    coco = imports.add_parser("coco")
    coco.add_argument("file")
    coco.add_argument("--images")
    nih = imports.add_parser("nih")
    nih.add_argument("data_entry", nargs="+")
    nih.add_argument("--images", nargs="+", required=True)
    nih.add_argument("--bbox")
    vindr = imports.add_parser("vindr")
    vindr.add_argument("csv")
    vindr.add_argument("--images", required=True)
    dicomweb = imports.add_parser("dicomweb")
    dicomweb.add_argument("url")
    dicomweb.add_argument("--study", nargs="+", default=[])
    dicomweb.add_argument("--modality", default=",".join(DEFAULT_MODALITIES))
    dicomweb.add_argument("--since")
    for sub in (imports.choices[k] for k in ("folder", "coco", "nih", "vindr", "dicomweb")):
        sub.add_argument("--split", choices=["train", "val", "test"])
        sub.add_argument("--assign-splits", action="store_true", help="then put images without a split in train/val/test by patient")
    export = commands.add_parser("export", help="write a COCO JSON of the store")
    export.add_argument("out")
    export.add_argument("--granularity", choices=[*GRANULARITIES, "all"], default="all")
    export.add_argument("--split", choices=["train", "val", "test"])
    export.add_argument("--images-root", help="write file names relative to this folder")
    export.add_argument("--include-patient-ids", action="store_true", default=INCLUDE_PATIENT_IDS,
                        help="keep patient ids and real file names (left out by default: neutral names image-<id>.<ext>)")
    export.add_argument("--file-map", metavar="CSV", help="also write neutral name -> real path (identifying) to this CSV")
    return parser


def _import(session, args: argparse.Namespace, progress: Callable[[int, int], None]) -> ImportReport:
    options = {"split": args.split, "patient_salt": os.environ.get(SALT_ENV) or None, "progress": progress}
    if args.kind == "folder":
        return import_folder(session, args.folder, **options)
    if args.kind == "coco":
        return import_coco(session, args.file, images=args.images, **options)
    if args.kind == "dicomweb":
        modalities = [m.strip() for m in args.modality.split(",") if m.strip()]
        return import_dicomweb(session, args.url, cache_dir=data_dir() / "dicomweb", studies=args.study,
                               modalities=modalities, since=args.since, **options)
    if args.kind == "nih":
        return import_nih(session, args.data_entry, images=args.images, bbox_list=args.bbox, **options)
    return import_vindr(session, args.csv, images=args.images, **options)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one job, keeping its status file up to date; exit status 0 when it succeeded."""
    args = _parser().parse_args(argv)
    reporter = _Reporter(Path(args.status))
    url = database_url()
    try:
        if args.command == "seed":
            report = seed_demo(url, n=args.n, size=args.size, seed=args.seed, progress=reporter.progress("drawing and importing synthetic X-rays"))
            result: dict[str, Any] = {"summary": report.summary(), "imported": len(report.imported)}
        elif args.command == "import":
            with make_sessionmaker(init_db(url)).begin() as session:
                report = _import(session, args, reporter.progress(f"importing ({args.kind})"))
                if args.assign_splits and report.imported:
                    assign_splits(session)
                reporter.update(force=True, message="committing")
            result = {"summary": report.summary(), **report.as_dict()}
        else:
            with make_sessionmaker(init_db(url)).begin() as session:
                reporter.update(force=True, message="reading the store")
                data = export_coco(session, split=args.split, granularity=args.granularity, images_root=args.images_root,
                                   include_patient_ids=args.include_patient_ids)
                mapping = file_mapping(session, data) if args.file_map else None
            write_json(data, args.out)
            result = {"summary": f"wrote {len(data['images'])} images, {len(data['annotations'])} boxes to {args.out}",
                      "out": str(args.out)}
            if mapping is not None:
                write_file_map(mapping, args.file_map)
                result["file_map"] = str(args.file_map)
    except Exception as e:  # noqa: BLE001 - any failure must reach the page that polls the status
        reporter.update(force=True, status="failed", message=f"{type(e).__name__}: {e}")
        return 1
    reporter.update(force=True, status="done", message="done", result=result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
