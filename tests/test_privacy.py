"""Patient data stays in (issue 12, items 6-10): exports without patient ids or identifying file names
by default, the pseudonymisation salt never on a command line or in a job file, the store's password
masked, the UI on 127.0.0.1 from any folder, annotator names normalised and shown as plain text."""

from __future__ import annotations

import csv
import json
import os
import stat
import time
from pathlib import Path

import psutil
import pytest
from markdown_it import MarkdownIt
from PIL import Image as PILImage
from sqlalchemy import select
from streamlit.testing.v1 import AppTest

import app.jobs as jobs
import db.__main__ as db_cli
from db.engine import display_url, init_db, make_sessionmaker
from db.export import export_coco, export_training_mix, file_mapping
from db.importers import SALT_ENV, import_coco, pseudonymize
from db.models import Image, UserAccount
from db.people import annotator_name
from db.queue import take_lease
from tests.logins import TOKEN_KEY, session_token
from tests.streamlit_server import streamlit_server

ROOT = Path(__file__).resolve().parent.parent
MAIN = str(ROOT / "app" / "main.py")
SALT = "pepper-7f3a9c-not-in-any-file"
#: NIH-style file names: patient 32 and patient 1041.
NAMES = ["00000032_037.png", "00001041_000.png", "00001041_001.png"]
PATIENTS = ["32", "1041", "1041"]


def _coco(folder: Path) -> Path:
    """Three 24 px PNGs with NIH-style names and patient ids, one with a box; returns the COCO file."""
    folder.mkdir(parents=True, exist_ok=True)
    images = []
    for k, (name, patient) in enumerate(zip(NAMES, PATIENTS, strict=True), start=1):
        PILImage.new("L", (24, 24), 30 * k).save(folder / name)
        images.append({"id": k, "file_name": name, "width": 24, "height": 24, "patient_id": patient,
                       "split": "train", "granularity": "full" if k == 1 else "weak",
                       "image_labels": ["Nodule"] if k == 1 else ["No Finding"]})
    coco = {"images": images, "categories": [{"id": 1, "name": "Nodule"}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [2, 2, 8, 8], "area": 64, "iscrowd": 0}]}
    path = folder / "boxes.json"
    path.write_text(json.dumps(coco))
    return path


@pytest.fixture
def nih_store(tmp_path, monkeypatch):
    url = f"sqlite:///{tmp_path / 'workbench.db'}"
    monkeypatch.setenv("OXNET_DB_URL", url)
    monkeypatch.setenv("OXNET_DEMO", "0")
    with make_sessionmaker(init_db(url)).begin() as session:
        report = import_coco(session, _coco(tmp_path / "nih"))
        assert not report.errors, report.errors
    return url


def _identifying(text: str) -> list[str]:
    """The NIH file stems and patient ids found in ``text``."""
    return [s for s in [Path(n).stem for n in NAMES] + ['"patient_id"'] if s in text]


# --- 6. exports ----------------------------------------------------------------------------------


def test_export_leaves_patient_ids_and_identifying_file_names_out_by_default(nih_store):
    with make_sessionmaker(init_db(nih_store))() as session:
        data = export_coco(session)
        assert _identifying(json.dumps(data)) == []
        assert [i["file_name"] for i in data["images"]] == ["image-1.png", "image-2.png", "image-3.png"]
        assert len(data["annotations"]) == 1 and data["annotations"][0]["image_id"] == 1
        mapping = file_mapping(session, data)
        assert [(m["file_name"], Path(m["path"]).name) for m in mapping] == list(zip(
            ["image-1.png", "image-2.png", "image-3.png"], NAMES, strict=True))

        asked = export_coco(session, include_patient_ids=True)
        assert [i["patient_id"] for i in asked["images"]] == PATIENTS
        assert [Path(i["file_name"]).name for i in asked["images"]] == NAMES

        mix = export_training_mix(session)  # the trainer opens the files: real paths, but no patient ids
        assert [Path(i["file_name"]).name for i in mix["train"]["images"]] == NAMES
        assert all(Path(i["file_name"]).is_file() for i in mix["train"]["images"])
        assert '"patient_id"' not in json.dumps(mix)


def test_db_cli_exports_without_ids_unless_asked_and_writes_the_map_only_when_asked(nih_store, tmp_path, capsys):
    out = tmp_path / "out"
    assert db_cli.main(["export", "coco", str(out / "plain.json")]) == 0
    assert _identifying((out / "plain.json").read_text()) == []
    assert sorted(p.name for p in out.iterdir()) == ["plain.json"]

    assert db_cli.main(["export", "coco", str(out / "mapped.json"), "--file-map", str(out / "files.csv")]) == 0
    assert _identifying((out / "mapped.json").read_text()) == []
    rows = list(csv.DictReader((out / "files.csv").open()))
    assert [Path(r["path"]).name for r in rows] == NAMES and [r["file_name"] for r in rows] == ["image-1.png", "image-2.png", "image-3.png"]
    assert stat.S_IMODE((out / "files.csv").stat().st_mode) == 0o600

    assert db_cli.main(["export", "coco", str(out / "ids.json"), "--include-patient-ids"]) == 0
    assert [i["patient_id"] for i in json.loads((out / "ids.json").read_text())["images"]] == PATIENTS

    assert db_cli.main(["export", "mix", str(out / "mix")]) == 0
    train = (out / "mix" / "train.json").read_text()
    assert '"patient_id"' not in train and NAMES[0] in train


def test_jobs_export_without_ids_by_default(nih_store, tmp_path):
    status = tmp_path / "job.json"
    for args in ([], ["--include-patient-ids"]):
        status.write_text(json.dumps({"id": "x", "status": "running"}))
        assert jobs.main(["--status", str(status), "export", str(tmp_path / "e.json"), *args]) == 0
        text = (tmp_path / "e.json").read_text()
        assert (_identifying(text) == []) is (not args)


# --- 7. the salt ---------------------------------------------------------------------------------


def test_import_job_gets_the_salt_through_its_environment_only(tmp_path, monkeypatch):
    url = f"sqlite:///{tmp_path / 'workbench.db'}"
    monkeypatch.delenv(SALT_ENV, raising=False)
    coco = _coco(tmp_path / "nih")
    path = jobs.start_job("import", ["coco", str(coco), "--assign-splits"], url=url, secrets={SALT_ENV: SALT})
    pid = int(path.with_suffix(".pid").read_text())
    started = time.monotonic()
    while True:  # right after the fork the child still shows this process's command line: wait for its exec
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode()
        except FileNotFoundError:  # no /proc, or it already ended: psutil cannot tell either
            pytest.skip("the job ended before its command line could be read")
        if "app.jobs" in cmdline or time.monotonic() - started > 10:
            break
        time.sleep(0.01)
    assert "app.jobs" in cmdline and SALT not in cmdline
    deadline = time.monotonic() + 120
    while (job := jobs.read_job(path))["status"] == "running":
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert job["status"] == "done", job
    for file in jobs.jobs_dir(url).iterdir():
        assert SALT not in file.read_text(), file
        assert stat.S_IMODE(file.stat().st_mode) == 0o600, file
    with make_sessionmaker(init_db(url))() as session:  # the salt did reach the job
        stored = list(session.scalars(select(Image.patient_id).order_by(Image.id)))
    assert stored == [pseudonymize(p, SALT) for p in PATIENTS]


def test_db_cli_refuses_a_salt_on_the_command_line(tmp_path, monkeypatch, capsys):
    url = f"sqlite:///{tmp_path / 'workbench.db'}"
    coco = _coco(tmp_path / "nih")
    assert db_cli.main(["--db", url, "import", "coco", str(coco), "--pseudonymize-salt", SALT]) == 2
    assert SALT_ENV in capsys.readouterr().err
    with make_sessionmaker(init_db(url))() as session:
        assert session.scalars(select(Image)).first() is None
    monkeypatch.setenv(SALT_ENV, SALT)
    assert db_cli.main(["--db", url, "import", "coco", str(coco)]) == 0
    with make_sessionmaker(init_db(url))() as session:
        assert list(session.scalars(select(Image.patient_id).order_by(Image.id))) == [pseudonymize(p, SALT) for p in PATIENTS]


# --- 8. the password -----------------------------------------------------------------------------


def test_store_password_is_masked_in_display_url_db_init_and_the_sidebar(tmp_path, monkeypatch, capsys):
    secret_url = "postgresql+psycopg://oxnet:s3cr3t-pw@db.example/oxnet"
    assert "s3cr3t-pw" not in display_url(secret_url) and "oxnet:***@db.example" in display_url(secret_url)
    assert "s3cr3t" not in display_url("postgresql://u:s3cr3t@[bad")  # unparsable: nothing of it shown

    sqlite_url = f"sqlite:///{tmp_path / 'x.db'}"
    monkeypatch.setattr(db_cli, "init_db", lambda url: init_db(sqlite_url))
    assert db_cli.main(["--db", secret_url, "init"]) == 0
    printed = capsys.readouterr().out
    assert "s3cr3t-pw" not in printed and "oxnet:***@db.example" in printed

    monkeypatch.setenv("OXNET_DB_URL", secret_url)  # the sidebar shows it before the store is opened (and fails)
    monkeypatch.setenv("OXNET_DEMO", "0")
    at = AppTest.from_file(MAIN, default_timeout=60)
    at.run()
    shown = " ".join(str(e.value) for e in at.sidebar.caption)
    assert "oxnet:***@db.example" in shown
    everything = shown + " ".join(str(e.value) for e in [*at.markdown, *at.error, *at.exception])
    assert "s3cr3t-pw" not in everything


# --- 9. the listening address --------------------------------------------------------------------


def test_ui_started_from_another_folder_listens_on_loopback_only(tmp_path):
    port = 8621
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMLIT_")}
    env.update(OXNET_DB_URL=f"sqlite:///{tmp_path / 'workbench.db'}", OXNET_DEMO="0")
    # no --server.address: what the app's own config says, started from another folder
    with streamlit_server(MAIN, port=port, cwd=tmp_path, env=env, args=()) as process:
        server = psutil.Process(process.pid)
        listening = {c.laddr.ip for p in [server, *server.children(recursive=True)]
                     for c in p.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN and c.laddr.port == port}
        assert listening == {"127.0.0.1"}


@pytest.mark.parametrize("address", ["0.0.0.0", "", "192.168.1.5"])
def test_ui_on_a_non_loopback_address_shows_only_a_message(tmp_path, monkeypatch, address):
    from streamlit import config

    monkeypatch.setenv("OXNET_DB_URL", f"sqlite:///{tmp_path / 'workbench.db'}")
    monkeypatch.setenv("OXNET_DEMO", "0")
    config.set_option("server.address", address)  # the conftest fixture puts 127.0.0.1 back
    at = AppTest.from_file(MAIN, default_timeout=60)
    at.run()
    assert "not only on this machine" in at.error[0].value and not at.sidebar.caption and not at.title
    monkeypatch.setenv("OXNET_ALLOW_REMOTE", "1")
    at = AppTest.from_file(MAIN, default_timeout=60)
    at.run()
    assert not at.error and at.title


# --- 10. annotator names -------------------------------------------------------------------------


def test_annotator_names_are_normalised_in_one_place():
    assert annotator_name("  dr.\u00a0 lee \n") == "dr. lee"
    assert annotator_name("Jose\u0301") == "Jos\u00e9"  # NFC: one person, one name
    for bad, message in [("", "empty"), ("   ", "empty"), ("x" * 65, "at most 64"), ("dr\x1b[31mlee", "control"),
                         ("dr\u200blee", "control"), ("trainer", "reserved"), ("Trainer", "reserved"),
                         ("import:nih", "reserved"), ("dr:lee", "reserved")]:
        with pytest.raises(ValueError, match=message):
            annotator_name(bad)
    assert annotator_name("import:nih", person=False) == "import:nih"


def test_the_users_page_refuses_reserved_names_and_stores_the_normal_form(nih_store):
    """Names are no longer typed in the sidebar (accounts, issue 16): an admin adds them, by the same rules."""
    at = AppTest.from_file(MAIN, default_timeout=60)
    at.session_state[TOKEN_KEY] = session_token("dr.admin")
    at.run()
    assert not at.sidebar.text_input  # no typed identity
    at.switch_page("views/admin.py").run()
    at.text_input[0].input("trainer")
    at.button[0].click().run()
    assert "reserved" in at.error[0].value
    at.text_input[0].input("  Jose\u0301  ")
    at.button[0].click().run()
    assert not at.exception, at.exception
    with make_sessionmaker(init_db(nih_store))() as session:
        assert session.scalars(select(UserAccount.name).order_by(UserAccount.name)).all() == ["Jos\u00e9", "dr.admin"]


def test_another_annotators_name_is_shown_as_text_not_markdown(nih_store):
    evil = "[click me](http://evil.example) ![x](http://evil.example/p.png)"
    with make_sessionmaker(init_db(nih_store)).begin() as session:
        assert take_lease(session, 2, evil)
    at = AppTest.from_file(MAIN, default_timeout=60)
    at.session_state[TOKEN_KEY] = session_token("dr.test")
    at.run()
    at.switch_page("views/annotate.py")
    at.session_state["annotate_image_id"] = 2
    at.run()
    warning = next(w.value for w in at.warning if "is annotating this image too" in w.value)
    html = MarkdownIt("commonmark").render(warning)
    assert "<a " not in html and "<img" not in html
    assert "[click me](http://evil.example)" in html  # shown as typed


def test_an_unparsable_store_url_is_reported_without_its_password(tmp_path, monkeypatch, capsys):
    bad = "postgresql//oxnet:s3cr3t-pw@db.example/oxnet"  # no ":" after the scheme
    assert db_cli.main(["--db", bad, "stats"]) == 2
    err = capsys.readouterr().err
    assert "cannot parse the store URL" in err and "s3cr3t-pw" not in err
    monkeypatch.setenv("OXNET_DB_URL", bad)
    monkeypatch.setenv("OXNET_DEMO", "0")
    at = AppTest.from_file(MAIN, default_timeout=60)
    at.run()
    assert not at.exception and "Cannot parse the store URL" in at.error[0].value
    assert "s3cr3t-pw" not in " ".join(str(e.value) for e in [*at.error, *at.sidebar.caption])
