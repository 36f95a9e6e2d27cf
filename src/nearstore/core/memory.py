"""Reusable memory for batches: blocks lent out for as long as anything views them, then reused.

A fresh multi-megabyte array costs its pages again every time: the kernel
maps and zero-fills each one on first touch (measured ~0.25 ms per
3x224x224 float32 sample on the project's machine, ~13% of the host
pipeline's CPU; Arrow's and numpy's allocators both return blocks this large
to the OS). A ``BlockPool`` keeps blocks mapped and lends them again: an array
or Arrow buffer lent from a block holds a lease, and the block comes back to
the pool only when the last view of it is gone (numpy views, torch tensors
from ``torch.from_numpy``, Arrow slices), so reuse never overwrites data
somebody still reads.

``BlockPool(HeapBlock)`` backs the loader's batches; node workers use the
same pool over shared-memory files (``nearstore.node.workers``).

Memory that libraries allocate for us (gRPC receive buffers, file reads) we
cannot pool; ``retain_freed_memory`` asks glibc's malloc to keep such blocks
mapped after they are freed instead of unmapping them (its default for blocks
over 128 KiB to 32 MiB), so the next message reuses warm pages. The node
servers, their workers and a loader over a cluster call it.
"""

from __future__ import annotations

import ctypes
import functools
import math
import os
import threading
from typing import Callable, Protocol

import numpy as np
import pyarrow as pa

__all__ = ["Block", "HeapBlock", "BlockPool", "retain_freed_memory", "MALLOC_ENV"]

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)
_MMAP_THRESHOLD = 32 << 20  # glibc's largest: blocks up to 32 MiB come from (reused) heap memory
_TRIM_THRESHOLD = 256 << 20  # free memory kept at the top of a heap before it goes back to the OS
# the same settings for a child process (glibc reads these when it starts)
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(_MMAP_THRESHOLD), "MALLOC_TRIM_THRESHOLD_": str(_TRIM_THRESHOLD)}


@functools.cache
def retain_freed_memory() -> bool:
    """Keep freed blocks of up to 32 MiB mapped for reuse (glibc only; applied once per process). True if applied.

    Costs at most ~256 MiB of freed memory per malloc arena that is kept
    instead of returned; saves a page fault and zero-fill per 4 KiB of every
    large message received or sample read (measured: ~11% of a loader's CPU
    at 0.7 GB/s).
    """
    if os.name != "posix":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library this process already runs on: no lookup, no subprocess
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to tune
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD))


class Block(Protocol):
    """A block of memory at ``address`` of ``size`` bytes."""

    address: int
    size: int

    def close(self) -> None: ...


class HeapBlock:
    """Process-private memory (a numpy allocation kept alive by the block)."""

    def __init__(self, size: int) -> None:
        self._mem = np.empty(max(size, 1), np.uint8)
        self.address, self.size = self._mem.ctypes.data, size

    def close(self) -> None:
        """Nothing to do: the memory goes when the last reference to the block does."""


class _Lease:
    """Held by everything lent from a block; gives the block back when collected."""

    __slots__ = ("pool", "block")

    def __init__(self, pool: "BlockPool", block: Block) -> None:
        self.pool, self.block = pool, block

    def __del__(self) -> None:
        self.pool.give_back(self.block)


class BlockPool:
    """Blocks made by ``make(size)``, lent out and taken back.

    ``take(n)`` returns an idle block of at least ``max(n, size)`` bytes, or a
    new one (at most ``max_blocks`` exist; past that, None). ``grow(n)`` raises
    ``size`` (up to ``cap``): idle blocks smaller than it are closed. At most
    ``keep`` idle blocks are kept.
    """

    def __init__(self, make: Callable[[int], Block], *, size: int = 0, cap: int | None = None,
                 max_blocks: int | None = None, keep: int = 8) -> None:
        self._make, self.size, self.cap = make, size, cap
        self.max_blocks, self.keep = max_blocks, keep
        self._idle: list[Block] = []
        self.blocks = 0  # blocks that exist (idle or lent)
        self._closed = False
        self._lock = threading.Lock()

    @property
    def idle(self) -> int:
        return len(self._idle)

    def take(self, nbytes: int = 0) -> Block | None:
        need = max(nbytes, self.size)
        with self._lock:
            fits = [b for b in self._idle if b.size >= need]
            if fits:
                block = min(fits, key=lambda b: b.size)
                self._idle.remove(block)
                return block
            if self.max_blocks is not None and self.blocks >= self.max_blocks:
                return None
            self.blocks += 1
        try:
            return self._make(need)
        except OSError:
            with self._lock:
                self.blocks -= 1
            return None

    def give_back(self, block: Block) -> None:
        with self._lock:
            if not self._closed and block.size >= self.size and len(self._idle) < self.keep:
                self._idle.append(block)
                return
            self.blocks -= 1
        block.close()

    def grow(self, need: int) -> None:
        """Blocks must hold ``need`` bytes from now on (rounded up to a power of two, at most ``cap``)."""
        with self._lock:
            size = max(self.size, 1 << max(int(need) - 1, 0).bit_length())
            self.size = min(self.cap, size) if self.cap else size
            small = [b for b in self._idle if b.size < self.size]
            self._idle = [b for b in self._idle if b.size >= self.size]
            self.blocks -= len(small)
        for b in small:
            b.close()

    def lend_array(self, block: Block, shape: tuple[int, ...], dtype: np.dtype | str) -> np.ndarray:
        """A writable C-contiguous array over the start of ``block``; the block returns with its last view."""
        dt = np.dtype(dtype)
        n = math.prod(shape) * dt.itemsize
        if n > block.size:
            raise ValueError(f"{n} bytes do not fit a block of {block.size}")
        raw = (ctypes.c_uint8 * n).from_address(block.address)
        raw._lease = _Lease(self, block)  # type: ignore[attr-defined]  # every view keeps raw, raw keeps the lease
        return np.frombuffer(raw, dt).reshape(shape)

    def lend_buffer(self, block: Block, nbytes: int) -> pa.Buffer:
        """The first ``nbytes`` of ``block`` as an Arrow buffer; the block returns when Arrow drops it."""
        return pa.foreign_buffer(block.address, nbytes, base=_Lease(self, block))

    def array(self, shape: tuple[int, ...], dtype: np.dtype | str) -> np.ndarray:
        """``take`` + ``lend_array``: an uninitialized array in reused memory (new memory when none is idle)."""
        n = math.prod(shape) * np.dtype(dtype).itemsize
        block = self.take(n)
        if block is None:
            return np.empty(shape, dtype)
        return self.lend_array(block, shape, dtype)

    def close(self) -> None:
        """Close idle blocks; lent ones are closed when they come back."""
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
            self.blocks -= len(idle)
        for b in idle:
            b.close()
