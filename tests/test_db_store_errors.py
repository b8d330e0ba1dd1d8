"""A read-only, locked or full store: reading works without write access, and failures are one sentence.

Read-only is real: the tests run as root, which ignores file modes, so the commands run in a child
process as the unprivileged user ``nobody`` (uid 65534) on a folder and file without write permission.
Where the tests are not run as root, the chmod alone is enough.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import sqlite3
import stat
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image as PILImage
from sqlalchemy import text
from sqlalchemy.exc import OperationalError

from db.engine import StoreNotWritable, init_db, is_read_only, make_sessionmaker, store_error_message
from db.importers import import_folder

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def read_only_store():
    """A store with 3 images in a folder that nobody but root may write: (url, folder)."""
    folder = Path(tempfile.mkdtemp(prefix="oxnet-ro-", dir="/tmp"))
    try:
        (folder / "img").mkdir()
        for i in range(3):
            PILImage.fromarray(np.full((20, 24), i * 40, np.uint8)).save(folder / "img" / f"{i}.png")
        url = f"sqlite:///{folder / 'store.db'}"
        engine = init_db(url)
        with make_sessionmaker(engine).begin() as session:
            assert len(import_folder(session, folder / "img").imported) == 3
        engine.dispose()
        for leftover in folder.glob("store.db.*"):
            leftover.unlink()  # no lock file: the reader must not need one
        (folder / "store.db").chmod(0o444)
        folder.chmod(0o555)
        yield url, folder
    finally:
        folder.chmod(0o755)
        shutil.rmtree(folder, ignore_errors=True)


_NOBODY = {"user": 65534, "group": 65534, "extra_groups": []} if os.geteuid() == 0 else {}
_ENV = {"PATH": os.environ.get("PATH", ""), "HOME": "/tmp",
        "PYTHONPATH": os.pathsep.join([str(ROOT), sysconfig.get_paths()["purelib"]])}


@functools.cache
def _reader_python() -> str:
    """An interpreter of this Python version that the unprivileged user may run (the venv's may live
    under /root) and that imports the store's dependencies from this environment's site-packages."""
    for candidate in (sys.executable, f"/usr/bin/python{sys.version_info.major}.{sys.version_info.minor}", "/usr/bin/python3"):
        try:
            probe = subprocess.run([candidate, "-c", "import sys, sqlalchemy, alembic, pydicom, PIL, tqdm; print(sys.version_info[:2])"],
                                   env=_ENV, capture_output=True, text=True, timeout=60, **_NOBODY)
        except OSError:
            continue
        if probe.returncode == 0 and probe.stdout.strip() == str(tuple(sys.version_info[:2])):
            return candidate
    pytest.skip("no Python interpreter that the unprivileged user can run")


def _as_reader(*args: str) -> subprocess.CompletedProcess:
    """``python -m db ARGS`` as a user without write access to the store (nobody, when run as root)."""
    return subprocess.run([_reader_python(), "-m", "db", *args], cwd=ROOT, env=_ENV, capture_output=True, text=True,
                          timeout=120, **_NOBODY)


def test_stats_reads_a_read_only_store_and_a_write_says_so_in_one_sentence(read_only_store):
    """init_db used to open a lock file for appending, so even `db stats` failed on a read-only store."""
    url, folder = read_only_store
    stats = _as_reader("--db", url, "stats")
    assert stats.returncode == 0, stats.stderr
    assert json.loads(stats.stdout)["total"] == 3
    split = _as_reader("--db", url, "split")
    assert split.returncode == 3
    assert split.stderr.strip() == (f"error: The store {folder / 'store.db'} is read-only, so this change cannot be "
                                    "saved; reading works. Ask for write access to the file and its folder.")
    assert "Traceback" not in split.stderr and "sqlalchemy" not in split.stderr.lower()
    assert sorted(p.name for p in folder.iterdir()) == ["img", "store.db"]  # nothing written, no lock file
    assert stat.S_IMODE((folder / "store.db").stat().st_mode) == 0o444


def test_an_old_read_only_store_is_refused_with_what_to_do(read_only_store):
    url, folder = read_only_store
    folder.chmod(0o755)
    (folder / "store.db").chmod(0o644)
    with sqlite3.connect(folder / "store.db") as connection:
        connection.execute("update alembic_version set version_num = '0000_older'")
    (folder / "store.db").chmod(0o444)
    folder.chmod(0o555)
    result = _as_reader("--db", url, "stats")
    assert result.returncode == 3
    assert "is read-only and its schema is at revision 0000_older" in result.stderr
    assert "open it once with write access to create or upgrade it" in result.stderr


def test_a_mode_ro_url_opens_read_only_without_a_lock_file(tmp_path):
    url = f"sqlite:///{tmp_path / 'store.db'}"
    init_db(url).dispose()
    for leftover in tmp_path.glob("store.db.*"):
        leftover.unlink()
    engine = init_db(f"sqlite:///file:{tmp_path / 'store.db'}?mode=ro&uri=true")
    assert is_read_only(engine)
    with pytest.raises(OperationalError) as caught, engine.begin() as connection:
        connection.execute(text("insert into project (name) values ('x')"))
    assert "is read-only, so this change cannot be saved" in store_error_message(caught.value, str(engine.url))
    assert not list(tmp_path.glob("*.lock"))  # SQLite may add -shm/-wal beside it; the workbench writes nothing
    with pytest.raises(StoreNotWritable, match="schema is empty"):
        sqlite3.connect(tmp_path / "empty.db").close()
        init_db(f"sqlite:///file:{tmp_path / 'empty.db'}?mode=ro&uri=true")


def test_a_locked_store_is_one_sentence(tmp_path):
    url = f"sqlite:///{tmp_path / 'store.db'}"
    engine = init_db(url)
    holder = sqlite3.connect(tmp_path / "store.db")
    holder.execute("begin immediate")  # another process is writing
    try:
        with pytest.raises(OperationalError) as caught, engine.begin() as connection:
            connection.execute(text("pragma busy_timeout=50"))
            connection.execute(text("insert into project (name) values ('x')"))
    finally:
        holder.rollback()
        holder.close()
    assert store_error_message(caught.value, url) == (
        f"The store {tmp_path / 'store.db'} is locked by another process (an import, a job or the trainer is "
        "writing); wait a moment and try again.")


def test_a_full_store_is_one_sentence(tmp_path):
    """SQLITE_FULL for real: the file may not grow past its current pages (as on a full disk)."""
    url = f"sqlite:///{tmp_path / 'store.db'}"
    engine = init_db(url)
    with pytest.raises(OperationalError) as caught, engine.begin() as connection:
        connection.execute(text("create table filler (x text)"))
        pages = connection.execute(text("pragma page_count")).scalar()
        connection.execute(text(f"pragma max_page_count={pages + 1}"))
        connection.execute(text("insert into filler (x) values (:x)"), [{"x": "x" * 2000} for _ in range(500)])
    assert "database or disk is full" in str(caught.value)
    assert store_error_message(caught.value, url) == (
        f"No space left on {tmp_path} for the store {tmp_path / 'store.db'}; the change was not saved. "
        "Free some disk space and try again.")
    assert store_error_message(ValueError("a bug"), url) is None


def test_the_trainer_on_a_read_only_store_says_so_in_one_sentence(tmp_path, capsys):
    from app.trainer import main as trainer_main

    from db.projects import ensure_project

    url = f"sqlite:///{tmp_path / 'store.db'}"
    assert trainer_main(["--db", url, "--preset", "tiny", "--max-rounds", "1"]) == 2  # an empty store
    assert capsys.readouterr().err == "oxnet-trainer: error: no project 'default' in the store (projects: none; import images first)\n"
    engine = init_db(url)
    with make_sessionmaker(engine).begin() as session:
        ensure_project(session)
    engine.dispose()
    for leftover in tmp_path.glob("store.db.*"):
        leftover.unlink()
    read_only = f"sqlite:///file:{tmp_path / 'store.db'}?mode=ro&uri=true"
    assert trainer_main(["--db", read_only, "--preset", "tiny", "--max-rounds", "1"]) == 4
    err = capsys.readouterr().err
    assert err.startswith("oxnet-trainer: error: ") and "read-only" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
