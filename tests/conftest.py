"""Shared fixtures. Store fixtures are prefixed ``db_``.

The store fixtures run every test that uses them on SQLite and on PostgreSQL: set
``OXNET_TEST_POSTGRES`` to the SQLAlchemy URL of a PostgreSQL database the tests may create databases
from (``.ci/run`` starts Debian's server and sets it to
``postgresql+psycopg:///postgres?host=/var/run/postgresql``). Without it the PostgreSQL cases skip.
"""

import os
import uuid

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from db.engine import init_db, make_sessionmaker



@pytest.fixture(autouse=True)
def _loopback_server_address():
    """AppTest serves nothing and reads no app/.streamlit/config.toml, but app/main.py refuses to render
    unless ``server.address`` is loopback: give AppTest runs the address the config file gives servers."""
    from streamlit import config

    before = config.get_option("server.address")
    config.set_option("server.address", "127.0.0.1")
    yield
    config.set_option("server.address", before)


POSTGRES_ENV = "OXNET_TEST_POSTGRES"


def postgres_database(request) -> str:
    """A new, empty PostgreSQL database for one test (dropped afterwards); returns its URL."""
    admin_url = os.environ.get(POSTGRES_ENV)
    if not admin_url:
        pytest.skip(f"PostgreSQL: set {POSTGRES_ENV} (see tests/conftest.py)")
    name = f"oxnet_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))

    def drop() -> None:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()

    request.addfinalizer(drop)
    return make_url(admin_url).set(database=name).render_as_string(hide_password=False)


@pytest.fixture
def empty(tmp_path, monkeypatch):
    """The URL of a new workbench store (a SQLite file without a project) as the pages open it:
    ``OXNET_DB_URL`` names it and no demo project is seeded."""
    url = f"sqlite:///{tmp_path / 'workbench.db'}"
    monkeypatch.setenv("OXNET_DB_URL", url)
    monkeypatch.setenv("OXNET_DEMO", "0")
    return url


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path):
    """URL of a fresh, migrated store: a SQLite file in a temporary folder, or a new PostgreSQL database."""
    url = f"sqlite:///{tmp_path / 'store.db'}" if request.param == "sqlite" else postgres_database(request)
    init_db(url).dispose()
    return url


@pytest.fixture(params=["sqlite", "postgresql"])
def db_fresh_url(request, tmp_path):
    """Like :func:`db_url`, but nothing created yet (no schema, for SQLite no file)."""
    return f"sqlite:///{tmp_path / 'fresh.db'}" if request.param == "sqlite" else postgres_database(request)


@pytest.fixture
def db_sessionmaker(db_url):
    """A sessionmaker on :func:`db_url`'s store."""
    engine = init_db(db_url)
    yield make_sessionmaker(engine)
    engine.dispose()


@pytest.fixture(autouse=True)
def _restore_main_module():
    """streamlit's AppTest leaves ``sys.modules["__main__"]`` pointing at app/main.py; processes started
    later with the "spawn" method would then run the app on import. Put the real main module back."""
    import sys

    main = sys.modules["__main__"]
    yield
    sys.modules["__main__"] = main
