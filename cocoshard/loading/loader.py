"""Shards -> batches on the device, in exact epochs: `build_loader`, the one way to get a loader.

    spec = LoaderSpec(batch_size=128, device=torch.device("cuda"), train=True, seed=0, workers=8,
                      transform=TrainTransform(224, dtype=torch.bfloat16))
    with build_loader("shards", "train", spec) as loader:
        for epoch in range(epochs):
            loader.set_epoch(epoch)
            for batch in loader:           # len(loader) batches, the same count on every rank
                model(batch.inputs)

The contract (`LoaderSpec`, `Loader`) is `cocoshard.loading.spec`; the batch types
`cocoshard.loading.batch`. What `build_loader` picks:

| spec.mode, spec.decode | where the split is      | loader                                      |
|------------------------|-------------------------|---------------------------------------------|
| stream, host/device    | shards, read each epoch | `stream.stream_loader` (worker processes)   |
| resident, host         | device memory (fits)    | `gpu_resident.GpuResidentLoader`            |
| resident, host         | host memory             | `resident.host_resident_loader`             |
| resident, device       | compressed, host memory | `resident_bytes.resident_bytes_loader`      |

Which samples each rank and worker reads: `cocoshard.pure.plan`. Training epochs give every rank
the same number of full batches (DDP never waits on a rank that ran dry) and reshuffle with
(seed, epoch); validation and test read every sample once, in the manifest's order, keeping the
last partial batch. Undecodable samples stop the run with the shard and key named, or with
skip_bad_samples are skipped and counted in `skipped_samples`; a shard that fails its sha256
counts whole.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from cocoshard.errors import UserError
from cocoshard.loading.gpu_resident import GpuResidentLoader
from cocoshard.loading.resident import (
    choose_placement,
    host_resident_loader,
    load_split,
    resident_bytes_needed,
)
from cocoshard.loading.resident_bytes import resident_bytes_loader
from cocoshard.loading.spec import Loader, LoaderSpec
from cocoshard.loading.stream import stream_loader
from cocoshard.prepare.manifest import Manifest, load_manifest


def build_loader(
    location: str | os.PathLike | Manifest, split: str | Sequence[str], spec: LoaderSpec
) -> Loader:
    """Device batches of one split (or several read as one) of the shards at `location` (a folder,
    a URL prefix, or a manifest already read). A split too small for one batch per rank, a decode
    the shards cannot take or a bad shard raise UserError."""
    manifest = location if isinstance(location, Manifest) else load_manifest(location)
    if not manifest.samples(split):
        raise UserError(f"{manifest.location} holds no {split!r} samples: the split is empty")
    if spec.decode == "device" and manifest.pixel_format != "jpeg":
        raise UserError(
            f"--decode device reads jpeg shards; {manifest.location} holds {manifest.pixel_format} pixels, "
            f"which need no decoding (use --decode host)"
        )
    loader: Loader
    if spec.mode == "stream":
        loader = stream_loader(manifest, split, spec)
    elif spec.decode == "device":
        loader = resident_bytes_loader(manifest, split, spec)
    else:
        size = manifest.size
        what = f"the {manifest.samples(split)} images of split {split!r} ({size}x{size} canvases)"
        placement, pinned = choose_placement(
            resident_bytes_needed(manifest, split), spec.device, spec.memory_limit, what
        )
        resident = load_split(manifest, split, spec, placement, pinned)
        if placement.type == "cuda":
            loader = GpuResidentLoader(manifest, spec, resident)
        else:
            loader = host_resident_loader(manifest, split, spec, resident)
    if spec.train and len(loader) == 0:
        loader.close()
        raise UserError(
            f"the {split!r} split holds {loader.split_samples} samples: too few for one batch of "
            f"{spec.batch_size} on each of {spec.world_size} process(es); lower --batch-size"
        )
    return loader
