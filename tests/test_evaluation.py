"""oxnet.evaluation.metrics on constructed cases whose answers are known by hand, plus a pairwise AUC oracle."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import oxnet
from oxnet.evaluation.metrics import DEFAULT_IOU_THRESHOLDS, coco_results, evaluate, roc_auc

NIH = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "nih-cxr"
CATEGORIES = [{"id": 1, "name": "Mass"}, {"id": 2, "name": "Nodule"}]
# COCO's 101 recall thresholds 0.00, 0.01, ..., 1.00.
NUM_RECALL_THRESHOLDS = 101


def make_gt(num_images: int, annotations: list[dict], image_fields: dict[int, dict] | None = None) -> dict:
    """Images 1..num_images (512 px), extra fields per image id, and the given annotations."""
    image_fields = image_fields or {}
    images = [{"id": i, "width": 512, "height": 512, **image_fields.get(i, {})} for i in range(1, num_images + 1)]
    for k, ann in enumerate(annotations, start=1):
        ann.setdefault("id", k)
    return {"images": images, "annotations": annotations, "categories": CATEGORIES}


def box(image_id: int, category_id: int, x: float, y: float, w: float, h: float) -> dict:
    return {"image_id": image_id, "category_id": category_id, "bbox": [x, y, w, h]}


def pred(image_id: int, boxes: list, scores: list, labels: list, **extra) -> dict:
    return {"image_id": image_id, "boxes": boxes, "scores": scores, "labels": labels, **extra}


def perfect_predictions(gt: dict) -> list[dict]:
    """The GT boxes as (x1, y1, x2, y2) float32 tensors, score 1, one dict per image."""
    out = []
    for image in gt["images"]:
        anns = [a for a in gt["annotations"] if a["image_id"] == image["id"]]
        xywh = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        out.append(
            pred(
                image["id"],
                torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], dim=1),
                torch.ones(len(anns)),
                torch.tensor([a["category_id"] for a in anns], dtype=torch.int64),
            )
        )
    return out


def pairwise_auc(scores: np.ndarray, truth: np.ndarray) -> float:
    """Oracle: the fraction of (positive, negative) pairs ranked right, ties counting one half."""
    pos, neg = scores[truth], scores[~truth]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


def test_default_iou_thresholds_are_exact():
    assert DEFAULT_IOU_THRESHOLDS == (0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7, 0.75)


def test_lazy_export():
    assert oxnet.evaluate is evaluate


def test_perfect_predictions_give_one():
    gt = make_gt(
        4,
        [
            box(1, 1, 10, 10, 20, 20),  # small (area 400 < 32^2)
            box(1, 2, 100, 100, 50, 60),  # medium
            box(2, 1, 50, 60, 200, 150),  # large
            box(3, 2, 300, 300, 40, 40),  # medium
        ],
    )  # image 4 has no boxes
    metrics = evaluate(gt, perfect_predictions(gt))
    for key in ("mAP", "AP40", "AP50", "AP75", "AP_S", "AP_M", "AP_L"):
        assert metrics[key] == pytest.approx(1.0), key
    assert metrics["per_class_AP"] == pytest.approx({"Mass": 1.0, "Nodule": 1.0})
    assert metrics["num_images"] == 4
    assert metrics["num_gt_boxes"] == 4
    assert metrics["iou_thresholds"] == list(DEFAULT_IOU_THRESHOLDS)


@pytest.mark.parametrize(("height", "passed"), [(4.3, 1), (4.8, 2)])
def test_box_between_thresholds_counts_only_below_its_iou(height, passed):
    # GT 10x10 at the origin, detection 10 x height inside it: IoU = height / 10 (0.43 or 0.48).
    # It matches at the IoU thresholds <= its IoU: 0.40 (and 0.45), not 0.50 and above.
    gt = make_gt(1, [box(1, 1, 0, 0, 10, 10)])
    metrics = evaluate(gt, [pred(1, [[0, 0, 10, height]], [0.9], [1])])
    assert metrics["AP40"] == pytest.approx(1.0)
    assert metrics["AP50"] == 0.0
    assert metrics["AP75"] == 0.0
    assert metrics["mAP"] == pytest.approx(passed / 8)
    assert metrics["per_class_AP"] == pytest.approx({"Mass": passed / 8, "Nodule": None})


def test_one_false_positive_and_one_miss_hand_computed():
    # Two GT boxes; detections ranked: a false positive (0.9), then a hit on the first box (0.8); the
    # second box is missed. Cumulative precision/recall after each detection: (0, 0), (1/2, 1/2).
    # 101-point interpolated precision p(r) = max precision at recall >= r: 1/2 for r <= 1/2, 0 above
    # (recall never exceeds 1/2). Thresholds 0.00..0.50 are 51 of 101, so AP = 51 * (1/2) / 101 at every
    # IoU threshold (the hit is exact, the false positive overlaps nothing).
    expected = 51 * 0.5 / NUM_RECALL_THRESHOLDS
    gt = make_gt(2, [box(1, 1, 10, 10, 50, 50), box(2, 1, 100, 100, 50, 50)])
    predictions = [
        pred(1, [[10, 10, 60, 60], [200, 200, 250, 250]], [0.8, 0.9], [1, 1]),
        pred(2, [], [], []),
    ]
    metrics = evaluate(gt, predictions)
    assert metrics["mAP"] == pytest.approx(expected)
    assert metrics["AP40"] == pytest.approx(expected)
    assert metrics["AP75"] == pytest.approx(expected)
    assert metrics["AP_M"] == pytest.approx(expected)
    assert metrics["AP_S"] is None and metrics["AP_L"] is None  # no GT box in those ranges


def _slow_score_threshold(gt: dict, predictions: list[dict], min_precision: float = 0.5) -> float | None:
    """Oracle: per class, rank the detections by score, match each greedily to an unmatched GT box of its
    image at IoU >= 0.5, and take the lowest score of a hit whose cut reaches the precision (precision at
    a cut = the best precision of any lower cut, as COCO interpolates; a false positive adds no recall, so
    it never sets the threshold); median over classes."""
    from torchvision.ops import box_iou
    import torch

    chosen = []
    for category in {c["id"] for c in gt["categories"]}:
        gts = {}
        for a in gt["annotations"]:
            if a["category_id"] == category:
                x, y, w, h = a["bbox"]
                gts.setdefault(a["image_id"], []).append([x, y, x + w, y + h])
        dets = sorted(((s, p["image_id"], b) for p in predictions for b, s, label in zip(p["boxes"], p["scores"], p["labels"])
                       if label == category), key=lambda d: -d[0])
        used, hits, points = set(), 0, []
        for n, (score, image, b) in enumerate(dets, 1):
            candidates = gts.get(image, [])
            if candidates:
                ious = box_iou(torch.tensor([b], dtype=torch.float64), torch.tensor(candidates, dtype=torch.float64))[0]
                best = max((i for i in range(len(candidates)) if (image, i) not in used and ious[i] >= 0.5),
                           key=lambda i: ious[i], default=None)
                if best is not None:
                    used.add((image, best))
                    hits += 1
            points.append((score, hits / n, best is not None if candidates else False))
        good = [score for n, (score, _, hit) in enumerate(points) if hit and max(p for _, p, _ in points[n:]) >= min_precision]
        if good and sum(len(v) for v in gts.values()):
            chosen.append(min(good))
    return float(np.median(chosen)) if chosen else None


def test_score_threshold_is_where_half_the_detections_are_right():
    # Mass: hit 0.9, false positive 0.8, hit 0.7, false positives 0.6 and 0.5. Precision at each cut:
    # 1, 1/2, 2/3, 1/2, 2/5: the lowest hit with precision >= 1/2 is 0.7 (0.6 would only add a false
    # positive). Nodule: a lone false positive, no threshold; the median over classes is Mass's.
    gt = make_gt(3, [box(1, 1, 10, 10, 50, 50), box(2, 1, 10, 10, 50, 50), box(3, 2, 10, 10, 40, 40)])
    predictions = [
        pred(1, [[10, 10, 60, 60], [200, 200, 250, 250], [100, 100, 140, 140]], [0.9, 0.8, 0.6], [1, 1, 1]),
        pred(2, [[10, 10, 60, 60], [300, 300, 350, 350]], [0.7, 0.5], [1, 1]),
        pred(3, [[200, 200, 240, 240]], [0.95], [2]),
    ]
    metrics = evaluate(gt, predictions)
    assert metrics["score_threshold"] == pytest.approx(0.7) == _slow_score_threshold(gt, predictions)
    assert evaluate(gt, [pred(i, [], [], []) for i in (1, 2, 3)])["score_threshold"] is None


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_score_threshold_matches_the_loop_oracle(seed):
    rng = np.random.default_rng(seed)
    annotations = [box(i, int(rng.integers(1, 3)), *map(float, rng.uniform(0, 100, 2)), 40.0, 40.0) for i in range(1, 7)]
    gt = make_gt(6, annotations)
    predictions = []
    for i in range(1, 7):
        truth = [a for a in annotations if a["image_id"] == i]
        boxes = [[a["bbox"][0] + rng.uniform(-4, 4), a["bbox"][1], a["bbox"][0] + 40, a["bbox"][1] + 40] for a in truth]
        boxes += [[x, x, x + 30, x + 30] for x in rng.uniform(150, 300, 2)]
        labels = [a["category_id"] for a in truth] + [int(c) for c in rng.integers(1, 3, 2)]
        predictions.append(pred(i, boxes, [float(s) for s in rng.uniform(0.05, 1, len(boxes))], labels))
    assert evaluate(gt, predictions)["score_threshold"] == pytest.approx(_slow_score_threshold(gt, predictions), abs=1e-9)


@pytest.mark.parametrize(("fp_score", "expected"), [(None, 1.0), (0.1, 1.0), (0.9, 0.5)])
def test_false_positive_on_negative_image(fp_score, expected):
    # Image 1 has one box, found with score 0.5; image 2 has none. A false positive on image 2 ranked
    # above the hit gives precision (0, 1/2) at recall (0, 1): p(r) = 1/2 at all 101 thresholds -> AP 1/2.
    # Ranked below the hit it costs nothing (recall 1 is reached at precision 1).
    gt = make_gt(2, [box(1, 1, 10, 10, 50, 50)])
    predictions = [pred(1, [[10, 10, 60, 60]], [0.5], [1])]
    if fp_score is not None:
        predictions.append(pred(2, [[10, 10, 60, 60]], [fp_score], [1]))
    metrics = evaluate(gt, predictions)
    assert metrics["mAP"] == pytest.approx(expected)
    assert metrics["num_images"] == 2


def test_at_most_100_detections_per_image_and_class():
    # 100 false positives outrank the only hit, which is the 101st detection and is dropped.
    gt = make_gt(1, [box(1, 1, 0, 0, 10, 10)])
    boxes = [[200 + i, 200, 210 + i, 210] for i in range(100)] + [[0, 0, 10, 10]]
    scores = [0.9] * 100 + [0.1]
    assert evaluate(gt, [pred(1, boxes, scores, [1] * 101)])["mAP"] == 0.0
    assert evaluate(gt, [pred(1, boxes[1:], scores[1:], [1] * 100)])["mAP"] > 0.0


def test_class_without_gt_is_none_and_excluded_from_map():
    gt = make_gt(2, [box(1, 1, 10, 10, 50, 50)])
    # Perfect on Mass; Nodule has no GT box at all, so its false positive cannot be scored.
    predictions = [pred(1, [[10, 10, 60, 60]], [0.9], [1]), pred(2, [[0, 0, 30, 30]], [0.99], [2])]
    metrics = evaluate(gt, predictions)
    assert metrics["per_class_AP"]["Nodule"] is None
    assert metrics["per_class_AP"]["Mass"] == pytest.approx(1.0)
    assert metrics["mAP"] == pytest.approx(1.0)


def test_map_is_mean_over_classes():
    # Mass found (AP 1), Nodule missed (AP 0): mAP 1/2.
    gt = make_gt(1, [box(1, 1, 10, 10, 50, 50), box(1, 2, 100, 100, 50, 50)])
    metrics = evaluate(gt, [pred(1, [[10, 10, 60, 60]], [0.9], [1])])
    assert metrics["per_class_AP"] == pytest.approx({"Mass": 1.0, "Nodule": 0.0})
    assert metrics["mAP"] == pytest.approx(0.5)


def test_gt_defaults_and_zero_ids():
    # No iscrowd, no area, an annotation id 0 (COCOeval reads id 0 as "unmatched" unless renumbered).
    gt = make_gt(1, [{"id": 0, "image_id": 1, "category_id": 1, "bbox": [5, 5, 40, 40]}])
    metrics = evaluate(gt, [pred(1, np.array([[5.0, 5.0, 45.0, 45.0]]), np.array([0.7]), np.array([1]))])
    assert metrics["mAP"] == pytest.approx(1.0)
    assert metrics["AP_M"] == pytest.approx(1.0)  # area defaulted to 40 * 40


def test_custom_iou_thresholds():
    gt = make_gt(1, [box(1, 1, 0, 0, 10, 10)])
    metrics = evaluate(gt, [pred(1, [[0, 0, 10, 6]], [0.9], [1])], iou_thresholds=[0.5, 0.7])
    assert metrics["iou_thresholds"] == [0.5, 0.7]
    assert metrics["AP50"] == pytest.approx(1.0)
    assert metrics["AP40"] is None and metrics["AP75"] is None
    assert metrics["mAP"] == pytest.approx(0.5)


@pytest.mark.parametrize("seed", range(8))
def test_roc_auc_matches_pairwise_oracle(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 60))
    scores = np.round(rng.random(n), 1)  # one decimal: many ties
    truth = rng.random(n) < 0.4
    truth[:2] = [True, False]
    assert roc_auc(scores, truth) == pytest.approx(pairwise_auc(scores, truth), abs=1e-12)
    assert roc_auc(torch.from_numpy(scores).float(), torch.from_numpy(truth)) == pytest.approx(
        pairwise_auc(scores.astype(np.float32), truth), abs=1e-12
    )


def test_roc_auc_edge_cases():
    assert roc_auc([0.1, 0.9], [False, True]) == 1.0
    assert roc_auc([0.9, 0.1], [False, True]) == 0.0
    assert roc_auc([0.5, 0.5, 0.5], [True, False, True]) == 0.5
    assert roc_auc([0.1, 0.2], [True, True]) is None
    assert roc_auc([0.1, 0.2], [0, 0]) is None
    with pytest.raises(ValueError, match="shape"):
        roc_auc([0.1, 0.2], [True])


def test_image_auc_uses_boxes_and_image_labels():
    rng = np.random.default_rng(0)
    # Mass positive on images 1-2 by box and image 3 by image_labels; Nodule never present.
    gt = make_gt(
        6,
        [box(1, 1, 10, 10, 50, 50), box(2, 1, 20, 20, 50, 50)],
        {3: {"image_labels": ["Mass", "Edema"]}, 4: {"image_labels": ["No Finding"]}},
    )
    probs = np.round(rng.random((6, 2)), 1)
    predictions = [pred(i, [], [], [], image_probs=torch.from_numpy(probs[i - 1])) for i in range(1, 7)]
    metrics = evaluate(gt, predictions)
    truth = np.array([True, True, True, False, False, False])
    assert metrics["image_auc"]["Mass"] == pytest.approx(pairwise_auc(probs[:, 0], truth))
    assert metrics["image_auc"]["Nodule"] is None
    assert metrics["mean_image_auc"] == pytest.approx(metrics["image_auc"]["Mass"])
    assert metrics["mAP"] == 0.0  # no detections at all


def test_image_auc_none_without_image_probs():
    gt = make_gt(2, [box(1, 1, 10, 10, 50, 50)])
    metrics = evaluate(gt, [pred(1, [[10, 10, 60, 60]], [0.9], [1])])
    assert metrics["image_auc"] == {"Mass": None, "Nodule": None}
    assert metrics["mean_image_auc"] is None


def test_coco_results():
    predictions = [
        pred(3, torch.tensor([[10.0, 20.0, 40.0, 60.0], [0.0, 0.0, 5.0, 5.0]]), torch.tensor([0.9, 0.25]),
             torch.tensor([2, 1])),
        pred(np.int64(4), np.zeros((0, 4)), np.zeros(0), np.zeros(0, dtype=np.int64)),
        pred(5, [], [], []),
    ]
    records = coco_results(predictions)
    assert records == [
        {"image_id": 3, "category_id": 2, "bbox": [10.0, 20.0, 30.0, 40.0], "score": pytest.approx(0.9)},
        {"image_id": 3, "category_id": 1, "bbox": [0.0, 0.0, 5.0, 5.0], "score": 0.25},
    ]
    assert json.loads(json.dumps(records))[0]["bbox"] == [10.0, 20.0, 30.0, 40.0]


GOOD_GT = make_gt(2, [box(1, 1, 10, 10, 50, 50)])


@pytest.mark.parametrize(
    ("predictions", "error", "match"),
    [
        ([pred(7, [[0, 0, 1, 1]], [0.5], [1])], ValueError, "image_id 7"),
        ([pred(1, [[0, float("nan"), 1, 1]], [0.5], [1])], ValueError, "NaN"),
        ([pred(1, [[0, 0, 1, 1]], [float("nan")], [1])], ValueError, "NaN"),
        ([pred(1, [[0, 0, 1]], [0.5], [1])], ValueError, r"\[N, 4\]"),
        ([pred(1, [[0, 0, 1, 1]], [0.5, 0.4], [1])], ValueError, "shape"),
        ([pred(1, [[5, 0, 1, 1]], [0.5], [1])], ValueError, "x2 >= x1"),
        ([pred(1, [[0, 0, 1, 1]], [0.5], [3])], ValueError, r"labels \[3\]"),
        ([pred(1, [[0, 0, 1, 1]], [0.5], [1.0])], TypeError, "labels"),
        ([pred(1.5, [], [], [])], TypeError, "image_id"),
        ([{"image_id": 1, "boxes": []}], ValueError, "scores"),
        ([pred(1, [], [], []), pred(1, [], [], [])], ValueError, "second prediction"),
        ([pred(1, [], [], [], image_probs=[0.5])], ValueError, "image_probs"),
        ([pred(1, [], [], [], image_probs=[0.5, float("nan")])], ValueError, "NaN"),
        ([pred(1, [], [], [], image_probs=[0.5, 0.5]), pred(2, [], [], [])], ValueError, "image_id 2"),
        (["not a dict"], TypeError, "predictions"),
    ],
)
def test_bad_predictions(predictions, error, match):
    with pytest.raises(error, match=match):
        evaluate(GOOD_GT, predictions)


@pytest.mark.parametrize(
    ("gt", "match"),
    [
        ({"images": [{"id": 1}]}, "categories"),
        ({"images": [{"id": 1}], "categories": [{"id": 1}]}, "'name'"),
        ({"images": [{"id": 1}], "categories": []}, "empty"),
        (make_gt(1, [box(9, 1, 0, 0, 5, 5)]), "image_id 9"),
        (make_gt(1, [box(1, 4, 0, 0, 5, 5)]), "category_id 4"),
        (make_gt(1, [box(1, 1, 0, 0, -5, 5)]), "bbox"),
        (make_gt(1, [box(1, 1, 0, 0, float("nan"), 5)]), "bbox"),
        ({"images": [{"id": 1}, {"id": 1}], "categories": CATEGORIES}, "duplicate image"),
        (make_gt(1, [], {1: {"image_labels": "Mass"}}), "image_labels"),
    ],
)
def test_bad_ground_truth(gt, match):
    with pytest.raises(ValueError, match=match):
        evaluate(gt, [])


@pytest.mark.parametrize("thresholds", [[], [0.0], [1.5]])
def test_bad_iou_thresholds(thresholds):
    with pytest.raises(ValueError, match="iou_thresholds"):
        evaluate(GOOD_GT, [], iou_thresholds=thresholds)


@pytest.mark.skipif(not NIH.is_dir(), reason="../shared/data/nih-cxr is absent")
def test_real_boxes_evaluated_against_themselves():
    full = json.loads((NIH / "annotations" / "boxes.json").read_text())
    images = [image for image in full["images"] if image["suggested_fold"] == 3]
    ids = {image["id"] for image in images}
    gt = {**full, "images": images, "annotations": [a for a in full["annotations"] if a["image_id"] in ids]}
    predictions = perfect_predictions(gt)
    names = [c["name"] for c in sorted(gt["categories"], key=lambda c: c["id"])]
    for p, image in zip(predictions, gt["images"]):
        present = {c["name"] for c in gt["categories"] for a in gt["annotations"]
                   if a["image_id"] == image["id"] and a["category_id"] == c["id"]}
        p["image_probs"] = torch.tensor([float(name in present) for name in names])
    metrics = evaluate(gt, predictions)
    assert metrics["num_images"] == len(images)
    assert metrics["num_gt_boxes"] == len(gt["annotations"])
    assert metrics["mAP"] == pytest.approx(1.0)
    assert all(ap == pytest.approx(1.0) for ap in metrics["per_class_AP"].values() if ap is not None)
    assert metrics["mean_image_auc"] == pytest.approx(1.0)
