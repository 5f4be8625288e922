"""The GPU tier of the loaders: every CUDA branch against its CPU result on the same keys.

Runs with `pytest -m cuda` on a machine with CUDA (`tools/device-check` runs it first); elsewhere
each test is skipped with the reason. What each covers: page-locked worker slots, their
asynchronous copies and their release (`to_device.PinnedSlots`, `Loans.lend_until`), the split
resident on the GPU and staged through pinned host memory, the batched grid resampler against the
CPU resize path, `--decode device` (nvJPEG) against host decoding, exact epochs, and the device
stage running one batch ahead without the consumer waiting for the host.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from cocoshard.loading import resident
from cocoshard.loading.augment import EvalTransform, TrainTransform, sample_crops
from cocoshard.loading.gpu_resident import GpuResidentLoader
from cocoshard.loading.loader import build_loader
from cocoshard.loading.pipeline import Pipeline
from cocoshard.loading.resample import IMAGENET_STD, crop_resize_normalise
from cocoshard.loading.spec import Loader, LoaderSpec

pytestmark = pytest.mark.cuda
CUDA = torch.device("cuda")
# nvJPEG and libjpeg-turbo are two implementations of the JPEG standard's inverse DCT and chroma
# upsampling: the standard allows them to differ by a few levels per pixel. What we hold them to:
MEAN_LEVELS, P999_LEVELS = 1.0, 8


def _spec(device: torch.device | str, **settings: object) -> LoaderSpec:
    return LoaderSpec(**{"batch_size": 8, "device": device, "train": False, "seed": 5, **settings})


def _pictures(loader: Loader, epoch: int = 0) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """key -> (its image cut from its canvas, its labels), on the CPU, over one epoch."""
    loader.set_epoch(epoch)
    found = {}
    for batch in loader:
        assert batch.images is not None and batch.sizes is not None and batch.labels is not None
        for row, key in enumerate(batch.keys):
            height, width = batch.sizes[row].tolist()
            found[key] = (batch.images[row, :height, :width].cpu(), batch.labels[row].cpu())
    return found


def _same_pictures(gpu: Loader, cpu: Loader) -> None:
    on_gpu, on_cpu = _pictures(gpu), _pictures(cpu)
    assert list(on_gpu) == list(on_cpu)
    for key, (image, labels) in on_cpu.items():
        assert torch.equal(on_gpu[key][0], image) and torch.equal(on_gpu[key][1], labels), key


def test_stream_slots_are_pinned_copied_and_released(sample_shards_raw: Path) -> None:
    gpu = build_loader(sample_shards_raw, "val", _spec(CUDA, workers=2))
    assert isinstance(gpu, Pipeline) and gpu.to_device.pinned is not None
    with build_loader(sample_shards_raw, "val", _spec("cpu", workers=2)) as cpu, warnings.catch_warnings():
        warnings.simplefilter("error")  # a slot that cannot be page-locked warns
        for _ in range(2):  # the second time, new workers with new slots: registered, then released
            batch = next(iter(gpu))
            assert batch.images is not None and batch.images.device.type == "cuda"
            assert gpu.to_device.pinned.pinned and gpu.to_device.pinned._registered
            _same_pictures(gpu, cpu)
            gpu.close()
            assert not gpu.to_device.pinned._registered  # every cudaHostRegister undone


def test_jpeg_decoded_by_workers_reaches_the_gpu_as_it_reaches_the_cpu(sample_shards_jpeg: Path) -> None:
    with (
        build_loader(sample_shards_jpeg, "val", _spec(CUDA, workers=2)) as gpu,
        build_loader(sample_shards_jpeg, "val", _spec("cpu", workers=2)) as cpu,
    ):
        _same_pictures(gpu, cpu)


def test_the_split_resident_on_the_gpu_gives_the_cpu_batches(sample_shards_raw: Path) -> None:
    gpu = build_loader(sample_shards_raw, "train", _spec(CUDA, mode="resident", train=True))
    assert isinstance(gpu, GpuResidentLoader) and gpu.split.images.device.type == "cuda"
    with gpu, build_loader(sample_shards_raw, "train", _spec("cpu", mode="resident", train=True)) as cpu:
        _same_pictures(gpu, cpu)


def test_a_split_staged_through_pinned_host_memory(sample_shards_raw: Path, monkeypatch) -> None:
    monkeypatch.setattr(resident, "DEVICE_SHARE", 0.0)  # as if the GPU were full: the host holds it
    gpu = build_loader(sample_shards_raw, "train", _spec(CUDA, mode="resident", train=True))
    assert isinstance(gpu, Pipeline)
    with gpu, build_loader(sample_shards_raw, "train", _spec("cpu", mode="resident", train=True)) as cpu:
        _same_pictures(gpu, cpu)


def test_the_grid_resampler_on_the_gpu_matches_the_cpu_resize_path(sample_shards_raw: Path) -> None:
    with build_loader(sample_shards_raw, "val", _spec("cpu", batch_size=16)) as loader:
        batch = next(iter(loader))
    assert batch.images is not None and batch.sizes is not None
    boxes = sample_crops(batch.sizes, generator=torch.Generator().manual_seed(2))
    flips = torch.arange(len(batch)) % 2 == 0
    on_cpu = crop_resize_normalise(batch.images, boxes, flips, out_size=224, method="resize")
    on_gpu = crop_resize_normalise(batch.images.to(CUDA), boxes.to(CUDA), flips.to(CUDA), out_size=224)
    # both bilinear on the same boxes: they differ by the uint8 kernel's rounding, a level at most
    assert (on_gpu.cpu() - on_cpu).abs().max() <= 1.1 / 255 / min(IMAGENET_STD)


@pytest.mark.parametrize("mode", ["stream", "resident"])
def test_decode_on_the_gpu_matches_host_decoding(sample_shards_jpeg: Path, mode: str) -> None:
    with (
        build_loader(sample_shards_jpeg, "val", _spec(CUDA, mode=mode, decode="device", workers=2)) as gpu,
        build_loader(sample_shards_jpeg, "val", _spec("cpu", workers=2)) as cpu,
    ):
        on_gpu, on_cpu = _pictures(gpu), _pictures(cpu)
    assert list(on_gpu) == list(on_cpu)
    levels = []
    for key, (image, labels) in on_cpu.items():
        assert on_gpu[key][0].shape == image.shape and torch.equal(on_gpu[key][1], labels), key
        levels.append((on_gpu[key][0].int() - image.int()).abs().flatten().numpy())
    differences = np.concatenate(levels)
    assert differences.mean() <= MEAN_LEVELS and np.quantile(differences, 0.999) <= P999_LEVELS


@pytest.mark.parametrize("settings", [dict(workers=2), dict(mode="resident")], ids=["stream", "resident"])
def test_training_epochs_on_the_gpu_are_exact(sample_shards_raw: Path, settings) -> None:
    seen = []
    for rank in range(2):
        spec = _spec(CUDA, train=True, rank=rank, world_size=2, **settings)
        with build_loader(sample_shards_raw, "train", spec) as loader:
            loader.set_epoch(1)
            keys = [k for b in loader for k in b.keys]
            assert len(keys) == len(loader) * 8 == loader.num_samples and len(set(keys)) == len(keys)
            seen.append(set(keys))
    assert not seen[0] & seen[1]


def test_the_consumer_of_a_batch_made_ahead_never_waits_for_the_host(sample_shards_raw: Path) -> None:
    spec = _spec(CUDA, train=True, workers=2, transform=TrainTransform(out_size=96, dtype=torch.bfloat16))
    with build_loader(sample_shards_raw, "train", spec) as loader:
        batches = iter(loader)
        next(batches)  # warm-up: slots made and page-locked, constants on the device
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            taken = [next(batches).inputs.float().sum() for _ in range(3)]  # device work on each
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert all(torch.isfinite(total) for total in taken)


def test_eval_inputs_made_on_the_gpu_match_those_made_on_the_cpu(sample_shards_jpeg: Path) -> None:
    transform = EvalTransform(out_size=128, dtype=torch.float32, channels_last=True)
    with (
        build_loader(sample_shards_jpeg, "val", _spec(CUDA, workers=2, transform=transform)) as gpu,
        build_loader(sample_shards_jpeg, "val", _spec("cpu", workers=2, transform=transform)) as cpu,
    ):
        for a, b in zip(gpu, cpu, strict=True):
            assert a.keys == b.keys and a.inputs.is_contiguous(memory_format=torch.channels_last)
            assert (a.inputs.cpu() - b.inputs).abs().max() <= 1.1 / 255 / min(IMAGENET_STD)
