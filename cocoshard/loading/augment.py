"""Batch augmentation where the batch is: random resized crop + flip, then resample and normalise.

    g = torch.Generator(device=batch.images.device).manual_seed(seed)
    x = train_augment(batch.images, batch.sizes, out_size=224, generator=g)     # (N, 3, 224, 224)
    x = eval_transform(batch.images, batch.sizes, out_size=224, dtype=torch.bfloat16)
    x = TrainTransform(out_size=224, dtype=torch.bfloat16).apply(images, sizes, generator=g)

Input: uint8 canvases (N, S, S, 3) with each image in its top-left (h, w) corner. Crops are drawn
only inside each image's own region, like torchvision's RandomResizedCrop (area scale and aspect
ratio, ten tries, then the largest centred crop of an allowed ratio); evaluation resizes exactly
the image's region to out x out (the whole image, never a centre crop). The boxes then go to
`cocoshard.loading.resample` (the "resize" path on a CPU, "grid" on CUDA), which gives
ImageNet-normalised (N, 3, out, out) in `dtype`, channels_last. `TrainTransform` and
`EvalTransform` (`Transform`) carry these settings, so that a loader can apply them where the batch
is: in its worker processes on a CPU, on the device after the copy on CUDA.

No step on CUDA waits for the device: the crop boxes and flips are drawn there.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from cocoshard.loading.resample import DEFAULT_THREADS, crop_resize_normalise

CROP_ATTEMPTS = 10
RRC_RATIO = (3.0 / 4.0, 4.0 / 3.0)  # aspect ratios of the random resized crop (torchvision's default)


# ------------------------------------------------------------------------------ parameters


def sample_crops(
    sizes: torch.Tensor,
    *,
    generator: torch.Generator | None,
    scale: Sequence[float] = (0.35, 1.0),
    ratio: Sequence[float] = RRC_RATIO,
    attempts: int = CROP_ATTEMPTS,
) -> torch.Tensor:
    """Random resized crop boxes (top, left, height, width), int64 (N, 4), inside each (h, w).

    Vectorised torchvision RandomResizedCrop.get_params: `attempts` draws of area fraction in
    `scale` and log-uniform aspect ratio in `ratio`; the first that fits wins, else the whole image
    cut to the nearest allowed ratio, centred.
    """
    device = sizes.device
    n = sizes.shape[0]
    height, width = sizes[:, 0:1].double(), sizes[:, 1:2].double()
    draws = torch.rand((n, attempts, 2), generator=generator, device=device, dtype=torch.float64)
    area = height * width * (scale[0] + (scale[1] - scale[0]) * draws[..., 0])
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_lo + (log_hi - log_lo) * draws[..., 1])
    crop_w = torch.round(torch.sqrt(area * aspect))
    crop_h = torch.round(torch.sqrt(area / aspect))
    fits = (crop_w >= 1) & (crop_w <= width) & (crop_h >= 1) & (crop_h <= height)
    first = fits.to(torch.uint8).argmax(dim=1, keepdim=True)
    found = fits.any(dim=1, keepdim=True)
    crop_w, crop_h = crop_w.gather(1, first), crop_h.gather(1, first)

    in_ratio = width / height
    whole_w = torch.where(in_ratio > ratio[1], torch.round(height * ratio[1]), width)
    whole_h = torch.where(in_ratio < ratio[0], torch.round(width / ratio[0]), height)
    crop_w = torch.where(found, crop_w, whole_w).clamp(1, None).minimum(width)
    crop_h = torch.where(found, crop_h, whole_h).clamp(1, None).minimum(height)

    where = torch.rand((n, 2), generator=generator, device=device, dtype=torch.float64)
    top = torch.where(
        found, torch.floor(where[:, 0:1] * (height - crop_h + 1)), torch.floor((height - crop_h) / 2)
    )
    left = torch.where(
        found, torch.floor(where[:, 1:2] * (width - crop_w + 1)), torch.floor((width - crop_w) / 2)
    )
    top = top.minimum(height - crop_h)
    left = left.minimum(width - crop_w)
    return torch.cat([top, left, crop_h, crop_w], dim=1).long()


def whole_boxes(sizes: torch.Tensor) -> torch.Tensor:
    """Boxes (0, 0, h, w): each image's whole region."""
    zeros = torch.zeros_like(sizes)
    return torch.cat([zeros, sizes], dim=1).long()


@contextlib.contextmanager
def _one_intra_op_thread(device: torch.device) -> Iterator[None]:
    """Run this thread's CPU tensor ops without OpenMP teams for the duration (thread-local).

    The crop sampling is a few dozen ops on (N, 10) tensors; some still open an OpenMP region,
    and on a loaded 2-core machine those regions took 15% of an augmentation's time.
    """
    previous = torch.get_num_threads()
    if device.type != "cpu" or previous == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


# ------------------------------------------------------------------------------- public API


def train_augment(
    images: torch.Tensor,
    sizes: torch.Tensor,
    *,
    out_size: int,
    generator: torch.Generator | None,
    scale: Sequence[float] = (0.35, 1.0),
    ratio: Sequence[float] = RRC_RATIO,
    flip: bool = True,
    dtype: torch.dtype = torch.float32,
    channels_last: bool = True,
    method: str = "auto",
    threads: int = DEFAULT_THREADS,
    rows: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Random resized crop inside each image + horizontal flip + normalisation, seeded by `generator`.

    `scale` bounds the crop's share of the image area: keep its lower end generous (the default
    0.35, not torchvision's 0.08) so most objects of a multi-label image stay in the frame.
    `sizes` has one row per output image (`images[rows]` when `rows` is given).
    """
    if not 0 < scale[0] <= scale[1] <= 1:
        raise ValueError(f"crop scale must satisfy 0 < min <= max <= 1 (got {tuple(scale)})")
    if not 0 < ratio[0] <= ratio[1]:
        raise ValueError(f"crop ratio must satisfy 0 < min <= max (got {tuple(ratio)})")
    n = sizes.shape[0]
    with _one_intra_op_thread(images.device):
        boxes = sample_crops(sizes.to(images.device), generator=generator, scale=scale, ratio=ratio)
        if flip:
            flips = torch.rand(n, generator=generator, device=images.device) < 0.5
        else:
            flips = torch.zeros(n, dtype=torch.bool, device=images.device)
    return crop_resize_normalise(
        images,
        boxes,
        flips,
        out_size=out_size,
        dtype=dtype,
        channels_last=channels_last,
        method=method,
        threads=threads,
        rows=rows,
        out=out,
    )


def eval_transform(
    images: torch.Tensor,
    sizes: torch.Tensor,
    *,
    out_size: int,
    dtype: torch.dtype = torch.float32,
    channels_last: bool = True,
    method: str = "auto",
    flip: bool = False,
    threads: int = DEFAULT_THREADS,
    rows: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Each image's whole (h, w) region resized to out x out (no crop), normalised; `flip` mirrors
    all of them (test-time augmentation)."""
    boxes = whole_boxes(sizes.to(images.device))
    flips = torch.full((sizes.shape[0],), flip, dtype=torch.bool, device=images.device)
    return crop_resize_normalise(
        images,
        boxes,
        flips,
        out_size=out_size,
        dtype=dtype,
        channels_last=channels_last,
        method=method,
        threads=threads,
        rows=rows,
        out=out,
    )


# ------------------------------------------------------------------------------- transforms


@dataclass(frozen=True)
class TrainTransform:
    """What `train_augment` does to a batch, as settings a loader can carry to where the batch is."""

    out_size: int
    scale: tuple[float, float] = (0.35, 1.0)
    ratio: tuple[float, float] = RRC_RATIO
    flip: bool = True
    dtype: torch.dtype = torch.float32
    channels_last: bool = True
    method: str = "auto"  # resampler: "resize" on a CPU, "grid" on CUDA (see the module doc)
    random = True  # draws from a generator: the loader seeds one per batch (seed, epoch, rank, batch)

    def apply(
        self,
        images: torch.Tensor,
        sizes: torch.Tensor,
        *,
        generator: torch.Generator | None,
        threads: int = DEFAULT_THREADS,
        rows: torch.Tensor | None = None,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return train_augment(
            images,
            sizes,
            out_size=self.out_size,
            generator=generator,
            scale=self.scale,
            ratio=self.ratio,
            flip=self.flip,
            dtype=self.dtype,
            channels_last=self.channels_last,
            method=self.method,
            threads=threads,
            rows=rows,
            out=out,
        )


@dataclass(frozen=True)
class EvalTransform:
    """What `eval_transform` does to a batch (the whole image, resized), as loader settings."""

    out_size: int
    dtype: torch.dtype = torch.float32
    channels_last: bool = True
    flip: bool = False
    method: str = "auto"
    random = False

    def apply(
        self,
        images: torch.Tensor,
        sizes: torch.Tensor,
        *,
        generator: torch.Generator | None = None,
        threads: int = DEFAULT_THREADS,
        rows: torch.Tensor | None = None,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return eval_transform(
            images,
            sizes,
            out_size=self.out_size,
            dtype=self.dtype,
            channels_last=self.channels_last,
            flip=self.flip,
            method=self.method,
            threads=threads,
            rows=rows,
            out=out,
        )


# The settings a loader carries to where the batch is made training-ready.
Transform = TrainTransform | EvalTransform
