"""The one place that makes engines and sessions, and brings a database's schema up to date.

    >>> from db.engine import init_db, make_sessionmaker
    >>> engine = init_db("sqlite:///workbench.db")      # creates or upgrades the schema (Alembic)
    >>> Session = make_sessionmaker(engine)
    >>> with Session.begin() as session:                 # the caller owns the transaction
    ...     ...

SQLite connections get ``journal_mode=WAL`` (readers never block the writer), ``busy_timeout`` (a writer
waits for another writer instead of failing with "database is locked") and ``foreign_keys=ON``.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
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


def _sqlite_pragmas(dbapi_connection, connection_record) -> None:
    """Set WAL, busy timeout and foreign keys on every new SQLite connection."""
    cursor = dbapi_connection.cursor()
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
    if parsed.get_backend_name() == "sqlite":
        kwargs.setdefault("connect_args", {}).setdefault("timeout", SQLITE_BUSY_TIMEOUT_MS / 1000)
        database = parsed.database
        if database and database != ":memory:" and not database.startswith("file:"):
            Path(database).expanduser().resolve().parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, **kwargs)
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas)
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
    exclusive lock on ``<file>.migrate.lock``, PostgreSQL an advisory lock; others run unguarded."""
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
    with open(f"{Path(database).expanduser().resolve()}.migrate.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Run the Alembic migrations of ``db/migrations`` up to ``revision`` on ``engine``'s database
    (one process at a time per SQLite file)."""
    with _migration_lock(engine):
        command.upgrade(alembic_config(engine), revision)


def init_db(url: str | None = None, **kwargs) -> Engine:
    """Make the engine for ``url`` and create or upgrade its schema to the newest revision.

    Safe on an existing store: only the missing migrations run, the data stays.
    """
    engine = make_engine(url, **kwargs)
    upgrade(engine)
    return engine
