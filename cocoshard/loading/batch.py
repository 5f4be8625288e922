"""`Batch`: what every loader yields, the one type the loaders and their callers share.

uint8 canvases (N, S, S, 3) with each image in its top-left (h, w) corner, the (h, w) sizes, float32
multi-hot labels (None for the test split) and the sample keys. A stream batch also says which
worker buffer it arrived in, so that the buffer can go back to its worker once nobody holds it
(`cocoshard.loading.buffers`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Optional

import torch


@dataclass
class Batch:
    """uint8 images (N, S, S, 3), int64 sizes (N, 2) as (h, w), float32 labels (N, 80) or None, keys."""

    images: torch.Tensor
    sizes: torch.Tensor
    labels: Optional[torch.Tensor]
    keys: list[str]
    skipped: int = field(default=0, repr=False)  # bad samples met while assembling this batch
    slot: Optional[tuple[int, int]] = field(default=None, repr=False)  # (worker, buffer) it came in
    pinned: bool = field(default=False, repr=False)  # a page-locked copy: its buffer is free again

    def __len__(self) -> int:
        return len(self.keys)

    def pin_memory(self) -> "Batch":
        """Page-locked copy, so the copy to the GPU can overlap compute (the DataLoader calls this)."""
        labels = None if self.labels is None else self.labels.pin_memory()
        return replace(self, images=self.images.pin_memory(), sizes=self.sizes.pin_memory(), labels=labels,
                       pinned=True)

    def to(self, device: torch.device, non_blocking: bool = True) -> "Batch":
        """The batch on `device`, labels as float32."""
        labels = None if self.labels is None else self.labels.to(device, non_blocking=non_blocking).float()
        return replace(
            self,
            images=self.images.to(device, non_blocking=non_blocking),
            sizes=self.sizes.to(device, non_blocking=non_blocking),
            labels=labels,
        )
