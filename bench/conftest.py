"""Benchmarks: `pytest bench/ --benchmark [--peers] [--bench-set photos|synth] [--bench-root PATH]`.

Without `--benchmark` every test here is skipped; plain `pytest` does not collect this folder
(`testpaths = ["tests"]`). The flag does not clash with pytest-benchmark's `--benchmark-*`
options: pytest matches option names exactly (no prefix abbreviations).

Data (`bench_data`): by default `--bench-images` random crops of the repository's real COCO photos
at the challenge's size and quality (`bench/photo_crops.py`: as hard to decode and augment as the
challenge's own photos); `--bench-set synth` draws the generated set instead; `--bench-root` reads
a challenge-layout folder. Packed once in both pixel formats and cached under bench/results/cache/
(each peer caches its own format there too). Results: a table at the end of the run and
bench/results/latest.json.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

BENCH_DIR = Path(__file__).resolve().parent
RESULTS = BENCH_DIR / "results"
CACHE = RESULTS / "cache"
COMPLETE = "complete.json"
OURS = ("stream-jpeg", "stream-raw", "resident", "stream-jpeg-device", "resident-jpeg-device")
sys.path.insert(0, str(BENCH_DIR))  # the bench's own modules: baseline, photo_crops, pipelines, peers


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("cocoshard benchmarks (bench/)")
    group.addoption(
        "--benchmark",
        action="store_true",
        default=False,
        help="run the loader and training-step benchmarks in bench/",
    )
    group.addoption(
        "--peers",
        action="store_true",
        default=False,
        help="also measure the loaders users would pick instead (WebDataset, FFCV, DALI, LitData, Mosaic "
        "Streaming; tools/install-peers.sh installs them; one that is missing is reported as skipped)",
    )
    group.addoption(
        "--bench-set",
        choices=("photos", "synth"),
        default="photos",
        help="photos: crops of real COCO photos (default); synth: the generated set",
    )
    group.addoption("--bench-root", default=None, help="challenge-layout folder to measure on instead")
    group.addoption(
        "--bench-model", default="resnet18", help="torchvision model of the training-step benchmark"
    )
    group.addoption("--bench-images", type=int, default=4000, help="images of the bench set")
    group.addoption(
        "--bench-batch-size", type=int, default=128, help="images per batch, the same for every pipeline"
    )
    group.addoption(
        "--bench-rounds", type=int, default=5, help="timed epochs per pipeline, after one warm-up epoch"
    )
    group.addoption("--bench-size", type=int, default=224, help="training resolution")
    group.addoption("--bench-out", default=str(RESULTS / "latest.json"), help="where the results JSON goes")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--benchmark"):
        return
    skip = pytest.mark.skip(reason="benchmarks run only with `pytest bench/ --benchmark`")
    for item in items:
        if BENCH_DIR in Path(str(item.fspath)).parents:
            item.add_marker(skip)


# --------------------------------------------------------------------------------- results


@dataclass
class BenchReport:
    """Everything measured in one run: printed as a table at the end and written as JSON."""

    settings: dict[str, Any] = field(default_factory=dict)
    pipelines: dict[str, dict[str, Any]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)  # peer -> why it was not measured
    train_step: dict[str, Any] = field(default_factory=dict)
    host_side: dict[str, Any] = field(default_factory=dict)  # test_host_side.py: what the CPU can feed a GPU
    load: dict[str, list[float]] = field(default_factory=dict)
    decode: dict[str, dict[str, Any]] = field(default_factory=dict)  # bench/test_decode.py, per backend

    def note_load(self, when: str) -> None:
        self.load[when] = [round(x, 2) for x in os.getloadavg()]

    def to_json(self) -> dict[str, Any]:
        folder = self.pipelines.get("folder", {})
        peers = {name: entry for name, entry in self.pipelines.items() if entry.get("peer")}
        best = max(peers.values(), key=lambda e: e["images_per_s"], default=None)
        pipelines = {}
        for name, source in self.pipelines.items():
            entry = dict(source)
            if folder:
                entry["ratio_to_folder"] = round(entry["images_per_s"] / folder["images_per_s"], 2)
                entry["cpu_ratio_to_folder"] = round(
                    folder["cpu_us_per_image"] / entry["cpu_us_per_image"], 2
                )
            if best is not None:
                entry["ratio_to_best_peer"] = round(entry["images_per_s"] / best["images_per_s"], 2)
            pipelines[name] = entry
        bars = bar_ratios(self.pipelines)
        return {
            "machine": machine(),
            "device": device_name(),
            "settings": self.settings,
            "load_average": self.load,
            "pipelines": pipelines,
            "best_peer": next((n for n, e in peers.items() if e is best), None),
            "bars": bars,
            "skipped": self.skipped,
            "train_step": self.train_step,
            "host_side": self.host_side,
            "decode": self.decode,
        }


def bar_ratios(pipelines: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The ratios the bars are set on, when both sides were measured in this run."""
    rate = {name: entry["images_per_s"] for name, entry in pipelines.items()}
    peers = [entry["images_per_s"] for entry in pipelines.values() if entry.get("peer")]
    bars: dict[str, Any] = {}
    if peers and "resident" in rate:
        bars["resident / best peer (bar 2.0)"] = round(rate["resident"] / max(peers), 2)
    if "ffcv-raw" in rate and "stream-raw" in rate:
        bars["stream-raw / FFCV raw (bar 1.5)"] = round(rate["stream-raw"] / rate["ffcv-raw"], 2)
    if "ffcv-jpeg" in rate and "stream-jpeg" in rate:
        bars["stream-jpeg / FFCV jpeg (bar 1.3)"] = round(rate["stream-jpeg"] / rate["ffcv-jpeg"], 2)
    return bars


def _ratio(entry: dict[str, Any], name: str) -> str:
    """A ratio column's cell: '-' when the other side was not measured."""
    value = entry.get(name)
    return "-" if value is None else f"{value:.2f}"


_REPORT_KEY = pytest.StashKey[BenchReport]()


@pytest.fixture(scope="session")
def report(request: pytest.FixtureRequest) -> BenchReport:
    """The run's results, shared by the benchmark modules."""
    found = request.config.stash.get(_REPORT_KEY, None)
    if found is None:
        found = request.config.stash[_REPORT_KEY] = BenchReport()
        found.note_load("start")
    return found


def machine() -> dict[str, Any]:
    from cocoshard.info import pil_build

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": cores(),
        "memory_gib": round(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30, 1),
        "python": platform.python_version(),
        "torch": str(torch.__version__),
        "PIL": pil_build().describe(),
        "platform": platform.platform(),
    }


def cores() -> int:
    from cocoshard.machine import usable_cores

    return usable_cores()


def _tree_pids() -> list[str]:
    """This process ("self") and its children, from /proc."""
    import glob

    pids = ["self"]
    for listing in glob.glob("/proc/self/task/*/children"):
        try:
            pids += Path(listing).read_text().split()
        except OSError:
            continue
    return pids


def process_tree_cpu_seconds() -> float:
    """CPU time (user + system) of this process, its threads and its children (loader workers), so far.

    Read from /proc, so that workers still alive count; elsewhere only this process is counted.
    """
    import resource

    proc = Path("/proc/self/stat")
    if not proc.exists():
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in _tree_pids():
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # a worker that just exited
        total += (int(fields[11]) + int(fields[12])) / tick
    return total


def live_threads_cpu_seconds() -> float:
    """CPU time of the live threads of this process and its children, to the nanosecond (from
    /proc/PID/task/*/schedstat); where the kernel keeps no schedstat, `process_tree_cpu_seconds`.

    `process_tree_cpu_seconds` counts 10 ms clock ticks, which is 1% of a pipeline's round but a
    tenth of a host-side round (~0.1 s). Threads that have ended are not counted: use it where every
    thread lives as long as what is measured (the host side's workers and training process do)."""
    import glob

    if not Path("/proc/self/schedstat").exists():
        return process_tree_cpu_seconds()
    total = 0
    for pid in _tree_pids():
        for path in glob.glob(f"/proc/{pid}/task/*/schedstat"):
            try:
                total += int(Path(path).read_text().split()[0])
            except (OSError, IndexError, ValueError):
                continue  # a thread or worker that just ended
    return total / 1e9


def bench_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def device_name() -> str:
    device = bench_device()
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({cores()} cores, no GPU)"


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    found: BenchReport | None = config.stash.get(_REPORT_KEY, None)
    if found is None or not (found.pipelines or found.train_step or found.host_side or found.decode):
        return
    found.note_load("end")
    data = found.to_json()
    from cocoshard.atomic import atomic_write_text

    out = Path(config.getoption("--bench-out"))
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(data, indent=2) + "\n")
    write = terminalreporter.write_line
    terminalreporter.section("cocoshard benchmark")
    settings = found.settings
    write(
        f"device: {data['device']}; {settings.get('set')} set, {settings.get('images')} images, batch "
        f"{settings.get('batch_size')}, {settings.get('workers')} workers, {settings.get('size')} px; "
        f"load average {found.load}"
    )
    if data["pipelines"]:
        write(
            f"{'pipeline':<24}{'images/s':>10}{'min':>8}{'max':>8}{'x folder':>10}{'x best peer':>13}"
            f"{'CPU us/img':>12}  output"
        )
        for name, entry in data["pipelines"].items():
            write(
                f"{name:<24}{entry['images_per_s']:>10.0f}{min(entry['rounds']):>8.0f}{max(entry['rounds']):>8.0f}"
                f"{_ratio(entry, 'ratio_to_folder'):>10}{_ratio(entry, 'ratio_to_best_peer'):>13}"
                f"{entry['cpu_us_per_image']:>12.0f}  {entry['output']}"
            )
    for name, why in data["skipped"].items():
        write(f"{name:<24}skipped: {why}")
    for bar, ratio in data["bars"].items():
        write(f"{bar}: {ratio:.2f}")
    for name, entry in data["decode"].items():
        write(f"{name:<40}{entry['images_per_s']:>10.0f} images/s{entry['us_per_image']:>10.0f} us/image")
    for name, entry in data["train_step"].items():
        if isinstance(entry, dict) and "images_per_s" in entry:
            write(f"train step {name:<28}{entry['images_per_s']:>10.1f} images/s")
    host = data["host_side"]
    if host:
        limits, alone = host.get("limits_us_per_image", {}), host.get("one_core_limits_us_per_image", {})
        write(
            f"host side alone (what {cores()} cores feed a GPU); limits, {cores()} cores at once: "
            f"{limits}, one alone: {alone}"
        )
        for name, entry in host.items():
            if "images_per_s" in entry:
                bar = (
                    f"  {entry['x_limit']:.2f}x its {entry['limit']} (bar {entry['bar']};"
                    f" {entry['x_one_core_limit']:.2f}x one core's)"
                    if "limit" in entry
                    else ""
                )
                rate, first = entry["images_per_s"], entry["first_round_cpu_us_per_image"]
                later = entry["later_rounds_cpu_us_per_image"]
                write(
                    f"  {name:<22}{rate:>10.0f} images/s{later:>7.0f} us/img ({first:.0f} first round){bar}"
                )
    write(f"written to {out}")


# ------------------------------------------------------------------------------------ data


@dataclass
class BenchData:
    """The measured images: a challenge-layout folder, its shards in both formats, and the truth."""

    root: Path
    shards: dict[str, Path]  # pixel format -> packed folder
    keys: list[str]  # the packed train split's keys (every pipeline reads exactly these images)
    labels: dict[str, np.ndarray]  # key -> uint8 (80,) from its .cls file
    cache: Path  # where peers keep their own formats of these images

    @property
    def images(self) -> Path:
        return self.root / "images/train-resized/train-resized"


def _pack(root: Path, out: Path, pixel_format: str, size: int) -> None:
    from cocoshard import config
    from cocoshard.prepare import pack
    from cocoshard.settings import resolve

    settings = {
        "root": str(root),
        "out": str(out),
        "format": pixel_format,
        "size": size,
        "val_fraction": 0.01,
    }
    pack.pack_folder(resolve(config.PackConfig, settings), progress=False)


def _build(root: str | None, bench_set: str, images: int, folder: Path, size: int) -> Path:
    if root is not None:
        source = Path(root)
    elif bench_set == "photos":
        from photo_crops import write_photo_crops

        source = write_photo_crops(folder / "root", images)
    else:
        from cocoshard.config import SynthConfig
        from cocoshard.prepare.synth import write_synthetic

        source = folder / "root"
        write_synthetic(SynthConfig(out=str(source), train=images, test=0, seed=0, size=size))
    for pixel_format in ("jpeg", "raw"):
        _pack(source, folder / f"shards-{pixel_format}", pixel_format, size)
    return source


def _truth(shards: Path, root: Path) -> tuple[list[str], dict[str, np.ndarray]]:
    from cocoshard.loading.tario import read_samples
    from cocoshard.prepare.manifest import read_manifest, shard_urls, split_shards
    from cocoshard.prepare.sources import find_sources
    from cocoshard.pure.labels import multi_hot, parse_cls

    manifest = read_manifest(shards)
    urls, entries = shard_urls(shards, manifest, "train"), split_shards(manifest, "train")
    keys = [s.key for url, e in zip(urls, entries) for s in read_samples(url, e["sha256"], e["samples"])]
    labels_dir = find_sources(str(root)).train_labels
    return keys, {key: multi_hot(parse_cls((labels_dir / f"{key}.cls").read_bytes()).ids) for key in keys}


@pytest.fixture(scope="session")
def bench_data(request: pytest.FixtureRequest) -> BenchData:
    """The measured images: a challenge folder and its shards in both formats, built once and cached."""
    from cocoshard.pure.format import FORMAT_VERSION

    opts = request.config.option
    size = 224
    wanted = {
        "root": opts.bench_root,
        "set": opts.bench_set,
        "images": opts.bench_images,
        "size": size,
        "format": FORMAT_VERSION,
    }
    folder = CACHE / hashlib.sha1(json.dumps(wanted, sort_keys=True).encode()).hexdigest()[:12]
    marker = folder / COMPLETE
    if not (marker.is_file() and json.loads(marker.read_text()) == wanted):
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        _build(opts.bench_root, opts.bench_set, opts.bench_images, folder, size)
        marker.write_text(json.dumps(wanted))
    root = Path(opts.bench_root) if opts.bench_root else folder / "root"
    shards = {fmt: folder / f"shards-{fmt}" for fmt in ("jpeg", "raw")}
    keys, labels = _truth(shards["jpeg"], root)
    return BenchData(root, shards, keys, labels, folder / "peers")
