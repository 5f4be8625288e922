"""The loader contract: one frozen spec in (`LoaderSpec`), one protocol out (`Loader`).

    spec = LoaderSpec(batch_size=128, device=torch.device("cuda"), train=True, seed=0, workers=8,
                      transform=TrainTransform(224, dtype=torch.bfloat16))
    with build_loader("shards", "train", spec) as loader:     # cocoshard.loading.loader
        for epoch in range(epochs):
            loader.set_epoch(epoch)
            for batch in loader:       # len(loader) Batches, the same count on every rank
                model(batch.inputs)    # (128, 3, 224, 224) bf16 channels_last, on the device

Where a batch becomes training-ready is decided here, once (`LoaderSpec.augment_on_host`): on a
CPU, where the batch is made (in each worker process, so the per-image work spreads over them);
on CUDA, and whenever the device decodes the images, on the device after the batch has crossed
(`cocoshard.loading.to_device`). The counts of worker processes and threads are decided by the
command's thread plan (`cocoshard.machine.thread_plan`) and given here.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal, Protocol

import torch

from cocoshard.errors import UserError
from cocoshard.loading.augment import Transform
from cocoshard.loading.batch import Batch
from cocoshard.prepare.manifest import Manifest

Mode = Literal["stream", "resident"]
Decode = Literal["host", "device"]
MODES: tuple[Mode, ...] = ("stream", "resident")
DECODES: tuple[Decode, ...] = ("host", "device")


@dataclass(frozen=True)
class LoaderSpec:
    """What a loader delivers, for whom, and with what resources; checked when made."""

    batch_size: int
    device: torch.device
    train: bool  # shuffled epochs of full batches, equal on every rank; else every sample once, in order
    seed: int = 0
    rank: int = 0
    world_size: int = 1
    mode: Mode = "stream"  # stream the shards, or hold the split in memory
    workers: int = 0  # loader processes (0: batches made in this process)
    threads: int = 1  # this process's threads for the loader's own CPU work (augmentation, loading)
    skip_bad_samples: bool = False  # skip and count undecodable samples instead of stopping
    transform: Transform | None = None  # None: uint8 canvases and sizes instead of `inputs`
    decode: Decode = "host"  # "device": jpeg shards' bytes cross, and are decoded on the device
    shuffle_buffer: int = 1000  # stream: samples mixed across shard segments
    prefetch: int = 2  # stream: batches filled ahead per worker
    memory_limit: int | None = None  # resident: bytes the split may take (default: what is free)

    def __post_init__(self) -> None:
        object.__setattr__(self, "device", torch.device(self.device))
        if self.mode not in MODES:
            raise UserError(f"unknown loader mode {self.mode!r}: choose one of {', '.join(MODES)}")
        if self.decode not in DECODES:
            raise UserError(f"unknown decode {self.decode!r}: choose one of {', '.join(DECODES)}")
        counts = {"batch_size": self.batch_size, "world_size": self.world_size, "threads": self.threads}
        bad = [f"{name}={value}" for name, value in counts.items() if value < 1]
        bad += [
            f"{name}={value}"
            for name, value in (("workers", self.workers), ("prefetch", self.prefetch))
            if value < 0
        ]
        if not 0 <= self.rank < self.world_size:
            bad.append(f"rank={self.rank} of world_size={self.world_size}")
        if bad:
            raise UserError(f"bad loader settings: {', '.join(bad)}")

    @property
    def augment_on_host(self) -> bool:
        """True when the batch is made training-ready where it is made (a CPU run decoding on the
        host), False when the transform runs on the device after the batch has crossed."""
        return self.transform is not None and self.device.type == "cpu" and self.decode == "host"


class Loader(Protocol):
    """What every loader is: exact epochs of `Batch`es on the device."""

    manifest: Manifest
    canvas_size: int  # the side of the uint8 canvases (the shards' size)
    split_samples: int  # samples in the split (those a resident loader could read)
    num_samples: int  # samples this rank reads per epoch

    def __len__(self) -> int:
        """Batches per epoch on this rank (equal on every rank when training)."""
        ...

    def __iter__(self) -> Iterator[Batch]: ...

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """The epoch the next iteration yields (its order and augmentation), from its batch `start`
        on: an epoch resumed mid-way yields what the uninterrupted epoch yields from there."""
        ...

    @property
    def skipped_samples(self) -> int:
        """Bad samples skipped in the latest pass over the split (with skip_bad_samples)."""
        ...

    def close(self) -> None:
        """Stop background work now (worker processes); what callers hold stays valid."""
        ...

    def __enter__(self) -> Loader: ...

    def __exit__(self, *exc: object) -> None: ...
