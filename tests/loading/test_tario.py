"""Reading shards: the tar parser against Python's tarfile, checksums, damaged and hostile tars."""

from __future__ import annotations

import hashlib
import io
import os
import tarfile

import pytest

from cocoshard.loading import tario
from cocoshard.loading.tario import (
    BadShard,
    check_sha256,
    parse_samples,
    read_samples,
    tar_spans,
)


def make_tar(members: list[tuple[str, bytes]], fmt: int = tarfile.PAX_FORMAT) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=fmt) as tar:
        for name, payload in members:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return buffer.getvalue()


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_parser_agrees_with_tarfile_on_long_and_unicode_names(fmt):
    long_dir = "d" * 120 if fmt != tarfile.USTAR_FORMAT else "d" * 90
    names = ["000000000139.jpg", "000000000139.hw", f"{long_dir}/k1.labels", "é-clé.rgb", "empty.txt"]
    if fmt == tarfile.USTAR_FORMAT:
        names[3] = "plain.rgb"
    members = [(name, bytes([i]) * (i * 700)) for i, name in enumerate(names)]
    data = make_tar(members, fmt)
    parsed = [(name, data[start:end]) for name, start, end in tar_spans(data, "x.tar")]
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        reference = [(m.name, tar.extractfile(m).read()) for m in tar if m.isfile()]
    assert parsed == reference == members


def test_samples_group_consecutive_members_by_key():
    data = make_tar(
        [
            ("a.jpg", b"1"),
            ("README", b"x"),  # no extension: belongs to no sample, and does not end this one
            ("a.hw", b"2"),
            ("b.jpg", b"3"),
            ("dir/c.x.y", b"4"),
            ("noext", b"5"),
        ]
    )
    samples = parse_samples(data, "x.tar")
    assert [(s.key, sorted(s.members)) for s in samples] == [
        ("a", ["hw", "jpg"]),
        ("b", ["jpg"]),
        ("dir/c", ["x.y"]),
    ]
    with pytest.raises(BadShard, match="holds a.jpg twice"):
        parse_samples(make_tar([("a.jpg", b"1"), ("a.jpg", b"2")]), "x.tar")


def test_hostile_member_names_are_only_keys():
    data = make_tar([("/etc/passwd.jpg", b"1"), ("../../evil.jpg", b"2")])
    assert [s.key for s in parse_samples(data, "x.tar")] == [
        "/etc/passwd",
        "../../evil",
    ]


def test_damaged_header_and_truncation_are_named():
    data = bytearray(make_tar([("a.jpg", b"x" * 3000), ("b.jpg", b"y" * 10)]))
    flipped = bytes(data[:5] + bytes([data[5] ^ 1]) + data[6:])
    with pytest.raises(BadShard, match="s.tar has a damaged tar header at byte 0"):
        tar_spans(flipped, "s.tar")
    with pytest.raises(BadShard, match="s.tar is truncated"):
        tar_spans(bytes(data[:2000]), "s.tar")
    with pytest.raises(BadShard, match="ends inside a tar header"):
        tar_spans(bytes(data[: 512 * 7 + 100]), "s.tar")


def test_read_samples_checks_hash_and_count(tmp_path):
    data = make_tar([("a.jpg", b"1"), ("b.jpg", b"2")])
    path = tmp_path / "s.tar"
    path.write_bytes(data)
    digest = hashlib.sha256(data).hexdigest()
    assert [s.key for s in read_samples(str(path), digest, 2)] == ["a", "b"]
    with pytest.raises(BadShard, match="holds 2 samples, the manifest says 3"):
        read_samples(str(path), digest, 3)
    with pytest.raises(BadShard, match="s.tar is corrupted"):
        check_sha256(str(path), data + b"\0", digest)
    with pytest.raises(BadShard, match="cannot read shard .*missing.tar"):
        read_samples(str(tmp_path / "missing.tar"))


def test_a_shard_index_is_reused_until_the_file_changes(tmp_path, monkeypatch):
    parsed = []
    real = tario.tar_spans
    monkeypatch.setattr(tario, "tar_spans", lambda *args, **kw: parsed.append(1) or real(*args, **kw))
    path = tmp_path / "s.tar"
    path.write_bytes(make_tar([("a.jpg", b"1"), ("a.cls", b"0"), ("b.jpg", b"2")]))
    first = read_samples(str(path))
    again = read_samples(str(path))
    assert len(parsed) == 1  # the second read used the kept index
    assert [(s.key, {k: bytes(v) for k, v in s.members.items()}) for s in again] == [
        ("a", {"jpg": b"1", "cls": b"0"}),
        ("b", {"jpg": b"2"}),
    ]
    assert [s.key for s in first] == [s.key for s in again]
    # Rewritten in place, at another size: parsed afresh, never read through the old offsets.
    path.write_bytes(make_tar([("c.jpg", b"3" * 20_000), ("d.jpg", b"4"), ("d.cls", b"1"), ("e.jpg", b"5")]))
    assert [(s.key, sorted(s.members)) for s in read_samples(str(path))] == [
        ("c", ["jpg"]),
        ("d", ["cls", "jpg"]),
        ("e", ["jpg"]),
    ]
    assert len(parsed) == 2
    # Rewritten at the same size: its modification time alone makes it a new version.
    path.write_bytes(make_tar([("f.jpg", b"6" * 20_000), ("g.jpg", b"4"), ("g.cls", b"1"), ("h.jpg", b"5")]))
    os.utime(path, ns=(1, 1))
    assert [s.key for s in read_samples(str(path))] == ["f", "g", "h"]
    assert len(parsed) == 3
