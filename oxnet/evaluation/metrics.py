"""Detection and image-level evaluation through the COCO API (pycocotools), in memory.

The OXnet paper reports COCO-style average precision at the IoU thresholds 0.40:0.05:0.75 (lesions in
chest X-rays are loosely delineated, so the usual 0.50:0.95 is too strict), AP at 0.40 and 0.75, AP by
object size and, for the image-level (DAA) head, ROC AUC per class.

Example::

    >>> from oxnet.evaluation.metrics import evaluate
    >>> gt = {
    ...     "images": [{"id": 1, "width": 64, "height": 64}],
    ...     "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [8, 8, 16, 16]}],
    ...     "categories": [{"id": 1, "name": "Nodule"}],
    ... }
    >>> pred = [{"image_id": 1, "boxes": [[8, 8, 24, 24]], "scores": [0.9], "labels": [1]}]
    >>> round(evaluate(gt, pred)["mAP"], 6)
    1.0
"""

from __future__ import annotations

import contextlib
import io
import math
import operator
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from oxnet.vocabulary import (
    AP40, AP50, AP75, AP_L, AP_M, AP_S, IMAGE_AUC, MAP, MEAN_IMAGE_AUC, PER_CLASS_AP, SCORE_THRESHOLD,
)

__all__ = ["DEFAULT_IOU_THRESHOLDS", "coco_results", "evaluate", "roc_auc"]

#: IoU thresholds of the OXnet paper, 0.40:0.05:0.75. Rounded so that 0.5 and 0.75 compare exactly.
DEFAULT_IOU_THRESHOLDS: tuple[float, ...] = tuple(np.round(np.linspace(0.40, 0.75, 8), 2).tolist())

#: Maximum detections per image and class, as in COCO's headline AP.
MAX_DETECTIONS = 100

# COCOeval's area ranges, in the order of its precision array's A axis (pixels^2).
_AREA_INDEX = {AP_S: 1, AP_M: 2, AP_L: 3}


def _to_numpy(value: Any) -> np.ndarray:
    """Array-like or tensor (any device) -> numpy array, without importing torch."""
    if hasattr(value, "detach"):
        value = value.detach().cpu()
        if value.is_floating_point():
            value = value.float()  # numpy has no bfloat16
    return np.asarray(value)


def _image_id(value: Any, where: str) -> int:
    try:
        return operator.index(value.item() if hasattr(value, "item") else value)
    except TypeError:
        raise TypeError(f"{where}: image_id must be an integer, got {value!r}") from None


def _prediction_arrays(prediction: Mapping[str, Any], where: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Validated (boxes Tensor[N, 4] x1 y1 x2 y2 float64, scores [N] float64, labels [N] int64)."""
    for key in ("image_id", "boxes", "scores", "labels"):
        if key not in prediction:
            raise ValueError(f"{where}: missing key {key!r}")
    boxes = _to_numpy(prediction["boxes"])
    scores = _to_numpy(prediction["scores"])
    labels = _to_numpy(prediction["labels"])
    if boxes.size == 0:
        boxes = boxes.reshape(0, 4)
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"{where}: 'boxes' must have shape [N, 4] (x1, y1, x2, y2), got {list(boxes.shape)}")
    n = boxes.shape[0]
    if scores.shape != (n,) or labels.shape != (n,):
        raise ValueError(
            f"{where}: 'scores' and 'labels' must have shape [{n}] to match 'boxes', "
            f"got {list(scores.shape)} and {list(labels.shape)}"
        )
    if n and labels.dtype.kind not in "iu":
        raise TypeError(f"{where}: 'labels' must be integer category ids, got dtype {labels.dtype}")
    boxes = boxes.astype(np.float64)
    scores = scores.astype(np.float64)
    if not np.isfinite(boxes).all():
        raise ValueError(f"{where}: 'boxes' contains NaN or infinite values")
    if not np.isfinite(scores).all():
        raise ValueError(f"{where}: 'scores' contains NaN or infinite values")
    if (boxes[:, 2] < boxes[:, 0]).any() or (boxes[:, 3] < boxes[:, 1]).any():
        raise ValueError(f"{where}: 'boxes' must be (x1, y1, x2, y2) with x2 >= x1 and y2 >= y1")
    return boxes, scores, labels.astype(np.int64)


def coco_results(predictions: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Convert per-image predictions to COCO results records (the format of ``COCO.loadRes``).

    Args:
        predictions: per-image dicts with ``"image_id"`` (int), ``"boxes"`` (Tensor[N, 4] or array-like,
            (x1, y1, x2, y2) in pixels), ``"scores"`` (N) and ``"labels"`` (N, COCO category ids).
            Torch tensors on any device and numpy arrays are accepted.

    Returns:
        One record per box: ``{"image_id": int, "category_id": int, "bbox": [x, y, w, h], "score": float}``,
        in input order, plain Python types (JSON-serialisable).

    Raises:
        ValueError: a key is missing, shapes disagree, or a box or score is NaN/infinite or inverted.
        TypeError: ``image_id`` or ``labels`` are not integers.
    """
    records: list[dict[str, Any]] = []
    for i, prediction in enumerate(predictions):
        where = f"predictions[{i}]"
        if not isinstance(prediction, Mapping):
            raise TypeError(f"{where}: expected a dict, got {type(prediction).__name__}")
        boxes, scores, labels = _prediction_arrays(prediction, where)
        image_id = _image_id(prediction["image_id"], where)
        xywh = np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1)
        records.extend(
            {"image_id": image_id, "category_id": label, "bbox": bbox, "score": score}
            for bbox, score, label in zip(xywh.tolist(), scores.tolist(), labels.tolist())
        )
    return records


def roc_auc(scores: Any, truth: Any) -> float | None:
    """Area under the ROC curve by the rank (Mann-Whitney) formula; tied scores count one half.

    Args:
        scores: Tensor[N] or array-like of real scores.
        truth: Tensor[N] or array-like of booleans (or 0/1), ``True`` = positive.

    Returns:
        The AUC in [0, 1], or ``None`` when it is undefined (no positives or no negatives).
    """
    scores = _to_numpy(scores).astype(np.float64).ravel()
    truth = _to_numpy(truth).astype(bool).ravel()
    if scores.shape != truth.shape:
        raise ValueError(f"roc_auc: scores {list(scores.shape)} and truth {list(truth.shape)} differ in shape")
    n_pos = int(truth.sum())
    n_neg = truth.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    # 1-based ranks, tied scores share the mean of the ranks they span.
    _, group, counts = np.unique(scores, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    ranks = (ends - (counts - 1) / 2.0)[group]
    return float((ranks[truth].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def _gt_dataset(ground_truth: Mapping[str, Any]) -> dict[str, Any]:
    """A validated copy of a COCO dict that pycocotools can evaluate.

    Annotations get ids 1..K (COCOeval treats id 0 as "unmatched"), ``iscrowd`` 0 and ``area`` w*h
    where missing; every other field is dropped.
    """
    if not isinstance(ground_truth, Mapping):
        raise TypeError(f"ground_truth: expected a COCO dict, got {type(ground_truth).__name__}")
    for key in ("images", "categories"):
        if key not in ground_truth:
            raise ValueError(f"ground_truth: missing key {key!r}")
    categories = []
    for i, category in enumerate(ground_truth["categories"]):
        if "id" not in category or "name" not in category:
            raise ValueError(f"ground_truth['categories'][{i}]: needs 'id' and 'name'")
        categories.append({"id": int(category["id"]), "name": str(category["name"])})
    if not categories:
        raise ValueError("ground_truth: 'categories' is empty")
    category_ids = {c["id"] for c in categories}
    if len(category_ids) != len(categories):
        raise ValueError("ground_truth: duplicate category ids in 'categories'")
    images = []
    for i, image in enumerate(ground_truth["images"]):
        image_labels = image.get("image_labels", [])
        if isinstance(image_labels, str) or not isinstance(image_labels, Sequence):
            raise ValueError(f"ground_truth['images'][{i}]: 'image_labels' must be a list of class names")
        images.append({"id": _image_id(image.get("id"), f"ground_truth['images'][{i}]"), "image_labels": image_labels})
    image_ids = {image["id"] for image in images}
    if len(image_ids) != len(images):
        raise ValueError("ground_truth: duplicate image ids in 'images'")
    annotations: list[dict[str, Any]] = []
    for i, ann in enumerate(ground_truth.get("annotations", [])):
        where = f"ground_truth['annotations'][{i}]"
        image_id = _image_id(ann.get("image_id"), where)
        if image_id not in image_ids:
            raise ValueError(f"{where}: image_id {image_id} is not in ground_truth['images']")
        if ann.get("category_id") not in category_ids:
            raise ValueError(f"{where}: category_id {ann.get('category_id')!r} is not in ground_truth['categories']")
        bbox = [float(v) for v in ann.get("bbox", ())]
        if len(bbox) != 4 or not all(math.isfinite(v) for v in bbox) or bbox[2] < 0 or bbox[3] < 0:
            raise ValueError(f"{where}: 'bbox' must be 4 finite numbers [x, y, w, h] with w, h >= 0")
        annotations.append(
            {
                "id": len(annotations) + 1,
                "image_id": image_id,
                "category_id": int(ann["category_id"]),
                "bbox": bbox,
                "area": float(ann.get("area", bbox[2] * bbox[3])),
                "iscrowd": int(ann.get("iscrowd", 0)),
            }
        )
    return {"images": images, "annotations": annotations, "categories": categories}


def _coco(dataset: dict[str, Any]) -> COCO:
    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def _mean_defined(precision: np.ndarray) -> float | None:
    """Mean of a slice of COCOeval's precision array over its defined (> -1) entries."""
    defined = precision[precision > -1]
    return float(defined.mean()) if defined.size else None


def _score_threshold(precision: np.ndarray, scores: np.ndarray, thresholds: np.ndarray,
                     *, iou: float = 0.5, min_precision: float = 0.5) -> float | None:
    """The detection score above which boxes are worth showing: per class, the lowest score whose
    detections at or above it are at least ``min_precision`` correct at IoU ``iou`` (COCO's interpolated
    precision, which never rises with recall); the median over classes that reach it. ``precision`` and
    ``scores`` are COCOeval's [T, R, K, A] arrays (``-1`` where undefined); the IoU nearest ``iou`` is used."""
    t = int(np.argmin(np.abs(thresholds - iou)))
    per_class = []
    for k in range(precision.shape[2]):
        good = (precision[t, :, k, 0] >= min_precision) & (scores[t, :, k, 0] > 0)
        if good.any():
            per_class.append(float(scores[t, good, k, 0].min()))
    return float(np.median(per_class)) if per_class else None


def _iou_thresholds(iou_thresholds: Sequence[float] | None) -> np.ndarray:
    if iou_thresholds is None:
        return np.asarray(DEFAULT_IOU_THRESHOLDS)
    thresholds = np.asarray(iou_thresholds, dtype=np.float64).ravel()
    if thresholds.size == 0 or not ((thresholds > 0) & (thresholds <= 1)).all():
        raise ValueError(f"iou_thresholds must be a non-empty sequence of values in (0, 1], got {iou_thresholds!r}")
    return np.unique(thresholds)


def evaluate(
    ground_truth: Mapping[str, Any],
    predictions: Sequence[Mapping[str, Any]],
    *,
    iou_thresholds: Sequence[float] | None = None,
) -> dict[str, Any]:
    """Box AP (COCO API) and image-level ROC AUC of a detector on a fully labeled set of images.

    Every image of ``ground_truth`` is evaluated, also images without boxes (their detections are false
    positives) and images without a prediction (they have no detections). Nothing is written to disk.

    Args:
        ground_truth: a COCO dict: ``"images"`` (``id``; optional ``image_labels``, a list of class names
            present in the image), ``"annotations"`` (``image_id``, ``category_id``, ``bbox`` [x, y, w, h];
            ``iscrowd`` defaults to 0 and ``area`` to w*h) and ``"categories"`` (``id``, ``name``).
        predictions: per-image dicts: ``"image_id"``, ``"boxes"`` (Tensor[N, 4] or array-like,
            (x1, y1, x2, y2) in the pixels of ``ground_truth``), ``"scores"`` (N), ``"labels"`` (N, COCO
            category ids of ``ground_truth``) and optionally ``"image_probs"`` (C, image-level
            probabilities, aligned with the categories sorted by id). Tensors on any device are accepted.
        iou_thresholds: IoU thresholds to average over; default 0.40:0.05:0.75 (OXnet paper).

    Returns:
        A dict of floats in [0, 1] (``None`` where undefined):

        - ``"mAP"``: AP averaged over the IoU thresholds and over classes with at least one GT box;
        - ``"AP40"``, ``"AP50"``, ``"AP75"``: AP at IoU 0.40 / 0.50 / 0.75 (``None`` if not among the
          thresholds);
        - ``"AP_S"``, ``"AP_M"``, ``"AP_L"``: as ``"mAP"`` for GT boxes of COCO's small (< 32^2 px),
          medium and large (> 96^2 px) area ranges, over classes with GT in that range;
        - ``"per_class_AP"``: {class name: AP over the thresholds, ``None`` for classes without GT box};
        - ``"score_threshold"``: the score above which at least half of the detections are correct at IoU
          0.5 (the lowest such score per class, median over classes; ``None`` when no class gets there);
          the Annotate page's default suggestion threshold;
        - ``"image_auc"``: {class name: ROC AUC of ``image_probs`` against image-level truth (the image
          has a box of the class or lists it in ``image_labels``), ``None`` when there are no positive
          or no negative images or no ``image_probs``};
        - ``"mean_image_auc"``: mean of the defined AUCs, or ``None``;
        - ``"num_images"``, ``"num_gt_boxes"`` (ints) and ``"iou_thresholds"`` (list of floats).

        AP is COCO's 101-point interpolated precision with at most 100 detections per image and class.

    Raises:
        ValueError: malformed ground truth or predictions, a prediction for an image id not in
            ``ground_truth``, an unknown category id, NaN boxes/scores/probabilities, or ``image_probs``
            given for some images only.
        TypeError: non-integer ids or labels, or inputs that are not dicts.
    """
    thresholds = _iou_thresholds(iou_thresholds)
    predictions = list(predictions)
    gt_dataset = _gt_dataset(ground_truth)
    categories = sorted(gt_dataset["categories"], key=lambda c: c["id"])
    category_ids = [c["id"] for c in categories]
    image_ids = [image["id"] for image in gt_dataset["images"]]
    index_of_image = {image_id: i for i, image_id in enumerate(image_ids)}

    # Detections, with image-level probabilities collected on the way.
    detections = coco_results(predictions)
    probs = np.full((len(image_ids), len(categories)), np.nan)
    seen: set[int] = set()
    with_probs = 0
    for i, prediction in enumerate(predictions):
        image_id = _image_id(prediction["image_id"], f"predictions[{i}]")
        if image_id not in index_of_image:
            raise ValueError(f"predictions[{i}]: image_id {image_id} is not in ground_truth['images']")
        if image_id in seen:
            raise ValueError(f"predictions[{i}]: a second prediction for image_id {image_id}")
        seen.add(image_id)
        if prediction.get("image_probs") is not None:
            image_probs = _to_numpy(prediction["image_probs"]).astype(np.float64)
            if image_probs.shape != (len(categories),):
                raise ValueError(
                    f"predictions[{i}]: 'image_probs' must have shape [{len(categories)}] (one per category), "
                    f"got {list(image_probs.shape)}"
                )
            if not np.isfinite(image_probs).all():
                raise ValueError(f"predictions[{i}]: 'image_probs' contains NaN or infinite values")
            probs[index_of_image[image_id]] = image_probs
            with_probs += 1
    unknown = {d["category_id"] for d in detections} - set(category_ids)
    if unknown:
        raise ValueError(
            f"predictions: labels {sorted(unknown)} are not category ids of ground_truth (expected {category_ids})"
        )
    if 0 < with_probs < len(image_ids):
        missing = next(image_id for image_id, row in zip(image_ids, probs) if np.isnan(row).any())
        raise ValueError(f"predictions: 'image_probs' given for some images but not for image_id {missing}")

    # Box AP through COCOeval.
    dt_dataset = {
        "images": gt_dataset["images"],
        "categories": gt_dataset["categories"],
        "annotations": [
            {**d, "id": k + 1, "area": d["bbox"][2] * d["bbox"][3], "iscrowd": 0} for k, d in enumerate(detections)
        ],
    }
    coco_eval = COCOeval(_coco(gt_dataset), _coco(dt_dataset), iouType="bbox")
    coco_eval.params.imgIds = sorted(image_ids)
    coco_eval.params.catIds = category_ids
    coco_eval.params.iouThrs = thresholds
    coco_eval.params.maxDets = [MAX_DETECTIONS]
    with contextlib.redirect_stdout(io.StringIO()):
        coco_eval.evaluate()
        coco_eval.accumulate()
    precision = coco_eval.eval["precision"][..., 0]  # [T, R, K, A]

    def ap_at(iou: float) -> float | None:
        (match,) = np.nonzero(np.isclose(thresholds, iou))
        return _mean_defined(precision[match[0], :, :, 0]) if match.size else None

    metrics: dict[str, Any] = {
        MAP: _mean_defined(precision[..., 0]),
        AP40: ap_at(0.40),
        AP50: ap_at(0.50),
        AP75: ap_at(0.75),
        **{key: _mean_defined(precision[..., a]) for key, a in _AREA_INDEX.items()},
        PER_CLASS_AP: {c["name"]: _mean_defined(precision[:, :, k, 0]) for k, c in enumerate(categories)},
        SCORE_THRESHOLD: _score_threshold(precision, coco_eval.eval["scores"][..., 0], thresholds),
    }

    # Image-level AUC: positive = a GT box of the class or the class named in image_labels.
    truth = np.zeros((len(image_ids), len(categories)), dtype=bool)
    column = {c["id"]: k for k, c in enumerate(categories)}
    column_of_name = {c["name"]: k for k, c in enumerate(categories)}
    for ann in gt_dataset["annotations"]:
        truth[index_of_image[ann["image_id"]], column[ann["category_id"]]] = True
    for image in gt_dataset["images"]:
        for name in image["image_labels"]:
            if name in column_of_name:
                truth[index_of_image[image["id"]], column_of_name[name]] = True
    image_auc = {
        c["name"]: roc_auc(probs[:, k], truth[:, k]) if with_probs else None for k, c in enumerate(categories)
    }
    defined = [auc for auc in image_auc.values() if auc is not None]
    metrics.update({
        IMAGE_AUC: image_auc,
        MEAN_IMAGE_AUC: float(np.mean(defined)) if defined else None,
        "num_images": len(image_ids),
        "num_gt_boxes": len(gt_dataset["annotations"]),
        "iou_thresholds": thresholds.tolist(),
    })
    return metrics
