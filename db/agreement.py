"""Agreement between readers (numpy only): Cohen's and Fleiss' kappa on image-level labels, box F1.

Image-level ratings are arrays of 1.0 (present), 0.0 (absent) and NaN (not assessed). A kappa is
computed per class over the items where every reader assessed that class; it is NaN (undefined) when
there is no such item or when chance agreement is 1 (every reader gave the same one answer on every
item: there is no variation to agree on beyond chance). A class on which one reader never varies and
the other does gets a defined kappa (0 when they agree exactly as often as chance says).

Boxes of two readers are matched per class at IoU >= :data:`BOX_IOU` (0.4, as VinDr-CXR's and the
paper's lowest evaluation threshold) greedily: pairs in order of falling IoU, each box used once (scipy
is not a dependency of the workbench, so no Hungarian matching; greedy can miss a matching only when
a box overlaps two partners by 0.4 or more). F1 = 2 * matched / (boxes of A + boxes of B); two readers
without any box agree fully (F1 = 1) on an image, and a pooled F1 over no box at all is NaN.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import combinations
from typing import Any

import numpy as np

from oxnet.data.annotation import iou_matrix

#: IoU at which two readers' boxes of the same class count as the same lesion.
BOX_IOU = 0.4


def greedy_match(iou: np.ndarray, threshold: float = BOX_IOU) -> list[tuple[int, int]]:
    """Pairs (i, j) of a greedy one-to-one matching on an IoU matrix [N, M]: highest IoU first, only pairs
    with IoU >= ``threshold``; ties broken by (i, j)."""
    iou = np.asarray(iou, dtype=np.float64)
    rows, cols = np.nonzero(iou >= threshold)
    if rows.size == 0:
        return []
    order = np.lexsort((cols, rows, -iou[rows, cols]))
    used_i, used_j, pairs = set(), set(), []
    for k in order:  # sequential by nature: each pick removes two boxes
        i, j = int(rows[k]), int(cols[k])
        if i not in used_i and j not in used_j:
            used_i.add(i)
            used_j.add(j)
            pairs.append((i, j))
    return pairs


def box_matches(boxes_a: Sequence[Sequence[Any]], boxes_b: Sequence[Sequence[Any]], threshold: float = BOX_IOU) -> int:
    """How many boxes of reader A match one of reader B (same class, IoU >= ``threshold``, one-to-one).

    Boxes: (class, x1, y1, x2, y2)."""
    matched = 0
    for name in {str(b[0]) for b in boxes_a} & {str(b[0]) for b in boxes_b}:
        a = np.array([b[1:5] for b in boxes_a if str(b[0]) == name], dtype=np.float64)
        b = np.array([x[1:5] for x in boxes_b if str(x[0]) == name], dtype=np.float64)
        matched += len(greedy_match(iou_matrix(a, b), threshold))
    return matched


def box_f1(boxes_a: Sequence[Sequence[Any]], boxes_b: Sequence[Sequence[Any]], threshold: float = BOX_IOU) -> float:
    """F1 of two readers' boxes on one image (1.0 when neither drew a box)."""
    total = len(boxes_a) + len(boxes_b)
    return 1.0 if total == 0 else 2.0 * box_matches(boxes_a, boxes_b, threshold) / total


def mean_pairwise_box_f1(readers_boxes: Sequence[Sequence[Sequence[Any]]], threshold: float = BOX_IOU) -> float:
    """Mean :func:`box_f1` over every pair of readers of one image (1.0 for fewer than two readers)."""
    pairs = list(combinations(range(len(readers_boxes)), 2))
    if not pairs:
        return 1.0
    return float(np.mean([box_f1(readers_boxes[i], readers_boxes[j], threshold) for i, j in pairs]))


def cohen_kappa(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cohen's kappa per class of two readers' binary ratings.

    Args:
        a, b: [items, classes] of 1.0 (present), 0.0 (absent) or NaN (not assessed).
    Returns:
        [classes] kappa = (p_o - p_e) / (1 - p_e) over the items both assessed; NaN where undefined.
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"cohen_kappa needs two [items, classes] arrays of one shape, got {a.shape} and {b.shape}")
    valid = ~(np.isnan(a) | np.isnan(b))
    n = valid.sum(axis=0).astype(np.float64)
    a0, b0 = np.where(valid, a, 0.0), np.where(valid, b, 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        p_o = np.where(valid, a0 == b0, False).sum(axis=0) / n
        pa, pb = a0.sum(axis=0) / n, b0.sum(axis=0) / n
        p_e = pa * pb + (1 - pa) * (1 - pb)
        kappa = (p_o - p_e) / (1 - p_e)
    return np.where((n > 0) & (p_e < 1 - 1e-12), kappa, np.nan)


def fleiss_kappa(ratings: np.ndarray) -> np.ndarray:
    """Fleiss' kappa per class of several readers' binary ratings (two or more readers per item).

    Args:
        ratings: [items, readers, classes] of 1.0, 0.0 or NaN; per class only the items every reader
            assessed count.
    Returns:
        [classes] kappa = (P_bar - P_e) / (1 - P_e), P_i = (sum_j n_ij^2 - n) / (n (n - 1)),
        P_e = sum_j p_j^2 over the categories present / absent; NaN where undefined.
    """
    r = np.asarray(ratings, dtype=np.float64)
    if r.ndim != 3 or r.shape[1] < 2:
        raise ValueError(f"fleiss_kappa needs [items, readers >= 2, classes] ratings, got shape {r.shape}")
    n = r.shape[1]
    valid = ~np.isnan(r).any(axis=1)  # [items, classes]
    items = valid.sum(axis=0).astype(np.float64)
    present = np.nan_to_num(r, nan=0.0).sum(axis=1)  # [items, classes]
    absent = n - present
    p_i = (present**2 + absent**2 - n) / (n * (n - 1))
    with np.errstate(invalid="ignore", divide="ignore"):
        p_bar = np.where(valid, p_i, 0.0).sum(axis=0) / items
        p_present = np.where(valid, present, 0.0).sum(axis=0) / (items * n)
        p_e = p_present**2 + (1 - p_present) ** 2
        kappa = (p_bar - p_e) / (1 - p_e)
    return np.where((items > 0) & (p_e < 1 - 1e-12), kappa, np.nan)
