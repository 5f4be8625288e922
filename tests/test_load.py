"""Load: the challenge's size, 65,000 labelled and 4,952 test images at 224 px, packed and streamed for
one epoch on a 2-core machine, with the peak memory of each whole process tree measured.

    $ python -m pytest tests/test_load.py -s        # prints the figures

The same runs at a tenth of the size show that memory does not grow with the data set. Images:
`write_synthetic` draws DISTINCT images (~10 ms each on a busy 2-core CPU: drawing all 65,000 would
take longer than everything else here) and each is hard-linked under ~33 keys of the challenge
layout, with its labels. Pack and loader open, decode and write every key's file on its own, so
their work and memory are those of 65,000 files. Raw shards are left out: 10 GB of disk and minutes
of writing for the same code path the module tests cover on small sets.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from cocoshard.config import SynthConfig
from cocoshard.errors import UserError
from cocoshard.loading.loader import build_loader
from cocoshard.loading.spec import LoaderSpec
from cocoshard.prepare.synth import (
    TEST_IMAGES,
    TRAIN_IMAGES,
    TRAIN_LABELS,
    write_synthetic,
)

pytestmark = pytest.mark.slow

TRAIN_IMAGES_FULL, TEST_IMAGES_FULL = 65_000, 4_952
SCALE_DOWN = 10
ADDED_IMAGES = (TRAIN_IMAGES_FULL + TEST_IMAGES_FULL) * (SCALE_DOWN - 1) // SCALE_DOWN
DISTINCT = 2_000
GiB, MiB = 2**30, 2**20
PACK_BOUND = 1 * GiB  # the whole pack (parent + 2 workers); the 65,000 images decoded would be 9.8 GB
EPOCH_BOUND = 2 * GiB  # the loader process and its 2 workers, shared-memory batches included
GROWTH_PER_IMAGE = 4 * 1024  # bytes a run may grow by per added image; one decoded image is 147 KiB
RESIDENT_LIMIT = 4 * GiB
PAGE = os.sysconf("SC_PAGE_SIZE")
EPOCH_SCRIPT = """
import json, sys, time
from cocoshard.loading.loader import build_loader
from cocoshard.loading.spec import LoaderSpec
started = time.perf_counter()
loader = build_loader(sys.argv[1], "train", LoaderSpec(batch_size=256, device="cpu", train=True, workers=2))
keys = [key for batch in loader for key in batch.keys]
loader.close()
seconds = time.perf_counter() - started
print(json.dumps({"batches": len(loader), "keys": len(keys), "unique": len(set(keys)), "seconds": seconds}))
"""


# ----------------------------------------------------------------------------------- measuring


def _field(path: str, name: str) -> int:
    """A `Name:   N kB` line of a /proc file, in bytes."""
    with open(path) as handle:
        for line in handle:
            if line.startswith(name):
                return int(line.split()[1]) * 1024
    return 0


def session_memory(session: int) -> tuple[int, int]:
    """(sum of PSS, largest VmHWM) over the processes of a session, in bytes.

    PSS shares each page among the processes that map it, so forked workers do not count the
    parent's copy-on-write pages again; VmHWM is each process's own peak RSS since it started."""
    pss = hwm = 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            fields = Path(entry.path, "stat").read_text().rsplit(")", 1)[1].split()
            if int(fields[3]) != session:  # from the state on: state ppid pgrp session
                continue
            pss += _field(f"{entry.path}/smaps_rollup", "Pss:")
            hwm = max(hwm, _field(f"{entry.path}/status", "VmHWM:"))
        except (OSError, IndexError, ValueError):  # the process ended meanwhile
            continue
    return pss, hwm


def own_rss() -> int:
    """This process's resident set size, in bytes."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * PAGE


@dataclass
class Measured:
    seconds: float
    tree_peak: int  # the largest sum of PSS over the process tree, sampled every 50 ms
    process_peak: int  # the largest peak RSS (VmHWM) of any one process of the tree
    stdout: str

    def line(self, what: str) -> str:
        return (
            f"{what}: {self.seconds:.0f} s, peak {self.tree_peak / MiB:,.0f} MiB (PSS) for the whole process "
            f"tree, {self.process_peak / MiB:,.0f} MiB (peak RSS) for its largest process"
        )


def measure(command: list[str], folder: Path, timeout: float = 600) -> Measured:
    """Run `command` in a session of its own; its time, and its tree's peak memory while it runs.

    The kernel's ru_maxrss would not do: a child forked from this (large) test process and then
    exec'ed inherits the parent's size as its starting maximum."""
    out, err = folder / "stdout.txt", folder / "stderr.txt"
    started = time.perf_counter()
    with open(out, "w") as stdout, open(err, "w") as stderr:
        process = subprocess.Popen(command, start_new_session=True, stdout=stdout, stderr=stderr)
    peaks, done = [0, 0], threading.Event()

    def sample() -> None:
        while not done.wait(0.05):
            pss, hwm = session_memory(process.pid)
            peaks[:] = max(peaks[0], pss), max(peaks[1], hwm)
            if time.perf_counter() - started > timeout:
                os.killpg(process.pid, signal.SIGKILL)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    code = process.wait()
    done.set()
    sampler.join()
    assert code == 0, f"{command[3:5]} failed ({code}): {err.read_text()[-3000:]}"
    return Measured(time.perf_counter() - started, peaks[0], peaks[1], out.read_text())


# ----------------------------------------------------------------------------------- the data


def challenge_layout(drawn: Path, root: Path, train: int, test: int) -> Path:
    """`train` labelled and `test` unlabelled keys in the challenge layout, hard links to the drawn images."""
    images, labels = sorted((drawn / TRAIN_IMAGES).glob("*.jpg")), drawn / TRAIN_LABELS
    for folder in (TRAIN_IMAGES, TRAIN_LABELS, TEST_IMAGES):
        (root / folder).mkdir(parents=True)
    for index in range(train):
        source, key = images[index % len(images)], f"{index + 1:012d}"
        os.link(source, root / TRAIN_IMAGES / f"{key}.jpg")
        os.link(labels / f"{source.stem}.cls", root / TRAIN_LABELS / f"{key}.cls")
    for index in range(test):
        os.link(images[index % len(images)], root / TEST_IMAGES / f"{1_000_000_000 + index:012d}.jpg")
    return root


@pytest.fixture(scope="module")
def workspace():
    """A temporary folder for everything this module generates, removed at the end."""
    folder = Path(tempfile.mkdtemp(prefix="cocoshard-load-"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def packed(workspace: Path) -> dict[str, tuple[Path, Measured]]:
    """The challenge-sized set and one ten times smaller, each packed (jpeg) by `cocoshard pack`, measured."""
    started = time.perf_counter()
    drawn = workspace / "drawn"
    write_synthetic(
        SynthConfig(out=str(drawn), train=DISTINCT, test=0, seed=0, workers=2, clutter=0.0, quality=85)
    )
    print(f"\ndrew {DISTINCT} images in {time.perf_counter() - started:.0f} s")
    result = {}
    for name, scale in (("tenth", SCALE_DOWN), ("full", 1)):
        root = challenge_layout(
            drawn, workspace / name / "ms-coco", TRAIN_IMAGES_FULL // scale, TEST_IMAGES_FULL // scale
        )
        shards = workspace / name / "shards"
        command = [
            sys.executable,
            "-m",
            "cocoshard",
            "pack",
            "--root",
            str(root),
            "--out",
            str(shards),
            "--workers",
            "2",
        ]
        result[name] = (shards, measure(command, workspace / name))
        print(
            result[name][1].line(
                f"pack, {name} ({TRAIN_IMAGES_FULL // scale:,} + {TEST_IMAGES_FULL // scale:,} images)"
            )
        )
    return result


# ----------------------------------------------------------------------------------- the tests


def test_pack_at_challenge_size_has_bounded_memory(packed) -> None:
    shards, full = packed["full"]
    manifest = json.loads((shards / "manifest.json").read_text())
    splits = manifest["splits"]
    assert splits["train"]["samples"] + splits["val"]["samples"] == TRAIN_IMAGES_FULL
    assert splits["test"]["samples"] == TEST_IMAGES_FULL and not manifest["rejected"]
    assert full.tree_peak < PACK_BOUND and full.process_peak < PACK_BOUND, full.line("pack")
    assert full.tree_peak - packed["tenth"][1].tree_peak < ADDED_IMAGES * GROWTH_PER_IMAGE, (
        "pack holds image data"
    )


def test_a_stream_epoch_at_challenge_size_has_bounded_memory(packed, workspace) -> None:
    figures = {}
    for name in ("tenth", "full"):
        shards, _ = packed[name]
        figures[name] = measure([sys.executable, "-c", EPOCH_SCRIPT, str(shards)], shards.parent)
        print(figures[name].line(f"one stream epoch of the train split, {name}, 2 workers, batches of 256"))
    epoch = json.loads(figures["full"].stdout)
    train_samples = json.loads((packed["full"][0] / "manifest.json").read_text())["splits"]["train"][
        "samples"
    ]
    assert epoch["keys"] == epoch["unique"] == epoch["batches"] * 256 > train_samples - 256
    full = figures["full"]
    assert full.tree_peak < EPOCH_BOUND and full.process_peak < EPOCH_BOUND, full.line("epoch")
    assert full.tree_peak - figures["tenth"].tree_peak < ADDED_IMAGES * GROWTH_PER_IMAGE, (
        "the loader holds image data"
    )


def test_resident_mode_refuses_a_split_beyond_its_memory_limit_before_allocating(packed) -> None:
    shards, _ = packed["full"]
    before, started = own_rss(), time.perf_counter()
    with pytest.raises(
        UserError,
        match=r"resident mode needs 7\.\d GiB for the 5\d,?\d{3} images of split 'train' .* "
        r"the memory limit is 4\.0 GiB: use the stream loader",
    ):
        spec = LoaderSpec(
            batch_size=256, device="cpu", mode="resident", train=True, memory_limit=RESIDENT_LIMIT
        )
        build_loader(shards, "train", spec)
    assert time.perf_counter() - started < 10
    assert own_rss() - before < 256 * MiB
