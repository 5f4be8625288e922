"""What a few CPU cores can feed a GPU: each loader's host side alone, beside this machine's limits.

    $ pytest bench/ --benchmark                  # with the other benchmarks; no GPU needed

A GPU run's loader does on the host only what `cocoshard.loading.pipeline.Pipeline.host_batches`
does: worker processes fill uint8 canvases (or copy compressed bytes, `--decode device`) into
shared-memory slots, and the device does the rest. This bench runs exactly that on this machine's
cores, with the same workers as the throughput bench, and reports images/s and CPU µs per image
per loader mode. Beside each mode, measured just before each of its rounds, what it costs at the
least: for a resident split (full canvases in memory), copying a canvas to a place of its own; for
raw shards, copying each of the bench's raw images (its own pixels) into a canvas of its own; for jpeg
shards, decoding each of the bench's JPEGs into a canvas of its own. Each limit is measured twice:
by as many processes at once as the loader has workers, each on images of its own, and by one
process alone. The loader's workers copy at the same time, and memory is shared by the cores: on
the 2-core bench machine one core alone copies a raw image in 16-21 µs, each of two copying at once
21-27. Each mode is compared with its bar against the limit measured as it runs (all its cores at
once); the one-core figure and the ratio to it are reported beside (a benchmark reports, it does
not fail on a figure). The first timed round is reported apart
from the later ones: a stream worker maps and checks each shard the first time it reads it
(`cocoshard.loading.layout`), and with shards dealt out afresh every epoch, a worker meets shards
new to it in the first few epochs of a run. The later rounds are what the rest of a run costs, and
are compared with the bars: resident and raw <= 1.5x their copy, jpeg <= 1.15x its decode. CPU time
is read to the nanosecond (`conftest.live_threads_cpu_seconds`): a round lasts ~0.1 s, ten clock
ticks. A user reads off how many images/s their cores can deliver to a GPU: cores / (CPU µs per
image).
"""

from __future__ import annotations

import functools
import multiprocessing
import queue
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from test_loaders import settle

from conftest import BenchData, BenchReport, cores, live_threads_cpu_seconds

# mode -> (pixel format, loader settings, the limit it is held to)
HOST_MODES = {
    "stream-raw": ("raw", dict(mode="stream"), "pixels"),
    "resident": ("raw", dict(mode="resident"), "copy"),
    "stream-jpeg": ("jpeg", dict(mode="stream"), "decode"),
    # --decode device: only compressed bytes move on the host (no bar: the device decodes)
    "stream-jpeg-bytes": ("jpeg", dict(mode="stream", decode="device"), None),
    "resident-jpeg-bytes": ("jpeg", dict(mode="resident", decode="device"), None),
}
BARS = {"copy": 1.5, "pixels": 1.5, "decode": 1.15}
COPY_IMAGES = 512  # distinct canvases: 77 MB at 224 px, more than any cache


def no_wait() -> None:
    pass


def cpu_us_per_item(one_pass: Callable[[], object], items: int, rounds: int) -> float:
    """CPU µs of this thread per item of `one_pass` (which handles `items` items), median of `rounds`."""
    times = []
    for _ in range(rounds):
        start = time.thread_time()
        one_pass()
        times.append((time.thread_time() - start) / items)
    return statistics.median(times) * 1e6


def copy_us_per_image(
    size: int, rounds: int = 5, *, part: int = 0, parts: int = 1, ready: Callable[[], object] = no_wait
) -> float:
    """One core copying canvases of size x size x 3 bytes from and to memory no cache holds (CPU µs
    a canvas, median of `rounds`; `ready` is called once the arrays are made, before the rounds).

    Each canvas goes to a place of its own, as each image of a batch does: copied again and again
    into one canvas, which stays in the core's cache, a canvas cost half as much (8.9 against
    17.5 µs on the 2-core bench machine), a limit no loader that writes batches can reach."""
    source = np.random.default_rng([part, parts]).integers(
        0, 255, (COPY_IMAGES, size, size, 3), dtype=np.uint8
    )
    target = np.zeros_like(source)  # written once before timing: its pages exist

    def one_pass() -> None:
        for image, place in zip(source, target, strict=True):
            np.copyto(place, image)

    ready()
    return cpu_us_per_item(one_pass, COPY_IMAGES, rounds)


@functools.cache
def _all_train_samples(shards: Path) -> tuple[list, int]:
    """Every sample of the packed train split at `shards` and the canvas side, read (and hashed)
    once: the processes that measure a limit are forked with it."""
    from cocoshard.loading.tario import read_samples
    from cocoshard.prepare.manifest import load_manifest

    manifest = load_manifest(shards)
    samples = []
    for url, entry in zip(manifest.urls("train"), manifest.shards("train"), strict=True):
        samples += read_samples(url, entry.sha256, entry.samples)
    return samples, manifest.size


def _train_samples(
    data: BenchData, pixel_format: str, count: int, part: int = 0, parts: int = 1
) -> tuple[list, int]:
    """Every `parts`-th of the first `count * parts` samples of the bench's train shards in
    `pixel_format` from the `part`-th on (a process's own images), and the canvas side."""
    samples, side = _all_train_samples(data.shards[pixel_format])
    return samples[: count * parts][part::parts], side


def pixels_us_per_image(
    data: BenchData, rounds: int = 5, *, part: int = 0, parts: int = 1, ready: Callable[[], object] = no_wait
) -> float:
    """One core copying the bench's raw images (its own pixels, 73% of a canvas's bytes at 224 px)
    from memory into the top-left corner of canvases of their own, no cache holding either: what
    a raw shard costs at the least."""
    from cocoshard.pure.format import EXT_PIXELS, decode_pixels

    samples, side = _train_samples(data, "raw", COPY_IMAGES, part, parts)
    images = [decode_pixels(s.members[EXT_PIXELS], side).copy() for s in samples]
    target = np.zeros((len(images), side, side, 3), np.uint8)

    def one_pass() -> None:
        for image, place in zip(images, target, strict=True):
            place[: image.shape[0], : image.shape[1]] = image

    ready()
    return cpu_us_per_item(one_pass, len(images), rounds)


def decode_us_per_image(
    data: BenchData,
    limit: int = 400,
    rounds: int = 3,
    *,
    part: int = 0,
    parts: int = 1,
    ready: Callable[[], object] = no_wait,
) -> float:
    """One core decoding the bench's JPEGs into canvases of their own: the decode a stream worker
    runs, without the checks it makes once per shard."""
    from cocoshard.loading.decode import decode_image_to_canvas, image_member

    samples, side = _train_samples(data, "jpeg", limit, part, parts)
    images = [(sample.members[ext], ext) for sample in samples for ext in [image_member(sample)]]
    canvases = np.zeros((len(images), side, side, 3), np.uint8)
    torch.set_num_threads(1)
    for (image, ext), canvas in zip(images[:20], canvases[:20], strict=True):  # warm-up
        decode_image_to_canvas(image, ext, canvas, checked=True)

    def one_pass() -> None:
        for (image, ext), canvas in zip(images, canvases, strict=True):
            decode_image_to_canvas(image, ext, canvas, checked=True)

    ready()
    return cpu_us_per_item(one_pass, len(images), rounds)


def at_once(measure: Callable[..., float], processes: int, timeout_s: float = 600) -> float:
    """`measure(part=k, parts=processes, ready=...)` in `processes` forked processes (as the
    loaders' workers are) that start their rounds together; the median of their figures. A process
    that fails, or dies (the OOM killer), fails the bench at once, naming why."""
    if processes == 1:
        return measure()
    context = multiprocessing.get_context("fork")
    barrier, results = context.Barrier(processes, timeout=timeout_s), context.Queue()

    def run(part: int) -> None:
        try:
            results.put(measure(part=part, parts=processes, ready=barrier.wait))
        except BaseException as exc:  # noqa: BLE001 (reported in the bench process)
            barrier.abort()
            results.put(f"{type(exc).__name__}: {exc}")

    children = [context.Process(target=run, args=(part,), daemon=True) for part in range(processes)]
    for child in children:
        child.start()
    figures: list[float | str] = []
    deadline = time.monotonic() + timeout_s
    try:
        while len(figures) < processes:
            try:
                figures.append(results.get(timeout=1))
                continue
            except queue.Empty:
                pass
            died = [child.exitcode for child in children if child.exitcode not in (None, 0)]
            assert not died, f"a process measuring a limit ended with exit code {died[0]}"
            assert time.monotonic() < deadline, (
                f"a limit measured in {processes} processes took over {timeout_s} s"
            )
    finally:
        for child in children:
            child.join(timeout=10)
            if child.is_alive():
                child.kill()
    errors = [figure for figure in figures if isinstance(figure, str)]
    assert not errors, f"measuring a limit in {processes} processes at once failed: {errors[0]}"
    return statistics.median(float(figure) for figure in figures)


def host_rates(
    data: BenchData, batch: int, workers: int, rounds: int, limits: dict[str, Callable[..., float]]
) -> dict[str, dict[str, float]]:
    """Per mode: images/s (median round), CPU µs per image of the first timed round and of the
    later ones, and its limit measured just before each round (this machine's speed drifts within
    seconds), by `workers` processes at once and by one alone; the ratios are the median of the
    later rounds' ratios to the limit measured just before them."""
    from cocoshard.loading.loader import build_loader
    from cocoshard.loading.pipeline import Pipeline
    from cocoshard.loading.spec import LoaderSpec

    found = {}
    for name, (pixel_format, settings, limit) in HOST_MODES.items():
        spec = LoaderSpec(batch_size=batch, device="cpu", train=True, workers=workers, **settings)
        with build_loader(data.shards[pixel_format], "train", spec) as loader:
            assert isinstance(loader, Pipeline)
            sum(len(b) for b in loader.host_batches(0))  # warm-up: workers, page cache, checksums
            settle()
            rates, cpu, images, at_limit, alone = [], [], [], [], []
            for epoch in range(1, rounds + 1):
                if limit is not None:
                    at_limit.append(at_once(limits[limit], workers))
                    alone.append(limits[limit]())
                    settle()
                start, cpu_start = time.perf_counter(), live_threads_cpu_seconds()
                count = sum(len(b) for b in loader.host_batches(epoch))
                rates.append(count / (time.perf_counter() - start))
                settle()
                cpu.append(live_threads_cpu_seconds() - cpu_start)
                images.append(count)
        entry = {
            "images_per_s": statistics.median(rates),
            "cpu_us_per_image": sum(cpu) / sum(images) * 1e6,
            "first_round_cpu_us_per_image": cpu[0] / images[0] * 1e6,
            "later_rounds_cpu_us_per_image": sum(cpu[1:]) / max(1, sum(images[1:])) * 1e6,
        }
        if limit is not None:
            later = [c / n * 1e6 for c, n in zip(cpu[1:], images[1:], strict=True)]
            entry.update(
                limit_us=statistics.median(at_limit[1:]),
                one_core_limit_us=statistics.median(alone[1:]),
                x_limit=statistics.median(u / v for u, v in zip(later, at_limit[1:], strict=True)),
                x_one_core_limit=statistics.median(u / v for u, v in zip(later, alone[1:], strict=True)),
            )
        found[name] = entry
    return found


def test_host_side_against_the_machines_limits(bench_data: BenchData, report: BenchReport, request) -> None:
    opts = request.config.option
    limits: dict[str, Callable[..., float]] = {
        "copy": lambda **part: copy_us_per_image(224, **part),
        "pixels": lambda **part: pixels_us_per_image(bench_data, **part),
        "decode": lambda **part: decode_us_per_image(bench_data, **part),
    }
    rounds = max(2, opts.bench_rounds)
    rates = host_rates(bench_data, opts.bench_batch_size, cores(), rounds, limits)
    report.host_side["settings"] = {
        "set": opts.bench_root or opts.bench_set,
        "images": len(bench_data.keys),
        "batch_size": opts.bench_batch_size,
        "workers": cores(),
        "rounds": rounds,
        "warmup_epochs": 1,
        "limits": f"before every round: {cores()} processes at once, then one alone",
        "cpu_time": "live threads' schedstat, ns",
    }
    measured: dict[str, list[float]] = {}
    one_core: dict[str, list[float]] = {}
    for name, entry in rates.items():
        limit = HOST_MODES[name][2]
        report.host_side[name] = {
            "images_per_s": round(entry["images_per_s"], 1),
            "cpu_us_per_image": round(entry["cpu_us_per_image"], 1),
            "first_round_cpu_us_per_image": round(entry["first_round_cpu_us_per_image"], 1),
            "later_rounds_cpu_us_per_image": round(entry["later_rounds_cpu_us_per_image"], 1),
            "cores_can_feed_images_per_s": round(cores() / entry["later_rounds_cpu_us_per_image"] * 1e6),
        }
        if limit is not None:
            measured.setdefault(limit, []).append(entry["limit_us"])
            one_core.setdefault(limit, []).append(entry["one_core_limit_us"])
            report.host_side[name].update(
                limit=limit,
                limit_us=round(entry["limit_us"], 1),
                x_limit=round(entry["x_limit"], 2),
                bar=BARS[limit],
                one_core_limit_us=round(entry["one_core_limit_us"], 1),
                x_one_core_limit=round(entry["x_one_core_limit"], 2),
            )
    report.host_side["limits_us_per_image"] = {
        name: round(statistics.median(values), 1) for name, values in measured.items()
    }
    report.host_side["one_core_limits_us_per_image"] = {
        name: round(statistics.median(values), 1) for name, values in one_core.items()
    }
