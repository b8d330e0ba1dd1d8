"""A real browser against ``streamlit run app/main.py``: open a queued image, draw a box, save, label the next.

Needs Debian's Chromium (``apt-get install -y chromium``) and the ``playwright`` package (never
``playwright install``); skipped when either is missing. Screenshots go to ``artifacts/browser/``.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from sqlalchemy import select

from db.demo import seed_demo
from db.engine import init_db, make_sessionmaker
from db.models import Box, Granularity, Image, ModelStatus, Split, SuggestedAction
from db.repository import create_model_version, finish_model_version, write_predictions, write_suggestions

CHROMIUM = Path("/usr/bin/chromium")
ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "artifacts" / "browser"
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync",
]
SIZE = 256  # demo image side (px); the canvas shows it at 640 px

pytestmark = [pytest.mark.browser, pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium")]
sync_api = pytest.importorskip("playwright.sync_api", reason="needs the playwright package")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _seed(url: str) -> list[int]:
    """Eight demo images and a ready model version whose queue holds the unlabeled training images."""
    seed_demo(url, n=8, size=SIZE)
    with make_sessionmaker(init_db(url)).begin() as session:
        version = create_model_version(session, config={"preset": "test"})
        finish_model_version(session, version.id, status=ModelStatus.READY)
        queued = list(session.scalars(
            select(Image.id).where(Image.split == Split.TRAIN, Image.granularity == Granularity.UNLABELED).order_by(Image.id)
        ))
        reason = {"text": "teacher and student disagree on Nodule", "classes": ["Nodule"]}
        write_suggestions(session, version.id, [
            {"image_id": i, "action": SuggestedAction.ADD_LABELS, "score": 1.0 - k / 10, "reason": reason}
            for k, i in enumerate(queued)
        ])
        write_predictions(session, version.id, [
            {"image_id": i, "boxes": [{"class": "Nodule", "bbox": [60, 70, 100, 120], "score": 0.77}], "image_probs": {"Nodule": 0.8}}
            for i in queued
        ])
    return queued


@pytest.fixture
def server(tmp_path):
    url = f"sqlite:///{tmp_path / 'workbench.db'}"
    queued = _seed(url)
    port = _free_port()
    log = open(tmp_path / "streamlit.log", "wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", "app/main.py", "--server.headless", "true", "--server.port", str(port),
         "--server.address", "127.0.0.1", "--browser.gatherUsageStats", "false"],
        cwd=ROOT, env={**os.environ, "OXNET_DB_URL": url, "OXNET_DEMO": "0"}, start_new_session=True,
        stdout=log, stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=1).status == 200:
                    break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError((tmp_path / "streamlit.log").read_text()) from None
                time.sleep(0.2)
        yield f"http://127.0.0.1:{port}", url, queued
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=20)
        log.close()


def _settled(page) -> None:
    """Wait until the script runs are over (for half a second) and no stale element of an earlier run is left."""
    quiet = """() => document.querySelector('[data-testid="stApp"]')?.dataset.testScriptState === 'notRunning'
                     && !document.querySelector('[data-stale="true"]')"""
    while True:
        page.wait_for_function(quiet, polling=100)
        page.wait_for_timeout(500)
        if page.evaluate(quiet):
            return


def _button(page, key: str):
    """The button with Streamlit key ``key`` (a rerun can briefly show it twice; both are the same widget)."""
    return page.locator(f'.st-key-{key} button').first


def test_draw_save_and_label_next(server):
    address, url, queued = server
    first, second, third = queued[:3]
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    Session = make_sessionmaker(init_db(url))
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1500, "height": 1100})
            page.set_default_timeout(30_000)
            page.goto(address)
            page.get_by_role("textbox", name="Your name").fill("dr.browser")
            page.get_by_role("button", name="Start annotating").click()
            page.get_by_text("Annotating as").wait_for()
            page.get_by_role("link", name="Queue").click()
            page.get_by_role("button", name=f"Open #{first}").click()

            canvas = page.locator("canvas.upper-canvas")
            canvas.wait_for()
            page.get_by_text(f"Image #{first}").wait_for()
            page.wait_for_function(  # the background image has been fitted into the canvas
                "() => [...document.querySelectorAll('*')].some(e => e.shadowRoot && e.shadowRoot.querySelector('canvas.lower-canvas'))",
                polling="raf",
            )
            time.sleep(1.0)
            box = canvas.bounding_box()
            scale = box["width"] / SIZE
            start, end = (30, 40), (90, 100)  # image pixels
            page.mouse.move(box["x"] + start[0] * scale, box["y"] + start[1] * scale)
            page.mouse.down()
            page.mouse.move(box["x"] + end[0] * scale, box["y"] + end[1] * scale, steps=15)
            page.mouse.up()
            page.get_by_text("Boxes (1)").wait_for()
            _settled(page)
            page.screenshot(path=str(ARTIFACTS / "1-drawn.png"), full_page=True)

            _button(page, "annotate_save").click()
            page.get_by_text(f"Saved image {first}").wait_for()
            _settled(page)
            page.screenshot(path=str(ARTIFACTS / "2-saved.png"), full_page=True)
            with Session() as session:
                boxes = session.scalars(select(Box).where(Box.image_id == first)).all()
                assert len(boxes) == 1
                assert boxes[0].label_class.name == "Aortic calcification"  # the default class
                got = (boxes[0].x1, boxes[0].y1, boxes[0].x2, boxes[0].y2)
                assert got == pytest.approx((*start, *end), abs=2.0), got
                assert session.get(Image, first).granularity is Granularity.WEAK

            _button(page, "annotate_skip").click()
            page.get_by_text(f"Image #{second}").wait_for()
            _settled(page)
            page.get_by_role("checkbox", name="Pneumonia").check(force=True)
            _button(page, "annotate_save_next").click()
            page.get_by_text(f"Image #{third}").wait_for()
            _settled(page)
            page.screenshot(path=str(ARTIFACTS / "3-next.png"), full_page=True)
            with Session() as session:
                image = session.get(Image, second)
                assert image.granularity is Granularity.WEAK
                assert {label.label_class.name for label in image.labels if label.present} == {"Pneumonia"}
        except Exception:
            page.screenshot(path=str(ARTIFACTS / "failure.png"), full_page=True)
            raise
        finally:
            browser.close()
