"""A shard's layout (checked once per file version) against the per-sample path it replaces in the
stream worker: the same pixels, labels and words for a bad sample; kept while the file stays."""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest

from cocoshard.loading import shard_source
from cocoshard.loading.decode import fill_canvas, fill_labels
from cocoshard.loading.device_decode import compressed_image
from cocoshard.loading.layout import ShardLayout
from cocoshard.loading.shard_source import ShardBatchSource, shuffled
from cocoshard.loading.tario import BadSample, read_shard
from cocoshard.prepare.manifest import MANIFEST
from cocoshard.pure.format import encode_labels, encode_npy, encode_pixels
from conftest import tar_member


def _shards(folder: Path) -> list[Path]:
    manifest = json.loads((folder / MANIFEST).read_text())
    return [folder / e["name"] for split in ("train", "val") for e in manifest["splits"][split]["shards"]]


def _canvases(rows: int, side: int) -> tuple[np.ndarray, memoryview]:
    canvases = np.full((rows, side, side, 3), 7, np.uint8)
    return canvases, canvases.data.cast("B")


@pytest.mark.parametrize("fixture", ["sample_shards_raw", "sample_shards_jpeg"])
def test_a_layout_gives_the_pixels_and_labels_of_the_sample_path(fixture, request):
    folder: Path = request.getfixturevalue(fixture)
    side = json.loads((folder / MANIFEST).read_text())["size"]
    compared = 0
    for path in _shards(folder):
        shard = read_shard(str(path))
        layout = ShardLayout.build(shard, canvas_size=side, labelled=True)
        samples = shard.samples()
        assert layout.keys == [s.key for s in samples] and not layout.problems
        canvases, canvas_bytes = _canvases(len(samples), side)
        copied, copied_bytes = _canvases(len(samples), side)
        rows = list(range(len(samples)))[::-1]  # any row: the copies land where they are told
        layout.copy_pixels(list(range(len(samples))), rows, copied, copied_bytes)
        for i, sample in enumerate(samples):
            expected = np.full((side, side, 3), 7, np.uint8)
            h, w = fill_canvas(sample, expected)
            assert layout.fill(i, canvases, i, canvas_bytes) == (h, w)
            assert np.array_equal(canvases[i], expected)  # outside (h, w) untouched, as before
            if layout.exts[i] == "pixels.npy":
                assert np.array_equal(copied[rows[i]], expected)
            label = np.zeros(80, np.uint8)
            fill_labels(sample, label)
            assert np.array_equal(layout.labels[i], label)
            compared += 1
    assert compared >= 20
    # raw shards hold images as wide as the canvas and narrower ones: both copies were taken
    if fixture == "sample_shards_raw":
        widths = {
            w == side
            for path in _shards(folder)
            for _, w in ShardLayout.build(read_shard(str(path)), canvas_size=side, labelled=True).sizes
        }
        assert widths == {True, False}


def _tar(members: list[tuple[str, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, payload in members:
            tar_member(tar, name, payload)
    return buffer.getvalue()


def _sample_path_problem(sample, side: int, send_bytes: bool) -> str | None:
    """What the per-sample path (fill_canvas or compressed_image, then fill_labels) raises."""
    try:
        if send_bytes:
            compressed_image(sample)
        else:
            fill_canvas(sample, np.zeros((side, side, 3), np.uint8))
        fill_labels(sample, np.zeros(80, np.uint8))
    except BadSample as exc:
        return str(exc)
    return None


@pytest.mark.parametrize("send_bytes", [False, True])
def test_a_bad_sample_gets_the_words_of_the_sample_path(tmp_path, coco_sample, send_bytes):
    jpeg = sorted(coco_sample.glob("images/train-resized/*/*.jpg"))[0].read_bytes()
    good_labels = encode_labels(np.eye(80, dtype=np.uint8)[3])
    pixels = encode_pixels(np.full((6, 8, 3), 9, np.uint8))
    huge = bytearray(jpeg)
    start = huge.index(b"\xff\xc0") + 5
    huge[start : start + 4] = (30000).to_bytes(2, "big") * 2  # declares 30000 x 30000 pixels
    members = [
        ("good.pixels.npy", pixels),
        ("good.labels.npy", good_labels),
        ("photo.jpg", jpeg),
        ("photo.labels.npy", good_labels),
        ("nolabels.pixels.npy", pixels),
        ("twolabels.pixels.npy", pixels),
        ("twolabels.labels.npy", encode_npy(np.full(80, 2, np.uint8))),
        ("shortlabels.pixels.npy", pixels),
        ("shortlabels.labels.npy", encode_npy(np.ones(79, np.uint8))),
        ("notnpy.pixels.npy", b"not an array at all"),
        ("notnpy.labels.npy", good_labels),
        ("toowide.pixels.npy", encode_pixels(np.zeros((4, 40, 3), np.uint8))),
        ("toowide.labels.npy", good_labels),
        ("flat.pixels.npy", encode_npy(np.zeros(12, np.uint8))),
        ("flat.labels.npy", good_labels),
        ("both.pixels.npy", pixels),
        ("both.jpg", jpeg),
        ("both.labels.npy", good_labels),
        ("noimage.labels.npy", good_labels),
        ("declares.jpg", bytes(huge)),
        ("declares.labels.npy", good_labels),
        (" padded.pixels.npy", pixels),
        (" padded.labels.npy", good_labels),
    ]
    path = tmp_path / "s.tar"
    path.write_bytes(_tar(members))
    shard = read_shard(str(path))
    layout = ShardLayout.build(shard, canvas_size=32, labelled=True, send_bytes=send_bytes)
    expected = {
        i: problem
        for i, sample in enumerate(shard.samples())
        if (problem := _sample_path_problem(sample, 32, send_bytes)) is not None
    }
    assert layout.problems == expected
    assert len(expected) >= 10
    for i in expected:
        with pytest.raises(BadSample, match="."):
            layout.check(i)
    good = [i for i in range(len(layout.keys)) if i not in expected]
    assert [layout.keys[i] for i in good] == (["photo"] if send_bytes else ["good", "photo"])


def test_a_stream_worker_keeps_a_shards_layout_until_its_file_changes(tmp_path, monkeypatch):
    def write(path: Path, value: int) -> None:
        members = []
        for key in ("a", "b", "c"):
            members += [
                (f"{key}.pixels.npy", encode_pixels(np.full((4, 4, 3), value, np.uint8))),
                (f"{key}.labels.npy", encode_labels(np.eye(80, dtype=np.uint8)[value])),
            ]
        tmp = path.with_suffix(".new")
        tmp.write_bytes(_tar(members))
        os.replace(tmp, path)  # a new file, as pack writes one

    paths = [tmp_path / "one.tar", tmp_path / "two.tar"]
    for path in paths:
        write(path, 1)
    source = ShardBatchSource(
        [str(p) for p in paths], [3, 3], ["", ""], canvas_size=8, labelled=True, batch_size=2, seed=0,
        rank=0, world_size=1, workers=0, train=True, shuffle_buffer=4, skip_bad_samples=False,
        transform=None, threads=1, send_bytes=False,
    )  # fmt: skip
    first = source.layout(0)
    assert source.layout(0) is first  # kept: checked once, its map's pages stay mapped
    stat = paths[0].stat()
    write(paths[0], 2)  # same size; even the same modification time
    os.utime(paths[0], ns=(stat.st_atime_ns, stat.st_mtime_ns))
    again = source.layout(0)
    assert again is not first and again.labels[0].argmax() == 2 and first.labels[0].argmax() == 1
    monkeypatch.setattr(shard_source, "KEPT_SHARDS", 1)  # each kept layout holds an open file
    source.layout(1)
    assert list(source._layouts) == [1]


def test_the_shuffle_buffer_is_a_seeded_permutation():
    items = [(str(i), None, i, None) for i in range(3000)]  # more than one draw of positions

    def order(seed: int) -> list[int]:
        return [item[2] for item in shuffled(iter(items), 100, np.random.default_rng(seed))]

    assert sorted(order(0)) == list(range(3000))
    assert order(0) == order(0) != order(1)
    assert order(0) != list(range(3000))
