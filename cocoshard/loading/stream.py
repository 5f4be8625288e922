"""The stream loader: worker processes read shard segments and hand over uint8 batches.

Each worker reads only its `(shard, skip, take)` segments of the epoch (see `cocoshard.epochs`),
shuffles them through a seeded buffer (training), decodes into uint8 batch buffers and sends them
to the main process. The buffers live in shared memory and are recycled: filling a fresh 19 MB
shared-memory batch costs ~100 µs per image in page faults and zeroing, a reused one ~10 µs (2-core
x86 CPU). The caller gets aliases of a buffer (`cocoshard.recycle`); its worker refills it only once
every tensor made from them is gone, and allocates a new one when all of its buffers are still
held, so nothing waits and nothing held is overwritten. Workers freeze the garbage collector on
what they inherit. The main process pins batches (CUDA) and copies them non_blocking.
"""

from __future__ import annotations

import gc
import math
import os
from dataclasses import replace
from typing import Any, Iterator, Optional

import numpy as np
import torch

from cocoshard import NUM_CLASSES
from cocoshard.loading.batch import Batch
from cocoshard.loading.buffers import alias, released
from cocoshard.loading.decode import fill_canvas, fill_labels
from cocoshard.loading.plan import (
    SAMPLE_BUFFER_STREAM,
    Segment,
    WorkerPlan,
    plan_epoch,
    rank_batches,
)
from cocoshard.loading.tario import (
    BadSample,
    BadShard,
    Sample,
    ShardChecks,
    read_samples,
)
from cocoshard.machine import usable_cores
from cocoshard.prepare.manifest import shard_urls, split_shards

# Buffers per worker beyond its queued batches: the one it fills and the two the caller may hold.
SPARE_SLOTS = 3


def _shared_empty(shape: tuple[int, ...], dtype: torch.dtype, shared: bool) -> torch.Tensor:
    """A tensor whose storage is born in shared memory, so sending it to the main process copies nothing."""
    if not shared:
        return torch.empty(shape, dtype=dtype)
    nbytes = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
    storage = torch.UntypedStorage._new_shared(max(nbytes, 1))
    return torch.empty(0, dtype=dtype).set_(storage, 0, shape)


class SlotRing:
    """One worker's reusable batch buffers (images, sizes, labels), each `batch_size` samples long.

    `free` is a (workers, slots) int8 table in shared memory: the worker sets a slot busy when it
    sends it, the main process clears it once no view of the slot is left on its side.
    """

    def __init__(self, free: torch.Tensor, worker: int, batch_size: int, canvas_size: int, labelled: bool,
                 shared: bool) -> None:
        self.busy, self.shared = free[worker], shared
        self.shapes = [((batch_size, canvas_size, canvas_size, 3), torch.uint8), ((batch_size, 2), torch.int64)]
        if labelled:
            self.shapes.append(((batch_size, NUM_CLASSES), torch.uint8))
        self.slots: list[Optional[list[torch.Tensor]]] = [None] * len(self.busy)
        self.next = 0

    def _new(self) -> list[torch.Tensor]:
        return [_shared_empty(shape, dtype, self.shared) for shape, dtype in self.shapes]

    def acquire(self) -> tuple[int, list[torch.Tensor]]:
        """(slot number, buffers) of a slot the main process has let go of, or (-1, new buffers)."""
        for step in range(len(self.slots)):
            slot = (self.next + step) % len(self.slots)
            if int(self.busy[slot]) == 0:
                self.next = slot + 1
                if self.slots[slot] is None:
                    self.slots[slot] = self._new()
                self.busy[slot] = 1
                return slot, self.slots[slot]
        return -1, self._new()


def _init_worker(worker: int) -> None:
    """Exclude everything inherited from the parent from garbage collection in this worker.

    A forked worker shares the parent's heap copy-on-write; each collection would walk (and so
    copy) the million objects an `import torch` leaves behind. Measured: raw-shard workers spent
    twice the CPU time of the same code in the main process until frozen.
    """
    gc.freeze()


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
                 train: bool, shuffle_buffer: int, skip_bad_samples: bool, epoch_cell: torch.Tensor,
                 slot_table: torch.Tensor) -> None:
        super().__init__()
        self.urls, self.counts, self.hashes = urls, counts, hashes
        self.canvas_size, self.labelled, self.batch_size = canvas_size, labelled, batch_size
        self.seed, self.rank, self.world_size, self.workers = seed, rank, world_size, max(1, workers)
        self.train, self.shuffle_buffer, self.skip_bad_samples = train, shuffle_buffer, skip_bad_samples
        self.epoch_cell, self.slot_table = epoch_cell, slot_table
        self.checks = ShardChecks(len(urls))
        self._ring: Optional[SlotRing] = None  # made in the process that fills it, kept across epochs

    def plans(self, epoch: int) -> list[WorkerPlan]:
        return plan_epoch(self.counts, batch_size=self.batch_size, seed=self.seed, epoch=epoch, rank=self.rank,
                          world_size=self.world_size, workers=self.workers, train=self.train)

    def __iter__(self) -> Iterator[Batch]:
        info = torch.utils.data.get_worker_info()
        worker = info.id if info is not None else 0
        epoch = int(self.epoch_cell[0])
        plan = self.plans(epoch)[worker]
        rng = np.random.default_rng([self.seed, epoch, self.rank, worker, SAMPLE_BUFFER_STREAM])
        if self._ring is None:
            self._ring = SlotRing(self.slot_table, worker, self.batch_size, self.canvas_size, self.labelled,
                                  shared=info is not None)
        return _BatchAssembler(self, plan, rng, self._ring, worker).batches()

    def read_segments(self, segments: tuple[Segment, ...]) -> Iterator[tuple[str, Optional[Sample], Optional[BadSample]]]:
        """(url, sample, None) for each planned sample; (url, None, error) for each lost to a bad shard."""
        cached: tuple[int, list[Sample]] | None = None
        for seg in segments:
            url = self.urls[seg.shard]
            if cached is None or cached[0] != seg.shard:
                try:
                    samples = read_samples(url, self.hashes[seg.shard], self.counts[seg.shard], checks=self.checks,
                                           index=seg.shard)
                    cached = (seg.shard, samples)
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

    def __init__(self, source: ShardBatches, plan: WorkerPlan, rng: np.random.Generator, ring: SlotRing,
                 worker: int) -> None:
        self.source, self.plan, self.rng, self.ring, self.worker = source, plan, rng, ring, worker
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
            if len(batch) or self.source.train or batch.skipped:
                yield batch  # an empty evaluation batch still carries its skipped count
            elif batch.slot is not None:
                self.ring.busy[batch.slot[1]] = 0

    def _fill(self, size: int, stream: Iterator) -> tuple[Batch, Iterator]:
        src = self.source
        slot, buffers = self.ring.acquire()
        images, sizes = buffers[0], buffers[1]
        labels = buffers[2] if src.labelled else None
        pixels, hw = images.numpy(), sizes.numpy()
        label_rows = None if labels is None else labels.numpy()
        keys: list[str] = []
        skipped = consumed = 0
        while len(keys) < size and (src.train or consumed < size):
            stream, item = self._next(stream)
            if item is None:
                break
            url, sample, error = item
            consumed += 1
            try:
                if error is not None:
                    raise error
                row = len(keys)
                hw[row] = fill_canvas(sample, pixels[row])
                if label_rows is not None:
                    fill_labels(sample, label_rows[row])
            except BadSample as exc:
                if not src.skip_bad_samples:
                    key = sample.key if sample is not None else "?"
                    raise BadSample(f"shard {url}, sample {key}: {exc}") from exc
                skipped += self.passes == 0
                continue
            keys.append(sample.key)
            self.good += 1
        n = len(keys)
        batch = Batch(images[:n], sizes[:n], None if labels is None else labels[:n], keys, skipped,
                      slot=(self.worker, slot) if slot >= 0 else None)
        return batch, stream


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
        self._slot_table = torch.zeros((max(1, workers), prefetch + SPARE_SLOTS), dtype=torch.int8).share_memory_()
        # Every slot's tensors as they arrived, kept so that the slot's mapping here stays alive (a
        # slot sent again arrives as the same storage: no new mmap, no page faults); the caller
        # gets aliases of them (see cocoshard.recycle), and a slot goes back to its worker once
        # the weak references to all of its aliases have expired.
        self._slot_tensors: dict[tuple[int, int], list[torch.Tensor]] = {}
        self._lent: dict[tuple[int, int], list] = {}
        self._dataset = ShardBatches(
            shard_urls(location, manifest, split), counts, [e.get("sha256") for e in entries],
            canvas_size=self.canvas_size, labelled=split != "test", batch_size=batch_size, seed=seed, rank=rank,
            world_size=world_size, workers=workers, train=train, shuffle_buffer=shuffle_buffer,
            skip_bad_samples=skip_bad_samples, epoch_cell=self._epoch_cell, slot_table=self._slot_table,
        )
        _, sizes = rank_batches(self.split_samples, batch_size=batch_size, rank=rank, world_size=world_size, train=train)
        self._batches, self.num_samples = len(sizes), sum(sizes)
        # Cores left to CPU augmentation in this process once the workers have theirs.
        self.augment_threads = max(1, usable_cores() - workers)
        self._loader = torch.utils.data.DataLoader(
            self._dataset, batch_size=None, num_workers=workers, pin_memory=device.type == "cuda",
            persistent_workers=workers > 0, prefetch_factor=prefetch if workers > 0 else None,
            worker_init_fn=_init_worker if workers > 0 else None,
        )

    def __len__(self) -> int:
        return self._batches

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose shard order and shuffle the next iteration uses."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[Batch]:
        self._epoch_cell[0] = self.epoch
        self.skipped_samples = 0  # per pass, as resident mode counts its split once
        self._release_idle()  # the last epoch's final batches, before workers start filling again
        count = 0
        try:
            for batch in self._loader:
                self._release_idle()
                self.skipped_samples += batch.skipped
                count += 1
                if not (len(batch) or self.train):  # an evaluation batch emptied by bad samples:
                    if batch.slot is not None:     # only its skipped count mattered
                        self._slot_table[batch.slot] = 0
                    continue
                yield self._lend(batch).to(self.device)
        except Exception:
            self.close()
            raise
        if self.train and count != self._batches:
            raise RuntimeError(f"the loader yielded {count} batches instead of {self._batches}: epoch plan broken")

    def _release_idle(self) -> None:
        """Hand back to the workers the slots of earlier batches that nobody holds any more."""
        for slot, references in list(self._lent.items()):
            if all(released(r) for r in references):
                self._slot_table[slot] = 0
                del self._lent[slot]

    def _lend(self, batch: Batch) -> Batch:
        """The batch as the caller gets it: aliases of its slot's tensors, watched until dropped."""
        if batch.slot is None:
            return batch
        if batch.pinned:  # the page-locked copy is all the caller sees
            self._slot_table[batch.slot] = 0
            return batch
        originals = [batch.images, batch.sizes, batch.labels]
        self._slot_tensors[batch.slot] = [t for t in originals if t is not None]
        lent = [alias(t) if t is not None else (None, None) for t in originals]
        self._lent[batch.slot] = [reference for _, reference in lent]
        return replace(batch, images=lent[0][0], sizes=lent[1][0], labels=lent[2][0])

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
        # New workers make new buffers: forget the old ones (views the caller still has stay valid).
        self._slot_tensors.clear()
        self._lent.clear()
        self._slot_table.zero_()
        self._dataset._ring = None

    def __enter__(self) -> "StreamLoader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
