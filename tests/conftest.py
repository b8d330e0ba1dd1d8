"""Shared fixtures. Store fixtures are prefixed ``db_``."""

import pytest



@pytest.fixture(autouse=True)
def _loopback_server_address():
    """AppTest serves nothing and reads no app/.streamlit/config.toml, but app/main.py refuses to render
    unless ``server.address`` is loopback: give AppTest runs the address the config file gives servers."""
    from streamlit import config

    before = config.get_option("server.address")
    config.set_option("server.address", "127.0.0.1")
    yield
    config.set_option("server.address", before)

from db.engine import init_db, make_sessionmaker


@pytest.fixture
def db_url(tmp_path):
    """URL of a fresh, migrated SQLite store in a temporary folder."""
    url = f"sqlite:///{tmp_path / 'store.db'}"
    init_db(url).dispose()
    return url


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
