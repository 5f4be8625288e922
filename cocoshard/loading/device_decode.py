"""JPEG bytes -> canvases on the device (`--decode device`): nvJPEG on a GPU, libjpeg-turbo on a CPU.

    images, sizes, good = decode_on_device(encoded, kinds, keys, canvas_size=224, device=device)

Students train on machines with a big GPU and two to eight CPU cores, where decoding on the CPU
sets the pace. With `--decode device` the loaders move the compressed bytes (~12 KB an image
instead of 150 KB of pixels) and each batch is decoded where it is used, in one batched call
(`torchvision.io.decode_jpeg(list, device=...)`). torchvision reads the compressed bytes from host
memory whatever the device, so the bytes stay on the host (in page-locked slots, or for the
resident loader in one pinned tensor of the whole split, ~0.8 GB for the challenge) and only
pixels live on the device. On a CPU the same code decodes on the CPU, so the tests run it.

A `.png` member (a source that was not a JPEG, or CMYK, or larger than the canvas) is decoded on
the CPU and copied over. A batch with a broken JPEG is decoded again one image at a time to name
the broken one (the batched decoder reports no partial results).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torchvision.io as tvio

from cocoshard.loading.decode import BadSample  # and torchvision's decoder notice silenced

KIND_JPEG, KIND_PNG = 0, 1
Where = Callable[[str], str]  # a key -> the shard that holds it, for messages only


def _named(key: str, where: Where | None) -> str:
    return f"shard {where(key)}, sample {key}" if where is not None else f"sample {key}"


def _decode_jpegs(encoded: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    decoded = tvio.decode_jpeg(encoded, mode=tvio.ImageReadMode.RGB, device=device)
    return decoded if isinstance(decoded, list) else [decoded]


def _decode_png(encoded: torch.Tensor, device: torch.device) -> torch.Tensor:
    return tvio.decode_png(encoded, mode=tvio.ImageReadMode.RGB).to(device, non_blocking=True)


def _each_jpeg(
    encoded: list[torch.Tensor],
    keys: Sequence[str],
    device: torch.device,
    skip_bad: bool,
    where: Where | None,
) -> list[torch.Tensor | None]:
    """One at a time, to find which JPEG broke the batch: None for each bad one when skipping."""
    out: list[torch.Tensor | None] = []
    for data, key in zip(encoded, keys, strict=True):
        try:
            out.append(_decode_jpegs([data], device)[0])
        except RuntimeError as exc:
            if not skip_bad:
                raise BadSample(
                    f"{_named(key, where)}: cannot decode its JPEG on {device.type}: "
                    f"{str(exc).splitlines()[0]}"
                ) from None
            out.append(None)
    return out


def decode_on_device(
    encoded: list[torch.Tensor],
    kinds: Sequence[int],
    keys: Sequence[str],
    *,
    canvas_size: int,
    device: torch.device,
    skip_bad: bool = False,
    where: Where | None = None,
) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """(uint8 canvases (M, S, S, 3) and sizes (M, 2) on `device`, the indices of the M images decoded).

    `encoded` are 1-D uint8 CPU tensors of JPEG or PNG bytes (`kinds`); an image whose decoded side
    exceeds `canvas_size` is refused (pack shrinks larger ones into PNG members). Bad images raise
    BadSample naming the key (and its shard, `where(key)`), or with `skip_bad` are left out of the
    indices."""
    jpegs = [i for i, kind in enumerate(kinds) if kind == KIND_JPEG]
    decoded: dict[int, torch.Tensor | None] = {}
    if jpegs:
        batch = [encoded[i] for i in jpegs]
        try:
            pictures: list[torch.Tensor | None] = list(_decode_jpegs(batch, device))
        except RuntimeError:
            pictures = _each_jpeg(batch, [keys[i] for i in jpegs], device, skip_bad, where)
        decoded.update(zip(jpegs, pictures, strict=True))
    for i, kind in enumerate(kinds):
        if kind == KIND_PNG:
            try:
                decoded[i] = _decode_png(encoded[i], device)
            except RuntimeError as exc:
                if not skip_bad:
                    raise BadSample(
                        f"{_named(keys[i], where)}: cannot decode its PNG: {str(exc).splitlines()[0]}"
                    ) from None
                decoded[i] = None
    good = []
    for i in range(len(kinds)):
        picture = decoded.get(i)
        if picture is None:
            continue  # a bad image, skipped
        if max(picture.shape[1:]) > canvas_size:
            if not skip_bad:
                raise BadSample(
                    f"{_named(keys[i], where)}: its image is {picture.shape[1]}x{picture.shape[2]}, larger "
                    "than "
                    f"the {canvas_size}-px canvas of these shards"
                )
            continue
        good.append(i)
    images = torch.empty((len(good), canvas_size, canvas_size, 3), dtype=torch.uint8, device=device)
    for row, i in enumerate(good):
        height, width = decoded[i].shape[1:]
        images[row, :height, :width] = decoded[i].permute(1, 2, 0)
    # the sizes are known on the host: sent without waiting for the device
    sizes = torch.tensor([list(decoded[i].shape[1:]) for i in good], dtype=torch.int64).reshape(len(good), 2)
    if device.type == "cuda":
        sizes = sizes.pin_memory().to(device, non_blocking=True)
    return images, sizes, good
