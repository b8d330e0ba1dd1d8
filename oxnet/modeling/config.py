"""Model settings: :class:`ModelConfig`, the loss names, the named presets and :func:`build_model`.

Imports no torch, so the settings (and the presets) can be read by processes that do not train.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from oxnet.modeling.detector import OXNet

#: ResNet depths the backbone can be built with (:data:`oxnet.modeling.backbone.RESNETS`).
RESNET_DEPTHS = (18, 34, 50, 101)


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

