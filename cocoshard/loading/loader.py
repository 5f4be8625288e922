"""Shards -> batches on the device, in exact epochs: the factory of the `stream` and `resident` loaders.

    loader = build_loader("shards", "train", batch_size=128, device="cuda", mode="stream",
                          train=True, seed=0, rank=rank, world_size=world, workers=8)
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        for batch in loader:          # len(loader) batches, the same count on every rank
            x = train_augment(batch.images, batch.sizes, out_size=224, generator=g)
    loader.close()

Each batch is a `cocoshard.loading.batch.Batch`: uint8 canvases (N, S, S, 3), each image in its
top-left (h, w) corner, the (h, w) sizes, float32 multi-hot labels (None for the test split) and
the sample keys, all on the device.

- Which samples each rank and worker reads: `cocoshard.pure.plan` (pure). Training epochs give
  every rank the same number of full batches (DDP never waits on a rank that ran dry) and
  reshuffle with (seed, epoch); validation and test read every sample once, in the manifest's
  order, keeping the last partial batch.
- stream: `cocoshard.loading.stream` (worker processes, recycled shared-memory batches, pinned,
  non_blocking).
- resident: `cocoshard.loading.resident` (the split in one tensor, a permutation per epoch).
- decode="device" (jpeg shards): stream slots carry compressed bytes, or `resident_bytes` holds
  the split's compressed bytes; each batch is decoded on the device (`device_decode`).
- Undecodable samples stop the run with the shard and key named, or with skip_bad_samples are
  skipped and counted in `skipped_samples` (bad samples of the latest pass over the split); a
  shard that fails its sha256 counts whole.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch

from cocoshard.errors import UserError
from cocoshard.loading.augment import EvalTransform, TrainTransform
from cocoshard.prepare.manifest import read_manifest, split_shards

MODES = ("stream", "resident")
DEFAULT_SHUFFLE_BUFFER = 1000
DEFAULT_PREFETCH = 2
Transform = TrainTransform | EvalTransform


def build_loader(
    location: str | os.PathLike,
    split: str | Sequence[str],
    *,
    batch_size: int,
    device: torch.device | str,
    mode: str = "stream",
    train: bool,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    workers: int = 0,
    skip_bad_samples: bool = False,
    shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER,
    prefetch: int = DEFAULT_PREFETCH,
    memory_limit: int | None = None,
    transform: Transform | None = None,
    threads: int | None = None,
    decode: str = "host",
) -> Any:
    """Device batches of one split of the shards at `location` (folder or URL prefix).

    Returns a StreamLoader or ResidentLoader: `len()` (batches per epoch on this rank, equal on
    every rank when training), iteration over `Batch`es on `device`, `set_epoch`, `num_samples`
    (samples per epoch on this rank), `split_samples`, `canvas_size`, `manifest`,
    `skipped_samples`, `augment_threads` (cores this process has for CPU augmentation: pass it
    as `train_augment(..., threads=)`) and `close()`. `workers` are loader processes for stream
    mode (0: read in this process); `prefetch` batches are queued per worker; `memory_limit` caps
    the bytes resident mode may hold (default: what the device or host has free). With a
    `transform` (`augment.TrainTransform` / `EvalTransform`) every batch comes training-ready in
    `batch.inputs`, made where it is cheapest (see the loaders); `threads` caps the threads this
    process uses for it when no worker process does (default: every usable core). A split too
    small for one batch per rank, a bad mode or a bad shard raise UserError. `decode="device"`
    (jpeg shards) moves the compressed bytes and decodes each batch on the device
    (`cocoshard.loading.device_decode`).
    """
    if mode not in MODES:
        raise UserError(f"unknown loader mode {mode!r}: choose one of {', '.join(MODES)}")
    if batch_size <= 0 or world_size <= 0 or not 0 <= rank < world_size or workers < 0:
        raise UserError(
            f"bad loader settings: batch_size={batch_size}, rank={rank}, world_size={world_size}, "
            f"workers={workers}"
        )
    manifest = read_manifest(location)
    if not sum(int(entry["samples"]) for entry in split_shards(manifest, split)):
        raise UserError(f"{location} holds no {split!r} samples: the split is empty")
    if decode not in ("host", "device"):
        raise UserError(f"unknown decode {decode!r}: choose host or device")
    if decode == "device" and manifest["pixel_format"] != "jpeg":
        raise UserError(
            f"--decode device reads jpeg shards; {location} holds {manifest['pixel_format']} pixels, "
            f"which need no decoding (use --decode host)"
        )
    device = torch.device(device)
    common = dict(
        batch_size=batch_size,
        device=device,
        train=train,
        seed=seed,
        rank=rank,
        world_size=world_size,
        skip_bad_samples=skip_bad_samples,
        transform=transform,
        threads=threads,
    )
    if mode == "resident" and decode == "device":
        from cocoshard.loading.resident_bytes import ResidentBytesLoader

        loader: Any = ResidentBytesLoader(str(location), split, manifest, memory_limit=memory_limit, **common)
    elif mode == "resident":
        from cocoshard.loading.resident import ResidentLoader

        loader = ResidentLoader(
            str(location),
            split,
            manifest,
            memory_limit=memory_limit,
            workers=workers,
            prefetch=prefetch,
            **common,
        )
    else:
        from cocoshard.loading.stream import StreamLoader

        loader = StreamLoader(
            str(location),
            split,
            manifest,
            workers=workers,
            shuffle_buffer=shuffle_buffer,
            prefetch=prefetch,
            decode=decode,
            **common,
        )
    if train and len(loader) == 0:
        raise UserError(
            f"the {split!r} split holds {loader.split_samples} samples: too few for one batch of "
            f"{batch_size} "
            f"on each of {world_size} process(es); lower --batch-size"
        )
    return loader
