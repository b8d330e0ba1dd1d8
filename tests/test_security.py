"""Server settings of issue 16: XSRF protection on, a cookie secret per install (0600 file beside the
store, or the environment) that reaches Streamlit through the environment only, loopback by default,
and ``python -m app.serve`` printing the first admin's one-time password on stderr."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
import time
import tomllib
import urllib.request
from pathlib import Path

import pytest

from app.serve import COOKIE_FILE, STREAMLIT_COOKIE_ENV, cookie_secret
from db.demo import data_dir
from tests.streamlit_server import free_port

ROOT = Path(__file__).resolve().parent.parent
#: Ports to try (the first free one serves): ten from ``$OXNET_TEST_PORT`` (default 8640).
FIRST_PORT = int(os.environ.get("OXNET_TEST_PORT", "8640"))
PORTS = range(FIRST_PORT, FIRST_PORT + 10)


def test_the_server_config_keeps_xsrf_protection_and_loopback_and_no_secret():
    config = tomllib.loads((ROOT / "app" / ".streamlit" / "config.toml").read_text())
    assert config["server"]["enableXsrfProtection"] is True
    assert config["server"]["address"] == "127.0.0.1"
    assert "cookieSecret" not in config["server"]  # per install, never in the repository
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    for name in tracked:
        if name.endswith((".toml", ".cfg", ".ini", ".env")):
            assert "cookieSecret" not in (ROOT / name).read_text(errors="replace").replace("\n#", ""), name


def test_the_cookie_secret_is_made_once_per_store_private_and_stable(tmp_path):
    url = f"sqlite:///{tmp_path / 'workbench.db'}"
    first = cookie_secret(url, environ={})
    path = data_dir(url) / COOKIE_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and len(first) >= 32
    assert cookie_secret(url, environ={}) == first  # stable: cookies survive a restart
    os.chmod(path, 0o644)
    assert cookie_secret(url, environ={}) == first and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert cookie_secret(url, environ={"OXNET_COOKIE_SECRET": "from-env-" + "x" * 32}).startswith("from-env-")
    other = f"sqlite:///{tmp_path / 'other' / 'workbench.db'}"
    assert cookie_secret(other, environ={}) != first
    path.write_text("short")
    with pytest.raises(ValueError, match="cookie secret"):
        cookie_secret(url, environ={})


def test_streamlit_takes_the_cookie_secret_from_the_environment():
    code = ("from streamlit import config; config.get_config_options(force_reparse=True); "
            "print(config.get_option('server.cookieSecret'))")
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, STREAMLIT_COOKIE_ENV: "s3cret-from-env"},
                         capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "s3cret-from-env"


def test_serve_hands_the_cookie_secret_to_streamlits_config_and_runs_main(tmp_path, monkeypatch, capsys):
    from streamlit import config
    from streamlit.web import cli

    import app.serve as serve

    url = f"sqlite:///{tmp_path / 'workbench.db'}"
    monkeypatch.setenv("OXNET_DB_URL", url)
    monkeypatch.delenv("OXNET_COOKIE_SECRET", raising=False)
    monkeypatch.setenv(STREAMLIT_COOKIE_ENV, "")  # recorded, so the value serve.main sets is undone afterwards
    monkeypatch.delenv(STREAMLIT_COOKIE_ENV)
    seen = {}

    def fake_main():  # what streamlit's own command line does first: parse the config
        config.get_config_options(force_reparse=True)
        seen["secret"], seen["argv"] = config.get_option("server.cookieSecret"), list(sys.argv)
        return 0

    monkeypatch.setattr(cli, "main", fake_main)
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    assert serve.main(["--server.port", "8641"]) == 0
    assert seen["secret"] == cookie_secret(url, environ={})
    assert seen["argv"] == ["streamlit", "run", str(ROOT / "app" / "main.py"), "--server.port", "8641"]
    assert "one-time password" in capsys.readouterr().err
    config.get_config_options(force_reparse=True)




@pytest.mark.slow
def test_serve_starts_streamlit_with_the_secret_in_its_environment_only(tmp_path):
    url = f"sqlite:///{tmp_path / 'workbench.db'}"
    port = free_port(PORTS)
    log = tmp_path / "serve.log"
    env = {**os.environ, "OXNET_DB_URL": url, "OXNET_DEMO": "0"}
    env.pop("OXNET_COOKIE_SECRET", None)
    with open(log, "wb") as out:
        process = subprocess.Popen([sys.executable, "-m", "app.serve", "--server.headless", "true", "--server.port", str(port),
                                    "--browser.gatherUsageStats", "false"], cwd=tmp_path, env=env, stdout=out,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=1).status == 200:
                    break
            except OSError:
                assert process.poll() is None and time.monotonic() < deadline, log.read_text()
                time.sleep(0.3)
        secret = (data_dir(url) / COOKIE_FILE).read_text().strip()
        cmdline = Path(f"/proc/{process.pid}/cmdline").read_bytes().decode()
        environ = Path(f"/proc/{process.pid}/environ").read_bytes().decode()
        assert secret not in cmdline and secret not in environ  # set inside the process: not even in /proc
        with socket.socket() as s:  # loopback only, as app/.streamlit/config.toml says
            addresses = {a[4][0] for a in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET)} - {"127.0.0.1"}
            for address in addresses:
                assert s.connect_ex((address, port)) != 0
        printed = log.read_text()
        assert "one-time password" in printed
    finally:
        os.killpg(process.pid, 15)
        process.wait(timeout=20)


def test_serve_says_in_one_line_when_the_store_cannot_be_opened(monkeypatch, capsys):
    import app.serve as serve

    monkeypatch.setenv("OXNET_DB_URL", "postgresql+psycopg://oxnet:s3cr3t-pw@127.0.0.1:1/oxnet")
    monkeypatch.setenv("OXNET_COOKIE_SECRET", "x" * 40)
    assert serve.main([]) == 3
    err = capsys.readouterr().err
    assert err.startswith("oxnet-ui: error:") and "s3cr3t-pw" not in err and "Traceback" not in err
