"""The migrations build exactly the models' schema, and the engine sets the SQLite pragmas."""

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import text

from db.engine import database_url, init_db, make_sessionmaker
from db.models import AuditEntry, Base
from db.repository import get_annotator


def _head() -> str:
    """The newest migration (the lead re-chains the engineers' migrations at merge)."""
    from pathlib import Path

    from alembic.config import Config
    from alembic.script import ScriptDirectory

    config = Config()
    config.set_main_option("script_location", str(Path(__file__).parents[1] / "db" / "migrations"))
    return ScriptDirectory.from_config(config).get_current_head()


def test_migrations_match_models(tmp_path):
    engine = init_db(f"sqlite:///{tmp_path / 'store.db'}")
    with engine.connect() as connection:
        diff = compare_metadata(MigrationContext.configure(connection), Base.metadata)
    assert diff == []


def test_init_db_is_idempotent_and_keeps_data(tmp_path):
    url = f"sqlite:///{tmp_path / 'store.db'}"
    with make_sessionmaker(init_db(url)).begin() as session:
        get_annotator(session, "dr.a")
    with make_sessionmaker(init_db(url)).begin() as session:
        assert get_annotator(session, "dr.a").id == 1
        assert session.execute(text("SELECT version_num FROM alembic_version")).scalar() == _head()


def test_sqlite_pragmas_on_every_connection(tmp_path):
    engine = init_db(f"sqlite:///{tmp_path / 'store.db'}")
    for _ in range(2):
        with engine.connect() as connection:
            assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert connection.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
            assert connection.exec_driver_sql("PRAGMA busy_timeout").scalar() >= 1000
        engine.dispose()


def test_audit_log_is_append_only(tmp_path):
    Session = make_sessionmaker(init_db(f"sqlite:///{tmp_path / 'store.db'}"))
    with Session.begin() as session:
        session.add(AuditEntry(annotator=get_annotator(session, "a"), action="x", after={}))
    for statement in ("UPDATE audit_log SET action = 'y'", "DELETE FROM audit_log"):
        with pytest.raises(sa.exc.IntegrityError, match="append-only"), Session.begin() as session:
            session.execute(text(statement))


def test_database_url_setting(monkeypatch):
    monkeypatch.delenv("OXNET_DB_URL", raising=False)
    assert database_url() == "sqlite:///workbench.db"
    monkeypatch.setenv("OXNET_DB_URL", "sqlite:///elsewhere.db")
    assert database_url() == "sqlite:///elsewhere.db"
    assert database_url("sqlite://") == "sqlite://"
