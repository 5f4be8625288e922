"""What a few CPU cores can feed a GPU: each loader's host side alone, beside this machine's limits.

    $ pytest bench/ --benchmark                  # with the other benchmarks; no GPU needed

A GPU run's loader does on the host only what `cocoshard.loading.pipeline.Pipeline.host_batches`
does: worker processes fill uint8 canvases (or copy compressed bytes, `--decode device`) into
shared-memory slots, and the device does the rest. This bench runs exactly that on this machine's
cores, with the same workers as the throughput bench, and reports images/s and CPU µs per image
per loader mode. Beside them, measured in the same run on one core: the cost of copying one
canvas of pixels (what a raw shard or a resident split costs at the least) and of decoding one of
the bench's JPEGs (what a jpeg shard costs at the least). A user reads off how many images/s their
cores can deliver to a GPU: cores / (CPU µs per image). The bars: raw <= 1.5x its copy, jpeg <=
1.15x its decode.
"""

from __future__ import annotations

import statistics
import time

import numpy as np
import torch
from test_loaders import settle

from conftest import BenchData, BenchReport, cores, process_tree_cpu_seconds

# mode -> (pixel format, loader settings, the limit it is held to)
HOST_MODES = {
    "stream-raw": ("raw", dict(mode="stream"), "copy"),
    "resident": ("raw", dict(mode="resident"), "copy"),
    "stream-jpeg": ("jpeg", dict(mode="stream"), "decode"),
    # --decode device: only compressed bytes move on the host (no bar: the device decodes)
    "stream-jpeg-bytes": ("jpeg", dict(mode="stream", decode="device"), None),
    "resident-jpeg-bytes": ("jpeg", dict(mode="resident", decode="device"), None),
}
BARS = {"copy": 1.5, "decode": 1.15}
COPY_IMAGES = 512  # distinct canvases: 77 MB at 224 px, more than any cache


def copy_us_per_image(size: int, rounds: int = 5) -> float:
    """One core copying canvases of size x size x 3 bytes from and to memory no cache holds."""
    source = np.random.default_rng(0).integers(0, 255, (COPY_IMAGES, size, size, 3), dtype=np.uint8)
    target = np.empty_like(source[0])
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        for image in source:
            np.copyto(target, image)
        times.append((time.perf_counter() - start) / COPY_IMAGES)
    return statistics.median(times) * 1e6


def decode_us_per_image(data: BenchData, limit: int = 600) -> float:
    """One core decoding the bench's JPEGs into a canvas, as a stream worker does."""
    from cocoshard.loading.decode import fill_canvas
    from cocoshard.loading.tario import read_samples
    from cocoshard.prepare.manifest import load_manifest

    manifest = load_manifest(data.shards["jpeg"])
    samples = []
    for url, entry in zip(manifest.urls("train"), manifest.shards("train"), strict=True):
        samples += read_samples(url, entry.sha256, entry.samples)
    samples = samples[:limit]
    canvas = np.empty((manifest.size, manifest.size, 3), np.uint8)
    torch.set_num_threads(1)
    for sample in samples[:20]:  # warm-up
        fill_canvas(sample, canvas)
    start = time.perf_counter()
    for sample in samples:
        fill_canvas(sample, canvas)
    return (time.perf_counter() - start) / len(samples) * 1e6


def host_rates(data: BenchData, batch: int, workers: int, rounds: int) -> dict[str, dict[str, float]]:
    """images/s (median round) and CPU µs per image of each mode's host side."""
    from cocoshard.loading.loader import build_loader
    from cocoshard.loading.pipeline import Pipeline
    from cocoshard.loading.spec import LoaderSpec

    found = {}
    for name, (pixel_format, settings, _) in HOST_MODES.items():
        spec = LoaderSpec(batch_size=batch, device="cpu", train=True, workers=workers, **settings)
        with build_loader(data.shards[pixel_format], "train", spec) as loader:
            assert isinstance(loader, Pipeline)
            sum(len(b) for b in loader.host_batches(0))  # warm-up: workers, page cache, checksums
            settle()
            rates, cpu, images = [], 0.0, 0
            for epoch in range(1, rounds + 1):
                start, cpu_start = time.perf_counter(), process_tree_cpu_seconds()
                count = sum(len(b) for b in loader.host_batches(epoch))
                rates.append(count / (time.perf_counter() - start))
                settle()
                cpu += process_tree_cpu_seconds() - cpu_start
                images += count
        found[name] = {"images_per_s": statistics.median(rates), "cpu_us_per_image": cpu / images * 1e6}
    return found


def test_host_side_against_the_machines_limits(bench_data: BenchData, report: BenchReport, request) -> None:
    opts = request.config.option
    limits = {"copy": copy_us_per_image(224), "decode": decode_us_per_image(bench_data)}
    rates = host_rates(bench_data, opts.bench_batch_size, cores(), opts.bench_rounds)
    report.host_side["limits_us_per_image"] = {name: round(us, 1) for name, us in limits.items()}
    for name, entry in rates.items():
        limit = HOST_MODES[name][2]
        report.host_side[name] = {
            "images_per_s": round(entry["images_per_s"], 1),
            "cpu_us_per_image": round(entry["cpu_us_per_image"], 1),
            "cores_can_feed_images_per_s": round(cores() / entry["cpu_us_per_image"] * 1e6),
        }
        if limit is not None:
            ratio = entry["cpu_us_per_image"] / limits[limit]
            report.host_side[name].update(limit=limit, x_limit=round(ratio, 2), bar=BARS[limit])
