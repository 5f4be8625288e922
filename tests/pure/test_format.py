"""Shard file names, sample member names and the codecs of their bytes."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cocoshard.prepare.manifest import list_shard_files
from cocoshard.pure.format import (
    decode_labels,
    decode_pixels,
    encode_labels,
    encode_npy,
    encode_pixels,
    fold_split,
    is_shard_file,
    key_problem,
    npy_array,
    shard_name,
    split_member_name,
)
from cocoshard.pure.labels import multi_hot, parse_cls


def test_shard_names_and_the_files_pack_owns(tmp_path):
    assert shard_name("train", 42) == "train-000042.tar"
    assert shard_name(fold_split(3), 0) == "fold3-000000.tar"
    for name in (
        "train-000000.tar",
        "val-000123.tar",
        "test-999999.tar",
        "fold0-000000.tar",
        "fold99-000001.tar",
    ):
        assert is_shard_file(name)
    for name in (
        "train-0.tar",
        "other-000000.tar",
        "fold-000000.tar",
        "fold01-000000.tar",  # one name per fold: fold1, never fold01
        "fold100-000000.tar",
        "train-000000.tar.tmp",
        ".tmp-train-000000.tar",
        "manifest.json",
    ):
        assert not is_shard_file(name)
    for name in ("val-000001.tar", "train-000000.tar", "notes.txt", ".tmp-train-000002.tar.x1"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "test-000000.tar").mkdir()  # a folder is never a shard
    assert [p.name for p in list_shard_files(tmp_path)] == ["train-000000.tar", "val-000001.tar"]
    assert list_shard_files(tmp_path / "missing") == []


def test_keys_with_a_dot_are_refused_with_the_reason():
    assert key_problem("000000000139") is None
    assert "WebDataset" in key_problem("img.v2")
    assert key_problem("") is not None
    assert key_problem(" padded") is not None
    assert split_member_name("000000000139.labels") == ("000000000139", "labels")
    assert split_member_name("a.b.jpg") == ("a", "b.jpg")  # why dotted keys are refused


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 300), st.integers(1, 300), st.integers(0, 2**32 - 1))
def test_pixels_are_standard_npy_files_that_round_trip(height, width, seed):
    rgb = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    data = encode_pixels(rgb)
    buffer = io.BytesIO()
    np.save(buffer, rgb)
    assert data == buffer.getvalue()  # byte for byte what numpy.save writes
    assert np.array_equal(np.load(io.BytesIO(data), allow_pickle=False), rgb)
    view = decode_pixels(memoryview(data), max_side=300)
    assert np.array_equal(view, rgb) and not view.flags.owndata  # read in place, no copy


def test_npy_members_are_refused_unless_exactly_what_pack_writes():
    rgb = np.zeros((4, 6, 3), np.uint8)
    data = encode_pixels(rgb)
    cases = [
        (data[:-1], "holds 71 bytes"),
        (b"\x93NUMPY\x02\x00" + data[8:], "format 1.0"),
        (encode_npy(np.zeros((4, 6), np.uint8)), "1 or 3 dimensions"),
        (data.replace(b"'|u1'", b"'<i2'"), "uint8"),
        (data.replace(b"False", b"True "), "C-order"),
    ]
    for broken, message in cases:
        with pytest.raises(ValueError, match=message):
            npy_array(broken)
    with pytest.raises(ValueError, match="sides in 1-5"):
        decode_pixels(data, max_side=5)
    with pytest.raises(ValueError, match=r"\(h, w, 3\)"):
        decode_pixels(encode_npy(np.zeros((4, 6, 4), np.uint8)), max_side=10)


def test_labels_member_round_trips_and_is_checked():
    vector = multi_hot(parse_cls("0\n41\n79\n").ids)
    data = encode_labels(vector)
    assert np.array_equal(np.load(io.BytesIO(data), allow_pickle=False), vector)
    assert decode_labels(data).tolist() == vector.tolist()
    with pytest.raises(ValueError, match=r"\(79,\) array"):
        decode_labels(encode_npy(vector[:-1]))
    with pytest.raises(ValueError, match="other than 0 and 1"):
        decode_labels(encode_npy(vector * 2))


# ----------------------------------------------------------------------------------- other readers


def loader_view(shards, split: str) -> dict[str, tuple[np.ndarray, np.ndarray | None]]:
    """key -> (the image exactly as cocoshard's loader decodes it, its uint8 labels or None)."""
    from cocoshard.loading.loader import build_loader
    from cocoshard.loading.spec import LoaderSpec

    loader = build_loader(shards, split, LoaderSpec(batch_size=16, device="cpu", train=False))
    found = {}
    for batch in loader:
        for i, key in enumerate(batch.keys):
            h, w = batch.sizes[i].tolist()
            labels = None if batch.labels is None else batch.labels[i].to(torch.uint8).numpy()
            found[key] = (batch.images[i, :h, :w].numpy().copy(), labels)
    loader.close()
    return found


def assert_same_samples(seen: dict, expected: dict) -> None:
    assert seen.keys() == expected.keys() and seen
    for key, (image, labels) in seen.items():
        assert np.array_equal(np.asarray(image), expected[key][0]), key
        if expected[key][1] is None:
            assert labels is None, key
        else:
            assert np.array_equal(np.asarray(labels), expected[key][1]), key


SHARD_FIXTURES = ["sample_shards_jpeg", "sample_shards_raw"]
SPLITS_READ = ("train", "val", "test")


@pytest.mark.parametrize("fixture", SHARD_FIXTURES)
def test_plain_webdataset_with_its_default_decoders_reads_what_the_loader_reads(fixture, request):
    import webdataset as wds

    shards = request.getfixturevalue(fixture)
    for split in SPLITS_READ:
        urls = sorted(str(p) for p in shards.glob(f"{split}-*.tar"))
        seen = {}
        for sample in wds.WebDataset(urls, shardshuffle=False).decode("rgb8"):
            image = next(sample[f] for f in ("jpg", "png", "pixels.npy") if f in sample)
            seen[sample["__key__"]] = (image, sample.get("labels.npy"))
        assert_same_samples(seen, loader_view(shards, split))


@pytest.mark.parametrize("fixture", SHARD_FIXTURES)
def test_tarfile_and_numpy_load_read_what_the_loader_reads(fixture, request):
    import tarfile

    from PIL import Image

    shards = request.getfixturevalue(fixture)
    for split in SPLITS_READ:
        members: dict[str, dict[str, bytes]] = {}
        for path in sorted(shards.glob(f"{split}-*.tar")):
            with tarfile.open(path) as tar:
                for member in tar:
                    key, field = member.name.split(".", 1)
                    members.setdefault(key, {})[field] = tar.extractfile(member).read()
        seen = {}
        for key, fields in members.items():
            if "pixels.npy" in fields:
                image = np.load(io.BytesIO(fields["pixels.npy"]), allow_pickle=False)
            else:
                image = np.asarray(
                    Image.open(io.BytesIO(fields.get("jpg", fields.get("png")))).convert("RGB")
                )
            labels = (
                np.load(io.BytesIO(fields["labels.npy"]), allow_pickle=False)
                if "labels.npy" in fields
                else None
            )
            seen[key] = (image, labels)
        assert_same_samples(seen, loader_view(shards, split))


@pytest.mark.parametrize("fixture", SHARD_FIXTURES)
def test_hugging_face_datasets_reads_what_the_loader_reads(fixture, request, tmp_path):
    datasets = pytest.importorskip(
        "datasets", reason="Hugging Face datasets is not installed (pip install datasets)"
    )
    shards = request.getfixturevalue(fixture)
    for split in SPLITS_READ:
        files = sorted(str(p) for p in shards.glob(f"{split}-*.tar"))
        rows = datasets.load_dataset(
            "webdataset", data_files={split: files}, split=split, cache_dir=str(tmp_path / "hf-cache")
        )
        seen = {}
        for row in rows:
            image = next(row[f] for f in ("jpg", "png", "pixels.npy") if row.get(f) is not None)
            image = (
                np.asarray(image.convert("RGB"))
                if hasattr(image, "convert")
                else np.asarray(image, dtype=np.uint8)
            )
            labels = row.get("labels.npy")
            seen[row["__key__"]] = (image, None if labels is None else np.asarray(labels, dtype=np.uint8))
        assert_same_samples(seen, loader_view(shards, split))
