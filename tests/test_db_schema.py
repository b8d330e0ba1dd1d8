"""The migrations build exactly the models' schema (on SQLite and PostgreSQL), the audit log is
append-only on both, and the engine sets the SQLite pragmas."""

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import text

from db.engine import alembic_config, database_url, init_db, make_sessionmaker
from db.models import AuditEntry, Base
from db.people import get_annotator


def test_migrations_match_models(db_url):
    engine = init_db(db_url)
    with engine.connect() as connection:
        diff = compare_metadata(MigrationContext.configure(connection), Base.metadata)
    engine.dispose()
    assert diff == []


def test_init_db_is_idempotent_and_keeps_data(db_url):
    with make_sessionmaker(init_db(db_url)).begin() as session:
        get_annotator(session, "dr.a")
    engine = init_db(db_url)
    head = ScriptDirectory.from_config(alembic_config(engine)).get_current_head()
    with make_sessionmaker(engine).begin() as session:
        assert get_annotator(session, "dr.a").id == 1
        assert session.execute(text("SELECT version_num FROM alembic_version")).scalar() == head
    engine.dispose()


def test_sqlite_pragmas_on_every_connection(tmp_path):
    engine = init_db(f"sqlite:///{tmp_path / 'store.db'}")
    for _ in range(2):
        with engine.connect() as connection:
            assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert connection.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
            assert connection.exec_driver_sql("PRAGMA busy_timeout").scalar() >= 1000
        engine.dispose()


def test_audit_log_is_append_only(db_sessionmaker):
    Session = db_sessionmaker
    with Session.begin() as session:
        session.add(AuditEntry(annotator=get_annotator(session, "a"), action="x", after={}))
    statements = ["UPDATE audit_log SET action = 'y'", "DELETE FROM audit_log"]
    if Session.kw["bind"].dialect.name == "postgresql":
        statements.append("TRUNCATE audit_log")
    for statement in statements:
        with pytest.raises(sa.exc.IntegrityError, match="append-only"), Session.begin() as session:
            session.execute(text(statement))
    with Session() as session:
        assert [e.action for e in session.scalars(sa.select(AuditEntry))] == ["x"]


def test_database_url_setting(monkeypatch):
    monkeypatch.delenv("OXNET_DB_URL", raising=False)
    assert database_url() == "sqlite:///workbench.db"
    monkeypatch.setenv("OXNET_DB_URL", "sqlite:///elsewhere.db")
    assert database_url() == "sqlite:///elsewhere.db"
    assert database_url("sqlite://") == "sqlite://"
