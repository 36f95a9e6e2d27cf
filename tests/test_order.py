"""Sample order and rank shares: pure functions, checked over a grid and with hypothesis."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nearstore.core.errors import ConfigError
from nearstore.loader.order import batch_bounds, epoch_order, num_batches, rank_share, resume_offset

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


def _run_epoch(n: int, layouts: list[tuple[int, float]], batch: int, remainder: str, seed: int = 0):
    """Simulate one epoch whose world size changes: each (world, fraction) runs that fraction of its batches on
    every rank in lockstep (the last layout runs to the end), then hands over through ``resume_offset``.
    Returns the order, the rows delivered (sample ids, padding included), and the final world size."""
    order = epoch_order(n, seed=seed, epoch=0)
    start, delivered = 0, []
    for k, (world, frac) in enumerate(layouts):
        shares = [rank_share(order, rank=r, world_size=world, remainder=remainder, start=start) for r in range(world)]
        assert len({len(s) for s in shares}) == 1  # equal shares: DDP needs the same number of steps per rank
        total = num_batches(len(shares[0]), batch)
        last = k == len(layouts) - 1
        done = total if last else min(int(frac * total), max(total - 1, 0))  # a state is saved mid-epoch
        for b in range(done):  # lockstep: batch b on every rank
            for s in shares:
                delivered.extend(s[slice(*batch_bounds(b, len(s), batch))].tolist())
        if not last:
            nxt = resume_offset(n, start=start, world_size=world, batches_done=done, batch_size=batch)
            assert sorted(delivered) == sorted(order[:nxt].tolist())  # consumed so far == a prefix of the order
            start = nxt
    return order, delivered, layouts[-1][0], start


@settings(max_examples=300, deadline=None)
@given(n=st.integers(1, 400), layouts=st.lists(st.tuples(st.integers(1, 9), st.floats(0, 1)), min_size=2,
                                               max_size=4),
       batch=st.integers(1, 17), remainder=st.sampled_from(["pad", "drop"]))
def test_elastic_resume_loses_and_repeats_nothing(n, layouts, batch, remainder):
    """A state saved with world size W resumes with W' (and again with W''...): the unconsumed samples of the
    epoch are split among the new ranks, each delivered exactly once; 'pad' fills equal shares only with
    samples already consumed this epoch, 'drop' leaves out fewer than W' of them, as a normal epoch would."""
    order, delivered, last_world, start = _run_epoch(n, layouts, batch, remainder)
    counts = np.bincount(np.asarray(delivered, np.int64), minlength=n)
    if remainder == "pad":
        assert (counts >= 1).all()  # nothing lost
        extra = np.flatnonzero(counts > 1)
        assert len(delivered) - n < last_world  # fewer than W' padding rows
        # padding repeats only samples consumed before the last hand-over (none of the rest twice)
        if start:
            assert set(extra.tolist()) <= set(order[:start].tolist())
    else:
        assert (counts <= 1).all()  # nothing repeated
        assert n - len(delivered) < last_world
        assert set(order[:start].tolist()) <= set(delivered)  # what was consumed stays consumed


@pytest.mark.parametrize("world,new_world", [(1, 3), (3, 2), (4, 8), (8, 4), (5, 5)])
def test_resumed_shares_for_a_grid(world, new_world):
    n, batch = 1001, 7
    for done in (0, 1, 5, 17):
        off = resume_offset(n, start=0, world_size=world, batches_done=done, batch_size=batch)
        assert off == min(n, done * batch * world)
        shares = [rank_share(epoch_order(n, seed=2, epoch=1), rank=r, world_size=new_world, start=off)
                  for r in range(new_world)]
        rest = epoch_order(n, seed=2, epoch=1)[off:]
        got = np.concatenate([s for s in shares])
        assert set(got.tolist()) >= set(rest.tolist()) and len(got) - len(rest) < new_world


def test_start_zero_is_the_normal_share():
    order = epoch_order(103, seed=5, epoch=0)
    for world in (1, 2, 4, 7, 200):
        for r in range(world):
            assert np.array_equal(rank_share(order, rank=r, world_size=world, start=0),
                                  rank_share(order, rank=r, world_size=world))
    with pytest.raises(ConfigError, match="start must be in 0..103"):
        rank_share(order, rank=0, world_size=1, start=104)
    with pytest.raises(ConfigError, match="batches_done must be >= 0"):
        resume_offset(103, start=0, world_size=2, batches_done=-1, batch_size=4)
