"""Which start the backbone has: random init, ImageNet weights (tried, with one clear warning when they
cannot be had), or a local torchvision ResNet state_dict; BatchNorm frozen only from pretrained weights;
the start is carried through checkpoints and warm starts into the store's model versions."""

from __future__ import annotations

import warnings
from dataclasses import replace

import pytest
import torch
from torchvision.models import resnet18
from torchvision.ops.misc import FrozenBatchNorm2d

from app.trainer import main as trainer_main
from db.workbench import SqlStore
from oxnet.training.checkpoint import model_from_state, save_checkpoint
from oxnet.modeling.backbone import bn_frozen
from oxnet.modeling.config import PRESETS, build_model
from oxnet.active.loop import Trainer
from oxnet.training.settings import LR_FROM_SCRATCH, LR_PRETRAINED, TrainConfig
from tests.test_trainer import SETTINGS, _versions, make_store


@pytest.fixture(scope="module")
def r18(tmp_path_factory):
    path = tmp_path_factory.mktemp("weights") / "r18.pth"
    torch.manual_seed(0)
    torch.save(resnet18().state_dict(), path)
    return path


def _frozen_layers(model) -> int:
    return sum(isinstance(m, FrozenBatchNorm2d) for m in model.backbone.modules())


def test_random_start_trains_batchnorm(r18):
    model = build_model(preset="tiny", num_classes=2)
    assert model.backbone_start == "random init" and _frozen_layers(model) == 0 and not bn_frozen(model.state_dict())


def test_local_weights_are_loaded_and_freeze_batchnorm(r18):
    model = build_model(preset="tiny", num_classes=2, weights=str(r18))
    assert model.backbone_start == "weights file r18.pth (BatchNorm frozen)"
    assert _frozen_layers(model) > 0 and bn_frozen(model.state_dict())
    expected = torch.load(r18, weights_only=True)["layer1.0.conv1.weight"]
    torch.testing.assert_close(model.backbone.body["layer1"][0].conv1.weight, expected)
    unfrozen = build_model(preset="tiny", num_classes=2, weights=str(r18), freeze_bn=False)
    assert unfrozen.backbone_start == "weights file r18.pth" and _frozen_layers(unfrozen) == 0


def test_bad_weights_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pth does not exist"):
        build_model(preset="tiny", num_classes=2, weights=str(tmp_path / "nope.pth"))
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pth cannot be read"):
        build_model(preset="tiny", num_classes=2, weights=str(tmp_path / "junk.pth"))
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="other.pth is not a ResNet-18 state_dict"):
        build_model(preset="tiny", num_classes=2, weights=str(tmp_path / "other.pth"))


def test_imagenet_unavailable_warns_once_and_trains_from_scratch(monkeypatch):
    from torchvision.models import ResNet18_Weights

    def offline(self, *args, **kwargs):
        raise OSError("no route to the weights server")

    monkeypatch.setattr(type(ResNet18_Weights.DEFAULT), "get_state_dict", offline)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = build_model(preset="tiny", num_classes=2, weights="imagenet")
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and "ImageNet weights for ResNet-18 are unavailable (OSError)" in messages[0]
    assert "weights='/path/to/resnet18.pth'" in messages[0]
    assert model.backbone_start == "random init: ImageNet weights unavailable (OSError)" and _frozen_layers(model) == 0


def test_imagenet_weights_when_they_can_be_had(monkeypatch):
    from torchvision.models import ResNet18_Weights

    torch.manual_seed(1)
    state = resnet18().state_dict()
    monkeypatch.setattr(type(ResNet18_Weights.DEFAULT), "get_state_dict", lambda self, *a, **k: state)
    model = build_model(preset="tiny", num_classes=2, weights="imagenet")
    assert model.backbone_start == "ImageNet weights (ResNet18_Weights.IMAGENET1K_V1) (BatchNorm frozen)"
    torch.testing.assert_close(model.backbone.body["conv1"].weight, state["conv1.weight"])


def test_paper_preset_tries_imagenet_and_picks_the_pretrained_lr():
    assert PRESETS["paper"].weights == "imagenet"
    assert TrainConfig(preset="paper").learning_rate() == LR_PRETRAINED
    assert TrainConfig(preset="paper", model={"weights": "random"}).learning_rate() == LR_FROM_SCRATCH
    assert TrainConfig(preset="cpu").learning_rate() == LR_FROM_SCRATCH


def test_frozen_model_round_trips_through_a_checkpoint(r18, tmp_path):
    model = build_model(preset="tiny", num_classes=2, weights=str(r18))
    state = {"format": "oxnet-checkpoint", "version": 1, "classes": ["a", "b"],
             "model_config": model.config.to_dict(), "student": model.state_dict(), "teacher": None}
    save_checkpoint(state, tmp_path / "m.pt")
    again = model_from_state(state)
    assert _frozen_layers(again) == _frozen_layers(model)
    for name, value in model.state_dict().items():
        torch.testing.assert_close(again.state_dict()[name], value, msg=name)


@pytest.mark.slow
def test_trainer_records_the_start_and_warm_starts_keep_it(r18, tmp_path):
    url = make_store(tmp_path)
    settings = replace(SETTINGS, max_rounds=2, max_interval_s=0.0, model={**SETTINGS.model, "weights": str(r18)})
    results = Trainer(SqlStore.open(url), settings).run()
    assert [r.status for r in results] == ["ready", "ready"], [r.error for r in results]
    versions = _versions(url)
    assert [v[5]["backbone_start"] for v in versions] == ["weights file r18.pth (BatchNorm frozen)"] * 2
    assert versions[1][5]["warm_start"] == versions[0][4]


def test_trainer_command_line_refuses_a_missing_weights_file(tmp_path, capsys):
    assert trainer_main(["--db", f"sqlite:///{tmp_path / 's.db'}", "--weights", str(tmp_path / "none.pth")]) == 2
    assert f"--weights {tmp_path / 'none.pth'}: no such file" in capsys.readouterr().err
