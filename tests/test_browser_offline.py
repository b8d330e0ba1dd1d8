"""Offline means offline: a radiologist's browser, on every page of the workbench, asks nothing of any
address but the workbench's own (127.0.0.1). Requests elsewhere are recorded and refused."""

from __future__ import annotations

from urllib.parse import urlsplit

import pytest

from tests.test_browser_annotate import (  # noqa: F401 (server is a fixture)
    ARTIFACTS,
    CHROMIUM,
    CHROMIUM_ARGS,
    _open_by_id,
    _settled,
    _sign_in,
    server,
    sync_api,
)

pytestmark = [pytest.mark.browser, pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium")]
LOCAL = {"127.0.0.1", "localhost", "::1"}


def test_no_page_makes_a_request_that_leaves_the_machine(server):
    address, _url, queued = server
    image_id = next(queued)
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
            _sign_in(page, address, "dr.offline")
            for name in ("Queue", "Annotate", "Metrics", "Data", "Overview"):
                page.get_by_role("link", name=name).click()
                _settled(page)
            _open_by_id(page, image_id)
            icon = page.evaluate("() => [...document.querySelectorAll('link[rel~=icon]')].map(l => l.href)")
            page.screenshot(path=str(ARTIFACTS / "offline-annotate.png"), full_page=True)
        finally:
            browser.close()
    assert icon and all(urlsplit(href).hostname in LOCAL or href.startswith("data:") for href in icon), icon
    assert outside == [], f"requests that left 127.0.0.1: {outside}"
