"""The login through the real page (Chromium against ``streamlit run app/main.py``): the first start's
admin with its one-time password (from the server's stderr), the neutral message of a wrong password,
the password change, the sidebar's user and role, logout; the token appears in no URL and no cookie."""

from __future__ import annotations

import os
import re
import time

import pytest
from sqlalchemy import select

from db.engine import init_db, make_sessionmaker
from db.models import UserSession
from tests.streamlit_server import ARTIFACTS, CHROMIUM, CHROMIUM_ARGS, ROOT, free_port, streamlit_server
from tests.test_security import PORTS

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium"),
]
sync_api = pytest.importorskip("playwright.sync_api", reason="needs the playwright package")


def _fill_login(page, name: str, password: str) -> None:
    page.get_by_role("textbox", name="Name").fill(name)
    page.get_by_role("textbox", name="Password").fill(password)
    page.get_by_role("button", name="Log in").click()


def test_first_admin_logs_in_changes_the_password_and_logs_out(tmp_path):
    url = f"sqlite:///{tmp_path / 'workbench.db'}"
    log = tmp_path / "streamlit.log"
    port = free_port(PORTS)
    env = {**os.environ, "OXNET_DB_URL": url, "OXNET_DEMO": "0"}
    env.pop("OXNET_ADMIN_PASSWORD", None)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with streamlit_server("app/main.py", port=port, cwd=ROOT, env=env, log=log), sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_context(viewport={"width": 1400, "height": 900}).new_page()
            page.set_default_timeout(30_000)
            page.goto(f"http://127.0.0.1:{port}/")
            page.get_by_role("button", name="Log in").wait_for()
            deadline = time.monotonic() + 20
            while not (found := re.search(r"one-time password (\S+)", log.read_text(errors="replace"))):
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.2)
            one_time = found.group(1)
            assert one_time not in page.content()

            _fill_login(page, "admin", "not-the-password")
            page.get_by_text("Wrong name or password").wait_for()
            _fill_login(page, "nobody", one_time)
            page.get_by_text("Wrong name or password").wait_for()
            assert page.get_by_role("textbox", name="Password").input_value() == ""  # cleared on submit

            _fill_login(page, "admin", one_time)
            page.get_by_text("Choose your password").wait_for()
            page.get_by_label("One-time (current) password").fill(one_time)
            page.get_by_label("New password", exact=True).fill("a-fresh-passw0rd")
            page.get_by_label("New password again").fill("a-fresh-passw0rd")
            page.get_by_role("button", name="Change password").click()
            page.get_by_text("Signed in as").wait_for()
            assert page.get_by_text("(admin)").first.is_visible()
            page.get_by_role("link", name="Users").wait_for()
            with make_sessionmaker(init_db(url))() as session:
                live = session.scalars(select(UserSession).where(~UserSession.revoked)).all()
            assert len(live) == 1
            cookies = " ".join(c["value"] for c in page.context.cookies())
            assert live[0].token_sha256 not in page.url and "token" not in page.url and "annotator=" not in page.url
            assert not any(len(c["value"]) >= 40 and c["name"] != "_streamlit_xsrf" for c in page.context.cookies()), cookies
            assert "_streamlit_xsrf" in {c["name"] for c in page.context.cookies()}  # XSRF protection is on
            page.screenshot(path=str(ARTIFACTS / "login-signed-in.png"), full_page=True)

            page.get_by_role("button", name="Log out").click()
            page.get_by_role("button", name="Log in").wait_for()
            with make_sessionmaker(init_db(url))() as session:
                assert session.get(UserSession, live[0].id).revoked
            page.reload()  # nothing of the session is left to come back with
            _fill_login(page, "admin", one_time)
            page.get_by_text("Wrong name or password").wait_for()
            _fill_login(page, "admin", "a-fresh-passw0rd")
            page.get_by_text("Signed in as").wait_for()
        finally:
            browser.close()
