"""`cocoshard pack`: the challenge folder, read once, into WebDataset tar shards and a manifest.

    $ cocoshard pack --root ms-coco --out shards --format jpeg --shard-samples 800
    $ cocoshard pack --root ms-coco --out shards-5fold --folds 5      # for train --val-fold 0..4

A training sample is an image with a `.cls` file (as the challenge's own Dataset has it); the
labelled images are split into train and val by iterative stratification (`pure.split`), or with
`--folds K` dealt into K folds the same way (`pure.folds`: fold0 ... fold{K-1}, each in its own
shards). Train and every fold are shuffled with the seed so that a streaming shuffle buffer sees
mixed classes; val and test are sorted by key. Worker processes each write whole shards; every
image is fully decoded on the way, so a truncated or corrupt file is caught here and not in the
middle of a training run.

Every input file ends in a shard or in `manifest["rejected"]` with its reason; images without labels
are counted in `manifest["unlabelled_images"]`. `--strict` turns any rejection into a failed run
(exit 1, no manifest).

Atomic and repeatable: every setting and input is checked and the split planned first, then the
old manifest is removed before anything else is written, each shard is
written under a `.tmp-` name and renamed when complete, the manifest is written last, and shard
files the new manifest does not list are removed. A killed run therefore never leaves a manifest
describing missing or partial shards, and a re-run over the same input writes the same bytes.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import tarfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cocoshard import NUM_CLASSES, __version__
from cocoshard.atomic import atomic_open, atomic_write_text, remove_stale_temporaries
from cocoshard.config import PackConfig
from cocoshard.console import literal, stderr_console
from cocoshard.errors import UserError
from cocoshard.folder_lock import folder_lock
from cocoshard.input_files import InputError, read_input
from cocoshard.output_paths import check_output_folder
from cocoshard.prepare.encode import encode_image
from cocoshard.prepare.images import BadImage
from cocoshard.prepare.manifest import MANIFEST, list_shard_files
from cocoshard.prepare.pool import map_in_workers
from cocoshard.prepare.sources import (
    MAX_IMAGE_BYTES,
    Inventory,
    Sources,
    dataset_class_names,
    find_sources,
    take_inventory,
)
from cocoshard.prepare.summary import print_summary
from cocoshard.pure.folds import FOLD_METHOD, stratified_folds
from cocoshard.pure.format import (
    EXT_LABELS,
    FORMAT_VERSION,
    encode_labels,
    fold_split,
    member_name,
    shard_name,
)
from cocoshard.pure.labels import multi_hot
from cocoshard.pure.split import SPLIT_METHOD, stratified_split
from cocoshard.seeds import Stream, numpy_rng
from cocoshard.settings import print_config

MAX_EXAMPLES = 20


class InputsRejected(Exception):
    """Raised under --strict: some inputs were rejected, so no manifest was written."""

    def __init__(self, rejected: list[dict[str, str]]):
        super().__init__(f"{len(rejected)} input files rejected")
        self.rejected = rejected


# ----------------------------------------------------------------------------------- one shard


@dataclass
class ShardTask:
    out: str
    name: str
    pixel_format: str
    size: int
    # (key, image path, labels path or "", the 80 multi-hot bytes or b"" for test)
    samples: list[tuple[str, str, str, bytes]]


@dataclass
class ShardResult:
    name: str
    samples: int = 0
    bytes: int = 0
    sha256: str = ""
    class_counts: list[int] = field(default_factory=lambda: [0] * NUM_CLASSES)
    empty_labels: int = 0
    fields: dict[str, int] = field(default_factory=dict)
    rejected: list[dict[str, str]] = field(default_factory=list)


class _HashingWriter:
    """A write-only file that hashes and counts what passes through it."""

    def __init__(self, raw: Any):
        self.raw, self.sha256, self.size = raw, hashlib.sha256(), 0

    def write(self, data: bytes) -> int:
        self.raw.write(data)
        self.sha256.update(data)
        self.size += len(data)
        return len(data)

    def tell(self) -> int:
        return self.size


def add_member(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    """One regular file with fixed metadata (mtime 0, root, mode 0644): same input, same bytes."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(payload), 0, 0o644
    info.uid, info.gid, info.uname, info.gname = 0, 0, "", ""
    tar.addfile(info, io.BytesIO(payload))


def _add_sample(
    tar: tarfile.TarFile, task: ShardTask, sample: tuple[str, str, str, bytes], result: ShardResult
) -> np.ndarray | None:
    """Append one sample; returns its labels (None for a test sample or a rejected image)."""
    key, image_path, labels_path, labels = sample
    try:
        encoded = encode_image(read_input(Path(image_path), MAX_IMAGE_BYTES), task.pixel_format, task.size)
    except (InputError, BadImage) as exc:
        reason = str(exc)
        result.rejected.append({"path": image_path, "reason": reason})
        if labels_path:
            result.rejected.append(
                {"path": labels_path, "reason": f"its image {Path(image_path).name} was rejected: {reason}"}
            )
        return None
    add_member(tar, member_name(key, encoded.field), encoded.payload)
    if labels_path:
        add_member(tar, member_name(key, EXT_LABELS), encode_labels(np.frombuffer(labels, dtype=np.uint8)))
    result.fields[encoded.field] = result.fields.get(encoded.field, 0) + 1
    result.samples += 1
    return np.frombuffer(labels, dtype=np.uint8) if labels_path else None


def write_shard(task: ShardTask) -> ShardResult:
    """Write one shard (temporary name, then renamed); a shard left with no sample is removed."""
    result = ShardResult(task.name)
    counts = np.zeros(NUM_CLASSES, dtype=np.int64)
    path = Path(task.out) / task.name
    with atomic_open(path, "wb") as handle:
        sink = _HashingWriter(handle)
        with tarfile.open(fileobj=sink, mode="w", format=tarfile.PAX_FORMAT, encoding="utf-8") as tar:
            for sample in task.samples:
                labels = _add_sample(tar, task, sample, result)
                if labels is not None:
                    counts += labels
                    result.empty_labels += int(not labels.any())
    if result.samples == 0:
        path.unlink()
    result.bytes, result.sha256, result.class_counts = sink.size, sink.sha256.hexdigest(), counts.tolist()
    return result


# ----------------------------------------------------------------------------------- the run


Sample = tuple[str, str, str, bytes]


def plan_splits(
    inventory: Inventory, val_fraction: float, seed: int, folds: int = 0
) -> dict[str, list[Sample]]:
    """The samples of each split in shard order: train (or each of `folds` folds) shuffled with the
    seed, val and test by key."""
    labelled = inventory.labelled
    matrix = (
        np.stack([multi_hot(ids) for *_, ids in labelled])
        if labelled
        else np.zeros((0, NUM_CLASSES), np.uint8)
    )
    samples = [
        (key, str(image), str(cls), row.tobytes())
        for (key, image, cls, _), row in zip(labelled, matrix, strict=True)
    ]
    test = [(key, str(image), "", b"") for key, image in inventory.test]
    if folds:
        return {**_plan_folds(samples, matrix, folds, seed), "test": test}
    is_val = stratified_split(matrix, val_fraction, seed)
    train = [samples[i] for i in np.flatnonzero(~is_val)]
    order = numpy_rng(seed, Stream.PACK_TRAIN_ORDER).permutation(
        len(train)
    )  # a stream apart from the split's
    return {
        "train": [train[i] for i in order],
        "val": [samples[i] for i in np.flatnonzero(is_val)],
        "test": test,
    }


def _plan_folds(samples: list[Sample], matrix: np.ndarray, folds: int, seed: int) -> dict[str, list[Sample]]:
    """fold0 ... fold{K-1}: stratified (`pure.folds`), each shuffled with a stream of its own."""
    if len(samples) < folds:
        raise UserError(f"--folds {folds} needs at least {folds} labelled images; there are {len(samples)}")
    fold = stratified_folds(matrix, folds, seed)
    plan = {}
    for index in range(folds):
        members = np.flatnonzero(fold == index)
        order = numpy_rng(seed, index, Stream.PACK_FOLD_ORDER).permutation(len(members))
        plan[fold_split(index)] = [samples[i] for i in members[order]]
    return plan


def shard_tasks(
    plan: dict[str, list[Sample]], out: Path, pixel_format: str, size: int, per_shard: int
) -> list[ShardTask]:
    """Consecutive runs of `per_shard` samples, named `{split}-NNNNNN.tar` from 0 in each split (in
    the plan's order of splits)."""
    return [
        ShardTask(
            str(out),
            shard_name(split, start // per_shard),
            pixel_format,
            size,
            samples[start : start + per_shard],
        )
        for split, samples in plan.items()
        for start in range(0, len(samples), per_shard)
    ]


def _split_entry(split: str, results: list[ShardResult]) -> dict[str, Any]:
    mine = [r for r in results if r.name.startswith(split + "-") and r.samples]
    entry: dict[str, Any] = {"samples": sum(r.samples for r in mine), "bytes": sum(r.bytes for r in mine)}
    fields: dict[str, int] = {}
    for r in mine:
        for name, count in r.fields.items():
            fields[name] = fields.get(name, 0) + count
    entry["fields"] = dict(sorted(fields.items()))
    if split != "test":
        entry["class_counts"] = (
            np.sum([r.class_counts for r in mine], axis=0, dtype=np.int64).tolist()
            if mine
            else [0] * NUM_CLASSES
        )
        entry["empty_labels"] = sum(r.empty_labels for r in mine)
    entry["shards"] = [
        {"name": r.name, "samples": r.samples, "bytes": r.bytes, "sha256": r.sha256} for r in mine
    ]
    return entry


def _examples(paths: list[str]) -> dict[str, Any]:
    return {"count": len(paths), "examples": paths[:MAX_EXAMPLES]}


def build_manifest(
    cfg: PackConfig,
    sources: Sources,
    inventory: Inventory,
    results: list[ShardResult],
    rejected: list[dict[str, str]],
    splits: list[str],
) -> dict[str, Any]:
    """Everything a reader needs about the shards; see docs/format.md for the schema."""
    how = {"folds": cfg.folds} if cfg.folds else {"val_fraction": cfg.val_fraction}
    return {
        "format_version": FORMAT_VERSION,
        "created_by": f"cocoshard {__version__}",
        "pixel_format": cfg.format,
        "size": cfg.size,
        "seed": cfg.seed,
        **how,
        "split_method": FOLD_METHOD if cfg.folds else SPLIT_METHOD,
        "shard_samples": cfg.shard_samples,
        "sources": {name: str(path) if path else None for name, path in vars(sources).items()},
        "num_classes": NUM_CLASSES,
        "classes": dataset_class_names(cfg.root),
        "splits": {split: _split_entry(split, results) for split in splits},
        "rejected": rejected,
        "unlabelled_images": _examples(inventory.unlabelled),
        "deduplicated_labels": _examples(inventory.deduplicated),
    }


def _remove_unlisted(out: Path, listed: Iterable[str]) -> None:
    """Shards of an earlier run that this one did not write, and temporaries of a killed run."""
    keep = set(listed)
    for path in list_shard_files(out):
        if path.name not in keep:
            path.unlink()
    remove_stale_temporaries(out)


def check_out_apart(out: Path, sources: Sources) -> None:
    """--out must be a folder of its own: shards written among the input images would be read back
    as inputs by the next pack (and a stale shard there removed)."""
    for name, folder in vars(sources).items():
        if folder is not None and out.exists() and out.resolve() == folder.resolve():
            raise UserError(
                f"--out {out} is the {name.replace('_', ' ')} folder: pack into a folder of its own"
            )


def check_no_links(out: Path, names: Iterable[str]) -> None:
    """No file pack writes may be a symbolic link: it would be written through, or silently replaced."""
    links = [out / name for name in names if (out / name).is_symlink()]
    if links:
        raise UserError(
            f"{links[0]} is a symbolic link ({len(links)} in all among the files pack writes): cocoshard "
            f"never writes through a link; remove them"
        )


def pack_folder(cfg: PackConfig, progress: bool = False) -> dict[str, Any]:
    """Pack the folder described by a PackConfig; returns the manifest written to `cfg.out`.

    Holds `cfg.out`'s write lock throughout (a second pack into it is refused). Raises UserError
    when the inputs cannot be found, InputsRejected under `cfg.strict` when any input was rejected
    (then no manifest is written and no shard is left), WriteFailed when the disk is full.
    """
    out = Path(cfg.out)
    check_output_folder(out, "--out")
    sources = find_sources(cfg.root, cfg.train_images, cfg.train_labels, cfg.test_images)
    check_out_apart(out, sources)
    inventory = take_inventory(sources)
    plan = plan_splits(inventory, cfg.val_fraction, cfg.seed, cfg.folds)  # what can fail, before any change
    tasks = shard_tasks(plan, out, cfg.format, cfg.size, cfg.shard_samples)
    with folder_lock(out, "cocoshard pack"):
        check_no_links(out, [MANIFEST, *(task.name for task in tasks)])
        # From here on the folder is never described by a manifest of another run.
        with contextlib.suppress(FileNotFoundError):
            (out / MANIFEST).unlink()
        try:
            results = map_in_workers(
                write_shard,
                tasks,
                workers=cfg.workers,
                sizes=[len(t.samples) for t in tasks],
                progress=progress,
                desc="pack",
                describe=lambda task: task.name,
            )
        except BaseException:
            remove_stale_temporaries(out)  # a worker's half-written shard; whole shards may stay, unlisted
            raise
        rejected = sorted(
            inventory.rejected + [item for r in results for item in r.rejected], key=lambda item: item["path"]
        )
        if cfg.strict and rejected:
            _remove_unlisted(out, ())
            raise InputsRejected(rejected)
        if not any(r.samples for r in results if not r.name.startswith("test-")):
            _remove_unlisted(out, ())
            raise UserError(
                f"no usable labelled image in {sources.train_images}: all {len(rejected)} inputs were "
                f"rejected, e.g. {rejected[0]['path']}: {rejected[0]['reason']}"
            )
        manifest = build_manifest(cfg, sources, inventory, results, rejected, list(plan))
        _remove_unlisted(out, (r.name for r in results if r.samples))
        atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=1) + "\n")
    return manifest


def run(cfg: PackConfig) -> int:
    """`cocoshard pack`: pack, then print the summary (and every rejected file under --strict)."""
    print_config(cfg)
    console = stderr_console()
    try:
        manifest = pack_folder(cfg, progress=True)
    except InputsRejected as exc:
        console.print(f"[bold red]--strict: {len(exc.rejected)} input files rejected; nothing written:[/]")
        for item in exc.rejected:
            console.print(f"  {literal(item['path'])}: {literal(item['reason'])}")
        return 1
    print_summary(manifest, console, title=f"packed into {cfg.out}")
    return 0
