"""Sample bytes -> pixels in a canvas, and labels (the per-sample work of every loader).

    h, w = decode_image_to_canvas(jpeg_bytes, "jpg", canvas)   # canvas: uint8 (S, S, 3)
    h, w = fill_canvas(sample, canvas)                         # any sample of a shard
    fill_labels(sample, row)                                   # row: uint8 (80,)

Every image lands in the top-left corner of an S x S canvas; (h, w) says how much of it the image
fills. Pixels outside that region are left as they were: nothing downstream reads them.

An encoded image is measured from its header before it is decoded (`image_size`), and one that
declares more than `MAX_IMAGE_PIXELS` is refused without allocating anything: a 600-byte JPEG
can declare 30000 x 30000 pixels.

Every image is decoded upright: its EXIF orientation applied, as pack and predict apply it
(docs/format.md); JPEGs are decoded by torchcodec or torchvision (`image_backend`), PIL does the rest.
"""

from __future__ import annotations

import io
import re
import struct
from collections.abc import Collection

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

# imported here, before loader workers fork, not once in every worker
from cocoshard.loading.image_backend import BACKEND
from cocoshard.loading.tario import BadSample, Sample
from cocoshard.prepare.images import DECODABLE_FORMATS, to_rgb
from cocoshard.prepare.sources import MAX_IMAGE_PIXELS
from cocoshard.pure.format import (
    EXT_JPEG,
    EXT_LABELS,
    EXT_PIXELS,
    EXT_PNG,
    decode_labels,
    decode_pixels,
    key_problem,
)

JPEG_EXTS = ("jpg", "jpeg")
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, UnidentifiedImageError, Image.DecompressionBombError)
# Start-of-frame markers (baseline, progressive, lossless, arithmetic), not DHT/JPG/DAC (C4, C8, CC).
_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_OBJECT_REPR = re.compile(r"<[\w.]+ object at 0x[0-9a-f]+>")
_NO_LENGTH = frozenset({0x01, *range(0xD0, 0xD8)})  # TEM and the restart markers carry no length


# ----------------------------------------------------------------------------------- sizes


def _fit(height: int, width: int, size: int) -> tuple[int, int]:
    """(h, w) scaled so the long side is `size`, aspect kept; unchanged when it already fits."""
    if max(height, width) <= size:
        return height, width
    scale = size / max(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


def _jpeg_size(data: bytes | memoryview) -> tuple[int, int] | None:
    """(height, width) from a JPEG's start-of-frame header, or None when there is none to read."""
    view = memoryview(data)
    position, end = 2, len(view)
    while position + 9 <= end:
        if view[position] != 0xFF:
            return None
        marker = view[position + 1]
        if marker == 0xFF:  # fill byte
            position += 1
            continue
        if marker in _NO_LENGTH:
            position += 2
            continue
        length = (view[position + 2] << 8) | view[position + 3]
        if marker in _SOF:
            height, width = struct.unpack(">HH", view[position + 5 : position + 9])
            return height, width
        position += 2 + length
    return None


def image_size(data: bytes | memoryview, ext: str) -> tuple[int, int] | None:
    """(height, width) an encoded image declares in its header (JPEG, PNG), without decoding it."""
    head = bytes(data[:24])
    if head[:2] == b"\xff\xd8":
        return _jpeg_size(data)
    if head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR":
        width, height = struct.unpack(">II", head[16:24])
        return height, width
    return None


def check_pixel_count(data: bytes | memoryview, ext: str) -> None:
    """Raise BadSample when the image's header declares more than MAX_IMAGE_PIXELS pixels."""
    declared = image_size(data, ext)
    if declared is not None and declared[0] * declared[1] > MAX_IMAGE_PIXELS:
        raise BadSample(
            f"refused, too many pixels: the .{ext} image declares {declared[1]} x {declared[0]}, "
            f"more than the {MAX_IMAGE_PIXELS:,} an image may have"
        )


# ----------------------------------------------------------------------------------- orientation

EXIF_ORIENTATION_TAG = 0x0112
_TURNED = frozenset({5, 6, 7, 8})  # orientations that swap height and width


def _exif_orientation_in(tiff: memoryview) -> int:
    """The orientation tag of an EXIF block's first directory (TIFF layout), 1 when it has none."""
    if len(tiff) < 8 or bytes(tiff[:2]) not in (b"II", b"MM"):
        return 1
    order = "<" if bytes(tiff[:2]) == b"II" else ">"
    (first,) = struct.unpack(order + "I", tiff[4:8])
    if first + 2 > len(tiff):
        return 1
    (entries,) = struct.unpack(order + "H", tiff[first : first + 2])
    for entry in range(entries):
        at = first + 2 + 12 * entry
        if at + 12 > len(tiff):
            return 1
        tag, kind, count = struct.unpack(order + "HHI", tiff[at : at + 8])
        if tag == EXIF_ORIENTATION_TAG and kind in (3, 4) and count >= 1:  # SHORT (or LONG)
            short = kind == 3
            (value,) = struct.unpack(
                order + ("H" if short else "I"), tiff[at + 8 : at + (10 if short else 12)]
            )
            return value if 1 <= value <= 8 else 1  # what PIL and libjpeg readers do with others
    return 1


def jpeg_orientation(data: bytes | memoryview | np.ndarray) -> int:
    """The EXIF orientation (1-8) a JPEG's header declares, 1 when none; read from the header alone.

    The readers cocoshard uses (PIL, torchvision, torchcodec) all take the first APP1 "Exif" segment
    before the image data; so does this."""
    view = memoryview(data if not isinstance(data, np.ndarray) else data.data).cast("B")
    if bytes(view[:2]) != b"\xff\xd8":
        return 1
    position, end = 2, len(view)
    while position + 4 <= end and view[position] == 0xFF:
        marker = view[position + 1]
        if marker == 0xFF:
            position += 1
            continue
        if marker in _NO_LENGTH:
            position += 2
            continue
        if marker == 0xDA:  # the image data starts: no EXIF after it
            return 1
        length = (view[position + 2] << 8) | view[position + 3]
        if marker == 0xE1 and bytes(view[position + 4 : position + 10]) == b"Exif\x00\x00":
            return _exif_orientation_in(view[position + 10 : min(position + 2 + length, end)])
        position += 2 + length
    return 1


def _upright(image: Image.Image, target: tuple[int, int]) -> tuple[Image.Image, tuple[int, int]]:
    """A PIL image turned as its EXIF orientation says, and the (h, w) target turned with it."""
    turned = image.getexif().get(EXIF_ORIENTATION_TAG, 1) in _TURNED
    return ImageOps.exif_transpose(image), (target[::-1] if turned else target)


# ----------------------------------------------------------------------------------- decoding


def _decode_jpeg_fast(data: bytes | memoryview) -> np.ndarray:
    """libjpeg-turbo through torchcodec or torchvision (`image_backend`): HWC RGB, upright, 15% faster
    than PIL and pixel-identical to it (grayscale and CMYK included)."""
    chw = BACKEND.decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8))
    return chw.permute(1, 2, 0).numpy()  # the decoder's own HWC memory, no copy


def _decode_with_pil(data: bytes | memoryview, size: int) -> np.ndarray:
    """Any accepted format (`prepare.images.DECODABLE_FORMATS`), to the RGB a person sees
    (`prepare.images.to_rgb`, as pack converts: 16-bit scaled, alpha composited)."""
    image: Image.Image = Image.open(io.BytesIO(data), formats=DECODABLE_FORMATS)
    width, height = image.size
    target_h, target_w = _fit(height, width, size)
    if (target_h, target_w) != (height, width):
        image.draft("RGB", (target_w, target_h))  # JPEG only: decode at 1/2, 1/4, 1/8 scale
    image, (target_h, target_w) = _upright(image, (target_h, target_w))
    image = to_rgb(image)
    if image.size != (target_w, target_h):
        image = image.resize((target_w, target_h), Image.Resampling.LANCZOS)
    return np.asarray(image)


def decoder_message(exc: BaseException) -> str:
    """What a decoder's exception says about the file, without the in-memory object PIL names
    (`cannot identify image file <_io.BytesIO object at 0x...>` tells a user nothing)."""
    if isinstance(exc, UnidentifiedImageError):
        return "its bytes are not an image PIL recognises"
    return _OBJECT_REPR.sub("the file", str(exc)) or type(exc).__name__


def decode_image_to_canvas(
    data: bytes | memoryview, ext: str, canvas: np.ndarray, checked: bool = False
) -> tuple[int, int]:
    """Decode JPEG or PNG bytes into the top-left corner of `canvas` (uint8, S x S x 3).

    Grayscale, palette, CMYK and alpha images become RGB; an image larger than the canvas is
    shrunk to fit with its aspect ratio kept (JPEG DCT scaling first, then Lanczos). Returns the
    image's (height, width) inside the canvas. Raises BadSample when the bytes do not decode or
    declare too many pixels (`checked`: its header was read already, by `check_pixel_count`).
    """
    if not checked:
        check_pixel_count(data, ext)
    size = canvas.shape[0]
    try:
        pixels = None
        if ext.lower() in JPEG_EXTS:
            try:
                pixels = _decode_jpeg_fast(data)
            except RuntimeError:
                pixels = None  # let PIL decide: it reads some files libjpeg's strict mode refuses
        if pixels is None or max(pixels.shape[:2]) > size:
            pixels = _decode_with_pil(data, size)
    except _DECODE_ERRORS as exc:
        raise BadSample(f"cannot decode the .{ext} image: {decoder_message(exc)}") from exc
    height, width = pixels.shape[:2]
    canvas[:height, :width] = pixels
    return height, width


# ----------------------------------------------------------------------------------- samples


def image_member(sample: Sample) -> str:
    """The extension of a sample's one image member; BadSample when it has none or a bad key."""
    return image_extension(sample.key, sample.members)


def image_extension(key: str, exts: Collection[str]) -> str:
    """`image_member` from a sample's key and member extensions alone."""
    problem = key_problem(key)
    if problem:  # a forged member name (a path) never becomes a sample, nor an output key
        raise BadSample(problem)
    found = [ext for ext in (EXT_PIXELS, EXT_JPEG, EXT_PNG) if ext in exts]
    if len(found) != 1:
        raise BadSample(
            f"{'no' if not found else len(found)} image members (.{EXT_JPEG}, .{EXT_PNG} or "
            f".{EXT_PIXELS}); it has {sorted(exts)}"
        )
    return found[0]


def fill_canvas(sample: Sample, canvas: np.ndarray) -> tuple[int, int]:
    """Write a shard sample's image into `canvas`; returns its (h, w). Raises BadSample."""
    ext = image_member(sample)
    if ext == EXT_PIXELS:
        try:
            pixels = decode_pixels(sample.members[ext], max_side=canvas.shape[0])
        except ValueError as exc:
            raise BadSample(str(exc)) from None
        height, width = pixels.shape[:2]
        canvas[:height, :width] = pixels
        return height, width
    return decode_image_to_canvas(sample.members[ext], ext, canvas)


def fill_labels(sample: Sample, row: np.ndarray) -> None:
    """Copy the multi-hot `.labels.npy` member into `row`; raises BadSample unless it is 80 zeros and ones."""
    data = sample.members.get(EXT_LABELS)
    if data is None:
        raise BadSample(f"no .{EXT_LABELS} member (this split should be labelled)")
    try:
        row[...] = decode_labels(data)
    except ValueError as exc:
        raise BadSample(str(exc)) from None
