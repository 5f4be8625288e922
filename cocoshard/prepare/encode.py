"""One input image into the pixel member of a shard sample, checked, upright and at most `--size`.

    encoded = encode_image(data, "jpeg", 224)     # EncodedImage(field, payload); BadImage says why not

Every image is fully decoded here (`decode_checked`: a truncated or corrupt file is caught at pack
time, a pixel bomb refused by its header before anything is decoded). A jpeg pack keeps a source
JPEG as it is when the loader can decode it unchanged (RGB or gray, within `--size`, no EXIF turn);
anything else becomes a PNG of the upright RGB picture (`prepare.images.to_rgb`). A raw pack stores
the upright RGB pixels as `.pixels.npy`.
"""

from __future__ import annotations

import io
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from cocoshard.prepare.images import DECODABLE_FORMATS, BadImage, to_rgb
from cocoshard.prepare.sources import MAX_IMAGE_PIXELS
from cocoshard.pure.format import EXT_JPEG, EXT_PIXELS, EXT_PNG, encode_pixels

KEPT_JPEG_MODES = ("RGB", "L")  # JPEGs the loader decodes as they are; others become PNG


class EncodedImage(NamedTuple):
    field: str  # EXT_JPEG, EXT_PNG or EXT_PIXELS
    payload: bytes


def decode_checked(data: bytes) -> Image.Image:
    """Fully decode an image file's bytes; BadImage says why it cannot be used."""
    if not data:
        raise BadImage("empty file (0 bytes)")
    Image.init()  # registers every plugin, so that `formats` can name WEBP and TIFF
    try:
        image = Image.open(io.BytesIO(data), formats=DECODABLE_FORMATS)  # reads the header only
        if image.width * image.height > MAX_IMAGE_PIXELS:  # before anything is decoded
            raise BadImage(
                f"refused, too many pixels: it declares {image.width} x {image.height}, "
                f"more than the {MAX_IMAGE_PIXELS:,} an input may have"
            )
        image.load()  # a full decode: a truncated file fails here, not at training time
    except BadImage:
        raise
    except UnidentifiedImageError:
        raise BadImage(f"not an image ({', '.join(DECODABLE_FORMATS)}); first bytes {data[:8]!r}") from None
    except Image.DecompressionBombError as exc:
        raise BadImage(f"refused, too many pixels: {exc}") from None
    except Exception as exc:  # a malformed file can break a decoder in any way; it is the file's fault
        raise BadImage(f"truncated or corrupt {_format_hint(data)}: {exc}") from None
    return image


def _format_hint(data: bytes) -> str:
    if data.startswith(b"\xff\xd8"):
        return "JPEG"
    if data.startswith(b"\x89PNG"):
        return "PNG"
    return "image"


def fit_within(image: Image.Image, size: int) -> Image.Image:
    """The image in RGB as a person sees it (`images.to_rgb`: 16-bit scaled, alpha composited),
    shrunk (aspect kept) so that its long side is at most `size`. Raises BadImage."""
    rgb = to_rgb(image)
    width, height = rgb.size
    if max(width, height) <= size:
        return rgb
    scale = size / max(width, height)
    target = (max(1, round(width * scale)), max(1, round(height * scale)))
    return rgb.resize(target, Image.Resampling.LANCZOS)


EXIF_ORIENTATION_TAG = 0x0112


def exif_orientation(image: Image.Image) -> int:
    """The EXIF orientation an image declares (1-8); 1 when it has none or an invalid one."""
    value = image.getexif().get(EXIF_ORIENTATION_TAG, 1)
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def upright(image: Image.Image) -> Image.Image:
    """The image turned as its EXIF orientation says (the image itself when it says nothing)."""
    return ImageOps.exif_transpose(image) if exif_orientation(image) != 1 else image


def encode_image(data: bytes, pixel_format: str, size: int) -> EncodedImage:
    """The pixel member of a sample: the source JPEG as it is, a PNG, or the raw RGB pixels.

    Every image is stored upright: a source whose EXIF orientation turns it is turned here (a JPEG
    then becomes a PNG of the upright image), so that any reader of the shards, including those that
    ignore EXIF, sees what cocoshard's loaders and `predict --images` see (docs/format.md).
    """
    image = decode_checked(data)
    if pixel_format == "jpeg":
        if (
            image.format == "JPEG"
            and image.mode in KEPT_JPEG_MODES
            and max(image.size) <= size
            and exif_orientation(image) == 1
        ):
            return EncodedImage(EXT_JPEG, data)
        buffer = io.BytesIO()
        fit_within(upright(image), size).save(buffer, format="PNG")
        return EncodedImage(EXT_PNG, buffer.getvalue())
    return EncodedImage(EXT_PIXELS, encode_pixels(np.asarray(fit_within(upright(image), size))))
