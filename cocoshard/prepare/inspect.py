"""`cocoshard inspect`: what packed shards hold and, with --verify, proof that they hold it intact.

    $ cocoshard inspect --shards shards
    $ cocoshard inspect --shards shards --verify
    $ cocoshard inspect --shards s3://bucket/shards --verify --cache /scratch/shards

The summary reads only `manifest.json` (`cocoshard.prepare.summary`). `--verify` re-hashes every
shard against the manifest and reads every sample back: one pixel member of the manifest's format
that decodes to the size its `.hw` gives, labels of 80 zeros and ones on train and val samples
only, no key twice. It names each bad shard and exits 1 on any mismatch. Shards at URLs are
downloaded one at a time into a temporary file and verified there; with `--cache` those that pass
are kept in it (a node's cache filled before training), and a URL that cannot be read is named
with its network failure.

The members are read with Python's own `tarfile`, not with the loader's parser
(`cocoshard.loading.tario`), on purpose: a shard that passes is readable by the standard tar
reader any other tool uses, and a fault one parser tolerates cannot hide in the other's blind spot.
Members are read, never extracted, so names inside a shard never touch the filesystem.
"""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

from PIL import Image

from cocoshard.config import InspectConfig
from cocoshard.console import literal, stdout_console
from cocoshard.prepare.manifest import is_url, labelled_splits, list_shard_files, read_manifest
from cocoshard.prepare.pool import map_in_workers
from cocoshard.prepare.sources import MAX_IMAGE_PIXELS
from cocoshard.prepare.summary import print_summary
from cocoshard.pure.format import (
    EXT_JPEG,
    EXT_LABELS,
    EXT_PIXELS,
    IMAGE_FIELDS,
    decode_labels,
    decode_pixels,
    key_problem,
    split_member_name,
)
from cocoshard.remote import NetworkError, join_location, read_url
from cocoshard.settings import print_config
from cocoshard.shard_cache import Remote, remote_of


def check_sample(key: str, fields: dict[str, bytes], split: str, pixel_format: str, size: int) -> list[str]:
    """What is wrong with one sample (an empty list when nothing is)."""
    problems = [key_problem(key)] if key_problem(key) else []
    images = [f for f in fields if f in IMAGE_FIELDS[pixel_format]]
    expected = set(images[:1]) | ({EXT_LABELS} if split != "test" else set())
    if len(images) != 1:
        problems.append(
            f"{len(images)} pixel members, expected one of {'/'.join(IMAGE_FIELDS[pixel_format])}"
        )
    if set(fields) != expected:
        problems.append(f"members {sorted(fields)}, expected {sorted(expected)}")
    if EXT_LABELS in fields:
        try:
            decode_labels(fields[EXT_LABELS])
        except ValueError as exc:
            problems.append(str(exc))
    if len(images) == 1:
        problems += _check_pixels(fields[images[0]], images[0], size)
    return [f"{key}: {p}" for p in problems]


def _check_pixels(data: bytes, field: str, size: int) -> list[str]:
    if field == EXT_PIXELS:
        try:
            decode_pixels(data, max_side=size)
        except ValueError as exc:
            return [str(exc)]
        return []
    try:
        image = Image.open(io.BytesIO(data), formats=("JPEG",) if field == EXT_JPEG else ("PNG",))
        if image.width * image.height > MAX_IMAGE_PIXELS:
            return [f"{field} declares {image.width} x {image.height} pixels, more than an image may have"]
        image.load()
    except Exception as exc:  # any decoder failure is a bad sample, whatever the exception type
        return [f"{field} does not decode: {exc}"]
    if max(image.size) > size:
        return [f"{field} decodes to {image.height}x{image.width}, larger than the manifest's size {size}"]
    return []


MAX_PROBLEMS_PER_SHARD = 20


def _file_digest(path: Path) -> tuple[int, str]:
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


def _read_samples(path: Path, problems: list[str]) -> list[tuple[str, dict[str, bytes]]]:
    """The samples of a tar shard as WebDataset groups them: consecutive members sharing a key."""
    samples: list[tuple[str, dict[str, bytes]]] = []
    try:
        with tarfile.open(path, mode="r:") as tar:
            for member in tar:
                key, field = split_member_name(member.name)
                if not member.isfile():
                    problems.append(f"{member.name}: not a regular file")
                    continue
                if not samples or samples[-1][0] != key:
                    samples.append((key, {}))
                if field in samples[-1][1]:
                    problems.append(f"{member.name}: member appears twice")
                samples[-1][1][field] = tar.extractfile(member).read()
    except (tarfile.TarError, EOFError, OSError) as exc:
        problems.append(f"cannot be read as a tar file: {exc}")
    return samples


def verify_shard(task: tuple[str, str, dict[str, Any], str, int]) -> tuple[list[str], list[str]]:
    """(problems, keys) of one shard: size and sha256 against its manifest entry, then every sample."""
    path_text, split, entry, pixel_format, size = task
    path = Path(path_text)
    if not path.is_file():
        return ["missing"], []
    problems: list[str] = []
    length, digest = _file_digest(path)
    if length != entry["bytes"]:
        problems.append(f"{length:,} bytes, the manifest says {entry['bytes']:,}")
    if digest != entry["sha256"]:
        problems.append("sha256 differs from the manifest")
    samples = _read_samples(path, problems)
    for key, fields in samples:
        problems += check_sample(key, fields, split, pixel_format, size)
    if len(samples) != entry["samples"]:
        problems.append(f"{len(samples)} samples, the manifest says {entry['samples']}")
    keys = [key for key, _ in samples]
    problems += [f"{key}: key appears {n} times" for key, n in Counter(keys).items() if n > 1]
    if len(problems) > MAX_PROBLEMS_PER_SHARD:
        problems = problems[:MAX_PROBLEMS_PER_SHARD] + [
            f"... and {len(problems) - MAX_PROBLEMS_PER_SHARD} more"
        ]
    return problems, keys


def verify_remote_shard(
    task: tuple[str, str, dict[str, Any], str, int, Remote],
) -> tuple[list[str], list[str]]:
    """`verify_shard` of a shard at a URL, downloaded into a temporary file (in the cache's folder,
    where it stays when it passes)."""
    url, split, entry, pixel_format, size, remote = task
    try:
        data = read_url(url, remote.network)
    except NetworkError as exc:
        return [f"not verified: {exc}"], []
    cache = remote.cache
    if cache is not None:
        os.makedirs(cache.folder, exist_ok=True)
    fd, temporary = tempfile.mkstemp(prefix=".tmp-verify-", dir=cache.folder if cache else None)
    path = Path(temporary)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        problems, keys = verify_shard((temporary, split, entry, pixel_format, size))
        if cache is not None and not problems:
            with cache.lock(entry["sha256"]):
                cache.admit_file(path, entry["sha256"])
        return problems, keys
    finally:
        path.unlink(missing_ok=True)


def verify_shards(
    folder: str | Path,
    manifest: dict[str, Any],
    workers: int | None = None,
    progress: bool = False,
    remote: Remote | None = None,
) -> dict[str, list[str]]:
    """Problems by shard name (and by split for cross-shard checks); empty when everything is intact."""
    splits = (*labelled_splits(manifest), "test")
    entries = [
        (split, entry) for split in splits for entry in manifest["splits"].get(split, {}).get("shards", [])
    ]
    common = (manifest["pixel_format"], manifest["size"])
    if is_url(str(folder)):
        remote = remote or Remote()
        urls = [join_location(str(folder), entry["name"]) for _, entry in entries]
        tasks: list[Any] = [(url, s, e, *common, remote) for url, (s, e) in zip(urls, entries, strict=True)]
    else:
        tasks = [(str(Path(folder) / entry["name"]), split, entry, *common) for split, entry in entries]
    results = map_in_workers(
        verify_remote_shard if is_url(str(folder)) else verify_shard,
        tasks,
        workers=workers,
        sizes=[e["samples"] for _, e in entries],
        progress=progress,
        desc="verify",
        unit="sample",
        describe=lambda task: task[2]["name"],
    )
    problems = {
        entry["name"]: found for (_, entry), (found, _) in zip(entries, results, strict=True) if found
    }
    keys: dict[str, list[str]] = {split: [] for split in splits}
    for (split, _), (_, shard_keys) in zip(entries, results, strict=True):
        keys[split] += shard_keys
    for group in (labelled_splits(manifest), ("test",)):
        seen = Counter(key for split in group for key in keys[split])
        repeated = sorted(key for key, n in seen.items() if n > 1)
        if repeated:
            problems["/".join(group)] = [
                f"{len(repeated)} keys appear in more than one sample, e.g. {', '.join(repeated[:5])}"
            ]
    return problems


def run(cfg: InspectConfig) -> int:
    """`cocoshard inspect`: print the summary; with --verify check every shard, exit 1 on any problem."""
    print_config(cfg)
    console = stdout_console()
    remote = remote_of(cfg)
    manifest = read_manifest(cfg.shards, remote.network)
    print_summary(manifest, console, title=f"shards in {cfg.shards}", layout=True)
    if not is_url(cfg.shards):
        listed = {entry["name"] for split in manifest["splits"].values() for entry in split["shards"]}
        extra = [p.name for p in list_shard_files(cfg.shards) if p.name not in listed]
        if extra:
            console.print(
                f"note: {len(extra)} shard files not in the manifest (ignored): "
                f"{literal(', '.join(extra[:5]))}"
            )
    if not cfg.verify:
        return 0
    problems = verify_shards(cfg.shards, manifest, cfg.workers, progress=True, remote=remote)
    total = sum(len(split["shards"]) for split in manifest["splits"].values())
    if not problems:
        console.print(
            f"[bold green]verified[/] {total} shards: sizes, sha256 and every sample match the manifest"
        )
        return 0
    console.print(f"[bold red]{len(problems)} of {total} shards fail verification:[/]")
    for name, found in problems.items():
        for problem in found:
            console.print(f"  {literal(name)}: {literal(problem)}")
    return 1
