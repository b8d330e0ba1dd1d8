"""Training engine: train_one_round, fit (validation, checkpoints, resume, early stop), predict."""

from __future__ import annotations

import json
import logging
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from oxnet.training.checkpoint import load_checkpoint
from oxnet.data import OmniDataset, collate, records_from_coco
from oxnet.evaluation.predict import evaluate_model, ground_truth, predict
from oxnet.training.engine import Progress, fit, train_one_round
from oxnet.modeling.config import build_model
from oxnet.training.settings import METHODS, WARMUP_FACTOR, TrainConfig
from oxnet.modeling.teacher import MeanTeacher

CLASSES = ("Mass", "Nodule")


def write_coco(
    folder: Path, n: int, *, kind: str = "full", seed: int = 0, first_id: int = 1, size: tuple[int, int] = (80, 96)
) -> Path:
    """Tiny images (bright rectangles on noise, ``size`` = (height, width)) and a COCO file in ``folder``.
    ``kind``: "full" (boxes), "weak" (image_labels) or "unlabeled" (nothing)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    height, width = size
    images, annotations = [], []
    for i in range(n):
        image_id = first_id + i
        pixels = rng.normal(60, 12, size).clip(0, 255)
        labels = []
        for _ in range(int(rng.integers(1, 3))):
            w, h = (int(v) for v in rng.integers(14, 34, 2))
            x, y = int(rng.integers(0, width - w)), int(rng.integers(0, height - h))
            label = int(rng.integers(0, len(CLASSES)))
            pixels[y : y + h, x : x + w] = 200 if label == 0 else 140
            labels.append(label)
            annotations.append(
                {"id": len(annotations) + 1, "image_id": image_id, "category_id": label + 1, "bbox": [x, y, w, h]}
            )
        name = f"{kind}_{image_id}.png"
        Image.fromarray(pixels.astype(np.uint8)).save(folder / name)
        image = {"id": image_id, "file_name": name, "width": width, "height": height}
        if kind == "weak":
            image["image_labels"] = sorted({CLASSES[c] for c in labels})
        images.append(image)
    coco = {
        "images": images,
        "annotations": annotations if kind == "full" else [],
        "categories": [{"id": i + 1, "name": name} for i, name in enumerate(CLASSES)],
    }
    path = folder / f"{kind}_{first_id}.json"
    path.write_text(json.dumps(coco))
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    """4 full + 3 weak + 3 unlabeled training images and 3 full validation images."""
    folder = tmp_path_factory.mktemp("tiny")
    files = {
        "full": write_coco(folder, 4, kind="full", seed=1, first_id=1),
        "weak": write_coco(folder, 3, kind="weak", seed=2, first_id=101),
        "unlabeled": write_coco(folder, 3, kind="unlabeled", seed=3, first_id=201),
        "val": write_coco(folder, 3, kind="full", seed=4, first_id=301),
    }
    train = [r for key in ("full", "weak", "unlabeled") for r in records_from_coco(files[key], classes=CLASSES)]
    return {"files": files, "train": train, "val": records_from_coco(files["val"], classes=CLASSES), "folder": folder}


def tiny_config(tmp_path: Path, **changes) -> TrainConfig:
    options = dict(
        preset="tiny", model={"image_size": 64}, method="oxnet", epochs=1, batch_size=3,
        steps_per_epoch=1, out_dir=str(tmp_path / "run"), device="cpu",
    )
    return TrainConfig(**{**options, **changes})


def batches(records, n_batches: int, batch_size: int = 3, seed: int = 0):
    dataset = OmniDataset(records, num_classes=len(CLASSES), size=64, seed=seed)
    return [collate([dataset[(b * batch_size + i) % len(dataset)] for i in range(batch_size)]) for b in range(n_batches)]


# --------------------------------------------------------------------------------------------------
# train_one_round
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", sorted(METHODS))
def test_train_one_round_finite_losses_for_each_method(data, method):
    torch.manual_seed(0)
    flags = {k: v for k, v in METHODS[method].items() if k != "granularities"}
    model = build_model(preset="tiny", num_classes=2, image_size=64, **flags)
    teacher = MeanTeacher(model) if flags["sfl"] else None
    mixed = [data["train"][0], data["train"][4], data["train"][7]]  # full, weak, unlabeled
    before = [p.detach().clone() for p in model.parameters()]
    losses = train_one_round(
        model, torch.optim.Adam(model.parameters(), 1e-3), batches(mixed, 2), device="cpu", teacher=teacher
    )
    assert set(losses) == {*model(*batches(mixed, 1)[0][::2]).keys(), "total"}
    assert all(math.isfinite(v) for v in losses.values())
    assert losses["classification"] > 0 and losses["bbox_regression"] > 0
    assert (losses["image_bce"] > 0) == flags["daa"]
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters())), "no parameter changed"
    if teacher is not None:
        assert int(teacher.ema_step) == 2
        assert any(not torch.equal(t, s) for t, s in zip(teacher.teacher.parameters(), model.parameters()))


def test_train_one_round_batch_missing_a_granularity(data):
    torch.manual_seed(0)
    model = build_model(preset="tiny", num_classes=2, image_size=64)
    teacher = MeanTeacher(model)
    weak_and_unlabeled = data["train"][4:10]  # no full image in the batch
    losses = train_one_round(
        model, torch.optim.Adam(model.parameters(), 1e-3), batches(weak_and_unlabeled, 1), device="cpu", teacher=teacher
    )
    assert all(math.isfinite(v) for v in losses.values())
    assert losses["classification"] == 0 and losses["bbox_regression"] == 0
    assert losses["image_bce"] > 0


def test_train_one_round_reports_steps(data):
    model = build_model(preset="tiny", num_classes=2, image_size=64, daa=False, gpa=False, sfl=False)
    seen = []
    losses = train_one_round(
        model, torch.optim.Adam(model.parameters(), 1e-3), batches(data["train"][:4], 2), device="cpu",
        on_step=lambda step, values: seen.append((step, values["total"])),
    )
    assert [s for s, _ in seen] == [0, 1]
    assert losses["total"] == pytest.approx(np.mean([v for _, v in seen]))


def test_train_one_round_non_finite_loss_raises_clear_error(data):
    model = build_model(preset="tiny", num_classes=2, image_size=64)
    with torch.no_grad():
        model.cls_head.out.bias.fill_(float("nan"))
    before = [p.detach().clone() for p in model.reg_head.parameters()]
    with pytest.raises(FloatingPointError, match=r"epoch 7, step 0: classification=nan.*image ids \[1, 2, 3\]"):
        train_one_round(
            model, torch.optim.Adam(model.parameters(), 1e-3), batches(data["train"][:4], 1), device="cpu", epoch=7
        )
    assert all(torch.equal(a, b) for a, b in zip(before, model.reg_head.parameters())), "stepped on a NaN loss"


def test_train_one_round_empty_loader(data):
    model = build_model(preset="tiny", num_classes=2, image_size=64)
    with pytest.raises(ValueError, match="no batch"):
        train_one_round(model, torch.optim.Adam(model.parameters()), [], device="cpu")


# --------------------------------------------------------------------------------------------------
# predict / evaluate
# --------------------------------------------------------------------------------------------------
def test_predict_maps_boxes_to_original_pixels(data):
    model = build_model(preset="tiny", num_classes=2, image_size=64, score_thresh=0.0)
    records = data["val"]
    predictions = predict(model, records, batch_size=2, category_ids=[7, 9])
    assert [p["image_id"] for p in predictions] == [r.image_id for r in records]
    # The same forward pass by hand, scaled from 64x64 to 96 (wide) x 80 (high).
    images, _, _ = collate([OmniDataset(records, num_classes=2, size=64, train=False)[0]])
    expected = model.eval()(images)[0]
    first = predictions[0]
    assert len(first["boxes"]) > 0
    torch.testing.assert_close(first["boxes"], expected["boxes"] * torch.tensor([96 / 64, 80 / 64] * 2))
    assert set(first["labels"].tolist()) <= {7, 9}
    assert first["image_probs"].shape == (2,) and first["attention"].shape[0] == 2
    assert first["boxes"][:, 2].max() <= 96 and first["boxes"][:, 3].max() <= 80


def test_ground_truth_is_in_original_pixels_and_rejects_weak_records(data):
    truth = ground_truth(data["val"], CLASSES)
    coco = json.loads(data["files"]["val"].read_text())
    assert [a["bbox"] for a in truth["annotations"]] == [a["bbox"] for a in coco["annotations"]]
    assert [a["category_id"] for a in truth["annotations"]] == [a["category_id"] for a in coco["annotations"]]
    with pytest.raises(ValueError, match=r"weak_101.png \(image id 101\) is weak"):
        ground_truth(data["train"][4:5], CLASSES)


def test_evaluate_model_perfect_when_predictions_are_the_truth(data, monkeypatch):
    """evaluate_model's plumbing (orig pixels, category ids) gives mAP 1 for a model that outputs the
    ground truth scaled to its input size."""
    model = build_model(preset="tiny", num_classes=2, image_size=64)
    records = data["val"]
    by_size = {}
    for r in records:
        scale = torch.tensor([64 / r.width, 64 / r.height] * 2)
        by_size[r.image_id] = {
            "boxes": torch.from_numpy(r.boxes) * scale, "scores": torch.ones(len(r.boxes)),
            "labels": torch.from_numpy(r.labels), "image_probs": torch.full((2,), 0.5),
            "attention": torch.zeros(2, 2, 2),
        }
    order = iter([r.image_id for r in records])
    monkeypatch.setattr(type(model), "predict", lambda self, images: [by_size[next(order)] for _ in images])
    metrics = evaluate_model(model, records, CLASSES, batch_size=2)
    assert metrics["mAP"] == pytest.approx(1.0)
    assert metrics["num_gt_boxes"] == sum(len(r.boxes) for r in records)


# --------------------------------------------------------------------------------------------------
# fit
# --------------------------------------------------------------------------------------------------
def test_fit_pretrains_then_trains_validates_and_checkpoints(data, tmp_path, caplog):
    events: list[Progress] = []
    config = tiny_config(tmp_path, epochs=2, pretrain_epochs=1, early_stop_patience=None)
    with caplog.at_level(logging.INFO, logger="oxnet.training.engine"):
        history = fit(data["train"], data["val"], config, classes=CLASSES, callback=events.append, progress=False)
    assert [(e["epoch"], e["phase"]) for e in history.epochs] == [(0, "pretrain"), (1, "train"), (2, "train")]
    for e in history.epochs:
        assert 0.0 <= e["metrics"]["mAP"] <= 1.0 and e["lr"] == pytest.approx(1e-4) and e["seconds"] > 0
        assert all(math.isfinite(v) for v in e["losses"].values())
    assert history.epochs[0]["losses"]["image_bce"] == 0.0  # the pretraining is plain RetinaNet
    assert history.epochs[1]["losses"]["image_bce"] > 0.0
    assert "method 'retinanet' cannot learn from weak images: 3 weak training images are left out" in caplog.text
    assert "method 'oxnet' trains on 4 full, 3 weak, 3 unlabeled" in caplog.text
    run = Path(config.out_dir)
    assert {p.name for p in run.iterdir()} == {"last.pt", "best.pt", "pretrain_best.pt"}
    last = load_checkpoint(run / "last.pt")
    assert last["epoch"] == 3 and last["phase"] == "train" and last["teacher"] is not None
    assert last["history"]["epochs"] == history.epochs
    best = load_checkpoint(history.best_checkpoint)
    assert best["epoch"] == history.best_epoch + 1
    assert best["best_metric"] == history.best_metric
    # The main phase started from the pretrained RetinaNet: both loaded the same pretraining weights.
    pre = load_checkpoint(run / "pretrain_best.pt")
    assert pre["teacher"] is None and pre["model_config"]["daa"] is False
    steps = [e for e in events if e.kind == "step"]
    assert [e.global_step for e in steps] == [1, 2, 3]
    assert all(e.eta_s >= 0 for e in events)
    assert [e.epoch for e in events if e.kind == "epoch"] == [0, 1, 2]
    assert events[-1].metrics == history.epochs[-1]["metrics"] and events[-1].eta_s == 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fit_on_cuda_uses_amp_and_checkpoints_load_on_the_cpu(data, tmp_path):
    config = tiny_config(tmp_path, device="cuda", epochs=2, pretrain_epochs=1, early_stop_patience=None)
    history = fit(data["train"], data["val"], config, classes=CLASSES, progress=False)
    assert all(math.isfinite(v) for e in history.epochs for v in e["losses"].values())
    last = load_checkpoint(history.last_checkpoint)  # loads on the CPU
    assert last["scaler"] is not None and last["scaler"]["scale"] > 0  # AMP was on, by default on CUDA
    assert last["student"]["prototype_initialized"].any()


def test_fit_resumes_after_the_last_complete_epoch(data, tmp_path):
    config = tiny_config(tmp_path, method="daa_gpa", epochs=1, early_stop_patience=None)
    first = fit(data["train"], data["val"], config, classes=CLASSES, progress=False)
    saved = load_checkpoint(first.last_checkpoint)
    # "Killed" after epoch 1; restarted with more epochs: continues at epoch 2 from the saved state.
    config = tiny_config(tmp_path, method="daa_gpa", epochs=2, early_stop_patience=None)
    resumed = fit(data["train"], data["val"], config, classes=CLASSES, progress=False)
    assert [e["epoch"] for e in resumed.epochs] == [0, 1]
    assert resumed.epochs[0] == first.epochs[0]
    last = load_checkpoint(resumed.last_checkpoint)
    assert last["step"] == 2 and last["optimizer"]["state"][0]["step"] == 2
    assert not torch.equal(last["student"]["image_head.weight"], saved["student"]["image_head.weight"])
    # A finished run is not trained again.
    again = fit(data["train"], data["val"], config, classes=CLASSES, progress=False)
    assert again.epochs == resumed.epochs
    # Other settings in the same out_dir: a clear error instead of mixing runs.
    with pytest.raises(ValueError, match="last.pt belongs to a run with other settings \\(method differ"):
        fit(data["train"], data["val"], tiny_config(tmp_path, method="oxnet"), classes=CLASSES, progress=False)


def _flatten(value, prefix=""):
    """Nested dicts and lists as ``{"a.b.0": leaf}``, so each leaf gets its own tolerance."""
    if isinstance(value, dict):
        return {k: v for key, item in value.items() for k, v in _flatten(item, f"{prefix}{key}.").items()}
    if isinstance(value, (list, tuple)):
        return {k: v for i, item in enumerate(value) for k, v in _flatten(item, f"{prefix}{i}.").items()}
    return {prefix.rstrip("."): value}


def test_fit_resume_matches_an_uninterrupted_run(data, tmp_path):
    options = dict(method="sfl", epochs=2, early_stop_patience=None)
    straight = fit(data["train"], data["val"], tiny_config(tmp_path / "a", **options), classes=CLASSES, progress=False)
    fit(data["train"], data["val"], tiny_config(tmp_path / "b", **{**options, "epochs": 1}), classes=CLASSES,
        progress=False)
    resumed = fit(data["train"], data["val"], tiny_config(tmp_path / "b", **options), classes=CLASSES, progress=False)
    a, b = load_checkpoint(straight.last_checkpoint), load_checkpoint(resumed.last_checkpoint)
    for key in ("student", "teacher"):
        for name in a[key]:
            torch.testing.assert_close(a[key][name], b[key][name], msg=f"{key}.{name}")
    # Epoch by epoch, every loss and metric of the resumed run equals the uninterrupted run's.
    assert [e["epoch"] for e in resumed.epochs] == [e["epoch"] for e in straight.epochs] == [0, 1]
    for s, r in zip(straight.epochs, resumed.epochs, strict=True):
        assert s["losses"].keys() == r["losses"].keys(), f"epoch {s['epoch']}"
        assert s["losses"] == pytest.approx(r["losses"], rel=1e-5, abs=1e-7), f"epoch {s['epoch']} losses"
        flat_s, flat_r = _flatten(s["metrics"]), _flatten(r["metrics"])
        assert flat_s.keys() == flat_r.keys(), f"epoch {s['epoch']}"
        for key, value in flat_s.items():
            if isinstance(value, float):
                assert value == pytest.approx(flat_r[key], rel=1e-5, abs=1e-7), f"epoch {s['epoch']} metric {key}"
            else:
                assert value == flat_r[key], f"epoch {s['epoch']} metric {key}"
        assert s["lr"] == pytest.approx(r["lr"]), f"epoch {s['epoch']} lr"


def test_fit_plateau_lowers_lr_and_early_stop(data, tmp_path, monkeypatch):
    """With a constant validation mAP, the LR drops by 10 after the plateau patience and training
    stops after the early-stop patience."""
    import oxnet.training.engine as engine

    constant = {**engine.evaluate(ground_truth(data["val"], CLASSES), []), "mAP": 0.25}
    monkeypatch.setattr(engine, "evaluate", lambda *a, **k: constant)
    config = tiny_config(tmp_path, method="retinanet", epochs=6, plateau_patience=0, early_stop_patience=2)
    events: list[Progress] = []
    history = fit(data["train"], data["val"], config, classes=CLASSES, callback=events.append, progress=False)
    assert [e["lr"] for e in history.epochs] == pytest.approx([1e-4, 1e-4, 1e-5])
    assert [e.lr for e in events if e.kind == "step"] == pytest.approx([1e-4, 1e-4, 1e-5])
    assert history.stopped_early and history.best_epoch == 0 and history.best_metric == 0.25
    assert load_checkpoint(history.best_checkpoint)["epoch"] == 1
    # The stopped run stays stopped when restarted.
    assert fit(data["train"], data["val"], config, classes=CLASSES, progress=False).epochs == history.epochs


def _warmup_cosine_loop(lr, warmup, total):
    """Oracle: the learning rate of each step, one formula per step."""
    rates = []
    for step in range(total):
        if step < warmup:
            rates.append(lr * (WARMUP_FACTOR + (1 - WARMUP_FACTOR) * step / warmup))
        else:
            rates.append(lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup))))
    return rates


def _step_rates(config, total, *, epoch_length=None, metric=0.25):
    """Per-step learning rates of ``_lr_schedulers`` on a one-parameter Adam; the plateau scheduler (if
    any) gets a constant ``metric`` every ``epoch_length`` steps."""
    from oxnet.training.engine import _lr_schedulers

    optimizer = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=config.learning_rate())
    plateau, per_step = _lr_schedulers(optimizer, config, total)
    rates = []
    for step in range(total):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        if per_step is not None:
            per_step.step()
        if plateau is not None and epoch_length and (step + 1) % epoch_length == 0:
            plateau.step(metric)
    return rates, plateau, per_step


@pytest.mark.parametrize("warmup, total", [(0, 12), (3, 12), (5, 6), (8, 6), (1, 1)])
def test_warmup_and_cosine_follow_the_formula(warmup, total):
    config = TrainConfig(lr=1e-3, warmup_steps=warmup, schedule="cosine")
    rates, plateau, _ = _step_rates(config, total)
    assert plateau is None
    assert rates == pytest.approx(_warmup_cosine_loop(1e-3, warmup, total), rel=1e-9, abs=1e-15)


def test_warmup_with_plateau_warms_per_step_and_divides_per_epoch():
    """Epochs of 2 steps, a constant val mAP and patience 0: from the second epoch's end on, every epoch
    divides the rate by 10, also inside the 5-step warm-up."""
    config = TrainConfig(lr=1e-3, warmup_steps=5, plateau_patience=0)
    rates, _, _ = _step_rates(config, 8, epoch_length=2)
    warm = [min(1.0, WARMUP_FACTOR + (1 - WARMUP_FACTOR) * step / 5) for step in range(8)]
    divisions = [max(0, step // 2 - 1) for step in range(8)]  # plateau steps after epochs 1, 2, ... reduce
    assert rates == pytest.approx([1e-3 * w * 0.1**d for w, d in zip(warm, divisions)], rel=1e-9)


def test_default_schedule_is_the_plateau_alone():
    rates, plateau, per_step = _step_rates(TrainConfig(lr=1e-3, plateau_patience=0), 6, epoch_length=2)
    assert per_step is None and isinstance(plateau, torch.optim.lr_scheduler.ReduceLROnPlateau)
    assert rates == pytest.approx([1e-3, 1e-3, 1e-3, 1e-3, 1e-4, 1e-4])


def test_fit_resume_continues_the_warmup_and_cosine_schedule(data, tmp_path):
    """Warm-up over 4 steps (across the epoch boundary), cosine over the remaining 2 of 2 x 3 steps; a run
    killed after epoch 1 and resumed has the per-step rates of an uninterrupted run, and the formula's."""
    options = dict(method="retinanet", epochs=2, steps_per_epoch=3, warmup_steps=4, schedule="cosine",
                   early_stop_patience=None)

    class Killed(Exception):
        pass

    def step_rates(run, kill_after_epoch=None):
        events: list[Progress] = []

        def callback(event: Progress) -> None:
            events.append(event)
            if event.kind == "epoch" and event.epoch == kill_after_epoch:  # after last.pt is written
                raise Killed

        try:
            fit(data["train"], data["val"], tiny_config(run, **options), classes=CLASSES, callback=callback,
                progress=False)
        except Killed:
            pass
        return [e.lr for e in events if e.kind == "step"]

    straight = step_rates(tmp_path / "a")
    resumed = step_rates(tmp_path / "b", kill_after_epoch=0)
    assert len(resumed) == 3
    resumed += step_rates(tmp_path / "b")
    assert straight == pytest.approx(_warmup_cosine_loop(1e-4, 4, 6), rel=1e-9)
    assert resumed == pytest.approx(straight, rel=1e-12)
    last = load_checkpoint(tmp_path / "b" / "run" / "last.pt")
    assert last["scheduler"] is None and last["step_scheduler"]["last_epoch"] == 6
    assert [e["lr"] for e in last["history"]["epochs"]] == pytest.approx([straight[0], straight[3]])


def test_resume_refuses_another_schedule():
    from oxnet.training.engine import _check_resumable

    before = {k: v for k, v in TrainConfig().to_dict().items() if k not in ("schedule", "warmup_steps", "repeat_threshold")}
    _check_resumable({"train_config": before, "classes": CLASSES}, TrainConfig(), CLASSES, Path("last.pt"))
    with pytest.raises(ValueError, match=r"\(schedule, warmup_steps differ"):
        _check_resumable({"train_config": before, "classes": CLASSES}, TrainConfig(schedule="cosine", warmup_steps=5),
                         CLASSES, Path("last.pt"))
    cosine = TrainConfig(schedule="cosine", epochs=4)
    with pytest.raises(ValueError, match=r"\(epochs differ"):  # the cosine is laid out over the old length
        _check_resumable({"train_config": cosine.to_dict(), "classes": CLASSES}, replace(cosine, epochs=8), CLASSES,
                         Path("last.pt"))
    plateau = TrainConfig(epochs=4)  # a plateau run may be resumed with more epochs
    _check_resumable({"train_config": plateau.to_dict(), "classes": CLASSES}, replace(plateau, epochs=8), CLASSES,
                     Path("last.pt"))


def test_fit_class_balanced_sampling(data, tmp_path, caplog):
    config = tiny_config(tmp_path, method="daa", repeat_threshold=0.5)
    with caplog.at_level(logging.INFO, logger="oxnet.training.engine"):
        fit(data["train"], data["val"], config, classes=CLASSES, progress=False)
    assert "class-balanced sampling (threshold 0.5): repeat factors of the full images" in caplog.text
    assert "repeat factors of the weak images" in caplog.text


def test_fit_warm_start_uses_pretrained_lr_and_weights(data, tmp_path):
    first = fit(data["train"], data["val"], tiny_config(tmp_path / "a", method="retinanet"), classes=CLASSES,
                progress=False)
    config = tiny_config(tmp_path / "b", init_checkpoint=str(first.best_checkpoint))
    assert config.learning_rate() == 1e-5
    history = fit(data["train"], data["val"], config, classes=CLASSES, progress=False)
    assert history.epochs[0]["lr"] == 1e-5
    # Adam continues the warm start's moments (one step there + one here) at this run's learning rate.
    before, after = load_checkpoint(first.best_checkpoint)["optimizer"], load_checkpoint(history.last_checkpoint)["optimizer"]
    assert before["state"][0]["step"] == 1 and after["state"][0]["step"] == 2
    assert before["param_groups"][0]["lr"] == 1e-4 and after["param_groups"][0]["lr"] == 1e-5


def test_carry_moments_refuses_an_optimizer_state_that_does_not_fit():
    from oxnet.training.engine import _carry_moments

    small, large = torch.nn.Linear(2, 3), torch.nn.Linear(2, 4)
    stored = torch.optim.Adam(small.parameters(), lr=0.1)
    small(torch.ones(1, 2)).sum().backward()
    stored.step()
    fresh = torch.optim.Adam(large.parameters(), lr=0.5)
    assert not _carry_moments(fresh, stored.state_dict())
    assert not fresh.state and fresh.param_groups[0]["lr"] == 0.5
    same = torch.optim.Adam(torch.nn.Linear(2, 3).parameters(), lr=0.5, weight_decay=0.01)
    assert _carry_moments(same, stored.state_dict())
    assert same.param_groups[0]["lr"] == 0.5 and same.param_groups[0]["weight_decay"] == 0.01
    torch.testing.assert_close(same.state_dict()["state"][0]["exp_avg"], stored.state_dict()["state"][0]["exp_avg"])


def test_fit_rejects_bad_input(data, tmp_path):
    config = tiny_config(tmp_path)
    with pytest.raises(ValueError, match="evaluation needs fully labeled images"):
        fit(data["train"], data["train"], config, classes=CLASSES)
    with pytest.raises(ValueError, match="classes are required"):
        fit(data["train"], data["val"], config)
    unlabeled = data["train"][7:]
    with pytest.raises(ValueError, match="no training images that method 'retinanet' can use"):
        fit(unlabeled, data["val"], tiny_config(tmp_path, method="retinanet"), classes=CLASSES)


def test_train_config_validation():
    with pytest.raises(ValueError, match="method must be one of"):
        TrainConfig(method="yolo")
    with pytest.raises(ValueError, match="set by method="):
        TrainConfig(model={"daa": False})
    with pytest.raises(ValueError, match="unknown ModelConfig fields"):
        TrainConfig(model={"dept": 50})
    with pytest.raises(ValueError, match="proportions"):
        TrainConfig(proportions={"full": -1})
    with pytest.raises(ValueError, match="warmup_steps must be >= 0"):
        TrainConfig(warmup_steps=-1)
    with pytest.raises(ValueError, match="schedule must be one of"):
        TrainConfig(schedule="step")
    for bad in (0.0, 1.5, float("nan")):
        with pytest.raises(ValueError, match="repeat_threshold must be in"):
            TrainConfig(repeat_threshold=bad)
    config = TrainConfig(method="daa", model={"depth": 34})
    model_config = config.model_config(num_classes=3)
    assert (model_config.daa, model_config.gpa, model_config.sfl, model_config.depth) == (True, False, False, 34)
    assert TrainConfig.from_dict(config.to_dict()) == config
    assert config.learning_rate() == 1e-4 and TrainConfig(model={"weights": "imagenet"}).learning_rate() == 1e-5
