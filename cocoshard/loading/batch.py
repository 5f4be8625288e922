"""The two sides of a batch: `HostBatch` before it crosses to the device, `Batch` after.

A host source (worker processes or this process) fills a *slot*: named tensors in memory it lends
out (`cocoshard.loading.buffers`). `HostBatch` is such a slot as the device stage receives it:
views of its first `size` rows, the sample keys, how many bad samples were skipped filling it, and
which slot to give back once the batch is done with. `cocoshard.loading.to_device.ToDevice` turns it
into a `Batch`, the one type every loader yields: everything on the training device.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

# The tensors a slot may hold (`HostBatch.tensors`):
INPUTS = "inputs"  # training-ready (N, out, out, 3) NHWC rows, made on the host (a CPU run)
IMAGES = "images"  # uint8 canvases (N, S, S, 3), each image in its top-left (h, w) corner
SIZES = "sizes"  # int64 (N, 2): each image's (h, w)
LABELS = "labels"  # uint8 (N, 80) multi-hot (labelled splits)
BYTES = "bytes"  # uint8 compressed images back to back (`--decode device`)
SPANS = "spans"  # int64 (N, 2): each image's (start, length) in BYTES, start -1: in `spill`
KINDS = "kinds"  # uint8 (N,): each image's codec (`device_decode.KIND_JPEG` / `KIND_PNG`)

SlotKey = tuple[int, int]  # (worker, slot number): which slot to give back


@dataclass
class HostBatch:
    """A filled slot on the host: `tensors` are views of its first rows (see the names above)."""

    tensors: dict[str, torch.Tensor]
    keys: list[str]
    skipped: int  # bad samples met filling it (with skip_bad_samples)
    slot: SlotKey
    number: int  # the batch's number in its epoch (seeds its augmentation)
    spill: dict[int, bytes] | None = None  # compressed images that did not fit the slot, by row

    def __len__(self) -> int:
        return len(self.keys)


@dataclass
class Batch:
    """A batch on the device: training-ready `inputs` (N, 3, out, out) when the loader has a
    transform (then images and sizes may be None), else uint8 canvases (N, S, S, 3) and their int64
    (h, w) sizes; float32 labels (N, 80) or None for the test split; the sample keys."""

    images: torch.Tensor | None
    sizes: torch.Tensor | None
    labels: torch.Tensor | None
    keys: list[str]
    inputs: torch.Tensor | None = None
    skipped: int = field(default=0, repr=False)  # bad samples met while assembling this batch

    def __len__(self) -> int:
        return len(self.keys)
