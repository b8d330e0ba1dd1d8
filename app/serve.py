"""Start the workbench UI with its secrets in place: ``python -m app.serve [streamlit options]`` (``oxnet-ui``).

Runs ``streamlit run app/main.py`` in this process after two things that must happen before the server
starts:

- the cookie secret (``server.cookieSecret``, which signs Streamlit's cookies, the ``st.login`` one
  included) comes from ``$OXNET_COOKIE_SECRET``, else from ``<data dir>/cookie_secret`` beside the store
  (made once per install with 32 random bytes, mode 0600), and reaches Streamlit in this process's
  environment (``STREAMLIT_SERVER_COOKIE_SECRET``): never on a command line, never in the repository;
- a store without users gets its first ``admin``, the one-time password printed here on stderr.

XSRF protection and the 127.0.0.1 address come from ``app/.streamlit/config.toml``; options given here
(``--server.port 8501``, ``--server.address 0.0.0.0`` behind a reverse proxy with ``OXNET_ALLOW_REMOTE=1``)
go to ``streamlit run``. A plain ``streamlit run app/main.py`` works too; its cookie secret is then a
random one per server start (logins of ``st.login`` do not survive a restart), and the first admin is
made on the first page view.
"""

from __future__ import annotations

import os
import secrets
import stat
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from sqlalchemy.exc import ArgumentError, SQLAlchemyError

from db.accounts import ensure_first_admin
from db.demo import data_dir
from db.engine import database_url, display_url, init_db, make_sessionmaker, store_error_message

#: Environment variable with the cookie secret (else the file :data:`COOKIE_FILE` in the data folder).
COOKIE_SECRET_ENV = "OXNET_COOKIE_SECRET"
#: Where Streamlit reads ``server.cookieSecret`` from the environment.
STREAMLIT_COOKIE_ENV = "STREAMLIT_SERVER_COOKIE_SECRET"
COOKIE_FILE = "cookie_secret"
MAIN = Path(__file__).resolve().parent / "main.py"


def cookie_secret(url: str | None = None, environ: Mapping[str, str] | None = None) -> str:
    """``$OXNET_COOKIE_SECRET``, else the store's ``<data dir>/cookie_secret`` (created once, mode 0600;
    a file others may read is made private again)."""
    environ = os.environ if environ is None else environ
    if environ.get(COOKIE_SECRET_ENV):
        return environ[COOKIE_SECRET_ENV]
    path = data_dir(url) / COOKIE_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        if stat.S_IMODE(path.stat().st_mode) & 0o077:
            os.chmod(path, 0o600)
        secret = path.read_text(encoding="utf-8").strip()
        if len(secret) < 32:
            raise ValueError(f"{path} holds no usable cookie secret (under 32 characters): delete it to make a new one") from None
        return secret
    secret = secrets.token_urlsafe(32)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(secret + "\n")
    return secret


def first_admin(url: str | None = None) -> None:
    """Make the first admin of a store without users and print its one-time password on stderr."""
    engine = init_db(url)
    try:
        with make_sessionmaker(engine).begin() as session:
            created = ensure_first_admin(session)
    finally:
        engine.dispose()
    if created is not None:
        name, password = created
        print(f"OXnet workbench: first start: created the user {name!r} with the "
              + ("password of $OXNET_ADMIN_PASSWORD" if password is None else f"one-time password {password}")
              + " (shown only here, once; it must be changed at the first login).", file=sys.stderr, flush=True)


USAGE = """usage: oxnet-ui [streamlit run options, e.g. --server.port 8502]

Starts the workbench UI: streamlit run app/main.py with the store's cookie secret (OXNET_COOKIE_SECRET
or a 0600 file beside the store). The first start creates the admin account and prints its one-time
password on stderr (or takes OXNET_ADMIN_PASSWORD). The store is OXNET_DB_URL (default
sqlite:///workbench.db)."""


def main(argv: Sequence[str] | None = None) -> int:
    """Set the cookie secret, make the first admin, then ``streamlit run app/main.py *argv``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["-h"], ["--help"]):  # the help touches no store (no admin account, no cookie secret)
        print(USAGE)
        return 0
    url = database_url()
    try:
        os.environ[STREAMLIT_COOKIE_ENV] = cookie_secret(url)
        first_admin(url)
    except (OSError, ValueError, SQLAlchemyError) as e:  # one sentence, not a traceback (and never the URL's password)
        message = None if isinstance(e, ArgumentError) else store_error_message(e, url)
        if message is None:
            message = f"cannot open the store {display_url(url)} ({type(e).__name__})" if isinstance(e, SQLAlchemyError) else str(e)
        print(f"oxnet-ui: error: {message}", file=sys.stderr)
        return 3
    from streamlit.web import cli

    sys.argv = ["streamlit", "run", str(MAIN), *argv]
    return cli.main()


if __name__ == "__main__":
    sys.exit(main())
