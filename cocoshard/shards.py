"""What a shard holds, which shards make a split, and how labelled images are split (pure helpers).

A sample in a tar shard is a group of members sharing the key (the image stem, no dots):

    KEY.jpg     source JPEG bytes, unchanged (format "jpeg", image fits --size)
    KEY.png     lossless PNG of the decoded RGB image (format "jpeg", source was PNG/CMYK/too large)
    KEY.rgb     raw uint8 pixels, H=W=size, HWC, the image in the top-left corner (format "raw")
    KEY.hw      the image's own height and width inside that canvas: 2 x uint16 little-endian
    KEY.labels  80 bytes, uint8 multi-hot (train and val only; test samples have none)

`manifest.json` beside the shards describes all of them (see `cocoshard.pack`).

The train/val split is iterative stratification (Sechidis, Tsoumakas & Vlahavas, "On the
stratification of multi-label data", ECML PKDD 2011): labels are dealt rarest first, each image to
the split that still wants that label most, so that every class keeps the validation share, rare
ones included. A repair pass then moves single images so that every class with at least two images
appears in both splits whenever a move can do that without emptying another class.
"""

from __future__ import annotations

import json
import os
import re
import struct
from pathlib import Path
from typing import Any

import numpy as np

from cocoshard import NUM_CLASSES
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


# ----------------------------------------------------------------------------------- names


SHARD_FILE = re.compile(r"^(train|val|test)-[0-9]{6}\.tar$")
SPLIT_METHOD = "iterative-stratification"


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


def encode_labels(vector: np.ndarray) -> bytes:
    """The `.labels` member: uint8[80] multi-hot."""
    return np.asarray(vector, dtype=np.uint8).tobytes()


def decode_labels(data: bytes, num_classes: int = NUM_CLASSES) -> np.ndarray:
    """uint8[80] from a `.labels` member; ValueError unless it is exactly 80 bytes of 0 or 1."""
    if len(data) != num_classes:
        raise ValueError(f"labels hold {len(data)} bytes, expected {num_classes}")
    vector = np.frombuffer(data, dtype=np.uint8)
    if vector.max(initial=0) > 1:
        raise ValueError(f"labels hold values other than 0 and 1: {sorted(set(vector.tolist()))}")
    return vector


def list_shard_files(folder: str | os.PathLike) -> list[Path]:
    """The `{train,val,test}-NNNNNN.tar` files in a local folder, sorted by name."""
    path = Path(folder)
    if not path.is_dir():
        return []
    return sorted(entry for entry in path.iterdir() if is_shard_file(entry.name) and entry.is_file())


# ----------------------------------------------------------------------------------- train/val split


def stratified_split(labels: np.ndarray, val_fraction: float, seed: int) -> np.ndarray:
    """Split labelled images into train and val by iterative multi-label stratification.

    `labels` is a bool/0-1 array (N, C); returns a bool array (N,), True for validation. Seeded and
    deterministic. Every class keeps about `val_fraction` of its images in val; every class with
    at least two images lands in both splits unless no single image can move without emptying
    another class from a split; images without labels fill each split up to its overall share.
    """
    y = np.asarray(labels).astype(bool)
    if y.ndim != 2:
        raise ValueError(f"labels must be a 2-D (images, classes) array, got shape {y.shape}")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    rng = np.random.default_rng(seed)
    rows = _label_rows(y)
    is_val = _deal_rarest_first(y, rows, val_fraction, rng)
    _ensure_both_splits(y, rows, is_val, rng)
    _fill_unlabelled(y, is_val, val_fraction, rng)
    return is_val


def _label_rows(y: np.ndarray) -> list[np.ndarray]:
    """The class ids of each image."""
    image, cls = np.nonzero(y)
    return np.split(cls, np.cumsum(y.sum(axis=1))[:-1]) if len(y) else []


def _deal_rarest_first(y: np.ndarray, rows: list[np.ndarray], val_fraction: float, rng: np.random.Generator) -> np.ndarray:
    """The core of iterative stratification; images without labels stay in train here."""
    n = len(y)
    is_val = np.zeros(n, dtype=bool)
    unassigned = y.any(axis=1)
    by_class = np.ascontiguousarray(y.T)
    remaining = y.sum(axis=0).astype(np.int64)
    # wanted[s][c]: how many more images of class c split s (0 train, 1 val) should receive; a
    # class of two or more images wants at least one in each split, so that rare classes, dealt
    # first, are split at once rather than repaired afterwards
    want_val = remaining * val_fraction
    shared = remaining >= 2
    want_val[shared] = np.clip(want_val[shared], 1.0, remaining[shared] - 1.0)
    wanted = np.stack([remaining - want_val, want_val])
    wanted_total = [(1.0 - val_fraction) * int(unassigned.sum()), val_fraction * int(unassigned.sum())]
    while remaining.any():
        fewest = np.where(remaining > 0, remaining, np.iinfo(np.int64).max)
        tied = np.flatnonzero(fewest == fewest.min())
        label = int(tied[rng.integers(len(tied))])
        members = np.flatnonzero(by_class[label] & unassigned)
        rng.shuffle(members)
        for image in members.tolist():
            split = _choose_split(wanted[0, label], wanted[1, label], wanted_total, rng)
            classes = rows[image]
            wanted[split, classes] -= 1.0
            remaining[classes] -= 1
            wanted_total[split] -= 1.0
            is_val[image] = split == 1
        unassigned[members] = False
    return is_val


def _choose_split(want_train: float, want_val: float, wanted_total: list[float], rng: np.random.Generator) -> int:
    """The split that wants this label more; ties go to the split that wants more images, then to chance."""
    if want_train != want_val:
        return int(want_val > want_train)
    if wanted_total[0] != wanted_total[1]:
        return int(wanted_total[1] > wanted_total[0])
    return int(rng.integers(2))


def _ensure_both_splits(y: np.ndarray, rows: list[np.ndarray], is_val: np.ndarray, rng: np.random.Generator) -> None:
    """Move single images until every class with >= 2 images is in both splits, where possible.

    An image may leave its split only if every class of two or more images that it carries keeps
    another image there, so a move never takes such a class out of a split: presence only grows
    and the loop ends. (A class of one image cannot be in both splits; it may move with another.)
    """
    counts = np.stack([y[~is_val].sum(axis=0), y[is_val].sum(axis=0)])
    total = counts.sum(axis=0)
    order = np.argsort(total, kind="stable")
    moved = True
    while moved:
        moved = False
        for cls in order[total[order] >= 2]:
            for target in (0, 1):
                if counts[target, cls] > 0:
                    continue
                image = _cheapest_move(y[:, cls] & (is_val != bool(target)), rows, counts[1 - target], total, rng)
                if image is None:
                    continue
                is_val[image] = bool(target)
                counts[1 - target, rows[image]] -= 1
                counts[target, rows[image]] += 1
                moved = True


def _cheapest_move(candidates: np.ndarray, rows: list[np.ndarray], source_counts: np.ndarray, total: np.ndarray, rng: np.random.Generator) -> int | None:
    """A candidate image whose move keeps every shared class in the source split, or None.

    Preferred: moving no single-image class along (it would leave train for good), then the
    fewest labels (the least disturbance of the other classes' shares), then chance.
    """
    movable = [i for i in np.flatnonzero(candidates).tolist() if ((source_counts[rows[i]] >= 2) | (total[rows[i]] < 2)).all()]
    if not movable:
        return None
    cost = [(int((total[rows[i]] < 2).sum()), len(rows[i])) for i in movable]
    best = [i for i, c in zip(movable, cost) if c == min(cost)]
    return best[int(rng.integers(len(best)))]


def _fill_unlabelled(y: np.ndarray, is_val: np.ndarray, val_fraction: float, rng: np.random.Generator) -> None:
    """Send images without labels to val until val holds its share of all images (the rest: train)."""
    empty = np.flatnonzero(~y.any(axis=1))
    if len(empty) == 0:
        return
    short = int(round(val_fraction * len(y))) - int(is_val.sum())
    chosen = rng.permutation(empty)[: max(0, min(short, len(empty)))]
    is_val[chosen] = True
