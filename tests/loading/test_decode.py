"""Decoding sample bytes into canvases: colour modes, oversize images, damaged bytes and members."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from cocoshard.loading.decode import decode_image_to_canvas, fill_canvas, fill_labels, image_size
from cocoshard.loading.tario import BadSample, Sample
from cocoshard.pure.format import encode_labels, encode_npy, encode_pixels


def encoded(mode: str, size: tuple[int, int], fmt: str = "JPEG") -> bytes:
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))
    buffer = io.BytesIO()
    rgb.convert(mode).save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.mark.parametrize(
    "mode,fmt", [("RGB", "JPEG"), ("L", "JPEG"), ("CMYK", "JPEG"), ("P", "PNG"), ("RGBA", "PNG")]
)
def test_every_colour_mode_becomes_rgb_in_the_top_left_corner(mode, fmt):
    data = encoded(mode, (50, 30), fmt)
    canvas = np.full((64, 64, 3), 7, np.uint8)
    assert decode_image_to_canvas(data, fmt.lower(), canvas) == (30, 50)
    reference = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    assert np.array_equal(canvas[:30, :50], reference)
    assert (canvas[30:] == 7).all() and (canvas[:, 50:] == 7).all()


def test_larger_images_shrink_to_fit_keeping_their_aspect():
    canvas = np.zeros((64, 64, 3), np.uint8)
    assert decode_image_to_canvas(encoded("RGB", (300, 150)), "jpg", canvas) == (32, 64)
    assert decode_image_to_canvas(encoded("RGB", (90, 400), "PNG"), "png", canvas) == (64, 14)


def test_undecodable_bytes_raise_bad_sample():
    data = encoded("RGB", (40, 40))
    canvas = np.zeros((64, 64, 3), np.uint8)
    for broken in (data[: len(data) // 2], b"not an image"):
        with pytest.raises(BadSample, match="cannot decode the .jpg image"):
            decode_image_to_canvas(broken, "jpg", canvas)


def test_shard_samples_are_checked_member_by_member():
    canvas = np.full((8, 8, 3), 9, np.uint8)
    rgb = np.arange(8 * 5 * 3, dtype=np.uint8).reshape(8, 5, 3)
    raw = Sample("k", {"pixels.npy": memoryview(encode_pixels(rgb))})
    assert fill_canvas(raw, canvas) == (8, 5)
    assert np.array_equal(canvas[:, :5], rgb) and (canvas[:, 5:] == 9).all()  # nothing outside the image
    cases = [
        ({"pixels.npy": encode_pixels(rgb)[:-10]}, "pixels: holds 110 bytes"),
        ({"pixels.npy": encode_npy(np.zeros((9, 8, 3), np.uint8))}, "sides in 1-8"),
        ({"pixels.npy": encode_pixels(rgb), "jpg": encoded("RGB", (6, 4))}, "2 image members"),
        ({"txt": b"x"}, "no image members"),
    ]
    for members, message in cases:
        with pytest.raises(BadSample, match=message):
            fill_canvas(Sample("k", {k: memoryview(v) for k, v in members.items()}), canvas)
    row = np.zeros(80, np.uint8)
    fill_labels(Sample("k", {"labels.npy": memoryview(encode_labels(np.eye(80, dtype=np.uint8)[0]))}), row)
    assert row[0] == 1 and row[1:].sum() == 0
    for payload, message in (
        (encode_npy(np.full(80, 2, np.uint8)), "other than 0 and 1"),
        (encode_npy(np.zeros(79, np.uint8)), r"\(79,\) array"),
    ):
        with pytest.raises(BadSample, match=message):
            fill_labels(Sample("k", {"labels.npy": memoryview(payload)}), row)


def test_an_image_declaring_too_many_pixels_is_refused_before_decoding():
    """A 600-byte JPEG can declare 30000 x 30000 pixels: refused from its header, nothing allocated."""
    data = bytearray(encoded("RGB", (16, 16)))
    sof = next(i for i in range(2, len(data) - 1) if data[i] == 0xFF and data[i + 1] in (0xC0, 0xC2))
    data[sof + 5 : sof + 9] = (30000).to_bytes(2, "big") * 2
    assert image_size(bytes(data), "jpg") == (30000, 30000)
    with pytest.raises(BadSample, match="declares 30000 x 30000"):
        decode_image_to_canvas(bytes(data), "jpg", np.zeros((64, 64, 3), np.uint8))
