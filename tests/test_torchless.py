"""The store's command line works where torch is not installed: a new venv with the project installed
(``pip install --no-deps``, non-editable) and every dependency but torch and torchvision.

Choice: the dependencies come from this environment's site-packages through a ``.pth`` file (as in
tests/test_installed.py; installing them from the index would take minutes), and torch is taken away
for real: a second ``.pth`` file imports ``_hide_torch``, which puts a meta-path finder first that
refuses ``torch*`` with ModuleNotFoundError, exactly what a venv without torch raises. The test checks
first that ``import torch`` fails there."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image as PILImage

from tests.test_installed import _env, _run, install_checkout

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow

HIDE_TORCH = '''"""Started by hide_torch.pth: this venv has no torch (tests/test_torchless.py)."""
import importlib.abc
import sys


class _NoTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0].startswith("torch"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


sys.meta_path.insert(0, _NoTorch())
'''


@pytest.fixture(scope="module")
def torchless(tmp_path_factory):
    """(venv, python): the project installed non-editable in a venv whose interpreter cannot import torch."""
    return install_checkout(tmp_path_factory.mktemp("torchless"),
                            site_files={"_hide_torch.py": HIDE_TORCH, "hide_torch.pth": "import _hide_torch\n"})


def _coco(folder: Path) -> Path:
    """Four 64 px PNGs: two with a box, one with image-level labels only, one without labels."""
    images = folder / "images"
    images.mkdir()
    for i in range(4):
        PILImage.new("L", (64, 64), color=40 * i).save(images / f"{i}.png")
    coco = {
        "categories": [{"id": 1, "name": "Mass"}, {"id": 2, "name": "Nodule"}],
        "images": [{"id": i + 1, "file_name": f"{i}.png", "width": 64, "height": 64, "patient_id": f"p{i}"} for i in range(4)],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [4, 4, 20, 20], "area": 400, "iscrowd": 0},
                        {"id": 2, "image_id": 2, "category_id": 2, "bbox": [8, 8, 10, 10], "area": 100, "iscrowd": 0}],
    }
    coco["images"][2]["image_labels"] = ["Nodule"]
    coco["images"][2]["granularity"] = "weak"
    coco["images"][3]["granularity"] = "unlabeled"
    for image in coco["images"][:2]:
        image["granularity"] = "full"
    path = folder / "boxes.json"
    path.write_text(json.dumps(coco))
    return path


def test_python_m_db_runs_without_torch(torchless, tmp_path):
    venv, python = torchless
    env = _env(venv, OXNET_DB_URL=f"sqlite:///{tmp_path / 'store.db'}")
    hidden = _run([str(python), "-c", "import torch"], cwd=tmp_path, env=env)
    assert hidden.returncode == 1 and "No module named 'torch'" in hidden.stderr, hidden.stderr
    where = _run([str(python), "-c", "import db; print(db.__file__)"], cwd=tmp_path, env=env)
    assert str(venv) in where.stdout, where.stdout  # the installed package, not the checkout

    for command in (["oxnet-db", "--help"], [str(python), "-m", "db", "--help"]):
        out = _run(command, cwd=tmp_path, env=env)
        assert out.returncode == 0 and "import" in out.stdout and "export" in out.stdout, out.stderr
    dataset = _coco(tmp_path)
    imported = _run([str(python), "-m", "db", "import", "coco", str(dataset), "--images", str(tmp_path / "images"),
                     "--no-assign-splits"], cwd=tmp_path, env=env)
    assert imported.returncode == 0, imported.stdout + imported.stderr
    split = _run([str(python), "-m", "db", "split", "--fractions", "0.5", "0.25", "0.25"], cwd=tmp_path, env=env)
    assert split.returncode == 0, split.stderr
    stats = _run([str(python), "-m", "db", "stats"], cwd=tmp_path, env=env)
    assert stats.returncode == 0, stats.stderr
    counts = json.loads(stats.stdout)
    assert counts["total"] == 4 and counts["granularity"] == {"full": 2, "weak": 1, "unlabeled": 1}, counts
    assert "unassigned" not in counts["split"], counts  # split assigned every image
    out = tmp_path / "out.json"
    exported = _run([str(python), "-m", "db", "export", "coco", str(out), "--granularity", "full"], cwd=tmp_path, env=env)
    assert exported.returncode == 0, exported.stderr
    assert len(json.loads(out.read_text())["images"]) == 2 and len(json.loads(out.read_text())["annotations"]) == 2
    mix = _run([str(python), "-m", "db", "export", "mix", str(tmp_path / "mix")], cwd=tmp_path, env=env)
    assert mix.returncode == 0 and (tmp_path / "mix" / "train.json").is_file(), mix.stderr
    check = _run([str(python), "-m", "db", "check", "--recheck"], cwd=tmp_path, env=env)
    assert check.returncode == 0, check.stdout + check.stderr
    # the trainer's store adapter and the UI's queries load without torch too
    adapter = _run([str(python), "-c", "import db.workbench, db.service, db.demo, app.trainer_control, oxnet.active.protocol"],
                   cwd=tmp_path, env=env)
    assert adapter.returncode == 0, adapter.stderr
