"""The one place that makes engines and sessions, and brings a database's schema up to date.

    >>> from db.engine import init_db, make_sessionmaker
    >>> engine = init_db("sqlite:///workbench.db")      # creates or upgrades the schema (Alembic)
    >>> Session = make_sessionmaker(engine)
    >>> with Session.begin() as session:                 # the caller owns the transaction
    ...     ...

SQLite connections get ``journal_mode=WAL`` (readers never block the writer), ``busy_timeout`` (a writer
waits for another writer instead of failing with "database is locked") and ``foreign_keys=ON``.

A read-only store works for reading: a SQLite file that this process may not write (the file or its
folder lacks write permission, or the URL says ``mode=ro``) is opened read-only
(``file:...?mode=ro``, plus ``immutable=1`` when no ``-shm`` file exists, because SQLite cannot open a
WAL database read-only without one), no WAL pragma is set, and :func:`init_db` only checks that its
schema is current instead of migrating. :func:`init_db` also skips the migration lock file whenever
the schema is already current, so reading never needs write access. :func:`store_error_message`
turns a locked, read-only, full or unopenable store into one sentence for the CLI and the UI.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import filelock
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, create_engine, event, insert, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker

#: Environment variable holding the store's SQLAlchemy URL.
DB_URL_ENV = "OXNET_DB_URL"
#: The store used when ``OXNET_DB_URL`` is not set: ``workbench.db`` in the working directory.
DEFAULT_DB_URL = "sqlite:///workbench.db"
#: Milliseconds a SQLite writer waits for another writer's lock before giving up.
SQLITE_BUSY_TIMEOUT_MS = 30_000

_MIGRATIONS = Path(__file__).resolve().parent / "migrations"
#: Key of the PostgreSQL advisory lock held while migrating (any constant shared by every process).
_PG_MIGRATION_LOCK = 0x0C5E7


def database_url(url: str | None = None) -> str:
    """``url`` if given, else ``$OXNET_DB_URL``, else ``sqlite:///workbench.db``."""
    return url or os.environ.get(DB_URL_ENV) or DEFAULT_DB_URL


def display_url(url: str | None = None) -> str:
    """The store URL as it may be shown (sidebar, CLI, logs, error messages): the password masked as ``***``.

    A URL SQLAlchemy cannot parse is shown as ``<unparsable store URL>`` (it could hold a password anywhere).
    """
    try:
        return make_url(database_url(url)).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - whatever the parser says, the raw text must not be shown
        return "<unparsable store URL>"


class StoreNotWritable(RuntimeError):
    """The store cannot be brought up to date because this process may not write it."""


def _sqlite_file(url: str) -> Path | None:
    """The file of a SQLite URL (plain path or ``file:`` URI), or None (memory, other databases)."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or not parsed.database or parsed.database == ":memory:":
        return None
    database = parsed.database
    if database.startswith("file:"):
        database = database.removeprefix("file:").split("?", 1)[0]
        if database in ("", ":memory:") or parsed.query.get("mode") == "memory":
            return None
    return Path(database).expanduser().resolve()


def _not_writable(path: Path) -> bool:
    """An existing SQLite file that this process may not write (file or folder read-only)."""
    return path.is_file() and not (os.access(path, os.W_OK) and os.access(path.parent, os.W_OK))


def is_read_only(engine: Engine) -> bool:
    """Whether :func:`make_engine` opened this SQLite store read-only."""
    return engine.dialect.name == "sqlite" and engine.url.query.get("mode") == "ro"


def _sqlite_pragmas(dbapi_connection, connection_record, read_only: bool = False) -> None:
    """Set WAL, busy timeout and foreign keys on every new SQLite connection (no WAL switch read-only)."""
    cursor = dbapi_connection.cursor()
    if not read_only:
        cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def make_engine(url: str | None = None, **kwargs) -> Engine:
    """Create an engine for ``url`` (see :func:`database_url`); SQLite gets the pragmas on every connection.

    Extra keyword arguments go to :func:`sqlalchemy.create_engine`.
    """
    url = database_url(url)
    parsed = make_url(url)
    read_only = False
    if parsed.get_backend_name() == "sqlite":
        kwargs.setdefault("connect_args", {}).setdefault("timeout", SQLITE_BUSY_TIMEOUT_MS / 1000)
        database = parsed.database
        path = _sqlite_file(url)
        if database and database.startswith("file:"):
            read_only = parsed.query.get("mode") == "ro"
        elif path is not None and _not_writable(path):
            read_only = True
            immutable = "" if Path(f"{path}-shm").exists() else "&immutable=1"
            url = f"sqlite:///file:{path}?mode=ro{immutable}&uri=true"
        elif path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, **kwargs)
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", lambda c, r: _sqlite_pragmas(c, r, read_only=read_only))
    return engine


def make_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    """A ``sessionmaker`` bound to ``engine``; objects stay usable after commit (``expire_on_commit=False``)."""
    return sessionmaker(engine, expire_on_commit=False)


def alembic_config(engine: Engine) -> Config:
    """An Alembic configuration for ``engine`` that needs no ``alembic.ini`` (the scripts ship in the package)."""
    config = Config()
    config.set_main_option("script_location", str(_MIGRATIONS))
    config.set_main_option("sqlalchemy.url", engine.url.render_as_string(hide_password=False).replace("%", "%%"))
    config.attributes["engine"] = engine
    return config


@contextlib.contextmanager
def _migration_lock(engine: Engine) -> Iterator[None]:
    """One migration at a time per store: the UI, a job and the trainer may all open a fresh store at
    once, and two concurrent Alembic runs would both try to create the schema. A SQLite file takes an
    exclusive lock on ``<file>.migrate.lock`` (``filelock``), PostgreSQL an advisory lock; others run unguarded."""
    if engine.dialect.name == "postgresql":  # CREATE TABLE races too: a session-level advisory lock
        with engine.connect() as connection:
            connection.exec_driver_sql(f"SELECT pg_advisory_lock({_PG_MIGRATION_LOCK})")
            try:
                yield
            finally:
                connection.exec_driver_sql(f"SELECT pg_advisory_unlock({_PG_MIGRATION_LOCK})")
        return
    database = engine.url.database if engine.dialect.name == "sqlite" else None
    if not database or database == ":memory:" or database.startswith("file:"):
        yield
        return
    with filelock.FileLock(f"{Path(database).expanduser().resolve()}.migrate.lock"):
        yield


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Run the Alembic migrations of ``db/migrations`` up to ``revision`` on ``engine``'s database
    (one process at a time per SQLite file)."""
    with _migration_lock(engine):
        command.upgrade(alembic_config(engine), revision)


def schema_revisions(engine: Engine) -> tuple[str | None, set[str]]:
    """(the database's Alembic revision, or None for an empty store; the head revisions of db/migrations)."""
    heads = set(ScriptDirectory.from_config(alembic_config(engine)).get_heads())
    with engine.connect() as connection:
        current = MigrationContext.configure(connection).get_current_revision()
    return current, heads


def init_db(url: str | None = None, **kwargs) -> Engine:
    """Make the engine for ``url`` and create or upgrade its schema to the newest revision.

    Safe on an existing store: only the missing migrations run, the data stays. A store whose schema
    is current is only read (no lock file, no write), so a read-only store opens for reading.

    Raises:
        StoreNotWritable: the store is read-only and its schema is missing or older than this code's.
    """
    engine = make_engine(url, **kwargs)
    current, heads = schema_revisions(engine)
    if current in heads:
        return engine
    if is_read_only(engine):
        where = _sqlite_file(str(engine.url)) or engine.url
        raise StoreNotWritable(
            f"the store {where} is read-only and its schema is {'empty' if current is None else f'at revision {current}'}, "
            f"not at {', '.join(sorted(heads))}: open it once with write access to create or upgrade it")
    upgrade(engine)
    return engine


def store_error_message(error: BaseException, url: str | None = None) -> str | None:
    """One sentence (what failed, which file, what to do) for a store that is locked, read-only, full
    or cannot be opened; None for other errors (a bug: let it show)."""
    url = database_url(url)
    where = _sqlite_file(url) or make_url(url).render_as_string(hide_password=True)
    if isinstance(error, StoreNotWritable):
        return str(error)
    text = str(getattr(error, "orig", None) or error).lower()
    if isinstance(error, DBAPIError) or isinstance(getattr(error, "orig", None), Exception):
        if "database is locked" in text or "database table is locked" in text:
            return (f"The store {where} is locked by another process (an import, a job or the trainer is "
                    "writing); wait a moment and try again.")
        if "readonly database" in text or "read-only" in text:
            return (f"The store {where} is read-only, so this change cannot be saved; reading works. "
                    "Ask for write access to the file and its folder.")
        if "disk is full" in text or "no space left" in text:
            return (f"No space left on {Path(str(where)).parent} for the store {where}; the change was not "
                    "saved. Free some disk space and try again.")
        if "unable to open database file" in text:
            return (f"Cannot open the store {where}: check that its folder exists and is readable, and that "
                    "the URL is right.")
    if isinstance(error, OSError) and error.errno is not None:
        name = error.filename or where
        if error.errno == 28:
            return f"No space left on {Path(str(name)).parent} while writing {name}; free some disk space and try again."
        if error.errno in (1, 13, 30):
            return f"No permission to write {name} (read-only?); reading works, changes need write access."
    return None


_UPSERT_INSERT: dict[str, Callable[[Any], sqlite.Insert | postgresql.Insert]] = {
    "sqlite": sqlite.insert, "postgresql": postgresql.insert,
}


def insert_ignore(session: Session, table, values: Mapping[str, Any], key: Sequence[str]) -> None:
    """INSERT ``values`` unless a row with the same ``key`` exists (race-free on SQLite and PostgreSQL)."""
    upsert = _UPSERT_INSERT.get(session.get_bind().dialect.name)
    if upsert is not None:
        session.execute(upsert(table).values(**values).on_conflict_do_nothing(index_elements=list(key)))
    elif session.execute(select(table).filter_by(**{k: values[k] for k in key})).first() is None:
        session.execute(insert(table).values(**values))
