"""OXnet: RetinaNet on ResNet-FPN with an image-level head (DAA, Eq. 2-3) and prototypes (GPA, Eq. 4-6).

Built like torchvision's detection models: injected parts (backbone with ``out_channels``, anchor
generator, heads, box coder, matcher), plain keyword thresholds, and one forward contract:
training returns a dict of named losses, eval returns one dict per image.
"""

from __future__ import annotations

import math
import warnings
from collections import OrderedDict
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models import resnet
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.ops import FeaturePyramidNetwork, batched_nms, box_iou, sigmoid_focal_loss
from torchvision.ops.feature_pyramid_network import LastLevelP6P7
from torchvision.ops.misc import Conv2dNormActivation, FrozenBatchNorm2d

from oxnet.modeling import losses as L
from oxnet.modeling import weights_file
GRANULARITIES = ("full", "weak", "unlabeled")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_RESNETS = {18: resnet.resnet18, 34: resnet.resnet34, 50: resnet.resnet50, 101: resnet.resnet101}
_WEIGHTS = {
    18: resnet.ResNet18_Weights,
    34: resnet.ResNet34_Weights,
    50: resnet.ResNet50_Weights,
    101: resnet.ResNet101_Weights,
}


# --------------------------------------------------------------------------------------------------
# Settings and presets
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild a model; stored in checkpoints and in the store's model versions."""

    num_classes: int = 9
    depth: int = 18
    levels: tuple[int, ...] = (3, 4, 5, 6, 7)
    fpn_width: int = 256
    head_depth: int = 4
    head_norm: str | None = "group"  # "group" (GroupNorm) or None (original RetinaNet heads)
    image_size: int = 512
    weights: str = "random"  # "random", "imagenet" or a path to a torchvision ResNet state_dict
    freeze_bn: bool | None = None  # FrozenBatchNorm2d in the backbone; None: exactly when pretrained weights loaded
    daa: bool = True  # image-level head with dual attention alignment (Eq. 1-3)
    gpa: bool = True  # global prototype alignment (Eq. 4-6); needs DAA
    sfl: bool = True  # soft focal loss against a mean teacher (Eq. 8); used by MeanTeacher
    fg_iou_thresh: float = 0.5
    bg_iou_thresh: float = 0.4
    allow_low_quality_matches: bool = True  # torchvision's RetinaNet default: every box gets an anchor
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    smooth_l1_beta: float = 1.0 / 9.0
    bbox_weights: tuple[float, float, float, float] = (10.0, 10.0, 5.0, 5.0)  # deltas / (.1, .1, .2, .2)
    prior_probability: float = 0.01
    prototype_momentum: float = 0.7
    inter_margin: float = 1.0
    sfl_alpha: float = 0.9
    sfl_gamma: float = 2.0
    sfl_eps: float = 0.05
    pseudo_score_thresh: float = 0.5
    pseudo_nms_thresh: float = 0.5
    score_thresh: float = 0.05
    nms_thresh: float = 0.5
    detections_per_img: int = 100
    topk_candidates: int = 1000
    loss_weights: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.depth not in _RESNETS:
            raise ValueError(f"depth must be one of {sorted(_RESNETS)}, got {self.depth}")
        levels = tuple(self.levels)
        object.__setattr__(self, "levels", levels)
        if levels != tuple(range(levels[0], levels[-1] + 1)) or levels[0] not in (2, 3) or levels[-1] not in (5, 7):
            raise ValueError(f"levels must be a contiguous range from P2 or P3 to P5 or P7, got {levels}")
        if self.num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {self.num_classes}")
        if self.gpa and not self.daa:
            raise ValueError("gpa=True needs daa=True: the class features are pooled with the DAA attention")
        if self.head_norm not in (None, "group"):
            raise ValueError(f"head_norm must be 'group' or None, got {self.head_norm!r}")
        unknown = set(self.loss_weights) - set(LOSS_NAMES)
        if unknown:
            raise ValueError(f"unknown loss_weights keys {sorted(unknown)}; known: {list(LOSS_NAMES)}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


LOSS_NAMES = (
    "classification",  # focal loss, full images
    "bbox_regression",  # smooth-L1, full images
    "image_bce",  # Eq. 1 through DAA, weak + full
    "prototype_intra",  # Eq. 6, weak + full
    "prototype_inter",  # Eq. 6, weak + full
    "soft_focal",  # Eq. 8, weak + unlabeled
    "pseudo_bbox_regression",  # consistency with the teacher's pseudo-boxes, weak + unlabeled
)

PRESETS: dict[str, ModelConfig] = {
    # The paper: ResNet-101 from ImageNet weights (BatchNorm frozen; random init with a warning when
    # they cannot be had), P2-P7 as in the authors' code, 512 px.
    "paper": ModelConfig(depth=101, levels=(2, 3, 4, 5, 6, 7), fpn_width=256, head_depth=4, image_size=512,
                         weights="imagenet"),
    # CPU-sized: ResNet-18, narrower FPN and heads, 256 px.
    "cpu": ModelConfig(depth=18, levels=(3, 4, 5, 6, 7), fpn_width=128, head_depth=2, image_size=256),
    # Tests: a few milliseconds per image.
    "tiny": ModelConfig(depth=18, levels=(3, 4, 5), fpn_width=32, head_depth=1, image_size=128),
}


def build_model(*, preset: str = "cpu", num_classes: int = 9, **overrides: Any) -> "OXNet":
    """Build an OXnet detector from a named preset (``paper``, ``cpu``, ``tiny``) and overrides.

    Any :class:`ModelConfig` field can be overridden, e.g. ``depth=50``, ``levels=(3, 4, 5, 6, 7)``,
    ``fpn_width=64``, ``head_depth=2``, ``weights="imagenet"`` or ``weights="/path/resnet50.pth"``,
    ``daa=False, gpa=False, sfl=False`` for plain RetinaNet.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    unknown = set(overrides) - set(ModelConfig.__dataclass_fields__)
    if unknown:
        raise TypeError(f"unknown model options {sorted(unknown)}")
    return OXNet.from_config(replace(PRESETS[preset], num_classes=num_classes, **overrides))


# --------------------------------------------------------------------------------------------------
# Parts
# --------------------------------------------------------------------------------------------------
class ResNetFPN(nn.Module):
    """ResNet body + FPN. Returns the pyramid (list of Tensor[B, out_channels, H_l, W_l], finest first)
    and ReLU(C5) (Tensor[B, c5_channels, h, w]) for the image-level head.
    P6 and P7 are computed from C5 (original RetinaNet)."""

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
    *, depth: int, levels: tuple[int, ...], out_channels: int, weights: str = "random", freeze_bn: bool | None = None
) -> ResNetFPN:
    """A ResNet-FPN backbone.

    Args:
        weights: "random", "imagenet" (torchvision's, from its cache or downloaded; when they cannot be
            had this warns in one line and carries on from random init) or a local torchvision ResNet
            state_dict path (``fc.*`` keys are ignored).
        freeze_bn: FrozenBatchNorm2d in the body; ``None`` freezes exactly when pretrained weights were
            loaded (frozen statistics from a random start would never be learnt).

    The returned backbone's ``start`` says which start it had, e.g. ``"ImageNet weights
    (ResNet101_Weights.IMAGENET1K_V2)"``, ``"weights file resnet50.pth"`` or ``"random init: ImageNet
    weights unavailable (URLError)"``.
    """
    state, start = _backbone_state(depth, weights)
    # None: frozen when pretrained weights loaded, unless their description says otherwise (oxnet pretrain)
    frozen = (state is not None and weights_file.freeze_bn_default(weights)) if freeze_bn is None else freeze_bn
    body = _RESNETS[depth](weights=None, norm_layer=FrozenBatchNorm2d if frozen else nn.BatchNorm2d)
    if state is not None:
        missing, unexpected = body.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith("fc.") and not k.endswith("num_batches_tracked")]
        unexpected = [k for k in unexpected if not k.endswith("num_batches_tracked")]
        if missing or unexpected:
            raise ValueError(
                f"{weights} is not a ResNet-{depth} state_dict: missing {missing[:3]}..., unexpected {unexpected[:3]}..."
            )
    backbone = ResNetFPN(body, levels, out_channels)
    backbone.start = start + (" (BatchNorm frozen)" if frozen else "")
    return backbone


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
    """Whether a model's state_dict comes from a backbone with FrozenBatchNorm2d (no BatchNorm step counters)."""
    return not any(k.startswith("backbone.body.") and k.endswith("num_batches_tracked") for k in state_dict)


def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(32, channels), channels)


class DenseHead(nn.Module):
    """One RetinaNet head branch: ``depth`` 3x3 conv(+norm)+ReLU, then a 3x3 conv predicting
    ``num_anchors * outputs_per_anchor`` channels. Shared over pyramid levels."""

    def __init__(
        self,
        in_channels: int,
        num_anchors: int,
        outputs_per_anchor: int,
        *,
        depth: int = 4,
        norm_layer: Callable[[int], nn.Module] | None = None,
        bias_init: float = 0.0,
    ) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            *[Conv2dNormActivation(in_channels, in_channels, norm_layer=norm_layer) for _ in range(depth)]
        )
        self.out = nn.Conv2d(in_channels, num_anchors * outputs_per_anchor, 3, padding=1)
        for layer in self.modules():
            if isinstance(layer, nn.Conv2d):
                nn.init.normal_(layer.weight, std=0.01)
                if layer.bias is not None:
                    nn.init.constant_(layer.bias, 0.0)
        nn.init.constant_(self.out.bias, bias_init)
        self.outputs_per_anchor = outputs_per_anchor

    def forward(self, features: list[Tensor]) -> list[Tensor]:
        """Returns one Tensor[B, A * K, H_l, W_l] per level."""
        return [self.out(self.conv(f)) for f in features]


def flatten_levels(maps: list[Tensor], outputs_per_anchor: int) -> Tensor:
    """[B, A*K, H, W] per level -> Tensor[B, sum_l H_l W_l A, K], in the anchor generator's order."""
    flat = []
    for m in maps:
        b, _, h, w = m.shape
        flat.append(m.view(b, -1, outputs_per_anchor, h, w).permute(0, 3, 4, 1, 2).reshape(b, -1, outputs_per_anchor))
    return torch.cat(flat, dim=1)


def default_anchor_generator(levels: tuple[int, ...]) -> AnchorGenerator:
    """Anchor sizes 2^(l+2) on level P_l, scales {1, 2^(1/3), 2^(2/3)}, ratios {0.5, 1, 2}."""
    sizes = tuple(tuple(2 ** (lvl + 2) * 2 ** (i / 3) for i in range(3)) for lvl in levels)
    return AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * len(levels))


def _label_mask(target: dict[str, Any], labels: Tensor) -> Tensor:
    """Tensor[N] float, 1 where the target's image-level label is known (all ones without a mask)."""
    mask = target.get("image_label_mask")
    return torch.ones_like(labels) if mask is None else mask.to(labels.device, labels.dtype)


# --------------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------------
class OXNet(nn.Module):
    """RetinaNet + image-level head with DAA + global prototypes.

    Input images: Tensor[B, 1 or 3, H, W] in [0, 1] (or a list of same-size Tensor[C, H, W]); all
    boxes are (x1, y1, x2, y2) in input pixels; class indices are 0-based.

    Training (``model(images, targets)``) returns a dict with every name in :data:`LOSS_NAMES`
    (zero when no image of the right granularity is in the batch, or the part is switched off).
    Each target dict holds "granularity" ("full" | "weak" | "unlabeled"), "boxes" Tensor[K, 4],
    "labels" Tensor[K] int64, "image_labels" Tensor[N] (0/1), optionally "image_label_mask" Tensor[N]
    (1 = known, 0 = not assessed: masked from the image-level BCE; absent = all known); weak and unlabeled targets may carry the
    teacher's "soft_labels" Tensor[A, N] (probabilities per anchor and class), "pseudo_boxes" Tensor[P, 4]
    and "pseudo_labels" Tensor[P], set by :class:`oxnet.modeling.teacher.MeanTeacher`.

    Eval (``model(images)``) returns per image: "boxes" Tensor[D, 4], "scores" Tensor[D], "labels"
    Tensor[D] int64, "image_probs" Tensor[N] and "attention" Tensor[N, h, w] (R_c on the C5 grid).
    """

    def __init__(
        self,
        backbone: ResNetFPN,
        num_classes: int,
        *,
        anchor_generator: AnchorGenerator | None = None,
        cls_head: DenseHead | None = None,
        reg_head: DenseHead | None = None,
        config: ModelConfig | None = None,
    ) -> None:
        super().__init__()
        if not hasattr(backbone, "out_channels"):
            raise ValueError("backbone must have an attribute out_channels")
        self.config = config if config is not None else ModelConfig(num_classes=num_classes)
        if self.config.num_classes != num_classes:
            raise ValueError(f"config.num_classes={self.config.num_classes} but num_classes={num_classes}")
        cfg = self.config
        self.num_classes = num_classes
        self.backbone = backbone
        self.anchor_generator = anchor_generator or default_anchor_generator(cfg.levels)
        num_anchors = self.anchor_generator.num_anchors_per_location()[0]
        norm = _group_norm if cfg.head_norm == "group" else None
        prior_bias = -math.log((1 - cfg.prior_probability) / cfg.prior_probability)
        self.cls_head = cls_head or DenseHead(
            backbone.out_channels, num_anchors, num_classes, depth=cfg.head_depth, norm_layer=norm, bias_init=prior_bias
        )
        self.reg_head = reg_head or DenseHead(backbone.out_channels, num_anchors, 4, depth=cfg.head_depth, norm_layer=norm)
        # Image-level head: 1x1 conv without bias on ReLU(C5), zero-initialised -> class activation map X.
        self.image_head = nn.Conv2d(backbone.c5_channels, num_classes, 1, bias=False)
        nn.init.zeros_(self.image_head.weight)
        self.box_coder = det_utils.BoxCoder(weights=cfg.bbox_weights)
        self.matcher = det_utils.Matcher(cfg.fg_iou_thresh, cfg.bg_iou_thresh, cfg.allow_low_quality_matches)
        self.register_buffer("prototypes", torch.zeros(num_classes, backbone.c5_channels))
        self.register_buffer("prototype_initialized", torch.zeros(num_classes, dtype=torch.bool))
        self.register_buffer("pixel_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self._anchor_cache: dict[tuple, Tensor] = {}

    @property
    def backbone_start(self) -> str:
        """Which start the backbone had (see :func:`resnet_fpn_backbone`); "custom backbone" when injected."""
        return getattr(self.backbone, "start", "custom backbone")

    @classmethod
    def from_config(cls, config: ModelConfig) -> "OXNet":
        backbone = resnet_fpn_backbone(
            depth=config.depth,
            levels=config.levels,
            out_channels=config.fpn_width,
            weights=config.weights,
            freeze_bn=config.freeze_bn,
        )
        return cls(backbone, config.num_classes, config=config)

    # ---------------------------------------------------------------------------------------------
    def _batch(self, images: Tensor | list[Tensor]) -> Tensor:
        if isinstance(images, (list, tuple)):
            if not images:
                raise ValueError("images is empty")
            if len({tuple(im.shape) for im in images}) != 1:
                raise ValueError("all images of a batch must have one size; resize them in the data pipeline")
            images = torch.stack(list(images))
        if not isinstance(images, Tensor) or images.dim() != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"images must be Tensor[B, 1 or 3, H, W], got {getattr(images, 'shape', type(images))}")
        if not torch.isfinite(images).all():
            raise ValueError("images contain NaN or inf")
        images = images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images
        return (images - self.pixel_mean.to(images.dtype)) / self.pixel_std.to(images.dtype)

    def anchors(self, image_size: tuple[int, int], grid_sizes: list[tuple[int, int]], like: Tensor) -> Tensor:
        """Tensor[A, 4] anchors (x1, y1, x2, y2) for one image, cached per size and device."""
        key = (image_size, tuple(grid_sizes), like.device, like.dtype)
        if key not in self._anchor_cache:
            strides = [
                [torch.tensor(image_size[0] // g[0], device=like.device), torch.tensor(image_size[1] // g[1], device=like.device)]
                for g in grid_sizes
            ]
            self.anchor_generator.set_cell_anchors(like.dtype, like.device)
            self._anchor_cache[key] = torch.cat(self.anchor_generator.grid_anchors(list(map(list, grid_sizes)), strides))
        return self._anchor_cache[key]

    def dense(self, images: Tensor | list[Tensor]) -> dict[str, Any]:
        """Run backbone and heads. Returns "cls_logits" Tensor[B, A, N], "bbox_deltas" Tensor[B, A, 4],
        "level_cls" (per-level Tensor[B, A_l * N, H_l, W_l]), "c5" Tensor[B, D, h, w], "anchors" Tensor[A, 4]."""
        x = self._batch(images)
        pyramid, c5 = self.backbone(x)
        level_cls = self.cls_head(pyramid)
        level_reg = self.reg_head(pyramid)
        grid_sizes = [tuple(p.shape[-2:]) for p in pyramid]
        return {
            "cls_logits": flatten_levels(level_cls, self.num_classes),
            "bbox_deltas": flatten_levels(level_reg, 4),
            "level_cls": level_cls,
            "c5": c5,
            "anchors": self.anchors(tuple(x.shape[-2:]), grid_sizes, pyramid[0]),
        }

    def image_level(self, dense: dict[str, Any]) -> tuple[Tensor, Tensor]:
        """DAA (Eq. 2-3): image-level logits Tensor[B, N] and attention R Tensor[B, N, h, w]."""
        c5 = dense["c5"]
        n = self.num_classes
        level_probs = []
        for m in dense["level_cls"]:
            b, _, h, w = m.shape
            level_probs.append(m.float().sigmoid().view(b, -1, n, h, w).amax(1))
        attention = L.local_attention(level_probs, tuple(c5.shape[-2:]))
        cam = self.image_head(c5).float()
        return L.dual_attention_logits(cam, attention), attention

    def forward(self, images: Tensor | list[Tensor], targets: list[dict[str, Any]] | None = None):
        if self.training:
            if targets is None:
                raise ValueError("targets are required in training mode")
            return self.compute_losses(images, targets)
        return self.predict(images)

    # ---------------------------------------------------------------------------------------------
    # Training
    # ---------------------------------------------------------------------------------------------
    def compute_losses(self, images: Tensor | list[Tensor], targets: list[dict[str, Any]]) -> dict[str, Tensor]:
        dense = self.dense(images)
        logits, deltas, anchors = dense["cls_logits"].float(), dense["bbox_deltas"].float(), dense["anchors"]
        if len(targets) != len(logits):
            raise ValueError(f"got {len(logits)} images but {len(targets)} targets")
        gran = [self._check_target(i, t, anchors) for i, t in enumerate(targets)]
        zero = logits.sum() * 0.0  # keeps every loss attached to the graph (DDP-friendly)
        out = {name: zero for name in LOSS_NAMES}
        dev = logits.device

        full = [i for i, g in enumerate(gran) if g == "full"]
        real_positives = logits.new_zeros((), dtype=torch.int64)
        if full:
            box_losses, real_positives = self._box_losses(logits[full], deltas[full], anchors, [targets[i] for i in full])
            out.update(box_losses)

        cfg = self.config
        labelled = [i for i, g in enumerate(gran) if g in ("full", "weak")]
        if cfg.daa and labelled:
            image_logits, attention = self.image_level(dense)
            idx = torch.tensor(labelled, device=dev)
            y = torch.stack([targets[i]["image_labels"].to(dev, torch.float32) for i in labelled])
            known = torch.stack([_label_mask(targets[i], y[j]) for j, i in enumerate(labelled)])
            out["image_bce"] = L.image_level_bce(image_logits[idx], y, known)
            if cfg.gpa:
                feats = L.category_features(F.relu(dense["c5"][idx]).float(), attention[idx])
                self.update_prototypes(feats.detach(), image_logits[idx].detach().sigmoid(), y)
                out["prototype_intra"], out["prototype_inter"] = L.prototype_losses(
                    feats, self.prototypes, self.prototype_initialized, y, cfg.inter_margin
                )

        soft = [i for i, g in enumerate(gran) if g in ("weak", "unlabeled") and "soft_labels" in targets[i]]
        if cfg.sfl and soft:
            out.update(self._soft_losses(logits[soft], deltas[soft], anchors, [targets[i] for i in soft], real_positives))

        weights = cfg.loss_weights
        return {k: v * weights.get(k, 1.0) for k, v in out.items()}

    def _check_target(self, i: int, t: dict[str, Any], anchors: Tensor) -> str:
        g = t.get("granularity")
        if g not in GRANULARITIES:
            raise ValueError(f"targets[{i}]['granularity'] must be one of {GRANULARITIES}, got {g!r}")
        for key, value in t.items():
            if isinstance(value, Tensor) and value.device != anchors.device:
                raise ValueError(
                    f"targets[{i}][{key!r}] is on {value.device} but the images are on {anchors.device}: "
                    "move the targets to the images' device"
                )
        if g == "full":
            boxes, labels = t.get("boxes"), t.get("labels")
            if boxes is None or labels is None:
                raise ValueError(f"targets[{i}] is full but has no 'boxes'/'labels'")
            if boxes.dim() != 2 or boxes.shape[-1] != 4 or len(labels) != len(boxes):
                raise ValueError(f"targets[{i}]['boxes'] must be Tensor[K, 4] with K labels, got {tuple(boxes.shape)}")
            if len(boxes):
                if not torch.isfinite(boxes).all():
                    raise ValueError(f"targets[{i}]['boxes'] contain NaN or inf")
                if (boxes[:, 2:] <= boxes[:, :2]).any():
                    raise ValueError(f"targets[{i}]['boxes'] has a box of zero or negative size: {boxes.tolist()}")
                if labels.min() < 0 or labels.max() >= self.num_classes:
                    raise ValueError(f"targets[{i}]['labels'] must be in [0, {self.num_classes})")
        if g in ("full", "weak"):
            y = t.get("image_labels")
            if y is None or y.shape != (self.num_classes,):
                raise ValueError(f"targets[{i}]['image_labels'] must be Tensor[{self.num_classes}]")
            mask = t.get("image_label_mask")
            if mask is not None and mask.shape != (self.num_classes,):
                raise ValueError(f"targets[{i}]['image_label_mask'] must be Tensor[{self.num_classes}]")
            if mask is not None and bool((y.bool() & ~mask.bool()).any()):
                raise ValueError(f"targets[{i}]: a class is both present in 'image_labels' and not assessed in 'image_label_mask'")
        if "soft_labels" in t and t["soft_labels"].shape != (len(anchors), self.num_classes):
            raise ValueError(f"targets[{i}]['soft_labels'] must be Tensor[{len(anchors)}, {self.num_classes}]")
        return g

    def _match(self, boxes: Tensor, anchors: Tensor) -> Tensor:
        """Matched box index per anchor; -1 background, -2 ignored (between the IoU thresholds)."""
        if len(boxes) == 0:
            return torch.full((len(anchors),), -1, dtype=torch.int64, device=anchors.device)
        return self.matcher(box_iou(boxes.to(anchors.dtype), anchors))

    def _assign(self, logits: Tensor, anchors: Tensor, boxes: list[Tensor], labels: list[Tensor]):
        """Per-anchor targets for a batch: one-hot class targets Tensor[B, A, N], valid (not ignored)
        Tensor[B, A], foreground Tensor[B, A] and the matched boxes Tensor[B, A, 4]."""
        matched = torch.stack([self._match(b, anchors) for b in boxes])  # [B, A]
        fg = matched >= 0
        valid = matched != self.matcher.BETWEEN_THRESHOLDS
        safe = matched.clamp_min(0)
        matched_boxes = torch.stack(
            [b.to(anchors)[s] if len(b) else anchors.new_zeros(len(anchors), 4) for b, s in zip(boxes, safe)]
        )
        matched_labels = torch.stack(
            [l.to(anchors.device)[s] if len(l) else s for l, s in zip(labels, safe)]
        )
        onehot = torch.zeros_like(logits)
        onehot.scatter_(2, matched_labels.unsqueeze(-1), fg.unsqueeze(-1).to(logits.dtype))
        return onehot, valid, fg, matched_boxes

    def _box_regression(self, deltas: Tensor, anchors: Tensor, matched_boxes: Tensor, fg: Tensor) -> Tensor:
        b_idx, a_idx = fg.nonzero(as_tuple=True)
        target = self.box_coder.encode_single(matched_boxes[b_idx, a_idx], anchors[a_idx])
        return F.smooth_l1_loss(deltas[b_idx, a_idx], target, beta=self.config.smooth_l1_beta, reduction="sum")

    def _box_losses(
        self, logits: Tensor, deltas: Tensor, anchors: Tensor, targets: list[dict]
    ) -> tuple[dict[str, Tensor], Tensor]:
        """Focal loss and box regression of the full images over their positive anchors; also returns
        that count of positive anchors."""
        onehot, valid, fg, matched_boxes = self._assign(
            logits, anchors, [t["boxes"] for t in targets], [t["labels"] for t in targets]
        )
        positives = fg.sum()
        norm = positives.clamp_min(1)
        cls = sigmoid_focal_loss(
            logits, onehot, alpha=self.config.focal_alpha, gamma=self.config.focal_gamma, reduction="none"
        )
        return {
            "classification": (cls * valid.unsqueeze(-1)).sum() / norm,
            "bbox_regression": self._box_regression(deltas, anchors, matched_boxes, fg) / norm,
        }, positives

    def _soft_losses(
        self, logits: Tensor, deltas: Tensor, anchors: Tensor, targets: list[dict], real_positives: Tensor
    ) -> dict[str, Tensor]:
        """SFL (Eq. 8) on every anchor not ignored by the pseudo-boxes, plus box consistency with the
        pseudo-boxes, both normalised by the batch's positive anchors: pseudo-positives plus the full
        images' ``real_positives``. A pseudo-positive anchor thus weighs no more than a real one (with
        the pseudo count alone, a teacher that finds a quarter of the lesions gives each pseudo-box about
        four times a real box's weight; on synthetic data that cost SFL 3 mAP points). Images without
        kept pseudo-boxes still get SFL (the authors' code skips them)."""
        dev = logits.device
        soft = torch.stack([t["soft_labels"].to(dev, logits.dtype) for t in targets])
        empty_boxes, empty_labels = anchors.new_zeros(0, 4), torch.zeros(0, dtype=torch.int64, device=dev)
        pboxes = [t.get("pseudo_boxes", empty_boxes) for t in targets]
        plabels = [t.get("pseudo_labels", empty_labels) for t in targets]
        _, valid, fg, matched_boxes = self._assign(logits, anchors, pboxes, plabels)
        norm = (fg.sum() + real_positives).clamp_min(1)
        cfg = self.config
        sfl = L.soft_focal_loss(logits, soft, alpha=cfg.sfl_alpha, gamma=cfg.sfl_gamma, eps=cfg.sfl_eps)
        return {
            "soft_focal": (sfl * valid.unsqueeze(-1)).sum() / norm,
            "pseudo_bbox_regression": self._box_regression(deltas, anchors, matched_boxes, fg) / norm,
        }

    @torch.no_grad()
    def update_prototypes(self, features: Tensor, probs: Tensor, labels: Tensor) -> None:
        """Eq. 5 on the prototype buffers. Under torch.distributed the weighted sums are all-reduced,
        so every rank ends with the same prototypes."""
        weights = probs.float() * labels.float()
        total = weights.sum(0)
        summed = torch.einsum("bn,bnd->nd", weights, features.float())
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(total)
            torch.distributed.all_reduce(summed)
        mean = summed / total.clamp_min(1e-12)[:, None]
        new, init = L.blend_prototypes(
            self.prototypes, self.prototype_initialized, mean, total > 0, self.config.prototype_momentum
        )
        self.prototypes.copy_(new)
        self.prototype_initialized.copy_(init)

    # ---------------------------------------------------------------------------------------------
    # Inference
    # ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, images: Tensor | list[Tensor]) -> list[dict[str, Tensor]]:
        dense = self.dense(images)
        image_logits, attention = self.image_level(dense)
        detections = self.postprocess(
            dense["cls_logits"].float(), dense["bbox_deltas"].float(), dense["anchors"],
            image_size=tuple(images[0].shape[-2:]),
            score_thresh=self.config.score_thresh, nms_thresh=self.config.nms_thresh,
        )
        for det, p, att in zip(detections, image_logits.sigmoid(), attention):
            det["image_probs"] = p
            det["attention"] = att
        return detections

    def postprocess(
        self,
        logits: Tensor,
        deltas: Tensor,
        anchors: Tensor,
        *,
        image_size: tuple[int, int],
        score_thresh: float,
        nms_thresh: float,
        detections_per_img: int | None = None,
    ) -> list[dict[str, Tensor]]:
        """Decode, threshold, class-wise NMS. logits Tensor[B, A, N], deltas Tensor[B, A, 4]."""
        keep_n = detections_per_img or self.config.detections_per_img
        n = self.num_classes
        results = []
        for cls, reg in zip(logits, deltas):
            scores = cls.sigmoid().flatten()
            cand = (scores > score_thresh).nonzero().squeeze(1)
            topk = min(self.config.topk_candidates * len(self.config.levels), len(cand))
            top_scores, order = scores[cand].topk(topk)
            flat = cand[order]
            a_idx, labels = flat // n, flat % n
            boxes = self.box_coder.decode_single(reg[a_idx], anchors[a_idx])
            boxes[:, 0::2] = boxes[:, 0::2].clamp(0, image_size[1])
            boxes[:, 1::2] = boxes[:, 1::2].clamp(0, image_size[0])
            keep = batched_nms(boxes, top_scores, labels, nms_thresh)[:keep_n]
            results.append({"boxes": boxes[keep], "scores": top_scores[keep], "labels": labels[keep]})
        return results
