"""Resident JPEG bytes (`--loader resident --decode device`): the split's compressed images held once,
each batch decoded on the device.

The resident loader for machines whose GPU outruns their few CPU cores: the whole jpeg split is
read once into one uint8 tensor of compressed bytes (~0.8 GB for the challenge's 65k images,
against 9.8 GB of raw pixels), page-locked when the device is a GPU, and every batch is decoded
there in one batched nvJPEG call (`cocoshard.loading.device_decode`; torchvision reads compressed
bytes from host memory, so they stay on the host and only pixels live on the device). Then the
transform runs on the device. On a CPU the same code decodes with libjpeg-turbo, so tests run it.
Epochs are the resident loader's: one permutation of (seed, epoch) per epoch, identical on every
rank, each rank taking its slice of whole batches.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

from cocoshard import NUM_CLASSES
from cocoshard.loading.batch import Batch
from cocoshard.loading.decode import check_pixel_count, fill_labels, image_member, image_size
from cocoshard.loading.device_decode import KIND_JPEG, KIND_PNG, decode_on_device
from cocoshard.loading.resident import choose_placement
from cocoshard.loading.tario import BadSample, BadShard, read_samples
from cocoshard.machine import usable_cores
from cocoshard.prepare.manifest import shard_urls, split_shards
from cocoshard.pure.format import EXT_JPEG, EXT_PNG
from cocoshard.pure.plan import epoch_permutation, rank_batches
from cocoshard.seeds import Stream, torch_generator

Transform = Any  # cocoshard.loading.augment.TrainTransform or EvalTransform


class ResidentBytesLoader:
    """The split's compressed images in one tensor; batches decoded on the device (see module doc)."""

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
        threads: int | None = None,
        **unused: Any,
    ) -> None:
        entries = split_shards(manifest, split)
        self.manifest, self.split, self.device, self.train = manifest, split, device, train
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.canvas_size = int(manifest["size"])
        self.skip_bad_samples, self.transform = skip_bad_samples, transform
        self.augment_threads = threads or usable_cores()
        self.epoch, self._unread, self._undecoded = 0, 0, 0
        needed = sum(int(e["bytes"]) for e in entries)
        choose_placement(
            needed,
            torch.device("cpu"),
            memory_limit,
            f"the compressed images of split {split!r} ({needed / 2**20:,.0f} MiB)",
        )
        chunks, spans, kinds, labels, self.keys = [], [], [], [], []
        self._shard_of: dict[str, str] = {}  # for messages
        used = 0
        for url, entry in zip(shard_urls(location, manifest, split), entries, strict=True):
            try:
                samples = read_samples(url, entry.get("sha256"), entry.get("samples"))
            except BadShard:
                if not skip_bad_samples:
                    raise
                self._unread += int(entry["samples"])
                continue
            for sample in samples:
                try:
                    data, kind = self._compressed(sample)
                    row = np.zeros(NUM_CLASSES, np.uint8)
                    if split != "test":
                        fill_labels(sample, row)
                except BadSample as exc:
                    if not skip_bad_samples:
                        raise BadSample(f"shard {url}, sample {sample.key}: {exc}") from exc
                    self._unread += 1
                    continue
                chunks.append(data)
                spans.append((used, len(data)))
                kinds.append(kind)
                labels.append(row)
                self.keys.append(sample.key)
                self._shard_of[sample.key] = url
                used += len(data)
        self.encoded = torch.empty(used, dtype=torch.uint8, pin_memory=device.type == "cuda")
        flat = self.encoded.numpy()
        for (start, length), data in zip(spans, chunks, strict=True):
            flat[start : start + length] = np.frombuffer(data, dtype=np.uint8)
        self.spans, self.kinds = spans, kinds
        # labels stay on the host with the bytes: each batch's rows are picked there and sent along
        self.labels = torch.from_numpy(np.stack(labels)) if labels and split != "test" else None
        self.split_samples = len(self.keys)
        _, sizes = rank_batches(
            self.split_samples, batch_size=batch_size, rank=rank, world_size=world_size, train=train
        )
        self._batch_sizes, self.num_samples = sizes, sum(sizes)

    def _compressed(self, sample: Any) -> tuple[memoryview, int]:
        ext = image_member(sample)
        if ext not in (EXT_JPEG, EXT_PNG):
            raise BadSample(f"--decode device reads jpeg shards; this sample holds .{ext}")
        data = sample.members[ext]
        if image_size(data, ext) is None:
            raise BadSample(f"its .{ext} member has no readable image header")
        check_pixel_count(data, ext)
        return data, KIND_JPEG if ext == EXT_JPEG else KIND_PNG

    @property
    def skipped_samples(self) -> int:
        """Bad samples skipped: those unreadable when the split was loaded, and those whose image
        failed to decode in the latest pass over it."""
        return self._unread + self._undecoded

    def __len__(self) -> int:
        return len(self._batch_sizes)

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose permutation the next iteration uses."""
        self.epoch = epoch

    def epoch_rows(self) -> np.ndarray:
        """Rows this rank reads this epoch, in order."""
        order = epoch_permutation(self.split_samples, seed=self.seed, epoch=self.epoch, train=self.train)
        start, _ = rank_batches(
            self.split_samples,
            batch_size=self.batch_size,
            rank=self.rank,
            world_size=self.world_size,
            train=self.train,
        )
        return order[start : start + self.num_samples]

    def __iter__(self) -> Iterator[Batch]:
        rows = self.epoch_rows()
        generator = None
        if self.transform is not None and self.transform.random:
            generator = torch_generator(self.seed, self.epoch, self.rank, Stream.AUGMENT, device=self.device)
        start, self._undecoded = 0, 0
        for size in self._batch_sizes:
            batch = self._batch(rows[start : start + size].tolist(), generator)
            self._undecoded += batch.skipped
            yield batch
            start += size

    def _batch(self, rows: list[int], generator: torch.Generator | None) -> Batch:
        encoded = [self.encoded[self.spans[r][0] : self.spans[r][0] + self.spans[r][1]] for r in rows]
        keys = [self.keys[r] for r in rows]
        images, sizes, good = decode_on_device(
            encoded,
            [self.kinds[r] for r in rows],
            keys,
            canvas_size=self.canvas_size,
            device=self.device,
            skip_bad=self.skip_bad_samples,
            where=self._shard_of.get,
        )
        chosen = [rows[i] for i in good]
        labels = None
        if self.labels is not None:
            picked = self.labels[chosen]
            if self.device.type == "cuda":
                picked = picked.pin_memory()
            labels = picked.to(self.device, non_blocking=True).float()
        inputs = None
        if self.transform is not None:
            inputs = self.transform.apply(images, sizes, generator=generator, threads=self.augment_threads)
        return Batch(
            images, sizes, labels, [keys[i] for i in good], inputs=inputs, skipped=len(rows) - len(good)
        )

    def close(self) -> None:
        """Nothing runs in the background; the memory goes with the object."""

    def __enter__(self) -> ResidentBytesLoader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
