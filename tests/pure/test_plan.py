"""Who reads what: every rank the same full batches in training, every sample once in evaluation."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from cocoshard.pure.plan import (
    epoch_permutation,
    plan_epoch,
    rank_batches,
    segments_between,
    shard_order,
)

SHARD_COUNTS = st.lists(st.integers(1, 70), min_size=1, max_size=8)


def _positions(plan) -> list[tuple[int, int]]:
    """(shard, index in shard) of every sample a worker's plan reads, in its order."""
    return [(seg.shard, seg.skip + i) for seg in plan.segments for i in range(seg.take)]


@settings(max_examples=150, deadline=None)
@given(SHARD_COUNTS, st.integers(1, 4), st.integers(1, 5), st.integers(1, 16), st.integers(0, 9))
def test_training_gives_every_rank_the_same_full_batches_without_overlap(
    counts, world_size, workers, batch, epoch
):
    total = sum(counts)
    seen: list[tuple[int, int]] = []
    per_rank = set()
    for rank in range(world_size):
        plans = plan_epoch(
            counts,
            batch_size=batch,
            seed=3,
            epoch=epoch,
            rank=rank,
            world_size=world_size,
            workers=workers,
            train=True,
        )
        assert len(plans) == workers
        sizes = [s for plan in plans for s in plan.batch_sizes]
        assert set(sizes) <= {batch}
        per_rank.add(len(sizes))
        for plan in plans:
            assert sum(seg.take for seg in plan.segments) == sum(plan.batch_sizes)
            seen += _positions(plan)
    assert per_rank == {(total // world_size) // batch}
    assert len(seen) == len(set(seen))  # no sample twice in an epoch, on any rank or worker
    assert all(0 <= index < counts[shard] for shard, index in seen)
    # What is left out is at most one partial batch per rank and the remainder of the rank split.
    assert len(seen) >= total - world_size * (batch - 1) - (world_size - 1)


@settings(max_examples=150, deadline=None)
@given(SHARD_COUNTS, st.integers(1, 4), st.integers(1, 5), st.integers(1, 16))
def test_evaluation_covers_every_sample_once_in_manifest_order(counts, world_size, workers, batch):
    positions = []
    for rank in range(world_size):
        plans = plan_epoch(
            counts,
            batch_size=batch,
            seed=0,
            epoch=5,
            rank=rank,
            world_size=world_size,
            workers=workers,
            train=False,
        )
        # The loader takes batches round-robin over the workers: rebuild that order.
        streams = [_positions(plan) for plan in plans]
        cursors = [0] * workers
        for b in range(max(len(p.batch_sizes) for p in plans)):
            for w, plan in enumerate(plans):
                if b < len(plan.batch_sizes):
                    positions += streams[w][cursors[w] : cursors[w] + plan.batch_sizes[b]]
                    cursors[w] += plan.batch_sizes[b]
    assert positions == [(s, i) for s, n in enumerate(counts) for i in range(n)]


def test_shard_order_is_seeded_and_changes_with_the_epoch():
    assert shard_order(20, seed=1, epoch=0, train=True) == shard_order(20, seed=1, epoch=0, train=True)
    assert shard_order(20, seed=1, epoch=0, train=True) != shard_order(20, seed=1, epoch=1, train=True)
    assert shard_order(20, seed=1, epoch=0, train=True) != shard_order(20, seed=2, epoch=0, train=True)
    assert shard_order(20, seed=1, epoch=7, train=False) == list(range(20))


def test_the_resident_permutation_is_seeded_per_epoch_and_the_identity_for_evaluation():
    a = epoch_permutation(500, seed=1, epoch=0, train=True)
    assert sorted(a.tolist()) == list(range(500))
    assert (a == epoch_permutation(500, seed=1, epoch=0, train=True)).all()
    assert not (a == epoch_permutation(500, seed=1, epoch=1, train=True)).all()
    assert epoch_permutation(500, seed=1, epoch=3, train=False).tolist() == list(range(500))


def test_segments_and_rank_ranges_cut_the_sequence_exactly():
    assert [tuple(s.__dict__.values()) for s in segments_between([2, 0, 1], [4, 6, 3], 2, 9)] == [
        (2, 2, 1),
        (0, 0, 4),
        (1, 0, 2),
    ]
    assert rank_batches(103, batch_size=10, rank=1, world_size=3, train=False) == (35, [10, 10, 10, 4])
    assert rank_batches(103, batch_size=10, rank=2, world_size=3, train=True) == (68, [10, 10, 10])
