"""The project installed as a user installs it (``pip install .``, not editable) works away from the
checkout: the console scripts and ``python -m`` entry points start, the store migrates from the
package's own files, the trainer runs a round, and the UI's pages are in the package.

The test venv reuses this environment's dependencies through a ``.pth`` file (installing torch again
would take minutes); what it checks is the project's own package: its files and entry points."""

from __future__ import annotations

import os
import site
import subprocess
import sys
from pathlib import Path

import pytest

from tests.streamlit_server import streamlit_server
from tests.test_trainer import make_store

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow
#: Every console script of pyproject.toml and the module it runs (``python -m``), with a word its --help says.
SCRIPTS = {"oxnet": ("oxnet", "train"), "oxnet-trainer": ("app.trainer", "--preset"), "oxnet-db": ("db", "export"),
           "oxnet-sweep": ("app.sweep", "--full"), "oxnet-simulate": ("app.simulate", "--strategy"),
           "oxnet-bench": ("app.benchmarks", "train-step"), "oxnet-ui": ("app.serve", "streamlit run")}


def _run(command, *, cwd, env=None, timeout=300):
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def install_checkout(folder: Path, *, site_files: dict[str, str] | None = None) -> tuple[Path, Path]:
    """(venv, python): a new venv in ``folder`` with the checkout installed non-editable; its dependencies
    are this environment's (a .pth file points at its site-packages), plus ``site_files`` (name: text)
    written into the new venv's site-packages, e.g. a .pth that runs a module at start."""
    venv = folder / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    purelib = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], cwd=folder).stdout.strip())
    dependencies = [p for p in site.getsitepackages() if Path(p).is_dir()]
    (purelib / "outer.pth").write_text("\n".join(dependencies) + "\n")
    for name, text in (site_files or {}).items():
        (purelib / name).write_text(text)
    # This pip run for the new venv's interpreter (it leaves this environment's editable install alone:
    # outside that prefix); no build isolation: the build backend is this environment's setuptools.
    build = _run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-build-isolation",
                  "--no-index", str(ROOT)],
                 cwd=folder, timeout=600)
    assert build.returncode == 0, build.stdout + build.stderr
    return venv, python


@pytest.fixture(scope="module")
def venv(tmp_path_factory):
    """A new venv with the project installed non-editable from a copy of the checkout."""
    folder = tmp_path_factory.mktemp("installed")
    venv, _ = install_checkout(folder)
    for script in SCRIPTS:
        assert (venv / "bin" / script).is_file(), f"{script} was not installed"
    # ... and this environment still imports the project (pip did not uninstall it here).
    assert _run([sys.executable, "-c", "import app, db, oxnet"], cwd=folder).returncode == 0
    return venv


def _env(venv, **extra):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return {**env, "PATH": f"{venv / 'bin'}:{env.get('PATH', '')}", **extra}


def test_the_package_is_imported_from_the_install_not_the_checkout(venv, tmp_path):
    out = _run([str(venv / "bin" / "python"), "-c", "import app, db, oxnet; print(app.__file__, db.__file__, oxnet.__file__)"],
               cwd=tmp_path, env=_env(venv))
    assert out.returncode == 0, out.stderr
    assert all(str(venv) in path and str(ROOT) not in path for path in out.stdout.split()), out.stdout
    pages = Path(out.stdout.split()[0]).parent / "views"
    assert sorted(p.name for p in pages.glob("*.py")) == sorted(p.name for p in (ROOT / "app" / "views").glob("*.py"))


def test_store_and_trainer_entry_points_run_from_the_install(venv, tmp_path):
    url = make_store(tmp_path)
    env = _env(venv, OXNET_DB_URL=url)
    for command in (["oxnet-db", "stats"], [str(venv / "bin" / "python"), "-m", "db", "stats"]):
        out = _run(command, cwd=tmp_path, env=env)
        assert out.returncode == 0, out.stderr
        assert '"train"' in out.stdout and '"full"' in out.stdout, out.stdout
    fresh = _run(["oxnet-db", "--db", f"sqlite:///{tmp_path / 'fresh.db'}", "stats"], cwd=tmp_path, env=env)
    assert fresh.returncode == 2 and "no project 'default' in the store" in fresh.stderr, fresh.stderr
    assert (tmp_path / "fresh.db").is_file()  # migrated from the installed package's migrations
    help_ = _run(["oxnet", "--help"], cwd=tmp_path, env=env)
    assert help_.returncode == 0 and "train" in help_.stdout
    trainer = _run(["oxnet-trainer", "--preset", "tiny", "--max-rounds", "1", "--steps-per-epoch", "1", "--device", "cpu"],
                   cwd=tmp_path, env={**env, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert trainer.returncode == 0, trainer.stdout + trainer.stderr
    assert "round 1 done" in trainer.stderr, trainer.stderr[-2000:]
    module = _run([str(venv / "bin" / "python"), "-m", "app.trainer", "--stop"], cwd=tmp_path, env=env)
    assert module.returncode == 0 and "stop requested" in module.stdout, module.stderr


def test_every_console_script_and_its_module_start_from_the_install(venv, tmp_path):
    import tomllib

    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert set(declared) == set(SCRIPTS)
    for script, (module, word) in SCRIPTS.items():
        for command in ([script, "--help"], [str(venv / "bin" / "python"), "-m", module, "--help"]):
            out = _run(command, cwd=tmp_path, env=_env(venv), timeout=120)
            assert out.returncode == 0 and word in out.stdout, (command, out.stdout[-1000:], out.stderr[-2000:])


def test_the_ui_starts_from_the_install(venv, tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    main = _run([str(venv / "bin" / "python"), "-c", "import app, pathlib; print(pathlib.Path(app.__file__).parent / 'main.py')"],
                cwd=tmp_path, env=_env(venv)).stdout.strip()
    env = _env(venv, OXNET_DB_URL=f"sqlite:///{tmp_path / 'ui.db'}", OXNET_DEMO="0")
    with streamlit_server(main, port=port, cwd=tmp_path, env=env, python=venv / "bin" / "python", log=tmp_path / "ui.log"):
        pass  # it answered /_stcore/health from the installed files
