"""Training from object storage as a user runs it: shards on a local S3-compatible server (moto) or
a local HTTP server that stalls, each started and stopped by the test; the CLI in subprocesses.

The promise (docs/scale-out.md): with `--cache` a node downloads each shard once, whatever its
ranks, workers and epochs; a download that does not match the manifest is refused by name; a
server that stops answering ends the run within its stall timeout with a network message."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cocoshard.prepare.manifest import MANIFEST
from conftest import FROM_SCRATCH, TINY, ShardServer, cocoshard, records, refused

pytestmark = pytest.mark.slow


def _s3(tmp_path: Path):
    pytest.importorskip("s3fs", reason="the test extra brings s3fs")
    pytest.importorskip("moto", reason="the test extra brings moto")
    from conftest import S3Server

    return S3Server()


def _names(shards: Path, split: str) -> list[str]:
    manifest = json.loads((shards / MANIFEST).read_text())
    return [entry["name"] for entry in manifest["splits"][split]["shards"]]


def test_two_ranks_with_a_cache_download_each_shard_once(sample_shards_jpeg: Path, tmp_path: Path) -> None:
    with _s3(tmp_path) as s3:
        url = s3.upload(sample_shards_jpeg, "node-cache/shards")
        command = [
            sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            "-m", "cocoshard", "train", "--shards", url, "--cache", str(tmp_path / "cache"),
            "--out", str(tmp_path / "run"), *TINY, *FROM_SCRATCH, "--batch-size", "8",
            "--epochs", "2", "--workers", "1", "--threads", "1",
        ]  # fmt: skip
        done = subprocess.run(
            command,
            capture_output=True,
            text=True,
            timeout=420,
            env={**os.environ, **s3.env, "COLUMNS": "200"},
        )
        assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
        read = {
            name: s3.gets(name) for split in ("train", "val") for name in _names(sample_shards_jpeg, split)
        }
        test_reads = [s3.gets(name) for name in _names(sample_shards_jpeg, "test")]
    # 2 ranks x 2 epochs x (train + val twice: raw and EMA) + the overlap check, and one GET each
    assert read == dict.fromkeys(read, 1) and test_reads == [0] * len(test_reads)
    assert len(list((tmp_path / "cache").glob("*.tar"))) == len(read)
    manifest = json.loads((sample_shards_jpeg / MANIFEST).read_text())
    assert all(
        r["val"]["model"]["images"] == manifest["splits"]["val"]["samples"] for r in records(tmp_path / "run")
    )


def test_a_tampered_download_is_refused_by_name(sample_shards_jpeg: Path, tmp_path: Path) -> None:
    victim = _names(sample_shards_jpeg, "val")[1]
    with _s3(tmp_path) as s3:
        url = s3.upload(sample_shards_jpeg, "tampered/shards")
        data = bytearray((sample_shards_jpeg / victim).read_bytes())
        data[len(data) // 2] ^= 1  # one bit, inside a JPEG
        s3.client().put_object(Bucket="tampered", Key=f"shards/{victim}", Body=bytes(data))
        done = cocoshard(
            "train", "--shards", url, "--cache", tmp_path / "cache", "--out", tmp_path / "run",
            *TINY, *FROM_SCRATCH, "--epochs", "1", "--retries", "0", **s3.env,
        )  # fmt: skip
    refused(done, f"shard {url}/{victim} as downloaded does not match the manifest")
    assert "network" not in done.text
    kept = {path.name for path in (tmp_path / "cache").glob("*.tar")}
    manifest = json.loads((sample_shards_jpeg / MANIFEST).read_text())
    sha = {e["name"]: e["sha256"] for split in manifest["splits"].values() for e in split["shards"]}
    assert f"{sha[victim]}.tar" not in kept and not (tmp_path / "run" / "last.pt").exists()


def test_a_stalled_server_ends_the_run_with_a_network_message(
    sample_shards_jpeg: Path, tmp_path: Path
) -> None:
    victim = _names(sample_shards_jpeg, "train")[2]
    with ShardServer(sample_shards_jpeg) as server:
        server.faults[victim] = "stall"
        done = cocoshard(
            "train", "--shards", server.url, "--out", tmp_path / "run", *TINY, *FROM_SCRATCH,
            "--epochs", "1", "--stall-timeout", "1", "--retries", "1", timeout=120,
        )  # fmt: skip
        tries = server.gets[victim]
    refused(
        done,
        f"network failure reading {server.url}/{victim}: no data for 1 s (stall timeout)",
        "tried 2 times: the first try and 1 retry",
    )
    assert tries == 2 and "corrupted" not in done.text and "--verify" not in done.text
