"""`--decode device`: compressed bytes to the device, decoded there (on a CPU, by the same code).

The batches must hold exactly what the host-decode path gives for the same keys, every epoch must
be exact, and a broken JPEG must be named (shard and key) or skipped and counted.
"""

from __future__ import annotations

import glob
from collections import Counter

import pytest
import torch

from cocoshard.errors import UserError
from cocoshard.loading.augment import EvalTransform, TrainTransform
from cocoshard.loading.device_decode import KIND_JPEG, KIND_PNG, decode_on_device
from cocoshard.loading.loader import build_loader
from cocoshard.loading.spec import LoaderSpec
from cocoshard.loading.tario import BadSample
from conftest import rewrite_with_bad_jpeg

DEVICE_MODES = [dict(mode="stream", workers=0), dict(mode="stream", workers=2), dict(mode="resident")]
IDS = ["stream-in-process", "stream-2-workers", "resident"]


@pytest.fixture
def loaders():
    made = []

    def make(location, split, **settings):
        base = dict(batch_size=8, device="cpu", train=split == "train", seed=0)
        loader = build_loader(location, split, LoaderSpec(**{**base, **settings}))
        made.append(loader)
        return loader

    yield make
    for loader in made:
        loader.close()


def _pictures(loader, epoch: int = 0) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """key -> (its image cut from the canvas, its labels), over one epoch."""
    loader.set_epoch(epoch)
    found = {}
    for batch in loader:
        for row, key in enumerate(batch.keys):
            height, width = batch.sizes[row].tolist()
            labels = batch.labels[row].clone() if batch.labels is not None else None
            found[key] = (batch.images[row, :height, :width].clone(), labels)
    return found


@pytest.mark.parametrize("settings", DEVICE_MODES, ids=IDS)
def test_device_decode_gives_the_host_decode_pixels_and_labels(sample_shards_jpeg, loaders, settings):
    host = _pictures(loaders(sample_shards_jpeg, "val", mode="stream", workers=0))
    device = _pictures(loaders(sample_shards_jpeg, "val", decode="device", **settings))
    assert list(device) == list(host)  # the same keys in the same (manifest) order
    for key, (image, labels) in host.items():
        assert torch.equal(device[key][0], image), key
        assert torch.equal(device[key][1], labels), key


@pytest.mark.parametrize("settings", DEVICE_MODES, ids=IDS)
def test_device_decode_training_epochs_are_exact_and_reshuffled(sample_shards_jpeg, loaders, settings):
    loader = loaders(sample_shards_jpeg, "train", decode="device", **settings)
    epochs = []
    for epoch in range(2):
        loader.set_epoch(epoch)
        keys = [key for batch in loader for key in batch.keys]
        assert len(keys) == loader.num_samples == len(loader) * 8
        assert max(Counter(keys).values()) == 1  # no sample twice in an epoch
        epochs.append(keys)
    assert epochs[0] != epochs[1]
    assert loader.split_samples - loader.num_samples < 8  # only the last partial batch is dropped


def test_device_decode_makes_training_ready_inputs(sample_shards_jpeg, loaders):
    transform = TrainTransform(out_size=96, dtype=torch.bfloat16, channels_last=True)
    for settings in DEVICE_MODES:
        loader = loaders(sample_shards_jpeg, "train", decode="device", transform=transform, **settings)
        batch = next(iter(loader))
        assert batch.inputs.shape == (8, 3, 96, 96) and batch.inputs.dtype == torch.bfloat16
        assert batch.inputs.is_contiguous(memory_format=torch.channels_last)
        assert batch.inputs.float().abs().max() < 5  # normalised


def test_device_decode_eval_inputs_equal_host_decode_inputs(sample_shards_jpeg, loaders):
    transform = EvalTransform(out_size=128, dtype=torch.float32, channels_last=False)
    host = loaders(sample_shards_jpeg, "val", mode="stream", workers=0, transform=transform)
    device = loaders(sample_shards_jpeg, "val", mode="resident", decode="device", transform=transform)
    for a, b in zip(host, device):
        assert a.keys == b.keys
        torch.testing.assert_close(a.inputs, b.inputs)


@pytest.mark.parametrize("settings", DEVICE_MODES, ids=IDS)
def test_a_broken_jpeg_is_named_with_its_shard_or_skipped(sample_shards_jpeg, tmp_path, loaders, settings):
    keys = list(_pictures(loaders(sample_shards_jpeg, "val", mode="stream", workers=0)))
    victim = keys[len(keys) // 3]
    shards = tmp_path / "bad"
    rewrite_with_bad_jpeg(sample_shards_jpeg, shards, victim)
    with pytest.raises(BadSample, match=rf"shard .*val-\d+\.tar, sample {victim}: cannot decode its JPEG"):
        _pictures(loaders(shards, "val", decode="device", **settings))
    loader = loaders(shards, "val", decode="device", skip_bad_samples=True, **settings)
    assert list(_pictures(loader)) == [k for k in keys if k != victim]
    assert loader.skipped_samples == 1


def test_device_decode_refuses_raw_shards(sample_shards_raw):
    with pytest.raises(UserError, match="--decode device reads jpeg shards"):
        build_loader(
            sample_shards_raw, "val", LoaderSpec(batch_size=8, device="cpu", train=False, decode="device")
        )


def _bytes(path: str) -> torch.Tensor:
    with open(path, "rb") as f:
        return torch.frombuffer(bytearray(f.read()), dtype=torch.uint8)


def test_decode_on_device_canvases_sizes_and_the_png_path(coco_sample, tmp_path):
    from PIL import Image

    photos = sorted(glob.glob(str(coco_sample / "images" / "**" / "*.jpg"), recursive=True))[:3]
    png = tmp_path / "one.png"
    Image.open(photos[0]).convert("RGB").save(png)
    encoded = [_bytes(p) for p in photos] + [_bytes(str(png))]
    images, sizes, good = decode_on_device(
        encoded, [KIND_JPEG] * 3 + [KIND_PNG], list("abcd"), canvas_size=640, device=torch.device("cpu")
    )
    assert good == [0, 1, 2, 3] and images.shape == (4, 640, 640, 3) and images.dtype == torch.uint8
    for row, path in enumerate(photos):
        width, height = Image.open(path).size
        assert sizes[row].tolist() == [height, width]
    height, width = sizes[0].tolist()
    assert sizes[3].tolist() == [height, width]
    assert torch.equal(images[3, :height, :width], images[0, :height, :width])  # the lossless PNG of photo 0
    with pytest.raises(BadSample, match="sample a: its image is .* larger than the 64-px canvas"):
        decode_on_device(encoded[:1], [KIND_JPEG], ["a"], canvas_size=64, device=torch.device("cpu"))
    _, _, good = decode_on_device(
        encoded[:2], [KIND_JPEG] * 2, ["a", "b"], canvas_size=64, device=torch.device("cpu"), skip_bad=True
    )
    assert good == []


@pytest.mark.parametrize("settings", DEVICE_MODES, ids=IDS)
def test_training_batches_keep_their_size_when_an_image_fails_to_decode(
    sample_shards_jpeg, tmp_path, loaders, settings
):
    """As host decoding refills its batches, device decoding repeats good images of the batch: a batch
    of one image would break BatchNorm."""
    keys = [k for b in loaders(sample_shards_jpeg, "train", mode="stream", workers=0) for k in b.keys]
    shards = tmp_path / "bad"
    rewrite_with_bad_jpeg(sample_shards_jpeg, shards, keys[5], split="train")
    loader = loaders(shards, "train", decode="device", skip_bad_samples=True, **settings)
    batches = list(loader)
    assert len(batches) == len(loader) and {len(b) for b in batches} == {8}
    assert {b.images.shape[0] for b in batches} == {8} and {b.labels.shape[0] for b in batches} == {8}
    assert keys[5] not in {k for b in batches for k in b.keys}
    assert loader.skipped_samples == 1
