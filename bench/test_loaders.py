"""Training-ready images/s of each input pipeline, on the same images, batch size and worker count.

    $ pytest bench/ --benchmark                 # cocoshard's pipelines and the folder baseline
    $ pytest bench/ --benchmark --peers         # and WebDataset, FFCV, DALI, LitData, Mosaic Streaming

What "training-ready" means and what each pipeline delivers: `bench/pipelines.py`; how each peer is
driven: `bench/peers/`. Every pipeline first runs one warm-up epoch (worker start, page cache,
checksums, compilation); its first batch is checked. Then the pipelines take turns, one epoch each
per round, so that a change in the machine's load hits all of them alike rather than whichever ran
last, each turn starting once the process tree is idle (`settle`); the median round is reported.
Each pipeline's CPU time per image (this process, its threads and its worker processes) is reported
too: on a machine other processes keep busy, images/s measures the share of the CPU a pipeline won
as much as its efficiency, CPU time the work itself.
"""

from __future__ import annotations

import statistics
import time

import pytest
import torch
from pipelines import (
    PeerUnavailable,
    Pipeline,
    check_first_batch,
    folder_pipeline,
    shard_pipeline,
)

from conftest import (
    OURS,
    BenchData,
    BenchReport,
    bench_device,
    cores,
    process_tree_cpu_seconds,
)


def build_pipelines(
    data: BenchData,
    report: BenchReport,
    peers: bool,
    batch: int,
    workers: int,
    size: int,
    device: torch.device,
) -> list[Pipeline]:
    built = [folder_pipeline(data, batch, workers, size, device)]
    built += [shard_pipeline(name, data, batch, workers, size, device) for name in OURS]
    if peers:
        from peers import PEERS, builder

        for name in PEERS:
            try:
                built.append(builder(name)(data, batch, workers, size, device))
            except PeerUnavailable as exc:
                report.skipped[name] = str(exc)
    return built


def settle(limit_s: float = 3.0, window_s: float = 0.1) -> bool:
    """Wait until this process tree is idle (at most one clock tick of CPU in `window_s`), at most
    `limit_s`; False when it never was.

    Some pipelines keep working after their epoch ends (DALI prefetches its next batches: 0.2-0.6
    CPU-seconds after each turn on the 2-core CPU). The bench waits for that after each turn and
    charges its CPU time to the pipeline that did it, not to whichever runs next.
    """
    deadline = time.perf_counter() + limit_s
    while time.perf_counter() < deadline:
        before = process_tree_cpu_seconds()
        time.sleep(window_s)
        if process_tree_cpu_seconds() - before < 0.015:
            return True
    return False


def interleaved_rates(
    pipelines: list[Pipeline], data: BenchData, rounds: int, size: int, batch: int, device: torch.device
) -> tuple[dict[str, list[float]], dict[str, float]]:
    """images/s per pipeline and round after a checked warm-up epoch each, pipelines alternating;
    each pipeline's CPU time per image over all its rounds (what it did after its epochs included);
    and how many of its turns left the process tree busy beyond `settle`'s limit."""
    for pipeline in pipelines:
        batches = pipeline.epoch(0)
        check_first_batch(pipeline, next(batches), data, size, batch)
        for _ in batches:
            pass
    rates: dict[str, list[float]] = {p.name: [] for p in pipelines}
    cpu = {p.name: 0.0 for p in pipelines}
    images = {p.name: 0 for p in pipelines}
    busy_after = {p.name: 0 for p in pipelines}
    settle()  # after the warm-ups
    for epoch in range(1, rounds + 1):
        for pipeline in pipelines:
            start, cpu_start = time.perf_counter(), process_tree_cpu_seconds()
            count = sum(inputs.shape[0] for inputs, _, _ in pipeline.epoch(epoch))
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            rates[pipeline.name].append(count / (time.perf_counter() - start))
            busy_after[pipeline.name] += not settle()  # its work after the epoch is its own
            cpu[pipeline.name] += process_tree_cpu_seconds() - cpu_start
            images[pipeline.name] += count
    return rates, {name: cpu[name] / images[name] for name in cpu}, busy_after


def test_pipeline_throughput(bench_data: BenchData, report: BenchReport, request: pytest.FixtureRequest):
    opts = request.config.option
    device, workers = bench_device(), cores()
    batch, size, rounds = opts.bench_batch_size, opts.bench_size, opts.bench_rounds
    report.settings.update(
        set=opts.bench_root or opts.bench_set,
        images=len(bench_data.keys),
        batch_size=batch,
        workers=workers,
        size=size,
        rounds=rounds,
        warmup_epochs=1,
        order="one epoch of each pipeline per round",
    )
    pipelines = build_pipelines(bench_data, report, opts.peers, batch, workers, size, device)
    try:
        rates, cpu_per_image, busy_after = interleaved_rates(
            pipelines, bench_data, rounds, size, batch, device
        )
    finally:
        for pipeline in pipelines:
            pipeline.close()
    for pipeline in pipelines:
        report.pipelines[pipeline.name] = {
            "images_per_s": round(statistics.median(rates[pipeline.name]), 1),
            "rounds": [round(r, 1) for r in rates[pipeline.name]],
            "cpu_us_per_image": round(cpu_per_image[pipeline.name] * 1e6, 1),
            # turns after which the process tree was still busy 3 s later (its CPU time then counts
            # only what it did in those 3 s)
            "turns_not_idle_after": busy_after[pipeline.name],
            "output": pipeline.output,
            "version": pipeline.version,
            "peer": pipeline.peer,
            "notes": pipeline.notes,
        }
        assert all(rate > 0 for rate in rates[pipeline.name])
