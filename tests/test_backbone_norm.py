"""GroupNorm in the backbone (ModelConfig.backbone_norm="group"): no BatchNorm left, each image normalised
by itself so training works at batch size 1, BatchNorm weights refused clearly, GroupNorm weights files
and checkpoints round trip, and older checkpoints (without the field) still load as BatchNorm."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torchvision.models import resnet18
from torchvision.ops.misc import FrozenBatchNorm2d

from oxnet.modeling.backbone import bn_frozen, state_norm
from oxnet.modeling.config import ModelConfig, build_model
from oxnet.training.checkpoint import model_from_state


def _count(model: nn.Module, kind: type) -> int:
    return sum(isinstance(m, kind) for m in model.backbone.modules())


def _full_target(num_classes: int = 2) -> dict:
    return {"granularity": "full", "boxes": torch.tensor([[10.0, 12.0, 50.0, 60.0]]), "labels": torch.tensor([1]),
            "image_labels": torch.tensor([0.0, 1.0][:num_classes])}


def test_group_norm_backbone_has_group_norm_and_no_batch_norm():
    model = build_model(preset="tiny", num_classes=2, backbone_norm="group")
    assert _count(model, nn.GroupNorm) > 0
    assert _count(model, nn.BatchNorm2d) == 0 and _count(model, FrozenBatchNorm2d) == 0
    assert all(m.num_groups == 32 for m in model.backbone.body.modules() if isinstance(m, nn.GroupNorm))
    assert model.backbone_start == "random init (GroupNorm)"
    assert not bn_frozen(model.state_dict()) and state_norm(model.backbone.body.state_dict()) == "group"
    default = build_model(preset="tiny", num_classes=2)
    assert default.config.backbone_norm == "batch" and _count(default, nn.BatchNorm2d) > 0 and _count(default, nn.GroupNorm) == 0


def test_group_norm_trains_at_batch_size_one_and_each_image_is_normalised_by_itself():
    torch.manual_seed(0)
    model = build_model(preset="tiny", num_classes=2, image_size=64, backbone_norm="group").train()
    images = torch.rand(2, 1, 64, 64)
    losses = model(images[:1], [_full_target()])
    total = sum(losses.values())
    assert torch.isfinite(total) and total > 0
    total.backward()
    grads = [p.grad for p in model.backbone.body.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert model.backbone.body["conv1"].weight.grad.abs().sum() > 0
    with torch.no_grad():  # train mode: GroupNorm's output for an image does not depend on its batch ...
        alone = model.backbone(model._batch(images[:1]))[1]
        batched = model.backbone(model._batch(images))[1][:1]
    torch.testing.assert_close(alone, batched, rtol=1e-4, atol=1e-5)
    bn = build_model(preset="tiny", num_classes=2, image_size=64).train()
    with torch.no_grad():  # ... BatchNorm's does (its batch statistics), which is why it fails at batch 1-2
        assert not torch.allclose(bn.backbone(bn._batch(images[:1]))[1], bn.backbone(bn._batch(images))[1][:1], atol=1e-3)


def test_bad_backbone_norm_settings_are_named():
    with pytest.raises(ValueError, match="backbone_norm must be one of .*'layer'"):
        ModelConfig(backbone_norm="layer")
    with pytest.raises(ValueError, match="freeze_bn=True needs backbone_norm='batch'"):
        ModelConfig(backbone_norm="group", freeze_bn=True)
    assert ModelConfig(backbone_norm="group", freeze_bn=False).freeze_bn is False  # nothing to freeze: allowed


def test_group_norm_refuses_imagenet_weights_without_fetching_them(monkeypatch):
    from torchvision.models import ResNet18_Weights

    def never(self, *args, **kwargs):
        raise AssertionError("the ImageNet weights must not be fetched")

    monkeypatch.setattr(type(ResNet18_Weights.DEFAULT), "get_state_dict", never)
    with pytest.raises(ValueError, match="backbone_norm='group' cannot start from weights='imagenet'.*running statistics"):
        build_model(preset="tiny", num_classes=2, backbone_norm="group", weights="imagenet")
    with pytest.raises(ValueError, match="backbone_norm='group' cannot start from weights='imagenet'"):
        build_model(preset="paper", num_classes=2, depth=18, backbone_norm="group")  # the paper preset's weights


def test_group_norm_refuses_a_batch_norm_weights_file(tmp_path):
    path = tmp_path / "r18_bn.pth"
    torch.save(resnet18().state_dict(), path)
    with pytest.raises(ValueError, match=r"r18_bn.pth are a BatchNorm \(it has running_mean keys\) state_dict.*"
                                         r"backbone_norm='group'.*use backbone_norm='batch'"):
        build_model(preset="tiny", num_classes=2, backbone_norm="group", weights=str(path))


def test_a_group_norm_weights_file_loads_into_another_model_and_not_into_batch_norm(tmp_path):
    torch.manual_seed(1)
    source = build_model(preset="tiny", num_classes=2, backbone_norm="group")
    with torch.no_grad():  # GroupNorm affine weights other than their init, so loading them shows
        for m in source.backbone.body.modules():
            if isinstance(m, nn.GroupNorm):
                m.weight.uniform_(0.5, 1.5)
    path = tmp_path / "r18_gn.pth"
    torch.save(source.backbone.body.state_dict(), path)
    assert state_norm(torch.load(path, weights_only=True)) == "group"
    target = build_model(preset="cpu", num_classes=3, backbone_norm="group", weights=str(path))
    assert target.backbone_start == "weights file r18_gn.pth (GroupNorm)"
    for name, value in source.backbone.body.state_dict().items():
        torch.testing.assert_close(target.backbone.body.state_dict()[name], value, msg=name)
    with pytest.raises(ValueError, match=r"r18_gn.pth are a GroupNorm \(it has no running_mean keys\) state_dict.*"
                                         r"use backbone_norm='group'"):
        build_model(preset="tiny", num_classes=2, weights=str(path))


def test_group_norm_model_round_trips_through_a_checkpoint_and_old_checkpoints_load():
    model = build_model(preset="tiny", num_classes=2, backbone_norm="group", anchor_sizes=(20.0, 40.0, 80.0))
    state = {"model_config": model.config.to_dict(), "student": model.state_dict()}
    again = model_from_state(state)
    assert again.config.backbone_norm == "group" and again.config.anchor_sizes == (20.0, 40.0, 80.0)
    assert _count(again, nn.GroupNorm) == _count(model, nn.GroupNorm) and _count(again, nn.BatchNorm2d) == 0
    for name, value in model.state_dict().items():
        torch.testing.assert_close(again.state_dict()[name], value, msg=name)
    old = build_model(preset="tiny", num_classes=2)
    config = old.config.to_dict()
    for new_field in ("backbone_norm", "anchor_sizes", "anchor_ratios"):  # a checkpoint from before these fields
        del config[new_field]
    loaded = model_from_state({"model_config": config, "student": old.state_dict()})
    assert loaded.config.backbone_norm == "batch" and _count(loaded, nn.BatchNorm2d) > 0
    torch.testing.assert_close(loaded.anchor_generator.cell_anchors[0], old.anchor_generator.cell_anchors[0])
