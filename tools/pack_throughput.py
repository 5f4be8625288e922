"""Measure `cocoshard pack` throughput (images/s) in both pixel formats, on this machine.

    $ python tools/pack_throughput.py                      # 10,000 generated images, 3 runs each
    $ python tools/pack_throughput.py --root ms-coco --repeats 1

Without --root it draws a synthetic set first (timed as well). Each format is packed --repeats
times into the same folder and the median wall time is reported, with the machine it ran on and
the load average before and after (other work on the machine makes the figures lower and noisier).
Input images counted: every file read, test images included.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

from cocoshard import config
from cocoshard.config import SynthConfig
from cocoshard.info import pil_build
from cocoshard.machine import usable_cores
from cocoshard.prepare.pack import pack_folder
from cocoshard.prepare.sources import find_sources
from cocoshard.prepare.synth import write_synthetic
from cocoshard.settings import resolve


def machine() -> str:
    """CPU model, usable cores, PIL flavour and Python: enough to compare figures across machines."""
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    python = platform.python_version()
    return f"{model}, {usable_cores()} cores usable, {pil_build().describe()}, Python {python}"


def time_pack(
    root: Path, out: Path, pixel_format: str, repeats: int, workers: int, shard_samples: int
) -> list[float]:
    cfg = resolve(
        config.PackConfig,
        {
            "root": str(root),
            "out": str(out),
            "format": pixel_format,
            "workers": workers,
            "shard_samples": shard_samples,
        },
    )
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        manifest = pack_folder(cfg)
        seconds.append(time.perf_counter() - start)
    assert not manifest["rejected"], manifest["rejected"][:3]
    return seconds


def count_inputs(root: Path) -> int:
    sources = find_sources(str(root))
    folders = [sources.train_images] + ([sources.test_images] if sources.test_images else [])
    return sum(1 for folder in folders for entry in folder.iterdir() if entry.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", help="challenge folder to pack (default: generate one)")
    parser.add_argument("--images", type=int, default=10_000, help="generated train images (without --root)")
    parser.add_argument("--repeats", type=int, default=3, help="packs per format; the median is reported")
    parser.add_argument("--workers", type=int, default=0, help="pack processes (0: one per core)")
    parser.add_argument("--shard-samples", type=int, default=800)
    parser.add_argument("--work", help="scratch folder (default: a temporary one, removed at the end)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(dir=args.work) as scratch:
        work = Path(scratch)
        print(f"machine: {machine()}; load average before: {os.getloadavg()[0]:.2f}")
        root = Path(args.root) if args.root else work / "synthetic"
        if not args.root:
            start = time.perf_counter()
            write_synthetic(
                SynthConfig(out=str(root), train=args.images, test=0, seed=0, workers=args.workers),
                progress=True,
            )
            elapsed = time.perf_counter() - start
            print(f"synth: {args.images:,} images in {elapsed:.1f} s = {args.images / elapsed:,.0f} images/s")
        images = count_inputs(root)
        print(f"| format | images | median of {args.repeats} | images/s |\n|---|---|---|---|")
        for pixel_format in ("jpeg", "raw"):
            seconds = time_pack(
                root,
                work / f"shards-{pixel_format}",
                pixel_format,
                args.repeats,
                args.workers,
                args.shard_samples,
            )
            median = statistics.median(seconds)
            print(f"| {pixel_format} | {images:,} | {median:.1f} s | {images / median:,.0f} |", flush=True)
        print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
