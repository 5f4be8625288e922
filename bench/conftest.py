"""Benchmarks: `pytest bench/ --benchmark [--bench-root PATH] [--bench-model NAME]`.

Without `--benchmark` every test here is skipped; plain `pytest` does not collect this folder
(`testpaths = ["tests"]`). The flag does not clash with pytest-benchmark's `--benchmark-*`
options: pytest matches option names exactly (no prefix abbreviations).

Data: `--bench-root` (a challenge-layout folder) or, by default, a generated set of
`--bench-images` images at the challenge's resolution; packed once in both pixel formats and cached
under bench/results/cache/. Results: a table at the end of the run and bench/results/latest.json.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import pytest
import torch

BENCH_DIR = Path(__file__).resolve().parent
RESULTS = BENCH_DIR / "results"
CACHE = RESULTS / "cache"
COMPLETE = "complete.json"
PIPELINE_ORDER = ("folder", "stream-jpeg", "stream-raw", "resident")


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("cocoshard benchmarks (bench/)")
    group.addoption("--benchmark", action="store_true", default=False, help="run the loader and training-step benchmarks in bench/")
    group.addoption("--bench-root", default=None, help="challenge-layout folder to measure on (default: a generated set)")
    group.addoption("--bench-model", default="resnet18", help="torchvision model of the training-step benchmark")
    group.addoption("--bench-images", type=int, default=4000, help="size of the generated set (without --bench-root)")
    group.addoption("--bench-batch-size", type=int, default=128, help="images per batch, the same for every pipeline")
    group.addoption("--bench-rounds", type=int, default=5, help="timed epochs per pipeline, after one warm-up epoch")
    group.addoption("--bench-size", type=int, default=224, help="training resolution")


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
    train_step: dict[str, Any] = field(default_factory=dict)
    load: dict[str, list[float]] = field(default_factory=dict)

    def note_load(self, when: str) -> None:
        self.load[when] = [round(x, 2) for x in os.getloadavg()]

    def to_json(self) -> dict[str, Any]:
        folder = self.pipelines.get("folder", {})
        pipelines = {}
        for name in sorted(self.pipelines, key=lambda n: PIPELINE_ORDER.index(n) if n in PIPELINE_ORDER else 99):
            entry = dict(self.pipelines[name])
            if folder:
                entry["ratio_to_folder"] = round(entry["images_per_s"] / folder["images_per_s"], 2)
                entry["cpu_ratio_to_folder"] = round(folder["cpu_us_per_image"] / entry["cpu_us_per_image"], 2)
            pipelines[name] = entry
        return {"machine": machine(), "device": device_name(), "settings": self.settings, "load_average": self.load,
                "pipelines": pipelines, "train_step": self.train_step}


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
    return {"cpu": cpu, "cores": cores(), "memory_gib": round(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30, 1),
            "python": platform.python_version(), "torch": torch.__version__, "PIL": pil_build().describe(), "platform": platform.platform()}


def cores() -> int:
    from cocoshard.machine import usable_cores

    return usable_cores()


def process_tree_cpu_seconds() -> float:
    """CPU time (user + system) of this process and its children (loader workers), so far.

    Read from /proc, so that workers still alive count; elsewhere only this process is counted.
    """
    import glob
    import resource

    proc = Path("/proc/self/stat")
    if not proc.exists():
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime
    tick = os.sysconf("SC_CLK_TCK")
    pids = ["self"]
    for listing in glob.glob("/proc/self/task/*/children"):
        try:
            pids += Path(listing).read_text().split()
        except OSError:
            continue
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # a worker that just exited
        total += (int(fields[11]) + int(fields[12])) / tick
    return total


def bench_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def device_name() -> str:
    device = bench_device()
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({cores()} cores, no GPU)"


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    found: Optional[BenchReport] = config.stash.get(_REPORT_KEY, None)
    if found is None or not (found.pipelines or found.train_step):
        return
    found.note_load("end")
    data = found.to_json()
    from cocoshard.atomic import atomic_write_text

    RESULTS.mkdir(parents=True, exist_ok=True)
    atomic_write_text(RESULTS / "latest.json", json.dumps(data, indent=2) + "\n")
    write = terminalreporter.write_line
    terminalreporter.section("cocoshard benchmark")
    write(f"device: {data['device']}; batch {found.settings.get('batch_size')}, {found.settings.get('workers')} workers, "
          f"{found.settings.get('size')} px, {found.settings.get('images')} images; load average {found.load}")
    if data["pipelines"]:
        write(f"{'pipeline':<14}{'images/s':>10}{'min':>9}{'max':>9}{'x folder':>10}{'CPU us/img':>12}{'x folder':>10}")
        for name, entry in data["pipelines"].items():
            write(f"{name:<14}{entry['images_per_s']:>10.0f}{min(entry['rounds']):>9.0f}{max(entry['rounds']):>9.0f}"
                  f"{entry.get('ratio_to_folder', float('nan')):>10.2f}{entry['cpu_us_per_image']:>12.0f}"
                  f"{entry.get('cpu_ratio_to_folder', float('nan')):>10.2f}")
    for name, entry in data["train_step"].items():
        if isinstance(entry, dict) and "images_per_s" in entry:
            write(f"train step {name:<28}{entry['images_per_s']:>10.1f} images/s")
    write(f"written to {RESULTS / 'latest.json'}")


# ------------------------------------------------------------------------------------ data


@dataclass
class BenchData:
    root: Path
    shards: dict[str, Path]  # pixel format -> packed folder


def _cache_key(root: Optional[str], images: int, size: int) -> str:
    if root is None:
        return f"synth-{images}-{size}"
    digest = hashlib.sha1(str(Path(root).resolve()).encode()).hexdigest()[:12]
    return f"root-{digest}-{size}"


def _pack(root: Path, out: Path, pixel_format: str, size: int) -> None:
    from cocoshard import config
    from cocoshard.prepare import pack

    settings = {"root": str(root), "out": str(out), "format": pixel_format, "size": size, "val_fraction": 0.01,
                "workers": cores()}
    pack.pack_folder(config.resolve(config.PackConfig, settings), progress=False)


@pytest.fixture(scope="session")
def bench_data(request: pytest.FixtureRequest) -> BenchData:
    """The measured images: a challenge folder and its shards in both formats, built once and cached."""
    opts = request.config.option
    size = 224
    folder = CACHE / _cache_key(opts.bench_root, opts.bench_images, size)
    marker = folder / COMPLETE
    wanted = {"root": opts.bench_root, "images": opts.bench_images, "size": size, "format": 1}
    if not (marker.is_file() and json.loads(marker.read_text()) == wanted):
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        root = Path(opts.bench_root) if opts.bench_root else folder / "root"
        if opts.bench_root is None:
            from cocoshard.config import SynthConfig
            from cocoshard.prepare.synth import write_synthetic

            write_synthetic(SynthConfig(out=str(root), train=opts.bench_images, test=0, seed=0, size=size, workers=cores()))
        for pixel_format in ("jpeg", "raw"):
            _pack(root, folder / f"shards-{pixel_format}", pixel_format, size)
        marker.write_text(json.dumps(wanted))
    root = Path(opts.bench_root) if opts.bench_root else folder / "root"
    return BenchData(root, {fmt: folder / f"shards-{fmt}" for fmt in ("jpeg", "raw")})
