"""The stream loader (trainer side): worker processes read their shard segments every epoch.

    loader = stream_loader(manifest, "train", spec)     # a `Pipeline` over a `ShardBatchSource`

What each worker does is `cocoshard.loading.shard_source` (it runs in the worker processes, or in
this process with `workers=0`); how the batches cross to the device, `cocoshard.loading.to_device`.
On a CPU the workers make each batch training-ready, so the per-image work spreads over every
worker; on CUDA they deliver uint8 canvases (or compressed bytes) and the device transforms them.
Only the memory a batch needs is read: local shards are memory-mapped, and every worker parses a
shard's tar headers once and keeps the index for later epochs (`cocoshard.loading.tario`).
"""

from __future__ import annotations

from collections.abc import Sequence

from cocoshard.errors import UserError
from cocoshard.loading.pipeline import Pipeline
from cocoshard.loading.shard_source import ShardBatchSource
from cocoshard.loading.spec import LoaderSpec
from cocoshard.loading.tario import shard_keys
from cocoshard.prepare.manifest import Manifest, is_labelled


def stream_loader(manifest: Manifest, split: str | Sequence[str], spec: LoaderSpec) -> Pipeline:
    """Exact epochs of device batches streamed from the shards of `split` by `spec.workers` processes."""
    entries = manifest.shards(split)
    urls = manifest.urls(split)
    source = ShardBatchSource(
        urls,
        [entry.samples for entry in entries],
        [entry.sha256 for entry in entries],
        canvas_size=manifest.size,
        labelled=is_labelled(split),
        batch_size=spec.batch_size,
        seed=spec.seed,
        rank=spec.rank,
        world_size=spec.world_size,
        workers=spec.workers,
        train=spec.train,
        shuffle_buffer=spec.shuffle_buffer,
        skip_bad_samples=spec.skip_bad_samples,
        transform=spec.transform if spec.augment_on_host else None,
        threads=spec.threads,
        send_bytes=spec.decode == "device",
        remote=manifest.remote,
    )

    def shard_of(key: str) -> str:
        """The shard holding `key`, read from the tar headers (for an error message only)."""
        for url in urls:
            try:
                if key in shard_keys(url, remote=manifest.remote):
                    return url
            except (OSError, UserError):
                continue
        return f"(one of the {split!r} shards)"

    return Pipeline(
        manifest,
        spec,
        source,
        split_samples=sum(entry.samples for entry in entries),
        workers=spec.workers,
        name=f"{split} loader",
        canvas_size=manifest.size,
        where=shard_of,
    )
