"""Resident loader: the whole split held once as one uint8 tensor; an epoch is a permutation.

Raw shards are copied in, JPEG shards decoded once (one thread per core; the decoders release the
GIL). The tensor lives on the training device when it fits, else in pinned host memory (CUDA) or
plain host memory (CPU); a split that fits neither the memory it is given nor what is free is
refused before anything is allocated. Each epoch draws one permutation of (seed, epoch), identical
on every rank, and each rank takes its slice of whole batches. Batches are gathered row by row:
`index_select` on the device, numpy's single-threaded `take` in host memory (into recycled, pinned
when the device is a GPU, buffers), then copied non_blocking. No worker processes.
"""

from __future__ import annotations

import math
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterator, Optional

import numpy as np
import torch

from cocoshard import NUM_CLASSES
from cocoshard.errors import UserError
from cocoshard.loading.batch import Batch
from cocoshard.loading.buffers import BufferPool
from cocoshard.loading.decode import fill_canvas, fill_labels
from cocoshard.loading.plan import rank_batches
from cocoshard.loading.tario import BadSample, BadShard, read_samples
from cocoshard.machine import usable_cores
from cocoshard.prepare.manifest import shard_urls, split_shards

# Share of free device memory the split may take: the model, activations and optimizer need the rest.
DEVICE_SHARE = 0.5
# Share of available host memory the split may take by default.
HOST_SHARE = 0.8
_STAGING_SLOTS = 3


def host_available_bytes() -> int:
    """Memory the kernel says is available to new allocations (MemAvailable), in bytes."""
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _human(nbytes: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{int(nbytes)} bytes"


def choose_placement(needed: int, device: torch.device, memory_limit: Optional[int], what: str) -> tuple[torch.device, bool]:
    """(where the split lives, whether that host memory is pinned); UserError naming `what` when nothing fits."""
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
        raise UserError(f"resident mode needs {_human(needed)} for {what} but {reason}: "
                        "use the stream loader (--loader stream)")
    return torch.device("cpu"), device.type == "cuda"


def _allocate(shape: tuple[int, ...], placement: torch.device, pinned: bool) -> torch.Tensor:
    """The split's uint8 tensor; page-locked when asked and the system allows it (else pageable)."""
    if pinned:
        try:
            return torch.empty(shape, dtype=torch.uint8, pin_memory=True)
        except RuntimeError as exc:
            warnings.warn(f"cannot pin {_human(math.prod(shape))} of host memory ({exc}); copies to the GPU will not overlap")
    return torch.empty(shape, dtype=torch.uint8, device=placement)


class ResidentLoader:
    """The split in one tensor; exact epochs by seeded permutation (see module doc)."""

    def __init__(self, location: str, split: str, manifest: dict[str, Any], *, batch_size: int, device: torch.device,
                 train: bool, seed: int, rank: int, world_size: int, skip_bad_samples: bool,
                 memory_limit: Optional[int]) -> None:
        entries = split_shards(manifest, split)
        self.manifest, self.split, self.device, self.train = manifest, split, device, train
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.canvas_size = size = int(manifest["size"])
        self.labelled = split != "test"
        self.skip_bad_samples = skip_bad_samples
        self.skipped_samples = 0
        self.epoch = 0
        counts = [int(e["samples"]) for e in entries]
        total = sum(counts)
        what = f"the {total} images of split {split!r} ({size}x{size} canvases)"
        self.placement, pinned = choose_placement(total * (size * size * 3 + NUM_CLASSES + 16), device, memory_limit, what)
        self.images = _allocate((total, size, size, 3), self.placement, pinned)
        self.sizes = torch.zeros((total, 2), dtype=torch.int64)
        self.labels = torch.zeros((total, NUM_CLASSES), dtype=torch.uint8) if self.labelled else None
        self.keys: list[str] = [""] * total
        valid = np.zeros(total, dtype=bool)
        self._load(shard_urls(location, manifest, split), entries, counts, valid)
        self.rows = torch.from_numpy(np.flatnonzero(valid))
        self.split_samples = len(self.rows)
        self.sizes = self.sizes.to(self.placement)
        self.labels = None if self.labels is None else self.labels.to(self.placement).float()
        _, sizes = rank_batches(self.split_samples, batch_size=batch_size, rank=rank, world_size=world_size, train=train)
        self._batch_sizes, self.num_samples = sizes, sum(sizes)
        # No loader processes here: CPU augmentation may use every core.
        self.augment_threads = usable_cores()
        self._pool = BufferPool(max_per_key=_STAGING_SLOTS)
        self._in_flight: list[tuple[Any, torch.Tensor]] = []  # (CUDA event, pinned slot being copied)

    # ------------------------------------------------------------------------------ loading

    def _load(self, urls: list[str], entries: list[dict], counts: list[int], valid: np.ndarray) -> None:
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(int).tolist()
        threads = usable_cores()
        jobs = [(urls[i], entries[i].get("sha256"), counts[i], offsets[i]) for i in range(len(urls))]
        with ThreadPoolExecutor(max_workers=threads) as pool:
            for skipped in pool.map(lambda job: self._load_shard(*job, valid), jobs):
                self.skipped_samples += skipped

    def _load_shard(self, url: str, sha256: Optional[str], count: int, offset: int, valid: np.ndarray) -> int:
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
        """Nothing runs in the background; the memory goes with the object."""

    def __enter__(self) -> "ResidentLoader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def epoch_rows(self) -> torch.Tensor:
        """Rows of the resident tensor this rank reads this epoch, in order (CPU int64)."""
        if self.train:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = self.rows[torch.randperm(self.split_samples, generator=generator)]
        else:
            order = self.rows
        start, _ = rank_batches(self.split_samples, batch_size=self.batch_size, rank=self.rank,
                                world_size=self.world_size, train=self.train)
        return order[start : start + self.num_samples]

    def __iter__(self) -> Iterator[Batch]:
        rows = self.epoch_rows()
        start = 0
        for size in self._batch_sizes:
            yield self._gather(rows[start : start + size])
            start += size

    def _gather(self, rows: torch.Tensor) -> Batch:
        n, size = len(rows), self.canvas_size
        flat = self.images.view(len(self.images), -1)
        index = rows.to(self.placement, non_blocking=True)
        keys = [self.keys[i] for i in rows.tolist()]
        sizes = self.sizes.index_select(0, index)
        labels = None if self.labels is None else self.labels.index_select(0, index)
        if self.placement.type == "cuda":
            return Batch(flat.index_select(0, index).view(n, size, size, 3), sizes, labels, keys)
        images = self._pool.take((n, flat.shape[1]), torch.uint8, "cpu", pin_memory=self.device.type == "cuda")
        # numpy's single-threaded row copy: torch's OpenMP index_select took 1 s instead of 3 ms for
        # a 19 MB batch on a 2-core CPU that other processes kept busy. mode="clip" (the rows are
        # valid): the default mode copies through a temporary buffer, 3x slower.
        np.take(flat.numpy(), rows.numpy(), axis=0, out=images.numpy(), mode="clip")
        if self.device.type == "cpu":
            return Batch(images.view(n, size, size, 3), sizes, labels, keys)
        # Host-resident split, CUDA device: gathered into a pinned slot, copied asynchronously.
        staging = images
        batch = Batch(staging.view(n, size, size, 3), sizes, labels, keys).to(self.device)
        # The slot returns to the pool when `staging` dies; keep it alive until the copy is done.
        event = torch.cuda.Event()
        event.record()
        self._in_flight = [(e, slot) for e, slot in self._in_flight if not e.query()] + [(event, staging)]
        return batch
