"""What an input image is: the file names accepted, the formats decoded, and the picture a person sees.

    if name_problem(path) is None: ...          # one list of image file names for pack, predict, evaluate
    rgb = to_rgb(Image.open(...))               # every Pillow mode to 8-bit RGB, or BadImage saying why not

One list of accepted names (`IMAGE_SUFFIXES`, any case) is shared by `pack` (a file of another name
is rejected with its reason), `predict --images` and `evaluate --images` (other files are skipped
and said so): what pack packs, predict predicts and evaluate expects. The content decides the
format, among `DECODABLE_FORMATS` only (naming them keeps PIL from handing an untrusted file to a
plugin such as EPS, which would run Ghostscript); a format this Pillow was built without (WEBP in
some builds) is rejected with the decoder's reason.

`to_rgb` converts every mode the challenge's inputs may have to the RGB a person sees:

    1, L, P, CMYK, YCbCr, RGBX   Pillow's own conversion (CMYK: r = (255 - c)(255 - k) / 255)
    LA, PA, RGBA, P with a transparent colour, La, RGBa
                                 composited over white (`BACKGROUND`), as a viewer on a white page
                                 shows them; a fully transparent pixel becomes white, whatever
                                 colour it stores
    I;16 (16-bit gray)           scaled: v * 255 / 65535, rounded (not clipped at 255)
    16-bit RGB(A)                Pillow keeps the high byte of each sample (within one level of
                                 the scaling above)
    I (32-bit integer)           read as 16-bit samples; values outside 0-65535 are rejected
    F (32-bit float)             read as 0.0 black to 1.0 white; values outside [0, 1] rejected
Any other mode (LAB, HSV, ...) is rejected with its name. EXIF orientation is not applied here:
pack (`prepare.encode`), the loaders and predict each turn an image upright.
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

# Image file names every command accepts (compared in lower case).
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
DECODABLE_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF")  # JPEG also opens MPO
BACKGROUND = 255  # white, the value transparent pixels are composited over in every channel
_PILLOW_RGB = ("1", "L", "P", "CMYK", "YCbCr", "RGBX")
_ALPHA = {"LA": "RGBA", "La": "RGBA", "PA": "RGBA", "RGBA": "RGBA", "RGBa": "RGBA"}
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")


class BadImage(ValueError):
    """An input image that cannot become a sample; the message is the reason recorded."""


def name_problem(path: str | os.PathLike) -> str | None:
    """Why a file is not an image by its name, or None when its extension is an image's."""
    suffix = os.path.splitext(os.fspath(path))[1].lower()
    if suffix in IMAGE_SUFFIXES:
        return None
    kind = f"its extension {suffix} is not" if suffix else "it has no extension, so it is not named as"
    return f"{kind} an image's ({' '.join(IMAGE_SUFFIXES)}); rename it if it is one"


def _composite(rgba: np.ndarray) -> np.ndarray:
    """RGB of (H, W, 4) uint8 composited over the background, rounded to the nearest level."""
    rgb, alpha = rgba[..., :3].astype(np.uint32), rgba[..., 3:].astype(np.uint32)
    return ((rgb * alpha + BACKGROUND * (255 - alpha) + 127) // 255).astype(np.uint8)


def _gray_to_rgb(gray: np.ndarray) -> Image.Image:
    return Image.fromarray(np.repeat(gray[..., None], 3, axis=2), "RGB")


def _wide_gray(image: Image.Image) -> np.ndarray:
    """8-bit levels of a 16-bit, 32-bit integer or float grayscale image; BadImage when its values
    are outside what the mode means."""
    values = np.asarray(image)
    if image.mode == "F":
        low, high = float(values.min()), float(values.max())
        if not (np.isfinite(values).all() and 0.0 <= low and high <= 1.0):
            raise BadImage(
                f"a floating-point image with values from {low} to {high}: only 0.0 (black) to 1.0 "
                f"(white) is read; save it as an 8-bit image"
            )
        return np.rint(values.astype(np.float64) * 255.0).astype(np.uint8)
    wide = values.astype(np.int64)
    if image.mode == "I" and (wide.min() < 0 or wide.max() > 65535):
        raise BadImage(
            f"a 32-bit integer image with values from {wide.min()} to {wide.max()}: only 16-bit values "
            f"(0-65535) are read; save it as an 8- or 16-bit image"
        )
    return ((wide * 255 + 32767) // 65535).astype(np.uint8)


def to_rgb(image: Image.Image) -> Image.Image:
    """The image in 8-bit RGB as a person sees it (see the module's table); BadImage for a mode
    that is not converted."""
    mode = image.mode
    if mode in ("L", "RGB", "P") and "transparency" in image.info:  # one colour marked transparent
        return Image.fromarray(_composite(np.asarray(image.convert("RGBA"))), "RGB")
    if mode == "RGB":
        return image
    if mode in _PILLOW_RGB:
        return image.convert("RGB")
    if mode in _ALPHA:
        return Image.fromarray(_composite(np.asarray(image.convert(_ALPHA[mode]))), "RGB")
    if mode in _SIXTEEN_BIT or mode in ("I", "F"):
        return _gray_to_rgb(_wide_gray(image))
    raise BadImage(f"its colour mode {mode} is not converted (cocoshard reads gray, palette, RGB, CMYK)")
