"""A real browser on the Data page: an export job's Download works on every click while the job list
keeps refreshing, and an upload goes through the background import job and gets a split.

Needs Debian's Chromium and the ``playwright`` package (never ``playwright install``); skipped when
either is missing. Screenshots go to ``artifacts/browser/``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from PIL import Image as PILImage
from sqlalchemy import select

from db.demo import seed_demo
from db.engine import init_db, make_sessionmaker
from db.models import Image
from tests.logins import PASSWORD, ensure_user
from tests.streamlit_server import ARTIFACTS, CHROMIUM, CHROMIUM_ARGS, ROOT, streamlit_server

PORT = 8623  # this test's port (8620-8629 are the Data page tests')
N_IMAGES = 6

pytestmark = [pytest.mark.browser, pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium")]
sync_api = pytest.importorskip("playwright.sync_api", reason="needs the playwright package")


@pytest.fixture
def server(tmp_path):
    url = f"sqlite:///{tmp_path / 'workbench.db'}"
    seed_demo(url, n=N_IMAGES, size=64)
    log_path = tmp_path / "streamlit.log"
    env = {**os.environ, "OXNET_DB_URL": url, "OXNET_DEMO": "0"}
    with streamlit_server("app/main.py", port=PORT, cwd=ROOT, env=env, log=log_path):
        yield f"http://127.0.0.1:{PORT}", url, log_path


def test_export_download_works_on_every_click_and_an_upload_is_imported_by_a_job(server, tmp_path):
    address, url, log_path = server
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1366, "height": 768}, accept_downloads=True)
            page.set_default_timeout(60_000)
            ensure_user("dr.data", "admin", url)  # imports and exports are an admin's
            page.goto(address)
            page.get_by_role("textbox", name="Name").fill("dr.data")
            page.get_by_role("textbox", name="Password").fill(PASSWORD)
            page.get_by_role("button", name="Log in").click()
            page.get_by_role("link", name="Data").click()
            page.get_by_role("tab", name="Export").click()
            page.get_by_role("button", name="Export", exact=True).click()
            download = page.locator('[data-testid="stDownloadButton"] button').first
            download.wait_for()
            for click in range(4):
                page.wait_for_timeout(2500)  # the running-jobs part refreshes every second meanwhile
                with page.expect_download() as info:
                    download.click()
                data = json.loads(Path(info.value.path()).read_text())
                assert len(data["images"]) == N_IMAGES, click
                assert all("patient_id" not in image for image in data["images"])
            page.screenshot(path=str(ARTIFACTS / "data-export-download-1366.png"), full_page=True)

            scan = tmp_path / "upload-scan.png"
            PILImage.new("L", (32, 32), 120).save(scan)
            page.get_by_role("tab", name="Upload images").click()
            page.locator('[data-testid="stFileUploaderDropzoneInput"]').set_input_files(str(scan))
            page.get_by_role("button", name="Import uploaded files").click()
            page.get_by_text("done. imported 1").first.wait_for()
            page.screenshot(path=str(ARTIFACTS / "data-upload-job-1366.png"), full_page=True)
            page.set_viewport_size({"width": 1920, "height": 1080})
            page.get_by_role("link", name="Overview").click()
            page.get_by_role("button", name="Stop after this round").wait_for()
            page.get_by_text("No model version yet").wait_for()
            page.screenshot(path=str(ARTIFACTS / "overview-trainer-1920.png"), full_page=True)
        finally:
            browser.close()
    assert "not found" not in log_path.read_text()
    with make_sessionmaker(init_db(url))() as session:
        rows = session.execute(select(Image.path, Image.split).where(Image.source == "folder")).all()
    assert [Path(path).name for path, _ in rows] == ["upload-scan.png"] and rows[0][1] is not None
