"""Accounts, roles, sessions and login throttling in the store (:mod:`db.accounts`, :mod:`db.roles`), on
SQLite and PostgreSQL: every write refuses a user without the role, sessions end on deactivation,
expiry and logout, passwords and tokens are never stored or logged in clear, names are stored verbatim,
failed logins are slowed down per name and per address (injected clock), and the first start makes an admin."""

from __future__ import annotations

import logging
from datetime import timedelta
from pathlib import Path

import pytest
from argon2 import PasswordHasher
from sqlalchemy import func, inspect, select, text

import db.accounts as accounts
from db.accounts import (
    ADDRESS_THROTTLE,
    USER_THROTTLE,
    WRONG_LOGIN,
    AccountError,
    activate,
    change_password,
    create_user,
    deactivate,
    ensure_first_admin,
    list_users,
    log_in,
    reset_password,
    revoke_session,
    session_ttl,
    session_user,
    set_role,
)
from db.drafts import delete_draft, save_draft
from db.engine import init_db, make_sessionmaker
from db.models import (
    Annotator,
    AuditEntry,
    Draft,
    Image,
    Lease,
    LoginAttempt,
    ModelStatus,
    Project,
    ReaderLease,
    Reading,
    Role,
    ServingModel,
    SuggestedAction,
    UserAccount,
    UserSession,
    utcnow,
)
from db.people import get_annotator
from db.projects import ensure_project
from db.queue import claim_next, release_lease, take_lease
from db.versions import create_model_version, finish_model_version, promote_model_version, set_serving_version, write_suggestions
from db.roles import PermissionDenied, require_role
from db.readers import (
    accept_read,
    merge_reads,
    reads,
    release_reader_lease,
    review_edit,
    save_read,
    set_readers_per_image,
    take_reader_lease,
)
from db.service import image_detail, save_annotation

PASSWORD = "correct horse battery"
PAYLOAD = {"findings": {"Nodule": "present"}, "no_finding": False, "complete": False, "boxes": [], "task": "x"}


@pytest.fixture(autouse=True)
def _cheap_hasher(monkeypatch):
    """argon2id with small parameters: the tests hash many passwords on 2 cores (the default costs ~0.3 s)."""
    monkeypatch.setattr(accounts, "HASHER", PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1))
    monkeypatch.setattr(accounts, "_DUMMY_HASH", None)


def _users(Session, **roles: str) -> None:
    """Users ``name=role`` with :data:`PASSWORD`, already past their first login."""
    with Session.begin() as s:
        for name, role in roles.items():
            create_user(s, name, role, password=PASSWORD)


# --- users and passwords -------------------------------------------------------------------------


def test_login_message_is_the_same_for_a_wrong_name_a_wrong_password_and_an_inactive_user(db_sessionmaker):
    Session = db_sessionmaker
    _users(Session, lee="annotator", kim="annotator")
    with Session.begin() as s:
        deactivate(s, "kim")
    for name, password in (("lee", "wrong password"), ("nobody", PASSWORD), ("kim", PASSWORD), ("", "")):
        with Session.begin() as s:
            result = log_in(s, name, password, address="10.0.0.1")
        assert (result.user, result.token, result.message) == (None, None, WRONG_LOGIN)
    with Session.begin() as s:
        result = log_in(s, "lee", PASSWORD, address="10.0.0.1")
    assert result.user.name == "lee" and result.user.role is Role.ANNOTATOR and result.token
    with Session() as s:
        assert s.scalars(select(UserAccount).where(UserAccount.name == "lee")).one().last_login_at is not None


@pytest.mark.parametrize("name", [
    "Robert'); DROP TABLE user_account;--",
    "x' OR '1'='1",
    "Zoë Ødegård 李小龙 \u263a",
    "%_\\ [admin]",
])
def test_sql_looking_and_unicode_names_are_stored_verbatim(db_sessionmaker, name):
    Session = db_sessionmaker
    _users(Session, **{name: "reviewer"})
    with Session.begin() as s:
        result = log_in(s, name, PASSWORD)
        assert result.user.name == name
        assert [u["name"] for u in list_users(s)] == [name]
        user = s.scalars(select(UserAccount)).one()
        assert user.name == name and user.annotator.name == name  # linked to the annotator row of that name
        take_lease(s, _image(s), name, actor=name)
    with Session() as s:
        assert s.execute(text("SELECT name FROM user_account")).scalar_one() == name
        assert s.scalars(select(Annotator.name).where(Annotator.kind == "human")).all() == [name]
        assert s.execute(select(func.count()).select_from(Lease)).scalar_one() == 1


def test_names_are_checked_and_unique_regardless_of_letter_case(db_sessionmaker):
    Session = db_sessionmaker
    _users(Session, **{"Dr.Lee": "annotator"})
    for bad, error in (("dr.lee", AccountError), ("trainer", ValueError), ("import:nih", ValueError), ("", ValueError),
                       ("x" * 65, ValueError)):
        with pytest.raises(error), Session.begin() as s:
            create_user(s, bad, "annotator")
    with pytest.raises(AccountError, match="at least"), Session.begin() as s:
        create_user(s, "dr.kim", "annotator", password="short")
    with pytest.raises(AccountError, match="unknown role"), Session.begin() as s:
        create_user(s, "dr.kim", "superuser")


def test_a_user_takes_over_the_annotator_row_of_their_name(db_sessionmaker):
    """Labels saved before accounts existed (typed name) stay this person's."""
    Session = db_sessionmaker
    with Session.begin() as s:
        old = get_annotator(s, "dr.lee").id
    _users(Session, **{"dr.lee": "annotator"})
    with Session() as s:
        assert s.scalars(select(UserAccount)).one().annotator_id == old


def test_passwords_and_tokens_are_never_stored_or_logged_in_clear(db_url, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)  # every logger, SQLAlchemy's statements and parameters included
    caplog.set_level(logging.DEBUG, logger="sqlalchemy.engine")
    engine = init_db(db_url)
    Session = make_sessionmaker(engine)
    secrets_seen = [PASSWORD, "n3w-passw0rd-xyz", "wr0ng-passw0rd"]
    with Session.begin() as s:
        one_time = create_user(s, "dr.lee", "annotator")
        admin_pw = create_user(s, "boss", "admin", password=PASSWORD)
        secrets_seen += [one_time, admin_pw]
    with Session.begin() as s:
        log_in(s, "dr.lee", "wr0ng-passw0rd", address="10.1.2.3")
        token = log_in(s, "dr.lee", one_time, address="10.1.2.3").token
        change_password(s, "dr.lee", one_time, "n3w-passw0rd-xyz", keep_token=token)
        secrets_seen.append(reset_password(s, "boss", actor=None))
        secrets_seen.append(token)
    assert any("user_account" in r.getMessage() for r in caplog.records)  # the statements were logged
    logged = "\n".join(r.getMessage() + " " + str(r.args) for r in caplog.records)
    for secret in secrets_seen:
        assert secret not in logged
    with Session() as s:
        hashes = s.scalars(select(UserAccount.password_hash)).all()
        assert all(h.startswith("$argon2id$") for h in hashes)
        stored = []
        for table in ("user_account", "user_session", "login_attempt", "audit_log", "annotator"):
            stored += [str(v) for row in s.execute(text(f"SELECT * FROM {table}")) for v in row]
    blob = "\n".join(stored)
    if engine.dialect.name == "sqlite":  # the file's bytes, the write-ahead log included
        engine.dispose()
        path = Path(db_url.removeprefix("sqlite:///"))
        blob += "".join(p.read_bytes().decode("latin-1") for p in path.parent.glob(path.name + "*"))
    for secret in secrets_seen:
        assert secret not in blob
    assert "10.1.2.3" not in blob  # login attempts keep a hash of the address, not the address
    engine.dispose()


def test_a_hash_made_with_older_parameters_is_rehashed_at_login(db_sessionmaker, monkeypatch):
    Session = db_sessionmaker
    _users(Session, lee="annotator")
    with Session() as s:
        before = s.scalars(select(UserAccount.password_hash)).one()
    assert "m=1024,t=1" in before
    monkeypatch.setattr(accounts, "HASHER", PasswordHasher(time_cost=2, memory_cost=2048, parallelism=1))
    with Session.begin() as s:
        assert log_in(s, "lee", PASSWORD).user is not None
    with Session() as s:
        after = s.scalars(select(UserAccount.password_hash)).one()
    assert "m=2048,t=2" in after
    with Session.begin() as s:
        assert log_in(s, "lee", PASSWORD).user is not None  # the new hash checks


# --- sessions ------------------------------------------------------------------------------------


def test_a_session_expires_ends_on_logout_deactivation_and_password_reset(db_sessionmaker):
    Session = db_sessionmaker
    _users(Session, lee="annotator", boss="admin")
    now = utcnow()
    with Session.begin() as s:
        token = log_in(s, "lee", PASSWORD, ttl=timedelta(hours=12), now=now).token
    with Session() as s:
        assert session_user(s, token, now=now + timedelta(hours=11)).name == "lee"
        assert session_user(s, token, now=now + timedelta(hours=12, seconds=1)) is None  # expired
        assert session_user(s, "not-a-token") is None and session_user(s, None) is None
        assert s.scalars(select(UserSession.token_sha256)).one() == accounts.token_digest(token) != token
    with Session.begin() as s:
        deactivate(s, "lee", actor="boss")
    with Session() as s:
        assert session_user(s, token) is None  # the next script run finds nobody
    with Session.begin() as s:
        activate(s, "lee", actor="boss")
    with Session() as s:
        assert session_user(s, token) is None  # deactivation revoked it for good
    with Session.begin() as s:
        token = log_in(s, "lee", PASSWORD).token
        assert revoke_session(s, token) and not revoke_session(s, token)
        assert session_user(s, token) is None
        token = log_in(s, "lee", PASSWORD).token
        one_time = reset_password(s, "lee", actor="boss")
        assert session_user(s, token) is None
        assert log_in(s, "lee", PASSWORD).message == WRONG_LOGIN
        assert log_in(s, "lee", one_time).user.must_change_password


def test_session_hours_come_from_the_environment(monkeypatch):
    monkeypatch.delenv("OXNET_SESSION_HOURS", raising=False)
    assert session_ttl() == timedelta(hours=12)
    monkeypatch.setenv("OXNET_SESSION_HOURS", "0.5")
    assert session_ttl() == timedelta(minutes=30)
    for bad in ("soon", "0", "-1", "100000"):
        monkeypatch.setenv("OXNET_SESSION_HOURS", bad)
        with pytest.raises(ValueError, match="OXNET_SESSION_HOURS"):
            session_ttl()


# --- throttling ----------------------------------------------------------------------------------


def test_failed_logins_of_a_name_are_slowed_down_exponentially(db_sessionmaker):
    Session = db_sessionmaker
    _users(Session, lee="annotator")
    now = utcnow()

    def attempt(password, at, address="10.0.0.9"):
        with Session.begin() as s:
            return log_in(s, "lee", password, address=address, now=at)

    for k in range(USER_THROTTLE.free):
        assert attempt("wrong", now + timedelta(seconds=k)).message == WRONG_LOGIN
    last = now + timedelta(seconds=USER_THROTTLE.free - 1)
    refused = attempt(PASSWORD, last + timedelta(seconds=0.5))  # right password, but too soon: not even checked
    assert refused.user is None and refused.retry_after == 1 and "wait 1 s" in refused.message
    assert WRONG_LOGIN not in refused.message
    t = last + timedelta(seconds=1.01)
    assert attempt("wrong", t).message == WRONG_LOGIN  # the 6th failure: now 2 s
    assert attempt(PASSWORD, t + timedelta(seconds=1.5)).retry_after == 1
    assert attempt(PASSWORD, t + timedelta(seconds=0.1), address="10.9.9.9").retry_after == 2  # per name, any address
    t += timedelta(seconds=2.01)
    assert attempt("wrong", t).message == WRONG_LOGIN  # the 7th: 4 s
    assert attempt(PASSWORD, t + timedelta(seconds=3.9)).retry_after == 1
    ok = attempt(PASSWORD, t + timedelta(seconds=4.01))
    assert ok.user is not None  # the wait is over and a success clears the count
    assert attempt("wrong", t + timedelta(seconds=4.1)).message == WRONG_LOGIN
    with Session() as s:
        keys = s.scalars(select(LoginAttempt.key)).all()
    assert keys and all(len(k) == 64 and "lee" not in k for k in keys)


def test_the_delay_is_capped_and_forgotten_after_the_window():
    assert [USER_THROTTLE.delay(n) for n in range(4, 9)] == [0, 1, 2, 4, 8]
    assert USER_THROTTLE.delay(100) == USER_THROTTLE.max_s == 900


def test_failed_logins_from_one_address_are_slowed_down_whatever_the_names(db_sessionmaker):
    Session = db_sessionmaker
    _users(Session, lee="annotator")
    now = utcnow()
    for k in range(ADDRESS_THROTTLE.free):  # a different name each time: no name reaches its own limit
        with Session.begin() as s:
            assert log_in(s, f"guess{k}", "x", address="192.0.2.7", now=now).message == WRONG_LOGIN
    with Session.begin() as s:
        assert log_in(s, "lee", PASSWORD, address="192.0.2.7", now=now).retry_after == 1
        assert log_in(s, "lee", PASSWORD, address="192.0.2.8", now=now).user is not None  # another address
        assert log_in(s, "lee", PASSWORD, address="192.0.2.7", now=now + ADDRESS_THROTTLE.window).user is not None


# --- first start ---------------------------------------------------------------------------------


def test_first_start_makes_an_admin_who_must_change_the_one_time_password(db_sessionmaker):
    Session = db_sessionmaker
    with Session.begin() as s:
        name, one_time = ensure_first_admin(s, environ={})
    assert name == "admin" and len(one_time) >= 20
    with Session.begin() as s:
        assert ensure_first_admin(s, environ={}) is None  # users exist: nothing made, nothing printed
        result = log_in(s, "admin", one_time)
        assert result.user.role is Role.ADMIN and result.user.must_change_password
        with pytest.raises(PermissionDenied, match="one-time password"):
            create_user(s, "dr.lee", "annotator", actor="admin")
        with pytest.raises(AccountError, match="current password"):
            change_password(s, "admin", "not it", "a-new-passw0rd")
        with pytest.raises(AccountError, match="differ"):
            change_password(s, "admin", one_time, one_time)
        change_password(s, "admin", one_time, "a-new-passw0rd", keep_token=result.token)
        assert session_user(s, result.token).must_change_password is False
        assert create_user(s, "dr.lee", "annotator", actor="admin")


def test_first_admin_password_from_the_environment(db_sessionmaker):
    Session = db_sessionmaker
    with Session.begin() as s:
        assert ensure_first_admin(s, environ={"OXNET_ADMIN_PASSWORD": PASSWORD}) == ("admin", None)
    with Session.begin() as s:
        assert log_in(s, "admin", PASSWORD).user.must_change_password


# --- roles ---------------------------------------------------------------------------------------


def test_roles_are_ordered_and_checked_in_the_store(db_sessionmaker):
    Session = db_sessionmaker
    _users(Session, ann="annotator", rev="reviewer", boss="admin")
    with Session.begin() as s:
        for name, allowed in (("ann", {"annotator"}), ("rev", {"annotator", "reviewer"}), ("boss", {"annotator", "reviewer", "admin"})):
            for role in Role:
                if role.value in allowed:
                    assert require_role(s, name, role).name == name
                else:
                    with pytest.raises(PermissionDenied, match=f"needs the {role.value} role"):
                        require_role(s, name, role, action="adjudicate")
        with pytest.raises(PermissionDenied, match="not an active user"):
            require_role(s, "nobody", "annotator")
        set_role(s, "ann", "reviewer", actor="boss")
        assert require_role(s, "ann", "reviewer")
        with pytest.raises(AccountError, match="last active admin"):
            set_role(s, "boss", "annotator", actor="boss")
        with pytest.raises(AccountError, match="yourself"):
            deactivate(s, "boss", actor="boss")
        with pytest.raises(AccountError, match="last active admin"):
            deactivate(s, "boss")
        set_role(s, "rev", "admin", actor="boss")
        deactivate(s, "boss", actor="rev")
        with pytest.raises(PermissionDenied):
            require_role(s, "boss", "annotator")
    with Session() as s:
        actions = s.scalars(select(AuditEntry.action).order_by(AuditEntry.id)).all()
    assert actions.count("user_create") == 3 and "user_role" in actions and "user_deactivate" in actions


# --- every write path refuses a user without the role -------------------------------------------


def _image(s, project_name: str | None = None) -> int:
    project = ensure_project(s) if project_name is None else ensure_project(s, project_name)
    image = Image(project_id=project.id, path=f"/x/{utcnow().timestamp()}.png", width=64, height=64, source="t")
    s.add(image)
    s.flush()
    return image.id


@pytest.fixture
def world(db_sessionmaker):
    """A project with two images, two ready model versions (the newer serving, with suggestions), and
    users of each role plus an inactive one and one still holding a one-time password."""
    Session = db_sessionmaker
    _users(Session, ann="annotator", rev="reviewer", boss="admin", gone="annotator")
    with Session.begin() as s:
        deactivate(s, "gone")
        create_user(s, "fresh", "admin")  # must change its one-time password
        images = [_image(s), _image(s)]
        versions = []
        for _ in range(2):
            version = create_model_version(s, config={})
            write_suggestions(s, version.id, [{"image_id": i, "action": SuggestedAction.ADD_LABELS, "score": 0.5,
                                               "reason": {}} for i in images])
            finish_model_version(s, version.id, status=ModelStatus.READY)
            versions.append(version.id)
        set_serving_version(s, versions[1], annotator="trainer", action="model_serve", kind="system")
        take_lease(s, images[1], "ann")  # for release_lease
        save_draft(s, images[1], "ann", PAYLOAD, base_version=1)  # for delete_draft
        # A project read by two readers per image: images[2] has both reads in (for the review writes),
        # images[3] none yet (for a reader's lease and read), and "ann" holds a reader lease of images[4].
        ensure_project(s, "review", classes=["Nodule"])
        set_readers_per_image(s, 2, annotator="boss", project="review")
        images += [_image(s, "review") for _ in range(3)]
        for reader in ("dr.a", "dr.b"):
            save_read(s, images[2], annotator=reader, present=["Nodule"], no_finding=False,
                      boxes=[("Nodule", 10.0, 10.0, 30.0, 30.0)], complete=True, expected_revision=0)
        take_reader_lease(s, images[4], "ann")  # for release_reader_lease
    return Session, images, versions


def _stop(s, actor, annotator):
    from db.workbench import request_stop

    request_stop(s, annotator=annotator, actor=actor)


#: (write, role it needs). Each is called as ``write(session, images, versions, actor, annotator)``.
WRITES = {
    "save_annotation": (lambda s, i, v, actor, who: save_annotation(
        s, i[0], present={"Nodule"}, no_finding=False, boxes=[], complete=False, annotator=who, expected_version=1,
        actor=actor), "annotator"),
    "save_draft": (lambda s, i, v, actor, who: save_draft(s, i[0], who, PAYLOAD, base_version=1, actor=actor), "annotator"),
    "delete_draft": (lambda s, i, v, actor, who: delete_draft(s, i[1], who, actor=actor), "annotator"),
    "take_lease": (lambda s, i, v, actor, who: take_lease(s, i[0], who, actor=actor), "annotator"),
    "release_lease": (lambda s, i, v, actor, who: release_lease(s, i[1], who, actor=actor), "annotator"),
    "take_reader_lease": (lambda s, i, v, actor, who: take_reader_lease(s, i[3], who, actor=actor), "annotator"),
    "release_reader_lease": (lambda s, i, v, actor, who: release_reader_lease(s, i[4], who, actor=actor), "annotator"),
    "save_read": (lambda s, i, v, actor, who: save_read(
        s, i[3], annotator=who, present=["Nodule"], no_finding=False, boxes=[], complete=False, expected_revision=0,
        actor=actor), "annotator"),
    "accept_read": (lambda s, i, v, actor, who: accept_read(
        s, i[2], read_id=reads(s, i[2])[0].id, reviewer=who, expected_version=image_detail(s, i[2]).version,
        actor=actor), "reviewer"),
    "merge_reads": (lambda s, i, v, actor, who: merge_reads(
        s, i[2], reviewer=who, expected_version=image_detail(s, i[2]).version, actor=actor), "reviewer"),
    "review_edit": (lambda s, i, v, actor, who: review_edit(
        s, i[2], reviewer=who, expected_version=image_detail(s, i[2]).version, present=["Nodule"], no_finding=False,
        boxes=[], complete=False, actor=actor), "reviewer"),
    "set_readers_per_image": (lambda s, i, v, actor, who: set_readers_per_image(s, 3, annotator=who, project="review",
                                                                                actor=actor), "admin"),
    "claim_next": (lambda s, i, v, actor, who: claim_next(s, "add image-level labels", annotator=who, actor=actor), "annotator"),
    "promote_model_version": (lambda s, i, v, actor, who: promote_model_version(s, v[0], annotator=who, actor=actor), "admin"),
    "set_serving_version": (lambda s, i, v, actor, who: set_serving_version(s, v[0], annotator=who, action="model_promote",
                                                                            actor=actor), "admin"),
    "request_stop": (lambda s, i, v, actor, who: _stop(s, actor, who), "admin"),
    "create_user": (lambda s, i, v, actor, who: create_user(s, "dr.new", "admin", actor=actor), "admin"),
    "set_role": (lambda s, i, v, actor, who: set_role(s, "rev", "admin", actor=actor), "admin"),
    "reset_password": (lambda s, i, v, actor, who: reset_password(s, "rev", actor=actor), "admin"),
    "deactivate": (lambda s, i, v, actor, who: deactivate(s, "rev", actor=actor), "admin"),
    "activate": (lambda s, i, v, actor, who: activate(s, "gone", actor=actor), "admin"),
}
#: Users below each role (or not allowed at all).
BELOW = {"annotator": ["gone", "fresh", "nobody"], "reviewer": ["ann", "gone", "fresh", "nobody"],
         "admin": ["ann", "rev", "gone", "fresh", "nobody"]}
#: A user of exactly the role the write needs (and the owner of the lease and draft for annotator writes).
ALLOWED = {"annotator": "ann", "reviewer": "rev", "admin": "boss"}


def _snapshot(Session) -> dict:
    """What any of the writes would change."""
    with Session() as s:
        return {
            "audit": s.execute(select(func.count()).select_from(AuditEntry)).scalar_one(),
            "leases": sorted((le.image_id, le.annotator_id, str(le.expires_at)) for le in s.scalars(select(Lease))),
            "reader_leases": sorted((le.image_id, le.annotator_id, str(le.expires_at))
                                    for le in s.scalars(select(ReaderLease))),
            "reads": sorted((r.image_id, r.annotator_id, r.revision) for r in s.scalars(select(Reading))),
            "readers_per_image": sorted((p.name, p.readers_per_image) for p in s.scalars(select(Project))),
            "drafts": sorted((d.image_id, d.annotator_id, str(d.payload)) for d in s.scalars(select(Draft))),
            "serving": [(r.model_version_id, r.annotator_id) for r in s.scalars(select(ServingModel))],
            "users": sorted((u["name"], u["role"], u["active"]) for u in list_users(s)),
            "hashes": sorted(s.scalars(select(UserAccount.password_hash))),
            "versions": sorted((i.id, i.version) for i in s.scalars(select(Image))),
        }


@pytest.mark.parametrize("write", sorted(WRITES))
def test_every_write_refuses_a_user_without_the_role_and_changes_nothing(world, write):
    Session, images, versions = world
    call, role = WRITES[write]
    before = _snapshot(Session)
    for actor in BELOW[role]:
        with pytest.raises(PermissionDenied) as refused, Session.begin() as s:
            call(s, images, versions, actor, actor)
        assert actor in str(refused.value)
        assert _snapshot(Session) == before, actor
    if write not in ("create_user", "set_role", "reset_password", "deactivate", "activate"):  # these record no name
        with pytest.raises(PermissionDenied, match="own name"), Session.begin() as s:  # nobody acts as another
            call(s, images, versions, ALLOWED[role], "rev" if role == "annotator" else "ann")
        assert _snapshot(Session) == before
    with Session.begin() as s:  # the role it needs is enough (the check refuses the right people only)
        call(s, images, versions, ALLOWED[role], ALLOWED[role])
    assert _snapshot(Session) != before or write in ("release_lease", "release_reader_lease")


def test_system_actors_are_not_checked(world):
    """The command line, the trainer and job processes pass ``actor=None`` (documented as trusted)."""
    Session, images, versions = world
    with Session.begin() as s:
        assert take_lease(s, images[0], "annotator7")  # e.g. the load test's processes
        promote_model_version(s, versions[0], annotator="cli")


@pytest.mark.parametrize("start", ["start_job", "start_demo_job", "start_trainer", "stop_trainer"])
def test_jobs_and_the_trainer_refuse_a_non_admin_before_starting_anything(db_url, start, monkeypatch, tmp_path):
    import app.jobs as jobs
    import app.trainer_control as trainer_control

    import types

    started = []

    def spawn(*args, **kwargs):
        started.append(args)
        return types.SimpleNamespace(pid=999_999_999)  # nothing really runs

    monkeypatch.setattr(jobs, "spawn", spawn)
    monkeypatch.setattr(trainer_control, "spawn", spawn)
    monkeypatch.chdir(tmp_path)  # a PostgreSQL store's data folder is ./workbench_data
    Session = make_sessionmaker(init_db(db_url))
    _users(Session, ann="annotator", rev="reviewer", boss="admin")
    calls = {
        "start_job": lambda actor: jobs.start_job("export", ["/tmp/x.json"], url=db_url, actor=actor),
        "start_demo_job": lambda actor: jobs.start_demo_job(db_url, actor=actor),
        "start_trainer": lambda actor: trainer_control.start_trainer(db_url, preset="cpu", actor=actor),
        "stop_trainer": lambda actor: trainer_control.stop_trainer("host:1", db_url, actor=actor),
    }
    for actor in ("ann", "rev", "nobody"):
        with pytest.raises(PermissionDenied, match="admin role|not an active user"):
            calls[start](actor)
    assert started == [] and not jobs.jobs_dir(jobs.absolute_url(db_url)).exists()
    assert not trainer_control.pid_file(jobs.absolute_url(db_url)).exists()
    calls[start]("boss")
    with Session() as s:
        entries = s.scalars(select(AuditEntry).where(AuditEntry.action.in_(
            ["job_start", "trainer_start", "trainer_kill"]))).all()
    assert [e.annotator.name for e in entries] == ["boss"]
    Session.kw["bind"].dispose()


def test_the_pages_pass_the_logged_in_user_to_every_write():
    """A static guard: every call in app/ of a checked write function names its ``actor`` (a page
    that forgot it would write as a trusted system actor)."""
    import ast

    # The pages' door (db.service) the pages call, the review writes (db.readers) the Review page calls,
    # and the checked writes themselves (app/auth.py's logout gives the lease back directly).
    checked = {"take_image", "leave_image", "next_image", "write_draft", "discard_draft", "save_from_draft", "promote",
               "stop_trainer_after_round", "release_image", "accept_read", "merge_reads", "set_readers_per_image",
               "save_annotation", "save_draft", "delete_draft", "take_lease", "release_lease", "claim_next",
               "promote_model_version", "set_serving_version", "request_stop", "start_job",
               "start_demo_job", "start_trainer", "stop_trainer", "create_user", "set_role", "reset_password",
               "deactivate", "activate"}
    root = Path(__file__).resolve().parent.parent / "app"
    missing, seen = [], set()
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call):
                name = getattr(node.func, "id", None) or getattr(node.func, "attr", None)
                if name == "_do" and node.args:  # the Users page's helper passes actor=who itself
                    name = getattr(node.args[0], "id", None)
                    seen.add(name)
                    continue
                if name in checked:
                    seen.add(name)
                    if (path.name in ("jobs.py", "trainer.py") or path.parent.name == "benchmarks"
                            or (path.name == "main.py" and name == "start_demo_job")):
                        continue  # the job module's wrappers, the trainer process, the benchmarks' set-up (app/benchmarks),
                        # the first-run demo: system actors
                    if not any(k.arg == "actor" for k in node.keywords):
                        missing.append(f"{path.relative_to(root)}:{node.lineno} {name}")
    assert missing == []
    assert {"take_image", "leave_image", "next_image", "write_draft", "discard_draft", "save_from_draft", "promote",
            "stop_trainer_after_round", "accept_read", "merge_reads", "set_readers_per_image", "release_lease",
            "start_job", "start_trainer", "stop_trainer", "create_user", "deactivate"} <= seen


def test_the_schema_has_the_account_tables(db_url):
    engine = init_db(db_url)
    tables = set(inspect(engine).get_table_names())
    engine.dispose()
    assert {"user_account", "user_session", "login_attempt"} <= tables


def test_the_command_line_manages_users_as_a_trusted_actor(db_url, capsys):
    """``python -m db users``: e.g. the way back in when the last admin lost the password."""
    import db.__main__ as db_cli

    assert db_cli.main(["--db", db_url, "users", "add", "dr.cli", "--role", "admin"]) == 0
    captured = capsys.readouterr()
    password = captured.err.rsplit(": ", 1)[1].strip()
    assert password not in captured.out and "done" in captured.out
    Session = make_sessionmaker(init_db(db_url))
    with Session.begin() as s:
        assert log_in(s, "dr.cli", password).user.must_change_password
    assert db_cli.main(["--db", db_url, "users", "reset-password", "dr.cli"]) == 0
    new = capsys.readouterr().err.rsplit(": ", 1)[1].strip()
    with Session.begin() as s:
        assert log_in(s, "dr.cli", password).message == WRONG_LOGIN and log_in(s, "dr.cli", new).user
    assert db_cli.main(["--db", db_url, "users", "set-role", "dr.cli", "--role", "reviewer"]) == 2  # the last admin
    assert "last active admin" in capsys.readouterr().err
    assert db_cli.main(["--db", db_url, "users", "list"]) == 0
    assert '"name": "dr.cli"' in capsys.readouterr().out
    assert db_cli.main(["--db", db_url, "users", "deactivate", "nobody"]) == 2
    Session.kw["bind"].dispose()
