"""What a shard holds: file names, sample member names and the codecs of their bytes (pure, no I/O).

A shard is a plain tar file, `{split}-NNNNNN.tar`, the split being train, val or test, or for a
K-fold pack (`pack --folds K`) fold0 ... fold{K-1} and test; a sample is a group of consecutive members
sharing the key (the image stem, no dots), as WebDataset groups them. Every member is decodable
by its extension with WebDataset's default decoders, Hugging Face `datasets`' webdataset loader,
or `tarfile` + `numpy.load(allow_pickle=False)` (docs/format.md has the table):

    KEY.jpg          source JPEG bytes, unchanged (format "jpeg", RGB or grayscale, fits the size)
    KEY.png          lossless PNG of the RGB image (format "jpeg", the source was another format,
                     CMYK, or larger than the size)
    KEY.pixels.npy   uint8 (h, w, 3) array, exactly the image's RGB pixels (format "raw")
    KEY.labels.npy   uint8 (80,) multi-hot array (train and val; test samples have none)

Format version 2; shards of version 1 (`.rgb` canvases, `.hw`, 80 bare bytes of `.labels`) are
refused with a message to re-pack. `manifest.json` beside the shards describes all of them
(`cocoshard.prepare.manifest`).

The `.npy` members are standard NumPy files (format 1.0, C order); `npy_array` reads them with a
parser for exactly that layout, zero-copy, ~1 µs, instead of NumPy's general header parser
(~20 µs, evaluated as Python literals), and refuses anything else rather than guess.
"""

from __future__ import annotations

import math
import re
import struct
from typing import NamedTuple

import numpy as np

from cocoshard import NUM_CLASSES

FORMAT_VERSION = 2
SPLITS = ("train", "val", "test")  # the splits of a pack without folds
FOLD_PREFIX = "fold"  # a K-fold pack's labelled splits: fold0 ... fold{K-1}

EXT_JPEG = "jpg"
EXT_PNG = "png"
EXT_PIXELS = "pixels.npy"
EXT_LABELS = "labels.npy"
IMAGE_FIELDS = {"jpeg": (EXT_JPEG, EXT_PNG), "raw": (EXT_PIXELS,)}

SHARD_FILE = re.compile(r"^(train|val|test|fold(?:0|[1-9][0-9]?))-[0-9]{6}\.tar$")

# What each member holds, as `cocoshard inspect` and docs/format.md show it.
MEMBER_LAYOUT = (
    (f"KEY.{EXT_JPEG}", "jpeg", "the source JPEG bytes, unchanged (RGB or grayscale)"),
    (f"KEY.{EXT_PNG}", "jpeg", "a lossless PNG of the RGB image (other sources, CMYK, larger than --size)"),
    (f"KEY.{EXT_PIXELS}", "raw", "uint8 array (h, w, 3): exactly the image's RGB pixels"),
    (f"KEY.{EXT_LABELS}", "both", "uint8 array (80,): multi-hot labels (train and val only)"),
)


# ----------------------------------------------------------------------------------- names


def shard_name(split: str, index: int) -> str:
    """`train-000042.tar`."""
    return f"{split}-{index:06d}.tar"


def fold_split(index: int) -> str:
    """`fold3`: the split name of fold `index` of a K-fold pack."""
    return f"{FOLD_PREFIX}{index}"


def is_shard_file(name: str) -> bool:
    """True for a name `pack` writes and may therefore replace or remove: `val-000003.tar`."""
    return SHARD_FILE.match(name) is not None


_CONTROL_OR_SURROGATE = re.compile("[\x00-\x1f\ud800-\udfff]")


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
    if key != key.strip() or _CONTROL_OR_SURROGATE.search(key):
        # (surrogates: what Python makes of a file name whose bytes are not UTF-8)
        return f"the stem {key!r} has leading/trailing spaces, control characters or bytes that are not UTF-8"
    return None


def member_name(key: str, field: str) -> str:
    """The tar member name of one field of a sample: `000000000139.jpg`."""
    return f"{key}.{field}"


def split_member_name(name: str) -> tuple[str, str]:
    """(key, field) of a member name, cut at the first dot as WebDataset does."""
    key, _, field = name.partition(".")
    return key, field


# ----------------------------------------------------------------------------------- .npy


_NPY_MAGIC = b"\x93NUMPY"
_NPY_FORMAT_1 = _NPY_MAGIC + b"\x01\x00"
_NPY_HEADER = re.compile(
    rb"\{'descr': '\|u1', 'fortran_order': False, 'shape': \(([0-9]+),(?: ([0-9]+), ([0-9]+))?\), \} *\n"
)


class NpyArray(NamedTuple):
    shape: tuple[int, ...]
    offset: int  # where the array's bytes start


def encode_npy(array: np.ndarray) -> bytes:
    """A `.npy` file (format 1.0, C order) of a uint8 array: what `numpy.save` writes."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = f"{{'descr': '|u1', 'fortran_order': False, 'shape': {array.shape}, }}".encode()
    padding = 64 - (len(_NPY_MAGIC) + 4 + len(header) + 1) % 64
    header += b" " * (padding % 64) + b"\n"
    return _NPY_MAGIC + b"\x01\x00" + struct.pack("<H", len(header)) + header + array.tobytes()


def npy_layout(data: bytes | memoryview) -> NpyArray:
    """Shape and data offset of a uint8 C-order `.npy` file; ValueError for anything else."""
    head = bytes(data[:10])
    if head[:8] != _NPY_FORMAT_1:
        raise ValueError("not a .npy file of format 1.0")
    length = head[8] | head[9] << 8
    match = _NPY_HEADER.fullmatch(bytes(data[10 : 10 + length]))
    if match is None:
        raise ValueError("not a uint8 C-order array of 1 or 3 dimensions")
    shape = tuple(int(g) for g in match.groups() if g is not None)
    offset = 10 + length
    if len(data) - offset != math.prod(shape):
        raise ValueError(f"holds {len(data) - offset} bytes of data for a {shape} array")
    return NpyArray(shape, offset)


def npy_array(data: bytes | memoryview) -> np.ndarray:
    """The uint8 array of a `.npy` member, a zero-copy view of `data`."""
    layout = npy_layout(data)
    return np.frombuffer(data, dtype=np.uint8, offset=layout.offset).reshape(layout.shape)


# ----------------------------------------------------------------------------------- members


def encode_pixels(rgb: np.ndarray) -> bytes:
    """The `.pixels.npy` member: the image's uint8 (h, w, 3) RGB pixels."""
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"pixels must be (h, w, 3), got {rgb.shape}")
    return encode_npy(rgb)


def pixels_layout(data: bytes | memoryview, max_side: int) -> NpyArray:
    """Shape (h, w, 3) and data offset of a `.pixels.npy` member; ValueError unless 0 < h, w <= max_side."""
    try:
        layout = npy_layout(data)
    except ValueError as exc:
        raise ValueError(f"pixels: {exc}") from None
    shape = layout.shape
    if len(shape) != 3 or shape[2] != 3 or not (0 < shape[0] <= max_side and 0 < shape[1] <= max_side):
        raise ValueError(f"pixels: a {shape} array, expected (h, w, 3) with sides in 1-{max_side}")
    return layout


def decode_pixels(data: bytes | memoryview, max_side: int) -> np.ndarray:
    """uint8 (h, w, 3) view of a `.pixels.npy` member; ValueError unless 0 < h, w <= max_side."""
    layout = pixels_layout(data, max_side)
    return np.frombuffer(data, dtype=np.uint8, offset=layout.offset).reshape(layout.shape)


def encode_labels(vector: np.ndarray) -> bytes:
    """The `.labels.npy` member: uint8 (80,) multi-hot."""
    return encode_npy(np.asarray(vector, dtype=np.uint8).reshape(NUM_CLASSES))


def decode_labels(data: bytes | memoryview, num_classes: int = NUM_CLASSES) -> np.ndarray:
    """uint8 (80,) view of a `.labels.npy` member; ValueError unless it is 80 values of 0 or 1."""
    try:
        vector = npy_array(data)
    except ValueError as exc:
        raise ValueError(f"labels: {exc}") from None
    if vector.shape != (num_classes,):
        raise ValueError(f"labels hold a {vector.shape} array, expected ({num_classes},)")
    if vector.max(initial=0) > 1:
        raise ValueError(f"labels hold values other than 0 and 1: {sorted(set(vector.tolist()))}")
    return vector
