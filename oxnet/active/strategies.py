"""Which image to label next, and with which kind of label: one strategy interface for the live queue
and the simulation (as MONAI Label's ``Strategy``: small callables registered by name).

A strategy gets the not-full training images of a round (:class:`ImageState`: granularity and, when the
strategy needs them, the current model's outputs) and a :class:`Context` (annotation costs, the label
counts, the project's history of model versions, the units one batch spends) and returns every image it
ranks, in order, as a :class:`Pick`: the upgrade (unlabeled -> weak, weak -> full, unlabeled -> full),
its cost, its expected gain (mAP points) and a reason. The trainer (:mod:`oxnet.active.loop`) runs the strategy
at the end of a round and stores the picks as suggestions; the Queue page and :mod:`oxnet.experiments.simulate` read
that order, so the ranking a radiologist sees is the code that was measured.

Strategies (:data:`STRATEGIES`):

- ``random``: every not-full image in random order, one step up each.
- ``random_labels``: unlabeled images in random order, image-level labels.
- ``random_boxes``: not-full images in random order, boxes (weak -> full, unlabeled -> full).
- ``disagreement``: the trainer's suggestion score (:mod:`oxnet.active.scoring`), best first, one step up.
- ``uncertainty``: mean binary entropy of the best detection scores per class (the detections' least
  confidence), most uncertain first, one step up.
- ``diversity``: k-center greedy (core-set) on the pooled C5 embedding, one step up.
- ``uncertainty_diversity``: the most uncertain ``factor`` x batch images, then k-center greedy among them
  (two stages, in the spirit of PPAL).
- ``cost_aware`` (the default): per image and upgrade, expected gain per unit cost = the learning curve's
  marginal gain of one more weak or full image (:func:`fit_learning_curve`, fitted to the project's model
  versions) x the image's informativeness for that kind of label, greedily, with the counts updated after
  every pick (diminishing returns) and a diversity discount inside the batch.

No SQL here: the store side provides the history and the costs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np

from oxnet.vocabulary import (
    ADD_LABELS, DRAW_BOXES, FULL, UNLABELED, UNLABELED_TO_FULL, UNLABELED_TO_WEAK, UPGRADE_NAMES, UPGRADES, WEAK,
    WEAK_TO_FULL,
)

__all__ = [
    "DEFAULT_STRATEGY",
    "STRATEGIES",
    "Context",
    "CostModel",
    "HistoryPoint",
    "ImageState",
    "LearningCurve",
    "Pick",
    "Strategy",
    "binary_entropy",
    "candidate_pool",
    "detection_uncertainty",
    "fit_learning_curve",
    "get_strategy",
    "k_center_greedy",
    "relative",
]

DEFAULT_STRATEGY = "cost_aware"


@dataclass(frozen=True)
class CostModel:
    """Annotation cost in units of each upgrade.

    ``labels``: unlabeled -> weak; ``boxes``: weak -> full; ``labels_and_boxes``: unlabeled -> full
    (default ``labels + boxes``). ``seconds_per_unit``: what a unit is in seconds when the costs were
    measured (None: assumed costs); ``measured``: how many saves the costs come from per upgrade.
    """

    labels: float = 1.0
    boxes: float = 5.0
    labels_and_boxes: float | None = None
    seconds_per_unit: float | None = None
    measured: Mapping[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        both = self.labels + self.boxes if self.labels_and_boxes is None else self.labels_and_boxes
        object.__setattr__(self, "labels_and_boxes", float(both))
        object.__setattr__(self, "measured", dict(self.measured))
        if not (self.labels > 0 and self.boxes > 0 and both > 0):
            raise ValueError(f"costs must be > 0, got labels={self.labels}, boxes={self.boxes}, labels_and_boxes={both}")
        if self.seconds_per_unit is not None and not self.seconds_per_unit > 0:
            raise ValueError(f"seconds_per_unit must be > 0 or None, got {self.seconds_per_unit}")

    def of(self, action: str, granularity: str = WEAK) -> float:
        """Cost of doing ``action`` on an image at ``granularity`` ("unlabeled" or "weak")."""
        upgrade = UPGRADES.get((granularity, action))
        if upgrade is None:
            raise ValueError(f"no upgrade {action!r} from {granularity!r}: one of {sorted(UPGRADES)}")
        return self.cost(upgrade)

    def cost(self, upgrade: str) -> float:
        if upgrade == UNLABELED_TO_WEAK:
            return self.labels
        if upgrade == WEAK_TO_FULL:
            return self.boxes
        if upgrade == UNLABELED_TO_FULL:
            return float(cast(float, self.labels_and_boxes))  # set to a float by __post_init__
        raise ValueError(f"unknown upgrade {upgrade!r}")

    def per_minute(self, gain_per_unit: float) -> float | None:
        """Gain per minute of annotation time (None while the costs are assumed, not measured)."""
        return None if self.seconds_per_unit is None else gain_per_unit * 60.0 / self.seconds_per_unit


@dataclass(frozen=True)
class ImageState:
    """A not-full training image as a strategy sees it.

    ``score``: the trainer's suggestion score (:mod:`oxnet.active.scoring`); ``image_probs``: ndarray[N]
    image-level probabilities; ``detection_scores``: ndarray[D] scores of its detections; ``labels``:
    ndarray[D] their 0-based classes; ``embedding``: ndarray[E] pooled C5 features; ``reason``: the
    scoring's reason text. Model outputs are None when the strategy does not need them.
    """

    image_id: int
    granularity: str
    score: float | None = None
    image_probs: np.ndarray | None = None
    detection_scores: np.ndarray | None = None
    labels: np.ndarray | None = None
    embedding: np.ndarray | None = None
    reason: str = ""


@dataclass(frozen=True)
class HistoryPoint:
    """A ready model version: its training label counts and its val mAP (0-1)."""

    weak: int
    full: int
    mAP: float


@dataclass(frozen=True)
class Context:
    """What a strategy knows besides the images.

    ``counts``: the training split's {"weak": n, "full": n} now; ``history``: earlier model versions;
    ``batch_units``: units an annotator (or the simulation) spends before the next round; ``seed``.
    """

    costs: CostModel = CostModel()
    counts: Mapping[str, int] = field(default_factory=dict)
    history: Sequence[HistoryPoint] = ()
    batch_units: float = 50.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.batch_units > 0:
            raise ValueError(f"batch_units must be > 0, got {self.batch_units}")


@dataclass(frozen=True)
class Pick:
    """One suggestion: do ``action`` on ``image_id`` (an ``upgrade``), costing ``cost`` units, expected to
    add ``gain`` mAP points (None: the strategy makes no estimate), because of ``reason``."""

    image_id: int
    granularity: str
    action: str
    cost: float
    gain: float | None
    reason: str

    @property
    def upgrade(self) -> str:
        return UPGRADES[(self.granularity, self.action)]

    @property
    def gain_per_unit(self) -> float | None:
        return None if self.gain is None else self.gain / self.cost


def _step_action(granularity: str) -> str:
    if granularity == UNLABELED:
        return ADD_LABELS
    if granularity == WEAK:
        return DRAW_BOXES
    raise ValueError(f"strategies rank unlabeled and weak images, got {granularity!r}")


# --------------------------------------------------------------------------------------------------
# Vectorised scorers (each is checked against a loop oracle in tests/test_strategies.py)
# --------------------------------------------------------------------------------------------------
def binary_entropy(p: np.ndarray) -> np.ndarray:
    """Elementwise entropy (nats) of Bernoulli probabilities ``p`` (any shape); 0 at p = 0 or 1."""
    p = np.clip(np.asarray(p, dtype=np.float64), 0.0, 1.0)
    q = 1.0 - p
    return -(p * np.log(np.where(p > 0, p, 1.0)) + q * np.log(np.where(q > 0, q, 1.0)))


def detection_uncertainty(scores: Sequence[np.ndarray], labels: Sequence[np.ndarray], num_classes: int) -> np.ndarray:
    """Per image, the mean over classes of the binary entropy of the class's best detection score (0
    when the class has no detection: the detector is sure it is absent). ndarray[B].

    Args:
        scores: per image ndarray[D_i] detection scores.
        labels: per image ndarray[D_i] 0-based classes.
    """
    if len(scores) != len(labels):
        raise ValueError(f"got {len(scores)} score arrays but {len(labels)} label arrays")
    best = np.zeros((len(scores), num_classes))
    if scores:
        lengths = [len(s) for s in scores]
        image = np.repeat(np.arange(len(scores)), lengths)
        flat_scores = np.concatenate([np.asarray(s, dtype=np.float64).ravel() for s in scores]) if sum(lengths) else np.zeros(0)
        flat_labels = np.concatenate([np.asarray(lb, dtype=np.int64).ravel() for lb in labels]) if sum(lengths) else np.zeros(0, np.int64)
        if flat_labels.size and (flat_labels.min() < 0 or flat_labels.max() >= num_classes):
            raise ValueError(f"detection labels must be in [0, {num_classes})")
        np.maximum.at(best, (image, flat_labels), flat_scores)
    return binary_entropy(best).mean(1) if num_classes else np.zeros(len(scores))


def k_center_greedy(embeddings: np.ndarray, k: int, *, centers: np.ndarray | None = None) -> list[int]:
    """Core-set selection: ``k`` row indices of ``embeddings`` (ndarray[M, E]), each the point farthest
    (Euclidean) from the points chosen so far and the given ``centers`` (ndarray[C, E]); without centers
    the first pick is the point farthest from the mean. Ties go to the lower index."""
    x = np.asarray(embeddings, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"embeddings must be ndarray[M, E], got shape {x.shape}")
    k = min(int(k), len(x))
    if k <= 0:
        return []
    has_centers = centers is not None and len(centers) > 0
    if has_centers:
        c = np.asarray(centers, dtype=np.float64)
        nearest = pairwise_distances(x, c).min(1)
    else:
        nearest = np.sqrt(((x - x.mean(0)) ** 2).sum(1))
    chosen: list[int] = []
    for _ in range(k):
        masked = nearest.copy()
        masked[chosen] = -np.inf
        i = int(np.argmax(masked))
        to_i = np.sqrt(((x - x[i]) ** 2).sum(1))
        nearest = to_i if not (chosen or has_centers) else np.minimum(nearest, to_i)  # the mean only seeds
        chosen.append(i)
    return chosen


def pairwise_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Euclidean distances ndarray[M, C] between the rows of ``a`` (M, E) and ``b`` (C, E), without
    the (M, C, E) intermediate."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    squared = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T
    return np.sqrt(np.maximum(squared, 0.0))


def relative(values: np.ndarray) -> np.ndarray:
    """``values / mean(values)`` (all ones when the mean is not positive): informativeness relative to
    the pool, so that an average image gets the learning curve's average gain."""
    v = np.asarray(values, dtype=np.float64)
    mean = float(v.mean()) if v.size else 0.0
    return v / mean if mean > 1e-12 else np.ones_like(v)


# --------------------------------------------------------------------------------------------------
# The learning curve
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LearningCurve:
    """``mAP(weak, full) = a + b_weak * log(1 + weak) + b_full * log(1 + full)`` (b >= 0), and
    ``points``: how many model versions it was fitted to (0: the prior alone)."""

    a: float
    b_weak: float
    b_full: float
    points: int = 0

    def __call__(self, weak: float, full: float) -> float:
        return self.a + self.b_weak * math.log1p(max(weak, 0)) + self.b_full * math.log1p(max(full, 0))

    def gain(self, upgrade: str, weak: float, full: float) -> float:
        """Marginal mAP of one upgrade at the counts (weak, full)."""
        now = self(weak, full)
        if upgrade == UNLABELED_TO_WEAK:
            return self(weak + 1, full) - now
        if upgrade == WEAK_TO_FULL:
            return self(weak - 1, full + 1) - now
        if upgrade == UNLABELED_TO_FULL:
            return self(weak, full + 1) - now
        raise ValueError(f"unknown upgrade {upgrade!r}")


#: The prior curve's slopes (mAP per e-fold of images). Neutral at costs 1 and 5: with no history, one
#: more full image at n full is worth five more weak ones at n weak, so informativeness decides.
PRIOR_B_FULL = 0.05
PRIOR_B_WEAK = PRIOR_B_FULL / 5


def fit_learning_curve(history: Sequence[HistoryPoint], *, prior_weight: float = 3.0,
                       prior: tuple[float, float] = (PRIOR_B_WEAK, PRIOR_B_FULL)) -> LearningCurve:
    """Least squares of val mAP on (1, log1p(weak), log1p(full)) over ``history``, shrunk towards the
    ``prior`` slopes by a ridge of ``prior_weight`` (so one or two versions barely move it), slopes
    clipped at 0 (labels never hurt in expectation)."""
    points = [h for h in history if h.mAP is not None and math.isfinite(h.mAP)]
    if not points:
        return LearningCurve(0.0, prior[0], prior[1], 0)
    x = np.array([[1.0, math.log1p(h.weak), math.log1p(h.full)] for h in points])
    y = np.array([h.mAP for h in points], dtype=np.float64)
    # ridge on the slopes only: rows sqrt(w) * (0, 1, 0) = sqrt(w) * prior_weak, and the same for full
    r = math.sqrt(prior_weight)
    x = np.vstack([x, [[0.0, r, 0.0], [0.0, 0.0, r]]])
    y = np.concatenate([y, [r * prior[0], r * prior[1]]])
    coef, *_ = np.linalg.lstsq(x, y, rcond=None)
    b_weak, b_full = max(float(coef[1]), 0.0), max(float(coef[2]), 0.0)
    a = float(np.mean([h.mAP - b_weak * math.log1p(h.weak) - b_full * math.log1p(h.full) for h in points]))
    return LearningCurve(a, b_weak, b_full, len(points))


# --------------------------------------------------------------------------------------------------
# Candidate pools (bounded scoring at scale)
# --------------------------------------------------------------------------------------------------
def candidate_pool(
    ids: Sequence[int],
    *,
    size: int | None,
    changed: Sequence[int] = (),
    previous_top: Sequence[int] = (),
    random_share: float = 0.3,
    rng: np.random.Generator | None = None,
) -> list[int]:
    """The images a round scores, most wanted first: the recently ``changed`` ones, then the
    ``previous_top`` candidates (both taken only where in ``ids``; together at most ``(1 - random_share)
    * size``), then a random share of the rest (which rotates from round to round with ``rng``), up to
    ``size`` images. ``size`` None: all of ``ids``, sorted."""
    if size is None:
        return sorted(ids)
    if size < 1 or not 0.0 <= random_share <= 1.0:
        raise ValueError(f"need size >= 1 and 0 <= random_share <= 1, got {size}, {random_share}")
    rng = rng or np.random.default_rng(0)
    present = set(ids)
    size = min(size, len(present))
    fixed_cap = int(round((1 - random_share) * size))
    pool: dict[int, None] = {}
    for i in list(changed) + list(previous_top):
        if len(pool) >= fixed_cap:
            break
        if i in present:
            pool[i] = None
    rest = np.array(sorted(present - set(pool)), dtype=np.int64)
    take = min(size - len(pool), len(rest))
    if take > 0:
        pool.update(dict.fromkeys(rng.choice(rest, size=take, replace=False).tolist()))
    return list(pool)


# --------------------------------------------------------------------------------------------------
# Strategies
# --------------------------------------------------------------------------------------------------
class Strategy:
    """Ranks images. ``needs_outputs``: whether it reads model outputs (else the trainer skips scoring)."""

    name = "strategy"
    needs_outputs = True

    def __call__(self, images: Sequence[ImageState], context: Context) -> list[Pick]:
        raise NotImplementedError

    def _pick(self, image: ImageState, context: Context, gain: float | None, reason: str, action: str | None = None) -> Pick:
        action = action or _step_action(image.granularity)
        return Pick(image.image_id, image.granularity, action, context.costs.of(action, image.granularity), gain, reason)


class RandomStrategy(Strategy):
    """Every not-full image, random order, one step up (``kind="labels"``: unlabeled only, labels;
    ``kind="boxes"``: every not-full image, boxes)."""

    needs_outputs = False

    def __init__(self, kind: str = "step") -> None:
        if kind not in ("step", "labels", "boxes"):
            raise ValueError(f"kind must be step, labels or boxes, got {kind!r}")
        self.kind = kind
        self.name = {"step": "random", "labels": "random_labels", "boxes": "random_boxes"}[kind]

    def __call__(self, images: Sequence[ImageState], context: Context) -> list[Pick]:
        rng = np.random.default_rng(context.seed)
        pool = [im for im in sorted(images, key=lambda im: im.image_id)
                if self.kind != "labels" or im.granularity == UNLABELED]
        action = {"step": None, "labels": ADD_LABELS, "boxes": DRAW_BOXES}[self.kind]
        return [self._pick(pool[i], context, None, f"random order ({self.name})", action) for i in rng.permutation(len(pool))]


class DisagreementStrategy(Strategy):
    """The trainer's suggestion score (teacher-student disagreement + uncertainty + conflict), best first."""

    name = "disagreement"

    def __call__(self, images: Sequence[ImageState], context: Context) -> list[Pick]:
        ordered = sorted(images, key=lambda im: (-(im.score if im.score is not None else -math.inf), im.image_id))
        return [self._pick(im, context, None, im.reason or f"score {im.score}") for im in ordered]


def _uncertainty(images: Sequence[ImageState]) -> np.ndarray:
    """Detection uncertainty (:func:`detection_uncertainty`) of images with outputs; NaN without."""
    have = [i for i, im in enumerate(images) if im.detection_scores is not None and im.image_probs is not None]
    out = np.full(len(images), np.nan)
    if have:
        # ``have`` holds only images with outputs: probabilities, detection scores and their labels
        n = len(cast(np.ndarray, images[have[0]].image_probs))
        scores = [cast(np.ndarray, images[i].detection_scores) for i in have]
        labels = [cast(np.ndarray, images[i].labels) for i in have]
        out[have] = detection_uncertainty(scores, labels, n)
    return out


class UncertaintyStrategy(Strategy):
    """Most uncertain detections first (:func:`detection_uncertainty`), one step up."""

    name = "uncertainty"

    def __call__(self, images: Sequence[ImageState], context: Context) -> list[Pick]:
        u = np.nan_to_num(_uncertainty(images), nan=-1.0)
        order = sorted(range(len(images)), key=lambda i: (-u[i], images[i].image_id))
        return [self._pick(images[i], context, None, f"uncertain detections (entropy {u[i]:.2f})") for i in order]


def _embeddings(images: Sequence[ImageState]) -> np.ndarray | None:
    if not images or any(im.embedding is None for im in images):
        return None
    return np.stack([np.asarray(im.embedding, dtype=np.float64) for im in images])


def _batch_count(images: Sequence[ImageState], context: Context) -> int:
    """How many one-step upgrades of these images one batch buys at most (every image the cheapest)."""
    cheapest = min((context.costs.of(_step_action(im.granularity), im.granularity) for im in images), default=1.0)
    return max(1, int(context.batch_units // cheapest))


class DiversityStrategy(Strategy):
    """k-center greedy on the pooled C5 embeddings for one batch, then the rest by distance to it."""

    name = "diversity"

    def __call__(self, images: Sequence[ImageState], context: Context) -> list[Pick]:
        images = sorted(images, key=lambda im: im.image_id)
        x = _embeddings(images)
        if x is None:
            raise ValueError("diversity needs every image's embedding (ImageState.embedding)")
        order = k_center_greedy(x, len(images))
        return [self._pick(images[i], context, None, f"far from the images picked before it (k-center, #{r + 1})")
                for r, i in enumerate(order)]


class UncertaintyDiversityStrategy(Strategy):
    """Two stages (PPAL's spirit): the ``factor`` x batch most uncertain images, then k-center greedy
    among them for the batch; the rest follows by uncertainty."""

    name = "uncertainty_diversity"

    def __init__(self, factor: int = 3) -> None:
        if factor < 1:
            raise ValueError(f"factor must be >= 1, got {factor}")
        self.factor = factor

    def __call__(self, images: Sequence[ImageState], context: Context) -> list[Pick]:
        images = sorted(images, key=lambda im: im.image_id)
        x = _embeddings(images)
        if x is None:
            raise ValueError("uncertainty_diversity needs every image's embedding (ImageState.embedding)")
        u = np.nan_to_num(_uncertainty(images), nan=-1.0)
        by_u = sorted(range(len(images)), key=lambda i: (-u[i], images[i].image_id))
        batch = _batch_count(images, context)
        short = by_u[: self.factor * batch]
        first = [short[j] for j in k_center_greedy(x[short], batch)]
        rest = [i for i in by_u if i not in set(first)]
        return [self._pick(images[i], context, None, f"uncertain (entropy {u[i]:.2f})"
                           + (" and unlike the others in this batch" if r < len(first) else ""))
                for r, i in enumerate(first + rest)]


class CostAwareStrategy(Strategy):
    """Expected mAP gain per unit cost, per image and upgrade (see the module docstring).

    Informativeness (relative to the pool, mean 1): image-level labels ``mean_c H(p_c)`` of the DAA
    probabilities; boxes ``score`` (the trainer's suggestion score: disagreement, uncertainty, conflict).
    The batch (``context.batch_units``) is chosen greedily by gain per unit times a diversity factor
    ``min(1, d / d_median)`` (d: embedding distance to the nearest image already in the batch), the
    label counts moving with each pick; the rest follows by gain per unit at the counts after the batch.

    Args:
        diversity: apply the diversity factor (False: gain per unit only).
    """

    name = "cost_aware"

    def __init__(self, *, diversity: bool = True) -> None:
        self.diversity = diversity

    @staticmethod
    def informativeness(images: Sequence[ImageState]) -> tuple[np.ndarray, np.ndarray]:
        """(for image-level labels, for boxes): ndarray[M] each, relative to the pool (mean 1)."""
        label_info = relative(np.array([binary_entropy(im.image_probs).mean() if im.image_probs is not None
                                        and len(im.image_probs) else 0.0 for im in images]))
        box_info = relative(np.array([im.score if im.score is not None else 0.0 for im in images]))
        return label_info, box_info

    @staticmethod
    def gains(granularity: np.ndarray, info: tuple[np.ndarray, np.ndarray], curve: LearningCurve,
              weak: float, full: float) -> np.ndarray:
        """ndarray[M, 3] expected gain of each image's upgrades (unlabeled->weak, weak->full,
        unlabeled->full) at counts (weak, full); -inf where the upgrade does not apply."""
        label_info, box_info = info
        out = np.full((len(granularity), 3), -np.inf)
        unl, weak_images = granularity == UNLABELED, granularity == WEAK
        out[unl, 0] = curve.gain(UNLABELED_TO_WEAK, weak, full) * label_info[unl]
        out[weak_images, 1] = curve.gain(WEAK_TO_FULL, weak, full) * box_info[weak_images]
        out[unl, 2] = curve.gain(UNLABELED_TO_FULL, weak, full) * box_info[unl]
        return out

    def __call__(self, images: Sequence[ImageState], context: Context) -> list[Pick]:
        images = sorted(images, key=lambda im: im.image_id)
        if not images:
            return []
        curve = fit_learning_curve(context.history)
        costs = np.array([context.costs.cost(u) for u in UPGRADE_NAMES])
        actions = (ADD_LABELS, DRAW_BOXES, DRAW_BOXES)
        weak, full = float(context.counts.get(WEAK, 0)), float(context.counts.get(FULL, 0))
        x = _embeddings(images) if self.diversity else None
        granularity = np.array([im.granularity for im in images])
        info = self.informativeness(images)
        scale = None
        if x is not None and len(x) > 1:
            sample = x[np.random.default_rng(context.seed).permutation(len(x))[:256]]
            d = pairwise_distances(sample, sample)
            scale = float(np.median(d[np.triu_indices(len(sample), 1)])) or None
        nearest = np.full(len(images), np.inf)
        left = context.batch_units
        taken = np.zeros(len(images), dtype=bool)
        picks: list[Pick] = []
        curve_text = (f"learning curve from {curve.points} model versions" if curve.points else "prior learning curve")
        while left >= costs.min() - 1e-9 and not taken.all():
            per_unit = self.gains(granularity, info, curve, weak, full) / costs
            per_unit[:, costs > left + 1e-9] = -np.inf
            factor = np.ones(len(images)) if scale is None else np.minimum(1.0, nearest / scale)
            finite = np.isfinite(per_unit)
            value = np.where(finite, np.where(finite, per_unit, 0.0) * factor[:, None], -np.inf)
            value[taken] = -np.inf
            if not np.isfinite(value).any():
                break
            i, j = np.unravel_index(int(np.argmax(value)), value.shape)
            taken[i] = True
            gain = float(per_unit[i, j] * costs[j])
            picks.append(self._pick(images[i], context, gain,
                                    f"{UPGRADES[(images[i].granularity, actions[j])]}: +{100 * gain:.3f} mAP points "
                                    f"expected for {costs[j]:g} units ({curve_text}, diversity x{factor[i]:.2f})",
                                    actions[j]))
            left -= costs[j]
            weak, full = weak + (j == 0) - (j == 1), full + (j >= 1)
            if x is not None:
                nearest = np.minimum(nearest, np.sqrt(((x - x[i]) ** 2).sum(1)))
        per_unit = self.gains(granularity, info, curve, weak, full) / costs
        best = per_unit.argmax(1)
        rest = sorted(np.flatnonzero(~taken).tolist(), key=lambda i: (-per_unit[i, best[i]], images[i].image_id))
        for r in rest:
            k = int(best[r])
            gain = float(per_unit[r, k] * costs[k])
            picks.append(self._pick(images[r], context, gain,
                                    f"{UPGRADES[(images[r].granularity, actions[k])]}: +{100 * gain:.3f} mAP points "
                                    f"expected for {costs[k]:g} units ({curve_text})", actions[k]))
        return picks


#: name -> factory of a strategy.
STRATEGIES: dict[str, Callable[[], Strategy]] = {
    "random": lambda: RandomStrategy("step"),
    "random_labels": lambda: RandomStrategy("labels"),
    "random_boxes": lambda: RandomStrategy("boxes"),
    "disagreement": DisagreementStrategy,
    "uncertainty": UncertaintyStrategy,
    "diversity": DiversityStrategy,
    "uncertainty_diversity": UncertaintyDiversityStrategy,
    "cost_aware": CostAwareStrategy,
}


def get_strategy(name: str) -> Strategy:
    """The registered strategy ``name`` (:data:`STRATEGIES`)."""
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}: one of {sorted(STRATEGIES)}")
    return STRATEGIES[name]()


def image_states(results: Sequence[Any]) -> list[ImageState]:
    """:class:`ImageState` of :class:`oxnet.active.scoring.ImageScore` results (tensors to numpy)."""
    out = []
    for r in results:
        embedding = getattr(r, "embedding", None)
        out.append(ImageState(
            image_id=r.image_id, granularity=r.granularity, score=r.value,
            image_probs=r.image_probs.float().numpy(), detection_scores=r.scores.float().numpy(),
            labels=r.labels.numpy(), embedding=None if embedding is None else embedding.float().numpy(),
            reason=str((r.reason or {}).get("text", "")),
        ))
    return out


def describe(picks: Sequence[Pick], costs: CostModel, strategy: str,
             classes: Mapping[int, Sequence[str]] | None = None) -> list[dict[str, Any]]:
    """Suggestion rows of ``picks`` (order kept): ``{"image_id", "action", "score", "reason"}`` with
    ``score`` strictly decreasing along the order (the queue sorts by it) and ``reason`` = ``{"text",
    "classes", "strategy", "rank", "upgrade", "cost", "gain", "gain_per_unit", "gain_per_minute"}``
    (``classes``: the class names the scoring named for the image, from ``classes``)."""
    classes = classes or {}
    rows = []
    for rank, p in enumerate(picks):
        per_unit = p.gain_per_unit
        rows.append({"image_id": p.image_id, "action": p.action, "score": float(len(picks) - rank), "reason": {
            "text": p.reason, "classes": list(classes.get(p.image_id, ())), "strategy": strategy, "rank": rank + 1,
            "upgrade": p.upgrade, "cost": p.cost,
            "gain": p.gain, "gain_per_unit": per_unit,
            "gain_per_minute": None if per_unit is None else costs.per_minute(per_unit),
        }})
    return rows
