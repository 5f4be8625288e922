"""The loaders: exact epochs on every rank, shuffling, both modes, real shards, corrupted shards (the plan
behind the epochs: test_plan.py)."""

from __future__ import annotations

import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cocoshard.errors import UserError
from cocoshard.loading.loader import build_loader
from cocoshard.loading.spec import LoaderSpec
from cocoshard.loading.tario import BadSample, BadShard
from conftest import CANVAS, epoch_keys, hw, labels_of, rewrite_with_bad_jpeg, write_shards

# Tests start more loader workers than this machine has cores on purpose.
pytestmark = pytest.mark.filterwarnings("ignore:This DataLoader will create:UserWarning")


_open_loaders: list = []


@pytest.fixture(autouse=True)
def _close_loaders():
    """Stop every loader's workers at the end of its test, not at some later garbage collection."""
    yield
    while _open_loaders:
        _open_loaders.pop().close()


def _loader(location, split="train", **overrides):
    settings = dict(batch_size=8, device="cpu", mode="stream", train=split == "train", seed=0)
    loader = build_loader(location, split, LoaderSpec(**{**settings, **overrides}))
    _open_loaders.append(loader)
    return loader


UNEVEN = [37, 5, 61, 1, 27]


# -------------------------------------------------------------------------- stream epochs


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_simulated_ranks_yield_exactly_len_batches_and_never_repeat(tmp_path, world_size):
    shards = write_shards(tmp_path / "s", {"train": UNEVEN})
    keys_by_rank = []
    lengths = set()
    for rank in range(world_size):
        loader = _loader(shards, rank=rank, world_size=world_size, workers=2)
        lengths.add(len(loader))
        keys = epoch_keys(loader, epoch=2)
        assert len(keys) == len(loader) * 8 == loader.num_samples
        keys_by_rank.append(keys)
    assert len(lengths) == 1
    everything = [k for keys in keys_by_rank for k in keys]
    assert len(everything) == len(set(everything))
    assert len(everything) >= sum(UNEVEN) - world_size * 7 - (world_size - 1)


def test_fewer_shards_than_workers(tmp_path):
    shards = write_shards(tmp_path / "s", {"train": [21, 19], "val": [11]})
    loader = _loader(shards, workers=4)
    keys = epoch_keys(loader)
    assert len(keys) == len(loader) * 8 == 40 and len(set(keys)) == 40
    val = _loader(shards, "val", workers=4)
    assert len(val) == 2 and epoch_keys(val) == [f"k{i:06d}" for i in range(40, 51)]


def test_order_changes_with_the_epoch_and_repeats_with_the_seed(tmp_path):
    shards = write_shards(tmp_path / "s", {"train": UNEVEN})
    first, again = _loader(shards, workers=2, seed=4), _loader(shards, workers=2, seed=4)
    epoch0, epoch1 = epoch_keys(first, 0), epoch_keys(first, 1)
    assert epoch0 != epoch1
    assert epoch_keys(again, 0) == epoch0 and epoch_keys(again, 1) == epoch1
    assert epoch_keys(_loader(shards, workers=2, seed=5), 0) != epoch0


def test_eval_reads_every_sample_once_in_order_with_the_last_partial_batch(tmp_path):
    shards = write_shards(tmp_path / "s", {"train": [4], "val": UNEVEN})
    loader = _loader(shards, "val", workers=3)
    batches = list(loader)
    assert len(batches) == len(loader) == -(-sum(UNEVEN) // 8)
    assert len(batches[-1]) == sum(UNEVEN) % 8
    keys = [k for b in batches for k in b.keys]
    assert keys == sorted(keys) and len(keys) == sum(UNEVEN)
    assert epoch_keys(loader, epoch=3) == keys


def test_batches_hold_the_stored_pixels_sizes_andlabels_of(tmp_path):
    shards = write_shards(tmp_path / "s", {"train": [3, 9]})
    for batch in _loader(shards, workers=2):
        assert batch.images.dtype == torch.uint8 and batch.images.shape[1:] == (CANVAS, CANVAS, 3)
        assert batch.labels.dtype == torch.float32 and batch.labels.shape[1] == 80
        for image, (h, w), labels, key in zip(batch.images, batch.sizes.tolist(), batch.labels, batch.keys):
            index = int(key[1:])
            assert (h, w) == (CANVAS - index % 5, CANVAS - index % 3)
            assert bool((image[:h, :w] == index % 251).all())
            assert torch.equal(labels, torch.tensor(list(labels_of(index))).float())


@pytest.mark.parametrize("workers", [0, 2])
def test_batch_buffers_are_reused_but_never_while_held(tmp_path, workers):
    shards = write_shards(tmp_path / "s", {"train": [40, 40, 40]})
    loader = _loader(shards, workers=workers)
    held = list(loader)  # every batch kept: no buffer may be refilled under them
    made = {batch.images.data_ptr() for batch in held}
    assert len(made) == len(held)
    for batch in held:
        for image, key in zip(batch.images, batch.keys):
            h, w = hw(int(key[1:]))
            assert bool((image[:h, :w] == int(key[1:]) % 251).all())
    del held, batch, image
    memory = set()
    for epoch in (1, 2):  # batches dropped as they are used: every one comes in a recycled buffer
        loader.set_epoch(epoch)
        for batch in loader:
            memory.add(batch.images.data_ptr())
            h, w = hw(int(batch.keys[0][1:]))
            assert bool((batch.images[0, :h, :w] == int(batch.keys[0][1:]) % 251).all())
    assert memory <= made  # no new buffer: the first epoch's, given back and filled again


def test_resident_and_stream_agree_on_keys_andlabels_of(tmp_path):
    shards = write_shards(tmp_path / "s", {"train": UNEVEN, "val": [13, 6]})
    for split, batch in (("train", 1), ("val", 4)):
        seen = {}
        for mode in ("stream", "resident"):
            loader = _loader(shards, split, mode=mode, batch_size=batch, workers=2 if mode == "stream" else 0)
            loader.set_epoch(1)
            seen[mode] = {(k, tuple(l.tolist())) for b in loader for k, l in zip(b.keys, b.labels)}
            assert len(seen[mode]) == loader.num_samples
        assert seen["stream"] == seen["resident"]


def test_resident_epochs_are_exact_and_seeded(tmp_path):
    shards = write_shards(tmp_path / "s", {"train": UNEVEN})
    lengths, everything = set(), []
    for rank in range(3):
        loader = _loader(shards, mode="resident", rank=rank, world_size=3)
        lengths.add(len(loader))
        keys = epoch_keys(loader, 1)
        assert len(keys) == len(loader) * 8
        everything += keys
    assert len(lengths) == 1 and len(everything) == len(set(everything))
    loader = _loader(shards, mode="resident")
    assert epoch_keys(loader, 0) != epoch_keys(loader, 1)
    assert epoch_keys(loader, 0) == epoch_keys(_loader(shards, mode="resident"), 0)


def test_resident_refuses_a_split_larger_than_its_memory(tmp_path):
    shards = write_shards(tmp_path / "s", {"train": [40]})
    with pytest.raises(
        UserError,
        match=r"resident mode needs 123.8 KiB for the 40 images .* the memory limit is 60.0 KiB: "
        r"use the stream loader",
    ):
        _loader(shards, mode="resident", memory_limit=40 * CANVAS * CANVAS * 3 // 2)
    assert len(_loader(shards, mode="resident", memory_limit=10 * 40 * CANVAS * CANVAS * 3)) == 5


def test_bad_settings_are_refused(tmp_path):
    shards = write_shards(tmp_path / "s", {"train": [6]})
    with pytest.raises(UserError, match="too few for one batch"):
        _loader(shards, world_size=2, batch_size=4)
    with pytest.raises(UserError, match="unknown loader mode"):
        _loader(shards, mode="ram")
    with pytest.raises(UserError, match="no 'val' split|holds no 'val'"):
        _loader(shards, "val")


def test_shards_over_http(tmp_path):
    shards = write_shards(tmp_path / "s", {"train": [9, 7]})
    handler = partial(SimpleHTTPRequestHandler, directory=str(shards))
    handler.log_message = lambda *args: None
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        assert sorted(epoch_keys(_loader(url, workers=2))) == sorted(epoch_keys(_loader(shards, workers=2)))
    finally:
        server.shutdown()


# --------------------------------------------------------------------- real packed shards


def _grayscale_keys(coco_sample: Path) -> set[str]:
    return {p.stem for p in coco_sample.glob("images/*/*/*.jpg") if Image.open(p).mode == "L"}


@pytest.mark.parametrize("fixture", ["sample_shards_jpeg", "sample_shards_raw"])
def test_reads_coco_sample_shards_with_grayscale_photos(request, coco_sample, fixture):
    shards = request.getfixturevalue(fixture)
    gray = _grayscale_keys(coco_sample)
    seen = {}
    for split in ("train", "val", "test"):
        loader = _loader(shards, split, workers=2, train=False)
        for batch in loader:
            assert (batch.labels is None) == (split == "test")
            for i, key in enumerate(batch.keys):
                seen[key] = (
                    batch.images[i],
                    tuple(batch.sizes[i].tolist()),
                    None if batch.labels is None else batch.labels[i],
                )
    assert len(seen) == 126 + 32
    assert gray & set(seen), "the grayscale photos should be in the sample's shards"
    for key, (image, (h, w), labels) in seen.items():
        source = next(coco_sample.glob(f"images/*/*/{key}.jpg"))
        reference = np.asarray(Image.open(source).convert("RGB"))
        assert (h, w) == reference.shape[:2]
        assert np.array_equal(image[:h, :w].numpy(), reference)
        if key in gray:
            assert bool((image[:h, :w, 0] == image[:h, :w, 2]).all())
        if labels is not None:
            ids = {int(t) for t in next(coco_sample.glob(f"labels/*/*/{key}.cls")).read_text().split()}
            assert set(torch.nonzero(labels).flatten().tolist()) == ids


def test_synthetic_shards_in_both_formats_give_the_same_batches(synth_shards_jpeg, synth_shards_raw):
    jpeg = list(_loader(synth_shards_jpeg, "val", batch_size=16, workers=2))
    raw = list(_loader(synth_shards_raw, "val", batch_size=16, workers=2))
    assert [b.keys for b in jpeg] == [b.keys for b in raw]
    for a, b in zip(jpeg, raw):
        assert torch.equal(a.sizes, b.sizes) and torch.equal(a.labels, b.labels)
        for image_a, image_b, (h, w) in zip(a.images, b.images, a.sizes.tolist()):
            assert torch.equal(image_a[:h, :w], image_b[:h, :w])


# ------------------------------------------------------------------------ corrupted shards


def _flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x5A
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("mode", ["stream", "resident"])
def test_a_corrupted_shard_is_named_or_skipped_and_counted(tmp_path, mode):
    shards = write_shards(tmp_path / "s", {"train": [16, 16, 16]})
    _flip_byte(shards / "train-000001.tar", 3000)  # inside sample pixels: only the checksum can tell
    workers = 2 if mode == "stream" else 0
    with pytest.raises(BadShard, match="train-000001.tar is corrupted"):
        epoch_keys(_loader(shards, mode=mode, workers=workers))
    loader = _loader(shards, mode=mode, workers=workers, skip_bad_samples=True)
    keys = epoch_keys(loader)
    assert loader.skipped_samples == 16
    assert len(keys) == len(loader) * 8
    assert not {f"k{i:06d}" for i in range(16, 32)} & set(keys)


def test_a_missing_or_truncated_shard_is_named_or_skipped(tmp_path):
    shards = write_shards(tmp_path / "s", {"train": [16, 16, 16]})
    (shards / "train-000000.tar").unlink()
    with pytest.raises(BadShard, match="cannot read shard .*train-000000.tar"):
        epoch_keys(_loader(shards))
    data = (shards / "train-000001.tar").read_bytes()
    (shards / "train-000001.tar").write_bytes(data[: len(data) // 2])
    loader = _loader(shards, skip_bad_samples=True, batch_size=4)
    keys = epoch_keys(loader)
    # Bad samples are counted once; their slots are refilled from the readable shard.
    assert len(keys) == len(loader) * 4 == 48 and loader.skipped_samples == 32
    assert set(keys) == {f"k{i:06d}" for i in range(32, 48)}
    (shards / "train-000002.tar").unlink()
    with pytest.raises(BadShard, match="no sample this loader worker reads can be decoded"):
        epoch_keys(_loader(shards, skip_bad_samples=True, batch_size=4))


def test_an_undecodable_sample_names_shard_and_key_or_is_counted(sample_shards_jpeg, tmp_path):
    keys = epoch_keys(_loader(sample_shards_jpeg, "val"))
    victim = keys[len(keys) // 2]
    shards = tmp_path / "bad"
    rewrite_with_bad_jpeg(sample_shards_jpeg, shards, victim)
    with pytest.raises(BadSample, match=rf"shard .*val-\d+\.tar, sample {victim}: cannot decode"):
        epoch_keys(_loader(shards, "val", workers=2))
    loader = _loader(shards, "val", workers=2, skip_bad_samples=True)
    assert epoch_keys(loader) == [k for k in keys if k != victim]
    assert loader.skipped_samples == 1
    resident = _loader(shards, "val", mode="resident", skip_bad_samples=True)
    assert epoch_keys(resident) == [k for k in keys if k != victim] and resident.skipped_samples == 1


def test_several_splits_read_as_one_in_the_order_given(sample_shards_raw: Path) -> None:
    """A K-fold run trains on several folds at once: the loader reads a tuple of splits as one."""
    keys = {
        split: [k for b in _loader(sample_shards_raw, split, batch_size=16, train=False) for k in b.keys]
        for split in ("train", "val")
    }
    both = [
        k for b in _loader(sample_shards_raw, ("val", "train"), batch_size=16, train=False) for k in b.keys
    ]
    assert both == keys["val"] + keys["train"]
