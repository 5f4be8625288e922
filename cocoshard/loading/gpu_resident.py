"""The split resident on the GPU: one uint8 tensor in device memory, batches gathered and transformed
there. Nothing crosses from the host after loading; no worker, no thread, no copy per batch.

    split = load_split(manifest, "train", spec, torch.device("cuda"), pinned=False)
    loader = GpuResidentLoader(manifest, spec, split)   # e.g. 9.8 GB for the challenge's 65k images

Each epoch is one permutation of (seed, epoch), identical on every rank, each rank taking its
slice of whole batches; a batch is an `index_select` of rows and the transform on the device (crop
boxes and flips drawn there, from a generator of (seed, epoch, rank, batch)), so an epoch resumed
at batch k yields what the uninterrupted one yields from k. The row indices of an epoch cross to
the device once, before its first batch.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from cocoshard.loading.batch import Batch
from cocoshard.loading.resident import ResidentSplit
from cocoshard.loading.spec import LoaderSpec
from cocoshard.prepare.manifest import Manifest
from cocoshard.pure.plan import rank_batches
from cocoshard.seeds import Stream, torch_generator


class GpuResidentLoader:
    """Exact epochs of batches from a split held in device memory (see the module doc)."""

    def __init__(self, manifest: Manifest, spec: LoaderSpec, split: ResidentSplit) -> None:
        self.manifest, self.spec, self.split = manifest, spec, split
        self.canvas_size = manifest.size
        self.split_samples = len(split.rows)
        _, self.batch_sizes = rank_batches(
            self.split_samples,
            batch_size=spec.batch_size,
            rank=spec.rank,
            world_size=spec.world_size,
            train=spec.train,
        )
        self.num_samples = sum(self.batch_sizes)
        self.epoch, self.start = 0, 0

    def __len__(self) -> int:
        return len(self.batch_sizes)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Choose the epoch the next iteration yields, from its batch `start` on."""
        if not 0 <= start <= len(self):
            raise ValueError(f"an epoch has {len(self)} batches: cannot start at batch {start}")
        self.epoch, self.start = epoch, start

    @property
    def skipped_samples(self) -> int:
        """Bad samples skipped when the split was loaded."""
        return self.split.skipped

    def __iter__(self) -> Iterator[Batch]:
        epoch, start, spec, split = self.epoch, self.start, self.spec, self.split
        self.start = 0
        rows = split.epoch_rows(spec, epoch)
        keys = [split.keys[i] for i in rows.tolist()]
        on_device = rows.to(split.images.device, non_blocking=True)
        first = sum(self.batch_sizes[:start])
        for b, size in enumerate(self.batch_sizes[start:], start):
            index = on_device[first : first + size]
            yield self._batch(index, keys[first : first + size], epoch, b)
            first += size

    def _batch(self, index: torch.Tensor, keys: list[str], epoch: int, number: int) -> Batch:
        split, spec = self.split, self.spec
        images = split.images.index_select(0, index)
        sizes = split.sizes.index_select(0, index)
        labels = None if split.labels is None else split.labels.index_select(0, index).float()
        if spec.transform is None:
            return Batch(images, sizes, labels, keys)
        generator = None
        if spec.transform.random:
            generator = torch_generator(
                spec.seed, epoch, spec.rank, number, Stream.AUGMENT, device=images.device
            )
        return Batch(
            None, None, labels, keys, inputs=spec.transform.apply(images, sizes, generator=generator)
        )

    def close(self) -> None:
        """Nothing runs in the background; the split's memory goes with the loader."""

    def __enter__(self) -> GpuResidentLoader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
