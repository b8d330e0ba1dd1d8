"""Anchor sizes fitted to a dataset's boxes, and how many boxes the anchors cover (numpy; no torch).

The detector's anchors (:meth:`oxnet.modeling.config.ModelConfig.anchor_settings`, torchvision's
``AnchorGenerator``): on pyramid level P_l a base size s_l at the scales k in {1, 2^(1/3), 2^(2/3)} and
each aspect ratio r = height / width, i.e. width s k / sqrt(r), height s k sqrt(r), so sqrt(w h) = s k.
RetinaNet's s_l = 2^(l+2) (32 to 512 px on P3-P7) was made for COCO's photographs; NIH's Cardiomegaly
and Effusion boxes are a third of the radiograph wide, and at a 256 px input the largest default anchors
are wider than the image. A box is learnt from the anchors it overlaps with IoU >= 0.5 (the matcher's
positives; torchvision's low-quality matches add a box's best anchor even below), so the share of boxes
with such an anchor says whether the anchors suit the data before anything is trained.

The fit (:func:`fit_anchor_sizes`) is k-means clustering of the boxes' sizes, one cluster per pyramid
level, as YOLO9000's "dimension clusters" (Redmon & Farhadi, CVPR 2017, section 2) but in one dimension,
log sqrt(w h) at the network input (a log-size distance, so a 10 px error counts more on a nodule than on
a heart); each level's middle scale sits on its cluster's centre. Lloyd's iterations start from the
quantiles (i + 1/2) / k, so the fit is deterministic. :func:`fit_anchor_ratios` clusters log(h / w) the
same way, one cluster per ratio.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from oxnet.data.annotation import iou_matrix
from oxnet.modeling.config import ANCHOR_SCALES, DEFAULT_ANCHOR_RATIOS, default_anchor_sizes

__all__ = [
    "anchor_grid", "anchor_report", "anchor_shapes", "best_grid_iou", "centred_iou", "coco_boxes", "fit_anchor_ratios",
    "fit_anchor_sizes", "input_box_sides", "kmeans_1d",
]

#: Quantiles of the box sizes that :func:`anchor_report` prints.
QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


def input_box_sides(boxes_wh: np.ndarray, image_wh: np.ndarray, image_size: int) -> np.ndarray:
    """Box widths and heights at the network input: images are resized to ``image_size`` x ``image_size``
    without keeping their aspect ratio (:func:`oxnet.data.transforms.resize_flip`), so a box's width
    scales by ``image_size / W`` and its height by ``image_size / H``.

    Args:
        boxes_wh: float[N, 2] box (width, height) in the pixels of their images.
        image_wh: float[N, 2] (width, height) of each box's image.
        image_size: side of the network input.

    Returns:
        float[N, 2] (width, height) at the network input.
    """
    boxes_wh, image_wh = np.asarray(boxes_wh, np.float64), np.asarray(image_wh, np.float64)
    if boxes_wh.ndim != 2 or boxes_wh.shape[1] != 2 or image_wh.shape != boxes_wh.shape:
        raise ValueError(f"boxes_wh and image_wh must both be [N, 2], got {boxes_wh.shape} and {image_wh.shape}")
    if not (np.isfinite(boxes_wh).all() and (boxes_wh > 0).all()):
        raise ValueError("boxes_wh must be positive and finite (a box of zero size has no shape to fit)")
    if not (np.isfinite(image_wh).all() and (image_wh > 0).all()):
        raise ValueError("image_wh must be positive and finite")
    if image_size < 1:
        raise ValueError(f"image_size must be >= 1, got {image_size}")
    return boxes_wh * (image_size / image_wh)


def kmeans_1d(values: np.ndarray, k: int, *, iterations: int = 100) -> np.ndarray:
    """Lloyd's k-means on numbers, started from the quantiles (i + 1/2) / k; float[k], sorted.

    A cluster that loses all its members keeps its centre."""
    values = np.asarray(values, np.float64).ravel()
    if k < 1 or len(values) < k:
        raise ValueError(f"k-means needs 1 <= k <= {len(values)} values, got k={k}")
    centres = np.quantile(values, (np.arange(k) + 0.5) / k)
    for _ in range(iterations):
        nearest = np.abs(values[:, None] - centres[None, :]).argmin(axis=1)
        counts = np.bincount(nearest, minlength=k)
        sums = np.bincount(nearest, weights=values, minlength=k)
        updated = np.where(counts > 0, sums / np.maximum(counts, 1), centres)
        if np.allclose(updated, centres, rtol=0.0, atol=1e-12):
            break
        centres = updated
    return np.sort(centres)


def fit_anchor_sizes(
    boxes_wh: np.ndarray, image_wh: np.ndarray, image_size: int, levels: Sequence[int]
) -> tuple[float, ...]:
    """Base anchor size per pyramid level (``ModelConfig.anchor_sizes``) fitted to the boxes' sizes at the
    network input: k-means on log sqrt(w h) with one cluster per level (see the module docstring); the
    level's base size is its centre / 2^(1/3), so its three scales are centred on the cluster.

    Args:
        boxes_wh: float[N, 2] (width, height) of the training boxes, in their images' pixels.
        image_wh: float[N, 2] (width, height) of each box's image.
        image_size: network input side (``ModelConfig.image_size``).
        levels: the pyramid levels (``ModelConfig.levels``), finest first.

    Returns:
        One size per level in input pixels, increasing, rounded to 0.01 px.

    Raises:
        ValueError: bad shapes or sizes, or fewer distinct box sizes than levels.

    The fit sees shapes only, not the levels' strides: a level whose stride is near its anchors' size
    places them too sparsely to reach IoU 0.5 wherever a box lies (e.g. NIH's large boxes at 256 px go to
    P6-P7, strides 64 and 128). :func:`anchor_report`'s ``grid`` coverage shows that; fewer, finer levels
    (``levels=(2, 3, 4, 5)``) are the remedy there.
    """
    sides = input_box_sides(boxes_wh, image_wh, image_size)
    if len(sides) < len(levels):
        raise ValueError(f"fitting {len(levels)} anchor sizes needs at least {len(levels)} boxes, got {len(sides)}")
    centres = np.exp(kmeans_1d(0.5 * np.log(sides).sum(axis=1), len(levels)))
    sizes = tuple(round(float(c / ANCHOR_SCALES[1]), 2) for c in centres)
    if any(b <= a for a, b in zip(sizes, sizes[1:])):
        raise ValueError(f"the boxes have fewer distinct sizes than the {len(levels)} levels (fitted {sizes}); use fewer levels")
    return sizes


def fit_anchor_ratios(
    boxes_wh: np.ndarray, image_wh: np.ndarray, image_size: int, count: int = len(DEFAULT_ANCHOR_RATIOS)
) -> tuple[float, ...]:
    """``count`` aspect ratios (height / width at the network input, ``ModelConfig.anchor_ratios``):
    k-means on log(h / w), increasing, rounded to 0.001 (duplicates merged)."""
    sides = input_box_sides(boxes_wh, image_wh, image_size)
    centres = np.exp(kmeans_1d(np.log(sides[:, 1] / sides[:, 0]), count))
    return tuple(sorted({round(float(c), 3) for c in centres}))


def anchor_shapes(sizes: Sequence[float], ratios: Sequence[float]) -> np.ndarray:
    """float[A, 2] (width, height) of every anchor of every level as the model has them: base size x
    scale x ratio, each half side rounded to a whole pixel (torchvision's ``generate_anchors``), in the
    anchor generator's order within a level (ratio-major)."""
    r = np.sqrt(np.asarray(ratios, np.float64))
    scaled = np.asarray(sizes, np.float64)[:, None] * np.asarray(ANCHOR_SCALES)[None, :]  # [L, S]
    w = (scaled[:, None, :] / r[None, :, None]).reshape(-1)
    h = (scaled[:, None, :] * r[None, :, None]).reshape(-1)
    return 2 * np.round(np.stack([w, h], axis=1) / 2)


def centred_iou(boxes_wh: np.ndarray, anchors_wh: np.ndarray) -> np.ndarray:
    """IoU of box shapes with anchor shapes placed on the same centre: float[N, A].

    Shape only: a box's best value is what an anchor at its exact centre would give (an upper bound of
    :func:`best_grid_iou`, where anchors sit on the pyramid's grid)."""
    boxes_wh, anchors_wh = np.asarray(boxes_wh, np.float64), np.asarray(anchors_wh, np.float64)
    inter = np.minimum(boxes_wh[:, None, 0], anchors_wh[None, :, 0]) * np.minimum(boxes_wh[:, None, 1], anchors_wh[None, :, 1])
    union = boxes_wh.prod(axis=1)[:, None] + anchors_wh.prod(axis=1)[None, :] - inter
    return inter / union


def anchor_grid(sizes: Sequence[float], ratios: Sequence[float], levels: Sequence[int], image_size: int) -> np.ndarray:
    """float[A, 4] (x1, y1, x2, y2): the model's anchors on an ``image_size`` square input, in its order.

    As :meth:`oxnet.modeling.detector.OXNet.anchors` (torchvision's ``AnchorGenerator``): level l has a
    ceil(image_size / 2^l) grid (every stride-2 convolution rounds up), stride image_size // grid, anchor
    centres at the cells' top-left corners (torchvision's convention), shapes of :func:`anchor_shapes`."""
    per_level = len(ANCHOR_SCALES) * len(ratios)
    shapes = anchor_shapes(sizes, ratios).reshape(len(levels), per_level, 2)
    out = []
    for lvl, wh in zip(levels, shapes):
        grid = -(-image_size // 2**lvl)
        stride = image_size // grid
        cell = np.concatenate([-wh / 2, wh / 2], axis=1)  # [K, 4], centred on 0
        ys, xs = np.meshgrid(np.arange(grid) * stride, np.arange(grid) * stride, indexing="ij")
        shifts = np.stack([xs.ravel(), ys.ravel(), xs.ravel(), ys.ravel()], axis=1)
        out.append((shifts[:, None, :] + cell[None, :, :]).reshape(-1, 4))
    return np.concatenate(out).astype(np.float64)


def best_grid_iou(boxes: np.ndarray, anchors: np.ndarray, *, chunk: int = 64) -> np.ndarray:
    """float[N]: each box's largest IoU with any anchor; boxes float[N, 4] and anchors float[A, 4] in
    (x1, y1, x2, y2) (:func:`oxnet.data.annotation.iou_matrix`, chunked over boxes to bound memory)."""
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    best = np.zeros(len(boxes))
    for start in range(0, len(boxes), chunk):
        best[start:start + chunk] = iou_matrix(boxes[start:start + chunk], anchors).max(axis=1)
    return best


def coco_boxes(dataset: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """The boxes of a COCO file, float[N, 4] (x1, y1, x2, y2) in image pixels, and their images' (width,
    height), float[N, 2]. Reads the JSON only (the images need not be at hand).

    Raises:
        ValueError: naming the file, when it has no boxes or an annotation or image lacks its fields.
    """
    coco = json.loads(Path(dataset).read_text(encoding="utf-8"))
    try:
        sizes = {im["id"]: (float(im["width"]), float(im["height"])) for im in coco["images"]}
        xywh = np.array([a["bbox"] for a in coco.get("annotations", [])], np.float64).reshape(-1, 4)
        image_wh = np.array([sizes[a["image_id"]] for a in coco.get("annotations", [])], np.float64).reshape(-1, 2)
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{dataset}: not a COCO detection file with image width/height and annotation bbox ({e!r})") from e
    if len(xywh) == 0:
        raise ValueError(f"{dataset}: no boxes to fit anchors to")
    return np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1), image_wh


def anchor_report(
    dataset: str | Path, image_size: int, levels: Sequence[int] = (3, 4, 5, 6, 7), *, threshold: float = 0.5
) -> dict[str, Any]:
    """Fit anchors to the boxes of a COCO file and compare their coverage with the default anchors.

    Coverage is the share of boxes whose best anchor has IoU >= ``threshold`` (the matcher's positive
    threshold): ``centred`` with the anchor on the box's centre (shape only), ``grid`` with the model's
    anchors where they really are on the input (the boxes resized as the model resizes images).

    Returns:
        A JSON-ready dict: ``boxes``, ``box_size_quantiles`` (sqrt(w h) at the input, px),
        ``box_ratio_quantiles`` (h / w), and for ``default``, ``fitted_sizes`` (fitted sizes, default
        ratios) and ``fitted`` (fitted sizes and ratios): ``anchor_sizes``, ``anchor_ratios``, ``coverage``.
        ``best`` names the set that covers most boxes on the grid, and ``model_options`` gives it as
        ``oxnet train`` options (None when that is the default).
    """
    levels = tuple(levels)
    boxes, image_wh = coco_boxes(dataset)
    boxes_wh = boxes[:, 2:] - boxes[:, :2]
    sides = input_box_sides(boxes_wh, image_wh, image_size)
    scale = np.tile(image_size / image_wh, 2)
    input_boxes = boxes * scale  # the stretch resize of resize_flip
    sizes = fit_anchor_sizes(boxes_wh, image_wh, image_size, levels)
    ratios = fit_anchor_ratios(boxes_wh, image_wh, image_size)
    candidates = {
        "default": (default_anchor_sizes(levels), DEFAULT_ANCHOR_RATIOS),
        "fitted_sizes": (sizes, DEFAULT_ANCHOR_RATIOS),
        "fitted": (sizes, ratios),
    }
    report: dict[str, Any] = {
        "dataset": str(dataset), "boxes": int(len(boxes)), "image_size": image_size, "levels": list(levels),
        "iou_threshold": threshold,
        "box_size_quantiles": _quantiles(np.sqrt(sides.prod(axis=1))),
        "box_ratio_quantiles": _quantiles(sides[:, 1] / sides[:, 0], digits=3),
    }
    for name, (s, r) in candidates.items():
        centred = centred_iou(sides, anchor_shapes(s, r)).max(axis=1)
        grid = best_grid_iou(input_boxes, anchor_grid(s, r, levels, image_size))
        report[name] = {"anchor_sizes": [round(float(v), 2) for v in s], "anchor_ratios": list(r),
                        "coverage": {"centred": _share(centred >= threshold), "grid": _share(grid >= threshold)}}
    best = max(candidates, key=lambda n: report[n]["coverage"]["grid"])  # the first of equals: default
    report["best"] = best
    report["model_options"] = None if best == "default" else " ".join(
        f"--model-option {key}=({','.join(map(str, report[best][key]))})"
        for key in ("anchor_sizes", "anchor_ratios")[: 2 if best == "fitted" else 1]
    )
    return report


def _quantiles(values: np.ndarray, digits: int = 1) -> dict[str, float]:
    return {f"{round(q * 100)}%": round(float(v), digits) for q, v in zip(QUANTILES, np.quantile(values, QUANTILES))}


def _share(hits: np.ndarray) -> float:
    return round(float(hits.mean()), 4)
