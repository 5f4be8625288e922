"""Pooled buffers come back only when nobody holds them."""

from __future__ import annotations

import torch

from cocoshard.loading.buffers import BufferPool, alias, released


def test_a_buffer_is_reused_only_after_every_view_is_gone():
    pool = BufferPool()
    first = pool.take((4, 5), torch.float32)
    address = first.data_ptr()
    view = first[1:].t()
    del first
    second = pool.take((4, 5), torch.float32)
    assert second.data_ptr() != address  # `view` still holds the first buffer
    del view, second
    assert pool.take((4, 5), torch.float32).data_ptr() == address


def test_an_alias_shares_memory_and_its_reference_expires_with_the_last_view():
    for dtype in (torch.uint8, torch.float32, torch.bfloat16):
        base = torch.zeros((3, 4), dtype=dtype)
        lent, reference = alias(base)
        lent[1, 2] = 7
        assert base[1, 2] == 7 and lent.dtype == dtype and lent.shape == base.shape
        kept = lent.permute(1, 0)[2:]
        del lent
        assert not released(reference)
        del kept
        assert released(reference) and released(None)


def test_pool_is_bounded():
    pool = BufferPool(max_per_key=2, max_keys=3)
    held = [pool.take((2,), torch.uint8) for _ in range(5)]
    assert len(pool._buffers[((2,), torch.uint8, False)]) == 2
    for n in range(3, 8):
        pool.take((n,), torch.uint8)
    assert len(pool._buffers) == 3 and held
