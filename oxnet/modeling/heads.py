"""The detector's heads, each with its own loss (as torchvision's RetinaNet heads own theirs):

- :class:`ClassificationHead`: RetinaNet's class branch; focal loss on full images, soft focal loss
  (Eq. 8) against the mean teacher on weak and unlabeled images.
- :class:`RegressionHead`: RetinaNet's box branch; smooth-L1 on the encoded deltas of matched anchors
  (real boxes, or the teacher's pseudo-boxes).
- :class:`ImageLevelHead`: the 1x1 conv on ReLU(C5) with dual attention alignment (DAA, Eq. 1-3);
  image-level BCE.
- :class:`PrototypeHead`: global prototype alignment (GPA, Eq. 4-6); its update and the intra/inter loss.

The detector (:class:`oxnet.modeling.detector.OXNet`) matches anchors to boxes and gathers the loss dict.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection import _utils as det_utils
from torchvision.ops import sigmoid_focal_loss
from torchvision.ops.misc import Conv2dNormActivation

from oxnet.modeling import losses as L


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with 32 groups (fewer when ``channels`` is not a multiple of 32): the heads' norm layer."""
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
        nn.init.constant_(cast(Tensor, self.out.bias), bias_init)  # a Conv2d made with its bias
        self.outputs_per_anchor = outputs_per_anchor

    def forward(self, features: list[Tensor]) -> list[Tensor]:
        """Returns one Tensor[B, A * K, H_l, W_l] per level."""
        return [self.out(self.conv(f)) for f in features]


class ClassificationHead(DenseHead):
    """RetinaNet's classification branch: ``num_anchors * num_classes`` logits per location, the bias
    set to the class prior. Owns the focal loss (full images) and the soft focal loss (Eq. 8)."""

    def __init__(
        self,
        in_channels: int,
        num_anchors: int,
        num_classes: int,
        *,
        depth: int = 4,
        norm_layer: Callable[[int], nn.Module] | None = None,
        prior_probability: float = 0.01,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        sfl_alpha: float = 0.9,
        sfl_gamma: float = 2.0,
        sfl_eps: float = 0.05,
    ) -> None:
        prior_bias = -math.log((1 - prior_probability) / prior_probability)
        super().__init__(in_channels, num_anchors, num_classes, depth=depth, norm_layer=norm_layer, bias_init=prior_bias)
        self.focal_alpha, self.focal_gamma = focal_alpha, focal_gamma
        self.sfl_alpha, self.sfl_gamma, self.sfl_eps = sfl_alpha, sfl_gamma, sfl_eps

    def compute_loss(self, logits: Tensor, onehot: Tensor, valid: Tensor, norm: Tensor) -> Tensor:
        """Focal loss summed over the anchors that are not ignored, divided by ``norm``.

        Args:
            logits: Tensor[B, A, N]. onehot: Tensor[B, A, N], the matched class of each foreground anchor.
            valid: Tensor[B, A] bool, False for anchors ignored by the matcher. norm: scalar (positive anchors).
        """
        cls = sigmoid_focal_loss(logits, onehot, alpha=self.focal_alpha, gamma=self.focal_gamma, reduction="none")
        return (cls * valid.unsqueeze(-1)).sum() / norm

    def compute_soft_loss(self, logits: Tensor, teacher_probs: Tensor, valid: Tensor, norm: Tensor) -> Tensor:
        """Soft focal loss (Eq. 8) against the teacher's probabilities Tensor[B, A, N], summed over the
        anchors not ignored by the pseudo-boxes (``valid`` Tensor[B, A] bool), divided by ``norm``."""
        sfl = L.soft_focal_loss(logits, teacher_probs, alpha=self.sfl_alpha, gamma=self.sfl_gamma, eps=self.sfl_eps)
        return (sfl * valid.unsqueeze(-1)).sum() / norm


class RegressionHead(DenseHead):
    """RetinaNet's box branch: 4 deltas per anchor. Owns the smooth-L1 box regression loss.

    ``box_coder`` encodes matched boxes into deltas (the detector decodes with the same coder)."""

    def __init__(
        self,
        in_channels: int,
        num_anchors: int,
        *,
        depth: int = 4,
        norm_layer: Callable[[int], nn.Module] | None = None,
        box_coder: det_utils.BoxCoder | None = None,
        smooth_l1_beta: float = 1.0 / 9.0,
    ) -> None:
        super().__init__(in_channels, num_anchors, 4, depth=depth, norm_layer=norm_layer)
        self.box_coder = box_coder if box_coder is not None else det_utils.BoxCoder(weights=(10.0, 10.0, 5.0, 5.0))
        self.smooth_l1_beta = smooth_l1_beta

    def compute_loss(self, deltas: Tensor, anchors: Tensor, matched_boxes: Tensor, foreground: Tensor, norm: Tensor) -> Tensor:
        """Smooth-L1 between the predicted and the encoded matched boxes over the foreground anchors,
        summed and divided by ``norm``.

        Args:
            deltas: Tensor[B, A, 4]. anchors: Tensor[A, 4] (x1, y1, x2, y2). matched_boxes: Tensor[B, A, 4]
                (x1, y1, x2, y2), the box matched to each anchor. foreground: Tensor[B, A] bool. norm: scalar.
        """
        b_idx, a_idx = foreground.nonzero(as_tuple=True)
        target = self.box_coder.encode_single(matched_boxes[b_idx, a_idx], anchors[a_idx])
        return F.smooth_l1_loss(deltas[b_idx, a_idx], target, beta=self.smooth_l1_beta, reduction="sum") / norm


class ImageLevelHead(nn.Conv2d):
    """The image-level head on ReLU(C5): a 1x1 conv without bias, zero-initialised, gives the class
    activation map X (Tensor[B, N, h, w]); with DAA (Eq. 2-3) the image-level logits. Owns the
    image-level BCE (Eq. 1)."""

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__(in_channels, num_classes, 1, bias=False)
        nn.init.zeros_(self.weight)
        self.num_classes = num_classes

    def attention_logits(self, level_cls: list[Tensor], c5: Tensor) -> tuple[Tensor, Tensor]:
        """DAA (Eq. 2-3): image-level logits Tensor[B, N] and attention R Tensor[B, N, h, w] from the
        classification head's per-level logits (Tensor[B, A_l * N, H_l, W_l]) and C5 Tensor[B, D, h, w]."""
        n = self.num_classes
        level_probs = []
        for m in level_cls:
            b, _, h, w = m.shape
            level_probs.append(m.float().sigmoid().view(b, -1, n, h, w).amax(1))
        attention = L.local_attention(level_probs, (c5.shape[-2], c5.shape[-1]))
        cam = self(c5).float()
        return L.dual_attention_logits(cam, attention), attention

    def compute_loss(self, logits: Tensor, labels: Tensor, mask: Tensor | None = None) -> Tensor:
        """Eq. 1: BCE of the image-level logits Tensor[B, N] against the labels Tensor[B, N] over the
        known classes (``mask`` Tensor[B, N], 1 = known), mean over images."""
        return L.image_level_bce(logits, labels, mask)


class PrototypeHead(nn.Module):
    """Global prototype alignment (GPA, Eq. 4-6). The prototypes themselves are the detector's buffers
    (``prototypes`` Tensor[N, D], ``prototype_initialized`` Tensor[N] bool: saved in its state_dict and
    moved with ``.to()``); this head pools the class features, updates the prototypes and owns the
    intra/inter loss against them. It has no parameters."""

    def __init__(self, *, momentum: float = 0.7, margin: float = 1.0) -> None:
        super().__init__()
        self.momentum = momentum
        self.margin = margin

    def features(self, c5: Tensor, attention: Tensor) -> Tensor:
        """Eq. 4: class features Tensor[B, N, D] pooled from ReLU(C5) Tensor[B, D, h, w] with the DAA
        attention Tensor[B, N, h, w]."""
        return L.category_features(F.relu(c5).float(), attention)

    @torch.no_grad()
    def update(self, prototypes: Tensor, initialized: Tensor, features: Tensor, probs: Tensor, labels: Tensor) -> None:
        """Eq. 5, in place on ``prototypes`` Tensor[N, D] and ``initialized`` Tensor[N] bool, from the
        class features Tensor[B, N, D], image-level probabilities Tensor[B, N] and labels Tensor[B, N].
        Under torch.distributed the weighted sums are all-reduced, so every rank ends with the same
        prototypes."""
        weights = probs.float() * labels.float()
        total = weights.sum(0)
        summed = torch.einsum("bn,bnd->nd", weights, features.float())
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(total)
            torch.distributed.all_reduce(summed)
        mean = summed / total.clamp_min(1e-12)[:, None]
        new, init = L.blend_prototypes(prototypes, initialized, mean, total > 0, self.momentum)
        prototypes.copy_(new)
        initialized.copy_(init)

    def compute_loss(self, features: Tensor, prototypes: Tensor, initialized: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """Eq. 6: (intra, inter) of the class features Tensor[B, N, D] against the prototypes."""
        return L.prototype_losses(features, prototypes, initialized, labels, self.margin)
