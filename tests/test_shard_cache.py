"""The node's shard cache (`cocoshard.shard_cache`): one download per node, nothing unverified admitted,
least recently used shards removed past the bound, shards at URLs read through it by the loaders."""

from __future__ import annotations

import hashlib
import multiprocessing
import time
from pathlib import Path

import pytest

from cocoshard.errors import UserError
from cocoshard.loading.loader import build_loader
from cocoshard.loading.spec import LoaderSpec
from cocoshard.loading.tario import BadShard, read_samples
from cocoshard.prepare.manifest import load_manifest
from cocoshard.remote import Network, NetworkError
from cocoshard.shard_cache import DownloadMismatch, Remote, ShardCache, fetch_shard
from conftest import ShardServer, epoch_keys, write_shards

FAST = Network(connect_timeout=2, stall_timeout=1, retries=1, backoff=0.01)


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def served(tmp_path: Path):
    shards = write_shards(tmp_path / "shards", {"train": [9, 7, 8], "val": [5]})
    with ShardServer(shards) as server:
        yield server


def test_a_shard_is_downloaded_once_and_then_mapped(served: ShardServer, tmp_path: Path) -> None:
    name = "train-000000.tar"
    data = (served.folder / name).read_bytes()
    remote = Remote(FAST, ShardCache(str(tmp_path / "cache")))
    first = fetch_shard(f"{served.url}/{name}", _digest(data), remote)
    again = fetch_shard(f"{served.url}/{name}", _digest(data), remote)
    assert bytes(first[0]) == bytes(again[0]) == data
    assert first[2] and not again[2]  # checked when downloaded; then a local file, checked by its reader
    assert served.gets[name] == 1 and (tmp_path / "cache" / f"{_digest(data)}.tar").is_file()


def test_a_tampered_download_is_refused_by_name_and_never_cached(served: ShardServer, tmp_path: Path) -> None:
    name = "train-000001.tar"
    expected = _digest((served.folder / name).read_bytes())
    (served.folder / name).write_bytes(b"x" * 512 + (served.folder / name).read_bytes()[512:])
    cache = ShardCache(str(tmp_path / "cache"))
    url = f"{served.url}/{name}"
    with pytest.raises(DownloadMismatch, match=rf"shard {url} as downloaded does not match the manifest"):
        fetch_shard(url, expected, Remote(FAST, cache))
    assert not list(Path(cache.folder).glob("*.tar")) and not list(Path(cache.folder).glob(".tmp-*"))
    with pytest.raises(BadShard, match=rf"shard {url} as downloaded does not match"):  # what loaders see
        read_samples(url, expected, 7, remote=Remote(FAST))


def test_least_recently_used_shards_leave_first(tmp_path: Path) -> None:
    cache = ShardCache(str(tmp_path / "cache"), max_bytes=2500)
    blobs = {name: bytes([i]) * 1000 for i, name in enumerate("abc")}
    for name in "ab":
        with cache.lock(_digest(blobs[name])):
            cache.admit(blobs[name], _digest(blobs[name]))
        time.sleep(0.01)
    assert cache.lookup(_digest(blobs["a"])) is not None  # "a" used after "b" was admitted
    with cache.lock(_digest(blobs["c"])):
        cache.admit(blobs["c"], _digest(blobs["c"]))
    held = {name for name, blob in blobs.items() if cache.path(_digest(blob)).is_file()}
    assert held == {"a", "c"} and cache.size() == 2000
    with pytest.raises(UserError, match="does not fit --cache .* give a larger --cache-size"):
        cache.admit(b"z" * 3000, _digest(b"z" * 3000))


def _fetch_in_process(url: str, sha256: str, folder: str, start: float) -> None:
    time.sleep(max(0.0, start - time.time()))  # all processes ask at the same moment
    data, _, _ = fetch_shard(url, sha256, Remote(FAST, ShardCache(folder)))
    assert _digest(bytes(data)) == sha256


def test_concurrent_processes_download_a_shard_once(served: ShardServer, tmp_path: Path) -> None:
    name = "train-000002.tar"
    served.faults[name] = "slow"  # the first download is still under way when the others ask
    sha256 = _digest((served.folder / name).read_bytes())
    start = time.time() + 0.5
    context = multiprocessing.get_context("fork")
    processes = [
        context.Process(
            target=_fetch_in_process, args=(f"{served.url}/{name}", sha256, str(tmp_path / "c"), start)
        )
        for _ in range(4)
    ]
    for process in processes:
        process.start()
    for process in processes:
        process.join(30)
    assert [p.exitcode for p in processes] == [0, 0, 0, 0]
    assert served.gets[name] == 1


def _spec(**overrides: object) -> LoaderSpec:
    settings: dict = {"batch_size": 4, "device": "cpu", "train": True, "workers": 2, **overrides}
    return LoaderSpec(**settings)


def test_a_loader_reads_each_shard_once_over_epochs_and_splits(served: ShardServer, tmp_path: Path) -> None:
    manifest = load_manifest(served.url, Remote(FAST, ShardCache(str(tmp_path / "cache"))))
    local = load_manifest(served.folder)
    for mode in ("stream", "resident"):
        with build_loader(manifest, "train", _spec(mode=mode)) as loader:
            with build_loader(local, "train", _spec(mode=mode)) as reference:
                for epoch in range(2):
                    assert epoch_keys(loader, epoch) == epoch_keys(reference, epoch)
        with build_loader(manifest, "val", _spec(train=False, mode=mode)) as loader:
            assert epoch_keys(loader) == epoch_keys(loader) == [f"k{i:06d}" for i in range(24, 29)]
    shards = [f"train-00000{i}.tar" for i in range(3)] + ["val-000000.tar"]
    assert {name: served.gets[name] for name in shards} == dict.fromkeys(shards, 1)


def test_without_a_cache_every_read_downloads_and_checks(served: ShardServer) -> None:
    manifest = load_manifest(served.url, Remote(FAST))
    with build_loader(manifest, "val", _spec(train=False, workers=0)) as loader:
        epoch_keys(loader)
        epoch_keys(loader)
    assert served.gets["val-000000.tar"] == 2


@pytest.mark.parametrize("fault", ["missing", "stall"])
def test_a_network_failure_is_never_skipped_as_a_bad_shard(served: ShardServer, fault: str) -> None:
    served.faults["train-000001.tar"] = fault
    manifest = load_manifest(served.url, Remote(Network(stall_timeout=0.5, retries=0)))
    with build_loader(manifest, "train", _spec(skip_bad_samples=True)) as loader:
        with pytest.raises(NetworkError, match=r"train-000001\.tar"):
            epoch_keys(loader)
