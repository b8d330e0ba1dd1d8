"""MixedBatchSampler: proportions, empty and small pools, determinism, rank slices, class balancing."""

import math
from collections import Counter

import numpy as np
import pytest

from oxnet.data.sampler import MixedBatchSampler, repeat_factors


def _granularities(full, weak, unlabeled):
    return ["full"] * full + ["weak"] * weak + ["unlabeled"] * unlabeled


def _mix(granularities, batch):
    counts = Counter(granularities[i] for i in batch)
    return counts["full"], counts["weak"], counts["unlabeled"]


def test_default_proportions_per_batch():
    g = _granularities(40, 40, 40)
    sampler = MixedBatchSampler(g, batch_size=8)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 15  # ceil(120 / 8)
    assert all(_mix(g, b) == (4, 2, 2) for b in batches)
    # each pool is drawn without replacement until it is used up
    full = [i for b in batches for i in b if g[i] == "full"]
    assert len(set(full[:40])) == 40


def test_custom_proportions_and_zero_share():
    g = _granularities(30, 30, 30)
    batches = list(MixedBatchSampler(g, batch_size=10, proportions={"full": 0.2, "weak": 0.8}))
    assert all(_mix(g, b) == (2, 8, 0) for b in batches)


def test_empty_pool_share_goes_to_the_others():
    g = _granularities(20, 10, 0)
    batches = list(MixedBatchSampler(g, batch_size=6))
    assert all(_mix(g, b) == (4, 2, 0) for b in batches)  # 0.5 : 0.25 renormalised to 2/3 : 1/3


@pytest.mark.parametrize("batch_size", [3, 4, 5])
def test_small_pools_cycle_and_every_batch_has_every_granularity(batch_size):
    g = _granularities(50, 1, 2)
    proportions = {"full": 1.0, "weak": 0.01, "unlabeled": 0.01}
    batches = list(MixedBatchSampler(g, batch_size=batch_size, proportions=proportions, num_batches=20))
    assert len(batches) == 20
    for b in batches:
        assert len(b) == batch_size and len(set(b)) == batch_size
        assert all(_mix(g, b))
    assert {i for b in batches for i in b if g[i] != "full"} == {50, 51, 52}


def test_batches_smaller_than_the_number_of_pools_follow_proportions_over_the_epoch():
    g = _granularities(40, 40, 40)
    batches = list(MixedBatchSampler(g, batch_size=2, num_batches=40))
    total = Counter(g[i] for b in batches for i in b)
    assert total == {"full": 40, "weak": 20, "unlabeled": 20}
    assert all(_mix(g, b)[0] == 1 for b in batches)


def test_deterministic_per_seed_and_epoch():
    g = _granularities(30, 20, 10)
    a, b = MixedBatchSampler(g, batch_size=4, seed=3), MixedBatchSampler(g, batch_size=4, seed=3)
    assert list(a) == list(b) == list(a)
    b.set_epoch(1)
    assert list(a) != list(b)
    assert list(a) != list(MixedBatchSampler(g, batch_size=4, seed=4))
    a.set_epoch(1)
    assert list(a) == list(b)


def test_ranks_get_disjoint_slices_with_the_same_mix():
    g = _granularities(64, 32, 32)
    ranks = [list(MixedBatchSampler(g, batch_size=4, rank=r, world_size=2)) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 16  # ceil(128 / 8)
    for b0, b1 in zip(*ranks):
        assert not set(b0) & set(b1)
        assert _mix(g, b0) == _mix(g, b1) == (2, 1, 1)
    # together the ranks see every full image once in the first 16 global batches
    assert sorted(i for r in ranks for b in r for i in b if g[i] == "full") == list(range(64))


def test_length_options():
    g = _granularities(10, 0, 0)
    assert len(MixedBatchSampler(g, batch_size=4)) == 3
    assert len(MixedBatchSampler(g, batch_size=4, drop_last=True)) == 2
    assert len(list(MixedBatchSampler(g, batch_size=4, num_batches=7))) == 7


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"granularities": ["boxes"]}, "granularities must be among"),
        ({"proportions": {"strong": 1.0}}, "proportions keys"),
        ({"proportions": {"full": -1.0}}, ">= 0"),
        ({"proportions": {"unlabeled": 1.0}}, "no images"),
        ({"batch_size": 0}, "batch_size"),
        ({"rank": 2, "world_size": 2}, "rank"),
        ({"repeat_threshold": 0.1}, "repeat_threshold needs class_sets"),
        ({"repeat_threshold": 0.0, "class_sets": [()] * 4}, "threshold must be a finite number > 0"),
    ],
)
def test_invalid_arguments(kwargs, match):
    arguments = {"granularities": _granularities(2, 2, 0), "batch_size": 2} | kwargs
    with pytest.raises(ValueError, match=match):
        MixedBatchSampler(**arguments)


# --------------------------------------------------------------------------------------------------
# Class-balanced sampling (repeat factors)
# --------------------------------------------------------------------------------------------------
def _repeat_factors_loop(class_sets, threshold):
    """Oracle: the LVIS formula image by image and class by class."""
    n = len(class_sets)
    classes = {c for s in class_sets for c in s}
    share = {c: sum(c in s for s in class_sets) / n for c in classes}
    per_class = {c: max(1.0, math.sqrt(threshold / share[c])) for c in classes}
    return [max((per_class[c] for c in s), default=1.0) for s in class_sets]


@pytest.mark.parametrize("threshold", [0.01, 0.1, 0.5, 1.0])
def test_repeat_factors_match_a_loop_oracle(threshold):
    rng = np.random.default_rng(0)
    rates = np.array([0.6, 0.3, 0.1, 0.03, 0.005, 0.0, 0.2, 0.01])
    class_sets = [tuple(int(c) for c in np.flatnonzero(rng.random(len(rates)) < rates)) for _ in range(300)]
    class_sets[0] = (3, 3, 1)  # a class listed twice counts once
    expected = _repeat_factors_loop(class_sets, threshold)
    np.testing.assert_allclose(repeat_factors(class_sets, threshold), expected, rtol=1e-12)
    assert any(not s for s in class_sets) and min(expected) == 1.0 < max(expected)  # the cases are there
    assert repeat_factors([], threshold).shape == (0,)
    np.testing.assert_array_equal(repeat_factors([(), ()], threshold), [1.0, 1.0])


def test_class_balanced_draws_rare_images_r_times_as_often():
    """Full pool: 90 images of class 0, 10 of class 1 (r = sqrt(0.25 / 0.1)); weak pool: 40 of class 0,
    10 of class 2 (r = sqrt(0.25 / 0.2)); unlabeled: 20 images, drawn evenly. Over many epochs a rare
    image is drawn r times as often as a common one (balancing off: once as often, and the test fails)."""
    g = _granularities(100, 50, 20)
    class_sets = [(0,)] * 90 + [(1,)] * 10 + [(0,)] * 40 + [(2,)] * 10 + [()] * 20
    sampler = MixedBatchSampler(g, batch_size=10, num_batches=20, class_sets=class_sets, repeat_threshold=0.25)
    np.testing.assert_allclose(sampler.repeats["full"], [1.0] * 90 + [math.sqrt(2.5)] * 10)
    assert sampler.repeats["unlabeled"] is None
    draws: Counter[int] = Counter()
    for epoch in range(200):
        sampler.set_epoch(epoch)
        for batch in sampler:
            assert _mix(g, batch) == (5, 3, 2) or _mix(g, batch) == (5, 2, 3)  # the proportions hold
            draws.update(batch)
    per_image = np.array([draws[i] for i in range(len(g))], dtype=float)
    for common, rare, r in ((slice(0, 90), slice(90, 100), math.sqrt(2.5)), (slice(100, 140), slice(140, 150), math.sqrt(1.25))):
        assert per_image[rare].mean() / per_image[common].mean() == pytest.approx(r, rel=0.05)
    unlabeled = per_image[150:]
    assert unlabeled.max() / unlabeled.min() < 1.1


def test_class_balanced_keeps_determinism_and_rank_slices():
    g = _granularities(40, 20, 8)
    class_sets = [(i % 5,) for i in range(40)] + [(0, 3)] * 15 + [(4,)] * 5 + [()] * 8
    options = dict(class_sets=class_sets, repeat_threshold=0.5, seed=2)
    a, b = MixedBatchSampler(g, batch_size=8, **options), MixedBatchSampler(g, batch_size=8, **options)
    assert list(a) == list(b) and list(a) != list(MixedBatchSampler(g, batch_size=8))
    b.set_epoch(1)
    assert list(a) != list(b)
    # Two ranks split the global batch of one process with twice the batch size, with the same mix.
    ranks = [list(MixedBatchSampler(g, batch_size=4, rank=r, world_size=2, **options)) for r in range(2)]
    for b0, b1, whole in zip(*ranks, a, strict=True):
        assert _mix(g, b0) == _mix(g, b1)
        assert sorted(b0 + b1) == sorted(whole)


def test_without_class_balancing_the_batches_are_those_of_before():
    """Pinned batches of the sampler before class balancing existed (seed 1, epoch 2)."""
    g = _granularities(6, 3, 3)
    for extra in ({}, {"class_sets": [(0,)] * 12}):
        sampler = MixedBatchSampler(g, batch_size=4, seed=1, **extra)
        sampler.set_epoch(2)
        assert list(sampler) == [[4, 5, 8, 11], [1, 0, 7, 9], [3, 2, 6, 10]]
