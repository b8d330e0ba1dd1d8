"""The store under load (scripts/bench.py load, short): annotator processes saving while the trainer
writes model versions, on SQLite and PostgreSQL: no lost write, no error a user would see, and the
audit log replays to every image's state."""

import pytest

from app.benchmarks.load import run

pytestmark = pytest.mark.slow


def test_annotators_and_trainer_at_once_lose_nothing(db_fresh_url):
    result = run(db_fresh_url, annotators=4, seconds=4, images=30)
    assert result["saves"] > 0 and result["trainer_versions"] > 0
    assert result["lost_writes"] == 0 and result["user_errors"] == 0, result["error_samples"]
    assert result["audit_replays_to_state"] and result["audit_rows"] == result["saves"]
