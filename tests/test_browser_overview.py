"""Overview in a real browser: a model version that becomes ready while the page is open shows up by
itself (the page used to keep showing an old version until the user clicked something)."""

from __future__ import annotations

import re

import pytest

from db.engine import init_db, make_sessionmaker
from db.models import ModelStatus, Split
from db.versions import create_model_version, finish_model_version, record_metrics
from tests.test_browser_annotate import (  # noqa: F401 (server, browser and page are fixtures)
    ARTIFACTS,
    CHROMIUM,
    _settled,
    _sign_in,
    browser,
    page,
    server,
)

pytestmark = [pytest.mark.browser, pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium")]


def test_a_new_ready_version_appears_on_an_open_overview(server, page):
    address, url, _queued = server
    _sign_in(page, address, "dr.overview")
    page.get_by_role("link", name="Overview").click()
    _settled(page)
    page.get_by_text(re.compile(r"^Version 1 \(round")).wait_for()
    with make_sessionmaker(init_db(url)).begin() as session:  # the trainer finishes a round meanwhile
        version = create_model_version(session, config={"backbone_start": "random init"}, round=2)
        record_metrics(session, version.id, Split.VAL, {"mAP": 0.25})
        finish_model_version(session, version.id, status=ModelStatus.READY)
        new = version.id
    page.get_by_text(re.compile(rf"^Version {new} \(round 2")).wait_for(timeout=20_000)  # no click, no reload
    page.get_by_text("Backbone start: random init.").wait_for()
    page.screenshot(path=str(ARTIFACTS / "overview-fresh.png"), full_page=True)
