"""Resident loader: the whole split held once as one uint8 tensor; an epoch is a permutation.

Raw shards are copied in, JPEG shards decoded once (one thread per core; the decoders release the
GIL). The tensor lives on the training device when it fits, else in pinned host memory (CUDA) or
plain host memory (CPU); a split that fits neither the memory it is given nor what is free is
refused before anything is allocated. Each epoch draws one permutation of (seed, epoch), identical
on every rank, and each rank takes its slice of whole batches. No worker processes.

A batch is made where the split is:
- on a CPU with a transform, the crops are read straight from the split's rows (no batch is
  gathered first): by `workers` processes that share the split with this one (forked after it is
  loaded, so it is never copied) and fill training-ready slots (`cocoshard.loading.pooled`), or,
  with `workers=0`, by one thread per core of this process;
- on the GPU, rows are gathered with `index_select` and transformed on the device;
- in pinned host memory for a GPU, rows are gathered into a recycled pinned buffer (numpy's
  single-threaded `take`) and copied without blocking; the buffer goes back to the pool once the
  copy has finished.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from cocoshard import NUM_CLASSES
from cocoshard.errors import UserError
from cocoshard.loading.batch import Batch
from cocoshard.loading.buffers import BufferPool
from cocoshard.loading.decode import fill_canvas, fill_labels
from cocoshard.loading.pooled import PooledBatches
from cocoshard.loading.tario import BadSample, BadShard, read_samples
from cocoshard.loading.workers import START_METHOD, Slot, SlotShapes
from cocoshard.machine import host_available_bytes, usable_cores
from cocoshard.prepare.manifest import shard_urls, split_shards
from cocoshard.pure.plan import epoch_permutation, rank_batches
from cocoshard.seeds import Stream, torch_generator

# Share of free device memory the split may take: the model, activations and optimizer need the rest.
DEVICE_SHARE = 0.5
# Share of available host memory the split may take by default.
HOST_SHARE = 0.8
_STAGING_SLOTS = 3
Transform = Any  # cocoshard.loading.augment.TrainTransform or EvalTransform


def _human(nbytes: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{int(nbytes)} bytes"


def choose_placement(
    needed: int, device: torch.device, memory_limit: int | None, what: str
) -> tuple[torch.device, bool]:
    """(where the split lives, whether that host memory is pinned); UserError naming `what` when
    nothing fits."""
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0] * DEVICE_SHARE
        if needed <= (free if memory_limit is None else min(free, memory_limit)):
            return device, False
    available = host_available_bytes() * HOST_SHARE
    budget = available if memory_limit is None else memory_limit
    if needed > budget:
        if memory_limit is not None:
            reason = f"the memory limit is {_human(memory_limit)}"
        else:
            reason = f"only {_human(available)} of host memory is free to use"
        raise UserError(
            f"resident mode needs {_human(needed)} for {what} but {reason}: "
            "use the stream loader (--loader stream)"
        )
    return torch.device("cpu"), device.type == "cuda"


def _allocate(shape: tuple[int, ...], placement: torch.device, pinned: bool) -> torch.Tensor:
    """The split's uint8 tensor; page-locked when asked and the system allows it (else pageable)."""
    if pinned:
        try:
            return torch.empty(shape, dtype=torch.uint8, pin_memory=True)
        except RuntimeError as exc:
            warnings.warn(
                f"cannot pin {_human(math.prod(shape))} of host memory ({exc}); copies to the GPU will not "
                "overlap",
                stacklevel=2,
            )
    return torch.empty(shape, dtype=torch.uint8, device=placement)


class ResidentBatchSource:
    """What a worker of the resident loader does: transform its batches of the epoch into slots."""

    def __init__(self, loader: ResidentLoader, workers: int) -> None:
        self.loader, self.workers = loader, workers  # shared with the workers by fork, never pickled

    def slot_shapes(self) -> SlotShapes:
        n, size = self.loader.batch_size, self.loader.transform.out_size
        shapes: SlotShapes = {"inputs": ((n, size, size, 3), self.loader.transform.dtype)}
        if self.loader.labels is not None:
            shapes["labels"] = ((n, NUM_CLASSES), torch.uint8)
        return shapes

    def batches(self, epoch: int, worker: int, acquire: Callable[[], tuple[int, Slot]]) -> Iterator[tuple]:
        loader, transform = self.loader, self.loader.transform
        rows = loader.epoch_rows(epoch)
        starts = np.concatenate([[0], np.cumsum(loader._batch_sizes)]).tolist()
        generator = (
            torch_generator(loader.seed, epoch, loader.rank, worker, Stream.AUGMENT)
            if transform.random
            else None
        )
        for b in range(worker, len(loader._batch_sizes), self.workers):
            mine = rows[starts[b] : starts[b + 1]]
            slot, tensors = acquire()
            transform.apply(
                loader.images,
                loader.sizes.index_select(0, mine),
                generator=generator,
                threads=1,
                rows=mine,
                out=tensors["inputs"],
            )
            if loader.labels is not None:
                tensors["labels"][: len(mine)].copy_(loader.labels.index_select(0, mine))
            yield slot, len(mine), [loader.keys[i] for i in mine.tolist()], 0


class ResidentLoader:
    """The split in one tensor; exact epochs by seeded permutation (see module doc)."""

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
        skip_bad_samples: bool,
        memory_limit: int | None,
        transform: Transform | None = None,
        workers: int = 0,
        prefetch: int = 2,
        threads: int | None = None,
    ) -> None:
        entries = split_shards(manifest, split)
        self.manifest, self.split, self.device, self.train = manifest, split, device, train
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.canvas_size = size = int(manifest["size"])
        self.labelled = split != "test"
        self.skip_bad_samples = skip_bad_samples
        self.transform = transform
        self._skipped = 0
        self.epoch = 0
        counts = [int(e["samples"]) for e in entries]
        total = sum(counts)
        what = f"the {total} images of split {split!r} ({size}x{size} canvases)"
        self.placement, pinned = choose_placement(
            total * (size * size * 3 + NUM_CLASSES + 16), device, memory_limit, what
        )
        self.images = _allocate((total, size, size, 3), self.placement, pinned)
        self.sizes = torch.zeros((total, 2), dtype=torch.int64)
        self.labels = torch.zeros((total, NUM_CLASSES), dtype=torch.uint8) if self.labelled else None
        self.keys: list[str] = [""] * total
        valid = np.zeros(total, dtype=bool)
        self._load(shard_urls(location, manifest, split), entries, counts, valid)
        self.rows = torch.from_numpy(np.flatnonzero(valid))
        self.split_samples = len(self.rows)
        self.sizes = self.sizes.to(self.placement)
        self.labels = None if self.labels is None else self.labels.to(self.placement)
        _, sizes = rank_batches(
            self.split_samples, batch_size=batch_size, rank=rank, world_size=world_size, train=train
        )
        self._batch_sizes, self.num_samples = sizes, sum(sizes)
        # No loader processes here: CPU augmentation may use every core (or the threads it is given).
        self.augment_threads = threads or usable_cores()
        self._pool = BufferPool(max_per_key=_STAGING_SLOTS)
        self._in_flight: list[tuple[Any, torch.Tensor]] = []  # (CUDA event, pinned buffer being copied)
        self._pooled: PooledBatches | None = None
        if workers > 0 and transform is not None and device.type == "cpu" and START_METHOD == "fork":
            source = ResidentBatchSource(self, workers)
            self._pooled = PooledBatches(
                source,
                source.slot_shapes(),
                workers=workers,
                device=device,
                prefetch=prefetch,
                seed=seed,
                rank=rank,
                device_transform=None,
                output_transform=transform,
                name=f"{split} resident loader",
            )

    # ------------------------------------------------------------------------------ loading

    def _load(self, urls: list[str], entries: list[dict], counts: list[int], valid: np.ndarray) -> None:
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(int).tolist()
        jobs = [(urls[i], entries[i].get("sha256"), counts[i], offsets[i]) for i in range(len(urls))]
        with ThreadPoolExecutor(max_workers=usable_cores()) as pool:
            for skipped in pool.map(lambda job: self._load_shard(*job, valid), jobs):
                self._skipped += skipped

    def _load_shard(self, url: str, sha256: str | None, count: int, offset: int, valid: np.ndarray) -> int:
        try:
            samples = read_samples(url, sha256, count)
        except BadShard:
            if not self.skip_bad_samples:
                raise
            return count
        on_host = self.placement.type == "cpu"
        size = self.canvas_size
        rows = slice(offset, offset + count)
        pixels = self.images[rows].numpy() if on_host else np.empty((count, size, size, 3), np.uint8)
        hw = self.sizes[rows].numpy()
        labels = None if self.labels is None else self.labels[rows].numpy()
        skipped = 0
        for i, sample in enumerate(samples):
            try:
                hw[i] = fill_canvas(sample, pixels[i])
                if labels is not None:
                    fill_labels(sample, labels[i])
            except BadSample as exc:
                if not self.skip_bad_samples:
                    raise BadSample(f"shard {url}, sample {sample.key}: {exc}") from exc
                skipped += 1
                continue
            self.keys[offset + i] = sample.key
            valid[offset + i] = True
        if not on_host:
            self.images[rows].copy_(torch.from_numpy(pixels))
        return skipped

    # ---------------------------------------------------------------------------- iteration

    def __len__(self) -> int:
        return len(self._batch_sizes)

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose permutation the next iteration uses."""
        self.epoch = epoch

    def close(self) -> None:
        """Stop the worker processes, if any (the split's memory goes with the object)."""
        if self._pooled is not None:
            self._pooled.close()

    def __enter__(self) -> ResidentLoader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def epoch_rows(self, epoch: int | None = None) -> torch.Tensor:
        """Rows of the resident tensor this rank reads in `epoch` (the current one), in order (CPU int64)."""
        epoch = self.epoch if epoch is None else epoch
        order = self.rows[
            torch.from_numpy(
                epoch_permutation(self.split_samples, seed=self.seed, epoch=epoch, train=self.train)
            )
        ]
        start, _ = rank_batches(
            self.split_samples,
            batch_size=self.batch_size,
            rank=self.rank,
            world_size=self.world_size,
            train=self.train,
        )
        return order[start : start + self.num_samples]

    @property
    def skipped_samples(self) -> int:
        """Bad samples skipped when the split was loaded (with skip_bad_samples)."""
        return self._skipped

    def __iter__(self) -> Iterator[Batch]:
        if self._pooled is not None:
            workers = self._pooled.workers
            yield from self._pooled.batches(self.epoch, [b % workers for b in range(len(self))], self.train)
            return
        rows = self.epoch_rows()
        generator = None
        if self.transform is not None and self.transform.random:
            generator = torch_generator(self.seed, self.epoch, self.rank, Stream.AUGMENT, device=self.device)
        start = 0
        for size in self._batch_sizes:
            yield self._batch(rows[start : start + size], generator)
            start += size

    def _batch(self, rows: torch.Tensor, generator: torch.Generator | None) -> Batch:
        keys = [self.keys[i] for i in rows.tolist()]
        index = rows.to(self.placement, non_blocking=True)
        labels = None if self.labels is None else self.labels.index_select(0, index).float()
        if self.placement.type == "cpu" and self.device.type == "cpu" and self.transform is not None:
            # crops read straight from the split's rows, by every core: nothing gathered first
            inputs = self.transform.apply(
                self.images,
                self.sizes.index_select(0, index),
                generator=generator,
                threads=self.augment_threads,
                rows=rows,
            )
            return Batch(None, None, labels, keys, inputs=inputs)
        images, sizes = self._gather(rows, index)
        if self.device.type != self.placement.type:
            sizes = sizes.to(self.device, non_blocking=True)
            labels = None if labels is None else labels.to(self.device, non_blocking=True)
        if self.transform is None:
            return Batch(images, sizes, labels, keys)
        return Batch(
            None, None, labels, keys, inputs=self.transform.apply(images, sizes, generator=generator)
        )

    def _gather(self, rows: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The rows' canvases and sizes on the device."""
        n, size = len(rows), self.canvas_size
        sizes = self.sizes.index_select(0, index)
        flat = self.images.view(len(self.images), -1)
        if self.placement.type == "cuda":
            return flat.index_select(0, index).view(n, size, size, 3), sizes
        images = self._pool.take(
            (n, flat.shape[1]), torch.uint8, "cpu", pin_memory=self.device.type == "cuda"
        )
        # numpy's single-threaded row copy: torch's OpenMP index_select took 1 s instead of 3 ms for
        # a 19 MB batch on a 2-core CPU that other processes kept busy. mode="clip" (the rows are
        # valid): the default mode copies through a temporary buffer, 3x slower.
        np.take(flat.numpy(), rows.numpy(), axis=0, out=images.numpy(), mode="clip")
        if self.device.type == "cpu":
            return images.view(n, size, size, 3), sizes
        # Host-resident split, CUDA device: gathered into a pinned buffer, copied asynchronously;
        # the buffer goes back to the pool when `staging` dies: keep it until the copy is done.
        staging = images
        on_device = staging.view(n, size, size, 3).to(self.device, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self._in_flight = [(e, held) for e, held in self._in_flight if not e.query()] + [(event, staging)]
        return on_device, sizes
