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
- ``resume_offset``: elastic resume. Shares are strided and ranks advance in
  lockstep (under DDP every step all-reduces), so after b batches of size B
  on W ranks the samples consumed are exactly a prefix of the epoch order:
  ``order[:start + b*B*W]``. The unconsumed rest is ``order[offset:]``; a new
  world size W' splits it with ``rank_share(order, ..., start=offset)``,
  padding (remainder 'pad') only with samples already consumed this epoch.
"""

from __future__ import annotations

import hashlib
from typing import Literal

import numpy as np

from nearstore.core.errors import ConfigError

__all__ = ["epoch_order", "rank_share", "batch_bounds", "num_batches", "resume_offset", "Remainder"]

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


def rank_share(order: np.ndarray, *, rank: int, world_size: int, remainder: Remainder = "pad",
               start: int = 0) -> np.ndarray:
    """This rank's samples of ``order[start:]``, in order; shares of different ranks are disjoint (but for
    padding).

    ``start`` > 0 is the rest of an epoch after an elastic resume: with 'pad',
    the padding repeats samples of ``order[:start]`` (already consumed this
    epoch), so no unconsumed sample is delivered twice.
    """
    if world_size < 1:
        raise ConfigError(f"world_size must be >= 1 (got {world_size})")
    if not 0 <= rank < world_size:
        raise ConfigError(f"rank must be in 0..{world_size - 1} (got {rank})")
    if not 0 <= start <= len(order):
        raise ConfigError(f"start must be in 0..{len(order)} (got {start})")
    rest = order[start:]
    n = len(rest)
    if remainder == "drop":
        rest = rest[: (n // world_size) * world_size]
    elif remainder == "pad":
        missing = -(-n // world_size) * world_size - n
        pool = order[:start] if start else rest  # what padding repeats
        if missing and len(pool):
            rest = np.concatenate([rest, np.resize(pool, missing)])  # np.resize repeats pool cyclically
    else:
        raise ConfigError(f"remainder must be 'pad' or 'drop' (got {remainder!r})")
    return rest[rank::world_size]


def resume_offset(n: int, *, start: int, world_size: int, batches_done: int, batch_size: int) -> int:
    """Where the unconsumed rest of an epoch begins in its order, after ``batches_done`` batches of
    ``batch_size`` on each of ``world_size`` ranks (in lockstep) from ``start``.

    Batch b of every rank covers rows [b*B, (b+1)*B) of its strided share, so
    the first ``batches_done`` batches of all ranks together are the prefix of
    ``order[start:]`` of length ``batches_done * B * W`` (capped at the end:
    padding rows are repeats of consumed samples).
    """
    for name, v in (("start", start), ("batches_done", batches_done)):
        if v < 0:
            raise ConfigError(f"{name} must be >= 0 (got {v})")
    if world_size < 1 or batch_size < 1:
        raise ConfigError(f"world_size and batch_size must be >= 1 (got {world_size}, {batch_size})")
    if start > n:
        raise ConfigError(f"start must be in 0..{n} (got {start})")
    return min(n, start + batches_done * batch_size * world_size)


def num_batches(share_len: int, batch_size: int, *, drop_last: bool = False) -> int:
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1 (got {batch_size})")
    return share_len // batch_size if drop_last else -(-share_len // batch_size)


def batch_bounds(i: int, share_len: int, batch_size: int) -> tuple[int, int]:
    start = i * batch_size
    return start, min(start + batch_size, share_len)
