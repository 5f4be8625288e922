"""What a shard holds, which shards make a split, and how labelled images are split (pure helpers).

A sample in a tar shard is a group of members sharing the key (the image stem, no dots):

    KEY.jpg     source JPEG bytes, unchanged (format "jpeg", image fits --size)
    KEY.png     lossless PNG of the decoded RGB image (format "jpeg", source was PNG/CMYK/too large)
    KEY.rgb     raw uint8 pixels, H=W=size, HWC, the image in the top-left corner (format "raw")
    KEY.hw      the image's own height and width inside that canvas: 2 x uint16 little-endian
    KEY.labels  80 bytes, uint8 multi-hot (train and val only; test samples have none)

`manifest.json` beside the shards describes all of them (see `cocoshard.pack`).
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

from cocoshard.errors import UserError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SPLITS = ("train", "val", "test")
PIXEL_FORMATS = ("jpeg", "raw")

EXT_JPEG = "jpg"
EXT_PNG = "png"
EXT_RAW = "rgb"
EXT_HW = "hw"
EXT_LABELS = "labels"
IMAGE_EXTS = (EXT_JPEG, EXT_PNG, EXT_RAW)


def shard_name(split: str, index: int) -> str:
    """`train-000042.tar`."""
    return f"{split}-{index:06d}.tar"


def encode_hw(height: int, width: int) -> bytes:
    return struct.pack("<HH", height, width)


def decode_hw(data: bytes) -> tuple[int, int]:
    height, width = struct.unpack("<HH", data)
    return height, width


def is_url(location: str) -> bool:
    """True for anything WebDataset opens that is not a local path (http://, s3://, pipe:...)."""
    return "://" in location or location.startswith("pipe:")


def read_manifest(location: str | os.PathLike) -> dict[str, Any]:
    """Load `manifest.json` from a shard folder (or URL prefix) and check its format version."""
    loc = str(location)
    if is_url(loc):
        import urllib.request

        url = loc.rstrip("/") + "/" + MANIFEST
        try:
            with urllib.request.urlopen(url) as response:  # noqa: S310 (user-given location)
                text = response.read().decode()
        except OSError as exc:
            raise UserError(f"cannot read {url}: {exc}") from exc
        source = url
    else:
        path = Path(loc) / MANIFEST
        if not path.is_file():
            raise UserError(f"no {MANIFEST} in {loc!s}: pack the data first (cocoshard pack --out {loc})")
        text = path.read_text()
        source = str(path)
    try:
        manifest = json.loads(text)
    except ValueError as exc:
        raise UserError(f"{source} is not valid JSON: {exc}") from exc
    version = manifest.get("format_version") if isinstance(manifest, dict) else None
    if version != FORMAT_VERSION:
        raise UserError(f"{source} has format_version {version!r}; this cocoshard reads {FORMAT_VERSION}: re-run cocoshard pack")
    return manifest


def split_shards(manifest: dict[str, Any], split: str) -> list[dict[str, Any]]:
    """The shard entries (name, samples, bytes, sha256) of one split, in order."""
    if split not in manifest.get("splits", {}):
        raise UserError(f"the shards hold no {split!r} split (they have: {', '.join(manifest.get('splits', {}))})")
    return list(manifest["splits"][split]["shards"])


def shard_urls(location: str | os.PathLike, manifest: dict[str, Any], split: str) -> list[str]:
    """Full paths or URLs of one split's shards."""
    loc = str(location)
    sep = "/" if is_url(loc) else os.sep
    return [loc.rstrip("/") + sep + entry["name"] for entry in split_shards(manifest, split)]
