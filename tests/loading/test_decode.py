"""Decoding sample bytes into canvases: colour modes, oversize images, damaged bytes and members."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from cocoshard.loading.decode import decode_to_canvas, fill_canvas, fill_labels
from cocoshard.loading.tario import BadSample, Sample
from cocoshard.prepare.format import encode_hw


def encoded(mode: str, size: tuple[int, int], fmt: str = "JPEG") -> bytes:
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))
    buffer = io.BytesIO()
    rgb.convert(mode).save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.mark.parametrize("mode,fmt", [("RGB", "JPEG"), ("L", "JPEG"), ("CMYK", "JPEG"), ("P", "PNG"), ("RGBA", "PNG")])
def test_every_colour_mode_becomes_rgb_in_the_top_left_corner(mode, fmt):
    data = encoded(mode, (50, 30), fmt)
    canvas = np.full((64, 64, 3), 7, np.uint8)
    assert decode_to_canvas(data, fmt.lower(), canvas) == (30, 50)
    reference = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    assert np.array_equal(canvas[:30, :50], reference)
    assert (canvas[30:] == 7).all() and (canvas[:, 50:] == 7).all()


def test_larger_images_shrink_to_fit_keeping_their_aspect():
    canvas = np.zeros((64, 64, 3), np.uint8)
    assert decode_to_canvas(encoded("RGB", (300, 150)), "jpg", canvas) == (32, 64)
    assert decode_to_canvas(encoded("RGB", (90, 400), "PNG"), "png", canvas) == (64, 14)


def test_undecodable_bytes_raise_bad_sample():
    data = encoded("RGB", (40, 40))
    canvas = np.zeros((64, 64, 3), np.uint8)
    for broken in (data[: len(data) // 2], b"not an image"):
        with pytest.raises(BadSample, match="cannot decode the .jpg image"):
            decode_to_canvas(broken, "jpg", canvas)


def test_shard_samples_are_checked_member_by_member():
    canvas = np.zeros((8, 8, 3), np.uint8)
    raw = Sample("k", {"rgb": memoryview(bytes(range(192))), "hw": memoryview(encode_hw(8, 5))})
    assert fill_canvas(raw, canvas) == (8, 5) and canvas.tobytes() == bytes(range(192))
    cases = [
        ({"rgb": b"\0" * 10, "hw": encode_hw(8, 8)}, "raw pixels hold 10 bytes"),
        ({"rgb": b"\0" * 192}, "needs a .hw member"),
        ({"rgb": b"\0" * 192, "hw": encode_hw(9, 8)}, "outside a 8² canvas"),
        ({"jpg": encoded("RGB", (6, 4)), "hw": encode_hw(4, 5)}, "decodes to 4x6, its .hw member says 4x5"),
        ({"txt": b"x"}, "no image member"),
    ]
    for members, message in cases:
        with pytest.raises(BadSample, match=message):
            fill_canvas(Sample("k", {k: memoryview(v) for k, v in members.items()}), canvas)
    row = np.zeros(80, np.uint8)
    fill_labels(Sample("k", {"labels": memoryview(bytes([1] + [0] * 79))}), row)
    assert row[0] == 1 and row[1:].sum() == 0
    for payload, message in ((bytes([2] + [0] * 79), "other than 0 and 1"), (b"\1" * 79, "holds 79 bytes")):
        with pytest.raises(BadSample, match=message):
            fill_labels(Sample("k", {"labels": memoryview(payload)}), row)
