"""The stream loader: worker processes read their shard segments and fill batches in shared memory.

Each worker reads only its `(shard, skip, take)` segments of the epoch (`cocoshard.pure.plan`),
shuffles them through a seeded buffer (training), decodes them and fills a batch slot
(`cocoshard.loading.workers`); the main process takes the batches in a fixed order (round-robin
over the workers, which is the manifest's order for evaluation).

What a slot holds depends on where the batch goes:
- on a CPU, with a transform (what training and evaluation use): the training-ready batch. The
  workers crop, resize and normalise (`cocoshard.loading.augment`) and the main process hands
  the batch on, so the per-image work spreads over every worker process instead of waiting on
  one process's threads;
- on CUDA, or without a transform: uint8 canvases, sizes and labels. On CUDA the slot is
  page-locked once (`cudaHostRegister`), copied to the device without blocking and given back to
  its worker when the copy has finished; the transform then runs on the device.

On a CPU the caller gets aliases of the slot (`cocoshard.loading.buffers.Loans`) and the slot goes
back to its worker once every tensor made from them is gone. With `workers=0` the same batches are
made in this process, in slots recycled the same way.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch

from cocoshard import NUM_CLASSES
from cocoshard.loading.batch import Batch
from cocoshard.loading.decode import (
    check_pixel_count,
    fill_canvas,
    fill_labels,
    image_member,
    image_size,
)
from cocoshard.loading.device_decode import KIND_JPEG, KIND_PNG
from cocoshard.loading.pooled import PooledBatches
from cocoshard.loading.tario import (
    BadSample,
    BadShard,
    Sample,
    ShardChecks,
    read_samples,
    shard_keys,
)
from cocoshard.loading.workers import Slot, SlotShapes
from cocoshard.machine import usable_cores
from cocoshard.prepare.manifest import shard_urls, split_shards
from cocoshard.pure.format import EXT_JPEG, EXT_PNG
from cocoshard.pure.plan import Segment, WorkerPlan, plan_epoch, rank_batches
from cocoshard.seeds import Stream, numpy_rng, torch_generator

Transform = Any  # cocoshard.loading.augment.TrainTransform or EvalTransform
# Room for the compressed image of a sample in a `--decode device` slot, on average over a batch
# (the challenge's JPEGs average 12 KB; a slot is then no larger than one of raw 224 px canvases).
BYTES_PER_IMAGE = 160 * 1024


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


# ----------------------------------------------------------------------------- worker side


class ShardBatchSource:
    """What a stream worker does: read its segments of an epoch and fill batch slots (picklable)."""

    def __init__(
        self,
        urls: list[str],
        counts: list[int],
        hashes: list[str | None],
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
        threads: int | None = None,
        send_bytes: bool = False,
    ) -> None:
        self.urls, self.counts, self.hashes = urls, counts, hashes
        self.canvas_size, self.labelled, self.batch_size = canvas_size, labelled, batch_size
        self.seed, self.rank, self.world_size, self.workers = seed, rank, world_size, max(1, workers)
        self.train, self.shuffle_buffer, self.skip_bad_samples = train, shuffle_buffer, skip_bad_samples
        self.transform = transform  # applied here (CPU) or None (the main process applies it)
        self.send_bytes = send_bytes  # --decode device: the compressed bytes go to the main process
        # One thread per worker process; every core when the batches are made in the main process.
        self.transform_threads = 1 if workers > 0 else threads or usable_cores()
        self.checks = ShardChecks(len(urls))
        self._canvas: tuple[torch.Tensor, torch.Tensor] | None = None  # private buffers when transforming

    def plans(self, epoch: int) -> list[WorkerPlan]:
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

    def slot_shapes(self) -> SlotShapes:
        """The tensors of one slot: the training-ready batch when transforming here, else canvases."""
        n, s = self.batch_size, self.canvas_size
        shapes: SlotShapes = {}
        if self.send_bytes:
            shapes["bytes"] = ((n * BYTES_PER_IMAGE,), torch.uint8)
            shapes["spans"] = ((n, 2), torch.int64)
            shapes["kinds"] = ((n,), torch.uint8)
        elif self.transform is not None:
            size = self.transform.out_size
            shapes["inputs"] = ((n, size, size, 3), self.transform.dtype)
        else:
            shapes["images"] = ((n, s, s, 3), torch.uint8)
            shapes["sizes"] = ((n, 2), torch.int64)
        if self.labelled:
            shapes["labels"] = ((n, NUM_CLASSES), torch.uint8)
        return shapes

    def batches(self, epoch: int, worker: int, acquire: Callable[[], tuple[int, Slot]]) -> Iterator[tuple]:
        """Fill one slot per planned batch of this worker; yields (slot, size, keys, skipped)."""
        plan = self.plans(epoch)[worker]
        rng = numpy_rng(self.seed, epoch, self.rank, worker, Stream.SAMPLE_BUFFER)
        generator = None
        if self.transform is not None and self.transform.random:
            generator = torch_generator(self.seed, epoch, self.rank, worker, Stream.AUGMENT)
        return _BatchAssembler(self, plan, rng, generator, acquire).batches()

    def read_segments(
        self, segments: tuple[Segment, ...]
    ) -> Iterator[tuple[str, Sample | None, BadSample | None]]:
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
        generator: torch.Generator | None,
        acquire: Callable[[], tuple[int, Slot]],
    ) -> None:
        self.source, self.plan, self.rng, self.generator, self.acquire = source, plan, rng, generator, acquire
        self.passes = 0
        self.good = 0

    def _stream(self) -> Iterator[tuple[str, Sample | None, BadSample | None]]:
        items = self.source.read_segments(self.plan.segments)
        if self.source.train:
            items = _shuffled(items, self.source.shuffle_buffer, self.rng)
        return items

    def _next(self, stream: Iterator) -> tuple[Iterator, Any]:
        item = next(stream, None)
        if item is not None or not self.source.train:
            return stream, item
        if self.good == 0:
            raise BadShard(
                f"no sample this loader worker reads can be decoded (shards: {self._shard_names()})"
            )
        self.passes += 1
        stream = self._stream()
        return stream, next(stream, None)

    def _shard_names(self) -> str:
        return ", ".join(sorted({os.path.basename(self.source.urls[s.shard]) for s in self.plan.segments}))

    def batches(self) -> Iterator[tuple]:
        stream = self._stream()
        for size in self.plan.batch_sizes:
            slot, tensors = self.acquire()
            self.spill: dict[int, bytes] = {}
            keys, skipped, stream = self._fill(size, stream, tensors)
            yield slot, len(keys), keys, skipped, self.spill or None

    def _fill(self, size: int, stream: Iterator, tensors: Slot) -> tuple[list[str], int, Iterator]:
        src = self.source
        if src.send_bytes:
            images = sizes = None
            encoded, spans, kinds = (
                tensors["bytes"].numpy(),
                tensors["spans"].numpy(),
                tensors["kinds"].numpy(),
            )
            used = 0
        else:
            images, sizes = (
                src.canvases() if src.transform is not None else (tensors["images"], tensors["sizes"])
            )
            pixels, hw = images.numpy(), sizes.numpy()
        label_rows = tensors["labels"].numpy() if src.labelled else None
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
                if src.send_bytes:
                    used = self._put_bytes(sample, row, encoded, spans, kinds, used)
                else:
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
        if src.transform is not None and keys and not src.send_bytes:
            n = len(keys)
            src.transform.apply(
                images[:n],
                sizes[:n],
                generator=self.generator,
                threads=src.transform_threads,
                out=tensors["inputs"],
            )
        return keys, skipped, stream

    def _put_bytes(
        self, sample: Sample, row: int, encoded: np.ndarray, spans: np.ndarray, kinds: np.ndarray, used: int
    ) -> int:
        """Copy a sample's compressed image into the slot (or, past its end, into the message)."""
        ext = image_member(sample)
        if ext not in (EXT_JPEG, EXT_PNG):
            raise BadSample(f"--decode device reads jpeg shards; this sample holds .{ext}")
        data = sample.members[ext]
        declared = image_size(data, ext)
        if declared is None:
            raise BadSample(f"its .{ext} member has no readable image header")
        check_pixel_count(data, ext)
        kinds[row] = KIND_JPEG if ext == EXT_JPEG else KIND_PNG
        if used + len(data) > len(encoded):
            self.spill[row] = bytes(data)
            spans[row] = (-1, len(data))
            return used
        encoded[used : used + len(data)] = np.frombuffer(data, dtype=np.uint8)
        spans[row] = (used, len(data))
        return used + len(data)


# ----------------------------------------------------------------------------- main side


class StreamLoader:
    """Exact epochs of device batches streamed from shards by `workers` processes (see module doc)."""

    def __init__(
        self,
        location: str,
        split: str | Sequence[str],
        manifest: dict[str, Any],
        *,
        batch_size: int,
        device: torch.device,
        train: bool,
        seed: int,
        rank: int,
        world_size: int,
        workers: int,
        skip_bad_samples: bool,
        shuffle_buffer: int,
        prefetch: int,
        transform: Transform | None = None,
        threads: int | None = None,
        decode: str = "host",
    ) -> None:
        entries = split_shards(manifest, split)
        counts = [int(e["samples"]) for e in entries]
        self.manifest, self.split, self.device, self.train = manifest, split, device, train
        self.canvas_size = int(manifest["size"])
        self.split_samples = sum(counts)
        self.epoch = 0
        self.transform, self.workers = transform, workers
        send_bytes = decode == "device"
        # On a CPU the batch is made ready where it is made, unless it is to be decoded here.
        in_source = device.type == "cpu" and not send_bytes
        self._source = ShardBatchSource(
            shard_urls(location, manifest, split),
            counts,
            [e.get("sha256") for e in entries],
            canvas_size=self.canvas_size,
            labelled=split != "test",
            batch_size=batch_size,
            seed=seed,
            rank=rank,
            world_size=world_size,
            workers=workers,
            train=train,
            shuffle_buffer=shuffle_buffer,
            skip_bad_samples=skip_bad_samples,
            transform=transform if in_source else None,
            threads=threads,
            send_bytes=send_bytes,
        )
        _, sizes = rank_batches(
            self.split_samples, batch_size=batch_size, rank=rank, world_size=world_size, train=train
        )
        self._batches, self.num_samples = len(sizes), sum(sizes)
        # Cores left to CPU augmentation in this process once the workers have theirs (for callers
        # that augment the canvases themselves).
        self.augment_threads = max(1, usable_cores() - workers)
        self._pooled = PooledBatches(
            self._source,
            self._source.slot_shapes(),
            workers=workers,
            device=device,
            prefetch=prefetch,
            seed=seed,
            rank=rank,
            device_transform=None if in_source else transform,
            output_transform=transform,
            name=f"{split} loader",
            canvas_size=self.canvas_size,
            skip_bad_samples=skip_bad_samples,
            threads=threads,
            where=self._shard_of,
        )

    def _shard_of(self, key: str) -> str:
        """The shard of the split holding `key`, read from the tar headers (for an error message only)."""
        for url in self._source.urls:
            try:
                if key in shard_keys(url):
                    return url
            except (OSError, BadSample):
                continue
        return f"(one of the {self.split!r} shards)"

    @property
    def skipped_samples(self) -> int:
        """Bad samples skipped in the latest pass over the split (with skip_bad_samples)."""
        return self._pooled.skipped

    def __len__(self) -> int:
        return self._batches

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose shard order and shuffle the next iteration uses."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[Batch]:
        # which worker each batch comes from: round-robin, as many as each one has
        counts = [len(plan.batch_sizes) for plan in self._source.plans(self.epoch)]
        order = [w for i in range(max(counts, default=0)) for w in range(len(counts)) if i < counts[w]]
        count = 0
        for batch in self._pooled.batches(self.epoch, order, self.train):
            count += 1
            yield batch
        if self.train and count != self._batches:
            raise RuntimeError(
                f"the loader yielded {count} batches instead of {self._batches}: epoch plan broken"
            )

    def close(self) -> None:
        """Stop the worker processes now (the next iteration starts new ones).

        Worth calling when done: worker processes hold memory and a file descriptor each until
        they are stopped. What the caller still holds stays valid.
        """
        self._pooled.close()

    def __enter__(self) -> StreamLoader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
