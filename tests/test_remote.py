"""The opener of URLs (`cocoshard.remote`): every scheme, bounded waits, retries, failures named as such.

Servers run on 127.0.0.1 in this process (`ShardServer`, `S3Server` in conftest) and stop with the
test; waits are short (a stall timeout of 0.5 s) so the faults cost little time.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from cocoshard.errors import UserError
from cocoshard.prepare.manifest import MANIFEST, BadManifest, load_manifest, read_manifest
from cocoshard.remote import Network, NetworkError, is_url, join_location, read_url
from conftest import ShardServer, write_shards

FAST = Network(connect_timeout=2, stall_timeout=0.5, retries=2, backoff=0.01)


@pytest.fixture
def served(tmp_path: Path):
    folder = tmp_path / "files"
    folder.mkdir()
    (folder / "a.bin").write_bytes(bytes(range(256)) * 4096)  # 1 MiB
    with ShardServer(folder) as server:
        yield server


def test_locations_join_for_every_kind() -> None:
    assert join_location("s3://b/shards/", "x.tar") == "s3://b/shards/x.tar"
    assert join_location("pipe:aws s3 cp s3://b/{name} -", "x.tar") == "pipe:aws s3 cp s3://b/x.tar -"
    assert join_location("pipe:curl -s http://h/s", "x.tar") == "pipe:curl -s http://h/s/x.tar"
    assert join_location("shards", "x.tar") == str(Path("shards") / "x.tar")
    assert [is_url(u) for u in ("gs://b/s", "https://h/s", "pipe:cat x", "shards", "/abs/s")] == [
        True,
        True,
        True,
        False,
        False,
    ]


def test_http_reads_the_whole_body_once(served: ShardServer) -> None:
    data = read_url(served.url + "/a.bin", FAST)
    assert data == (served.folder / "a.bin").read_bytes() and served.gets["a.bin"] == 1
    with pytest.raises(NetworkError, match="1,048,576 bytes, more than the 1,000 allowed"):
        read_url(served.url + "/a.bin", FAST, limit=1000)


def test_a_missing_file_is_not_found_at_once_not_retried(served: ShardServer) -> None:
    with pytest.raises(
        NetworkError, match=r"cannot read http://127[.]0[.]0[.]1:\d+/gone[.]tar: not found \(HTTP 404"
    ):
        read_url(served.url + "/gone.tar", FAST)
    assert served.gets["gone.tar"] == 1


def test_a_failure_that_passes_is_retried_with_a_bound(served: ShardServer) -> None:
    served.faults["a.bin"] = "fail-2"
    assert len(read_url(served.url + "/a.bin", FAST)) == 2**20  # third try
    assert served.gets["a.bin"] == 3
    served.gets.clear()
    with pytest.raises(NetworkError) as caught:
        read_url(served.url + "/a.bin", Network(stall_timeout=0.5, retries=1, backoff=0.01))
    message = str(caught.value)
    assert "network failure reading" in message and "503" in message and "tried 2 times" in message
    assert "1 retry" in message and served.gets["a.bin"] == 2
    assert "damaged" not in message and "verify" not in message


@pytest.mark.parametrize(
    "fault, said", [("stall", "no data for 0.5 s (stall timeout) after"), ("truncate", "cut short")]
)
def test_a_stalled_or_truncated_body_is_a_network_failure(served: ShardServer, fault: str, said: str) -> None:
    served.faults["a.bin"] = fault
    with pytest.raises(NetworkError, match=r"network failure reading .*a\.bin") as caught:
        read_url(served.url + "/a.bin", FAST)
    assert said in str(caught.value) and "tried 3 times" in str(caught.value)
    assert served.gets["a.bin"] == 3


def test_a_refused_connection_is_named_after_its_retries() -> None:
    import socket

    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(NetworkError, match="cannot connect.*tried 2 times"):
        read_url(f"http://127.0.0.1:{port}/x.tar", Network(retries=1, backoff=0.01))


def test_pipe_reads_a_command_and_names_its_failure(tmp_path: Path) -> None:
    (tmp_path / "x.tar").write_bytes(b"tar bytes")
    location = f"pipe:cat {tmp_path}/{{name}}"
    assert read_url(join_location(location, "x.tar"), FAST) == b"tar bytes"
    with pytest.raises(NetworkError, match="exited with status 1: .*No such file"):
        read_url(join_location(location, "y.tar"), FAST)


def test_a_pipe_that_writes_nothing_is_stopped_at_the_stall_timeout(tmp_path: Path) -> None:
    marker = tmp_path / "still-running"
    command = f'pipe:{sys.executable} -c \'import time; time.sleep(30); open("{marker}", "w")\''
    with pytest.raises(NetworkError, match=r"wrote nothing for 0\.5 s \(stall timeout\)"):
        read_url(command, Network(stall_timeout=0.5, retries=0))
    assert not marker.exists()  # the command was killed, not left behind


def test_a_manifest_is_read_through_the_same_opener(tmp_path: Path) -> None:
    shards = write_shards(tmp_path / "s", {"train": [3], "val": [2]})
    with ShardServer(shards) as server:
        manifest = load_manifest(server.url)
        assert manifest.urls("train") == [server.url + "/train-000000.tar"]
        server.faults[MANIFEST] = "stall"
        with pytest.raises(NetworkError, match="manifest.json.*stall timeout"):
            read_manifest(server.url, FAST)
    piped = read_manifest(f"pipe:cat {shards}/{{name}}")
    assert piped == json.loads((shards / MANIFEST).read_text())
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / MANIFEST).write_bytes(b"\xff\xfe not text")
    with pytest.raises(BadManifest, match="not UTF-8"):
        read_manifest(f"pipe:cat {tmp_path}/bad/{{name}}")


def test_s3_without_its_package_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "fsspec", None)  # as if the remote extra were not installed
    with pytest.raises(UserError, match=r"needs s3fs.*pip install 'cocoshard\[remote\]'"):
        read_url("s3://bucket/shards/manifest.json", FAST)


@pytest.mark.slow
def test_s3_reads_objects_and_names_a_missing_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("s3fs", reason="the test extra brings s3fs")
    pytest.importorskip("moto", reason="the test extra brings moto")
    from conftest import S3Server

    shards = write_shards(tmp_path / "s", {"train": [3], "val": [2]})
    with S3Server() as s3:
        for name, value in s3.env.items():
            monkeypatch.setenv(name, value)
        url = s3.upload(shards, "remote-test/shards")
        manifest = load_manifest(url)
        assert manifest.urls("val") == [f"{url}/val-000000.tar"]
        assert read_url(manifest.urls("val")[0], FAST) == (shards / "val-000000.tar").read_bytes()
        assert s3.gets("val-000000.tar") == 1
        missing = r"cannot read s3://remote-test/shards/nothing\.tar: not found"
        with pytest.raises(NetworkError, match=missing):
            read_url(f"{url}/nothing.tar", FAST)
