"""The pipelines the loader benchmark measures, behind one shape: epochs of training-ready batches.

    pipeline = shard_pipeline("stream-raw", data, batch=128, workers=2, size=224, device=device)
    for inputs, labels, keys in pipeline.epoch(3): ...     # (N, 3, 224, 224), (N, 80), N keys

"Training-ready": the batch as the model takes it, on the training device, augmented (random
resized crop 0.35-1, aspect 3/4-4/3, horizontal flip), ImageNet-normalised, (N, 3, S, S) in the
channels_last memory format. cocoshard's pipelines deliver what `cocoshard train` feeds its model
with AMP on (bf16, or fp16 on a GPU without bf16); the folder baseline and the peers deliver
float32, as their own examples do. Every pipeline's first batch is checked (`check_first_batch`):
shape, dtype, memory format, value range, and labels equal to the `.cls` files of its keys.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

Batches = Iterator[tuple[torch.Tensor, torch.Tensor | None, list[str]]]
SCALE, RATIO = (0.35, 1.0), (3 / 4, 4 / 3)


class PeerUnavailable(Exception):
    """A peer that cannot run here; the message says why (reported as skipped, never a failure)."""


@dataclass
class Pipeline:
    name: str
    epoch: Callable[[int], Batches]
    output: str  # "bf16 channels_last", "float32 channels_last"
    dtype: torch.dtype
    version: str = ""
    peer: bool = False
    notes: str = ""  # what it took to run it correctly
    close: Callable[[], None] = field(default=lambda: None)


def training_dtype(device: torch.device) -> torch.dtype:
    """What `cocoshard train` feeds its model with AMP on (its default) on a GPU: bf16 (fp16 where
    the GPU lacks it). On a CPU bf16 too, so that the figures are of a GPU run's host work (train's
    own AMP is float32 on a CPU that computes no bf16 natively)."""
    from cocoshard.training.runtime import resolve_amp_dtype

    dtype = resolve_amp_dtype(True, "auto" if device.type == "cuda" else "bf16", device)
    assert dtype is not None
    return dtype


def check_first_batch(pipeline: Pipeline, batch: tuple, data, size: int, expected: int) -> None:
    """Raise AssertionError naming the pipeline when its batch is not what training needs."""
    inputs, labels, keys = batch
    name = pipeline.name
    assert tuple(inputs.shape) == (expected, 3, size, size), f"{name}: shape {tuple(inputs.shape)}"
    assert inputs.dtype == pipeline.dtype, f"{name}: dtype {inputs.dtype}, said {pipeline.dtype}"
    assert inputs.is_contiguous(memory_format=torch.channels_last), f"{name}: not channels_last"
    low, high = float(inputs.min()), float(inputs.max())
    assert -2.2 < low < -0.5 and 0.5 < high < 2.7, (
        f"{name}: values {low:.2f}..{high:.2f} are not ImageNet-normalised"
    )
    assert len(keys) == expected and len(set(keys)) == expected, f"{name}: {len(set(keys))} distinct keys"
    truth = np.stack([data.labels[key] for key in keys])
    assert labels is not None and np.array_equal(labels.cpu().to(torch.uint8).numpy(), truth), (
        f"{name}: labels differ from .cls"
    )


# ----------------------------------------------------------------------------- ours


def shard_pipeline(name: str, data, batch: int, workers: int, size: int, device: torch.device) -> Pipeline:
    """stream-jpeg, stream-raw, resident, stream-jpeg-device or resident-jpeg-device: cocoshard's
    loader with the training transform (`-device`: `--decode device`, each batch's JPEG bytes
    decoded where the batch is used; on a CPU, by this process)."""
    from cocoshard.loading.augment import TrainTransform
    from cocoshard.loading.loader import build_loader
    from cocoshard.loading.spec import LoaderSpec
    from cocoshard.machine import thread_plan

    mode = "resident" if name.startswith("resident") else "stream"
    decode = "device" if name.endswith("-device") else "host"
    pixel_format = "jpeg" if name.startswith("stream-jpeg") or decode == "device" else "raw"
    dtype = training_dtype(device)
    # the workers and threads a training run with these workers would use (cocoshard.machine.thread_plan)
    threads = thread_plan(
        "train", device_type=device.type, workers=workers, threads=None, measure_busy=False
    ).loader
    spec = LoaderSpec(
        batch_size=batch,
        device=device,
        mode=mode,
        train=True,
        workers=workers,
        threads=threads,
        transform=TrainTransform(out_size=size, scale=SCALE, ratio=RATIO, dtype=dtype),
        decode=decode,
    )
    loader = build_loader(data.shards[pixel_format], "train", spec)

    def epoch(number: int) -> Batches:
        loader.set_epoch(number)
        for b in loader:
            yield b.inputs, b.labels, b.keys

    kind = {
        "stream-jpeg": "jpeg shards, decoded by workers",
        "stream-raw": "raw shards",
        "resident": "the split in one uint8 tensor",
        "stream-jpeg-device": "jpeg shards, bytes decoded by the training process",
        "resident-jpeg-device": "the split's JPEG bytes in one tensor, decoded per batch",
    }[name]
    return Pipeline(
        name,
        epoch,
        f"{str(dtype).split('.')[-1]} channels_last",
        dtype,
        notes=f"{kind}, {workers} workers",
        close=loader.close,
    )


# ----------------------------------------------------------------------------- the baseline


def folder_pipeline(data, batch: int, workers: int, size: int, device: torch.device) -> Pipeline:
    """The statement-style folder Dataset: PIL, per-sample torchvision transforms, float32."""
    from baseline import build_folder_loader

    loader = build_folder_loader(
        data.root, batch_size=batch, workers=workers, size=size, scale=SCALE, keys=data.keys, with_keys=True
    )

    def epoch(number: int) -> Batches:
        for images, labels, keys in loader:
            yield (
                images.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last),
                labels.to(device, non_blocking=True),
                list(keys),
            )

    return Pipeline(
        "folder",
        epoch,
        "float32 channels_last",
        torch.float32,
        notes=f"PIL + torchvision transforms per sample, {workers} workers",
    )
