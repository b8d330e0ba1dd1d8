"""A batch sampler that mixes full, weak and unlabeled images in fixed proportions per batch, optionally
class-balanced by repeat factors (:func:`repeat_factors`)."""

from __future__ import annotations

import math
from collections.abc import Collection, Iterator, Mapping, Sequence

import numpy as np
from torch.utils.data import Sampler

from oxnet.vocabulary import FULL, GRANULARITIES, UNLABELED, WEAK

#: Default share of each granularity in a batch.
DEFAULT_PROPORTIONS: Mapping[str, float] = {FULL: 0.5, WEAK: 0.25, UNLABELED: 0.25}


def repeat_factors(class_sets: Sequence[Collection[int]], threshold: float) -> np.ndarray:
    """Repeat factor of each image for class-balanced sampling (Gupta et al., LVIS, CVPR 2019; detectron2's
    ``RepeatFactorTrainingSampler``).

    Per class c, f(c) = share of the images whose class set holds c, and r(c) = max(1, sqrt(threshold / f(c)));
    an image's factor is the largest r(c) of its classes, 1 for an image without a class.

    Args:
        class_sets: the classes (int indices) of each image.
        threshold: t > 0; classes in fewer than a share t of the images are repeated.

    Returns:
        ndarray[N] float64, every value >= 1.
    """
    if not threshold > 0 or not math.isfinite(threshold):
        raise ValueError(f"threshold must be a finite number > 0, got {threshold}")
    sets = [np.unique(np.asarray(list(classes), dtype=np.int64)) for classes in class_sets]
    if not sets:
        return np.ones(0)
    rows = np.repeat(np.arange(len(sets)), [len(c) for c in sets])
    columns = np.concatenate(sets)
    if len(columns) and columns.min() < 0:
        raise ValueError(f"class indices must be >= 0, got {int(columns.min())}")
    present = np.zeros((len(sets), int(columns.max(initial=-1)) + 1), dtype=bool)
    present[rows, columns] = True
    share = present.mean(axis=0)  # f(c); 0 for an index no image has (its r(c) is never used)
    per_class = np.maximum(1.0, np.sqrt(threshold / np.where(share > 0, share, threshold)))
    return np.where(present, per_class, 1.0).max(axis=1, initial=1.0)


class MixedBatchSampler(Sampler[list[int]]):
    """Yields batches of dataset indices that mix the granularities in the given proportions.

    Each granularity is a pool drawn without replacement from a reshuffled permutation; a pool smaller
    than its share cycles (with a new permutation per pass). An empty pool's share goes to the others.
    When ``batch_size`` >= the number of non-empty pools with a positive proportion, every batch holds
    at least one image of each of them; the remaining slots follow the proportions, tracking them
    cumulatively over the epoch (so a 2-image batch with 0.5/0.25/0.25 alternates weak and unlabeled).

    For distributed training every rank builds the same global batch of ``batch_size * world_size``
    images and takes its own disjoint slice of each pool's share, so every rank's batch has the same mix.

    Class-balanced (``repeat_threshold``): the full and the weak pool are drawn by repeat factors
    (:func:`repeat_factors` of ``class_sets`` within the pool). Each pass over a pool holds an image
    floor(r) times plus once more with probability r - floor(r) (detectron2's stochastic rounding), in
    random order, so an image is drawn r times as often as one of factor 1 on average. The proportions per
    batch, the number of batches and the determinism per (seed, epoch) stay; a repeated image may appear
    twice in a batch or on two ranks. The unlabeled pool is drawn as without balancing.

    Args:
        granularities: granularity of each dataset index (``OmniDataset.granularities``).
        batch_size: images per batch on each rank.
        proportions: share of each granularity; missing keys or 0 leave that granularity out.
        num_batches: batches per epoch; default: enough to see every image once on average
            (``ceil(n_images / (batch_size * world_size))``, ``floor`` with ``drop_last``).
        seed: base seed; batches are a deterministic function of (seed, epoch).
        drop_last: round the default number of batches down instead of up.
        rank, world_size: this process's rank and the number of processes.
        class_sets: the classes of each dataset index (``OmniDataset.class_sets``); needed with ``repeat_threshold``.
        repeat_threshold: class-balanced sampling with this threshold t > 0; ``None``: off.
    """

    def __init__(
        self,
        granularities: Sequence[str],
        batch_size: int,
        proportions: Mapping[str, float] = DEFAULT_PROPORTIONS,
        *,
        num_batches: int | None = None,
        seed: int = 0,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
        class_sets: Sequence[Collection[int]] | None = None,
        repeat_threshold: float | None = None,
    ) -> None:
        unknown = set(granularities) - set(GRANULARITIES)
        if unknown:
            raise ValueError(f"granularities must be among {GRANULARITIES}, got {sorted(unknown)}")
        unknown = set(proportions) - set(GRANULARITIES)
        if unknown:
            raise ValueError(f"proportions keys must be among {GRANULARITIES}, got {sorted(unknown)}")
        if any(p < 0 or not math.isfinite(p) for p in proportions.values()):
            raise ValueError(f"proportions must be finite and >= 0, got {dict(proportions)}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank {rank}, world_size {world_size}")
        if num_batches is not None and num_batches < 0:
            raise ValueError(f"num_batches must be >= 0, got {num_batches}")
        if repeat_threshold is not None and (class_sets is None or len(class_sets) != len(granularities)):
            raise ValueError("repeat_threshold needs class_sets: the classes of each of the granularities' indices")
        granularity_array = np.asarray(granularities, dtype=object)
        #: Dataset indices of each used granularity (non-empty pool and positive proportion).
        self.pools: dict[str, np.ndarray] = {}
        for g in GRANULARITIES:
            pool = np.flatnonzero(granularity_array == g)
            if len(pool) and proportions.get(g, 0) > 0:
                self.pools[g] = pool
        if not self.pools:
            raise ValueError(f"no images in a granularity with a positive proportion: {dict(proportions)}")
        #: Repeat factor of each image of each pool; None: drawn uniformly (no balancing, or the unlabeled pool).
        self.repeats: dict[str, np.ndarray | None] = {
            g: repeat_factors([class_sets[i] for i in pool], repeat_threshold)
            if repeat_threshold is not None and class_sets is not None and g != UNLABELED else None
            for g, pool in self.pools.items()
        }
        total = sum(proportions[g] for g in self.pools)
        self.weights = {g: proportions[g] / total for g in self.pools}
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        if num_batches is None:
            n = sum(len(p) for p in self.pools.values()) / (batch_size * world_size)
            num_batches = math.floor(n) if drop_last else math.ceil(n)
        self.num_batches = num_batches
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Use the batches of ``epoch`` (as ``DistributedSampler.set_epoch``)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_batches

    def batch_counts(self) -> Iterator[dict[str, int]]:
        """Images of each granularity per batch (per rank), for the ``num_batches`` batches of an epoch."""
        names = list(self.pools)
        cumulative = dict.fromkeys(names, 0)
        floor = 1 if self.batch_size >= len(names) else 0
        for b in range(self.num_batches):
            counts = dict.fromkeys(names, floor)
            for _ in range(self.batch_size - floor * len(names)):
                deficit = {g: (b + 1) * self.batch_size * self.weights[g] - cumulative[g] - counts[g] for g in names}
                counts[max(names, key=deficit.__getitem__)] += 1
            for g in names:
                cumulative[g] += counts[g]
            yield counts

    def __iter__(self) -> Iterator[list[int]]:
        streams = {
            g: _Stream(pool, np.random.default_rng([self.seed, self.epoch, GRANULARITIES.index(g)]), self.repeats[g])
            for g, pool in self.pools.items()
        }
        for counts in self.batch_counts():
            batch: list[int] = []
            for g, count in counts.items():
                drawn = streams[g].take(count * self.world_size)
                batch.extend(drawn[self.rank * count : (self.rank + 1) * count].tolist())
            yield batch


class _Stream:
    """Endless draws from ``pool``: successive random permutations, concatenated. With ``repeats`` each
    permutation is of the pool with image i stochastically rounded ``repeats[i]`` times."""

    def __init__(self, pool: np.ndarray, rng: np.random.Generator, repeats: np.ndarray | None = None) -> None:
        self.pool, self.rng, self.repeats = pool, rng, repeats
        self.buffer = pool[:0]

    def _one_pass(self) -> np.ndarray:
        if self.repeats is None:
            return self.rng.permutation(self.pool)
        whole = np.floor(self.repeats)
        counts = whole.astype(np.int64) + (self.rng.random(len(self.pool)) < self.repeats - whole)
        return self.rng.permutation(np.repeat(self.pool, counts))

    def take(self, n: int) -> np.ndarray:
        while len(self.buffer) < n:
            self.buffer = np.concatenate([self.buffer, self._one_pass()])
        drawn, self.buffer = self.buffer[:n], self.buffer[n:]
        return drawn
