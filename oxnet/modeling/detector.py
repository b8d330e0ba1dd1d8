"""OXnet: RetinaNet on ResNet-FPN with an image-level head (DAA, Eq. 2-3) and prototypes (GPA, Eq. 4-6).

Built like torchvision's detection models: injected parts (backbone with ``out_channels``, anchor
generator, heads, box coder, matcher), plain keyword thresholds, and one forward contract:
training returns a dict of named losses, eval returns one dict per image. The detector matches anchors
to boxes; each head computes its own loss (:mod:`oxnet.modeling.heads`) and the detector gathers them.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.ops import batched_nms, box_iou, clip_boxes_to_image

from oxnet.modeling.backbone import IMAGENET_MEAN, IMAGENET_STD, ResNetFPN, resnet_fpn_backbone
from oxnet.modeling.config import LOSS_NAMES, ModelConfig
from oxnet.vocabulary import FULL, GRANULARITIES, UNLABELED, WEAK
from oxnet.modeling.heads import ClassificationHead, ImageLevelHead, PrototypeHead, RegressionHead, group_norm


def flatten_levels(maps: list[Tensor], outputs_per_anchor: int) -> Tensor:
    """[B, A*K, H, W] per level -> Tensor[B, sum_l H_l W_l A, K], in the anchor generator's order."""
    flat = []
    for m in maps:
        b, _, h, w = m.shape
        flat.append(m.view(b, -1, outputs_per_anchor, h, w).permute(0, 3, 4, 1, 2).reshape(b, -1, outputs_per_anchor))
    return torch.cat(flat, dim=1)


def default_anchor_generator(config: ModelConfig) -> AnchorGenerator:
    """The anchors of ``config``: on each level P_l its base size (``anchor_sizes``, default 2^(l+2)) at
    scales {1, 2^(1/3), 2^(2/3)}, with ``anchor_ratios`` (default {0.5, 1, 2}; ratio = height / width)."""
    sizes, ratios = config.anchor_settings()
    return AnchorGenerator(sizes, (ratios,) * len(sizes))


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

    # buffers (registered in __init__)
    prototypes: Tensor
    prototype_initialized: Tensor
    pixel_mean: Tensor
    pixel_std: Tensor

    def __init__(
        self,
        backbone: ResNetFPN,
        num_classes: int,
        *,
        anchor_generator: AnchorGenerator | None = None,
        cls_head: ClassificationHead | None = None,
        reg_head: RegressionHead | None = None,
        image_head: ImageLevelHead | None = None,
        prototype_head: PrototypeHead | None = None,
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
        self.anchor_generator = anchor_generator or default_anchor_generator(cfg)
        num_anchors = self.anchor_generator.num_anchors_per_location()[0]
        norm = group_norm if cfg.head_norm == "group" else None
        self.cls_head = cls_head or ClassificationHead(
            backbone.out_channels, num_anchors, num_classes, depth=cfg.head_depth, norm_layer=norm,
            prior_probability=cfg.prior_probability, focal_alpha=cfg.focal_alpha, focal_gamma=cfg.focal_gamma,
            sfl_alpha=cfg.sfl_alpha, sfl_gamma=cfg.sfl_gamma, sfl_eps=cfg.sfl_eps,
        )
        self.reg_head = reg_head or RegressionHead(
            backbone.out_channels, num_anchors, depth=cfg.head_depth, norm_layer=norm,
            box_coder=det_utils.BoxCoder(weights=cfg.bbox_weights), smooth_l1_beta=cfg.smooth_l1_beta,
        )
        self.box_coder = self.reg_head.box_coder  # decoding uses the coder the box loss encodes with
        self.image_head = image_head or ImageLevelHead(backbone.c5_channels, num_classes)
        self.prototype_head = prototype_head or PrototypeHead(momentum=cfg.prototype_momentum, margin=cfg.inter_margin)
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
    def from_config(cls, config: ModelConfig) -> OXNet:
        backbone = resnet_fpn_backbone(
            depth=config.depth,
            levels=config.levels,
            out_channels=config.fpn_width,
            weights=config.weights,
            freeze_bn=config.freeze_bn,
            norm=config.backbone_norm,
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
        grid_sizes = [(p.shape[-2], p.shape[-1]) for p in pyramid]
        return {
            "cls_logits": flatten_levels(level_cls, self.num_classes),
            "bbox_deltas": flatten_levels(level_reg, 4),
            "level_cls": level_cls,
            "c5": c5,
            "anchors": self.anchors((x.shape[-2], x.shape[-1]), grid_sizes, pyramid[0]),
        }

    def image_level(self, dense: dict[str, Any]) -> tuple[Tensor, Tensor]:
        """DAA (Eq. 2-3): image-level logits Tensor[B, N] and attention R Tensor[B, N, h, w]."""
        return self.image_head.attention_logits(dense["level_cls"], dense["c5"])

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

        full = [i for i, g in enumerate(gran) if g == FULL]
        real_positives = logits.new_zeros((), dtype=torch.int64)
        if full:
            box_losses, real_positives = self._box_losses(logits[full], deltas[full], anchors, [targets[i] for i in full])
            out.update(box_losses)

        cfg = self.config
        labelled = [i for i, g in enumerate(gran) if g in (FULL, WEAK)]
        if cfg.daa and labelled:
            image_logits, attention = self.image_level(dense)
            idx = torch.tensor(labelled, device=dev)
            y = torch.stack([targets[i]["image_labels"].to(dev, torch.float32) for i in labelled])
            known = torch.stack([_label_mask(targets[i], y[j]) for j, i in enumerate(labelled)])
            out["image_bce"] = self.image_head.compute_loss(image_logits[idx], y, known)
            if cfg.gpa:
                feats = self.prototype_head.features(dense["c5"][idx], attention[idx])
                self.update_prototypes(feats.detach(), image_logits[idx].detach().sigmoid(), y)
                out["prototype_intra"], out["prototype_inter"] = self.prototype_head.compute_loss(
                    feats, self.prototypes, self.prototype_initialized, y
                )

        soft = [i for i, g in enumerate(gran) if g in (WEAK, UNLABELED) and "soft_labels" in targets[i]]
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
        if g == FULL:
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
        if g in (FULL, WEAK):
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
            [lab.to(anchors.device)[s] if len(lab) else s for lab, s in zip(labels, safe)]
        )
        onehot = torch.zeros_like(logits)
        onehot.scatter_(2, matched_labels.unsqueeze(-1), fg.unsqueeze(-1).to(logits.dtype))
        return onehot, valid, fg, matched_boxes

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
        return {
            "classification": self.cls_head.compute_loss(logits, onehot, valid, norm),
            "bbox_regression": self.reg_head.compute_loss(deltas, anchors, matched_boxes, fg, norm),
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
        return {
            "soft_focal": self.cls_head.compute_soft_loss(logits, soft, valid, norm),
            "pseudo_bbox_regression": self.reg_head.compute_loss(deltas, anchors, matched_boxes, fg, norm),
        }

    @torch.no_grad()
    def update_prototypes(self, features: Tensor, probs: Tensor, labels: Tensor) -> None:
        """Eq. 5 on the prototype buffers (see :meth:`PrototypeHead.update`; all-reduced under
        torch.distributed, so every rank ends with the same prototypes)."""
        self.prototype_head.update(self.prototypes, self.prototype_initialized, features, probs, labels)

    # ---------------------------------------------------------------------------------------------
    # Inference
    # ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, images: Tensor | list[Tensor]) -> list[dict[str, Tensor]]:
        dense = self.dense(images)
        image_logits, attention = self.image_level(dense)
        detections = self.postprocess(
            dense["cls_logits"].float(), dense["bbox_deltas"].float(), dense["anchors"],
            image_size=(images[0].shape[-2], images[0].shape[-1]),
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
            boxes = clip_boxes_to_image(boxes, image_size)
            keep = batched_nms(boxes, top_scores, labels, nms_thresh)[:keep_n]
            results.append({"boxes": boxes[keep], "scores": top_scores[keep], "labels": labels[keep]})
        return results
