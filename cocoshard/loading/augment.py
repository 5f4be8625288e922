"""Batch augmentation where the batch is: random resized crop + flip + fused normalisation.

    g = torch.Generator(device=batch.images.device).manual_seed(seed)
    x = train_augment(batch.images, batch.sizes, out_size=224, generator=g)     # (N, 3, 224, 224)
    x = eval_transform(batch.images, batch.sizes, out_size=224, dtype=torch.bfloat16)
    x = TrainTransform(out_size=224, dtype=torch.bfloat16).apply(images, sizes, generator=g)

Input: uint8 canvases (N, S, S, 3) with each image in its top-left (h, w) corner. Crops are drawn
only inside each image's own region, like torchvision's RandomResizedCrop (area scale and aspect
ratio, ten tries, then the largest centred crop of an allowed ratio); evaluation resizes exactly
the image's region to out x out (the whole image, never a centre crop). Output: ImageNet-normalised
(N, 3, out, out) in `dtype`, channels_last (the NHWC memory of a permuted NHWC tensor, no copy).
`TrainTransform` and `EvalTransform` carry these settings, so that a loader can apply them where
the batch is: in its worker processes on a CPU, on the device after the copy on CUDA.

Two resamplers share the crop parameters, so they differ only by rounding:
- "resize" (default on the CPU): each crop goes through PyTorch's separable uint8 bilinear kernel
  (AVX2; antialiased only when it shrinks: the challenge's images never need it, and without it
  the kernel is 15% faster with identical output), then straight into its normalised row while
  still in cache; images can be split across threads. 8x faster on a CPU than a batched
  `grid_sample`.
- "grid" (default on CUDA): the whole batch in one `grid_sample` from per-image coordinate vectors
  that reproduce `interpolate`'s bilinear sampling (edges clamped to the image's own region, so
  nothing outside it leaks in); no antialiasing when shrinking.

No step on CUDA waits for the device: the crop boxes and flips are drawn there, and the
normalisation constants are made once per device and kept.
"""

from __future__ import annotations

import contextlib
import math
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import torch
import torch.nn.functional as F

from cocoshard.loading.buffers import BufferPool

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
METHODS = ("auto", "resize", "grid")
CROP_ATTEMPTS = 10
RRC_RATIO = (3.0 / 4.0, 4.0 / 3.0)  # aspect ratios of the random resized crop (torchvision's default)
# CPU threads of the "resize" path. One by default: loader workers and other processes usually
# hold the other cores. Loaders say how many are left (`loader.augment_threads`); pass that.
DEFAULT_THREADS = 1

_pool = BufferPool()
_threads: tuple[int, ThreadPoolExecutor] | None = None  # (how many, the pool)
_threads_lock = threading.Lock()
_constants: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


# ------------------------------------------------------------------------------ parameters


def sample_crops(
    sizes: torch.Tensor,
    *,
    generator: torch.Generator,
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


# ------------------------------------------------------------------------------ resamplers


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


def _single_threaded() -> None:
    # Per-thread setting: each image is small work, and two threads each opening an OpenMP team
    # of two on two cores cost more than they save.
    torch.set_num_threads(1)


def _thread_pool(threads: int) -> ThreadPoolExecutor:
    global _threads
    with _threads_lock:
        if _threads is None or _threads[0] != threads:
            if _threads is not None:
                _threads[1].shutdown(wait=False)
            _threads = (
                threads,
                ThreadPoolExecutor(
                    max_workers=threads, thread_name_prefix="cocoshard-augment", initializer=_single_threaded
                ),
            )
        return _threads[1]


def resize_into(crop: torch.Tensor, out: torch.Tensor) -> None:
    """Bilinear-resize one (1, 3, h, w) crop into the (1, 3, o, o) tensor `out`.

    Antialiased only when the crop is larger than `out` in a dimension: when it grows, PyTorch's
    antialiased kernel gives the same pixels as the plain one, which is 15% faster on uint8.
    """
    if crop.shape[-2:] == out.shape[-2:]:
        out.copy_(crop)
        return
    shrinks = crop.shape[-2] > out.shape[-2] or crop.shape[-1] > out.shape[-1]
    source = crop if crop.device.type == "cpu" and crop.dtype == torch.uint8 else crop.float()
    out.copy_(
        F.interpolate(source, size=out.shape[-2:], mode="bilinear", align_corners=False, antialias=shrinks)
    )


def _resize_normalise_each(
    images: torch.Tensor,
    boxes: torch.Tensor,
    flips: torch.Tensor,
    rows: Optional[torch.Tensor],
    result: torch.Tensor,
    threads: int,
) -> None:
    """Per image: crop, flip, resize (uint8 on CPU), normalise into row n of `result` (N, o, o, 3).

    Image n is `images[rows[n]]` (all of `images` in order without `rows`): a loader holding a
    split in memory hands over the split and the rows, and no batch is gathered first. Each image
    goes all the way while it sits in the core's cache (a 150 KB uint8 slot, a 600 KB float row);
    on the 2-core CPU that takes a third less CPU time than resizing the batch and then
    normalising it in whole-batch passes. On the CPU the work runs in `threads` pool threads with
    one OpenMP thread each: OpenMP regions on a busy machine stall (a 3 ms copy took 1 s).
    """
    n, size, device, dtype = result.shape[0], result.shape[1], images.device, result.dtype
    targets = result.view(n, size, size * 3).unbind(0)
    source = images.permute(0, 3, 1, 2)
    box_rows, flip_rows = boxes.tolist(), flips.tolist()
    source_rows = rows.tolist() if rows is not None else range(n)
    work_dtype = torch.uint8 if device.type == "cpu" else torch.float32
    scale, shift = _row_constants(size, device)
    direct = dtype == torch.float32  # else normalise in float32, then round once to `dtype`

    def work(lo: int, hi: int) -> None:
        slot = torch.empty((1, size, size, 3), dtype=work_dtype, device=device)
        resized, pixels = slot.permute(0, 3, 1, 2), slot.view(size, size * 3)
        scratch = None if direct else torch.empty((size, size * 3), device=device)
        for i in range(lo, hi):
            top, left, height, width = box_rows[i]
            j = source_rows[i]
            crop = source[j : j + 1, :, top : top + height, left : left + width]
            resize_into(crop.flip(-1) if flip_rows[i] else crop, resized)
            target = targets[i] if direct else scratch
            target.copy_(pixels)
            torch.addcmul(shift, target, scale, out=target)
            if not direct:
                targets[i].copy_(target)

    if device.type != "cpu" or threads <= 1 or n < 2:
        work(0, n)
        return
    step = -(-n // threads)
    list(_thread_pool(threads).map(lambda lo: work(lo, min(n, lo + step)), range(0, n, step)))


def _source_grid(start: torch.Tensor, length: torch.Tensor, out_size: int, canvas: int) -> torch.Tensor:
    """grid_sample coordinates (N, out) that sample [start, start + length) like `interpolate` does."""
    step = length.double()[:, None] / out_size
    dst = torch.arange(out_size, device=start.device, dtype=torch.float64)[None, :] + 0.5
    src = (dst * step - 0.5).clamp(min=0).minimum(length.double()[:, None] - 1)
    return ((2 * (start.double()[:, None] + src) + 1) / canvas - 1).float()


def _grid_resample(
    images: torch.Tensor, boxes: torch.Tensor, flips: torch.Tensor, out_size: int
) -> torch.Tensor:
    """The whole batch in one grid_sample: float32 (N, 3, out, out), values 0-255."""
    n, canvas = images.shape[0], images.shape[1]
    gx = _source_grid(boxes[:, 1], boxes[:, 3], out_size, canvas)
    gy = _source_grid(boxes[:, 0], boxes[:, 2], out_size, canvas)
    gx = torch.where(flips.to(gx.device)[:, None], gx.flip(1), gx)
    grid = torch.stack(
        (gx[:, None, :].expand(n, out_size, out_size), gy[:, :, None].expand(n, out_size, out_size)), dim=-1
    )
    source = images.permute(0, 3, 1, 2).float()
    return F.grid_sample(source, grid, mode="bilinear", padding_mode="border", align_corners=False)


# --------------------------------------------------------------------------- normalisation


def _constants_on(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel 1/std and -mean/std for 0-255 pixels, float32 on `device`; made once per device
    (a tensor built from Python numbers on a GPU is a blocking host-to-device copy)."""
    key = ("channels", device)
    if key not in _constants:
        mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float64) * 255
        std = torch.tensor(IMAGENET_STD, dtype=torch.float64) * 255
        _constants[key] = ((1 / std).float().to(device), (-mean / std).float().to(device))
    return _constants[key]


def _row_constants(out_size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The same constants repeated along one NHWC row of out_size pixels: x * scale + shift."""
    key = ("row", out_size, device)
    if key not in _constants:
        scale, shift = _constants_on(device)
        _constants[key] = (scale.repeat(out_size), shift.repeat(out_size))
    return _constants[key]


def _normalise_nchw(pixels: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    scale, shift = _constants_on(pixels.device)
    normalised = torch.addcmul(shift.view(1, 3, 1, 1), pixels, scale.view(1, 3, 1, 1))
    return normalised.to(dtype=dtype, memory_format=torch.channels_last)


# ------------------------------------------------------------------------------- public API


def output_buffer(
    n: int, out_size: int, dtype: torch.dtype, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """An (N, out, out, 3) NHWC tensor for `out=`: its permute(0, 3, 1, 2) is the channels_last result."""
    return torch.empty((n, out_size, out_size, 3), dtype=dtype, device=device)


def crop_resize_normalise(
    images: torch.Tensor,
    boxes: torch.Tensor,
    flips: torch.Tensor,
    *,
    out_size: int,
    dtype: torch.dtype = torch.float32,
    channels_last: bool = True,
    method: str = "auto",
    threads: int = DEFAULT_THREADS,
    rows: Optional[torch.Tensor] = None,
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Crop each box, resize to out x out, mirror where `flips`, normalise: (N, 3, out, out) in `dtype`.

    `rows` picks image n from `images[rows[n]]` ("resize" only). `out`, an NHWC buffer from
    `output_buffer`, receives the result (channels_last). `threads` splits the CPU "resize" path's
    images across that many threads (more only pays on cores nothing else uses).
    """
    if method not in METHODS:
        raise ValueError(f"unknown resampling method {method!r}: choose one of {', '.join(METHODS)}")
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected uint8 canvases (N, S, S, 3), got {tuple(images.shape)} {images.dtype}")
    if method == "auto":
        method = "resize" if images.device.type == "cpu" else "grid"
    n = boxes.shape[0]
    if method == "grid":
        source = images if rows is None else images.index_select(0, rows.to(images.device))
        result = _normalise_nchw(_grid_resample(source.contiguous(), boxes, flips, out_size), dtype)
        if out is not None:
            out[:n].copy_(result.permute(0, 2, 3, 1))
            result = out[:n].permute(0, 3, 1, 2)
    else:
        target = out[:n] if out is not None else _pool.take((n, out_size, out_size, 3), dtype, images.device)
        _resize_normalise_each(images.contiguous(), boxes.cpu(), flips.cpu(), rows, target, threads)
        result = target.permute(0, 3, 1, 2)
    return result if channels_last else result.contiguous()


def train_augment(
    images: torch.Tensor,
    sizes: torch.Tensor,
    *,
    out_size: int,
    generator: torch.Generator,
    scale: Sequence[float] = (0.35, 1.0),
    ratio: Sequence[float] = RRC_RATIO,
    flip: bool = True,
    dtype: torch.dtype = torch.float32,
    channels_last: bool = True,
    method: str = "auto",
    threads: int = DEFAULT_THREADS,
    rows: Optional[torch.Tensor] = None,
    out: Optional[torch.Tensor] = None,
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
    rows: Optional[torch.Tensor] = None,
    out: Optional[torch.Tensor] = None,
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
    random = True  # draws from a generator: the loader seeds one per epoch, rank and worker

    def apply(
        self,
        images: torch.Tensor,
        sizes: torch.Tensor,
        *,
        generator: Optional[torch.Generator],
        threads: int = DEFAULT_THREADS,
        rows: Optional[torch.Tensor] = None,
        out: Optional[torch.Tensor] = None,
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
        generator: Optional[torch.Generator] = None,
        threads: int = DEFAULT_THREADS,
        rows: Optional[torch.Tensor] = None,
        out: Optional[torch.Tensor] = None,
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
