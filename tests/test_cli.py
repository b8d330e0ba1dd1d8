"""The oxnet command line, in-process: train -> eval -> predict on tiny data, errors, help."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from oxnet.training.checkpoint import load_checkpoint
from oxnet.cli import main
from oxnet.training.settings import DEFAULT_REPEAT_THRESHOLD
from tests.test_engine import CLASSES, write_coco


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("cli")
    return {
        "full": write_coco(folder, 4, kind="full", seed=1, first_id=1),
        "weak": write_coco(folder, 3, kind="weak", seed=2, first_id=101),
        "unlabeled": write_coco(folder, 2, kind="unlabeled", seed=3, first_id=201),
        "val": write_coco(folder, 3, kind="full", seed=4, first_id=301),
        "folder": folder,
    }


def run(capsys, *argv: str) -> dict:
    assert main(list(argv)) == 0
    return json.loads(capsys.readouterr().out)


def test_train_takes_group_norm_and_anchor_sizes_as_model_options_and_eval_reloads_them(files, tmp_path, capsys):
    out = tmp_path / "gn"
    run(capsys, "train", "--train", str(files["full"]), "--val", str(files["val"]), "--images", str(files["folder"]),
        "--method", "retinanet", "--preset", "tiny", "--image-size", "64", "--model-option", "backbone_norm=group",
        "--model-option", "anchor_sizes=(12, 24, 48)", "--model-option", "anchor_ratios=(0.5,1,2)",
        "--epochs", "1", "--steps-per-epoch", "1", "--batch-size", "1", "--device", "cpu", "--out", str(out), "--no-progress")
    config = load_checkpoint(out / "last.pt")["model_config"]
    assert config["backbone_norm"] == "group" and config["anchor_sizes"] == (12.0, 24.0, 48.0)
    assert config["anchor_ratios"] == (0.5, 1.0, 2.0)
    metrics = run(capsys, "eval", "--checkpoint", str(out / "last.pt"), "--data", str(files["val"]), "--device", "cpu")
    assert metrics["num_images"] == 3
    assert main(["train", "--train", str(files["full"]), "--val", str(files["val"]), "--preset", "tiny",
                 "--model-option", "anchor_sizes=(12,24)", "--out", str(tmp_path / "bad")]) == 1
    assert "anchor_sizes needs one size per pyramid level" in capsys.readouterr().err


def test_train_eval_predict_end_to_end(files, tmp_path, capsys):
    out = tmp_path / "run"
    summary = run(
        capsys, "train", "--train", str(files["full"]), "--weak", str(files["weak"]),
        "--unlabeled", str(files["unlabeled"]), "--val", str(files["val"]), "--images", str(files["folder"]),
        "--method", "oxnet", "--preset", "tiny", "--image-size", "64", "--model-option", "fpn_width=16",
        "--model-option", "score_thresh=0.0",
        "--epochs", "1", "--steps-per-epoch", "1", "--batch-size", "3", "--device", "cpu", "--out", str(out),
        "--no-progress",
    )
    assert summary["best_checkpoint"] == str(out / "best.pt") and summary["epochs"] == 1
    assert 0.0 <= summary["metrics"]["mAP"] <= 1.0
    state = load_checkpoint(out / "best.pt")
    assert state["classes"] == list(CLASSES)
    assert state["model_config"]["fpn_width"] == 16 and state["model_config"]["image_size"] == 64
    assert state["train_config"]["method"] == "oxnet" and state["teacher"] is not None

    metrics = run(capsys, "eval", "--checkpoint", str(out / "best.pt"), "--data", str(files["val"]), "--device", "cpu")
    assert metrics["num_images"] == 3 and metrics["num_gt_boxes"] > 0
    assert metrics["mAP"] == pytest.approx(summary["metrics"]["mAP"])  # the same model on the same images
    assert set(metrics["per_class_AP"]) == set(CLASSES)

    results, overlays = tmp_path / "results.json", tmp_path / "overlays"
    report = run(
        capsys, "predict", "--checkpoint", str(out / "best.pt"), "--data", str(files["unlabeled"]),
        "--weights", "teacher", "--out", str(results), "--overlays", str(overlays), "--score-threshold", "0",
    )
    detections = json.loads(results.read_text())
    assert report["images"] == 2 and report["detections"] == len(detections) > 0
    for d in detections:
        assert set(d) == {"image_id", "category_id", "bbox", "score"}
        assert d["image_id"] in (201, 202) and d["category_id"] in (1, 2)
        x, y, w, h = d["bbox"]
        assert 0 <= x and 0 <= y and x + w <= 96 + 1e-3 and y + h <= 80 + 1e-3  # original 96 x 80 pixels
    pictures = sorted(overlays.iterdir())
    assert [p.name for p in pictures] == ["unlabeled_201.png", "unlabeled_202.png"]
    with Image.open(pictures[0]) as picture:
        assert picture.mode == "RGB" and picture.size == (96, 80)


def test_predict_uses_the_data_files_category_ids(files, tmp_path, capsys):
    out = tmp_path / "run"
    run(
        capsys, "train", "--train", str(files["full"]), "--val", str(files["val"]), "--method", "retinanet",
        "--preset", "tiny", "--image-size", "64", "--model-option", "score_thresh=0.0", "--epochs", "1",
        "--steps-per-epoch", "1", "--batch-size", "2", "--device", "cpu", "--out", str(out), "--no-progress",
    )
    coco = json.loads(files["val"].read_text())
    for category in coco["categories"]:
        category["id"] += 10
    for annotation in coco["annotations"]:
        annotation["category_id"] += 10
    renumbered = files["folder"] / "renumbered.json"
    renumbered.write_text(json.dumps(coco))
    results = tmp_path / "results.json"
    run(capsys, "predict", "--checkpoint", str(out / "best.pt"), "--data", str(renumbered), "--out", str(results))
    detections = json.loads(results.read_text())  # score_thresh 0: the 100 best boxes per image
    assert detections and {d["category_id"] for d in detections} == {11, 12}


def test_clear_errors(files, tmp_path, capsys):
    missing = tmp_path / "missing.pt"
    assert main(["eval", "--checkpoint", str(missing), "--data", str(files["val"])]) == 1
    assert f"oxnet eval: error: checkpoint {missing} does not exist" in capsys.readouterr().err
    argv = ["train", "--train", str(files["full"]), "--val", str(files["weak"]), "--out", str(tmp_path / "r")]
    assert main(argv) == 1
    assert "evaluation needs fully labeled images" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--train", str(files["full"]), "--val", str(files["val"]), "--method", "yolo"])
    with pytest.raises(SystemExit):
        main(["train", "--train", str(files["full"]), "--val", str(files["val"]), "--proportions", "full=x"])
    assert main(["train", "--train", str(files["full"]), "--val", str(files["val"]), "--model-option", "dept=3"]) == 1
    assert "unknown ModelConfig fields ['dept']" in capsys.readouterr().err


def test_train_passes_the_schedule_and_class_balancing_options(files, tmp_path, capsys, monkeypatch):
    from oxnet.training.engine import History

    seen = []

    def fake_fit(train, val, config, **kwargs):
        seen.append(config)
        return History(out_dir=config.out_dir)

    monkeypatch.setattr("oxnet.training.engine.fit", fake_fit)
    base = ["train", "--train", str(files["full"]), "--val", str(files["val"]), "--out", str(tmp_path / "r")]
    run(capsys, *base)
    run(capsys, *base, "--warmup-steps", "100", "--schedule", "cosine", "--class-balanced")
    run(capsys, *base, "--repeat-threshold", "0.3")
    assert [(c.warmup_steps, c.schedule, c.repeat_threshold) for c in seen] == [
        (0, "plateau", None), (100, "cosine", DEFAULT_REPEAT_THRESHOLD), (0, "plateau", 0.3)]
    assert main([*base, "--warmup-steps", "-1"]) == 1
    assert "warmup_steps must be >= 0" in capsys.readouterr().err
    assert main([*base, "--repeat-threshold", "2"]) == 1
    assert "repeat_threshold must be in (0, 1]" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*base, "--schedule", "step"])


def test_demo_trains_both_methods_on_synthetic_data(tmp_path, capsys):
    report = run(
        capsys, "demo", "--images", "12", "--epochs", "2", "--steps-per-epoch", "1", "--device", "cpu",
        "--out", str(tmp_path),
    )
    assert report["data"] == {"full": 3, "weak": 4, "unlabeled": 2, "val": 3}
    for method in ("retinanet", "oxnet"):
        assert 0.0 <= report[method]["mAP"] <= 1.0 and report[method]["num_images"] == 3
    assert (tmp_path / "oxnet" / "pretrain_best.pt").is_file() and (tmp_path / "retinanet" / "best.pt").is_file()
    assert load_checkpoint(tmp_path / "oxnet" / "last.pt")["epoch"] == 2


def test_help_lists_the_commands(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for command in ("train", "eval", "predict", "demo", "torchrun"):
        assert command in text
