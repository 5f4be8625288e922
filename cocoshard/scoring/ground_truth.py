"""What a submission is checked and scored against: the true labels, and the keys it must cover.

    labels = load_labels("shards")                          # the val split of a shards folder
    labels = load_labels("shards-5fold")                    # every fold of a K-fold pack
    labels = load_labels("shards-5fold", "fold2")           # one fold (or several: fold0+fold2)
    labels = load_labels("ms-coco/labels/train/train")      # a folder of .cls files
    keys = image_keys("ms-coco/images/test-resized/test-resized")

Shards are read through the loaders' checked reader (`cocoshard.loading.tario.read_samples`): a
shard whose size, sha256 or sample count differs from the manifest is refused by name, so a
damaged label is never scored.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from cocoshard import CLASSES
from cocoshard.errors import UserError
from cocoshard.input_files import InputError, read_input
from cocoshard.loading.image_files import list_images
from cocoshard.loading.tario import Sample, read_samples
from cocoshard.prepare.manifest import (
    MANIFEST,
    fold_splits,
    manifest_class_names,
    read_manifest,
    shard_urls,
    split_shards,
)
from cocoshard.prepare.sources import LABEL_SUFFIX, MAX_LABEL_BYTES
from cocoshard.pure.format import EXT_LABELS, decode_labels, is_shard_file
from cocoshard.pure.labels import LabelError, multi_hot, parse_cls


def is_shard_folder(location: str | os.PathLike) -> bool:
    """True for a folder that holds a `manifest.json`."""
    return (Path(location) / MANIFEST).is_file()


def is_label_input(location: str | os.PathLike, path: str | os.PathLike) -> bool:
    """True when `load_labels(location)` reads the file `path`: a shards folder's manifest or one of
    its shards, or a `.cls` file of a labels folder (an output there would replace a label)."""
    file, folder = Path(path), Path(location)
    if not folder.is_dir() or not file.parent.exists() or not file.parent.samefile(folder):
        return False
    if is_shard_folder(folder):
        return file.name == MANIFEST or is_shard_file(file.name)
    return file.suffix == LABEL_SUFFIX


def read_label_folder(folder: str | os.PathLike) -> dict[str, np.ndarray]:
    """Multi-hot labels (bool) from a folder of `.cls` files, keyed by file stem; each read as pack
    reads it (a regular file of bounded size: a pipe or a device is refused, never waited on)."""
    files = sorted(Path(folder).glob("*" + LABEL_SUFFIX))
    if not files:
        raise UserError(f"{folder}: no {LABEL_SUFFIX} files here (give the labels folder or a shards folder)")
    labels = {}
    for file in files:
        try:
            labels[file.stem] = multi_hot(parse_cls(read_input(file, MAX_LABEL_BYTES)).ids).astype(bool)
        except (LabelError, InputError) as exc:
            raise UserError(f"{file}: {exc}") from exc
    return labels


def split_samples(location: str | os.PathLike, split: str) -> list[Sample]:
    """Every sample of one split of a shards folder, each shard checked against the manifest."""
    manifest = read_manifest(location)
    entries = split_shards(manifest, split)
    samples: list[Sample] = []
    for url, entry in zip(shard_urls(location, manifest, split), entries, strict=True):
        samples += read_samples(url, entry.get("sha256"), entry.get("samples"))
    return samples


def read_shard_labels(location: str | os.PathLike, split: str = "val") -> dict[str, np.ndarray]:
    """Multi-hot labels (bool) of one split of a shards folder, keyed by sample key."""
    labels = {}
    for sample in split_samples(location, split):
        if EXT_LABELS not in sample.members:
            raise UserError(f"{location}: sample {sample.key!r} of the {split} split has no labels")
        try:
            labels[sample.key] = decode_labels(sample.members[EXT_LABELS]).astype(bool)
        except ValueError as exc:
            raise UserError(f"{location}: sample {sample.key!r}: {exc}") from exc
    return labels


def class_names_of(location: str | os.PathLike | None) -> tuple[str, ...]:
    """The class names to report with: a shards folder's own (a generated set has its own), else
    the challenge's."""
    if location is not None and is_shard_folder(location):
        return manifest_class_names(read_manifest(location))
    return CLASSES


def labels_split(location: str | os.PathLike, split: str | None = None) -> str:
    """The split of a shards folder that labels are read from: `split` when given, else val, or
    every fold of a K-fold pack (`fold0+fold1+...`: each labelled image once, the out-of-fold set)."""
    if split is not None:
        return split
    return "+".join(fold_splits(read_manifest(location))) or "val"


def load_labels(location: str | os.PathLike, split: str | None = None) -> dict[str, np.ndarray]:
    """Labels from a shards folder (`labels_split`: val, every fold, or the split given) or from a
    folder of `.cls` files."""
    if not Path(location).is_dir():
        raise UserError(f"--labels {location}: no such folder")
    if not is_shard_folder(location):
        if split is not None:
            raise UserError(f"--split {split} names a split of shards; {location} is a folder of .cls files")
        return read_label_folder(location)
    return read_shard_labels(location, labels_split(location, split))


def image_keys(location: str | os.PathLike, split: str = "test") -> list[str]:
    """The keys a submission for `location` must hold: stems of a folder's images, or a split's keys."""
    if is_shard_folder(location):
        return sorted(sample.key for sample in split_samples(location, split))
    return [file.stem for file in list_images(location)]
