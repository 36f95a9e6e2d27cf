"""Sample order and rank shares: pure functions, checked over a grid and with hypothesis."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nearstore.core.errors import ConfigError
from nearstore.loader.order import batch_bounds, epoch_order, num_batches, rank_share

GRID = list(itertools.product([1, 2, 7, 64, 1000, 1001], [1, 2, 3, 8], [0, 1, 12345], [0, 1, 5]))


@pytest.mark.parametrize("n,world,seed,epoch", GRID)
def test_every_sample_once_per_epoch(n, world, seed, epoch):
    order = epoch_order(n, seed=seed, epoch=epoch, fingerprint="ds")
    assert sorted(order.tolist()) == list(range(n))
    # drop: disjoint, no duplicates, fewer than world_size dropped
    drop = [rank_share(order, rank=r, world_size=world, remainder="drop") for r in range(world)]
    flat = np.concatenate(drop)
    assert len(set(flat.tolist())) == len(flat)
    assert n - len(flat) < world
    assert len({len(s) for s in drop}) == 1
    # pad: every sample at least once, equal shares, fewer than world_size repeats
    pad = [rank_share(order, rank=r, world_size=world, remainder="pad") for r in range(world)]
    flat = np.concatenate(pad)
    assert set(flat.tolist()) == set(range(n))
    assert len(flat) - n < world
    assert len({len(s) for s in pad}) == 1
    # without padding the shares are disjoint: the first floor(n/world) rows of each rank
    base = n // world
    core = np.concatenate([s[:base] for s in pad])
    assert len(set(core.tolist())) == len(core)


@pytest.mark.parametrize("n,world,seed,epoch", GRID[::5])
def test_order_is_a_pure_function(n, world, seed, epoch):
    a = epoch_order(n, seed=seed, epoch=epoch, fingerprint="ds")
    b = epoch_order(n, seed=seed, epoch=epoch, fingerprint="ds")
    assert np.array_equal(a, b)
    if n > 10:
        assert not np.array_equal(a, epoch_order(n, seed=seed, epoch=epoch + 1, fingerprint="ds"))
        assert not np.array_equal(a, epoch_order(n, seed=seed + 1, epoch=epoch, fingerprint="ds"))
        assert not np.array_equal(a, epoch_order(n, seed=seed, epoch=epoch, fingerprint="other"))


def test_no_shuffle_is_identity():
    assert epoch_order(5, seed=3, epoch=2, shuffle=False).tolist() == [0, 1, 2, 3, 4]


@settings(max_examples=200, deadline=None)
@given(n=st.integers(0, 3000), world=st.integers(1, 16), batch=st.integers(1, 300), drop_last=st.booleans())
def test_batches_cover_the_share(n, world, batch, drop_last):
    order = epoch_order(n, seed=1, epoch=0)
    share = rank_share(order, rank=world - 1, world_size=world, remainder="drop")
    k = num_batches(len(share), batch, drop_last=drop_last)
    got = [share[slice(*batch_bounds(i, len(share), batch))] for i in range(k)]
    flat = np.concatenate(got) if got else np.array([], np.int64)
    if drop_last:
        assert all(len(g) == batch for g in got)
        assert len(share) - len(flat) < batch
    else:
        assert np.array_equal(flat, share)


def test_bad_parameters_are_named():
    order = epoch_order(10, seed=0, epoch=0)
    with pytest.raises(ConfigError, match="rank must be in 0..1"):
        rank_share(order, rank=2, world_size=2)
    with pytest.raises(ConfigError, match="world_size"):
        rank_share(order, rank=0, world_size=0)
    with pytest.raises(ConfigError, match="remainder must be 'pad' or 'drop'"):
        rank_share(order, rank=0, world_size=2, remainder="wrap")
    with pytest.raises(ConfigError, match="batch_size"):
        num_batches(10, 0)
