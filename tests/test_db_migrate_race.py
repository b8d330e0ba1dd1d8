"""Several processes opening a fresh store at once (UI, job, trainer) all get the migrated schema."""

import multiprocessing

import pytest
from sqlalchemy import inspect

from db.engine import init_db

pytestmark = pytest.mark.slow  # processes, whole training runs: deselect with -m 'not slow'


def _open(url: str) -> None:
    init_db(url).dispose()


def test_concurrent_init_db_on_a_fresh_store(db_fresh_url):
    url = db_fresh_url
    context = multiprocessing.get_context("spawn")
    processes = [context.Process(target=_open, args=(url,)) for _ in range(4)]
    for p in processes:
        p.start()
    for p in processes:
        p.join(120)
    assert [p.exitcode for p in processes] == [0, 0, 0, 0]
    engine = init_db(url)
    assert {"image", "alembic_version"} <= set(inspect(engine).get_table_names())
    engine.dispose()
