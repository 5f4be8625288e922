"""EXIF orientation, handled one way everywhere: every image is shown upright.

A camera stores a portrait photo as landscape pixels plus an EXIF tag saying how to turn them. pack
(both formats), the loaders (host and `--decode device`), `predict --images` and both decoding
backends must give the same upright pixels, or a model would train on one orientation and predict on
another. Here real photos of the repository get the tag a camera writes, values 1-8, and every path
is compared with PIL's `ImageOps.exif_transpose` of the same file.
"""

from __future__ import annotations

import glob
import io
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from cocoshard.loading.decode import decode_image_to_canvas, jpeg_orientation
from cocoshard.loading.device_decode import KIND_JPEG, decode_on_device
from cocoshard.loading.image_backend import _torchcodec_or_why, load_backend
from cocoshard.loading.image_files import FolderImages
from cocoshard.loading.loader import build_loader
from cocoshard.loading.spec import LoaderSpec

ORIENTATIONS = range(1, 9)


def with_orientation(jpeg: bytes, orientation: int, byte_order: str = "<") -> bytes:
    """The same JPEG (its image data untouched) with an APP1 EXIF segment holding `orientation`,
    placed where cameras put it: right after the start-of-image marker."""
    mark = b"II" if byte_order == "<" else b"MM"
    entry = struct.pack(byte_order + "HHIHH", 0x0112, 3, 1, orientation, 0)
    tiff = mark + struct.pack(byte_order + "HI", 42, 8) + struct.pack(byte_order + "H", 1) + entry + b"\0" * 4
    payload = b"Exif\0\0" + tiff
    return jpeg[:2] + b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload + jpeg[2:]


def upright(data: bytes) -> np.ndarray:
    """What a person sees: PIL's EXIF transpose, RGB."""
    return np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))


@pytest.fixture(scope="module")
def turned_root(coco_sample: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, int]]:
    """coco-sample with its first 16 train photos tagged with orientations 1-8 (twice each)."""
    root = tmp_path_factory.mktemp("turned") / "root"
    shutil.copytree(coco_sample, root)
    photos = sorted((root / "images/train-resized/train-resized").glob("*.jpg"))[:16]
    turned = {}
    for index, photo in enumerate(photos):
        orientation = ORIENTATIONS[index % 8]
        photo.write_bytes(with_orientation(photo.read_bytes(), orientation, "<" if index < 8 else ">"))
        turned[photo.stem] = orientation
    return root, turned


def _pictures(location: Path, **settings: object) -> dict[str, np.ndarray]:
    """key -> its upright pixels as the loader delivers them, over the train and val splits."""
    found = {}
    for split in ("train", "val"):
        loader = build_loader(
            location, split, LoaderSpec(batch_size=8, device="cpu", train=False, **settings)
        )
        try:
            for batch in loader:
                for row, key in enumerate(batch.keys):
                    height, width = batch.sizes[row].tolist()
                    found[key] = batch.images[row, :height, :width].numpy().copy()
        finally:
            loader.close()
    return found


def test_the_header_reader_finds_the_orientation_pil_finds(coco_sample):
    photo = sorted(glob.glob(str(coco_sample / "images/**/*.jpg"), recursive=True))[0]
    plain = Path(photo).read_bytes()
    assert jpeg_orientation(plain) == 1
    for order in ("<", ">"):
        for orientation in ORIENTATIONS:
            data = with_orientation(plain, orientation, order)
            assert jpeg_orientation(data) == orientation
            assert Image.open(io.BytesIO(data)).getexif().get(0x0112) == orientation
    assert jpeg_orientation(with_orientation(plain, 9)) == 1  # not an orientation: ignored, as PIL does
    assert jpeg_orientation(b"\xff\xd8\xff\xe1\x00") == 1  # cut short: nothing to read


@pytest.mark.parametrize("orientation", ORIENTATIONS)
def test_every_decoder_turns_a_tagged_real_photo_upright(coco_sample, orientation):
    photo = sorted(glob.glob(str(coco_sample / "images/**/*.jpg"), recursive=True))[0]
    data = with_orientation(Path(photo).read_bytes(), orientation)
    expected = upright(data)
    assert (expected.shape[0] > expected.shape[1]) == (orientation >= 5)  # a landscape photo stood up
    canvas = np.zeros((224, 224, 3), np.uint8)
    height, width = decode_image_to_canvas(data, "jpg", canvas)  # loaders' host path and predict
    assert np.array_equal(canvas[:height, :width], expected)
    backends = [load_backend("torchvision")]
    if not isinstance(codec := _torchcodec_or_why(), str):
        backends.append(codec)
    for backend in backends:
        decoded = backend.decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8))
        assert np.array_equal(decoded.permute(1, 2, 0).numpy(), expected), backend.name
    encoded = [torch.frombuffer(bytearray(data), dtype=torch.uint8)]
    images, sizes, good = decode_on_device(
        encoded, [KIND_JPEG], ["k"], canvas_size=224, device=torch.device("cpu")
    )
    height, width = sizes[0].tolist()
    assert good == [0] and np.array_equal(images[0, :height, :width].numpy(), expected)


@pytest.mark.slow
def test_pack_the_loaders_and_predict_show_the_same_upright_photos(turned_root, pack_dir, tmp_path):
    root, turned = turned_root
    expected = {
        key: upright((root / f"images/train-resized/train-resized/{key}.jpg").read_bytes()) for key in turned
    }
    jpeg = pack_dir(root, tmp_path / "jpeg", shard_samples=16)
    raw = pack_dir(root, tmp_path / "raw", format="raw", shard_samples=16)
    for name, pictures in (
        ("jpeg shards, host decode", _pictures(jpeg, workers=0)),
        ("jpeg shards, --decode device", _pictures(jpeg, workers=0, decode="device")),
        ("raw shards", _pictures(raw, workers=0)),
    ):
        for key, pixels in expected.items():
            assert np.array_equal(pictures[key], pixels), f"{name}: {key} (orientation {turned[key]})"
    files = [root / f"images/train-resized/train-resized/{key}.jpg" for key in turned]
    folder = FolderImages(files, canvas=224)  # what `predict --images` reads
    for index, key in enumerate(turned):
        canvas, (height, width), _, error = folder[index]
        assert not error and np.array_equal(canvas[:height, :width].numpy(), expected[key]), key
