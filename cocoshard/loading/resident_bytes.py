"""Resident JPEG bytes (`--loader resident --decode device`): the split's compressed images held once,
each batch decoded on the device.

    loader = resident_bytes_loader(manifest, "train", spec)     # a Pipeline

The resident loader for machines whose GPU outruns their few CPU cores: the whole jpeg split is
read once into one uint8 tensor of compressed bytes (~0.8 GB for the challenge's 65k images,
against 9.8 GB of raw pixels), page-locked when the device is a GPU. A batch's slot holds only
where its images lie in that tensor (spans) and their labels; the device stage decodes them
there in one batched call (`cocoshard.loading.to_device`, nvJPEG on CUDA, libjpeg-turbo on a CPU,
so tests run the same code), then transforms them. Epochs are the resident loader's: one
permutation of (seed, epoch) per epoch, identical on every rank, each rank taking its slice.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from cocoshard import NUM_CLASSES
from cocoshard.loading.batch import KINDS, LABELS, SPANS
from cocoshard.loading.buffers import SlotShapes
from cocoshard.loading.decode import fill_labels
from cocoshard.loading.device_decode import compressed_image
from cocoshard.loading.pipeline import Pipeline
from cocoshard.loading.resident import choose_placement, human
from cocoshard.loading.spec import LoaderSpec
from cocoshard.loading.tario import BadSample, BadShard, read_samples
from cocoshard.loading.worker_side import Acquire, Filled
from cocoshard.prepare.manifest import Manifest, is_labelled
from cocoshard.pure.plan import epoch_permutation, rank_batches


@dataclass
class ResidentBytes:
    """A split's compressed images back to back, and where each lies."""

    encoded: torch.Tensor  # uint8, pinned for a GPU
    spans: np.ndarray  # int64 (N, 2): start, length
    kinds: np.ndarray  # uint8 (N,)
    labels: np.ndarray | None  # uint8 (N, 80)
    keys: list[str]
    shard_of: dict[str, str]  # key -> shard, for messages
    unread: int  # samples lost to bad shards or unreadable images when loading


def load_bytes(manifest: Manifest, split: str | Sequence[str], spec: LoaderSpec) -> ResidentBytes:
    """Every image of `split`, compressed, in one tensor (checked against the memory it may take)."""
    entries, urls = manifest.shards(split), manifest.urls(split)
    needed = sum(entry.bytes for entry in entries)
    what = f"the compressed images of split {split!r} ({human(needed)})"
    choose_placement(needed, torch.device("cpu"), spec.memory_limit, what)
    chunks: list[memoryview] = []
    spans, kinds, labels, keys, shard_of, unread, used = [], [], [], [], {}, 0, 0
    for url, entry in zip(urls, entries, strict=True):
        try:
            samples = read_samples(url, entry.sha256, entry.samples, remote=manifest.remote)
        except BadShard:
            if not spec.skip_bad_samples:
                raise
            unread += entry.samples
            continue
        for sample in samples:
            try:
                data, kind = compressed_image(sample)
                row = np.zeros(NUM_CLASSES, np.uint8)
                if is_labelled(split):
                    fill_labels(sample, row)
            except BadSample as exc:
                if not spec.skip_bad_samples:
                    raise BadSample(f"shard {url}, sample {sample.key}: {exc}") from exc
                unread += 1
                continue
            chunks.append(data)
            spans.append((used, len(data)))
            kinds.append(kind)
            labels.append(row)
            keys.append(sample.key)
            shard_of[sample.key] = url
            used += len(data)
    encoded = torch.empty(used, dtype=torch.uint8, pin_memory=spec.device.type == "cuda")
    flat = encoded.numpy()
    for (start, length), data in zip(spans, chunks, strict=True):
        flat[start : start + length] = np.frombuffer(data, dtype=np.uint8)
    return ResidentBytes(
        encoded,
        np.asarray(spans, dtype=np.int64).reshape(-1, 2),
        np.asarray(kinds, dtype=np.uint8),
        np.stack(labels) if labels and is_labelled(split) else None,
        keys,
        shard_of,
        unread,
    )


class ResidentBytesSource:
    """Each batch: where its images lie in the resident bytes, and its labels (in this process)."""

    def __init__(self, held: ResidentBytes, spec: LoaderSpec) -> None:
        self.held, self.spec = held, spec
        _, self.batch_sizes = rank_batches(
            len(held.keys),
            batch_size=spec.batch_size,
            rank=spec.rank,
            world_size=spec.world_size,
            train=spec.train,
        )

    def order(self, epoch: int) -> list[int]:
        return [0] * len(self.batch_sizes)

    def slot_shapes(self) -> SlotShapes:
        n = self.spec.batch_size
        shapes: SlotShapes = {SPANS: ((n, 2), torch.int64), KINDS: ((n,), torch.uint8)}
        if self.held.labels is not None:
            shapes[LABELS] = ((n, NUM_CLASSES), torch.uint8)
        return shapes

    def batches(self, epoch: int, worker: int, acquire: Acquire, start: int = 0) -> Iterator[Filled]:
        spec, held = self.spec, self.held
        order = epoch_permutation(len(held.keys), seed=spec.seed, epoch=epoch, train=spec.train)
        first, _ = rank_batches(
            len(held.keys),
            batch_size=spec.batch_size,
            rank=spec.rank,
            world_size=spec.world_size,
            train=spec.train,
        )
        rows = order[first:]
        offset = sum(self.batch_sizes[:start])
        for number, size in enumerate(self.batch_sizes[start:], start):
            mine = rows[offset : offset + size]
            offset += size
            slot, tensors = acquire()
            tensors[SPANS][:size].copy_(torch.from_numpy(held.spans[mine]))
            tensors[KINDS][:size].copy_(torch.from_numpy(held.kinds[mine]))
            if held.labels is not None:
                tensors[LABELS][:size].copy_(torch.from_numpy(held.labels[mine]))
            yield Filled(slot, size, [held.keys[i] for i in mine.tolist()], 0, number)


def resident_bytes_loader(manifest: Manifest, split: str | Sequence[str], spec: LoaderSpec) -> Pipeline:
    """The pipeline over a split's resident compressed bytes, decoded batch by batch on the device."""
    held = load_bytes(manifest, split, spec)
    return Pipeline(
        manifest,
        spec,
        ResidentBytesSource(held, spec),
        split_samples=len(held.keys),
        workers=0,
        name=f"{split} resident loader",
        canvas_size=manifest.size,
        resident_bytes=held.encoded,
        where=lambda key: held.shard_of.get(key, f"(one of the {split!r} shards)"),
        skipped_on_load=held.unread,
    )
