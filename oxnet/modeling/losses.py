"""The paper's losses and attention ops as pure functions on tensors (Eq. 1-8).

Every function is vectorised over the batch, classes, anchors and pyramid levels; the tests keep a slow
loop version of each as the oracle. The RetinaNet focal loss (Eq. 7) is torchvision's
``sigmoid_focal_loss`` and is not repeated here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _reduce(loss: Tensor, reduction: str) -> Tensor:
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    if reduction == "mean":
        return loss.mean()
    raise ValueError(f"reduction must be 'none', 'mean' or 'sum', got {reduction!r}")


def image_level_bce(logits: Tensor, labels: Tensor, mask: Tensor | None = None, reduction: str = "mean") -> Tensor:
    """Eq. 1: binary cross entropy summed over the known classes of each image.

    Args:
        logits: Tensor[B, N], image-level logits (before the sigmoid).
        labels: Tensor[B, N], 1 for a present finding, 0 for an absent one.
        mask: Tensor[B, N], 1 where the class is known (present or absent), 0 where it was not assessed;
            a not-assessed class adds nothing to the loss or its gradient. None: every class is known.
        reduction: over images: "none" -> Tensor[B], "mean" or "sum" -> scalar.
    """
    if logits.shape != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} must have one shape")
    if mask is not None and mask.shape != logits.shape:
        raise ValueError(f"mask {tuple(mask.shape)} must have the shape of logits {tuple(logits.shape)}")
    per_class = F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype), reduction="none")
    if mask is not None:
        per_class = per_class * mask.to(per_class.dtype)
    return _reduce(per_class.sum(-1), reduction)


def local_attention(level_probs: list[Tensor], size: tuple[int, int], eps: float = 1e-6) -> Tensor:
    """Eq. 2 and R_c of Eq. 3: the local attention of each class, normalised to sum 1.

    For every image and class, the pyramid level whose anchor-maxed probability map has the largest
    maximum is chosen, resized bilinearly to ``size`` and normalised to sum 1. Gradients flow through
    the chosen map into the local classification head.

    Args:
        level_probs: one Tensor[B, N, H_l, W_l] per pyramid level: per-class probabilities, already
            maxed over the anchors of each location.
        size: (h, w) of the class activation map X (the C5 grid).
    Returns:
        R: Tensor[B, N, h, w], non-negative, each [b, c] map sums to 1.
    """
    if not level_probs:
        raise ValueError("level_probs must hold at least one pyramid level")
    peaks = torch.stack([p.flatten(2).amax(-1) for p in level_probs], dim=-1)  # [B, N, L]
    chosen = peaks.argmax(-1)  # [B, N]
    resized = torch.stack(
        [F.interpolate(p, size=size, mode="bilinear", align_corners=False) for p in level_probs], dim=2
    )  # [B, N, L, h, w]
    index = chosen[:, :, None, None, None].expand(-1, -1, 1, *size)
    attention = resized.gather(2, index).squeeze(2)  # [B, N, h, w]
    return attention / attention.sum((-2, -1), keepdim=True).clamp_min(eps)


def dual_attention_logits(cam: Tensor, attention: Tensor) -> Tensor:
    """Eq. 3: image-level logits ``sum_i X_c * R_c`` (p_c is their sigmoid).

    Args:
        cam: Tensor[B, N, h, w], the class activation map X of the image-level 1x1 conv.
        attention: Tensor[B, N, h, w], R from :func:`local_attention`.
    Returns:
        Tensor[B, N] logits.
    """
    return (cam * attention).sum((-2, -1))


def category_features(features: Tensor, attention: Tensor) -> Tensor:
    """Eq. 4: class-specific features ``F_c = sum_i M_i * R_c,i``.

    Args:
        features: Tensor[B, D, h, w], the map M before the 1x1 conv (ReLU(C5)).
        attention: Tensor[B, N, h, w].
    Returns:
        Tensor[B, N, D].
    """
    return torch.einsum("bdhw,bnhw->bnd", features, attention.to(features.dtype))


@torch.no_grad()
def update_prototypes(
    prototypes: Tensor,
    initialized: Tensor,
    features: Tensor,
    probs: Tensor,
    labels: Tensor,
    momentum: float = 0.7,
) -> tuple[Tensor, Tensor]:
    """Eq. 5: confidence-weighted moving average of the class features of positive images.

    ``P_c <- beta * P_c + (1 - beta) * sum_k p_kc F_kc / sum_k p_kc`` over the images k labelled
    positive for c; beta = 0 the first time P_c is set, else ``momentum``. Classes without a positive
    image in the batch keep their prototype.

    Args:
        prototypes: Tensor[N, D]. initialized: Tensor[N] bool.
        features: Tensor[B, N, D]. probs: Tensor[B, N] image-level probabilities. labels: Tensor[B, N] 0/1.
    Returns:
        (new prototypes Tensor[N, D], new initialized Tensor[N] bool); the inputs are not modified.
    """
    weights = probs.to(features.dtype) * labels.to(features.dtype)  # [B, N]
    total = weights.sum(0)  # [N]
    mean = torch.einsum("bn,bnd->nd", weights, features) / total.clamp_min(1e-12)[:, None]
    return blend_prototypes(prototypes, initialized, mean, total > 0, momentum)


def blend_prototypes(
    prototypes: Tensor, initialized: Tensor, mean: Tensor, present: Tensor, momentum: float
) -> tuple[Tensor, Tensor]:
    """The moving-average step of Eq. 5 for classes ``present`` (Tensor[N] bool) with batch means
    ``mean`` (Tensor[N, D]); shared by :func:`update_prototypes` and the model's distributed update."""
    beta = torch.where(initialized, momentum, 0.0).to(prototypes.dtype)[:, None]
    blended = beta * prototypes + (1 - beta) * mean.to(prototypes.dtype)
    return torch.where(present[:, None], blended, prototypes), initialized | present


def prototype_losses(
    features: Tensor, prototypes: Tensor, initialized: Tensor, labels: Tensor, margin: float = 1.0
) -> tuple[Tensor, Tensor]:
    """Eq. 6: intra-class compactness and inter-class separability against the prototypes.

    d(a, b) is the mean squared difference over the D feature dimensions (as in the authors' code), so
    the margin means the same for every backbone width.
    ``L_intra`` = mean over (image k, present class c) of d(F_kc, P_c);
    ``L_inter`` = mean over (k, present c, initialised j != c) of max(0, margin - d(F_kc, P_j)).
    Pairs with an uninitialised prototype are left out; an empty mean is 0.

    Args:
        features: Tensor[B, N, D]. prototypes: Tensor[N, D] (no gradient flows into them).
        initialized: Tensor[N] bool. labels: Tensor[B, N] 0/1 image-level labels.
    Returns:
        (intra, inter) scalars.
    """
    prototypes = prototypes.detach().to(features.dtype)
    dist = (features[:, :, None, :] - prototypes[None, None]).pow(2).mean(-1)  # [B, N(c), N(j)]
    present = labels.bool() & initialized[None, :]  # [B, N]
    eye = torch.eye(len(prototypes), dtype=torch.bool, device=features.device)
    intra_dist = dist.diagonal(dim1=1, dim2=2)  # [B, N]
    intra = _masked_mean(intra_dist, present)
    pair = labels.bool()[:, :, None] & initialized[None, None, :] & ~eye[None]  # [B, c, j]
    inter = _masked_mean(F.relu(margin - dist), pair)
    return intra, inter


def _masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    return (values * mask).sum() / mask.sum().clamp_min(1)


def soft_focal_loss(
    logits: Tensor,
    teacher_probs: Tensor,
    alpha: float = 0.9,
    gamma: float = 2.0,
    eps: float = 0.05,
    reduction: str = "none",
) -> Tensor:
    """Eq. 8: soft focal loss of student logits against teacher probabilities.

    ``(alpha * q_t + eps) * |q_t - q|^gamma * BCE(q, q_t)`` element-wise, where q = sigmoid(logits).
    (The paper writes a leading minus sign; with BCE already non-negative the loss is its magnitude.)

    Args:
        logits: Tensor[..., N] student logits. teacher_probs: Tensor[..., N] in [0, 1], no gradient.
    """
    teacher_probs = teacher_probs.detach().to(logits.dtype)
    probs = logits.sigmoid()
    weight = (alpha * teacher_probs + eps) * (teacher_probs - probs).abs().pow(gamma)
    bce = F.binary_cross_entropy_with_logits(logits, teacher_probs, reduction="none")
    return _reduce(weight * bce, reduction)
