"""MixedBatchSampler: proportions, empty and small pools, determinism, rank slices."""

from collections import Counter

import pytest

from oxnet.data.sampler import MixedBatchSampler


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
    ],
)
def test_invalid_arguments(kwargs, match):
    arguments = {"granularities": _granularities(2, 2, 0), "batch_size": 2} | kwargs
    with pytest.raises(ValueError, match=match):
        MixedBatchSampler(**arguments)
