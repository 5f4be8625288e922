"""The image-decoding seam: torchcodec where it loads, torchvision otherwise, the same pixels from both."""

from __future__ import annotations

import glob
import io

import numpy as np
import pytest
import torch
from PIL import Image

from cocoshard.loading.image_backend import BACKEND, _torchcodec_or_why, choose_backend, load_backend
from conftest import cocoshard, ok


def _torchcodec_or_skip():
    found = _torchcodec_or_why()
    if isinstance(found, str):
        pytest.skip(f"{found} (pip install 'cocoshard[decode]')")
    return found


def _tensor(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def _jpeg(mode: str, seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (48, 40, 4 if mode == "CMYK" else 3), np.uint8)
    image = Image.fromarray(pixels[..., : 4 if mode == "CMYK" else 3], "CMYK" if mode == "CMYK" else "RGB")
    buffer = io.BytesIO()
    image.convert(mode).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def test_both_backends_decode_every_real_photo_to_the_same_pixels(coco_sample):
    codec, vision = _torchcodec_or_skip(), load_backend("torchvision")
    photos = sorted(glob.glob(str(coco_sample / "images" / "**" / "*.jpg"), recursive=True))
    assert len(photos) >= 100
    for path in photos:
        with open(path, "rb") as handle:
            data = _tensor(handle.read())
        ours, theirs = codec.decode_jpeg(data), vision.decode_jpeg(data)
        assert ours.dtype == torch.uint8 and ours.shape[0] == 3, path
        assert torch.equal(ours, theirs), path  # the same libjpeg-turbo: exactly the same pixels
        pil = np.asarray(Image.open(path).convert("RGB"))
        assert np.array_equal(ours.permute(1, 2, 0).numpy(), pil), path


@pytest.mark.parametrize("mode", ["L", "CMYK", "RGB"])
def test_both_backends_agree_on_grayscale_and_cmyk_jpegs(mode):
    codec, vision = _torchcodec_or_skip(), load_backend("torchvision")
    data = _tensor(_jpeg(mode, seed=1))
    ours, theirs = codec.decode_jpeg(data), vision.decode_jpeg(data)
    assert ours.shape == (3, 48, 40)
    assert torch.equal(ours, theirs)


def test_both_backends_batch_on_the_cpu_and_refuse_broken_bytes_the_same_way():
    broken = _tensor(_jpeg("RGB", seed=2)[:300])
    for backend in (load_backend("torchvision"), _torchcodec_or_skip()):
        whole = [_tensor(_jpeg("RGB", seed=s)) for s in (3, 4)]
        decoded = backend.decode_jpegs(whole, torch.device("cpu"))
        assert [tuple(p.shape) for p in decoded] == [(3, 48, 40)] * 2
        assert torch.equal(decoded[1], backend.decode_jpeg(whole[1]))
        with pytest.raises(RuntimeError):  # what the loaders catch to fall back or name the sample
            backend.decode_jpeg(broken)


def test_the_choice_is_torchcodec_where_it_loads_and_says_why_otherwise(monkeypatch):
    found = _torchcodec_or_why()
    expected = "torchcodec" if not isinstance(found, str) else "torchvision"
    assert choose_backend("").name == expected == BACKEND.name
    if isinstance(found, str):
        assert choose_backend("").describe().endswith(f"({found})")
    forced = choose_backend("torchvision")
    assert forced.name == "torchvision" and "COCOSHARD_DECODER=torchvision" in forced.describe()
    monkeypatch.setenv("COCOSHARD_DECODER", "pil")
    assert "COCOSHARD_DECODER='pil' is not one of torchcodec, torchvision" in choose_backend().describe()
    with pytest.raises(ValueError, match="unknown image backend 'pil'"):
        load_backend("pil")


def test_info_says_which_backend_decodes_and_why():
    from cocoshard.info import describe

    assert describe()["image decoding"] == BACKEND.describe()
    forced = ok(cocoshard("info", COCOSHARD_DECODER="torchvision"))
    assert "image decoding torchvision " in forced and "(COCOSHARD_DECODER=torchvision)" in forced
