"""db.agreement against slow, obviously-correct loop versions kept here as oracles, and its edge cases."""

from __future__ import annotations

import math

import numpy as np
import pytest

from db.agreement import (
    box_f1,
    box_matches,
    cohen_kappa,
    fleiss_kappa,
    greedy_match,
    iou_matrix,
    mean_pairwise_box_f1,
)

NAN = float("nan")


# --- oracles -------------------------------------------------------------------------------------


def iou_loop(a, b):
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def greedy_loop(a, b, thr):
    """Repeatedly take the best remaining pair (ties: smallest i, then j) while it reaches thr."""
    used_a, used_b, pairs = set(), set(), []
    while True:
        best = None
        for i in range(len(a)):
            for j in range(len(b)):
                if i in used_a or j in used_b:
                    continue
                v = iou_loop(a[i], b[j])
                if v >= thr and (best is None or v > best[0]):
                    best = (v, i, j)
        if best is None:
            return pairs
        used_a.add(best[1])
        used_b.add(best[2])
        pairs.append((best[1], best[2]))


def f1_loop(boxes_a, boxes_b, thr=0.4):
    if not boxes_a and not boxes_b:
        return 1.0
    tp = 0
    for name in {b[0] for b in boxes_a}:
        a = [b[1:] for b in boxes_a if b[0] == name]
        b = [x[1:] for x in boxes_b if x[0] == name]
        tp += len(greedy_loop(a, b, thr))
    return 2 * tp / (len(boxes_a) + len(boxes_b))


def cohen_loop(a, b):
    """Per class: kappa from the 2x2 table of the items both readers assessed."""
    out = []
    for c in range(len(a[0])):
        pairs = [(x[c], y[c]) for x, y in zip(a, b) if not (math.isnan(x[c]) or math.isnan(y[c]))]
        if not pairs:
            out.append(NAN)
            continue
        n = len(pairs)
        po = sum(1 for x, y in pairs if x == y) / n
        pe = sum((sum(1 for x, _ in pairs if x == v) / n) * (sum(1 for _, y in pairs if y == v) / n) for v in (0.0, 1.0))
        out.append(NAN if pe == 1 else (po - pe) / (1 - pe))
    return out


def fleiss_loop(ratings):
    """ratings[item][reader][class]; textbook Fleiss with categories 0 / 1 over fully rated items."""
    out = []
    for c in range(len(ratings[0][0])):
        rows = [[r[c] for r in item] for item in ratings if not any(math.isnan(r[c]) for r in item)]
        if not rows:
            out.append(NAN)
            continue
        n, big_n = len(rows[0]), len(rows)
        p_items = []
        totals = {0.0: 0, 1.0: 0}
        for row in rows:
            counts = {v: sum(1 for x in row if x == v) for v in (0.0, 1.0)}
            for v, k in counts.items():
                totals[v] += k
            p_items.append((sum(k * k for k in counts.values()) - n) / (n * (n - 1)))
        p_bar = sum(p_items) / big_n
        pe = sum((t / (big_n * n)) ** 2 for t in totals.values())
        out.append(NAN if pe == 1 else (p_bar - pe) / (1 - pe))
    return out


def _same(x, y):
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    assert x.shape == y.shape
    assert np.array_equal(np.isnan(x), np.isnan(y)), (x, y)
    np.testing.assert_allclose(x[~np.isnan(x)], y[~np.isnan(y)], atol=1e-12)


def _random_boxes(rng, k, names=("A", "B")):
    out = []
    for _ in range(k):
        x, y = rng.uniform(0, 60, 2)
        w, h = rng.uniform(4, 30, 2)
        out.append((str(rng.choice(names)), float(x), float(y), float(x + w), float(y + h)))
    return out


# --- boxes ---------------------------------------------------------------------------------------


def test_iou_matrix_matches_the_loop():
    rng = np.random.default_rng(0)
    a = [b[1:] for b in _random_boxes(rng, 7)]
    b = [x[1:] for x in _random_boxes(rng, 5)]
    expected = [[iou_loop(x, y) for y in b] for x in a]
    np.testing.assert_allclose(iou_matrix(np.array(a), np.array(b)), expected, atol=1e-12)
    assert iou_matrix(np.zeros((0, 4)), np.array(b)).shape == (0, 5)


@pytest.mark.parametrize("seed", range(20))
def test_greedy_matching_and_f1_match_the_loop(seed):
    rng = np.random.default_rng(seed)
    a, b = _random_boxes(rng, int(rng.integers(0, 8))), _random_boxes(rng, int(rng.integers(0, 8)))
    if a and b:
        pa, pb = [x[1:] for x in a], [x[1:] for x in b]
        assert sorted(greedy_match(iou_matrix(np.array(pa), np.array(pb)), 0.4)) == sorted(greedy_loop(pa, pb, 0.4))
    assert box_f1(a, b) == pytest.approx(f1_loop(a, b))
    assert box_f1(a, b) == pytest.approx(box_f1(b, a))  # symmetric


def test_box_f1_edge_cases():
    box = ("Nodule", 10.0, 10.0, 30.0, 30.0)
    assert box_f1([], []) == 1.0  # no boxes on either side: nothing to disagree on
    assert box_f1([box], []) == 0.0
    assert box_f1([box], [box]) == 1.0
    assert box_f1([box], [("Mass", *box[1:])]) == 0.0  # same place, other class
    # IoU exactly 0.4 counts as agreement, just below does not
    assert box_matches([("Nodule", 0.0, 0.0, 10.0, 10.0)], [("Nodule", 0.0, 0.0, 10.0, 4.0)]) == 1
    assert box_matches([("Nodule", 0.0, 0.0, 10.0, 10.0)], [("Nodule", 0.0, 0.0, 10.0, 3.9)]) == 0
    far = ("Nodule", 40.0, 40.0, 60.0, 60.0)
    assert box_f1([box, far], [box]) == pytest.approx(2 / 3)
    assert mean_pairwise_box_f1([[box], [box], []]) == pytest.approx((1 + 0 + 0) / 3)
    assert mean_pairwise_box_f1([[box]]) == 1.0


# --- kappas --------------------------------------------------------------------------------------


def _ratings(rng, items, readers, classes, p_nan=0.15):
    r = rng.integers(0, 2, size=(items, readers, classes)).astype(float)
    r[rng.random(r.shape) < p_nan] = np.nan
    return r


@pytest.mark.parametrize("seed", range(10))
def test_cohen_kappa_matches_the_loop(seed):
    r = _ratings(np.random.default_rng(seed), 25, 2, 4)
    _same(cohen_kappa(r[:, 0], r[:, 1]), cohen_loop(r[:, 0].tolist(), r[:, 1].tolist()))


@pytest.mark.parametrize("seed", range(10))
@pytest.mark.parametrize("readers", [2, 3, 5])
def test_fleiss_kappa_matches_the_loop(seed, readers):
    r = _ratings(np.random.default_rng(seed), 30, readers, 3)
    _same(fleiss_kappa(r), fleiss_loop(r.tolist()))


def test_kappa_edge_cases():
    # all agree, with variation: kappa 1 (Cohen and Fleiss)
    a = np.array([[1.0], [0.0], [1.0], [0.0]])
    assert cohen_kappa(a, a)[0] == pytest.approx(1.0)
    assert fleiss_kappa(np.stack([a, a, a], axis=1))[0] == pytest.approx(1.0)
    # one class constant for both readers (always absent): chance agreement 1, kappa undefined (NaN)
    zeros = np.zeros((4, 1))
    assert math.isnan(cohen_kappa(zeros, zeros)[0])
    assert math.isnan(fleiss_kappa(np.stack([zeros, zeros], axis=1))[0])
    # one reader constant, the other not: defined, and 0 here (they agree exactly as chance predicts)
    assert cohen_kappa(zeros, a)[0] == pytest.approx(0.0)
    # perfect disagreement on a balanced class: kappa -1
    assert cohen_kappa(a, 1 - a)[0] == pytest.approx(-1.0)
    # nothing assessed by both: undefined
    assert math.isnan(cohen_kappa(np.array([[np.nan], [1.0]]), np.array([[1.0], [np.nan]]))[0])
    assert math.isnan(fleiss_kappa(np.full((3, 2, 1), np.nan))[0])
    # Fleiss with two readers is not Cohen (different chance model) but both are 1 / NaN together
    with pytest.raises(ValueError, match="readers >= 2"):
        fleiss_kappa(np.zeros((3, 1, 2)))
    with pytest.raises(ValueError, match="one shape"):
        cohen_kappa(np.zeros((3, 2)), np.zeros((2, 2)))

