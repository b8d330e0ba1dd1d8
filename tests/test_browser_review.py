"""A real browser on the Review page, as reviewers use it: two reviewers (one in a narrow window) open
the same disputed image; the first accepts a read, the second's Merge on their unchanged page is
refused with the conflict's sentence and acts on no other image; an annotator sees the reads without
the review buttons; the first reviewer then edits the next image in Annotate and saves it.

Needs Debian's Chromium and the ``playwright`` package (never ``playwright install``); skipped when
either is missing. Screenshots go to ``artifacts/browser/``.
"""

from __future__ import annotations

import os

import pytest
from sqlalchemy import select

from db.demo import seed_demo
from db.engine import init_db, make_sessionmaker
from db.models import AuditEntry, ImageReview
from db.readers import save_read, set_readers_per_image
from db.service import image_detail
from tests.logins import PASSWORD, ensure_user
from tests.streamlit_server import ARTIFACTS, CHROMIUM, CHROMIUM_ARGS, ROOT, free_port, streamlit_server
from tests.test_app import _unlabeled_ids
from tests.test_browser_annotate import _canvas_ready

PORTS = range(8650, 8660)  # this file's ports
NODULE = ("Nodule", 20.0, 20.0, 60.0, 60.0)
NODULE_B = ("Nodule", 22.0, 20.0, 62.0, 62.0)
MASS = ("Mass", 70.0, 70.0, 110.0, 110.0)

pytestmark = [pytest.mark.browser, pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium")]
sync_api = pytest.importorskip("playwright.sync_api", reason="needs the playwright package")


def _sessions(url):
    return make_sessionmaker(init_db(url))


@pytest.fixture
def store(tmp_path):
    """A demo store of 10 images (128 px) with two readers per image: one image the readers agree on,
    one they read differently (Nodule against Mass); two reviewers and an annotator."""
    url = f"sqlite:///{tmp_path / 'workbench.db'}"
    seed_demo(url, n=10, size=128)
    agreed, disputed = _unlabeled_ids(url)[:2]
    with _sessions(url).begin() as s:
        set_readers_per_image(s, 2, annotator="admin")
    for image, who, boxes in [(agreed, "dr.a", NODULE), (agreed, "dr.b", NODULE_B), (disputed, "dr.a", NODULE),
                              (disputed, "dr.b", MASS)]:
        with _sessions(url).begin() as s:
            save_read(s, image, annotator=who, present=[boxes[0]], boxes=[boxes], no_finding=False, complete=True,
                      expected_revision=0)
    for name, role in [("dr.rev", "reviewer"), ("dr.rev2", "reviewer"), ("dr.ann", "annotator")]:
        ensure_user(name, role, url)
    return url, agreed, disputed


def _open_review(browser, address: str, name: str, viewport: tuple[int, int]):
    page = browser.new_context(viewport={"width": viewport[0], "height": viewport[1]}).new_page()
    page.set_default_timeout(60_000)
    page.goto(address)
    page.get_by_role("textbox", name="Name").fill(name)
    page.get_by_role("textbox", name="Password").fill(PASSWORD)
    page.get_by_role("button", name="Log in").click()
    link = page.get_by_role("link", name="Review")
    link.wait_for(state="attached")
    expand = page.locator('[data-testid="stExpandSidebarButton"]')
    if expand.is_visible():  # a narrow window folds the sidebar away: open it as a person would
        expand.click()
    link.click()
    page.get_by_text("Waiting for review").wait_for()
    page.get_by_text("consensus, not reviewed").first.wait_for()
    return page


def test_two_reviewers_an_annotator_and_an_edit_on_the_review_page(store, tmp_path):
    url, agreed, disputed = store
    port = free_port(PORTS)
    log = tmp_path / "streamlit.log"
    env = {**os.environ, "OXNET_DB_URL": url, "OXNET_DEMO": "0"}
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    address = f"http://127.0.0.1:{port}/"
    with streamlit_server("app/main.py", port=port, cwd=ROOT, env=env, log=log), sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            first = _open_review(browser, address, "dr.rev", (1400, 900))
            second = _open_review(browser, address, "dr.rev2", (700, 900))  # a narrow window
            for page in (first, second):
                page.get_by_text(f"Image #{disputed} ·").wait_for()  # disagreements first
                assert page.get_by_role("button", name="Accept this read").count() == 2
            first.screenshot(path=str(ARTIFACTS / "review-disputed-1400.png"))
            second.screenshot(path=str(ARTIFACTS / "review-disputed-700.png"))

            # the reads' columns are in the order they were saved: dr.a's Nodule, then dr.b's Mass
            first.get_by_role("button", name="Accept this read").nth(1).click()
            sync_api.expect(first.get_by_text(f"Image {disputed}: saved as its training label.")).to_be_in_viewport()
            first.get_by_text(f"Image #{agreed} ·").wait_for()  # the reviewed image left the list

            second.get_by_role("button", name="Merge boxes (weighted box fusion)").click()  # a page from before
            sync_api.expect(second.get_by_text(f"Not saved: image {disputed} was changed by someone else")).to_be_in_viewport()
            second.screenshot(path=str(ARTIFACTS / "review-conflict-700.png"))

            annotator = _open_review(browser, address, "dr.ann", (1400, 900))
            annotator.get_by_text("A reviewer can accept, merge or edit these reads.").wait_for()
            assert annotator.get_by_role("button", name="Accept this read").count() == 0
            assert annotator.get_by_role("button", name="Merge boxes (weighted box fusion)").count() == 0

            first.get_by_role("button", name="Edit in Annotate").click()
            first.get_by_text("Reviewing: your save becomes this image's training label").wait_for()
            _canvas_ready(first, agreed)  # the page has settled (a key pressed during a rerun is lost)
            first.screenshot(path=str(ARTIFACTS / "review-edit-annotate-1400.png"))
            first.keyboard.press("Control+Enter")  # Save, from the keyboard
            first.get_by_text(f"Saved image {agreed}").wait_for()
        finally:
            browser.close()
    assert "Traceback" not in log.read_text(errors="replace")
    with _sessions(url)() as s:
        assert image_detail(s, disputed).boxes == [MASS]  # the first review stands
        assert s.get(ImageReview, disputed).status == s.get(ImageReview, agreed).status == "reviewed"
        actions = [(e.image_id, e.action, e.annotator.name) for e in s.scalars(
            select(AuditEntry).where(AuditEntry.action.like("review_%")).order_by(AuditEntry.id))]
    assert actions == [(disputed, "review_accept", "dr.rev"), (agreed, "review_edit", "dr.rev")]
