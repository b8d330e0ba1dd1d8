"""The ResNet-FPN backbone: torchvision's ResNet body and FeaturePyramidNetwork, pretrained weights
(ImageNet or a local state_dict), BatchNorm freezing, or GroupNorm in place of BatchNorm."""

from __future__ import annotations

import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any
from collections.abc import Mapping

import torch
from torch import Tensor, nn
from torchvision.models import resnet
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelP6P7
from torchvision.ops.misc import FrozenBatchNorm2d

from oxnet.modeling import weights_file
from oxnet.modeling.config import check_backbone_norm
from oxnet.modeling.heads import group_norm

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RESNETS = {18: resnet.resnet18, 34: resnet.resnet34, 50: resnet.resnet50, 101: resnet.resnet101}
_WEIGHTS = {
    18: resnet.ResNet18_Weights,
    34: resnet.ResNet34_Weights,
    50: resnet.ResNet50_Weights,
    101: resnet.ResNet101_Weights,
}



class ResNetFPN(nn.Module):
    """ResNet body + FPN. Returns the pyramid (list of Tensor[B, out_channels, H_l, W_l], finest first)
    and ReLU(C5) (Tensor[B, c5_channels, h, w]) for the image-level head.
    P6 and P7 are computed from C5 (original RetinaNet)."""

    #: Where the body's weights came from (set by :func:`resnet_fpn_backbone`).
    start: str

    def __init__(self, body: resnet.ResNet, levels: tuple[int, ...], out_channels: int) -> None:
        super().__init__()
        c_levels = [lvl for lvl in levels if lvl <= 5]
        return_layers = {f"layer{lvl - 1}": f"c{lvl}" for lvl in c_levels}
        return_layers["layer4"] = "c5"
        self.body = IntermediateLayerGetter(body, return_layers=return_layers)
        stage_channels = {lvl: body.inplanes // 2 ** (5 - lvl) for lvl in (2, 3, 4, 5)}
        self.c5_channels = stage_channels[5]
        self.c_names = [f"c{lvl}" for lvl in c_levels]
        extra = LastLevelP6P7(self.c5_channels, out_channels) if levels[-1] == 7 else None
        self.fpn = FeaturePyramidNetwork([stage_channels[lvl] for lvl in c_levels], out_channels, extra_blocks=extra)
        self.out_channels = out_channels

    def forward(self, x: Tensor) -> tuple[list[Tensor], Tensor]:
        c = self.body(x)
        pyramid = self.fpn(OrderedDict((name, c[name]) for name in self.c_names))
        return list(pyramid.values()), c["c5"]


def resnet_fpn_backbone(
    *, depth: int, levels: tuple[int, ...], out_channels: int, weights: str = "random", freeze_bn: bool | None = None,
    norm: str = "batch",
) -> ResNetFPN:
    """A ResNet-FPN backbone.

    Args:
        weights: "random", "imagenet" (torchvision's, from its cache or downloaded; when they cannot be
            had this warns in one line and carries on from random init) or a local torchvision ResNet
            state_dict path (``fc.*`` keys are ignored).
        freeze_bn: FrozenBatchNorm2d in the body; ``None`` freezes exactly when pretrained weights were
            loaded (frozen statistics from a random start would never be learnt).
        norm: the body's normalisation: "batch" (BatchNorm2d, frozen or not per ``freeze_bn``) or "group"
            (GroupNorm, 32 groups: it normalises each image by itself, so it trains at batch size 1 or 2,
            where BatchNorm's batch statistics are noise). GroupNorm has no running statistics, so it
            refuses ``freeze_bn=True`` and BatchNorm weights (ImageNet's, or a file with ``running_mean``
            keys); it starts from random init or from a GroupNorm state_dict (e.g. written by
            ``oxnet pretrain --backbone-norm group``). The norm of a file is read from its keys.

    The returned backbone's ``start`` says which start it had, e.g. ``"ImageNet weights
    (ResNet101_Weights.IMAGENET1K_V2)"``, ``"weights file resnet50.pth"`` or ``"random init: ImageNet
    weights unavailable (URLError)"``, followed by " (BatchNorm frozen)" or " (GroupNorm)".
    """
    check_backbone_norm(norm, freeze_bn)
    if norm == "group" and weights == "imagenet":
        raise ValueError("backbone_norm='group' cannot start from weights='imagenet': torchvision's ImageNet ResNets "
                         "are BatchNorm networks, whose running statistics GroupNorm cannot take; use weights='random', "
                         "a GroupNorm state_dict, or backbone_norm='batch'")
    state, start = _backbone_state(depth, weights)
    loaded_norm = state_norm(state) if state is not None else None
    if loaded_norm is not None and loaded_norm != norm:
        kind = {"batch": "BatchNorm (it has running_mean keys)", "group": "GroupNorm (it has no running_mean keys)"}
        raise ValueError(f"weights {weights} are a {kind[loaded_norm]} state_dict, which a backbone_norm={norm!r} "
                         f"backbone cannot load; use backbone_norm={loaded_norm!r} or other weights")
    if freeze_bn is None:  # frozen when pretrained weights loaded, unless their description says otherwise (oxnet pretrain)
        freeze_bn = state is not None and weights_file.freeze_bn_default(weights)
    frozen = freeze_bn and norm == "batch"  # GroupNorm has nothing to freeze
    norm_layer = group_norm if norm == "group" else FrozenBatchNorm2d if frozen else nn.BatchNorm2d
    body = RESNETS[depth](weights=None, norm_layer=norm_layer)
    if state is not None:
        missing, unexpected = body.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith("fc.") and not k.endswith("num_batches_tracked")]
        unexpected = [k for k in unexpected if not k.endswith("num_batches_tracked")]
        if missing or unexpected:
            raise ValueError(
                f"{weights} is not a ResNet-{depth} state_dict: missing {missing[:3]}..., unexpected {unexpected[:3]}..."
            )
    backbone = ResNetFPN(body, levels, out_channels)
    backbone.start = start + (" (BatchNorm frozen)" if frozen else " (GroupNorm)" if norm == "group" else "")
    return backbone


def state_norm(state_dict: Mapping[str, Any]) -> str | None:
    """The normalisation a torchvision ResNet state_dict was written from: "batch" when it holds BatchNorm
    running statistics (``running_mean`` keys), "group" when its norm layers have weights but no running
    statistics, None when it has no norm layers (not a ResNet)."""
    if any(k.endswith("running_mean") for k in state_dict):
        return "batch"
    return "group" if "bn1.weight" in state_dict else None


def _backbone_state(depth: int, weights: str) -> tuple[dict[str, Tensor] | None, str]:
    """The ResNet body's pretrained state_dict (None: random init) and a one-line description of it."""
    if weights == "random":
        return None, "random init"
    if weights == "imagenet":
        entry = _WEIGHTS[depth].DEFAULT
        try:
            state = entry.get_state_dict(progress=False)
        except Exception as exc:  # no internet and no cached copy: say so and train from scratch
            warnings.warn(
                f"ImageNet weights for ResNet-{depth} are unavailable ({type(exc).__name__}); training from "
                f"random init. Pass weights='/path/to/resnet{depth}.pth' (a torchvision ResNet state_dict) "
                "to use a local copy.",
                stacklevel=3,
            )
            return None, f"random init: ImageNet weights unavailable ({type(exc).__name__})"
        return state, f"ImageNet weights ({type(entry).__name__}.{entry.name})"
    path = Path(weights)
    if not path.is_file():
        raise FileNotFoundError(f"backbone weights file {path} does not exist (use weights='random' or 'imagenet')")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated or foreign file: name it
        raise ValueError(f"backbone weights file {path} cannot be read as a state_dict: {exc}") from exc
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"backbone weights file {path} is not a state_dict of tensors")
    return {k: v for k, v in state.items() if not k.startswith("fc.")}, weights_file.describe(path)


def bn_frozen(state_dict: Mapping[str, Any]) -> bool:
    """Whether a model's state_dict comes from a backbone with FrozenBatchNorm2d: running statistics but no
    BatchNorm step counters (a GroupNorm backbone has neither: not frozen)."""
    body = [k for k in state_dict if k.startswith("backbone.body.")]
    return any(k.endswith("running_mean") for k in body) and not any(k.endswith("num_batches_tracked") for k in body)
