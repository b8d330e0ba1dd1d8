"""The strategies (oxnet.active.strategies): each vectorised scorer against a slow loop oracle, the registry,
the cost-aware choice of upgrade, bounded pools."""

from __future__ import annotations

import math

import numpy as np
import pytest

from oxnet.vocabulary import ADD_LABELS, DRAW_BOXES
from oxnet.active.strategies import (
    STRATEGIES,
    Context,
    CostAwareStrategy,
    CostModel,
    HistoryPoint,
    ImageState,
    LearningCurve,
    binary_entropy,
    candidate_pool,
    describe,
    detection_uncertainty,
    fit_learning_curve,
    get_strategy,
    k_center_greedy,
)

# --- loop oracles ---------------------------------------------------------------------------------


def entropy_loop(p: float) -> float:
    if p <= 0 or p >= 1:
        return 0.0
    return -(p * math.log(p) + (1 - p) * math.log(1 - p))


def detection_uncertainty_loop(scores, labels, num_classes):
    out = []
    for s, lb in zip(scores, labels):
        best = [0.0] * num_classes
        for score, label in zip(s, lb):
            best[int(label)] = max(best[int(label)], float(score))
        out.append(sum(entropy_loop(b) for b in best) / num_classes)
    return out


def k_center_loop(x, k, centers=None):
    chosen = []
    pool = list(centers) if centers is not None else []
    mean = [sum(col) / len(x) for col in zip(*x)]
    for _ in range(min(k, len(x))):
        best, best_d = None, -1.0
        for i, row in enumerate(x):
            if i in chosen:
                continue
            refs = pool + [x[j] for j in chosen]
            d = min(math.dist(row, r) for r in refs) if refs else math.dist(row, mean)
            if d > best_d:
                best, best_d = i, d
        chosen.append(best)
    return chosen


def random_images(n=30, classes=3, dim=4, seed=0):
    rng = np.random.default_rng(seed)
    images = []
    for i in range(n):
        d = int(rng.integers(0, 5))
        images.append(ImageState(
            image_id=100 + i, granularity="unlabeled" if i % 3 else "weak", score=float(rng.random()),
            image_probs=rng.random(classes), detection_scores=rng.random(d), labels=rng.integers(0, classes, d),
            embedding=rng.normal(size=dim),
        ))
    return images


# --- scorers vs oracles ---------------------------------------------------------------------------


def test_binary_entropy_matches_the_loop():
    p = np.array([0.0, 1e-9, 0.1, 0.5, 0.9, 1.0])
    assert binary_entropy(p) == pytest.approx([entropy_loop(v) for v in p], abs=1e-9)
    assert binary_entropy(np.array([0.5]))[0] == pytest.approx(math.log(2))


def test_detection_uncertainty_matches_the_loop():
    rng = np.random.default_rng(1)
    scores = [rng.random(int(rng.integers(0, 6))) for _ in range(12)] + [np.zeros(0)]
    labels = [rng.integers(0, 4, len(s)) for s in scores]
    got = detection_uncertainty(scores, labels, 4)
    assert got == pytest.approx(detection_uncertainty_loop(scores, labels, 4), abs=1e-9)
    assert got[-1] == pytest.approx(0.0)  # no detection: sure nothing is there
    assert detection_uncertainty([], [], 4).shape == (0,)
    with pytest.raises(ValueError, match="labels"):
        detection_uncertainty([np.array([0.5])], [np.array([4])], 4)


def test_k_center_greedy_matches_the_loop():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(25, 3))
    assert k_center_greedy(x, 8) == k_center_loop(x.tolist(), 8)
    centers = rng.normal(size=(3, 3))
    assert k_center_greedy(x, 6, centers=centers) == k_center_loop(x.tolist(), 6, centers.tolist())
    assert sorted(k_center_greedy(x, 100)) == list(range(25))
    assert k_center_greedy(x, 0) == []
    with pytest.raises(ValueError, match="embeddings"):
        k_center_greedy(x[0], 2)


def test_learning_curve_fit_recovers_a_known_curve_and_falls_back_to_the_prior():
    truth = LearningCurve(0.05, 0.01, 0.06)
    history = [HistoryPoint(w, f, truth(w, f)) for w, f in [(20, 10), (40, 12), (30, 25), (80, 30), (60, 50), (100, 60)]]
    fitted = fit_learning_curve(history, prior_weight=0.0)
    assert (fitted.b_weak, fitted.b_full, fitted.a) == pytest.approx((0.01, 0.06, 0.05), abs=1e-6)
    prior = fit_learning_curve([])
    assert prior.points == 0 and prior.b_full > 0 and prior.b_weak > 0
    # a falling curve is clipped: labels never hurt in expectation
    falling = [HistoryPoint(10 * k, 5 * k, 0.5 - 0.05 * k) for k in range(1, 6)]
    assert fit_learning_curve(falling, prior_weight=0.0).b_full == 0.0
    # the marginal gains are differences of the curve (loop oracle)
    for upgrade, after in {"unlabeled->weak": (41, 12), "weak->full": (39, 13), "unlabeled->full": (40, 13)}.items():
        assert truth.gain(upgrade, 40, 12) == pytest.approx(truth(*after) - truth(40, 12))


def cost_aware_loop(images, context, diversity=True):
    """The cost-aware greedy batch written as plain loops over images and upgrades."""
    strategy = CostAwareStrategy(diversity=diversity)
    curve = fit_learning_curve(context.history)
    names = ("unlabeled->weak", "weak->full", "unlabeled->full")
    costs = [context.costs.cost(u) for u in names]
    images = sorted(images, key=lambda im: im.image_id)
    probs_h = [sum(entropy_loop(float(p)) for p in im.image_probs) / len(im.image_probs) for im in images]
    mean_h = sum(probs_h) / len(probs_h)
    mean_s = sum(im.score for im in images) / len(images)
    weak, full = context.counts["weak"], context.counts["full"]
    left, taken, nearest, order = context.batch_units, set(), [math.inf] * len(images), []
    scale = None
    if diversity:
        x = [im.embedding for im in images]
        rng = np.random.default_rng(context.seed)
        sample = [x[i] for i in rng.permutation(len(x))[:256]]
        scale = float(np.median([math.dist(a, b) for k, a in enumerate(sample) for b in sample[k + 1:]]))
    while left >= min(costs) - 1e-9:
        best, best_value = None, -math.inf
        for i, im in enumerate(images):
            if i in taken:
                continue
            factor = 1.0 if scale is None else min(1.0, nearest[i] / scale)
            for j, name in enumerate(names):
                if costs[j] > left + 1e-9 or im.granularity != name.split("->")[0]:
                    continue
                info = probs_h[i] / mean_h if j == 0 else im.score / mean_s
                value = curve.gain(name, weak, full) * info / costs[j] * factor
                if value > best_value:
                    best, best_value = (i, j), value
        if best is None:
            break
        i, j = best
        taken.add(i)
        order.append((images[i].image_id, names[j]))
        left -= costs[j]
        weak, full = weak + (j == 0) - (j == 1), full + (j >= 1)
        if diversity:
            nearest = [min(nearest[k], math.dist(images[k].embedding, images[i].embedding)) for k in range(len(images))]
    batch = strategy(images, context)[: len(order)]
    return order, [(p.image_id, p.upgrade) for p in batch]


@pytest.mark.parametrize("diversity", [False, True])
def test_cost_aware_batch_matches_the_loop(diversity):
    images = random_images()
    context = Context(costs=CostModel(1, 5), counts={"weak": 20, "full": 10}, batch_units=23, seed=3,
                      history=[HistoryPoint(20, 10, 0.2), HistoryPoint(30, 12, 0.24)])
    oracle, got = cost_aware_loop(images, context, diversity)
    assert got == oracle and len(oracle) > 3


def test_cost_aware_buys_the_label_the_history_says_pays():
    """The same images and model outputs; only the project's history differs. Where boxed images paid
    off it buys boxes, where image-level labels did it buys labels."""
    images = random_images(40)
    boxes_pay = [HistoryPoint(w, f, 0.1 + 0.1 * math.log1p(f)) for w, f in [(20, 10), (20, 20), (30, 30), (25, 40)]]
    labels_pay = [HistoryPoint(w, f, 0.1 + 0.1 * math.log1p(w)) for w, f in [(20, 10), (40, 10), (60, 12), (80, 11)]]
    for history, expected in ((boxes_pay, DRAW_BOXES), (labels_pay, ADD_LABELS)):
        picks = get_strategy("cost_aware")(images, Context(counts={"weak": 20, "full": 10}, history=history, batch_units=30))
        spent, actions = 0.0, []
        for p in picks:
            if spent + p.cost > 30:
                break
            spent += p.cost
            actions.append(p.action)
        assert actions.count(expected) > len(actions) / 2, (expected, actions)
        assert all(p.gain is not None for p in picks) and len({p.image_id for p in picks}) == len(images)


def test_cost_aware_diminishing_returns_mix_the_batch():
    """With the neutral prior and equal informativeness, the counts moving after every pick make the
    batch buy both kinds instead of only one."""
    images = [ImageState(i, "unlabeled" if i % 2 else "weak", score=1.0, image_probs=np.full(2, 0.3),
                         detection_scores=np.zeros(0), labels=np.zeros(0, np.int64), embedding=None) for i in range(60)]
    picks = CostAwareStrategy(diversity=False)(images, Context(counts={"weak": 2, "full": 2}, batch_units=50))
    first = {p.upgrade for p in picks[:15]}
    assert len(first) >= 2


def test_every_strategy_ranks_every_image_once_with_a_reason():
    images = random_images()
    context = Context(batch_units=10)
    assert set(STRATEGIES) == {"random", "random_labels", "random_boxes", "disagreement", "uncertainty", "diversity",
                               "uncertainty_diversity", "cost_aware"}
    for name in STRATEGIES:
        picks = get_strategy(name)(images, context)
        ids = [p.image_id for p in picks]
        expected = [im.image_id for im in images if name != "random_labels" or im.granularity == "unlabeled"]
        assert sorted(ids) == sorted(expected), name
        assert all(p.reason and p.cost == context.costs.of(p.action, p.granularity) for p in picks), name
        if name == "random_labels":
            assert {p.action for p in picks} == {ADD_LABELS}
        if name == "random_boxes":
            assert {p.action for p in picks} == {DRAW_BOXES}
        if name in ("random", "disagreement", "uncertainty", "diversity", "uncertainty_diversity"):
            assert all(p.action == (ADD_LABELS if p.granularity == "unlabeled" else DRAW_BOXES) for p in picks)
    assert [p.image_id for p in get_strategy("disagreement")(images, context)] == \
        [im.image_id for im in sorted(images, key=lambda im: -im.score)]
    with pytest.raises(ValueError, match="unknown strategy"):
        get_strategy("greedy")
    with pytest.raises(ValueError, match="embedding"):
        get_strategy("diversity")([ImageState(1, "weak")], context)


def test_random_depends_on_the_seed_only():
    images = random_images()
    orders = {tuple(p.image_id for p in get_strategy("random")(images, Context(seed=s))) for s in range(4)}
    assert len(orders) == 4
    again = get_strategy("random")(list(reversed(images)), Context(seed=0))
    assert [p.image_id for p in again] == [p.image_id for p in get_strategy("random")(images, Context(seed=0))]


def test_uncertainty_diversity_batch_comes_from_the_uncertain_images():
    images = random_images(40)
    context = Context(batch_units=5)  # at most 5 one-step upgrades
    picks = get_strategy("uncertainty_diversity")(images, context)
    u = detection_uncertainty([im.detection_scores for im in images], [im.labels for im in images], 3)
    top = {images[i].image_id for i in np.argsort(-u, kind="stable")[:15]}
    assert {p.image_id for p in picks[:5]} <= top


def test_describe_orders_scores_and_keeps_gain_and_cost():
    costs = CostModel(1, 5, seconds_per_unit=12.0)
    picks = get_strategy("cost_aware")(random_images(), Context(costs=costs, batch_units=10))
    rows = describe(picks, costs, "cost_aware", {picks[0].image_id: ["Mass"]})
    assert [r["image_id"] for r in rows] == [p.image_id for p in picks]
    assert all(a["score"] > b["score"] for a, b in zip(rows, rows[1:]))
    first = rows[0]["reason"]
    assert first["classes"] == ["Mass"] and first["rank"] == 1 and first["strategy"] == "cost_aware"
    assert first["gain_per_minute"] == pytest.approx(picks[0].gain / picks[0].cost * 60 / 12.0)
    assert describe(picks, CostModel(), "x")[0]["reason"]["gain_per_minute"] is None


def test_cost_model_validates_and_prices_upgrades():
    costs = CostModel(1, 5)
    assert (costs.cost("unlabeled->weak"), costs.cost("weak->full"), costs.cost("unlabeled->full")) == (1, 5, 6)
    assert costs.per_minute(1.0) is None
    with pytest.raises(ValueError, match="> 0"):
        CostModel(0, 5)


def test_candidate_pool_is_bounded_and_rotates():
    ids = list(range(10_000))
    changed, top = [5, 7, 10_500], list(range(100, 200))
    pools = [candidate_pool(ids, size=500, changed=changed, previous_top=top, random_share=0.3,
                            rng=np.random.default_rng(r)) for r in range(2)]
    for pool in pools:
        assert len(pool) == 500 and len(set(pool)) == 500 and set(pool) <= set(ids)
        assert {5, 7} <= set(pool) and set(top) <= set(pool) and 10_500 not in pool
    assert set(pools[0]) != set(pools[1])  # the random share rotates
    assert sorted(candidate_pool(ids[:50], size=500)) == ids[:50]
    assert candidate_pool(ids, size=None) == ids
    ordered = candidate_pool(ids, size=500, changed=changed, previous_top=top, rng=np.random.default_rng(0))
    assert ordered[:2] == [5, 7] and ordered[2:102] == top  # most wanted first: scoring may stop early
    # the fixed part never crowds out the random share
    many = candidate_pool(ids, size=100, changed=list(range(1000)), random_share=0.5, rng=np.random.default_rng(0))
    assert len(many) == 100 and sum(i < 1000 for i in many) >= 50 and sum(i < 50 for i in many) == 50
