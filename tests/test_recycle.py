"""Pooled buffers come back only when nobody holds them."""

from __future__ import annotations

import torch

from cocoshard.recycle import BufferPool, storage_references


def test_a_buffer_is_reused_only_after_every_view_is_gone():
    pool = BufferPool()
    first = pool.take((4, 5), torch.float32)
    address = first.data_ptr()
    view = first[1:]
    del first
    second = pool.take((4, 5), torch.float32)
    assert second.data_ptr() != address  # `view` still holds the first buffer
    del view, second
    assert pool.take((4, 5), torch.float32).data_ptr() == address


def test_reference_counting_sees_views():
    tensor = torch.empty(8)
    base = storage_references(tensor)
    view = tensor[2:]
    assert storage_references(tensor) == base + 1
    del view
    assert storage_references(tensor) == base


def test_pool_is_bounded():
    pool = BufferPool(max_per_key=2, max_keys=3)
    held = [pool.take((2,), torch.uint8) for _ in range(5)]
    assert len(pool._buffers[((2,), torch.uint8, False)]) == 2
    for n in range(3, 8):
        pool.take((n,), torch.uint8)
    assert len(pool._buffers) == 3 and held
