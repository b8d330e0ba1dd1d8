"""``python -m db``: import, split, stats, export, check, through the store named by OXNET_DB_URL."""

import json
import subprocess
import sys

import numpy as np
from PIL import Image as PILImage

from db.__main__ import main


def test_cli_round(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OXNET_DB_URL", f"sqlite:///{tmp_path / 'cli.db'}")
    images = tmp_path / "images"
    images.mkdir()
    for i in range(3):
        PILImage.fromarray(np.full((32, 40), i, np.uint8)).save(images / f"{i}.png")
    coco = {
        "images": [{"id": i, "file_name": f"{i}.png", "width": 40, "height": 32, "patient_id": i} for i in range(3)],
        "annotations": [{"id": 1, "image_id": 0, "category_id": 1, "bbox": [1, 1, 5, 5]}],
        "categories": [{"id": 1, "name": "Mass"}],
    }
    (tmp_path / "in.json").write_text(json.dumps(coco))
    (images / "notes.txt").write_text("x")

    assert main(["import", "coco", str(tmp_path / "in.json"), "--images", str(images), "--no-assign-splits"]) == 0
    assert main(["import", "folder", str(images), "--report", str(tmp_path / "report.json")]) == 1  # notes.txt
    report = json.loads((tmp_path / "report.json").read_text())
    assert len(report["skipped"]) == 3 and report["errors"][0][0].endswith("notes.txt")
    assert main(["split", "--fractions", "1", "0", "0"]) == 0
    capsys.readouterr()
    assert main(["stats"]) == 0
    overview = json.loads(capsys.readouterr().out)
    assert overview["total"] == 3 and overview["split"]["train"] == {"unlabeled": 2, "weak": 0, "full": 1}
    assert main(["export", "coco", str(tmp_path / "out.json"), "--granularity", "full", "--images-root", str(images),
                 "--include-patient-ids"]) == 0  # real file names are asked for
    out = json.loads((tmp_path / "out.json").read_text())
    assert [i["file_name"] for i in out["images"]] == ["0.png"] and out["annotations"][0]["bbox"] == [1, 1, 5, 5]
    assert main(["export", "mix", str(tmp_path / "mix")]) == 0
    assert len(json.loads((tmp_path / "mix" / "train.json").read_text())["images"]) == 3
    assert main(["check", "--recheck"]) == 0
    assert main(["--project", "nope", "stats"]) == 2
    assert "no project 'nope'" in capsys.readouterr().err


def test_cli_help_runs_as_a_module():
    result = subprocess.run([sys.executable, "-m", "db", "--help"], capture_output=True, text=True, check=True)
    assert "OXNET_DB_URL" in result.stdout and "import" in result.stdout and "export" in result.stdout


def test_cli_import_assigns_splits_by_patient_unless_told_otherwise(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OXNET_DB_URL", f"sqlite:///{tmp_path / 'cli.db'}")
    images = tmp_path / "images"
    images.mkdir()
    for i in range(4):
        PILImage.fromarray(np.full((8, 8), i, np.uint8)).save(images / f"{i}.png")
    coco = {"images": [{"id": i, "file_name": f"{i}.png", "width": 8, "height": 8, "patient_id": i // 2} for i in range(4)],
            "annotations": [], "categories": [{"id": 1, "name": "Mass"}]}
    (tmp_path / "in.json").write_text(json.dumps(coco))
    assert main(["import", "coco", str(tmp_path / "in.json"), "--images", str(images)]) == 0
    capsys.readouterr()
    assert main(["stats"]) == 0
    overview = json.loads(capsys.readouterr().out)
    assigned = sum(sum(counts.values()) for split, counts in overview["split"].items() if split in ("train", "val", "test"))
    assert assigned == 4
