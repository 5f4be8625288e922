"""`manifest.json`: reading it from a shard folder or URL prefix, and where its shards are.

The manifest is written last by `cocoshard pack` and describes every shard (name, samples, bytes,
sha256) of every split, the pixel format, the canvas size, the class names and the inputs left out.
Its labelled splits are train and val, or, packed with `--folds K`, fold0 ... fold{K-1}
(`labelled_splits`); a split argument may name several, read as one (`fold0+fold2`, `split_names`).
Reading it does I/O: a local file, or a file under a URL prefix (`--shards s3://bucket/shards`,
`https://...`, `gs://...`, `pipe:...`), read through `cocoshard.remote` like the shards themselves.
The format of the shards it describes: `cocoshard.pure.format`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cocoshard import CLASSES, NUM_CLASSES
from cocoshard.config import MAX_FOLDS
from cocoshard.errors import UserError
from cocoshard.input_files import InputError, parse_json
from cocoshard.pure.format import FORMAT_VERSION, fold_split, is_shard_file
from cocoshard.remote import Network, is_url, join_location, read_url
from cocoshard.shard_cache import Remote

MANIFEST = "manifest.json"


MAX_MANIFEST_BYTES = 64 * 2**20  # 65k images with every one rejected still fit in a few MB


class BadManifest(UserError):
    """A manifest.json that cannot describe shards: the message names the file and the field."""


def _read_text(location: str, network: Network) -> tuple[str, str]:
    """(text of the manifest, where it came from), from a folder or a URL prefix."""
    if is_url(location):
        url = join_location(location, MANIFEST)
        try:
            return read_url(url, network, MAX_MANIFEST_BYTES).decode("utf-8"), url
        except UnicodeDecodeError as exc:
            raise BadManifest(f"{url} is not UTF-8 text: {exc}") from None
    path = Path(location) / MANIFEST
    if not path.is_file():
        raise UserError(f"no {MANIFEST} in {location}: {_pack_hint(Path(location))}")
    try:
        with open(path, "rb") as handle:
            return handle.read(MAX_MANIFEST_BYTES).decode("utf-8"), str(path)
    except (OSError, UnicodeDecodeError) as exc:
        raise BadManifest(f"cannot read {path}: {exc}") from exc


def _pack_hint(folder: Path) -> str:
    """What to run when a folder without a manifest was given as shards: pack it first, into a
    folder of its own (never into an image folder)."""
    if (folder / "images").is_dir() or (folder / "labels").is_dir():
        shards = folder.parent / "shards"
        return (
            f"it looks like the challenge folder: pack it first, cocoshard pack --root {folder} "
            f"--out {shards}"
        )
    if folder.is_dir() and any(
        p.suffix.lower() in (".jpg", ".jpeg", ".png", ".cls") for p in folder.iterdir()
    ):
        root = next((parent for parent in folder.parents if (parent / "images").is_dir()), folder.parent)
        return (
            "it holds images or labels, not shards: pack the challenge folder first, cocoshard pack --root "
            f"{root} "
            f"--out {root.parent / 'shards' if root != folder.parent else root / 'shards'}"
        )
    return f"pack the data first (cocoshard pack --root ms-coco --out {folder})"


def read_manifest(location: str | os.PathLike, network: Network | None = None) -> dict[str, Any]:
    """Load `manifest.json` from a shard folder (or URL prefix), checked against its schema."""
    text, source = _read_text(str(location), network or Network())
    try:
        manifest = parse_json(text)
    except InputError as exc:
        raise BadManifest(f"{source} cannot be read as a manifest: {exc}") from None
    check_manifest(manifest, source)
    return manifest


# ----------------------------------------------------------------------------------- typed


@dataclass(frozen=True)
class ShardEntry:
    """One shard as the manifest lists it."""

    name: str
    samples: int
    bytes: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    """A checked manifest as the loaders read it: where the shards are, their pixels, their splits.

    `data` keeps the whole document for what only summaries show (rejected inputs, the split seed);
    `remote` says how its shards are read when they are at URLs (timeouts, retries, the cache)."""

    location: str
    pixel_format: str  # "jpeg" or "raw"
    size: int  # the canvas: the largest side an image may have
    classes: tuple[str, ...]
    splits: Mapping[str, tuple[ShardEntry, ...]]
    data: Mapping[str, object] = field(repr=False)
    remote: Remote = field(default_factory=Remote, repr=False, compare=False)

    @classmethod
    def from_data(
        cls, data: dict[str, Any], location: str | os.PathLike, remote: Remote | None = None
    ) -> Manifest:
        """The typed view of a manifest that `check_manifest` accepted."""
        splits = {
            name: tuple(
                ShardEntry(s["name"], int(s["samples"]), int(s["bytes"]), s["sha256"])
                for s in entry["shards"]
            )
            for name, entry in data["splits"].items()
        }
        return cls(
            str(location),
            data["pixel_format"],
            int(data["size"]),
            manifest_class_names(data),
            splits,
            data,
            remote or Remote(),
        )

    def shards(self, split: str | Sequence[str]) -> tuple[ShardEntry, ...]:
        """The shards of one split, or of several read as one, in the order given."""
        entries: tuple[ShardEntry, ...] = ()
        for name in split_names(split):
            if name not in self.splits:
                raise UserError(f"the shards hold no {name!r} split (they have: {', '.join(self.splits)})")
            entries += self.splits[name]
        return entries

    def urls(self, split: str | Sequence[str]) -> list[str]:
        """Full paths or URLs of the shards of `split`."""
        return [join_location(self.location, entry.name) for entry in self.shards(split)]

    def samples(self, split: str | Sequence[str]) -> int:
        """Samples in `split` (all of its shards)."""
        return sum(entry.samples for entry in self.shards(split))


def load_manifest(location: str | os.PathLike, remote: Remote | None = None) -> Manifest:
    """`read_manifest`, typed: what the loaders take (its shards read as `remote` says)."""
    remote = remote or Remote()
    return Manifest.from_data(read_manifest(location, remote.network), location, remote)


# ----------------------------------------------------------------------------------- schema


def _field(data: Any, name: str, kind: type | tuple[type, ...], where: str) -> Any:
    if not isinstance(data, dict) or name not in data:
        raise BadManifest(f"{where}: the field {name!r} is missing")
    value = data[name]
    if not isinstance(value, kind) or (
        isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,))
    ):
        names = "/".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise BadManifest(f"{where}: the field {name!r} must be {names}, not {json.dumps(value)[:40]}")
    return value


def _count(data: Any, name: str, where: str, positive: bool = False) -> int:
    value = _field(data, name, int, where)
    if value < (1 if positive else 0):
        raise BadManifest(f"{where}: the field {name!r} must be {'> 0' if positive else '>= 0'}, not {value}")
    return value


def _check_split(manifest: dict[str, Any], split: str, source: str, seen: dict[str, str]) -> None:
    where = f"{source}: splits.{split}"
    entry = _field(manifest["splits"], split, dict, f"{source}: splits")
    samples = _count(entry, "samples", where)
    shards = _field(entry, "shards", list, where)
    total = 0
    for index, shard in enumerate(shards):
        at = f"{where}.shards[{index}]"
        name = _field(shard, "name", str, at)
        if not is_shard_file(name) or not name.startswith(split + "-"):
            raise BadManifest(f"{at}: {name!r} is not a {split} shard name ({split}-NNNNNN.tar)")
        if name in seen:
            raise BadManifest(
                f"{at}: {name} is listed in the {seen[name]} split too: a shard belongs to one split"
            )
        seen[name] = split
        total += _count(shard, "samples", at, positive=True)
        _count(shard, "bytes", at, positive=True)
        digest = _field(shard, "sha256", str, at)
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise BadManifest(f"{at}: the field 'sha256' is not a sha256 hex digest")
    if total != samples:
        raise BadManifest(f"{where}: 'samples' says {samples}, its shards hold {total}")
    if split != "test":
        counts = _field(entry, "class_counts", list, where)
        if len(counts) != NUM_CLASSES or not all(
            isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in counts
        ):
            raise BadManifest(f"{where}: 'class_counts' must be {NUM_CLASSES} counts")


def check_manifest(manifest: Any, source: str) -> None:
    """Raise BadManifest naming the first field that is missing, mistyped or inconsistent."""
    if not isinstance(manifest, dict):
        raise BadManifest(f"{source}: a manifest is a JSON object, not a {type(manifest).__name__}")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise BadManifest(
            f"{source} describes shards of format {version!r}; this cocoshard reads format "
            f"{FORMAT_VERSION} ({'.npy members' if version == 1 else 'see docs/format.md'}): "
            f"re-pack the images with cocoshard pack"
        )
    pixel_format = _field(manifest, "pixel_format", str, source)
    if pixel_format not in ("jpeg", "raw"):
        raise BadManifest(f"{source}: the field 'pixel_format' must be jpeg or raw, not {pixel_format!r}")
    size = _count(manifest, "size", source, positive=True)
    if size > 65535:
        raise BadManifest(f"{source}: the field 'size' is {size}, more than an image side can be")
    classes = _field(manifest, "classes", list, source)
    if len(classes) != NUM_CLASSES or not all(isinstance(name, str) for name in classes):
        raise BadManifest(f"{source}: the field 'classes' must be {NUM_CLASSES} class names")
    if manifest.get("folds") is not None:
        folds = _count(manifest, "folds", source)
        if not 2 <= folds <= MAX_FOLDS:
            raise BadManifest(f"{source}: the field 'folds' must be in 2-{MAX_FOLDS}, not {folds}")
    expected = (*labelled_splits(manifest), "test")
    other = [name for name in _field(manifest, "splits", dict, source) if name not in expected]
    if other:
        raise BadManifest(
            f"{source}: splits.{other[0]} is not a split of these shards (they have {', '.join(expected)})"
        )
    seen: dict[str, str] = {}
    for split in expected:
        _check_split(manifest, split, source, seen)
    for index, item in enumerate(_field(manifest, "rejected", list, source)):
        _field(item, "path", str, f"{source}: rejected[{index}]")
        _field(item, "reason", str, f"{source}: rejected[{index}]")


def fold_splits(manifest: dict[str, Any]) -> tuple[str, ...]:
    """The folds of a K-fold pack (`fold0`, `fold1`, ...), in order; empty for a train/val pack."""
    return tuple(fold_split(index) for index in range(manifest.get("folds") or 0))


def labelled_splits(manifest: dict[str, Any]) -> tuple[str, ...]:
    """The splits holding every labelled image: the folds of a K-fold pack, else train and val."""
    return fold_splits(manifest) or ("train", "val")


def shards_identity(manifest: dict[str, Any], splits: tuple[str, ...] | None = None) -> str:
    """A digest of which shards make each split and what they hold (names, sample counts, sha256):
    the same for the same packed data wherever it lives, different after any re-pack that changes it.
    By default over the labelled splits (train and val, or every fold)."""
    import hashlib

    if splits is None:
        splits = labelled_splits(manifest)
    listing = [
        [split, [[s["name"], s["samples"], s["sha256"]] for s in manifest["splits"][split]["shards"]]]
        for split in splits
    ]
    return hashlib.sha256(json.dumps(listing, sort_keys=True).encode()).hexdigest()


def split_record(manifest: dict[str, Any]) -> dict[str, Any]:
    """How the shards' train/val split was drawn (pack's --seed and --val-fraction), kept beside
    `shards_identity` so that a changed identity can be explained: a new seed, or another re-pack."""
    return {name: manifest.get(name) for name in ("seed", "val_fraction")}


def split_names(split: str | Sequence[str]) -> tuple[str, ...]:
    """One split's name, or several read as one (folds of a K-fold pack: a tuple, or the names joined
    by `+`, as `--split fold0+fold2` gives them), as a tuple."""
    return tuple(split.split("+")) if isinstance(split, str) else tuple(split)


def split_size(manifest: dict[str, Any], split: str | Sequence[str]) -> int:
    """Samples in one split, or in several read as one."""
    return sum(int(entry["samples"]) for entry in split_shards(manifest, split))


def is_labelled(split: str | Sequence[str]) -> bool:
    """Whether samples of `split` carry labels (every split but the test split)."""
    return "test" not in split_names(split)


def split_shards(manifest: dict[str, Any], split: str | Sequence[str]) -> list[dict[str, Any]]:
    """The shard entries (name, samples, bytes, sha256) of one split, or of several in the order
    given, in order."""
    entries: list[dict[str, Any]] = []
    names = split_names(split)
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise UserError(f"the split {'+'.join(names)} names {twice[0]} twice: each split is read once")
    for name in names:
        if name not in manifest["splits"]:
            raise UserError(f"the shards hold no {name!r} split (they have: {', '.join(manifest['splits'])})")
        entries += manifest["splits"][name]["shards"]
    return entries


def shard_urls(
    location: str | os.PathLike, manifest: dict[str, Any], split: str | Sequence[str]
) -> list[str]:
    """Full paths or URLs of one split's shards (or several splits', in the order given)."""
    return [join_location(str(location), entry["name"]) for entry in split_shards(manifest, split)]


def list_shard_files(folder: str | os.PathLike) -> list[Path]:
    """The `{train,val,test}-NNNNNN.tar` files in a local folder, sorted by name."""
    path = Path(folder)
    if not path.is_dir():
        return []
    return sorted(entry for entry in path.iterdir() if is_shard_file(entry.name) and entry.is_file())


def manifest_class_names(manifest: dict[str, Any]) -> tuple[str, ...]:
    """The names of the 80 classes the shards were packed with (a generated set has its own)."""
    names = manifest.get("classes")
    if isinstance(names, list) and len(names) == NUM_CLASSES and all(isinstance(n, str) for n in names):
        return tuple(names)
    return CLASSES
