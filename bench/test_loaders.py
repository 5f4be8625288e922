"""Training-ready images/s of each input pipeline, on the same images, batch size and worker count.

    $ pytest bench/ --benchmark

"Training-ready": the batch as the model would take it, on the training device, augmented (random
resized crop + flip) and normalised. Our pipelines deliver what `cocoshard train` feeds its model
with AMP on (its default): channels_last, in bfloat16 (float16 on a GPU without bf16). The folder
baseline delivers what the statement's loop trains on: float32 NCHW, moved to the device; it pays
no channels_last conversion.

Every pipeline first runs one warm-up epoch (worker start, page cache, shard checksums). Then the
pipelines take turns, one epoch each per round, so that a change in the machine's load hits all of
them alike rather than whichever ran last; the median round is reported. Each pipeline's CPU time
per image (main process and its loader workers) is reported too: on a machine other processes
keep busy, images/s measures the share of the CPU each pipeline won as much as its efficiency,
while CPU time per image measures the work itself.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable, Iterator, Optional

import pytest
import torch
from baseline import build_folder_loader
from conftest import (
    PIPELINE_ORDER,
    BenchData,
    BenchReport,
    bench_device,
    cores,
    process_tree_cpu_seconds,
)

from cocoshard.loading.augment import train_augment
from cocoshard.loading.loader import build_loader
from cocoshard.loading.tario import read_samples
from cocoshard.prepare.manifest import read_manifest, shard_urls, split_shards

Epochs = Callable[[int], Iterator[int]]  # epoch -> the size of each training-ready batch, as it is ready


def training_dtype(device: torch.device) -> torch.dtype:
    """What `cocoshard train` feeds its model with AMP on (the default): bf16 on a CPU and on GPUs
    that have it, else fp16."""
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


def train_keys(shards) -> list[str]:
    """Keys of the packed train split: the folder baseline reads exactly these images."""
    manifest = read_manifest(shards)
    entries = split_shards(manifest, "train")
    urls = shard_urls(shards, manifest, "train")
    return [s.key for url, e in zip(urls, entries) for s in read_samples(url, e["sha256"], e["samples"])]


def folder_epochs(data: BenchData, batch: int, workers: int, size: int, device: torch.device) -> tuple[Epochs, None]:
    loader = build_folder_loader(data.root, batch_size=batch, workers=workers, size=size,
                                 keys=train_keys(data.shards["jpeg"]))

    def epoch_images(epoch: int) -> Iterator[int]:
        for images, labels in loader:
            images = images.to(device, non_blocking=True)
            labels = labels.to(device, non_blocking=True)
            yield images.shape[0]

    return epoch_images, None


def shard_epochs(data: BenchData, pipeline: str, batch: int, workers: int, size: int, device: torch.device) -> tuple[Epochs, object]:
    mode = "resident" if pipeline == "resident" else "stream"
    pixel_format = "jpeg" if pipeline == "stream-jpeg" else "raw"
    loader = build_loader(data.shards[pixel_format], "train", batch_size=batch, device=device, mode=mode, train=True,
                          seed=0, workers=0 if mode == "resident" else workers)
    generator = torch.Generator(device=device).manual_seed(0)
    dtype = training_dtype(device)

    def epoch_images(epoch: int) -> Iterator[int]:
        loader.set_epoch(epoch)
        for b in loader:
            ready = train_augment(b.images, b.sizes, out_size=size, generator=generator, dtype=dtype,
                                  threads=loader.augment_threads)
            yield ready.shape[0]

    return epoch_images, loader


def interleaved_rates(pipelines: dict[str, Epochs], rounds: int,
                      device: torch.device) -> tuple[dict[str, list[float]], dict[str, float]]:
    """images/s per pipeline and round after one warm-up epoch each, pipelines alternating; and
    each pipeline's CPU time per image over all its rounds (this process and its workers)."""
    for epochs in pipelines.values():
        sum(epochs(0))
    rates: dict[str, list[float]] = {name: [] for name in pipelines}
    cpu = {name: 0.0 for name in pipelines}
    images = {name: 0 for name in pipelines}
    for epoch in range(1, rounds + 1):
        for name, epochs in pipelines.items():
            start, cpu_start = time.perf_counter(), process_tree_cpu_seconds()
            count = sum(epochs(epoch))
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            rates[name].append(count / (time.perf_counter() - start))
            cpu[name] += process_tree_cpu_seconds() - cpu_start
            images[name] += count
    return rates, {name: cpu[name] / images[name] for name in pipelines}


def test_pipeline_throughput(bench_data: BenchData, report: BenchReport, request: pytest.FixtureRequest):
    opts = request.config.option
    device, workers = bench_device(), cores()
    batch, size, rounds = opts.bench_batch_size, opts.bench_size, opts.bench_rounds
    report.settings.update(batch_size=batch, workers=workers, size=size, rounds=rounds, warmup_epochs=1,
                           images=len(train_keys(bench_data.shards["jpeg"])), output_dtype=str(training_dtype(device)),
                           order="one epoch of each pipeline per round")
    pipelines: dict[str, Epochs] = {}
    loaders: list[Optional[object]] = []
    try:
        for name in PIPELINE_ORDER:
            if name == "folder":
                epochs, loader = folder_epochs(bench_data, batch, workers, size, device)
            else:
                epochs, loader = shard_epochs(bench_data, name, batch, workers, size, device)
            pipelines[name] = epochs
            loaders.append(loader)
        rates, cpu_per_image = interleaved_rates(pipelines, rounds, device)
    finally:
        for loader in loaders:
            if loader is not None:
                loader.close()
    for name in PIPELINE_ORDER:
        report.pipelines[name] = {"images_per_s": round(statistics.median(rates[name]), 1),
                                  "rounds": [round(r, 1) for r in rates[name]],
                                  "cpu_us_per_image": round(cpu_per_image[name] * 1e6, 1)}
        assert all(rate > 0 for rate in rates[name])
