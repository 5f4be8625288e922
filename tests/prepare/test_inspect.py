"""`cocoshard inspect [--verify]`: the summary, and every kind of damage named by shard."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cocoshard.cli import main
from cocoshard.prepare.inspect import check_sample
from cocoshard.prepare.pack import add_member
from cocoshard.prepare.summary import class_frequency_lines
from cocoshard.pure.format import encode_labels, encode_npy, encode_pixels


@pytest.fixture
def jpeg_copy(tmp_path, sample_shards_jpeg) -> Path:
    return Path(shutil.copytree(sample_shards_jpeg, tmp_path / "shards"))


@pytest.fixture
def raw_copy(tmp_path, sample_shards_raw) -> Path:
    return Path(shutil.copytree(sample_shards_raw, tmp_path / "raw"))


def inspect(folder: Path, capsys, *flags: str) -> tuple[int, str]:
    code = main(["inspect", "--shards", str(folder), "--workers", "1", *flags])
    captured = capsys.readouterr()
    return code, "".join((captured.out + captured.err).split())  # the console wraps long lines


def rewrite_sample(folder: Path, shard: str, change) -> None:
    """Rewrite one shard with `change(fields)` applied to its first sample, and re-seal the manifest
    with the new size and sha256, so that only the sample checks can catch the damage."""
    samples: list[tuple[str, dict[str, bytes]]] = []
    with tarfile.open(folder / shard) as tar:
        for member in tar:
            key, field = member.name.split(".", 1)
            if not samples or samples[-1][0] != key:
                samples.append((key, {}))
            samples[-1][1][field] = tar.extractfile(member).read()
    change(samples[0][1])
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for key, fields in samples:
            for field, data in fields.items():
                add_member(tar, f"{key}.{field}", data)
    (folder / shard).write_bytes(buffer.getvalue())
    manifest = json.loads((folder / "manifest.json").read_text())
    for split in manifest["splits"].values():
        for entry in split["shards"]:
            if entry["name"] == shard:
                entry["bytes"], entry["sha256"] = (
                    len(buffer.getvalue()),
                    hashlib.sha256(buffer.getvalue()).hexdigest(),
                )
    (folder / "manifest.json").write_text(json.dumps(manifest))


def test_summary_without_verify(sample_shards_jpeg, capsys):
    code, out = inspect(sample_shards_jpeg, capsys)
    assert code == 0 and "verified" not in out
    assert "KEY.labels.npy" in out and "KEY.jpg" in out  # the member layout, for readers elsewhere
    manifest = json.loads((sample_shards_jpeg / "manifest.json").read_text())
    for split in ("train", "val", "test"):
        assert (
            f"│{split}│{manifest['splits'][split]['samples']}│{len(manifest['splits'][split]['shards'])}│"
            in out
        )
    assert "mostfrequent:person(0):" in out and "leastfrequent:" in out
    assert "2imageswithouta.clsfile" in out and "formatjpeg" in out


def test_folds_are_summarised_verified_and_checked_for_shared_keys(sample_folds_jpeg, tmp_path, capsys):
    code, out = inspect(sample_folds_jpeg, capsys, "--verify")
    assert code == 0 and "verified" in out and "(3folds,seed0)" in out
    manifest = json.loads((sample_folds_jpeg / "manifest.json").read_text())
    for split in ("fold0", "fold1", "fold2", "test"):
        entry = manifest["splits"][split]
        assert f"│{split}│{entry['samples']}│{len(entry['shards'])}│" in out
    # a fold shard copied into another fold: the same images in two folds are named
    shards = Path(shutil.copytree(sample_folds_jpeg, tmp_path / "folds"))
    copied = dict(manifest["splits"]["fold0"]["shards"][0], name="fold2-000099.tar")
    shutil.copy(shards / "fold0-000000.tar", shards / copied["name"])
    manifest["splits"]["fold2"]["shards"].append(copied)
    manifest["splits"]["fold2"]["samples"] += copied["samples"]
    (shards / "manifest.json").write_text(json.dumps(manifest))
    code, out = inspect(shards, capsys, "--verify")
    assert code == 1 and "fold0/fold1/fold2:16keysappearinmorethanonesample" in out


def test_class_frequency_head_and_tail():
    manifest = {
        "classes": [f"c{i}" for i in range(80)],
        "splits": {"train": {"class_counts": list(range(80))}, "val": {"class_counts": [1] * 80}},
    }
    head, tail = class_frequency_lines(manifest)
    assert head.startswith("most frequent: c79 (79): 80, c78 (78): 79")
    assert tail.startswith("least frequent: c0 (0): 1, c1 (1): 2")


@pytest.mark.parametrize("fixture", ["sample_shards_jpeg", "sample_shards_raw", "synth_shards_jpeg"])
def test_intact_shards_verify(fixture, request, capsys):
    code, out = inspect(request.getfixturevalue(fixture), capsys, "--verify")
    assert code == 0 and "verified" in out


def test_a_flipped_byte_is_caught(jpeg_copy, capsys):
    shard = jpeg_copy / "train-000001.tar"
    data = bytearray(shard.read_bytes())
    data[5000] ^= 0x01
    shard.write_bytes(bytes(data))
    code, out = inspect(jpeg_copy, capsys, "--verify")
    assert code == 1 and "1of" in out and "train-000001.tar:sha256differsfromthemanifest" in out


def test_a_truncated_shard_is_caught(jpeg_copy, capsys):
    shard = jpeg_copy / "val-000000.tar"
    shard.write_bytes(shard.read_bytes()[:70_000])
    code, out = inspect(jpeg_copy, capsys, "--verify")
    assert (
        code == 1
        and "val-000000.tar:70,000bytes,themanifestsays" in out
        and "val-000000.tar:sha256differs" in out
    )


def test_a_deleted_shard_is_caught(jpeg_copy, capsys):
    (jpeg_copy / "test-000001.tar").unlink()
    code, out = inspect(jpeg_copy, capsys, "--verify")
    assert code == 1 and "test-000001.tar:missing" in out


def test_bad_labels_are_caught_even_with_a_matching_hash(jpeg_copy, capsys):
    rewrite_sample(
        jpeg_copy,
        "train-000000.tar",
        lambda fields: fields.update({"labels.npy": encode_npy(np.full(80, 2, np.uint8))}),
    )
    code, out = inspect(jpeg_copy, capsys, "--verify")
    assert code == 1 and "train-000000.tar:" in out and "labelsholdvaluesotherthan0and1" in out
    assert "sha256" not in out


def test_an_image_larger_than_the_manifest_says_is_caught_by_decoding(jpeg_copy, capsys):
    buffer = io.BytesIO()
    Image.new("RGB", (300, 20)).save(buffer, format="JPEG")
    rewrite_sample(jpeg_copy, "val-000001.tar", lambda fields: fields.update(jpg=buffer.getvalue()))
    code, out = inspect(jpeg_copy, capsys, "--verify")
    assert code == 1 and "jpgdecodesto20x300,largerthanthemanifest'ssize224" in out


def test_raw_pixels_of_a_wrong_shape_are_caught(raw_copy, capsys):
    def widen(fields):  # a 4th channel: not an RGB image
        fields["pixels.npy"] = encode_npy(np.zeros((10, 10, 4), np.uint8))

    rewrite_sample(raw_copy, "train-000000.tar", widen)
    code, out = inspect(raw_copy, capsys, "--verify")
    assert code == 1 and "expected(h,w,3)" in out


def test_check_sample_rules():
    labels = encode_labels(np.zeros(80, np.uint8))
    buffer = io.BytesIO()
    Image.new("RGB", (3, 2)).save(buffer, format="JPEG")
    jpg = buffer.getvalue()
    pixels = encode_pixels(np.zeros((2, 3, 3), np.uint8))
    assert check_sample("k", {"jpg": jpg, "labels.npy": labels}, "train", "jpeg", 224) == []
    assert check_sample("k", {"jpg": jpg}, "test", "jpeg", 224) == []
    assert check_sample("k", {"pixels.npy": pixels}, "test", "raw", 224) == []
    assert "expected" in check_sample("k", {"jpg": jpg}, "val", "jpeg", 224)[0]  # labels missing
    assert check_sample("k", {"jpg": jpg, "labels.npy": labels}, "test", "jpeg", 224)  # test has none
    assert check_sample("k", {"jpg": jpg, "png": jpg}, "test", "jpeg", 224)
    assert check_sample("k", {"jpg": jpg}, "test", "raw", 224)  # a jpeg member in raw shards
    assert "holds 10 bytes" in check_sample("k", {"pixels.npy": pixels[:-8]}, "test", "raw", 224)[0]
    assert "sides in 1-2" in check_sample("k", {"pixels.npy": pixels}, "test", "raw", 2)[0]
    assert "does not decode" in check_sample("k", {"jpg": jpg[:-200]}, "test", "jpeg", 224)[0]
    assert "'.'" in check_sample("a.b", {"jpg": jpg}, "test", "jpeg", 224)[0]


def test_missing_manifest_is_a_user_error(tmp_path, capsys):
    code, out = inspect(tmp_path, capsys)
    assert code == 2 and "nomanifest.json" in out


def test_verify_over_a_url_names_damage_and_fills_the_cache_with_what_passes(jpeg_copy, tmp_path, capsys):
    from conftest import ShardServer

    data = bytearray((jpeg_copy / "train-000001.tar").read_bytes())
    data[5000] ^= 0x01
    (jpeg_copy / "train-000001.tar").write_bytes(bytes(data))
    manifest = json.loads((jpeg_copy / "manifest.json").read_text())
    entries = [entry for split in manifest["splits"].values() for entry in split["shards"]]
    cache = tmp_path / "cache"
    with ShardServer(jpeg_copy) as server:
        server.faults["test-000000.tar"] = "missing"
        flags = ("--verify", "--cache", str(cache), "--retries", "0")
        code = main(["inspect", "--shards", server.url, "--workers", "1", *flags])
    captured = capsys.readouterr()
    out = "".join((captured.out + captured.err).split())
    assert code == 1 and "2of" in out and "train-000001.tar:sha256differsfromthemanifest" in out
    assert "test-000000.tar:notverified:cannotread" in out and "notfound(HTTP404" in out
    cached = {path.name for path in cache.glob("*.tar")}
    passed = {
        e["sha256"] + ".tar" for e in entries if e["name"] not in ("train-000001.tar", "test-000000.tar")
    }
    assert cached == passed and not list(cache.glob(".tmp-*"))
