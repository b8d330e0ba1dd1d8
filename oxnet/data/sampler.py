"""A batch sampler that mixes full, weak and unlabeled images in fixed proportions per batch."""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence

import numpy as np
from torch.utils.data import Sampler

from oxnet.vocabulary import FULL, GRANULARITIES, UNLABELED, WEAK

#: Default share of each granularity in a batch.
DEFAULT_PROPORTIONS: Mapping[str, float] = {FULL: 0.5, WEAK: 0.25, UNLABELED: 0.25}


class MixedBatchSampler(Sampler[list[int]]):
    """Yields batches of dataset indices that mix the granularities in the given proportions.

    Each granularity is a pool drawn without replacement from a reshuffled permutation; a pool smaller
    than its share cycles (with a new permutation per pass). An empty pool's share goes to the others.
    When ``batch_size`` >= the number of non-empty pools with a positive proportion, every batch holds
    at least one image of each of them; the remaining slots follow the proportions, tracking them
    cumulatively over the epoch (so a 2-image batch with 0.5/0.25/0.25 alternates weak and unlabeled).

    For distributed training every rank builds the same global batch of ``batch_size * world_size``
    images and takes its own disjoint slice of each pool's share, so every rank's batch has the same mix.

    Args:
        granularities: granularity of each dataset index (``OmniDataset.granularities``).
        batch_size: images per batch on each rank.
        proportions: share of each granularity; missing keys or 0 leave that granularity out.
        num_batches: batches per epoch; default: enough to see every image once on average
            (``ceil(n_images / (batch_size * world_size))``, ``floor`` with ``drop_last``).
        seed: base seed; batches are a deterministic function of (seed, epoch).
        drop_last: round the default number of batches down instead of up.
        rank, world_size: this process's rank and the number of processes.
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
        granularity_array = np.asarray(granularities, dtype=object)
        #: Dataset indices of each used granularity (non-empty pool and positive proportion).
        self.pools: dict[str, np.ndarray] = {}
        for g in GRANULARITIES:
            pool = np.flatnonzero(granularity_array == g)
            if len(pool) and proportions.get(g, 0) > 0:
                self.pools[g] = pool
        if not self.pools:
            raise ValueError(f"no images in a granularity with a positive proportion: {dict(proportions)}")
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
            g: _Stream(pool, np.random.default_rng([self.seed, self.epoch, GRANULARITIES.index(g)]))
            for g, pool in self.pools.items()
        }
        for counts in self.batch_counts():
            batch: list[int] = []
            for g, count in counts.items():
                drawn = streams[g].take(count * self.world_size)
                batch.extend(drawn[self.rank * count : (self.rank + 1) * count].tolist())
            yield batch


class _Stream:
    """Endless draws from ``pool``: successive random permutations, concatenated."""

    def __init__(self, pool: np.ndarray, rng: np.random.Generator) -> None:
        self.pool, self.rng = pool, rng
        self.buffer = pool[:0]

    def take(self, n: int) -> np.ndarray:
        while len(self.buffer) < n:
            self.buffer = np.concatenate([self.buffer, self.rng.permutation(self.pool)])
        drawn, self.buffer = self.buffer[:n], self.buffer[n:]
        return drawn
