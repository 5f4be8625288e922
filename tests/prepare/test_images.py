"""Input images as a person sees them (`cocoshard.prepare.images`), mode by mode, against a reference.

Each Pillow mode an input may have is written to a file (PNG or TIFF; 16-bit RGB PNGs by hand, as
Pillow cannot write them), then packed (`encode.encode_image`, raw and jpeg formats) and decoded as
`predict --images` decodes it (`decode_image_to_canvas`); both must give the RGB computed here
with NumPy alone: 16-bit levels scaled, alpha composited over white, CMYK by (255 - c)(255 - k) /
255. Round three of docs/reliability.md cites these tests.
"""

from __future__ import annotations

import io
import re
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cocoshard.loading.decode import decode_image_to_canvas
from cocoshard.loading.image_files import image_problem
from cocoshard.loading.tario import read_samples
from cocoshard.prepare import encode
from cocoshard.prepare.manifest import read_manifest, shard_urls
from cocoshard.pure.format import EXT_PIXELS, decode_pixels

LABELS = Path("labels/train/train")
TRAIN_IMAGES = Path("images/train-resized/train-resized")


def _png16(pixels: np.ndarray) -> bytes:
    """A 16-bit RGB (3 channels) or RGBA (4) PNG, written by hand: Pillow cannot write one."""
    height, width, channels = pixels.shape
    rows = b"".join(b"\x00" + pixels[y].astype(">u2").tobytes() for y in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 16, {3: 2, 4: 6}[channels], 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


def _saved(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


def _over_white(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """The reference compositing: each channel c * a + 255 * (1 - a), a in [0, 1]."""
    a = alpha.astype(np.float64)[..., None] / 255.0
    return np.rint(rgb.astype(np.float64) * a + 255.0 * (1.0 - a))


def _gray(levels: np.ndarray) -> np.ndarray:
    return np.repeat(levels.astype(np.float64)[..., None], 3, axis=2)


def _mode_cases() -> dict[str, tuple[bytes, str, np.ndarray]]:
    """name -> (file bytes, extension, the RGB a person sees, computed independently of Pillow)."""
    rng = np.random.default_rng(7)
    shape = (24, 40)
    rgb = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
    alpha = rng.integers(0, 256, shape, dtype=np.uint8)
    alpha[0, :] = 0  # fully transparent pixels: white, whatever colour they store
    gray = rng.integers(0, 256, shape, dtype=np.uint8)
    wide = rng.integers(0, 65536, shape, dtype=np.uint16)
    wide[0, 0], wide[0, 1] = 0, 65535
    floats = rng.random(shape, dtype=np.float32)
    bits = rng.random(shape) < 0.5
    cmyk = rng.integers(0, 256, (*shape, 4), dtype=np.uint8)
    palette = rng.integers(0, 256, (256, 3), dtype=np.uint8)
    index = rng.integers(0, 256, shape, dtype=np.uint8)
    paletted = Image.frombytes("P", index.shape[::-1], index.tobytes())
    paletted.putpalette(palette.tobytes())
    transparent = paletted.copy()
    transparent.info["transparency"] = int(index[0, 0])
    wide_rgb = rng.integers(0, 65536, (*shape, 3), dtype=np.uint16)
    cmyk_rgb = np.rint((255.0 - cmyk[..., :3]) * (255.0 - cmyk[..., 3:]) / 255.0)
    return {
        "1": (_saved(Image.fromarray(bits), "PNG"), "png", _gray(bits * 255)),
        "L": (_saved(Image.fromarray(gray, "L"), "PNG"), "png", _gray(gray)),
        "LA": (
            _saved(Image.fromarray(np.dstack([gray, alpha]), "LA"), "PNG"),
            "png",
            _over_white(_gray(gray), alpha),
        ),
        "P": (_saved(paletted, "PNG"), "png", palette[index].astype(np.float64)),
        "P with a transparent colour": (
            _saved(transparent, "PNG"),
            "png",
            _over_white(palette[index], np.where(index == index[0, 0], 0, 255)),
        ),
        "PA": (_pa_tiff(index, alpha, palette), "tif", _over_white(palette[index], alpha)),
        "RGBA": (
            _saved(Image.fromarray(np.dstack([rgb, alpha]), "RGBA"), "PNG"),
            "png",
            _over_white(rgb, alpha),
        ),
        "CMYK": (_saved(Image.fromarray(cmyk, "CMYK"), "TIFF"), "tif", cmyk_rgb),
        "I;16": (_saved(Image.fromarray(wide), "PNG"), "png", _gray(np.rint(wide / 257.0))),
        "I": (
            _saved(Image.fromarray(wide.astype(np.int32), "I"), "TIFF"),
            "tif",
            _gray(np.rint(wide / 257.0)),
        ),
        "F": (_saved(Image.fromarray(floats, "F"), "TIFF"), "tif", _gray(np.rint(floats * 255.0))),
        "16-bit RGB": (_png16(wide_rgb), "png", np.rint(wide_rgb / 257.0)),
        "16-bit RGBA": (
            _png16(np.dstack([wide_rgb, alpha.astype(np.uint16) * 257])),
            "png",
            _over_white(np.rint(wide_rgb / 257.0), alpha),
        ),
    }


def _pa_tiff(index: np.ndarray, alpha: np.ndarray, palette: np.ndarray) -> bytes:
    image = Image.frombytes("PA", index.shape[::-1], np.dstack([index, alpha]).tobytes())
    image.putpalette(palette.tobytes())
    return _saved(image, "TIFF")


MODE_CASES = _mode_cases()
# 16-bit RGB keeps the high byte of each sample (Pillow's reading of 16-bit PNGs): one level off at most
TOLERANCE = {"16-bit RGB": 1, "16-bit RGBA": 2}


@pytest.mark.parametrize("mode", list(MODE_CASES))
def test_every_mode_packs_and_predicts_as_the_picture_a_person_sees(mode):
    data, ext, expected = MODE_CASES[mode]
    packed = encode.encode_image(data, "raw", 224)  # what pack stores
    assert packed.field == EXT_PIXELS
    stored = decode_pixels(packed.payload, max_side=224).astype(np.float64)
    assert stored.shape == expected.shape
    assert np.abs(stored - expected).max() <= TOLERANCE.get(mode, 0), mode
    canvas = np.zeros((224, 224, 3), np.uint8)  # what predict --images sees
    height, width = decode_image_to_canvas(data, ext, canvas)
    assert np.abs(canvas[:height, :width].astype(np.float64) - expected).max() <= TOLERANCE.get(mode, 0)
    jpeg_kind = encode.encode_image(data, "jpeg", 224)  # a jpeg pack stores a converted PNG: the same
    assert jpeg_kind.field == "png"
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(jpeg_kind.payload))), stored.astype(np.uint8))


@pytest.mark.parametrize(
    "case, image, reason",
    [
        ("I beyond 16 bits", Image.fromarray(np.full((8, 8), 70000, np.int32), "I"), "0-65535"),
        ("F beyond 1.0", Image.fromarray(np.full((8, 8), 200.0, np.float32), "F"), "1.0 (white)"),
        ("LAB", Image.new("LAB", (8, 8)), "colour mode LAB"),
    ],
)
def test_an_image_that_cannot_be_read_faithfully_is_rejected_with_its_reason(case, image, reason, tmp_path):
    data = _saved(image, "TIFF")
    with pytest.raises(encode.BadImage, match=re.escape(reason)):
        encode.encode_image(data, "raw", 224)
    path = tmp_path / "odd.tif"
    path.write_bytes(data)
    assert reason in (image_problem(str(path)) or "")


def test_a_16_bit_grey_png_is_packed_scaled_not_white(tmp_path, pack_dir):
    """Through the CLI's pack and the loader's checked reader: the stored pixels are the scaled levels."""
    root = tmp_path / "root"
    (root / TRAIN_IMAGES).mkdir(parents=True)
    (root / LABELS).mkdir(parents=True)
    data, _, expected = MODE_CASES["I;16"]
    for index in range(4):
        key = f"{index + 1:012d}"
        (root / TRAIN_IMAGES / f"{key}.png").write_bytes(data)
        (root / LABELS / f"{key}.cls").write_text(f"{index}\n")
    shards = pack_dir(root, tmp_path / "shards", format="raw", workers=0, val_fraction=0.5)
    manifest = read_manifest(shards)
    entries = [e for split in ("train", "val") for e in manifest["splits"][split]["shards"]]
    urls = shard_urls(shards, manifest, "train") + shard_urls(shards, manifest, "val")
    for url, entry in zip(urls, entries, strict=True):
        for sample in read_samples(url, entry["sha256"], entry["samples"]):
            pixels = decode_pixels(sample.members[EXT_PIXELS], max_side=224)
            assert np.array_equal(pixels, expected.astype(np.uint8))
            assert pixels.mean() < 200  # the clipped conversion gave a ~98% white image
