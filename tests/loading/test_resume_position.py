"""An epoch resumed at batch k yields exactly what the uninterrupted epoch yields from batch k: the
same keys, the same augmented pixels, in every loader (what a mid-epoch checkpoint relies on)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cocoshard.loading.augment import TrainTransform
from cocoshard.loading.batch import Batch
from cocoshard.loading.gpu_resident import GpuResidentLoader
from cocoshard.loading.loader import build_loader
from cocoshard.loading.resident import load_split
from cocoshard.loading.spec import Loader, LoaderSpec
from cocoshard.prepare.manifest import load_manifest
from conftest import epoch_keys, rewrite_with_bad_jpeg

EPOCH = 2
LOADERS = {
    "stream, in process": dict(mode="stream", workers=0),
    "stream, 2 workers": dict(mode="stream", workers=2),
    "resident, in process": dict(mode="resident", workers=0),
    "resident, 2 workers": dict(mode="resident", workers=2),
    "resident bytes, decoded here": dict(mode="resident", decode="device"),
    "stream bytes, decoded here": dict(mode="stream", decode="device", workers=2),
    "stream, rank 1 of 2": dict(mode="stream", workers=0, rank=1, world_size=2),
    "resident, rank 1 of 2": dict(mode="resident", workers=0, rank=1, world_size=2),
}


def _spec(**settings: object) -> LoaderSpec:
    transform = TrainTransform(out_size=32, scale=(0.5, 1.0))
    return LoaderSpec(
        **{"batch_size": 8, "device": "cpu", "train": True, "seed": 3, "transform": transform, **settings}
    )


def _epoch(loader: Loader, start: int = 0) -> list[Batch]:
    loader.set_epoch(EPOCH, start)
    return [Batch(None, None, b.labels.clone(), list(b.keys), inputs=b.inputs.clone()) for b in loader]


def _assert_same(resumed: list[Batch], reference: list[Batch]) -> None:
    assert [b.keys for b in resumed] == [b.keys for b in reference]
    for a, b in zip(resumed, reference):
        assert torch.equal(a.inputs, b.inputs) and torch.equal(a.labels, b.labels)


@pytest.mark.parametrize("settings", LOADERS.values(), ids=LOADERS.keys())
def test_a_resumed_epoch_continues_exactly(
    sample_shards_jpeg: Path, sample_shards_raw: Path, settings
) -> None:
    shards = sample_shards_jpeg if settings.get("decode") == "device" else sample_shards_raw
    with build_loader(shards, "train", _spec(**settings)) as loader:
        whole = _epoch(loader)
        assert len(whole) == len(loader) >= 4
        for start in (1, len(whole) - 1, len(whole)):
            _assert_same(_epoch(loader, start), whole[start:])
        _assert_same(_epoch(loader), whole)  # and the start was for that iteration only


def test_the_gpu_resident_loader_resumes_exactly(sample_shards_raw: Path) -> None:
    """Its code is the same on any device: here the split lives on the CPU."""
    spec = _spec(mode="resident")
    manifest = load_manifest(sample_shards_raw)
    loader = GpuResidentLoader(
        manifest, spec, load_split(manifest, "train", spec, torch.device("cpu"), False)
    )
    whole = _epoch(loader)
    assert len(whole) == len(loader) and len({k for b in whole for k in b.keys}) == 8 * len(whole)
    _assert_same(_epoch(loader, 3), whole[3:])
    with build_loader(sample_shards_raw, "train", spec) as host:  # the same rows, epoch by epoch
        assert epoch_keys(host, EPOCH) == [k for b in whole for k in b.keys]


def test_a_stream_epoch_with_bad_samples_resumes_exactly(sample_shards_jpeg: Path, tmp_path: Path) -> None:
    """A skipped bad sample changes what every later batch of its worker holds: the replay sees it."""
    with build_loader(sample_shards_jpeg, "train", _spec(workers=2)) as loader:
        victim = epoch_keys(loader, EPOCH)[3]
    shards = tmp_path / "bad"
    rewrite_with_bad_jpeg(sample_shards_jpeg, shards, victim, split="train")
    with build_loader(shards, "train", _spec(workers=2, skip_bad_samples=True)) as loader:
        whole = _epoch(loader)
        assert victim not in {k for b in whole for k in b.keys} and loader.skipped_samples == 1
        _assert_same(_epoch(loader, 2), whole[2:])


def test_a_start_beyond_the_epoch_is_refused(sample_shards_raw: Path) -> None:
    with build_loader(sample_shards_raw, "train", _spec()) as loader:
        with pytest.raises(ValueError, match="cannot start at batch"):
            loader.set_epoch(0, len(loader) + 1)
