"""Mean teacher (Sect. 2.3): an EMA copy of the student that supplies soft labels and pseudo-boxes."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn

from oxnet.modeling.detector import OXNet
from oxnet.vocabulary import UNLABELED, WEAK


class MeanTeacher(nn.Module):
    """Student + EMA teacher, for training: returns the student's loss dict for a mixed batch. To
    predict, call ``.student`` or ``.teacher`` (each an :class:`OXNet`).

    ``forward(images, targets, teacher_images)``: the teacher sees ``teacher_images`` (same geometry,
    other photometric augmentation) without gradient, and for every weak and unlabeled image attaches
    to its target the per-anchor probabilities ("soft_labels") and pseudo-boxes (NMS ``pseudo_nms_thresh``,
    score > ``pseudo_score_thresh``). Weak images keep only pseudo-boxes whose class is among their
    image-level labels or not assessed (``image_label_mask`` 0); unlabeled images keep all. :meth:`update_teacher` is the explicit EMA step.
    """

    ema_step: Tensor  # buffer: EMA steps taken

    def __init__(self, student: OXNet, *, ema_decay: float = 0.99) -> None:
        super().__init__()
        if not 0.0 <= ema_decay <= 1.0:
            raise ValueError(f"ema_decay must be in [0, 1], got {ema_decay}")
        self.student = student
        self.teacher = copy.deepcopy(student).requires_grad_(False).eval()
        self.ema_decay = ema_decay
        self.register_buffer("ema_step", torch.zeros((), dtype=torch.int64))

    def train(self, mode: bool = True) -> MeanTeacher:
        super().train(mode)
        self.teacher.eval()  # the teacher always predicts with its running statistics
        return self

    def forward(
        self,
        images: Tensor | list[Tensor],
        targets: list[dict[str, Any]] | None = None,
        teacher_images: Tensor | list[Tensor] | None = None,
    ):
        if not self.training:
            raise ValueError("MeanTeacher trains; to predict, call its .student or .teacher")
        if targets is None:
            raise ValueError("targets are required in training mode")
        targets = self.pseudo_label(teacher_images if teacher_images is not None else images, targets)
        return self.student(images, targets)

    @torch.no_grad()
    def pseudo_label(self, teacher_images: Tensor | list[Tensor], targets: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Copies of ``targets`` where weak and unlabeled images carry the teacher's soft labels
        Tensor[A, N] and filtered pseudo-boxes (x1, y1, x2, y2) with their 0-based labels."""
        idx = [i for i, t in enumerate(targets) if t.get("granularity") in (WEAK, UNLABELED)]
        targets = [dict(t) for t in targets]
        if not idx or not self.student.config.sfl:
            return targets
        if isinstance(teacher_images, (list, tuple)):
            views = torch.stack([teacher_images[i] for i in idx])
        else:
            views = teacher_images[idx]
        teacher = self.teacher
        dense = teacher.dense(views)
        logits, deltas = dense["cls_logits"].float(), dense["bbox_deltas"].float()
        cfg = teacher.config
        detections = teacher.postprocess(
            logits, deltas, dense["anchors"], image_size=(views.shape[-2], views.shape[-1]),
            score_thresh=cfg.pseudo_score_thresh, nms_thresh=cfg.pseudo_nms_thresh,
        )
        probs = logits.sigmoid()
        for j, i in enumerate(idx):
            det = detections[j]
            boxes, labels = det["boxes"], det["labels"]
            if targets[i]["granularity"] == WEAK:
                # present classes, and classes nobody assessed (unknown, so not known to be absent)
                allowed = targets[i]["image_labels"].to(labels.device).bool()
                mask = targets[i].get("image_label_mask")
                if mask is not None:
                    allowed = allowed | ~mask.to(labels.device).bool()
                keep = allowed[labels]
                boxes, labels = boxes[keep], labels[keep]
            wide = (boxes[:, 2:] > boxes[:, :2]).all(1)  # clipping can leave degenerate boxes
            targets[i].update(soft_labels=probs[j], pseudo_boxes=boxes[wide], pseudo_labels=labels[wide])
        return targets

    @torch.no_grad()
    def update_teacher(self) -> float:
        """EMA step: theta_t <- l_t * theta_t + (1 - l_t) * theta_s with l_t = min(1 - 1/(t+1), ema_decay).
        Floating buffers (BatchNorm statistics) follow the same average, integer buffers are copied.
        Returns l_t."""
        step = int(self.ema_step)
        decay = min(1.0 - 1.0 / (step + 1), self.ema_decay)
        t_params: list[Tensor] = [p for p in self.teacher.parameters()]
        s_params = [p.detach() for p in self.student.parameters()]
        torch._foreach_lerp_(t_params, s_params, 1.0 - decay)
        for t_buf, s_buf in zip(self.teacher.buffers(), self.student.buffers()):
            if t_buf.dtype.is_floating_point:
                t_buf.lerp_(s_buf, 1.0 - decay)
            else:
                t_buf.copy_(s_buf)
        self.ema_step += 1
        return decay
