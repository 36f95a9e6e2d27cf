"""BlockPool: memory lent while anything views it, reused after."""

from __future__ import annotations

import gc

import numpy as np
import pytest
import torch

from nearstore.core.memory import BlockPool, HeapBlock, retain_freed_memory


def test_block_comes_back_only_when_the_last_view_is_gone():
    pool = BlockPool(HeapBlock)
    a = pool.array((4, 8), np.float32)
    a[...] = 7
    view, tensor = a[1:3], torch.from_numpy(a)
    del a
    gc.collect()
    assert pool.idle == 0  # a slice and a tensor still read it
    del view
    gc.collect()
    assert pool.idle == 0
    assert float(tensor.sum()) == 7 * 32
    del tensor
    gc.collect()
    assert pool.idle == 1 and pool.blocks == 1
    b = pool.array((2, 8), np.float32)  # fits the idle block: reused, no new block
    assert pool.blocks == 1 and pool.idle == 0 and b.flags.writeable and b.flags.c_contiguous


def test_reuse_never_hands_out_memory_still_in_use():
    pool = BlockPool(HeapBlock)
    held = []
    for i in range(6):
        a = pool.array((1000,), np.uint8)
        a[...] = i
        if i % 2 == 0:
            held.append(a)  # keep every other batch
        del a
    assert [int(x[0]) for x in held] == [0, 2, 4] and all((x == x[0]).all() for x in held)


def test_keep_max_blocks_grow_and_close():
    pool = BlockPool(HeapBlock, keep=1, max_blocks=2)
    blocks = [pool.take(100), pool.take(100)]
    assert pool.take(100) is None  # at most 2
    for b in blocks:
        pool.give_back(b)
    assert pool.idle == 1 and pool.blocks == 1  # keeps one idle
    pool.grow(1000)
    assert pool.size == 1024 and pool.idle == 0 and pool.blocks == 0  # idle blocks too small are dropped
    big = pool.take()
    assert big.size == 1024
    pool.close()
    pool.give_back(big)
    assert pool.idle == 0 and pool.blocks == 0
    with pytest.raises(ValueError, match="do not fit"):
        BlockPool(HeapBlock).lend_array(HeapBlock(8), (4,), np.float32)


def test_buffers_lent_to_arrow_hold_the_block():

    pool = BlockPool(HeapBlock)
    block = pool.take(64)
    buf = pool.lend_buffer(block, 64)
    piece = buf.slice(8, 8)
    del buf
    gc.collect()
    assert pool.idle == 0
    del piece
    gc.collect()
    assert pool.idle == 1


def test_retain_freed_memory_applies_on_glibc_and_is_idempotent():
    import platform

    applied = retain_freed_memory()
    assert retain_freed_memory() == applied
    if platform.libc_ver()[0] == "glibc":
        assert applied


def test_message_size_follows_the_link():
    from nearstore.node.client import MAX_MESSAGE_BYTES, MIN_MESSAGE_BYTES, message_bytes

    assert message_bytes(None) == MAX_MESSAGE_BYTES  # open link: fewest messages
    sizes = [message_bytes(c) for c in (1.0, 25.0, 100.0, 200.0, 400.0, 1e4)]
    assert sizes == sorted(sizes) and all(MIN_MESSAGE_BYTES <= s <= MAX_MESSAGE_BYTES for s in sizes)
    assert message_bytes(25.0) == MIN_MESSAGE_BYTES and message_bytes(1000.0) == MAX_MESSAGE_BYTES
