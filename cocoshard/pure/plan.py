"""Which samples each rank and each loader worker reads in an epoch (pure: no I/O, no processes).

An epoch orders the split's shards (a permutation of (seed, epoch) when training, the manifest's
order otherwise), views them as one sequence of samples using the manifest's counts, and cuts that
sequence into per-rank ranges of batches and per-worker `(shard, skip, take)` segments.

    plans = plan_epoch([800, 800, 347], batch_size=128, seed=0, epoch=3, rank=1, world_size=2,
                       workers=4, train=True)
    plans[w].segments, plans[w].batch_sizes
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cocoshard.seeds import Stream, numpy_rng


@dataclass(frozen=True)
class Segment:
    """`take` consecutive samples of shard number `shard` (in the manifest's list), after `skip`."""

    shard: int
    skip: int
    take: int


@dataclass(frozen=True)
class WorkerPlan:
    """What one worker reads in one epoch and how it cuts the samples into batches."""

    segments: tuple[Segment, ...]
    batch_sizes: tuple[int, ...]


def shard_order(num_shards: int, *, seed: int, epoch: int, train: bool) -> list[int]:
    """The epoch's shard order: a permutation of (seed, epoch) when training, else the manifest's."""
    if not train:
        return list(range(num_shards))
    rng = numpy_rng(seed, epoch, Stream.SHARD_ORDER)
    return rng.permutation(num_shards).tolist()


def rank_batches(
    total: int, *, batch_size: int, rank: int, world_size: int, train: bool
) -> tuple[int, list[int]]:
    """(first sample position, batch sizes) of one rank in an epoch's sequence of `total` samples.

    Training: every rank gets total // world_size positions and the same number of full batches
    (at most batch_size - 1 of its positions are dropped). Evaluation: contiguous, near-equal
    ranges covering every sample; the last batch may be partial.
    """
    if train:
        per_rank = total // world_size
        return rank * per_rank, [batch_size] * (per_rank // batch_size)
    base, extra = divmod(total, world_size)
    count = base + (1 if rank < extra else 0)
    start = rank * base + min(rank, extra)
    full, rest = divmod(count, batch_size)
    return start, [batch_size] * full + ([rest] if rest else [])


def segments_between(order: list[int], counts: list[int], start: int, stop: int) -> list[Segment]:
    """The pieces of shards that hold positions [start, stop) of the sequence `order` defines."""
    pieces: list[Segment] = []
    offset = 0
    for shard in order:
        lo, hi = max(start, offset), min(stop, offset + counts[shard])
        if lo < hi:
            pieces.append(Segment(shard, lo - offset, hi - lo))
        offset += counts[shard]
        if offset >= stop:
            break
    return pieces


def _merge(segments: list[Segment]) -> tuple[Segment, ...]:
    merged: list[Segment] = []
    for seg in segments:
        last = merged[-1] if merged else None
        if last and last.shard == seg.shard and last.skip + last.take == seg.skip:
            merged[-1] = Segment(seg.shard, last.skip, last.take + seg.take)
        else:
            merged.append(seg)
    return tuple(merged)


def plan_epoch(
    counts: list[int],
    *,
    batch_size: int,
    seed: int,
    epoch: int,
    rank: int,
    world_size: int,
    workers: int,
    train: bool,
) -> list[WorkerPlan]:
    """Per worker of one rank: the segments it reads and the batch sizes it yields.

    Training workers get contiguous runs of whole batches (sizes differ by at most one batch);
    evaluation workers get batches w, w + workers, ... so the DataLoader's round-robin collection
    returns them in order.
    """
    order = shard_order(len(counts), seed=seed, epoch=epoch, train=train)
    start, sizes = rank_batches(
        sum(counts), batch_size=batch_size, rank=rank, world_size=world_size, train=train
    )
    offsets = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)]).tolist()
    plans = []
    for worker in range(workers):
        if train:
            base, extra = divmod(len(sizes), workers)
            first = worker * base + min(worker, extra)
            mine = list(range(first, first + base + (1 if worker < extra else 0)))
        else:
            mine = list(range(worker, len(sizes), workers))
        segments: list[Segment] = []
        for b in mine:
            segments += segments_between(order, counts, start + offsets[b], start + offsets[b + 1])
        plans.append(WorkerPlan(_merge(segments), tuple(sizes[b] for b in mine)))
    return plans


def epoch_permutation(total: int, *, seed: int, epoch: int, train: bool) -> np.ndarray:
    """The order of a split's rows in an epoch of a resident loader: a permutation of (seed, epoch)
    when training, identical on every rank; the rows in order otherwise."""
    if not train:
        return np.arange(total)
    return numpy_rng(seed, epoch, Stream.RESIDENT_ORDER).permutation(total)
