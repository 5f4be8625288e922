"""What a shard holds: file names, sample member names and the codecs of their bytes (pure, no I/O).

A shard is a plain tar file, `{split}-NNNNNN.tar`; a sample is a group of consecutive members
sharing the key (the image stem, no dots), as WebDataset groups them:

    KEY.jpg     source JPEG bytes, unchanged (format "jpeg", image fits the manifest's size)
    KEY.png     lossless PNG of the decoded RGB image (format "jpeg", source was PNG/CMYK/too large)
    KEY.rgb     raw uint8 pixels, H=W=size, HWC, the image in the top-left corner (format "raw")
    KEY.hw      the image's own height and width inside that canvas: 2 x uint16 little-endian
    KEY.labels  80 bytes, uint8 multi-hot (train and val only; test samples have none)

`manifest.json` beside the shards describes all of them (`cocoshard.prepare.manifest`).
"""

from __future__ import annotations

import re
import struct

import numpy as np

from cocoshard import NUM_CLASSES

FORMAT_VERSION = 1
SPLITS = ("train", "val", "test")

EXT_JPEG = "jpg"
EXT_PNG = "png"
EXT_RAW = "rgb"
EXT_HW = "hw"
EXT_LABELS = "labels"

SHARD_FILE = re.compile(r"^(train|val|test)-[0-9]{6}\.tar$")


# ----------------------------------------------------------------------------------- names


def shard_name(split: str, index: int) -> str:
    """`train-000042.tar`."""
    return f"{split}-{index:06d}.tar"


def is_shard_file(name: str) -> bool:
    """True for a name `pack` writes and may therefore replace or remove: `val-000003.tar`."""
    return SHARD_FILE.match(name) is not None


def key_problem(key: str) -> str | None:
    """Why `key` cannot name a sample in a tar shard, or None when it can."""
    if not key:
        return "the file name has an empty stem"
    if "." in key:
        # WebDataset cuts a member name at its first dot: KEY.jpg for a key "a.b" would read as
        # key "a" with field "b.jpg", splitting one sample into a broken one.
        return f"the stem {key!r} contains a '.', which WebDataset reads as the end of the sample key"
    if "/" in key or "\\" in key:
        # A member name that is a path (absolute, `..`, or a folder) is never one of our samples;
        # shards are only read, but such a key must not become an output file name either.
        return f"the key {key!r} is a path, not an image stem"
    if key != key.strip() or any(ord(c) < 32 for c in key):
        return f"the stem {key!r} has leading/trailing spaces or control characters"
    return None


def member_name(key: str, field: str) -> str:
    """The tar member name of one field of a sample: `000000000139.jpg`."""
    return f"{key}.{field}"


def split_member_name(name: str) -> tuple[str, str]:
    """(key, field) of a member name, cut at the first dot as WebDataset does."""
    key, _, field = name.partition(".")
    return key, field


# ----------------------------------------------------------------------------------- codecs


def encode_hw(height: int, width: int) -> bytes:
    """The `.hw` member: the image's height and width as two little-endian uint16."""
    return struct.pack("<HH", height, width)


def decode_hw(data: bytes) -> tuple[int, int]:
    """(height, width) from a `.hw` member; ValueError unless it is 4 bytes."""
    if len(data) != 4:
        raise ValueError(f"the .{EXT_HW} member holds {len(data)} bytes, not 4")
    height, width = struct.unpack("<HH", data)
    return height, width


def encode_labels(vector: np.ndarray) -> bytes:
    """The `.labels` member: uint8[80] multi-hot."""
    return np.asarray(vector, dtype=np.uint8).tobytes()


def decode_labels(data: bytes | memoryview, num_classes: int = NUM_CLASSES) -> np.ndarray:
    """uint8[80] from a `.labels` member (a view of `data`); ValueError unless it is 80 bytes of 0 or 1."""
    if len(data) != num_classes:
        raise ValueError(f"labels hold {len(data)} bytes, expected {num_classes}")
    vector = np.frombuffer(data, dtype=np.uint8)
    if vector.max(initial=0) > 1:
        raise ValueError(f"labels hold values other than 0 and 1: {sorted(set(vector.tolist()))}")
    return vector
