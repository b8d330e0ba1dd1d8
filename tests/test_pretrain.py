"""In-domain pretraining (oxnet pretrain): SimSiam learns, the augmentations stay grayscale, the output is a
torchvision ResNet state_dict every preset takes (with its start recorded), a stopped run resumes after
its last finished epoch exactly as if never stopped, the command line works end to end, and the trainer
pretrains once before its first round and records the start."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torchvision.models import resnet18
from torchvision.transforms import v2
from torchvision.ops.misc import FrozenBatchNorm2d

from oxnet.cli import main as oxnet_main
from oxnet.data import records_from_coco
from oxnet.data.synthetic import write_coco
from oxnet.modeling.config import build_model
from oxnet.training.pretrain import (
    PretrainConfig, SimSiam, _Views, images_from_folder, images_from_records, masked_bce, pretrain, xray_augmentation,
)
from oxnet.training.settings import LR_FROM_SCRATCH, LR_PRETRAINED, TrainConfig

TINY = dict(depth=18, image_size=32, batch_size=2, device="cpu")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    """4 synthetic 64 px X-rays with image-level labels (a COCO file) in a folder."""
    folder = tmp_path_factory.mktemp("pretrain_data")
    files = write_coco(folder, 4, size=64, seed=5, splits={"weak": 1.0})
    return {"folder": folder / "images", "coco": files["weak"]}


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory) -> Path:
    """One finished run: 1 SimSiam epoch (2 steps) on the 4 images."""
    out = tmp_path_factory.mktemp("pretrain_run")
    result = pretrain(images_from_folder(data["folder"]), out, PretrainConfig(epochs=1, **TINY), progress=False)
    return result.weights


def _frozen(model) -> int:
    return sum(isinstance(m, FrozenBatchNorm2d) for m in model.backbone.modules())


# -- augmentations --------------------------------------------------------------------------------
def test_augmentation_keeps_one_channel_and_has_no_colour_operation():
    augment = xray_augmentation(48)
    image = torch.rand(1, 70, 60)
    for seed in range(5):
        torch.manual_seed(seed)
        view = augment(image)
        assert view.shape == (1, 48, 48) and view.dtype == torch.float32
        assert 0.0 <= view.min() and view.max() <= 1.0
    flat = []
    stack = list(augment.transforms)
    while stack:
        t = stack.pop()
        flat.append(t)
        stack.extend(getattr(t, "transforms", []))
    kinds = {type(t).__name__ for t in flat}
    assert not kinds & {"RandomGrayscale", "Grayscale", "RandomSolarize", "RandomChannelPermutation", "RandomPosterize",
                        "RandomEqualize", "RandomInvert"}, kinds
    for t in flat:
        if isinstance(t, v2.ColorJitter):
            assert t.saturation is None and t.hue is None  # brightness/contrast only
        if isinstance(t, v2.RandomRotation):
            assert max(abs(d) for d in t.degrees) <= 10
        if isinstance(t, v2.RandomResizedCrop):
            assert tuple(t.scale) == (0.5, 1.0)
    assert {"RandomResizedCrop", "RandomRotation", "RandomHorizontalFlip", "RandomGamma", "ColorJitter",
            "GaussianBlur"} <= kinds


def test_views_are_reproducible_per_seed_epoch_and_index(data):
    images = images_from_folder(data["folder"])
    views = _Views(images, xray_augmentation(32), views=2, seed=3)
    a0, a1 = views[1]
    b0, b1 = views[1]
    torch.testing.assert_close(a0, b0)
    torch.testing.assert_close(a1, b1)
    assert not torch.equal(a0, a1)  # two different views of one image
    views.epoch = 1
    assert not torch.equal(views[1][0], a0)


# -- learning -------------------------------------------------------------------------------------
def test_simsiam_loss_is_finite_and_decreases():
    from lightly.loss import NegativeCosineSimilarity

    torch.manual_seed(0)
    model, criterion = SimSiam(18), NegativeCosineSimilarity()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x0 = torch.rand(4, 1, 32, 32)
    x1 = (x0 + 0.05 * torch.randn_like(x0)).clamp(0, 1)
    losses = []
    for _ in range(12):
        z0, p0 = model(x0)
        z1, p1 = model(x1)
        loss = 0.5 * (criterion(z0, p1) + criterion(z1, p0))
        assert torch.isfinite(loss)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.2, losses


def test_masked_bce_matches_a_loop_and_ignores_not_assessed_classes():
    torch.manual_seed(0)
    logits, labels = torch.randn(3, 4), (torch.rand(3, 4) > 0.5).float()
    mask = torch.tensor([[1, 1, 0, 1], [0, 0, 0, 0], [1, 0, 1, 1]], dtype=torch.float32)
    terms = [torch.nn.functional.binary_cross_entropy_with_logits(logits[i, c], labels[i, c])
             for i in range(3) for c in range(4) if mask[i, c]]
    torch.testing.assert_close(masked_bce(logits, labels, mask), torch.stack(terms).mean())
    flipped = labels.clone()
    flipped[mask == 0] = 1 - flipped[mask == 0]
    torch.testing.assert_close(masked_bce(logits, flipped, mask), masked_bce(logits, labels, mask))
    assert masked_bce(logits, labels, torch.zeros(3, 4)).item() == 0.0


def test_label_stage_trains_on_the_labelled_images(data, tmp_path):
    records = records_from_coco(data["coco"], image_root=data["folder"])
    labelled = images_from_records(records, len(records.classes))
    assert len(labelled) == 4 and all(len(i.labels) == len(records.classes) for i in labelled)
    result = pretrain(images_from_records(records), tmp_path, PretrainConfig(epochs=1, label_epochs=2, **TINY),
                      labelled=labelled, classes=records.classes, progress=False)
    stages = [(h["stage"], h["epoch"]) for h in result.history]
    assert stages == [("ssl", 1), ("labels", 1), ("labels", 2)]
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in result.history)
    assert "image-level labels: 4 images, 9 classes, 2 epochs" in result.description
    with pytest.raises(ValueError, match="needs images with image-level labels"):
        pretrain(images_from_records(records), tmp_path / "x", PretrainConfig(epochs=1, label_epochs=1, **TINY),
                 progress=False)


# -- the output file ------------------------------------------------------------------------------
def test_weights_are_a_torchvision_resnet_state_dict(trained):
    state = torch.load(trained, weights_only=True)
    body = resnet18()
    missing, unexpected = body.load_state_dict(state, strict=False)
    assert sorted(missing) == ["fc.bias", "fc.weight"] and unexpected == []
    torch.testing.assert_close(body.layer3[1].conv2.weight, state["layer3.1.conv2.weight"])
    info = json.loads(Path(f"{trained}.json").read_text())
    assert info["format"] == "oxnet-backbone" and info["method"] == "simsiam" and info["images"] == 4
    assert info["freeze_bn"] is False and info["epochs"] == 1


@pytest.mark.parametrize("preset", ["tiny", "cpu", "paper"])
def test_every_preset_takes_the_file_and_records_the_start(trained, preset):
    state = torch.load(trained, weights_only=True)
    model = build_model(preset=preset, num_classes=3, weights=str(trained), **({"depth": 18} if preset == "paper" else {}))
    assert model.backbone_start == "weights file resnet18_simsiam.pth (self-supervised: simsiam, 4 images, 1 epoch)"
    assert _frozen(model) == 0  # the description's freeze_bn=False: BatchNorm trains
    torch.testing.assert_close(model.backbone.body["layer4"][0].conv1.weight, state["layer4.0.conv1.weight"])
    torch.testing.assert_close(model.backbone.body["bn1"].running_mean, state["bn1.running_mean"])
    frozen = build_model(preset=preset, num_classes=3, weights=str(trained), freeze_bn=True,
                         **({"depth": 18} if preset == "paper" else {}))
    assert _frozen(frozen) > 0 and frozen.backbone_start.endswith("(BatchNorm frozen)")


def test_a_self_supervised_start_takes_the_from_scratch_learning_rate(trained, tmp_path):
    assert TrainConfig(preset="tiny", model={"weights": str(trained)}).learning_rate() == LR_FROM_SCRATCH
    plain = tmp_path / "r18.pth"
    torch.save(resnet18().state_dict(), plain)
    assert TrainConfig(preset="tiny", model={"weights": str(plain)}).learning_rate() == LR_PRETRAINED


def test_freeze_bn_choice_is_recorded_and_followed(data, tmp_path):
    result = pretrain(images_from_folder(data["folder"]), tmp_path,
                      PretrainConfig(epochs=1, steps_per_epoch=1, freeze_bn=True, **TINY), progress=False)
    model = build_model(preset="tiny", num_classes=2, weights=str(result.weights))
    assert _frozen(model) > 0 and model.backbone_start.endswith("1 epoch) (BatchNorm frozen)")


def test_a_group_norm_backbone_is_pretrained_for_group_norm_detectors(data, tmp_path):
    result = pretrain(images_from_folder(data["folder"]), tmp_path,
                      PretrainConfig(epochs=1, steps_per_epoch=1, backbone_norm="group", **TINY), progress=False)
    state = torch.load(result.weights, weights_only=True)
    assert "layer1.0.bn1.weight" in state and not any(k.endswith("running_mean") for k in state)
    assert json.loads(Path(f"{result.weights}.json").read_text())["backbone_norm"] == "group"
    model = build_model(preset="tiny", num_classes=2, backbone_norm="group", weights=str(result.weights))
    assert model.backbone_start.endswith("1 epoch) (GroupNorm)")
    torch.testing.assert_close(model.backbone.body["layer1"][0].bn1.weight, state["layer1.0.bn1.weight"])
    with pytest.raises(ValueError, match="freeze_bn=True needs backbone_norm='batch'"):
        PretrainConfig(backbone_norm="group", freeze_bn=True)
    with pytest.raises(ValueError, match="backbone_norm must be one of"):
        PretrainConfig(backbone_norm="instance")


def test_a_broken_description_is_named(trained, tmp_path):
    copy = tmp_path / "w.pth"
    copy.write_bytes(trained.read_bytes())
    Path(f"{copy}.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"w\.pth\.json: the description of w\.pth cannot be read"):
        build_model(preset="tiny", num_classes=2, weights=str(copy))


# -- resume ---------------------------------------------------------------------------------------
def test_a_stopped_run_resumes_after_its_last_epoch_as_if_never_stopped(data, tmp_path):
    images = images_from_folder(data["folder"])
    config = PretrainConfig(epochs=2, **TINY)
    whole = pretrain(images, tmp_path / "whole", config, progress=False)

    stopped = pretrain(images, tmp_path / "part", config, progress=False, stop_after_epochs=1)
    assert not stopped.weights.exists() and [h["epoch"] for h in stopped.history] == [1]
    state = torch.load(tmp_path / "part" / "last.pt", weights_only=True)
    assert state["stage"] == "ssl" and state["epoch"] == 1
    assert state["optimizer"]["state"], "the SGD momentum buffers are saved"
    assert state["scheduler"]["last_epoch"] == 2  # 2 steps done

    steps = []
    resumed = pretrain(images, tmp_path / "part", config, progress=False, callback=steps.append)
    assert {s["epoch"] for s in steps} == {1}  # only the second epoch ran
    assert [h["epoch"] for h in resumed.history] == [1, 2]
    assert resumed.history[0] == stopped.history[0]
    for key in ("loss", "z_std"):
        assert resumed.history[1][key] == pytest.approx(whole.history[1][key], rel=1e-4, abs=1e-6)
    a, b = torch.load(whole.weights, weights_only=True), torch.load(resumed.weights, weights_only=True)
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-5, msg=name)
    again = pretrain(images, tmp_path / "part", config, progress=False, callback=steps.append)  # finished: no work
    assert len(steps) == 2 and again.weights == resumed.weights


def test_resume_refuses_other_settings_and_names_a_corrupt_state(data, tmp_path):
    images = images_from_folder(data["folder"])
    pretrain(images, tmp_path, PretrainConfig(epochs=2, **TINY), progress=False, stop_after_epochs=1)
    with pytest.raises(ValueError, match="was written with other settings"):
        pretrain(images, tmp_path, PretrainConfig(epochs=3, **TINY), progress=False)
    (tmp_path / "last.pt").write_bytes(b"truncated")
    with pytest.raises(ValueError, match="last.pt cannot be read"):
        pretrain(images, tmp_path, PretrainConfig(epochs=2, **TINY), progress=False)


def test_a_state_written_before_backbone_norm_existed_resumes(data, tmp_path):
    images = images_from_folder(data["folder"])
    config = PretrainConfig(epochs=2, steps_per_epoch=1, **TINY)
    pretrain(images, tmp_path, config, progress=False, stop_after_epochs=1)
    state = torch.load(tmp_path / "last.pt", weights_only=True)
    del state["config"]["backbone_norm"]
    torch.save(state, tmp_path / "last.pt")
    resumed = pretrain(images, tmp_path, config, progress=False)
    assert [h["epoch"] for h in resumed.history] == [1, 2]


def test_bad_input_is_refused_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        images_from_folder(tmp_path / "none")
    with pytest.raises(ValueError, match="holds no image file"):
        images_from_folder(tmp_path)
    with pytest.raises(ValueError, match="at least 2 images"):
        pretrain([], tmp_path, PretrainConfig(epochs=1, **TINY), progress=False)
    with pytest.raises(ValueError, match="batch_size must be >= 2"):
        PretrainConfig(batch_size=1)
    (tmp_path / "a.png").write_bytes(b"not a png")
    (tmp_path / "b.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="a.png"):
        pretrain(images_from_folder(tmp_path), tmp_path / "out", PretrainConfig(epochs=1, **TINY), progress=False)


# -- command line ---------------------------------------------------------------------------------
@pytest.mark.slow
def test_command_line_pretrains_and_train_starts_from_it(data, tmp_path, capsys):
    out = tmp_path / "pre"
    assert oxnet_main(["pretrain", "--images", str(data["folder"]), "--labels", str(data["coco"]), "--label-epochs", "1",
                       "--preset", "tiny", "--image-size", "32", "--epochs", "1", "--batch-size", "2", "--out", str(out),
                       "--device", "cpu", "--no-progress"]) == 0
    report = json.loads(capsys.readouterr().out)
    weights = Path(report["weights"])
    assert weights == out / "resnet18_simsiam.pth" and weights.is_file() and report["images"] == 4
    assert [h["stage"] for h in report["history"]] == ["ssl", "labels"]
    description = "self-supervised: simsiam, 4 images, 1 epoch; image-level labels: 4 images, 9 classes, 1 epoch"
    assert report["description"] == description
    assert oxnet_main(["train", "--train", str(data["coco"]), "--val", str(data["coco"]), "--images", str(data["folder"]),
                       "--method", "retinanet", "--preset", "tiny", "--image-size", "64", "--epochs", "1",
                       "--steps-per-epoch", "1", "--batch-size", "2", "--weights", str(weights), "--out",
                       str(tmp_path / "det"), "--device", "cpu", "--no-progress"]) == 0
    last = torch.load(tmp_path / "det" / "last.pt", weights_only=True)
    assert last["backbone_start"] == f"weights file resnet18_simsiam.pth ({description})"
    assert last["train_config"]["model"]["weights"] == str(weights)


def test_command_line_errors_are_one_line(tmp_path, capsys):
    assert oxnet_main(["pretrain", "--images", str(tmp_path / "none"), "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert "oxnet pretrain: error: image folder" in err and "Traceback" not in err
    assert oxnet_main(["pretrain", "--out", str(tmp_path / "o")]) == 1
    assert "give the images" in capsys.readouterr().err


# -- the trainer ----------------------------------------------------------------------------------
@pytest.mark.slow
def test_trainer_pretrains_once_and_every_round_starts_from_it(tmp_path):
    from db.workbench import SqlStore
    from oxnet.active.loop import Trainer
    from tests.test_trainer import SETTINGS, _versions, make_store

    url = make_store(tmp_path)
    settings = replace(SETTINGS, max_rounds=2, max_interval_s=0.0, ssl_epochs=1, ssl_batch_size=4)
    store = SqlStore.open(url)
    results = Trainer(store, settings).run()
    assert [r.status for r in results] == ["ready", "ready"], [r.error for r in results]
    folder = store.models_dir / "pretrain" / "resnet18-64px-ssl1-labels0-seed0"
    weights = folder / "resnet18_simsiam.pth"
    assert weights.is_file() and (folder / "last.pt").is_file()
    info = json.loads(Path(f"{weights}.json").read_text())
    train_images = info["images"]
    assert train_images == len(store.snapshot().train["images"]) > 0  # every training image, labels unused
    versions = _versions(url)
    expected = f"weights file resnet18_simsiam.pth (self-supervised: simsiam, {train_images} images, 1 epoch)"
    assert [v[5]["backbone_start"] for v in versions] == [expected] * 2
    assert versions[1][5]["warm_start"] == versions[0][4]
    assert versions[0][5]["train"]["model"]["weights"] == str(weights)
    mtime = weights.stat().st_mtime_ns
    more = Trainer(SqlStore.open(url), replace(settings, max_rounds=1)).run()
    assert more[0].status == "ready" and weights.stat().st_mtime_ns == mtime  # cached, not pretrained again


def test_trainer_settings_refuse_ssl_on_top_of_a_weights_file(tmp_path, capsys):
    from app.trainer import main as trainer_main
    from oxnet.active.loop import TRAINER_PRESETS

    with pytest.raises(ValueError, match="ssl_epochs pretrains the backbone itself"):
        replace(TRAINER_PRESETS["tiny"], model={"weights": "/x.pth"}, ssl_epochs=1)
    with pytest.raises(ValueError, match="batch_size must be >= 2"):
        replace(TRAINER_PRESETS["tiny"], ssl_epochs=1, ssl_batch_size=1)
    weights = tmp_path / "w.pth"
    torch.save(resnet18().state_dict(), weights)
    assert trainer_main(["--db", f"sqlite:///{tmp_path / 's.db'}", "--weights", str(weights), "--ssl-epochs", "1"]) == 2
    assert "ssl_epochs pretrains the backbone itself" in capsys.readouterr().err


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_pretraining_on_cuda_uses_amp_and_writes_cpu_weights(data, tmp_path):
    records = records_from_coco(data["coco"], image_root=data["folder"])
    result = pretrain(images_from_records(records), tmp_path,
                      PretrainConfig(epochs=1, label_epochs=1, **{**TINY, "device": "cuda"}),
                      labelled=images_from_records(records, len(records.classes)), classes=records.classes, progress=False)
    state = torch.load(tmp_path / "last.pt", weights_only=True)
    assert state["scaler"]["scale"] > 0  # AMP was on, by default on CUDA
    weights = torch.load(result.weights, weights_only=True)
    assert all(v.device.type == "cpu" for v in weights.values())
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in result.history)


def test_the_granularity_sweep_takes_the_weights_for_every_run(trained):
    from oxnet.experiments.sweep import build_parser, config_from_args

    args = build_parser().parse_args(["--dataset", "d.json", "--weights", str(trained)])
    config = config_from_args(args)
    assert config.train.model == {"weights": str(trained)}
    assert config.train.model_config(3).weights == str(trained)
    assert config_from_args(build_parser().parse_args(["--dataset", "d.json"])).train.model == {}


def test_a_run_stopped_in_the_label_stage_resumes_there(data, tmp_path):
    records = records_from_coco(data["coco"], image_root=data["folder"])
    images, labelled = images_from_records(records), images_from_records(records, len(records.classes))
    config = PretrainConfig(epochs=1, label_epochs=2, **TINY)
    kwargs = dict(labelled=labelled, classes=records.classes, progress=False)
    whole = pretrain(images, tmp_path / "whole", config, **kwargs)
    pretrain(images, tmp_path / "part", config, stop_after_epochs=2, **kwargs)
    state = torch.load(tmp_path / "part" / "last.pt", weights_only=True)
    assert (state["stage"], state["epoch"]) == ("labels", 1) and state["optimizer"]["state"]  # Adam moments kept
    steps = []
    resumed = pretrain(images, tmp_path / "part", config, callback=steps.append, **kwargs)
    assert {(s["stage"], s["epoch"]) for s in steps} == {("labels", 1)}
    assert [(h["stage"], h["epoch"]) for h in resumed.history] == [("ssl", 1), ("labels", 1), ("labels", 2)]
    assert resumed.history[-1]["loss"] == pytest.approx(whole.history[-1]["loss"], rel=1e-4)
    a, b = torch.load(whole.weights, weights_only=True), torch.load(resumed.weights, weights_only=True)
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-5, msg=name)
