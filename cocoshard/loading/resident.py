"""The resident split: decoded once into one uint8 tensor, each epoch a permutation of its rows.

    split = load_split(manifest, "train", spec, placement, pinned=False)   # ResidentSplit
    loader = host_resident_loader(manifest, "train", spec, split)         # a Pipeline

Raw shards are copied in, JPEG shards decoded once (`spec.threads` threads; the decoders release
the GIL). Where the split lives is chosen before anything is allocated (`choose_placement`): on the
training device when it fits (`cocoshard.loading.gpu_resident` then serves it), else in pinned host
memory for a GPU, or in host memory on a CPU; a split that fits nothing is refused. Every epoch is
one permutation of (seed, epoch), identical on every rank, each rank taking its slice of whole
batches (`cocoshard.pure.plan`).

On the host, batches are made by a `ResidentBatchSource` behind the usual pipeline: on a CPU the
crops are read straight from the split's rows (no batch gathered first) and made training-ready,
by worker processes that share the split with this one (forked after it is loaded, so it is
never copied) or with no workers by this process's threads; for a GPU the rows are gathered into
a page-locked slot and cross to the device, where they are transformed.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from cocoshard import NUM_CLASSES
from cocoshard.errors import UserError
from cocoshard.loading.batch import IMAGES, INPUTS, LABELS, SIZES
from cocoshard.loading.buffers import SlotShapes
from cocoshard.loading.decode import fill_canvas, fill_labels
from cocoshard.loading.pipeline import Pipeline
from cocoshard.loading.spec import LoaderSpec
from cocoshard.loading.tario import BadSample, BadShard, read_samples
from cocoshard.loading.worker_pool import START_METHOD
from cocoshard.loading.worker_side import Acquire, Filled
from cocoshard.machine import host_available_bytes
from cocoshard.prepare.manifest import Manifest, is_labelled
from cocoshard.pure.plan import epoch_permutation, rank_batches
from cocoshard.seeds import Stream, torch_generator

# Share of free device memory the split may take: the model, activations and optimizer need the rest.
DEVICE_SHARE = 0.5
# Share of available host memory the split may take by default.
HOST_SHARE = 0.8
ROW_EXTRA = NUM_CLASSES + 16  # a row's labels and (h, w), beside its canvas


def human(nbytes: float) -> str:
    """1.5 GiB, 300.0 MiB, 12 bytes."""
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
            reason = f"the memory limit is {human(memory_limit)}"
        else:
            reason = f"only {human(available)} of host memory is free to use"
        raise UserError(
            f"resident mode needs {human(needed)} for {what} but {reason}: "
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
                f"cannot pin {human(math.prod(shape))} of host memory ({exc}); "
                "copies to the GPU will not overlap",
                stacklevel=2,
            )
    return torch.empty(shape, dtype=torch.uint8, device=placement)


@dataclass
class ResidentSplit:
    """A split held in memory: canvases, sizes and labels by row, the rows that loaded."""

    images: torch.Tensor  # uint8 (total, S, S, 3), where the split lives
    sizes: torch.Tensor  # int64 (total, 2), same place
    labels: torch.Tensor | None  # uint8 (total, 80), same place; None for the test split
    keys: list[str]
    rows: torch.Tensor  # int64 rows that loaded (bad samples skipped), on the CPU
    skipped: int

    def epoch_rows(self, spec: LoaderSpec, epoch: int) -> torch.Tensor:
        """The rows this rank reads in `epoch`, in order (CPU int64)."""
        total = len(self.rows)
        order = self.rows[
            torch.from_numpy(epoch_permutation(total, seed=spec.seed, epoch=epoch, train=spec.train))
        ]
        start, sizes = rank_batches(
            total, batch_size=spec.batch_size, rank=spec.rank, world_size=spec.world_size, train=spec.train
        )
        return order[start : start + sum(sizes)]


def resident_bytes_needed(manifest: Manifest, split: str | Sequence[str]) -> int:
    """The memory a resident split of canvases takes."""
    return manifest.samples(split) * (manifest.size**2 * 3 + ROW_EXTRA)


def load_split(
    manifest: Manifest, split: str | Sequence[str], spec: LoaderSpec, placement: torch.device, pinned: bool
) -> ResidentSplit:
    """Every sample of `split` decoded into one tensor at `placement`."""
    entries, urls = manifest.shards(split), manifest.urls(split)
    counts = [entry.samples for entry in entries]
    total, size = sum(counts), manifest.size
    images = _allocate((total, size, size, 3), placement, pinned)
    sizes = torch.zeros((total, 2), dtype=torch.int64)
    labels = torch.zeros((total, NUM_CLASSES), dtype=torch.uint8) if is_labelled(split) else None
    keys = [""] * total
    valid = np.zeros(total, dtype=bool)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(int).tolist()

    def load_shard(shard: int) -> int:
        """Decode one shard into its rows; the count of bad samples skipped."""
        count, offset, url = counts[shard], offsets[shard], urls[shard]
        try:
            samples = read_samples(url, entries[shard].sha256, count, remote=manifest.remote)
        except BadShard:
            if not spec.skip_bad_samples:
                raise
            return count
        on_host = placement.type == "cpu"
        rows = slice(offset, offset + count)
        pixels = images[rows].numpy() if on_host else np.empty((count, size, size, 3), np.uint8)
        hw, label_rows = sizes[rows].numpy(), None if labels is None else labels[rows].numpy()
        skipped = 0
        for i, sample in enumerate(samples):
            try:
                hw[i] = fill_canvas(sample, pixels[i])
                if label_rows is not None:
                    fill_labels(sample, label_rows[i])
            except BadSample as exc:
                if not spec.skip_bad_samples:
                    raise BadSample(f"shard {url}, sample {sample.key}: {exc}") from exc
                skipped += 1
                continue
            keys[offset + i], valid[offset + i] = sample.key, True
        if not on_host:
            images[rows].copy_(torch.from_numpy(pixels))
        return skipped

    with ThreadPoolExecutor(max_workers=spec.threads) as pool:
        skipped = sum(pool.map(load_shard, range(len(urls))))
    return ResidentSplit(
        images,
        sizes.to(placement),
        None if labels is None else labels.to(placement),
        keys,
        torch.from_numpy(np.flatnonzero(valid)),
        skipped,
    )


# ----------------------------------------------------------------------------- the host pipeline


class ResidentBatchSource:
    """Batches of a host-resident split (in worker processes, shared by fork, or in this process)."""

    def __init__(self, split: ResidentSplit, spec: LoaderSpec, producers: int) -> None:
        self.split, self.spec, self.producers = split, spec, max(1, producers)
        self.threads = 1 if producers > 0 else spec.threads  # one per worker, the plan's count here
        _, self.batch_sizes = rank_batches(
            len(split.rows),
            batch_size=spec.batch_size,
            rank=spec.rank,
            world_size=spec.world_size,
            train=spec.train,
        )

    def order(self, epoch: int) -> list[int]:
        return [b % self.producers for b in range(len(self.batch_sizes))]

    def slot_shapes(self) -> SlotShapes:
        n, canvas = self.spec.batch_size, self.split.images.shape[1]
        transform = self.spec.transform
        shapes: SlotShapes
        if self.spec.augment_on_host and transform is not None:
            shapes = {INPUTS: ((n, transform.out_size, transform.out_size, 3), transform.dtype)}
        else:
            shapes = {IMAGES: ((n, canvas, canvas, 3), torch.uint8), SIZES: ((n, 2), torch.int64)}
        if self.split.labels is not None:
            shapes[LABELS] = ((n, NUM_CLASSES), torch.uint8)
        return shapes

    def batches(self, epoch: int, worker: int, acquire: Acquire, start: int = 0) -> Iterator[Filled]:
        split, spec, transform = self.split, self.spec, self.spec.transform
        rows = split.epoch_rows(spec, epoch)
        starts = np.concatenate([[0], np.cumsum(self.batch_sizes)]).tolist()
        # a resumed epoch skips this worker's first `start` batches: nothing to replay, every batch
        # draws from its own seed
        for b in range(worker, len(self.batch_sizes), self.producers)[start:]:
            mine = rows[starts[b] : starts[b + 1]]
            slot, tensors = acquire()
            if spec.augment_on_host and transform is not None:
                generator = (
                    torch_generator(spec.seed, epoch, spec.rank, b, Stream.AUGMENT)
                    if transform.random
                    else None
                )
                sizes = split.sizes.index_select(0, mine)
                transform.apply(
                    split.images,
                    sizes,
                    generator=generator,
                    threads=self.threads,
                    rows=mine,
                    out=tensors[INPUTS],
                )
            else:
                # numpy's single-threaded row copy: torch's OpenMP index_select took 1 s instead of 3 ms
                # for a 19 MB batch on a 2-core CPU that other processes kept busy. mode="clip" (the rows
                # are valid): the default mode copies through a temporary buffer, 3x slower.
                flat = split.images.view(len(split.images), -1).numpy()
                out = tensors[IMAGES][: len(mine)].view(len(mine), -1).numpy()
                np.take(flat, mine.numpy(), axis=0, out=out, mode="clip")
                tensors[SIZES][: len(mine)].copy_(split.sizes.index_select(0, mine))
            if split.labels is not None:
                tensors[LABELS][: len(mine)].copy_(split.labels.index_select(0, mine))
            yield Filled(slot, len(mine), [split.keys[i] for i in mine.tolist()], 0, b)


def host_resident_loader(
    manifest: Manifest, split: str | Sequence[str], spec: LoaderSpec, resident: ResidentSplit
) -> Pipeline:
    """The pipeline over a host-resident split: workers only on a CPU with a transform (where they
    spread the crops) and where they can share the split by fork."""
    workers = spec.workers if spec.augment_on_host and START_METHOD == "fork" else 0
    return Pipeline(
        manifest,
        spec,
        ResidentBatchSource(resident, spec, workers),
        split_samples=len(resident.rows),
        workers=workers,
        name=f"{split} resident loader",
        canvas_size=manifest.size,
        skipped_on_load=resident.skipped,
    )
