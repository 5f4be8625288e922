"""Shared fixtures: the real COCO sample, a small generated data set, and both packed in each format.

Session-scoped, so a data set is drawn or packed once per test run. Shard folders are read-only
by convention: a test that changes files packs its own copy with `pack_dir`.

    sample_shards_jpeg / sample_shards_raw   coco-sample packed: 88 train, 38 val, 32 test
    synth_shards_jpeg / synth_shards_raw     synth_root packed: ~235 train, ~65 val, 40 test
    sample_folds_jpeg / synth_folds_raw      the same packed into 3 folds (pack --folds 3): 42 and 100
                                             labelled images a fold, 32 and 40 test
Both use small shards (16 and 32 samples) so that splitting shards over ranks and workers is
exercised; raw canvases are 224 x 224. (On a set as small as coco-sample, keeping every class of two
or more images in both splits pulls the val share above 0.2.)
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from cocoshard.prepare.manifest import MANIFEST
from cocoshard.pure.format import FORMAT_VERSION, encode_labels, encode_pixels, shard_name

REPO = Path(__file__).resolve().parents[1]
# Real COCO photos kept in the repository (tests/data/coco-sample/README.md: source and licence);
# COCOSHARD_SAMPLE=PATH points the suite at another folder of the same layout.
COCO_SAMPLE = Path(os.environ.get("COCOSHARD_SAMPLE", REPO / "tests" / "data" / "coco-sample"))

CANVAS = 32  # the side of generated shards' canvases (`write_shards`)
SYNTH_TRAIN = 300
SYNTH_TEST = 40
SAMPLE_SHARD_SAMPLES = 16
SYNTH_SHARD_SAMPLES = 32

PackDir = Callable[..., Path]

# ----------------------------------------------------------------------------- the CUDA tier


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked `cuda` need a CUDA device: without one they are skipped, with the reason, so that
    plain `pytest` passes on a CPU; `pytest -m cuda` selects only them (tools/device-check runs them)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(
        reason=f"needs a CUDA device: torch {torch.__version__} (CUDA build {torch.version.cuda or 'none'}) "
        "sees none"
    )
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


# ----------------------------------------------------------------------------- running cocoshard
# Shared by the tests that drive the CLI as a user does: `from conftest import TINY, cocoshard, ...`.

# The smallest training a test needs: a tiny model at 64 px on the CPU, in this process.
TINY = (
    "--model", "cocoshard_tiny", "--device", "cpu", "--size", "64", "--batch-size", "16",
    "--workers", "0", "--log-every", "2",
)  # fmt: skip
FROM_SCRATCH = ("--weights", "none")  # no download: the build machines are offline


@dataclass
class Done:
    """What a command did: its exit status and its stdout + stderr, whitespace folded (rich wraps
    long lines, even inside a path)."""

    code: int
    text: str


def cocoshard(*args: object, timeout: float = 240, script: str | None = None, **env: str) -> Done:
    """`python -m cocoshard ARGS` (or `python SCRIPT ARGS`) in a subprocess, as a user runs it; a
    hang fails the test at `timeout` instead of stalling CI."""
    command = [sys.executable, script] if script else [sys.executable, "-m", "cocoshard"]
    done = subprocess.run(
        [*command, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        env={**os.environ, "COLUMNS": "1000", **env},
    )
    return Done(done.returncode, " ".join((done.stdout + done.stderr).split()))


def ok(done: Done) -> str:
    """The text of a command that succeeded."""
    assert done.code == 0, done.text[-3000:]
    return done.text


def refused(done: Done, *expected: str) -> None:
    """A non-zero exit with a message holding every `expected` part, and no traceback."""
    assert done.code != 0, done.text[-2000:]
    assert "Traceback" not in done.text, done.text[-3000:]
    for part in expected:
        assert part in done.text, done.text[-2000:]


def records(run: Path) -> list[dict[str, Any]]:
    """A run's metrics.jsonl, one dict per epoch."""
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _pack(root: str | os.PathLike, out: str | os.PathLike, **overrides: Any) -> Path:
    from cocoshard import config
    from cocoshard.prepare import pack
    from cocoshard.settings import resolve

    settings = {"root": str(root), "out": str(out), "workers": 2, **overrides}
    cfg = resolve(config.PackConfig, settings)
    pack.pack_folder(cfg, progress=False)
    return Path(out)


@pytest.fixture(scope="session")
def coco_sample() -> Path:
    """Real COCO photos in the challenge layout (read-only)."""
    if not (COCO_SAMPLE / "images").is_dir():
        pytest.fail(f"the real COCO sample is missing at {COCO_SAMPLE} (set COCOSHARD_SAMPLE)")
    return COCO_SAMPLE


@pytest.fixture(scope="session")
def pack_dir() -> PackDir:
    """`pack_dir(root, out, **overrides) -> out`: run `cocoshard pack` in-process (2 workers, no progress
    bar); overrides are PackConfig fields (format="raw", shard_samples=8, seed=1, strict=True, ...)."""
    return _pack


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A generated data set in the challenge layout: 300 labelled train and 40 test images, seed 0."""
    from cocoshard.config import SynthConfig
    from cocoshard.prepare.synth import write_synthetic

    root = tmp_path_factory.mktemp("synth")
    write_synthetic(SynthConfig(out=str(root), train=SYNTH_TRAIN, test=SYNTH_TEST, seed=0, workers=2))
    return root


@pytest.fixture(scope="session")
def sample_shards_jpeg(coco_sample: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """coco-sample packed with source JPEG bytes, 16 samples per shard."""
    return _pack(coco_sample, tmp_path_factory.mktemp("sample-jpeg"), shard_samples=SAMPLE_SHARD_SAMPLES)


@pytest.fixture(scope="session")
def sample_shards_raw(coco_sample: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """coco-sample packed as raw 224 x 224 canvases, 16 samples per shard."""
    out = tmp_path_factory.mktemp("sample-raw")
    return _pack(coco_sample, out, format="raw", shard_samples=SAMPLE_SHARD_SAMPLES)


@pytest.fixture(scope="session")
def synth_shards_jpeg(synth_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The generated set packed with source JPEG bytes, 32 samples per shard."""
    return _pack(synth_root, tmp_path_factory.mktemp("synth-jpeg"), shard_samples=SYNTH_SHARD_SAMPLES)


@pytest.fixture(scope="session")
def synth_shards_raw(synth_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The generated set packed as raw 224 x 224 canvases, 32 samples per shard."""
    out = tmp_path_factory.mktemp("synth-raw")
    return _pack(synth_root, out, format="raw", shard_samples=SYNTH_SHARD_SAMPLES)


@pytest.fixture(scope="session")
def sample_folds_jpeg(coco_sample: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """coco-sample packed into 3 stratified folds (fold0-2), source JPEG bytes, 16 samples per shard."""
    out = tmp_path_factory.mktemp("sample-folds")
    return _pack(coco_sample, out, folds=3, shard_samples=SAMPLE_SHARD_SAMPLES)


@pytest.fixture(scope="session")
def synth_folds_raw(synth_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The generated set packed into 3 stratified folds, raw 224 x 224 canvases, 32 samples per shard."""
    out = tmp_path_factory.mktemp("synth-folds")
    return _pack(synth_root, out, folds=3, format="raw", shard_samples=SYNTH_SHARD_SAMPLES)


# ----------------------------------------------------------------------------- the statement's metric


def statement_validation_loop(
    outputs: np.ndarray, labels: np.ndarray, threshold: float = 0.5, batch: int = 7
) -> dict:
    """The statement's `validation_loop(multi_task=True, one_hot=True, class_metrics=True)`,
    re-implemented on precomputed outputs: same batching, same accumulation, same zero conventions."""
    num_classes = outputs.shape[1]
    class_total = {c: 0 for c in range(num_classes)}
    class_tp = {c: 0 for c in range(num_classes)}
    class_fp = {c: 0 for c in range(num_classes)}
    for start in range(0, len(outputs), batch):
        out = torch.tensor(outputs[start : start + batch], dtype=torch.float64)
        lab = torch.tensor(labels[start : start + batch], dtype=torch.float64)
        predictions = torch.where(out > threshold, 1.0, 0.0).double()
        tps = predictions * lab
        fps = predictions - tps
        tps, fps, lbls = tps.sum(dim=0), fps.sum(dim=0), lab.sum(dim=0)
        for c in range(num_classes):
            class_tp[c] += tps[c]
            class_fp[c] += fps[c]
            class_total[c] += lbls[c]
    class_prec, class_recall, freqs = [], [], []
    for c in range(num_classes):
        class_prec.append(0 if class_tp[c] == 0 else class_tp[c] / (class_tp[c] + class_fp[c]))
        class_recall.append(0 if class_tp[c] == 0 else class_tp[c] / class_total[c])
        freqs.append(class_total[c])
    freqs = torch.tensor(freqs, dtype=torch.float64)
    weights = 1.0 / freqs
    weights /= weights.sum()
    prec = (torch.tensor(class_prec, dtype=torch.float64) * weights).sum()
    recall = (torch.tensor(class_recall, dtype=torch.float64) * weights).sum()
    with np.errstate(divide="ignore"):
        f1 = 2.0 / (1 / prec + 1 / recall)
    class_f1 = [0 if p == r == 0 else 2.0 / (1 / p + 1 / r) for p, r in zip(class_prec, class_recall)]
    return {
        "f1": float(f1),
        "precision": float(prec),
        "recall": float(recall),
        "class_f1": np.array(class_f1, float),
    }


def random_problem(seed: int, images: int = 200, classes: int = 80) -> tuple[np.ndarray, np.ndarray]:
    """Scores and long-tailed labels for `images` x `classes`: informative, miscalibrated for 0.5."""
    rng = np.random.default_rng(seed)
    frequency = np.geomspace(0.5, 5.0 / images, classes)
    labels = rng.random((images, classes)) < frequency
    labels[np.arange(images), rng.integers(0, classes, images)] = True  # every image has a label
    logits = rng.normal(size=(images, classes)) + 2.5 * labels - 1.5
    return 1.0 / (1.0 + np.exp(-logits)), labels


# ----------------------------------------------------------------------------- generated shards


def tar_member(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    """Add a member to a tar being written."""
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    tar.addfile(info, io.BytesIO(payload))


def labels_of(index: int) -> bytes:
    """The 80 label bytes of generated sample `index`: two classes on."""
    row = np.zeros(80, np.uint8)
    row[[index % 80, (index * 7) % 80]] = 1
    return row.tobytes()


def hw(index: int, size: int = CANVAS) -> tuple[int, int]:
    """The (h, w) of generated sample `index`."""
    return size - index % 5, size - index % 3


def write_shards(folder: Path, counts: dict[str, list[int]], size: int = CANVAS) -> Path:
    """Raw shards with the given samples per shard; sample i is (size - i % 5) x (size - i % 3)
    pixels, all equal to i % 251."""
    folder.mkdir(parents=True, exist_ok=True)
    splits, index = {}, 0
    for split, per_shard in counts.items():
        entries = []
        for number, count in enumerate(per_shard):
            buffer = io.BytesIO()
            with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
                for _ in range(count):
                    key = f"k{index:06d}"
                    pixels = np.full((*hw(index, size), 3), index % 251, np.uint8)
                    tar_member(tar, f"{key}.pixels.npy", encode_pixels(pixels))
                    if split != "test":
                        tar_member(
                            tar, f"{key}.labels.npy", encode_labels(np.frombuffer(labels_of(index), np.uint8))
                        )
                    index += 1
            data = buffer.getvalue()
            (folder / shard_name(split, number)).write_bytes(data)
            entries.append(
                {
                    "name": shard_name(split, number),
                    "samples": count,
                    "bytes": len(data),
                    "sha256": hashlib.sha256(data).hexdigest(),
                }
            )
        splits[split] = {"samples": sum(per_shard), "shards": entries, "class_counts": [0] * 80}
    for split in ("train", "val", "test"):
        splits.setdefault(split, {"samples": 0, "shards": [], "class_counts": [0] * 80})
    manifest = {
        "format_version": FORMAT_VERSION,
        "pixel_format": "raw",
        "size": size,
        "splits": splits,
        "classes": [f"class {i}" for i in range(80)],
        "rejected": [],
    }
    (folder / MANIFEST).write_text(json.dumps(manifest))
    return folder


def epoch_keys(loader: Any, epoch: int = 0) -> list[str]:
    """The keys a loader yields in `epoch`, in order."""
    loader.set_epoch(epoch)
    return [key for batch in loader for key in batch.keys]


def rewrite_with_bad_jpeg(src: Path, dst: Path, victim: str, split: str = "val") -> None:
    """Copy a jpeg shard folder, truncating one sample's JPEG and re-hashing so only decoding fails."""
    shutil.copytree(src, dst)
    manifest = json.loads((dst / MANIFEST).read_text())
    for entry in manifest["splits"][split]["shards"]:
        path = dst / entry["name"]
        out = io.BytesIO()
        with (
            tarfile.open(path) as tar_in,
            tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar_out,
        ):
            for member in tar_in:
                payload = tar_in.extractfile(member).read()
                if member.name == f"{victim}.jpg":
                    payload = payload[: len(payload) // 3]
                tar_member(tar_out, member.name, payload)
        path.write_bytes(out.getvalue())
        entry["sha256"], entry["bytes"] = hashlib.sha256(out.getvalue()).hexdigest(), len(out.getvalue())
    (dst / MANIFEST).write_text(json.dumps(manifest))


# ----------------------------------------------------------------------------- servers of shards
# Shards at URLs, served on 127.0.0.1 by the test's own process and stopped with it.


class ShardServer:
    """A local HTTP server of a folder, with faults by file name, that counts the GETs of each file.

        with ShardServer(folder) as server:
            server.faults["train-000001.tar"] = "stall"     # or truncate, missing, fail-2, slow
            read_url(server.url + "/train-000001.tar", ...)
            server.gets["train-000001.tar"]

    Faults: `missing` answers 404; `fail-N` answers 503 to the first N GETs; `truncate` sends half of
    the body it announces, then closes; `stall` sends half and then nothing until the server stops;
    `slow` waits 0.3 s before answering (so that concurrent readers overlap)."""

    def __init__(self, folder: Path) -> None:
        import threading
        from collections import Counter
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.folder, self.faults, self.gets = folder, {}, Counter()
        self.stopping = threading.Event()
        lock, outer = threading.Lock(), self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                name = self.path.lstrip("/")
                with lock:
                    outer.gets[name] += 1
                    count = outer.gets[name]
                fault = outer.faults.get(name, "")
                path = outer.folder / name
                if fault == "missing" or not path.is_file():
                    self.send_error(404)
                    return
                if fault.startswith("fail-") and count <= int(fault[5:]):
                    self.send_error(503)
                    return
                if fault == "slow":
                    outer.stopping.wait(0.3)
                data = path.read_bytes()
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if fault in ("stall", "truncate"):
                    self.wfile.write(data[: len(data) // 2])
                    self.wfile.flush()
                    if fault == "stall":
                        outer.stopping.wait(60)
                    self.close_connection = True
                    return
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> ShardServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()
        self.server.shutdown()
        self.server.server_close()


class S3Server:
    """An S3-compatible server (moto's) on 127.0.0.1 that records every request it answers.

    with S3Server() as s3:
        s3.upload(shards, "bucket/shards")          # then s3://bucket/shards holds them
        cocoshard("train", "--shards", "s3://bucket/shards", ..., **s3.env)
        s3.gets("train-000000.tar")"""

    def __init__(self) -> None:
        import threading

        from moto.moto_server.werkzeug_app import (
            DomainDispatcherApplication,
            MotoRequestHandler,
            create_backend_app,
        )
        from werkzeug.serving import make_server

        app = DomainDispatcherApplication(create_backend_app)
        self.requests: list[tuple[str, str]] = []

        def recording(environ: dict, start_response: Any) -> Any:
            self.requests.append((environ["REQUEST_METHOD"], environ["PATH_INFO"]))
            return app(environ, start_response)

        class Quiet(MotoRequestHandler):
            def log_request(self, *args: Any) -> None:
                pass

        self.server = make_server("127.0.0.1", 0, recording, threaded=True, request_handler=Quiet)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        host, port = self.server.server_address[:2]
        self.env = {
            "AWS_ENDPOINT_URL": f"http://{host}:{port}",
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def client(self) -> Any:
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.env["AWS_ENDPOINT_URL"],
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
            region_name="us-east-1",
        )

    def upload(self, folder: Path, where: str) -> str:
        """Every file of `folder` under `bucket/prefix` (the bucket made); returns the s3:// URL."""
        bucket, _, prefix = where.partition("/")
        client = self.client()
        client.create_bucket(Bucket=bucket)
        for path in sorted(folder.iterdir()):
            if path.is_file():
                client.put_object(Bucket=bucket, Key=f"{prefix}/{path.name}", Body=path.read_bytes())
        return f"s3://{where}"

    def gets(self, name: str) -> int:
        """GET requests for objects whose key ends with /name."""
        return sum(1 for method, path in self.requests if method == "GET" and path.endswith("/" + name))

    def __enter__(self) -> S3Server:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def coco_like_labels(rng: np.random.Generator, images: int = 65_000) -> np.ndarray:
    """A (images, 80) label matrix shaped like the challenge's: person in 35,494 of 65k images, a
    log-linear tail from ~9,000 down to 102 images (hair drier), ~2.93 labels per image."""
    counts = np.concatenate([[35_494], np.geomspace(9_000, 102, 79)]) * images / 65_000
    labels = rng.random((images, 80)) < counts / images
    empty = np.flatnonzero(~labels.any(axis=1))
    labels[empty, rng.choice(80, size=len(empty), p=counts / counts.sum())] = True  # every image has a class
    return labels
