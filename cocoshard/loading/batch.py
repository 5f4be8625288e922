"""`Batch`: what every loader yields, the one type the loaders and their callers share.

uint8 canvases (N, S, S, 3) with each image in its top-left (h, w) corner, the (h, w) sizes, float32
multi-hot labels (None for the test split) and the sample keys. A stream batch also says which
worker buffer it arrived in, so that the buffer can go back to its worker once nobody holds it
(`cocoshard.loading.buffers`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Batch:
    """uint8 images (N, S, S, 3), int64 sizes (N, 2) as (h, w), float32 labels (N, 80) or None, keys;
    with a transform, `inputs` (N, 3, out, out) is the training-ready batch (images and sizes may be None)."""

    images: torch.Tensor | None
    sizes: torch.Tensor | None
    labels: torch.Tensor | None
    keys: list[str]
    inputs: torch.Tensor | None = None
    skipped: int = field(default=0, repr=False)  # bad samples met while assembling this batch
    slot: tuple[int, int] | None = field(default=None, repr=False)  # (worker, buffer) it came in

    def __len__(self) -> int:
        return len(self.keys)
