"""Which images to label next: teacher-student disagreement, image-level uncertainty and, for weak
images, the conflict between their image-level labels and the detector's boxes.

Pure tensor functions (vectorised over the batch, anchors and classes) plus :func:`score_images`, one
inference pass of student and teacher over not-yet-full training images that returns, per image, the
prediction (boxes in ORIGINAL pixels), the score, the suggested action and a reason a radiologist can
read. No SQL: the store adapter (``db.workbench``) writes the results.

The score of image ``b`` (``q_s``/``q_t``: student/teacher per-anchor class probabilities, the teacher
seeing a second, photometrically augmented view; ``p``: the DAA image-level probabilities; ``s_c``: the
detector's best box score of class ``c``; ``y_c``: the image-level label)::

    D_b = mean of the top-k over anchors a of  max_c |q_t[a, c] - q_s[a, c]|^gamma     (gamma = 2: SFL's focal weight)
    U_b = mean_c (1 - |2 p_c - 1|)                                                     (1 at p = 0.5, 0 at p in {0, 1})
    C_b = max_c [conflict_c] * |y_c - s_c|, conflict_c = (y_c = 1 and s_c < t) or (y_c = 0 and s_c >= t)   (weak only;
          classes not assessed never conflict)
    score_b = w_D * D_b + w_U * U_b + w_C * C_b

Example::

    >>> results = score_images(student, teacher, records, classes)   # records: weak + unlabeled
    >>> results[0].action, results[0].reason["text"]
    ('add image-level labels', 'teacher and student disagree on Nodule, Mass (score 0.31)')
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from oxnet.data.datasets import OmniDataset, collate
from oxnet.data.records import Record
from oxnet.data.transforms import TEACHER_AUGMENT, Photometric, to_original_pixels
from oxnet.modeling.detector import OXNet
from oxnet.vocabulary import ADD_LABELS, DRAW_BOXES, UNLABELED, WEAK

__all__ = [
    "BatchScores",
    "ImageScore",
    "ScoreConfig",
    "best_box_scores",
    "cross_granularity_conflict",
    "disagreement",
    "explain",
    "image_uncertainty",
    "score_batch",
    "score_images",
]


@dataclass(frozen=True)
class ScoreConfig:
    """Settings of the score.

    Args:
        top_k: anchors averaged by the disagreement (the ``k`` most disagreeing; all when fewer).
        gamma: exponent of ``|q_t - q_s|`` (the soft focal loss's gamma).
        box_threshold: ``t``: a present class needs a box scoring at least this, an absent class none.
        weights: (w_D, w_U, w_C) of disagreement, image-level uncertainty and conflict in the score.
        reason_fraction: a class is named as disagreeing when its own top-k disagreement is at least this
            fraction of the image's largest per-class value.
        uncertain_band: a class is named as uncertain when ``|p_c - 0.5| <`` this (unlabeled images).
        max_reason_classes: at most this many classes per part of the reason.
    """

    top_k: int = 100
    gamma: float = 2.0
    box_threshold: float = 0.5
    weights: tuple[float, float, float] = (1.0, 1.0, 1.0)
    reason_fraction: float = 0.5
    uncertain_band: float = 0.2
    max_reason_classes: int = 3

    def __post_init__(self) -> None:
        if self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        if not self.gamma > 0:
            raise ValueError(f"gamma must be > 0, got {self.gamma}")
        if not 0.0 < self.box_threshold < 1.0:
            raise ValueError(f"box_threshold must be in (0, 1), got {self.box_threshold}")
        if len(self.weights) != 3 or any(w < 0 for w in self.weights):
            raise ValueError(f"weights must be three numbers >= 0 (disagreement, uncertainty, conflict), got {self.weights}")
        if not 0.0 <= self.reason_fraction <= 1.0 or not 0.0 <= self.uncertain_band <= 0.5:
            raise ValueError("reason_fraction must be in [0, 1] and uncertain_band in [0, 0.5]")
        if self.max_reason_classes < 1:
            raise ValueError(f"max_reason_classes must be >= 1, got {self.max_reason_classes}")


# --------------------------------------------------------------------------------------------------
# The parts of the score (pure, vectorised)
# --------------------------------------------------------------------------------------------------
def disagreement(teacher_logits: Tensor, student_logits: Tensor, *, top_k: int = 100, gamma: float = 2.0) -> tuple[Tensor, Tensor]:
    """Teacher-student disagreement of every image.

    Args:
        teacher_logits, student_logits: Tensor[B, A, N] per-anchor class logits (``OXNet.dense``).
        top_k: anchors averaged (all A when fewer).
        gamma: exponent of the absolute probability difference.

    Returns:
        ``(image, per_class)``: Tensor[B], the mean over the top-k anchors of ``max_c |q_t - q_s|^gamma``,
        and Tensor[B, N], the mean over each class's own top-k anchors of ``|q_t - q_s|^gamma``.
    """
    if teacher_logits.shape != student_logits.shape or teacher_logits.dim() != 3:
        raise ValueError(
            f"teacher_logits and student_logits must both be Tensor[B, A, N], got {tuple(teacher_logits.shape)} "
            f"and {tuple(student_logits.shape)}"
        )
    weight = (teacher_logits.float().sigmoid() - student_logits.float().sigmoid()).abs().pow(gamma)
    k = min(top_k, weight.shape[1])
    if k == 0:
        zeros = weight.new_zeros(weight.shape[0])
        return zeros, weight.new_zeros(weight.shape[0], weight.shape[2])
    image = weight.amax(2).topk(k, dim=1).values.mean(1)
    per_class = weight.topk(k, dim=1).values.mean(1)
    return image, per_class


def image_uncertainty(image_probs: Tensor) -> Tensor:
    """Tensor[B, N] image-level probabilities -> Tensor[B]: mean over classes of ``1 - |2p - 1|``."""
    if image_probs.dim() != 2:
        raise ValueError(f"image_probs must be Tensor[B, N], got {tuple(image_probs.shape)}")
    return (1.0 - (2.0 * image_probs.float() - 1.0).abs()).mean(1)


def best_box_scores(scores: Sequence[Tensor], labels: Sequence[Tensor], num_classes: int) -> Tensor:
    """The best detection score of every class in every image (0 where the class has no box).

    Args:
        scores: per image Tensor[D_i] detection scores.
        labels: per image Tensor[D_i] int64 0-based class indices.
        num_classes: N.

    Returns:
        Tensor[B, N].
    """
    if len(scores) != len(labels):
        raise ValueError(f"got {len(scores)} score tensors but {len(labels)} label tensors")
    if not scores:
        return torch.zeros(0, num_classes)
    device = scores[0].device
    flat_scores = torch.cat([s.float() for s in scores])
    image_index = torch.cat([torch.full((len(s),), i, dtype=torch.int64, device=device) for i, s in enumerate(scores)])
    flat = image_index * num_classes + torch.cat([lb.to(device) for lb in labels])
    best = torch.zeros(len(scores) * num_classes, device=device)
    best.scatter_reduce_(0, flat, flat_scores, reduce="amax")
    return best.view(len(scores), num_classes)


def cross_granularity_conflict(
    best_scores: Tensor, image_labels: Tensor, weak: Tensor, *, threshold: float = 0.5, known: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Conflict between image-level labels and the detector's boxes, for weak images.

    A class conflicts when it is labelled present but its best box scores below ``threshold`` ("the
    labels say Effusion but no box was found"), or labelled absent while a box of it scores at least
    ``threshold``. Non-weak images (``weak`` False) never conflict, nor do classes nobody assessed
    (``known`` 0): a box of a not-assessed class contradicts nothing.

    Args:
        best_scores: Tensor[B, N] of :func:`best_box_scores`.
        image_labels: Tensor[B, N], 1 = present, 0 = absent.
        weak: Tensor[B] bool.
        known: Tensor[B, N], 1 = the label is known, 0 = not assessed; None: all known.

    Returns:
        ``(image, conflicts)``: Tensor[B], max over conflicting classes of ``|y_c - s_c|`` (0 when none),
        and Tensor[B, N] bool, the conflicting classes.
    """
    if best_scores.shape != image_labels.shape or best_scores.dim() != 2 or weak.shape != best_scores.shape[:1]:
        raise ValueError(
            f"need best_scores and image_labels Tensor[B, N] and weak Tensor[B], got {tuple(best_scores.shape)}, "
            f"{tuple(image_labels.shape)}, {tuple(weak.shape)}"
        )
    if known is not None and known.shape != image_labels.shape:
        raise ValueError(f"known {tuple(known.shape)} must have the shape of image_labels {tuple(image_labels.shape)}")
    present = image_labels.bool()
    low = best_scores < threshold
    conflicts = torch.where(present, low, ~low) & weak.bool()[:, None]
    if known is not None:
        conflicts = conflicts & known.bool()
    gap = (image_labels.float() - best_scores.float()).abs() * conflicts
    image = gap.amax(1) if gap.shape[1] else gap.new_zeros(gap.shape[0])
    return image, conflicts


@dataclass(frozen=True)
class BatchScores:
    """:func:`score_batch`'s output: Tensor[B] ``value``, ``disagreement``, ``uncertainty``, ``conflict``;
    Tensor[B, N] ``class_disagreement`` and ``conflicts`` (bool)."""

    value: Tensor
    disagreement: Tensor
    uncertainty: Tensor
    conflict: Tensor
    class_disagreement: Tensor
    conflicts: Tensor


def score_batch(
    teacher_logits: Tensor,
    student_logits: Tensor,
    image_probs: Tensor,
    best_scores: Tensor,
    image_labels: Tensor,
    weak: Tensor,
    config: ScoreConfig = ScoreConfig(),
    known: Tensor | None = None,
) -> BatchScores:
    """All parts and the weighted score of a batch (shapes as in the parts' docstrings; ``known`` is
    the Tensor[B, N] image-level label mask, None = all known)."""
    d, per_class = disagreement(teacher_logits, student_logits, top_k=config.top_k, gamma=config.gamma)
    u = image_uncertainty(image_probs)
    c, conflicts = cross_granularity_conflict(best_scores, image_labels, weak, threshold=config.box_threshold,
                                              known=known)
    w_d, w_u, w_c = config.weights
    return BatchScores(w_d * d + w_u * u + w_c * c, d, u, c, per_class, conflicts)


# --------------------------------------------------------------------------------------------------
# Reasons
# --------------------------------------------------------------------------------------------------
def _names(values: Tensor, mask: Tensor, classes: Sequence[str], limit: int) -> list[str]:
    """Names of the classes in ``mask``, largest ``values`` first, at most ``limit``."""
    order = torch.argsort(values, descending=True).tolist()
    return [classes[i] for i in order if bool(mask[i])][:limit]


def explain(
    *,
    granularity: str,
    value: float,
    class_disagreement: Tensor,
    image_probs: Tensor,
    best_scores: Tensor,
    image_labels: Tensor,
    conflicts: Tensor,
    classes: Sequence[str],
    config: ScoreConfig = ScoreConfig(),
) -> tuple[str, dict[str, Any]]:
    """The suggested action of one image and its reason.

    Args:
        granularity: "unlabeled" (-> "add image-level labels") or "weak" (-> "draw boxes").
        value: the image's score.
        class_disagreement, image_probs, best_scores, image_labels: Tensor[N] of this image.
        conflicts: Tensor[N] bool of this image.

    Returns:
        ``(action, reason)``; ``reason`` = ``{"text": str, "classes": [names named in the text]}``.
    """
    if granularity not in (UNLABELED, WEAK):
        raise ValueError(f"only unlabeled and weak images get suggestions, got {granularity!r}")
    limit = config.max_reason_classes
    parts: list[str] = []
    named: list[str] = []
    if granularity == WEAK and bool(conflicts.any()):
        present = image_labels.bool()
        gaps = (image_labels.float() - best_scores.float()).abs()
        missing = _names(gaps, conflicts & present, classes, limit)
        unexpected = _names(gaps, conflicts & ~present, classes, limit)
        if missing:
            parts.append(f"labels say {', '.join(missing)} but no box found")
        if unexpected:
            parts.append(f"confident {', '.join(unexpected)} box but the labels do not list it")
        named += missing + unexpected
    top = float(class_disagreement.max()) if class_disagreement.numel() else 0.0
    if top > 0:
        disagree = _names(class_disagreement, class_disagreement >= config.reason_fraction * top, classes, limit)
        parts.append(f"teacher and student disagree on {', '.join(disagree)}")
        named += disagree
    if granularity == UNLABELED:
        closeness = (image_probs.float() - 0.5).abs()
        unsure = _names(-closeness, closeness < config.uncertain_band, classes, limit)
        if unsure:
            parts.append(f"unsure whether {', '.join(unsure)} {'is' if len(unsure) == 1 else 'are'} present")
            named += unsure
    if not parts:
        parts.append("the model has no clear view of this image")
    action = ADD_LABELS if granularity == UNLABELED else DRAW_BOXES
    text = "; ".join(parts) + f" (score {value:.2f})"
    return action, {"text": text, "classes": list(dict.fromkeys(named))}


# --------------------------------------------------------------------------------------------------
# One pass over images
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ImageScore:
    """The trainer's output for one image.

    ``boxes`` Tensor[D, 4] (x1, y1, x2, y2) in ORIGINAL pixels, ``scores`` Tensor[D], ``labels``
    Tensor[D] 0-based class indices, ``image_probs`` Tensor[N], ``attention`` Tensor[N, h, w] (DAA
    attention on the C5 grid), ``value`` and its parts, the suggested ``action`` and ``reason``.
    """

    image_id: int
    granularity: str
    boxes: Tensor
    scores: Tensor
    labels: Tensor
    image_probs: Tensor
    attention: Tensor
    value: float
    disagreement: float
    uncertainty: float
    conflict: float
    action: str
    reason: dict[str, Any]
    #: Tensor[D]: the student's C5 features (after ReLU), averaged over the grid (diversity strategies)
    embedding: Tensor | None = None


@torch.no_grad()
def score_images(
    student: OXNet,
    teacher: OXNet,
    records: Sequence[Record],
    classes: Sequence[str],
    *,
    config: ScoreConfig = ScoreConfig(),
    batch_size: int = 8,
    device: str | torch.device = "cpu",
    num_workers: int = 0,
    seed: int = 0,
    on_batch: Callable[[int, int], None] | None = None,
) -> list[ImageScore]:
    """Predict with ``student`` on the plain image, compare with ``teacher`` on a second, photometrically
    augmented view (:data:`oxnet.data.TEACHER_AUGMENT`, seeded by ``seed``), and score every image.

    Args:
        student, teacher: the two models (the same module is allowed: then only the views differ).
        records: weak and unlabeled images (full images are refused: they need no suggestion).
        classes: class names in class index order.
        config: the score's settings.
        batch_size, num_workers: of the DataLoader.
        device: where both models are.
        on_batch: called after every batch with (images done, total); may raise to abort.

    Returns:
        One :class:`ImageScore` per record, in order, on the CPU.
    """
    if len(classes) != student.num_classes or teacher.num_classes != student.num_classes:
        raise ValueError(f"classes ({len(classes)}), student ({student.num_classes}) and teacher "
                         f"({teacher.num_classes}) must agree on the number of classes")
    full = [r.image_id for r in records if r.granularity not in (WEAK, UNLABELED)]
    if full:
        raise ValueError(f"score_images takes weak and unlabeled images; {len(full)} are full (ids {full[:5]})")
    device = torch.device(device)
    size = student.config.image_size
    dataset = OmniDataset(records, num_classes=len(classes), size=size, train=True, flip_p=0.0,
                          student=Photometric(), teacher=TEACHER_AUGMENT, seed=seed)
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=collate, num_workers=num_workers,
                        pin_memory=device.type == "cuda")
    modes = (student.training, teacher.training)
    student.eval()
    teacher.eval()
    results: list[ImageScore] = []
    try:
        for images, teacher_images, targets in loader:
            with torch.autocast(device.type, dtype=torch.float16, enabled=device.type == "cuda"):
                dense = student.dense(images.to(device))
                image_logits, attention = student.image_level(dense)
                teacher_logits = teacher.dense(teacher_images.to(device))["cls_logits"]
            logits = dense["cls_logits"].float()
            detections = student.postprocess(
                logits, dense["bbox_deltas"].float(), dense["anchors"], image_size=(size, size),
                score_thresh=student.config.score_thresh, nms_thresh=student.config.nms_thresh,
            )
            probs = image_logits.float().sigmoid()
            embeddings = torch.relu(dense["c5"].float()).mean((2, 3))
            best = best_box_scores([d["scores"] for d in detections], [d["labels"] for d in detections], len(classes))
            labels = torch.stack([t["image_labels"] for t in targets]).to(device)
            known = torch.stack([t["image_label_mask"] for t in targets]).to(device)
            weak = torch.tensor([t["granularity"] == WEAK for t in targets], device=device)
            parts = score_batch(teacher_logits.float(), logits, probs, best, labels, weak, config, known)
            for i, (det, t) in enumerate(zip(detections, targets)):
                action, reason = explain(
                    granularity=t["granularity"], value=float(parts.value[i]),
                    class_disagreement=parts.class_disagreement[i].cpu(), image_probs=probs[i].cpu(),
                    best_scores=best[i].cpu(), image_labels=labels[i].cpu(), conflicts=parts.conflicts[i].cpu(),
                    classes=classes, config=config,
                )
                results.append(ImageScore(
                    image_id=int(t["image_id"]), granularity=t["granularity"],
                    boxes=to_original_pixels(det["boxes"].float().cpu(), (size, size), t["orig_size"]),
                    scores=det["scores"].float().cpu(),
                    labels=det["labels"].cpu(), image_probs=probs[i].cpu(), attention=attention[i].float().cpu(),
                    value=float(parts.value[i]), disagreement=float(parts.disagreement[i]),
                    uncertainty=float(parts.uncertainty[i]), conflict=float(parts.conflict[i]),
                    action=action, reason=reason, embedding=embeddings[i].cpu(),
                ))
            if on_batch is not None:
                on_batch(len(results), len(dataset))
    finally:
        student.train(modes[0])
        teacher.train(modes[1])
    return results
