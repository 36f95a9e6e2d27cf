"""Sample order: pure functions of (dataset, seed, epoch) and (rank, world_size).

- ``epoch_order``: a full permutation of the dataset for an epoch (exact global shuffle).
- ``rank_share``: the rank's strided share of that order. Remainder policy when
  the dataset does not divide by world_size: ``"pad"`` repeats the first
  samples of the order so every rank gets ceil(n / world_size) samples (every
  sample is seen at least once; fewer than world_size are seen twice);
  ``"drop"`` drops the last samples of the order so every rank gets
  floor(n / world_size) (no duplicates; fewer than world_size samples skipped
  this epoch, different ones each epoch).
- ``batch_bounds``: batch i covers share[start:stop].
"""

from __future__ import annotations

import hashlib
from typing import Literal

import numpy as np

from nearstore.core.errors import ConfigError

__all__ = ["epoch_order", "rank_share", "batch_bounds", "num_batches", "Remainder"]

Remainder = Literal["pad", "drop"]


def _seed_words(seed: int, epoch: int, fingerprint: str) -> list[int]:
    digest = hashlib.blake2b(f"{fingerprint}\x00{seed}\x00{epoch}".encode(), digest_size=16).digest()
    return [int.from_bytes(digest[i : i + 4], "little") for i in range(0, 16, 4)]


def epoch_order(n: int, *, seed: int, epoch: int, fingerprint: str = "", shuffle: bool = True) -> np.ndarray:
    """Global sample order of ``epoch``: a permutation of range(n), or range(n) without shuffle."""
    if n < 0:
        raise ConfigError(f"n must be >= 0 (got {n})")
    if not shuffle:
        return np.arange(n, dtype=np.int64)
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence(_seed_words(seed, epoch, fingerprint))))
    return rng.permutation(n).astype(np.int64)


def rank_share(order: np.ndarray, *, rank: int, world_size: int, remainder: Remainder = "pad") -> np.ndarray:
    """This rank's samples, in order; shares of different ranks are disjoint (but for padding)."""
    if world_size < 1:
        raise ConfigError(f"world_size must be >= 1 (got {world_size})")
    if not 0 <= rank < world_size:
        raise ConfigError(f"rank must be in 0..{world_size - 1} (got {rank})")
    n = len(order)
    if remainder == "drop":
        order = order[: (n // world_size) * world_size]
    elif remainder == "pad":
        total = -(-n // world_size) * world_size
        if total > n:
            reps = -(-total // max(n, 1))
            order = np.concatenate([order] * (reps + 1))[:total] if n else order
    else:
        raise ConfigError(f"remainder must be 'pad' or 'drop' (got {remainder!r})")
    return order[rank::world_size]


def num_batches(share_len: int, batch_size: int, *, drop_last: bool = False) -> int:
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1 (got {batch_size})")
    return share_len // batch_size if drop_last else -(-share_len // batch_size)


def batch_bounds(i: int, share_len: int, batch_size: int) -> tuple[int, int]:
    start = i * batch_size
    return start, min(start + batch_size, share_len)
