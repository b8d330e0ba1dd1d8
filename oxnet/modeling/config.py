"""Model settings: :class:`ModelConfig`, the loss names, the named presets and :func:`build_model`.

Imports no torch, so the settings (and the presets) can be read by processes that do not train.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from oxnet.modeling.detector import OXNet

#: ResNet depths the backbone can be built with (:data:`oxnet.modeling.backbone.RESNETS`).
RESNET_DEPTHS = (18, 34, 50, 101)
#: Normalisation layers of the backbone (:func:`oxnet.modeling.backbone.resnet_fpn_backbone`).
BACKBONE_NORMS = ("batch", "group")
#: The three anchor scales of every pyramid level, as multiples of the level's base size (RetinaNet's octave).
ANCHOR_SCALES = (1.0, 2 ** (1 / 3), 2 ** (2 / 3))
#: Anchor aspect ratios (height / width) when ``anchor_ratios`` is None.
DEFAULT_ANCHOR_RATIOS = (0.5, 1.0, 2.0)


def check_backbone_norm(norm: str, freeze_bn: bool | None) -> None:
    """ValueError unless ``norm`` is one of :data:`BACKBONE_NORMS` and, for GroupNorm, ``freeze_bn`` is not
    True (GroupNorm has no running statistics to freeze); the one rule of models and pretraining."""
    if norm not in BACKBONE_NORMS:
        raise ValueError(f"backbone_norm must be one of {BACKBONE_NORMS}, got {norm!r}")
    if norm == "group" and freeze_bn:
        raise ValueError("freeze_bn=True needs backbone_norm='batch': GroupNorm has no running statistics to freeze")


def default_anchor_sizes(levels: tuple[int, ...]) -> tuple[float, ...]:
    """RetinaNet's base anchor size per level: 2^(l+2) pixels on P_l (32 on P3, 512 on P7)."""
    return tuple(2.0 ** (lvl + 2) for lvl in levels)


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
    backbone_norm: str = "batch"  # "batch" (BatchNorm2d) or "group" (GroupNorm, 32 groups: trains at any batch size)
    anchor_sizes: tuple[float, ...] | None = None  # base size per level in input pixels; None: 2^(l+2)
    anchor_ratios: tuple[float, ...] | None = None  # aspect ratios (height / width); None: (0.5, 1, 2)
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
        if self.depth not in RESNET_DEPTHS:
            raise ValueError(f"depth must be one of {sorted(RESNET_DEPTHS)}, got {self.depth}")
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
        check_backbone_norm(self.backbone_norm, self.freeze_bn)
        self._check_anchors()
        unknown = set(self.loss_weights) - set(LOSS_NAMES)
        if unknown:
            raise ValueError(f"unknown loss_weights keys {sorted(unknown)}; known: {list(LOSS_NAMES)}")

    def _check_anchors(self) -> None:
        """``anchor_sizes``: one positive size per level, increasing; ``anchor_ratios``: positive (tuples,
        also when read back from JSON as lists)."""
        for name in ("anchor_sizes", "anchor_ratios"):
            value = getattr(self, name)
            if value is None:
                continue
            try:
                numbers = tuple(float(v) for v in value)
            except (TypeError, ValueError):
                raise ValueError(f"{name} must be a tuple of numbers or None, got {value!r}") from None
            if not numbers or not all(math.isfinite(v) and v > 0 for v in numbers):
                raise ValueError(f"{name} must be positive finite numbers, got {value!r}")
            object.__setattr__(self, name, numbers)
        sizes = self.anchor_sizes
        if sizes is not None:
            if len(sizes) != len(self.levels):
                raise ValueError(f"anchor_sizes needs one size per pyramid level {self.levels}, got {len(sizes)}: {sizes}")
            if any(b <= a for a, b in zip(sizes, sizes[1:])):
                raise ValueError(f"anchor_sizes must increase from the finest level to the coarsest, got {sizes}")

    def anchor_settings(self) -> tuple[tuple[tuple[float, ...], ...], tuple[float, ...]]:
        """The anchor generator's sizes (per level: base size x :data:`ANCHOR_SCALES`) and aspect ratios."""
        base = self.anchor_sizes or default_anchor_sizes(self.levels)
        return tuple(tuple(s * k for k in ANCHOR_SCALES) for s in base), self.anchor_ratios or DEFAULT_ANCHOR_RATIOS

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


def build_model(*, preset: str = "cpu", num_classes: int = 9, **overrides: Any) -> OXNet:
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
    from oxnet.modeling.detector import OXNet

    return OXNet.from_config(replace(PRESETS[preset], num_classes=num_classes, **overrides))

