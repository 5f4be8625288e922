"""Shards -> batches on the device, in exact epochs: `stream` (worker processes) or `resident`.

    loader = build_loader("shards", "train", batch_size=128, device="cuda", mode="stream",
                          train=True, seed=0, rank=rank, world_size=world, workers=8)
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        for batch in loader:          # len(loader) batches, the same count on every rank
            x = train_augment(batch.images, batch.sizes, out_size=224, generator=g)

A batch holds uint8 canvases (N, S, S, 3), each image in its top-left (h, w) corner, the (h, w)
sizes, float32 multi-hot labels (None for the test split) and the sample keys.

Stream mode. Each epoch orders the split's shards by a permutation of (seed, epoch) that every
rank computes alike, views them as one sequence of samples (counts from the manifest), gives each
rank a contiguous range of whole batches (the same count everywhere, so DDP never waits on a rank
that ran dry) and splits that range into per-worker ranges of whole batches. A worker reads only
its (shard, skip, take) segments, shuffles them through a seeded buffer, decodes into uint8 batch
arrays in shared memory and hands them over without a copy; the main process pins them (CUDA) and
copies them non_blocking. Validation and test read every sample once, in the manifest's order,
keeping the last partial batch; batch b goes to worker b % workers, the order in which the
DataLoader collects them.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, replace
from typing import Any, Iterator, Optional

import numpy as np
import torch

from cocoshard import NUM_CLASSES
from cocoshard.decode import decode_to_canvas, fill_canvas, fill_labels
from cocoshard.errors import UserError
from cocoshard.shardio import BadSample, BadShard, Sample, read_samples
from cocoshard.shards import read_manifest, shard_urls, split_shards

__all__ = ["Batch", "Segment", "WorkerPlan", "build_loader", "decode_to_canvas", "plan_epoch", "StreamLoader"]

MODES = ("stream", "resident")
DEFAULT_SHUFFLE_BUFFER = 1000
# Distinct seed streams, so the shard order and the sample buffers never draw the same numbers.
_SHARD_ORDER_STREAM, _SAMPLE_BUFFER_STREAM = 0, 1


# ------------------------------------------------------------------------------------ batches


@dataclass
class Batch:
    """uint8 images (N, S, S, 3), int64 sizes (N, 2) as (h, w), float32 labels (N, 80) or None, keys."""

    images: torch.Tensor
    sizes: torch.Tensor
    labels: Optional[torch.Tensor]
    keys: list[str]
    skipped: int = field(default=0, repr=False)  # bad samples met while assembling this batch

    def __len__(self) -> int:
        return len(self.keys)

    def pin_memory(self) -> "Batch":
        """Page-locked copy, so the copy to the GPU can overlap compute (the DataLoader calls this)."""
        labels = None if self.labels is None else self.labels.pin_memory()
        return replace(self, images=self.images.pin_memory(), sizes=self.sizes.pin_memory(), labels=labels)

    def to(self, device: torch.device, non_blocking: bool = True) -> "Batch":
        """The batch on `device`, labels as float32."""
        labels = None if self.labels is None else self.labels.to(device, non_blocking=non_blocking).float()
        return replace(
            self,
            images=self.images.to(device, non_blocking=non_blocking),
            sizes=self.sizes.to(device, non_blocking=non_blocking),
            labels=labels,
        )


# ------------------------------------------------------------------------- planning (pure)


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
    rng = np.random.default_rng([seed, epoch, _SHARD_ORDER_STREAM])
    return rng.permutation(num_shards).tolist()


def rank_batches(total: int, *, batch_size: int, rank: int, world_size: int, train: bool) -> tuple[int, list[int]]:
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


def plan_epoch(counts: list[int], *, batch_size: int, seed: int, epoch: int, rank: int, world_size: int,
               workers: int, train: bool) -> list[WorkerPlan]:
    """Per worker of one rank: the segments it reads and the batch sizes it yields.

    Training workers get contiguous runs of whole batches (sizes differ by at most one batch);
    evaluation workers get batches w, w + workers, ... so the DataLoader's round-robin collection
    returns them in order.
    """
    order = shard_order(len(counts), seed=seed, epoch=epoch, train=train)
    start, sizes = rank_batches(sum(counts), batch_size=batch_size, rank=rank, world_size=world_size, train=train)
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


# -------------------------------------------------------------------- worker-side reading


def _shared_empty(shape: tuple[int, ...], dtype: torch.dtype, shared: bool) -> torch.Tensor:
    """A tensor whose storage is born in shared memory, so sending it to the main process copies nothing."""
    if not shared:
        return torch.empty(shape, dtype=dtype)
    nbytes = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
    storage = torch.UntypedStorage._new_shared(max(nbytes, 1))
    return torch.empty(0, dtype=dtype).set_(storage, 0, shape)


def _shuffled(items: Iterator, capacity: int, rng: np.random.Generator) -> Iterator:
    """A seeded shuffle buffer: fill `capacity` items, then emit a random one per item read."""
    buffer: list = []
    for item in items:
        if len(buffer) < capacity:
            buffer.append(item)
            continue
        slot = int(rng.integers(capacity))
        buffer[slot], item = item, buffer[slot]
        yield item
    rng.shuffle(buffer)
    yield from buffer


class ShardBatches(torch.utils.data.IterableDataset):
    """The worker side of the stream loader: one epoch of uint8 batches per `iter()`."""

    def __init__(self, urls: list[str], counts: list[int], hashes: list[Optional[str]], *, canvas_size: int,
                 labelled: bool, batch_size: int, seed: int, rank: int, world_size: int, workers: int,
                 train: bool, shuffle_buffer: int, skip_bad_samples: bool, epoch_cell: torch.Tensor) -> None:
        super().__init__()
        self.urls, self.counts, self.hashes = urls, counts, hashes
        self.canvas_size, self.labelled, self.batch_size = canvas_size, labelled, batch_size
        self.seed, self.rank, self.world_size, self.workers = seed, rank, world_size, max(1, workers)
        self.train, self.shuffle_buffer, self.skip_bad_samples = train, shuffle_buffer, skip_bad_samples
        self.epoch_cell = epoch_cell

    def plans(self, epoch: int) -> list[WorkerPlan]:
        return plan_epoch(self.counts, batch_size=self.batch_size, seed=self.seed, epoch=epoch, rank=self.rank,
                          world_size=self.world_size, workers=self.workers, train=self.train)

    def __iter__(self) -> Iterator[Batch]:
        info = torch.utils.data.get_worker_info()
        worker = info.id if info is not None else 0
        epoch = int(self.epoch_cell[0])
        plan = self.plans(epoch)[worker]
        rng = np.random.default_rng([self.seed, epoch, self.rank, worker, _SAMPLE_BUFFER_STREAM])
        return _BatchAssembler(self, plan, rng, shared=info is not None).batches()

    def read_segments(self, segments: tuple[Segment, ...]) -> Iterator[tuple[str, Optional[Sample], Optional[BadSample]]]:
        """(url, sample, None) for each planned sample; (url, None, error) for each lost to a bad shard."""
        cached: tuple[int, list[Sample]] | None = None
        for seg in segments:
            url = self.urls[seg.shard]
            if cached is None or cached[0] != seg.shard:
                try:
                    cached = (seg.shard, read_samples(url, self.hashes[seg.shard], self.counts[seg.shard]))
                except BadShard as exc:
                    if not self.skip_bad_samples:
                        raise
                    cached = None
                    for _ in range(seg.take):
                        yield url, None, exc
                    continue
            for sample in cached[1][seg.skip : seg.skip + seg.take]:
                yield url, sample, None


class _BatchAssembler:
    """Fills one worker's batches from its samples; with skip_bad_samples, bad ones are counted.

    Training keeps every batch full: when bad samples leave a worker short, it reads its own
    segments again to refill (such repeats equal the bad count). Evaluation drops bad samples from
    their batch and never yields an empty one.
    """

    def __init__(self, source: ShardBatches, plan: WorkerPlan, rng: np.random.Generator, shared: bool) -> None:
        self.source, self.plan, self.rng, self.shared = source, plan, rng, shared
        self.passes = 0
        self.good = 0

    def _stream(self) -> Iterator[tuple[str, Optional[Sample], Optional[BadSample]]]:
        items = self.source.read_segments(self.plan.segments)
        if self.source.train:
            items = _shuffled(items, self.source.shuffle_buffer, self.rng)
        return items

    def _next(self, stream: Iterator) -> tuple[Iterator, Any]:
        item = next(stream, None)
        if item is not None or not self.source.train:
            return stream, item
        if self.good == 0:
            raise BadShard(f"no sample this loader worker reads can be decoded (shards: {self._shard_names()})")
        self.passes += 1
        stream = self._stream()
        return stream, next(stream, None)

    def _shard_names(self) -> str:
        return ", ".join(sorted({os.path.basename(self.source.urls[s.shard]) for s in self.plan.segments}))

    def batches(self) -> Iterator[Batch]:
        stream = self._stream()
        for size in self.plan.batch_sizes:
            batch, stream = self._fill(size, stream)
            if len(batch) or self.source.train:
                yield batch

    def _fill(self, size: int, stream: Iterator) -> tuple[Batch, Iterator]:
        src = self.source
        images = _shared_empty((size, src.canvas_size, src.canvas_size, 3), torch.uint8, self.shared)
        sizes = _shared_empty((size, 2), torch.int64, self.shared)
        labels = _shared_empty((size, NUM_CLASSES), torch.uint8, self.shared) if src.labelled else None
        pixels, hw = images.numpy(), sizes.numpy()
        keys: list[str] = []
        skipped = consumed = 0
        while len(keys) < size and (src.train or consumed < size):
            stream, (url, sample, error) = self._next(stream)
            consumed += 1
            try:
                if error is not None:
                    raise error
                row = len(keys)
                hw[row] = fill_canvas(sample, pixels[row])
                if labels is not None:
                    fill_labels(sample, labels.numpy()[row])
            except BadSample as exc:
                if not src.skip_bad_samples:
                    raise BadSample(f"shard {url}, sample {sample.key}: {exc}") from exc
                skipped += self.passes == 0
                continue
            keys.append(sample.key)
            self.good += 1
        n = len(keys)
        return Batch(images[:n], sizes[:n], None if labels is None else labels[:n], keys, skipped), stream


# -------------------------------------------------------------------- main-process loader


class StreamLoader:
    """Exact epochs of device batches streamed from shards by `workers` processes (see module doc)."""

    def __init__(self, location: str, split: str, manifest: dict[str, Any], *, batch_size: int,
                 device: torch.device, train: bool, seed: int, rank: int, world_size: int, workers: int,
                 skip_bad_samples: bool, shuffle_buffer: int, prefetch: int) -> None:
        entries = split_shards(manifest, split)
        counts = [int(e["samples"]) for e in entries]
        self.manifest, self.split, self.device, self.train = manifest, split, device, train
        self.canvas_size = int(manifest["size"])
        self.split_samples = sum(counts)
        self.skipped_samples = 0
        self.epoch = 0
        self._epoch_cell = torch.zeros(1, dtype=torch.int64).share_memory_()
        self._dataset = ShardBatches(
            shard_urls(location, manifest, split), counts, [e.get("sha256") for e in entries],
            canvas_size=self.canvas_size, labelled=split != "test", batch_size=batch_size, seed=seed, rank=rank,
            world_size=world_size, workers=workers, train=train, shuffle_buffer=shuffle_buffer,
            skip_bad_samples=skip_bad_samples, epoch_cell=self._epoch_cell,
        )
        _, sizes = rank_batches(self.split_samples, batch_size=batch_size, rank=rank, world_size=world_size, train=train)
        self._batches, self.num_samples = len(sizes), sum(sizes)
        self._loader = torch.utils.data.DataLoader(
            self._dataset, batch_size=None, num_workers=workers, pin_memory=device.type == "cuda",
            persistent_workers=workers > 0, prefetch_factor=prefetch if workers > 0 else None,
        )

    def __len__(self) -> int:
        return self._batches

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose shard order and shuffle the next iteration uses."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[Batch]:
        self._epoch_cell[0] = self.epoch
        count = 0
        try:
            for batch in self._loader:
                self.skipped_samples += batch.skipped
                count += 1
                yield batch.to(self.device)
        except Exception:
            self.close()
            raise
        if self.train and count != self._batches:
            raise RuntimeError(f"the loader yielded {count} batches instead of {self._batches}: epoch plan broken")

    def close(self) -> None:
        """Stop the worker processes now (the next iteration starts new ones).

        Called after a failed epoch, and worth calling when done: left to the garbage collector,
        the DataLoader joins its workers whenever a collection happens to run, with a 5 s timeout
        per worker, and a later fork inherits the stale iterator.
        """
        iterator = getattr(self._loader, "_iterator", None)
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()
        self._loader._iterator = None

    def __enter__(self) -> "StreamLoader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------------------------- factory


def build_loader(location: str | os.PathLike, split: str, *, batch_size: int, device: torch.device | str,
                 mode: str = "stream", train: bool, seed: int, rank: int = 0, world_size: int = 1,
                 workers: int = 0, skip_bad_samples: bool = False, shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER,
                 prefetch: int = 4, memory_limit: Optional[int] = None) -> "StreamLoader":
    """Device batches of one split of the shards at `location` (folder or URL prefix).

    `workers` are loader processes for stream mode (0: read in this process); `memory_limit` caps
    the bytes resident mode may hold (default: what the device or host has free). A split too
    small for one batch per rank, a bad mode or a bad shard raise UserError.
    """
    if mode not in MODES:
        raise UserError(f"unknown loader mode {mode!r}: choose one of {', '.join(MODES)}")
    if batch_size <= 0 or world_size <= 0 or not 0 <= rank < world_size or workers < 0:
        raise UserError(f"bad loader settings: batch_size={batch_size}, rank={rank}, world_size={world_size}, workers={workers}")
    manifest = read_manifest(location)
    device = torch.device(device)
    common = dict(batch_size=batch_size, device=device, train=train, seed=seed, rank=rank, world_size=world_size,
                  skip_bad_samples=skip_bad_samples)
    if mode == "resident":
        from cocoshard.resident import ResidentLoader

        loader = ResidentLoader(str(location), split, manifest, memory_limit=memory_limit, **common)
    else:
        loader = StreamLoader(str(location), split, manifest, workers=workers, shuffle_buffer=shuffle_buffer,
                              prefetch=prefetch, **common)
    if train and len(loader) == 0:
        raise UserError(
            f"the {split!r} split holds {loader.split_samples} samples: too few for one batch of {batch_size} "
            f"on each of {world_size} process(es); lower --batch-size"
        )
    return loader
