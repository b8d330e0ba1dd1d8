"""A real browser against ``streamlit run app/main.py``: the Annotate page as a radiologist uses it.

One streamlit server per module (a free port of 8630-8639, or of the ten from ``$OXNET_TEST_PORT``) on
a seeded demo store; each test takes its own images and its own annotator in a fresh browser context.
Covers what once went wrong on the Annotate page: a refused save's message, unsaved boxes across a page
switch, the whole image at 1366x768, a click is not a box, one suggestion numbering, defaults by
granularity, unmarked findings not stored as absent, reload and the leave-page prompt, the threshold and
untruncated buttons.

Needs Debian's Chromium (``apt-get install -y chromium``) and the ``playwright`` package (never
``playwright install``); skipped when either is missing. Screenshots go to ``artifacts/browser/``.
"""

from __future__ import annotations

import base64
import io
import os
import re
import time

import numpy as np
import pytest
from PIL import Image as PILImage
from sqlalchemy import select

from db.demo import seed_demo
from db.drafts import get_draft
from db.engine import init_db, make_sessionmaker
from db.models import AuditEntry, Box, Granularity, Image, Lease, ModelStatus, Split, SuggestedAction
from db.people import get_annotator
from db.versions import create_model_version, finish_model_version, write_predictions, write_suggestions
from tests.logins import PASSWORD, ensure_user
from tests.streamlit_server import ARTIFACTS, CHROMIUM, CHROMIUM_ARGS, ROOT, free_port, streamlit_server

#: Ports to try (the first free one serves): ten from ``$OXNET_TEST_PORT`` (default 8630).
FIRST_PORT = int(os.environ.get("OXNET_TEST_PORT", "8630"))
PORTS = range(FIRST_PORT, FIRST_PORT + 10)
SIZE = 256  # demo image side (px)
#: The model's boxes on every queued image: three above the default threshold 0.5, one below.
SUGGESTED = [
    {"class": "Nodule", "bbox": [60, 70, 100, 120], "score": 0.77},
    {"class": "Mass", "bbox": [150, 40, 200, 90], "score": 0.66},
    {"class": "Nodule", "bbox": [40, 170, 90, 220], "score": 0.55},
    {"class": "Fracture", "bbox": [170, 160, 230, 230], "score": 0.2},
]

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium"),
]
sync_api = pytest.importorskip("playwright.sync_api", reason="needs the playwright package")




def _seed(url: str) -> list[int]:
    """24 demo images and a ready model version whose queue holds the unlabeled training images."""
    seed_demo(url, n=24, size=SIZE)
    with make_sessionmaker(init_db(url)).begin() as session:
        version = create_model_version(session, config={"preset": "test"})
        finish_model_version(session, version.id, status=ModelStatus.READY)
        queued = list(session.scalars(
            select(Image.id).where(Image.split == Split.TRAIN, Image.granularity == Granularity.UNLABELED).order_by(Image.id)
        ))
        reason = {"text": "teacher and student disagree on Nodule", "classes": ["Nodule"]}
        write_suggestions(session, version.id, [
            {"image_id": i, "action": SuggestedAction.ADD_LABELS, "score": 1.0 - k / 100, "reason": reason}
            for k, i in enumerate(queued)
        ])
        write_predictions(session, version.id, [{"image_id": i, "boxes": SUGGESTED, "image_probs": {"Nodule": 0.8}} for i in queued])
    return queued


#: The store behind each server address (``_sign_in`` creates its users there).
_STORES: dict[str, str] = {}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """(address, store URL, an iterator handing each test fresh queued image ids)."""
    tmp_path = tmp_path_factory.mktemp("browser")
    url = f"sqlite:///{tmp_path / 'workbench.db'}"
    queued = _seed(url)
    port = free_port(PORTS)
    env = {**os.environ, "OXNET_DB_URL": url, "OXNET_DEMO": "0"}
    with streamlit_server("app/main.py", port=port, cwd=ROOT, env=env, log=tmp_path / "streamlit.log"):
        _STORES[f"http://127.0.0.1:{port}"] = url
        yield f"http://127.0.0.1:{port}", url, iter(queued)


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def page(browser, request):
    """A fresh browser context (a new Streamlit session) at 1400x900; its last view goes to artifacts/browser/."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    context = browser.new_context(viewport={"width": 1400, "height": 900})
    page = context.new_page()
    page.set_default_timeout(30_000)
    yield page
    if not page.is_closed():
        page.screenshot(path=str(ARTIFACTS / f"last-{request.node.name}.png"), full_page=True)
    context.close()


def _generation(page) -> str:
    """The current image load and findings generation ("3x0"): they key the findings widgets."""
    return page.evaluate("() => document.querySelector('[class*=st-key-annotate_find_]').className.match(/annotate_find_(\\d+x\\d+)_/)[1]")


def _load(page) -> str:
    """The page's current image-load counter (it keys the per-image widgets)."""
    return _generation(page).split("x")[0]


def _finding(page, k: int, state: str) -> None:
    """Mark finding ``k`` (0-based class index) as ``state``."""
    page.locator(f".st-key-annotate_find_{_generation(page)}_{k}").get_by_text(state, exact=True).click()
    _settled(page)


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
    return page.locator(f".st-key-{key} button").first


def _log_in(page, who: str, password: str = PASSWORD) -> None:
    """Fill the login form (shown in place of any page while nobody is logged in) and submit it."""
    page.get_by_role("textbox", name="Name").fill(who)
    page.get_by_role("textbox", name="Password").fill(password)
    page.get_by_role("button", name="Log in").click()


def _sign_in(page, address: str, who: str, role: str = "admin") -> None:
    """Log in through the real login page as ``who`` (created with ``role`` in the server's store)."""
    ensure_user(who, role, _STORES[address])
    page.goto(address)
    _log_in(page, who)
    page.get_by_text("Signed in as").wait_for()


def _open_by_id(page, image_id: int) -> None:
    page.get_by_role("link", name="Annotate").click()
    page.get_by_role("spinbutton", name="Image id").fill(str(image_id))
    page.get_by_role("spinbutton", name="Image id").press("Enter")
    _settled(page)
    _button(page, "annotate_open_id").click()
    _canvas_ready(page, image_id)


def _canvas_ready(page, image_id: int):
    """The canvas of image ``image_id``, once its background is fitted and the page has settled."""
    page.get_by_text(f"Image #{image_id}").wait_for()
    page.wait_for_function(  # one canvas (a resize remounts it once), its background fitted
        "() => [...document.querySelectorAll('*')].filter(e => e.shadowRoot && e.shadowRoot.querySelector('canvas.lower-canvas')).length == 1",
        polling="raf",
    )
    _settled(page)
    time.sleep(0.5)
    _settled(page)
    return _canvas(page)


def _canvas(page):
    return page.locator("canvas.upper-canvas").last


def _drag(page, canvas, start: tuple[float, float], end: tuple[float, float]) -> None:
    """Drag on the canvas from ``start`` to ``end`` (image pixels)."""
    box = canvas.bounding_box()
    scale = box["width"] / SIZE
    page.mouse.move(box["x"] + start[0] * scale, box["y"] + start[1] * scale)
    page.mouse.down()
    page.mouse.move(box["x"] + end[0] * scale, box["y"] + end[1] * scale, steps=15)
    page.mouse.up()


def test_draw_save_and_label_next(server, page):
    address, url, images = server
    first, second, third = next(images), next(images), next(images)  # Save & next leases the third
    Session = make_sessionmaker(init_db(url))
    _sign_in(page, address, "dr.browser")
    page.get_by_role("link", name="Queue").click()
    page.get_by_role("button", name=f"Open #{first}", exact=True).click()
    canvas = _canvas_ready(page, first)
    start, end = (30, 40), (90, 100)  # image pixels
    _drag(page, canvas, start, end)
    page.get_by_text("Boxes (1)").wait_for()
    _settled(page)
    page.screenshot(path=str(ARTIFACTS / "1-drawn.png"), full_page=True)

    _button(page, "annotate_save").click()
    page.get_by_text(f"Saved image {first}").wait_for()
    _settled(page)
    with Session() as session:
        boxes = session.scalars(select(Box).where(Box.image_id == first)).all()
        assert len(boxes) == 1
        assert boxes[0].label_class.name == "Aortic calcification"  # the default class
        got = (boxes[0].x1, boxes[0].y1, boxes[0].x2, boxes[0].y2)
        assert got == pytest.approx((*start, *end), abs=2.0), got
        image = session.get(Image, first)
        assert image.granularity is Granularity.WEAK
        # item 7: one box records its class as present and nothing about the other eight
        audit = [(e.annotator.name, e.action, (e.after or {}).get("labels")) for e in
                 session.scalars(select(AuditEntry).where(AuditEntry.image_id == first).order_by(AuditEntry.id))]
        assert {label.label_class.name: label.present for label in image.labels} == {"Aortic calcification": True}, audit

    _button(page, "annotate_skip").click()
    _canvas_ready(page, second)  # the next of the queue
    _finding(page, 6, "present")  # Pneumonia
    _button(page, "annotate_save_next").click()
    page.get_by_text(f"Image #{third}").wait_for()
    page.get_by_text(f"Saved image {second}").wait_for()
    _settled(page)
    page.screenshot(path=str(ARTIFACTS / "3-next.png"), full_page=True)
    with Session() as session:
        image = session.get(Image, second)
        assert image.granularity is Granularity.WEAK
        assert {label.label_class.name: label.present for label in image.labels} == {"Pneumonia": True}


def test_refused_save_keeps_its_message(server, page):
    address, url, images = server
    image_id = next(images)
    _sign_in(page, address, "dr.refused")
    _open_by_id(page, image_id)
    load = _load(page)
    _finding(page, 4, "present")  # Nodule, and no Nodule box
    page.locator(f".st-key-annotate_complete_{load}").get_by_text("All lesions are boxed").click()
    _settled(page)
    _button(page, "annotate_save").click()
    message = page.get_by_text("Not saved:")
    message.wait_for()
    time.sleep(3.0)  # on main it vanished after about half a second
    _settled(page)
    assert message.is_visible() and "have no box" in message.inner_text()
    page.screenshot(path=str(ARTIFACTS / "refused-save.png"), full_page=True)
    _button(page, "annotate_dismiss_error").click()
    _settled(page)
    assert page.get_by_text("Not saved:").count() == 0


def test_unsaved_boxes_survive_a_page_switch(server, page):
    address, url, images = server
    image_id = next(images)
    _sign_in(page, address, "dr.switch")
    _open_by_id(page, image_id)
    _drag(page, _canvas(page), (20, 20), (80, 90))
    page.get_by_text("Boxes (1)").wait_for()
    _settled(page)
    assert page.get_by_text("Unsaved changes").is_visible()  # a box-only change counts
    page.get_by_role("link", name="Queue").click()
    page.get_by_text("Queue").first.wait_for()
    _settled(page)
    page.get_by_role("link", name="Annotate").click()
    _canvas_ready(page, image_id)
    assert page.get_by_text("Boxes (1)").is_visible()
    assert page.get_by_text("Unsaved changes").is_visible()
    objects = page.evaluate("""() => {
        const host = [...document.querySelectorAll('*')].find(e => e.shadowRoot && e.shadowRoot.querySelector('canvas.lower-canvas'));
        return host ? host.shadowRoot.querySelectorAll('canvas').length : 0; }""")
    assert objects >= 2  # the canvas is back (its drawn box is checked through the list above and the store below)
    with make_sessionmaker(init_db(url))() as session:
        draft = get_draft(session, image_id, "dr.switch")
        assert draft is not None and len(draft.payload["boxes"]) == 1


@pytest.mark.parametrize("viewport", [(1366, 768), (1920, 1080)])
def test_whole_image_visible_without_sideways_scrolling(server, browser, viewport):
    address, url, images = server
    image_id = next(images)
    context = browser.new_context(viewport={"width": viewport[0], "height": viewport[1]})
    page = context.new_page()
    page.set_default_timeout(30_000)
    try:
        _sign_in(page, address, f"dr.w{viewport[0]}")
        _open_by_id(page, image_id)
        time.sleep(1.0)
        _settled(page)
        page.screenshot(path=str(ARTIFACTS / f"annotate-{viewport[0]}x{viewport[1]}.png"))
        # a freshly opened image: nothing changed, every finding "not assessed" (a dropped widget state once showed "present")
        assert page.get_by_text("Unsaved changes").count() == 0
        checked = page.evaluate("() => [...document.querySelectorAll('[class*=st-key-annotate_find_] input[type=radio]:checked')]"
                                ".map(i => i.closest('label').innerText.trim())")
        assert checked == ["not assessed"] * 9, checked
        box = _canvas(page).bounding_box()
        scroll_width = page.evaluate("() => document.querySelector('[data-testid=stMain]').scrollWidth")
        client_width = page.evaluate("() => document.querySelector('[data-testid=stMain]').clientWidth")
        main_column = page.locator(".st-key-annotate_column_width").bounding_box()
        assert scroll_width <= client_width + 1, (scroll_width, client_width)
        assert box["x"] >= 0 and box["x"] + box["width"] <= viewport[0], box
        assert main_column is None or box["x"] + box["width"] <= main_column["x"] + main_column["width"] + 2, (box, main_column)
        assert box["width"] == pytest.approx(box["height"], abs=2)  # the square image, not cut
        assert box["y"] + box["height"] <= viewport[1], box  # and above the fold
    finally:
        context.close()


def test_image_fits_above_the_fold_at_900_px(server, page):
    address, url, images = server
    image_id = next(images)
    _sign_in(page, address, "dr.fold")
    _open_by_id(page, image_id)
    box = _canvas(page).bounding_box()
    assert box["y"] + box["height"] <= 900, box  # the page opens scrolled to the top


def test_a_click_is_not_a_box(server, page):
    address, url, images = server
    image_id = next(images)
    _sign_in(page, address, "dr.click")
    _open_by_id(page, image_id)
    canvas = _canvas(page)
    box = canvas.bounding_box()
    page.mouse.click(box["x"] + 100, box["y"] + 100)
    page.get_by_text("smaller than the minimum 4 px").wait_for()
    _settled(page)
    assert page.get_by_text("Boxes (0)").is_visible()
    _drag(page, canvas, (100, 100), (101, 101))  # a 1 px drag
    _settled(page)
    assert page.get_by_text("Boxes (0)").is_visible()
    with make_sessionmaker(init_db(url))() as session:
        assert session.scalars(select(Box).where(Box.image_id == image_id)).all() == []


def _background(page) -> np.ndarray:
    """The canvas's background image (what the server drew: the X-ray and the suggestion labels) as RGB."""
    url = page.evaluate("""() => {
        const host = [...document.querySelectorAll('*')].find(e => e.shadowRoot && e.shadowRoot.querySelector('canvas.lower-canvas'));
        return host.shadowRoot.querySelector('canvas.lower-canvas').toDataURL('image/png'); }""")
    return np.asarray(PILImage.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB"), dtype=np.float32)


def test_suggestion_numbers_agree_between_image_and_list(server, page):
    from app.imaging import compose, render

    address, url, images = server
    image_id = next(images)
    _sign_in(page, address, "dr.numbers")
    _open_by_id(page, image_id)
    _button(page, f"annotate_reject_{_load(page)}_0").click()  # S1
    _settled(page)
    time.sleep(1.0)
    _settled(page)
    listed = [t.split()[0] for t in page.locator("[data-testid=stMarkdownContainer] p").all_inner_texts() if re.match(r"S\d+ ", t)]
    assert listed == ["S2", "S3"], listed  # S1 rejected; S4 (0.20) is below the 0.5 threshold
    shown = _background(page)
    with make_sessionmaker(init_db(url))() as session:
        path = session.get(Image, image_id).path
    size = (shown.shape[1], shown.shape[0])
    base = render(path, size)
    scale = size[0] / SIZE

    def drawn(numbers):
        boxes = [{**SUGGESTED[k], "number": n} for k, n in zip((1, 2), numbers, strict=True)]
        return np.asarray(compose(base, scale, boxes), dtype=np.float32)

    right, wrong = drawn((2, 3)), drawn((1, 2))  # wrong: the numbering restarted at S1 (main)
    assert np.abs(shown - right).mean() < np.abs(shown - wrong).mean()


def test_open_by_id_defaults_follow_the_granularity(server, page):
    address, url, images = server
    image_id = next(images)  # unlabeled
    _sign_in(page, address, "dr.defaults")
    _open_by_id(page, image_id)
    assert page.get_by_text("task: add image-level labels").is_visible()
    complete = page.get_by_role("checkbox", name="All lesions are boxed (image becomes full)")
    assert not complete.is_checked()


def test_reload_keeps_annotator_image_draft_and_lease_and_asks_before_leaving(server, browser):
    address, url, images = server
    image_id = next(images)
    context = browser.new_context(viewport={"width": 1400, "height": 900})
    page = context.new_page()
    page.set_default_timeout(30_000)
    try:
        _sign_in(page, address, "dr.reload")
        _open_by_id(page, image_id)
        _drag(page, _canvas(page), (30, 30), (90, 80))
        page.get_by_text("Boxes (1)").wait_for()
        _settled(page)
        assert f"image={image_id}" in page.url and "annotator=" not in page.url  # no identity in the URL

        dialogs = []
        page.on("dialog", lambda dialog: (dialogs.append(dialog.type), dialog.accept()))  # "leave page?" - yes
        page.reload()
        assert dialogs == ["beforeunload"]  # the browser asked before dropping the unsaved work
        _log_in(page, "dr.reload")  # the login lives in the browser session: a reload asks again
        page.get_by_text("Signed in as").wait_for()
        _canvas_ready(page, image_id)
        assert page.get_by_text("dr.reload").first.is_visible()
        assert page.get_by_text("Restored your unsaved draft").is_visible()
        assert page.get_by_text("Boxes (1)").is_visible()
        with make_sessionmaker(init_db(url))() as session:
            lease = session.get(Lease, image_id)
            assert lease is not None and lease.annotator_id == get_annotator(session, "dr.reload").id

    finally:
        context.close()


def test_threshold_accept_reject_all_and_full_button_labels(server, page):
    address, url, images = server
    image_id = next(images)
    _sign_in(page, address, "dr.threshold")
    _open_by_id(page, image_id)
    truncated = page.evaluate("""() => [...document.querySelectorAll('[class*=st-key-annotate_] button')]
        .filter(b => b.offsetParent && b.scrollWidth > b.clientWidth + 1).map(b => b.innerText)""")
    assert truncated == []
    labels = page.evaluate("() => [...document.querySelectorAll('[class*=st-key-annotate_accept_] button')].map(b => b.innerText)")
    assert "Accept" in labels and any(label.startswith("Accept all 3") for label in labels)
    page.get_by_text("1 more below the threshold").wait_for()
    page.get_by_text("1 more below the threshold").scroll_into_view_if_needed()
    page.screenshot(path=str(ARTIFACTS / "suggestions-1400x900.png"))
    _button(page, f"annotate_accept_all_{_load(page)}").click()
    page.get_by_text("Boxes (3)").wait_for()
    _settled(page)
    page.screenshot(path=str(ARTIFACTS / "accepted-all.png"), full_page=True)
