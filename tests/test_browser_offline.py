"""Offline means offline: a radiologist's browser, on every page of the workbench, asks nothing of any
address but the workbench's own (127.0.0.1). Requests elsewhere are recorded and refused."""

from __future__ import annotations

from urllib.parse import urlsplit

import pytest

from tests.test_browser_annotate import ARTIFACTS, CHROMIUM, CHROMIUM_ARGS, _settled, server, sync_api  # noqa: F401

pytestmark = [pytest.mark.browser, pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium")]
LOCAL = {"127.0.0.1", "localhost", "::1"}


def test_no_page_makes_a_request_that_leaves_the_machine(server):
    address, _url, queued = server
    outside: list[str] = []

    def guard(route):
        url = route.request.url
        if urlsplit(url).scheme in ("data", "blob") or urlsplit(url).hostname in LOCAL:
            route.continue_()
        else:
            outside.append(url)
            route.abort()

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            context = browser.new_context(viewport={"width": 1366, "height": 768})
            context.route("**/*", guard)
            page = context.new_page()
            page.set_default_timeout(30_000)
            page.goto(address)
            page.get_by_role("textbox", name="Your name").fill("dr.offline")
            page.get_by_role("button", name="Start annotating").click()
            page.get_by_text("Annotating as").wait_for()
            for name in ("Queue", "Annotate", "Metrics", "Data", "Overview"):
                page.get_by_role("link", name=name).click()
                _settled(page)
            page.get_by_role("link", name="Queue").click()
            page.get_by_role("button", name=f"Open #{queued[0]}").click()
            page.locator("canvas.upper-canvas").wait_for()
            _settled(page)
            icon = page.evaluate("() => [...document.querySelectorAll('link[rel~=icon]')].map(l => l.href)")
            page.screenshot(path=str(ARTIFACTS / "offline-annotate.png"), full_page=True)
        finally:
            browser.close()
    assert icon and all(urlsplit(href).hostname in LOCAL or href.startswith("data:") for href in icon), icon
    assert outside == [], f"requests that left 127.0.0.1: {outside}"
