"""What a stream worker does (in its process, or in the training process with no workers): read its
shard segments of an epoch and fill batch slots.

Each worker reads only its `(shard, skip, take)` segments (`cocoshard.pure.plan`), shuffles them
through a seeded buffer (training), decodes them and fills a slot:
- with a transform (a CPU run): the training-ready batch: the image is decoded into this process's
  own canvas and cropped, resized and normalised into the slot (`cocoshard.loading.augment`)
  while it is in cache, so the per-image work spreads over every worker process;
- without (a GPU run): uint8 canvases, sizes and labels, which cross to the device as they are;
- with `send_bytes` (`--decode device`): each sample's compressed bytes (~12 KB for the challenge's
  images instead of 150 KB of pixels), decoded where the batch is used.

Every batch's augmentation draws from a generator of (seed, epoch, rank, batch number), and a
worker asked to start at its batch k replays the samples of its first k batches without decoding
them (with skip_bad_samples it decodes them, since a bad one changes what follows), so that an
epoch resumed mid-way yields exactly what the uninterrupted epoch would have from there.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator

import numpy as np
import torch

from cocoshard import NUM_CLASSES
from cocoshard.loading.augment import Transform
from cocoshard.loading.batch import BYTES, IMAGES, INPUTS, KINDS, LABELS, SIZES, SPANS
from cocoshard.loading.buffers import Slot, SlotShapes
from cocoshard.loading.layout import ShardLayout
from cocoshard.loading.tario import BadSample, BadShard, ShardChecks, read_shard
from cocoshard.loading.worker_side import Acquire, Filled
from cocoshard.pure.format import EXT_PIXELS
from cocoshard.pure.plan import Segment, WorkerPlan, plan_epoch
from cocoshard.seeds import Stream, numpy_rng, torch_generator
from cocoshard.shard_cache import Remote

# Room for the compressed image of a sample in a `--decode device` slot, on average over a batch
# (the challenge's JPEGs average 12 KB; a slot is then no larger than one of raw 224 px canvases).
BYTES_PER_IMAGE = 160 * 1024
# Shards whose layout (and map) each process keeps between epochs: each holds a file descriptor.
KEPT_SHARDS = 128
DRAWS = 1024  # shuffle buffer positions drawn at once

# (shard url, its layout and the sample's number in it, or the error that lost the sample)
Item = tuple[str, ShardLayout | None, int, BadShard | None]


def shuffled(items: Iterator[Item], capacity: int, rng: np.random.Generator) -> Iterator[Item]:
    """A seeded shuffle buffer: fill `capacity` items, then emit a random one per item read.

    The buffer's positions are drawn a thousand at a time: one `rng.integers` call per item cost
    more than copying a raw sample's pixels."""
    buffer: list[Item] = []
    draws: list[int] = []
    for item in items:
        if len(buffer) < capacity:
            buffer.append(item)
            continue
        if not draws:
            draws = rng.integers(capacity, size=DRAWS).tolist()[::-1]
        slot = draws.pop()
        buffer[slot], item = item, buffer[slot]
        yield item
    rng.shuffle(buffer)  # numpy shuffles a list in place
    yield from buffer


class ShardBatchSource:
    """A stream worker's work (picklable: forked or spawned into each worker process)."""

    def __init__(
        self,
        urls: list[str],
        counts: list[int],
        hashes: list[str],
        *,
        canvas_size: int,
        labelled: bool,
        batch_size: int,
        seed: int,
        rank: int,
        world_size: int,
        workers: int,
        train: bool,
        shuffle_buffer: int,
        skip_bad_samples: bool,
        transform: Transform | None,
        threads: int,
        send_bytes: bool,
        remote: Remote | None = None,
    ) -> None:
        self.urls, self.counts, self.hashes = urls, counts, hashes
        self.remote = remote  # how shards at URLs are read (timeouts, retries, the node's cache)
        self.canvas_size, self.labelled, self.batch_size = canvas_size, labelled, batch_size
        self.seed, self.rank, self.world_size, self.workers = seed, rank, world_size, max(1, workers)
        self.train, self.shuffle_buffer, self.skip_bad_samples = train, shuffle_buffer, skip_bad_samples
        self.transform = transform  # applied here (a CPU run) or None (the device stage applies it)
        self.send_bytes = send_bytes
        # Threads of the transform: one in each worker process, the plan's count in this process.
        self.transform_threads = 1 if workers > 0 else threads
        self.checks = ShardChecks(len(urls))
        self._canvas: tuple[torch.Tensor, torch.Tensor] | None = None  # private buffers when transforming
        self._layouts: dict[int, ShardLayout] = {}  # this process's, by shard number, oldest use first

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_layouts": {}}  # a spawned worker maps its shards itself

    def plans(self, epoch: int) -> list[WorkerPlan]:
        """What each worker of this rank reads in `epoch`."""
        return plan_epoch(
            self.counts,
            batch_size=self.batch_size,
            seed=self.seed,
            epoch=epoch,
            rank=self.rank,
            world_size=self.world_size,
            workers=self.workers,
            train=self.train,
        )

    def order(self, epoch: int) -> list[int]:
        """The worker of each batch of the epoch, in the order they are delivered: round-robin, as
        many as each worker has (for evaluation, the manifest's order)."""
        counts = [len(plan.batch_sizes) for plan in self.plans(epoch)]
        return [w for i in range(max(counts, default=0)) for w in range(len(counts)) if i < counts[w]]

    def slot_shapes(self) -> SlotShapes:
        """The tensors of one slot: the training-ready batch when transforming here, else canvases
        (or compressed bytes)."""
        n, s = self.batch_size, self.canvas_size
        shapes: SlotShapes = {}
        if self.send_bytes:
            shapes[BYTES] = ((n * BYTES_PER_IMAGE,), torch.uint8)
            shapes[SPANS] = ((n, 2), torch.int64)
            shapes[KINDS] = ((n,), torch.uint8)
        elif self.transform is not None:
            size = self.transform.out_size
            shapes[INPUTS] = ((n, size, size, 3), self.transform.dtype)
        else:
            shapes[IMAGES] = ((n, s, s, 3), torch.uint8)
            shapes[SIZES] = ((n, 2), torch.int64)
        if self.labelled:
            shapes[LABELS] = ((n, NUM_CLASSES), torch.uint8)
        return shapes

    def batches(self, epoch: int, worker: int, acquire: Acquire, start: int = 0) -> Iterator[Filled]:
        """Fill one slot per planned batch of `worker` from its batch `start` on."""
        plans = self.plans(epoch)
        first = sum(len(plan.batch_sizes) for plan in plans[:worker])  # this worker's first batch number
        rng = numpy_rng(self.seed, epoch, self.rank, worker, Stream.SAMPLE_BUFFER)
        return _BatchAssembler(self, plans[worker], rng, acquire, epoch, first).batches(start)

    def read_segments(self, segments: tuple[Segment, ...]) -> Iterator[Item]:
        """(url, layout, i, None) for each planned sample; (url, None, 0, error) for each sample lost
        to a bad shard."""
        layout, current = None, -1
        for seg in segments:
            url = self.urls[seg.shard]
            if current != seg.shard:
                try:
                    layout, current = self.layout(seg.shard), seg.shard
                except BadShard as exc:
                    if not self.skip_bad_samples:
                        raise
                    current = -1
                    for _ in range(seg.take):
                        yield url, None, 0, exc
                    continue
            for i in range(seg.skip, seg.skip + seg.take):
                yield url, layout, i, None

    def layout(self, shard: int) -> ShardLayout:
        """Shard `shard` read and checked, its layout kept while its file version stays the same."""
        mapped = read_shard(
            self.urls[shard],
            self.hashes[shard],
            self.counts[shard],
            checks=self.checks,
            index=shard,
            remote=self.remote,
        )
        layout = self._layouts.pop(shard, None)
        if layout is None or not mapped.stamp or layout.stamp != mapped.stamp:
            layout = ShardLayout.build(
                mapped, canvas_size=self.canvas_size, labelled=self.labelled, send_bytes=self.send_bytes
            )
        if mapped.stamp:  # (a download held in memory is read again next epoch, as it was)
            self._layouts[shard] = layout
            while len(self._layouts) > KEPT_SHARDS:
                del self._layouts[next(iter(self._layouts))]
        return layout

    def canvases(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This process's own canvas buffers, filled before the transform writes into the slot."""
        if self._canvas is None:
            n, s = self.batch_size, self.canvas_size
            self._canvas = (
                torch.empty((n, s, s, 3), dtype=torch.uint8),
                torch.empty((n, 2), dtype=torch.int64),
            )
        return self._canvas


class _BatchAssembler:
    """Fills one worker's batches from its samples; with skip_bad_samples, bad ones are counted.

    Training keeps every batch full: when bad samples leave a worker short, it reads its own
    segments again to refill (such repeats equal the bad count). Evaluation drops bad samples from
    their batch and never yields an empty one unless it carries a skipped count.
    """

    def __init__(
        self,
        source: ShardBatchSource,
        plan: WorkerPlan,
        rng: np.random.Generator,
        acquire: Acquire,
        epoch: int,
        first: int,
    ) -> None:
        self.source, self.plan, self.rng, self.acquire = source, plan, rng, acquire
        self.epoch, self.first = epoch, first
        self.passes = 0
        self.good = 0

    def _stream(self) -> Iterator[Item]:
        items = self.source.read_segments(self.plan.segments)
        if self.source.train:
            items = shuffled(items, self.source.shuffle_buffer, self.rng)
        return items

    def _next(self, stream: Iterator[Item]) -> tuple[Iterator[Item], Item | None]:
        item = next(stream, None)
        if item is not None or not self.source.train:
            return stream, item
        if self.good == 0:
            names = ", ".join(
                sorted({os.path.basename(self.source.urls[s.shard]) for s in self.plan.segments})
            )
            raise BadShard(f"no sample this loader worker reads can be decoded (shards: {names})")
        self.passes += 1
        stream = self._stream()
        return stream, next(stream, None)

    def batches(self, start: int) -> Iterator[Filled]:
        stream = self._stream()
        for number, size in enumerate(self.plan.batch_sizes):
            if number < start:  # resumed mid-epoch: the samples this batch took, read again
                stream = self._replay(size, stream)
                continue
            slot, tensors = self.acquire()
            spill: dict[int, bytes] = {}
            keys, skipped, stream = self._fill(size, stream, tensors, spill, self.first + number)
            yield Filled(slot, len(keys), keys, skipped, self.first + number, spill or None)

    def _replay(self, size: int, stream: Iterator[Item]) -> Iterator[Item]:
        """Consume what a batch of `size` consumed, without filling anything when no sample can be
        bad; with skip_bad_samples, decode each into scratch canvases to know which were bad."""
        src, taken, consumed = self.source, 0, 0
        canvas = src.canvases()[0].numpy()
        canvas_bytes = canvas.data.cast("B")
        while taken < size and (src.train or consumed < size):
            stream, item = self._next(stream)
            if item is None:
                break
            consumed += 1
            url, layout, i, error = item
            if src.skip_bad_samples:
                try:
                    if error is not None:
                        raise error
                    assert layout is not None
                    layout.check(i)
                    layout.fill(i, canvas, 0, canvas_bytes)
                except (BadSample, BadShard):
                    continue
            taken += 1
            self.good += 1
        return stream

    def _take(self, stream: Iterator[Item], count: int) -> tuple[Iterator[Item], list[Item]]:
        """The next `count` items (fewer at the end of an evaluation's stream; none when it is over)."""
        items = list(itertools.islice(stream, count))
        if not items:
            stream, item = self._next(stream)
            items = [item] if item is not None else []
        return stream, items

    def _fill(
        self, size: int, stream: Iterator[Item], tensors: Slot, spill: dict[int, bytes], index: int
    ) -> tuple[list[str], int, Iterator[Item]]:
        src = self.source
        if src.send_bytes:
            encoded, spans, kinds = tensors[BYTES].numpy(), tensors[SPANS].numpy(), tensors[KINDS].numpy()
            used = 0
        else:
            images, sizes = src.canvases() if src.transform is not None else (tensors[IMAGES], tensors[SIZES])
            pixels, hw = images.numpy(), sizes.numpy()
            pixel_bytes = pixels.data.cast("B")
        keys: list[str] = []
        shapes: list[tuple[int, int]] = []
        taken: dict[int, tuple[ShardLayout, list[int], list[int]]] = {}  # by layout: (it, rows, samples)
        skipped = consumed = 0
        while len(keys) < size and (src.train or consumed < size):
            stream, items = self._take(stream, size - len(keys) if src.train else size - consumed)
            if not items:
                break
            consumed += len(items)
            before = len(keys)
            for url, layout, i, error in items:
                try:
                    if error is not None:
                        raise error
                    assert layout is not None
                    if i in layout.problems:
                        raise BadSample(layout.problems[i])
                    row = len(keys)
                    if src.send_bytes:
                        used = _put_bytes(layout, i, row, encoded, spans, kinds, used, spill)
                    elif layout.exts[i] == EXT_PIXELS:  # copied below, a shard's samples at once
                        shapes.append(layout.sizes[i])
                    else:
                        shapes.append(layout.fill(i, pixels, row, pixel_bytes))
                except (BadSample, BadShard) as exc:
                    if not src.skip_bad_samples:
                        key = layout.keys[i] if layout is not None else "?"
                        raise BadSample(f"shard {url}, sample {key}: {exc}") from exc
                    skipped += self.passes == 0
                    continue
                keys.append(layout.keys[i])
                group = taken.get(id(layout))
                if group is None:
                    group = taken[id(layout)] = (layout, [], [])
                group[1].append(row)
                group[2].append(i)
            self.good += len(keys) - before  # (a stream that ends asks whether any sample was good)
        if shapes:
            hw[: len(shapes)] = shapes
            for layout, rows, picked in taken.values():
                layout.copy_pixels(picked, rows, pixels, pixel_bytes)
        if src.labelled:
            label_rows = tensors[LABELS].numpy()
            for layout, rows, picked in taken.values():  # one gather per shard in the batch
                assert layout.labels is not None
                label_rows[rows] = layout.labels[picked]
        if src.transform is not None and keys and not src.send_bytes:
            generator = None
            if src.transform.random:
                generator = torch_generator(src.seed, self.epoch, src.rank, index, Stream.AUGMENT)
            n = len(keys)
            src.transform.apply(
                images[:n], sizes[:n], generator=generator, threads=src.transform_threads, out=tensors[INPUTS]
            )
        return keys, skipped, stream


def _put_bytes(
    layout: ShardLayout,
    i: int,
    row: int,
    encoded: np.ndarray,
    spans: np.ndarray,
    kinds: np.ndarray,
    used: int,
    spill: dict[int, bytes],
) -> int:
    """Copy sample `i`'s compressed image into the slot (or, past its end, into `spill`)."""
    start, end = layout.starts[i], layout.ends[i]
    kinds[row], size = layout.kinds[i], end - start
    if used + size > len(encoded):
        spill[row] = layout.flat[start:end].tobytes()
        spans[row] = (-1, size)
        return used
    encoded[used : used + size] = layout.flat[start:end]
    spans[row] = (used, size)
    return used + size
