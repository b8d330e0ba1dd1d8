"""The login, logout, first start, Users page, role-dependent pages and single sign-on through
``streamlit.testing.v1.AppTest`` (the server-side checks themselves: tests/test_accounts.py)."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select, update
from streamlit.testing.v1 import AppTest

from db.accounts import WRONG_LOGIN, create_user, deactivate, session_user
from db.demo import seed_demo
from db.engine import init_db, make_sessionmaker
from db.models import AuditEntry, ModelStatus, UserAccount, UserSession, utcnow
from db.versions import create_model_version, finish_model_version, set_serving_version
from tests.logins import PASSWORD, TOKEN_KEY, ensure_user, session_token

MAIN = str(Path(__file__).resolve().parent.parent / "app" / "main.py")


@pytest.fixture
def store(empty):
    """The empty workbench store of tests/conftest.py."""
    return empty


def _sessions(url):
    return make_sessionmaker(init_db(url))


def _texts(at: AppTest) -> str:
    parts = [e.value for kind in ("markdown", "caption", "info", "warning", "error", "success", "code") for e in getattr(at, kind)]
    return "\n".join(str(p) for p in parts)


def _login(at: AppTest, name: str, password: str) -> AppTest:
    at.text_input[0].input(name)
    at.text_input[1].input(password)
    at.button[0].click().run()
    assert not at.exception, at.exception
    return at


def _fresh() -> AppTest:
    at = AppTest.from_file(MAIN, default_timeout=60)
    at.run()
    assert not at.exception, at.exception
    return at


def test_login_wrong_password_and_unknown_name_say_the_same_then_login_and_logout(store):
    ensure_user("dr.lee", "annotator")
    at = _fresh()
    assert [t.label for t in at.text_input] == ["Name", "Password"] and not at.title[0].value == "Overview"
    _login(at, "dr.lee", "not the password")
    wrong_password = at.error[0].value
    _login(at, "dr.nobody", PASSWORD)
    assert wrong_password == at.error[0].value == WRONG_LOGIN
    assert TOKEN_KEY not in at.session_state
    _login(at, "dr.lee", PASSWORD)
    assert "Signed in as **dr\\.lee** (annotator)" in [m.value for m in at.sidebar.markdown]
    token = at.session_state[TOKEN_KEY]
    with _sessions(store)() as session:
        assert session_user(session, token).name == "dr.lee"
    at.sidebar.button(key="main_logout").click().run()
    assert [t.label for t in at.text_input] == ["Name", "Password"]
    with _sessions(store)() as session:
        assert session_user(session, token) is None  # revoked in the store, not only forgotten here


def test_first_start_prints_a_one_time_password_to_stderr_only_and_asks_to_change_it(store, capfd):
    at = _fresh()
    err = capfd.readouterr().err
    line = next(text for text in err.splitlines() if "one-time password" in text)
    password = line.split("one-time password ")[1].split()[0]
    assert len(password) >= 20 and password not in _texts(at)
    with _sessions(store)() as session:
        assert password not in str(session.scalars(select(UserAccount.password_hash)).all())
    _login(at, "admin", password)
    assert "one-time password" in _texts(at) and password not in _texts(at)
    assert not at.sidebar.markdown or "Signed in" not in at.sidebar.markdown[0].value  # no pages yet
    at.text_input[0].input(password)
    at.text_input[1].input("my-own-passw0rd")
    at.text_input[2].input("my-own-passw0rd")
    at.button[0].click().run()
    assert not at.exception, at.exception
    assert "Signed in as **admin** (admin)" in [m.value for m in at.sidebar.markdown]
    assert "Users" in _texts(at) or at.title[0].value == "Overview"
    at2 = _fresh()  # a second browser: nothing printed again, the new password works
    assert "one-time password" not in capfd.readouterr().err
    _login(at2, "admin", "my-own-passw0rd")
    assert "Signed in as **admin** (admin)" in [m.value for m in at2.sidebar.markdown]


def test_first_admin_password_from_the_environment(store, monkeypatch, capfd):
    monkeypatch.setenv("OXNET_ADMIN_PASSWORD", "from-the-env-123")
    at = _fresh()
    assert "OXNET_ADMIN_PASSWORD" in capfd.readouterr().err
    _login(at, "admin", "from-the-env-123")
    assert "one-time password" in _texts(at)  # must still be changed


def test_a_deactivated_users_session_stops_at_the_next_script_run(store):
    at = AppTest.from_file(MAIN, default_timeout=60)
    at.session_state[TOKEN_KEY] = session_token("dr.lee", "annotator")
    at.run()
    assert "Signed in as **dr\\.lee** (annotator)" in [m.value for m in at.sidebar.markdown]
    at.session_state["annotate_draft"] = {"boxes": [["Nodule", 1, 2, 3, 4]]}  # the user's unsaved work in memory
    with _sessions(store).begin() as session:
        deactivate(session, "dr.lee")
    at.run()
    assert [t.label for t in at.text_input] == ["Name", "Password"] and TOKEN_KEY not in at.session_state
    assert "annotate_draft" not in at.session_state  # the next person at this browser sees none of it
    _login(at, "dr.lee", PASSWORD)
    assert at.error[0].value == WRONG_LOGIN


def test_an_expired_session_stops_working(store):
    at = AppTest.from_file(MAIN, default_timeout=60)
    at.session_state[TOKEN_KEY] = session_token("dr.lee", "annotator")
    at.run()
    assert "Signed in as" in at.sidebar.markdown[0].value
    with _sessions(store).begin() as session:
        session.execute(update(UserSession).values(expires_at=utcnow() - timedelta(seconds=1)))
    at.run()
    assert [t.label for t in at.text_input] == ["Name", "Password"]


def test_an_annotator_sees_no_admin_pages_or_buttons(store):
    seed_demo(store, n=6, size=64)
    with _sessions(store).begin() as session:
        versions = []
        for _ in range(2):
            version = create_model_version(session, config={})
            finish_model_version(session, version.id, status=ModelStatus.READY)
            versions.append(version.id)
        set_serving_version(session, versions[0], annotator="trainer", action="model_serve", kind="system")
    at = AppTest.from_file(MAIN, default_timeout=60)
    at.session_state[TOKEN_KEY] = session_token("dr.lee", "annotator")
    at.run()
    assert not at.exception, at.exception
    assert "An admin starts and stops the trainer" in _texts(at) and "An admin can promote" in _texts(at)
    keys = {b.key for b in at.button}
    assert not keys & {"overview_start", "overview_stop", "overview_stop_after_round", f"overview_promote_{versions[1]}"}
    for page in ("views/data.py", "views/admin.py"):  # not in this user's navigation
        with pytest.raises(ValueError, match="Could not find a navigation page"):
            at.switch_page(page)
    at.switch_page("views/metrics.py").run()  # a page this role has
    assert at.title[0].value == "Metrics"
    admin = AppTest.from_file(MAIN, default_timeout=60)
    admin.session_state[TOKEN_KEY] = session_token("dr.boss", "admin")
    admin.run()
    assert {"overview_start", f"overview_promote_{versions[1]}"} <= {b.key for b in admin.button}


def test_the_users_page_adds_a_user_with_a_one_time_password_and_manages_them(store):
    at = AppTest.from_file(MAIN, default_timeout=60)
    at.session_state[TOKEN_KEY] = session_token("dr.boss", "admin")
    at.run()
    at.switch_page("views/admin.py").run()
    assert at.title[0].value == "Users"
    at.text_input[0].input("Zoë O'Brien; DROP TABLE user_account")
    at.selectbox[0].select("reviewer")
    at.button[0].click().run()
    assert not at.exception, at.exception
    password = at.code[0].value
    assert "One-time password of" in _texts(at)
    at.run()  # shown once: the next run no longer has it
    assert not at.code
    with _sessions(store)() as session:
        user = session.scalars(select(UserAccount).where(UserAccount.role == "reviewer")).one()
        assert user.name == "Zoë O'Brien; DROP TABLE user_account" and user.must_change_password
    other = _fresh()
    _login(other, user.name, password)
    assert "one-time password" in _texts(other)

    at.selectbox(key="admin_user").select(user.name).run()
    at.selectbox(key="admin_role").select("annotator").run()
    at.button(key="admin_set_role").click().run()
    at.button(key="admin_reset").click().run()
    new_password = at.code[0].value
    assert new_password != password
    at.button(key="admin_deactivate").click().run()
    assert not at.exception, at.exception
    with _sessions(store)() as session:
        user = session.scalars(select(UserAccount).where(UserAccount.name == user.name)).one()
        assert (user.role.value, user.active) == ("annotator", False)
        actions = session.scalars(select(AuditEntry.action).where(AuditEntry.annotator.has(name="dr.boss"))).all()
    assert {"user_create", "user_role", "user_password_reset", "user_deactivate"} <= set(actions)
    assert _login(_fresh(), user.name, new_password).error[0].value == WRONG_LOGIN
    at.selectbox(key="admin_user").select("dr.boss").run()
    at.button(key="admin_deactivate").click().run()
    assert "cannot deactivate yourself" in at.error[0].value


def test_single_sign_on_maps_to_a_store_user_and_refuses_an_unknown_one(store):
    with _sessions(store).begin() as session:
        create_user(session, "lee@hospital.example", "reviewer", password=PASSWORD, must_change_password=False)
    at = AppTest.from_file(MAIN, default_timeout=60)
    at.user = {"is_logged_in": True, "email": "lee@hospital.example"}
    at.run()
    assert not at.exception, at.exception
    assert "Signed in as **lee\\@hospital\\.example** (reviewer)" in [m.value for m in at.sidebar.markdown]
    stranger = AppTest.from_file(MAIN, default_timeout=60)
    stranger.user = {"is_logged_in": True, "email": "eve@elsewhere.example"}
    stranger.run()
    assert "no active user of that name" in _texts(stranger) and TOKEN_KEY not in stranger.session_state


def test_a_user_added_for_single_sign_on_gets_no_password_and_goes_straight_in(store):
    at = AppTest.from_file(MAIN, default_timeout=60)
    at.session_state[TOKEN_KEY] = session_token("dr.boss", "admin")
    at.run()
    at.switch_page("views/admin.py").run()
    at.text_input[0].input("kim@hospital.example")
    at.checkbox[0].check()
    at.button[0].click().run()
    assert not at.exception, at.exception
    assert not at.code and "for single sign-on" in _texts(at)
    sso = AppTest.from_file(MAIN, default_timeout=60)
    sso.user = {"is_logged_in": True, "email": "kim@hospital.example"}
    sso.run()
    assert "Signed in as **kim\\@hospital\\.example** (annotator)" in [m.value for m in sso.sidebar.markdown]
    assert sso.title[0].value == "Overview"  # no password change asked
