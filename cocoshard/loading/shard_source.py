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

import os
from collections.abc import Iterator

import numpy as np
import torch

from cocoshard import NUM_CLASSES
from cocoshard.loading.augment import Transform
from cocoshard.loading.batch import BYTES, IMAGES, INPUTS, KINDS, LABELS, SIZES, SPANS
from cocoshard.loading.buffers import Slot, SlotShapes
from cocoshard.loading.decode import fill_canvas, fill_labels
from cocoshard.loading.device_decode import compressed_image
from cocoshard.loading.tario import BadSample, BadShard, Sample, ShardChecks, read_samples
from cocoshard.loading.worker_side import Acquire, Filled
from cocoshard.pure.plan import Segment, WorkerPlan, plan_epoch
from cocoshard.seeds import Stream, numpy_rng, torch_generator
from cocoshard.shard_cache import Remote

# Room for the compressed image of a sample in a `--decode device` slot, on average over a batch
# (the challenge's JPEGs average 12 KB; a slot is then no larger than one of raw 224 px canvases).
BYTES_PER_IMAGE = 160 * 1024

Item = tuple[str, Sample | None, BadShard | None]  # (shard url, sample, or the error that lost it)


def shuffled(items: Iterator[Item], capacity: int, rng: np.random.Generator) -> Iterator[Item]:
    """A seeded shuffle buffer: fill `capacity` items, then emit a random one per item read."""
    buffer: list[Item] = []
    for item in items:
        if len(buffer) < capacity:
            buffer.append(item)
            continue
        slot = int(rng.integers(capacity))
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
        """(url, sample, None) for each planned sample; (url, None, error) for each lost to a bad shard."""
        cached: tuple[int, list[Sample]] | None = None
        for seg in segments:
            url = self.urls[seg.shard]
            if cached is None or cached[0] != seg.shard:
                try:
                    samples = read_samples(
                        url,
                        self.hashes[seg.shard],
                        self.counts[seg.shard],
                        checks=self.checks,
                        index=seg.shard,
                        remote=self.remote,
                    )
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
        while taken < size and (src.train or consumed < size):
            stream, item = self._next(stream)
            if item is None:
                break
            consumed += 1
            url, sample, error = item
            if src.skip_bad_samples:
                try:
                    if error is not None:
                        raise error
                    assert sample is not None
                    fill_canvas(sample, canvas[0])
                except (BadSample, BadShard):
                    continue
            taken += 1
            self.good += 1
        return stream

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
        label_rows = tensors[LABELS].numpy() if src.labelled else None
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
                assert sample is not None
                row = len(keys)
                if src.send_bytes:
                    used = _put_bytes(sample, row, encoded, spans, kinds, used, spill)
                else:
                    hw[row] = fill_canvas(sample, pixels[row])
                if label_rows is not None:
                    fill_labels(sample, label_rows[row])
            except (BadSample, BadShard) as exc:
                if not src.skip_bad_samples:
                    key = sample.key if sample is not None else "?"
                    raise BadSample(f"shard {url}, sample {key}: {exc}") from exc
                skipped += self.passes == 0
                continue
            keys.append(sample.key)
            self.good += 1
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
    sample: Sample,
    row: int,
    encoded: np.ndarray,
    spans: np.ndarray,
    kinds: np.ndarray,
    used: int,
    spill: dict[int, bytes],
) -> int:
    """Copy a sample's compressed image into the slot (or, past its end, into `spill`)."""
    data, kinds[row] = compressed_image(sample)
    if used + len(data) > len(encoded):
        spill[row] = bytes(data)
        spans[row] = (-1, len(data))
        return used
    encoded[used : used + len(data)] = np.frombuffer(data, dtype=np.uint8)
    spans[row] = (used, len(data))
    return used + len(data)
