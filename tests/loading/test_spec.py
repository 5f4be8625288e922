"""The loader contract: a spec that checks itself, one place deciding where a batch becomes
training-ready, and every loader honouring the same protocol."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cocoshard.errors import UserError
from cocoshard.loading.augment import EvalTransform, TrainTransform
from cocoshard.loading.gpu_resident import GpuResidentLoader
from cocoshard.loading.loader import build_loader
from cocoshard.loading.resident import load_split
from cocoshard.loading.spec import LoaderSpec
from cocoshard.prepare.manifest import load_manifest


@pytest.mark.parametrize(
    "settings, named",
    [
        (dict(batch_size=0), "batch_size=0"),
        (dict(workers=-1), "workers=-1"),
        (dict(threads=0), "threads=0"),
        (dict(rank=2, world_size=2), "rank=2 of world_size=2"),
        (dict(mode="ram"), "unknown loader mode 'ram'"),
        (dict(decode="gpu"), "unknown decode 'gpu'"),
    ],
)
def test_a_spec_that_cannot_work_is_refused_by_name(settings, named) -> None:
    with pytest.raises(UserError, match=named):
        LoaderSpec(**{"batch_size": 8, "device": "cpu", "train": True, **settings})


def test_where_a_batch_becomes_training_ready_is_decided_once() -> None:
    train = TrainTransform(out_size=32)
    assert LoaderSpec(batch_size=8, device="cpu", train=True, transform=train).augment_on_host
    assert not LoaderSpec(
        batch_size=8, device="cpu", train=True, transform=train, decode="device"
    ).augment_on_host
    assert not LoaderSpec(batch_size=8, device="cpu", train=True).augment_on_host  # nothing to make ready
    assert LoaderSpec(batch_size=8, device="cpu", train=True).device == torch.device("cpu")


def _loaders(shards_raw: Path, shards_jpeg: Path, spec: LoaderSpec):
    manifest = load_manifest(shards_raw)
    yield build_loader(shards_raw, "val", spec)
    yield build_loader(shards_raw, "val", LoaderSpec(**{**spec.__dict__, "workers": 2}))
    yield build_loader(shards_raw, "val", LoaderSpec(**{**spec.__dict__, "mode": "resident"}))
    yield build_loader(
        shards_jpeg, "val", LoaderSpec(**{**spec.__dict__, "mode": "resident", "decode": "device"})
    )
    yield GpuResidentLoader(manifest, spec, load_split(manifest, "val", spec, torch.device("cpu"), False))


def test_every_loader_honours_the_protocol(sample_shards_raw: Path, sample_shards_jpeg: Path) -> None:
    spec = LoaderSpec(batch_size=16, device="cpu", train=False, transform=EvalTransform(out_size=24))
    for loader in _loaders(sample_shards_raw, sample_shards_jpeg, spec):
        with loader:
            loader.set_epoch(1)
            batches = list(loader)
            assert len(batches) == len(loader) == 3  # 38 val images in batches of 16
            assert sum(len(b) for b in batches) == loader.num_samples == loader.split_samples == 38
            assert loader.canvas_size == 224 and loader.manifest.size == 224
            assert loader.skipped_samples == 0
            for batch in batches:
                assert batch.inputs.shape == (len(batch), 3, 24, 24) and batch.inputs.dtype == torch.float32
                assert batch.labels.shape == (len(batch), 80) and batch.labels.dtype == torch.float32
            assert [k for b in batches for k in b.keys] == sorted(k for b in batches for k in b.keys)
