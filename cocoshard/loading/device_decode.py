"""JPEG bytes -> canvases on the device (`--decode device`): nvJPEG on a GPU, libjpeg-turbo on a CPU.

    images, sizes, good = decode_on_device(encoded, kinds, keys, canvas_size=224, device=device)

Students train on machines with a big GPU and two to eight CPU cores, where decoding on the CPU
sets the pace. With `--decode device` the loaders move the compressed bytes (~12 KB an image
instead of 150 KB of pixels) and each batch is decoded where it is used, in one batched call
(torchcodec's or torchvision's `decode_jpeg(list, device=...)`, `image_backend`). The decoders read
the compressed bytes from host memory whatever the device, so the bytes stay on the host (in
page-locked slots, or for the resident loader in one pinned tensor of the whole split, ~0.8 GB for
the challenge) and only pixels live on the device. On a CPU the same code decodes on the CPU, so
the tests run it.

On CUDA the batched decode cannot be handed memory still in use. nvJPEG's hardware engine ignores
the stream it is given, and torchvision allocates the decoded images on the caller's stream from
PyTorch's caching allocator, which hands a block back as soon as it is freed on that stream, while
kernels queued before the free may still read it: the decoder then overwrites them (silently wrong
numbers, NaNs or a device assert elsewhere; pytorch/vision#9606). So the decode runs on a stream of
its own (one per thread and device, `decode_stream`), which is synchronised with the host just
before each decode: no work is then pending on the stream the outputs come from. The caller's
stream waits for the decoded canvases on the device (`wait_stream`, no host wait), and the
canvases are recorded on it so that their memory is not reused before the caller is done.
`tests/loading/test_device_decode_race.py` reproduces the published race and checks it cannot
happen here. The host synchronisation waits only for this thread's previous decode; the loaders
decode one batch ahead so that the training step never waits for it.

A `.png` member (a source that was not a JPEG, or CMYK, or larger than the canvas) and a JPEG
whose EXIF orientation turns it are decoded on the host exactly as the host path decodes them
(`decode.decode_image_to_canvas`, upright) and copied over. A batch with a broken JPEG is decoded
again one image at a time to name the broken one (the batched decoder reports no partial results).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

import numpy as np
import torch

from cocoshard.loading.decode import (
    BadSample,
    check_pixel_count,
    decode_image_to_canvas,
    image_member,
    image_size,
    jpeg_orientation,
)
from cocoshard.loading.image_backend import BACKEND
from cocoshard.loading.tario import Sample
from cocoshard.pure.format import EXT_JPEG, EXT_PNG

KIND_JPEG, KIND_PNG = 0, 1
Where = Callable[[str], str]  # a key -> the shard that holds it, for messages only
_EXTENSION = {KIND_JPEG: "jpg", KIND_PNG: "png"}
_local = threading.local()


def compressed_image(sample: Sample) -> tuple[memoryview, int]:
    """A sample's compressed image and its kind, as the host hands it to the device decoder, once
    its header reads and declares no more pixels than an image may have; BadSample otherwise."""
    ext = image_member(sample)
    if ext not in (EXT_JPEG, EXT_PNG):
        raise BadSample(f"--decode device reads jpeg shards; this sample holds .{ext}")
    data = sample.members[ext]
    if image_size(data, ext) is None:
        raise BadSample(f"its .{ext} member has no readable image header")
    check_pixel_count(data, ext)
    return data, KIND_JPEG if ext == EXT_JPEG else KIND_PNG


def _named(key: str, where: Where | None) -> str:
    return f"shard {where(key)}, sample {key}" if where is not None else f"sample {key}"


def decode_stream(device: torch.device) -> torch.cuda.Stream:
    """This thread's decoding stream on CUDA `device`: nothing but `decode_on_device` queues work on it."""
    streams: dict[int, torch.cuda.Stream] = _local.__dict__.setdefault("streams", {})
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in streams:
        streams[index] = torch.cuda.Stream(device=index)
    return streams[index]


def _decode_jpegs(encoded: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """The batched decode; on CUDA, on the current (decoding) stream with no work pending on it."""
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()  # pytorch/vision#9606: see the module's notes
    return BACKEND.decode_jpegs(encoded, device)


def _decode_on_host(
    data: torch.Tensor, kind: int, key: str, canvas_size: int, device: torch.device, where: Where | None
) -> torch.Tensor:
    """One image decoded as the host path decodes it (upright, RGB), as (3, h, w) on `device`."""
    canvas = np.zeros((canvas_size, canvas_size, 3), dtype=np.uint8)
    try:
        height, width = decode_image_to_canvas(data.numpy().tobytes(), _EXTENSION[kind], canvas)
    except BadSample as exc:
        raise BadSample(f"{_named(key, where)}: {exc}") from None
    picture = torch.from_numpy(canvas[:height, :width]).permute(2, 0, 1)
    return picture.to(device) if device.type != "cpu" else picture


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

    `encoded` are 1-D uint8 CPU tensors of JPEG or PNG bytes (`kinds`); a JPEG whose decoded side
    exceeds `canvas_size` is refused (pack shrinks larger ones into PNG members). Bad images raise
    BadSample naming the key (and its shard, `where(key)`), or with `skip_bad` are left out of the
    indices. On CUDA the outputs are ready for work the caller queues on its current stream."""
    if device.type != "cuda":
        return _decode_batch(encoded, kinds, keys, canvas_size, device, skip_bad, where)
    caller, side = torch.cuda.current_stream(device), decode_stream(device)
    with torch.cuda.stream(side):
        images, sizes, good = _decode_batch(encoded, kinds, keys, canvas_size, device, skip_bad, where)
    caller.wait_stream(side)
    for made in (images, sizes):
        if made.numel():  # an empty batch (every image skipped) holds no memory to guard
            made.record_stream(caller)
    return images, sizes, good


def _decode_batch(
    encoded: list[torch.Tensor],
    kinds: Sequence[int],
    keys: Sequence[str],
    canvas_size: int,
    device: torch.device,
    skip_bad: bool,
    where: Where | None,
) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """decode_on_device on the current stream."""
    batched = [
        i for i, kind in enumerate(kinds) if kind == KIND_JPEG and jpeg_orientation(encoded[i].numpy()) == 1
    ]
    decoded: dict[int, torch.Tensor | None] = {}
    if batched:
        batch = [encoded[i] for i in batched]
        try:
            pictures: list[torch.Tensor | None] = list(_decode_jpegs(batch, device))
        except RuntimeError:
            pictures = _each_jpeg(batch, [keys[i] for i in batched], device, skip_bad, where)
        decoded.update(zip(batched, pictures, strict=True))
    for i in sorted(set(range(len(kinds))) - set(batched)):
        try:
            decoded[i] = _decode_on_host(encoded[i], kinds[i], keys[i], canvas_size, device, where)
        except BadSample:
            if not skip_bad:
                raise
            decoded[i] = None
    good: list[int] = []
    usable: dict[int, torch.Tensor] = {}
    for i in range(len(kinds)):
        picture = decoded.get(i)
        if picture is None:
            continue  # a bad image, skipped
        if max(picture.shape[1:]) > canvas_size:
            if not skip_bad:
                raise BadSample(
                    f"{_named(keys[i], where)}: its image is {picture.shape[1]}x{picture.shape[2]}, larger "
                    f"than the {canvas_size}-px canvas of these shards"
                )
            continue
        good.append(i)
        usable[i] = picture
    images = torch.empty((len(good), canvas_size, canvas_size, 3), dtype=torch.uint8, device=device)
    for row, i in enumerate(good):
        height, width = usable[i].shape[1:]
        images[row, :height, :width] = usable[i].permute(1, 2, 0)
    # the sizes are known on the host: sent without waiting for the device
    sizes = torch.tensor([list(usable[i].shape[1:]) for i in good], dtype=torch.int64).reshape(len(good), 2)
    if device.type == "cuda":
        sizes = sizes.pin_memory().to(device, non_blocking=True)
    return images, sizes, good
