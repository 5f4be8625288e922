"""Which shards a run trains and validates on, and that they are the ones packed, before any work.

`run_splits` is the one decision of which splits are train and val: the shards' train and val, or
with `--val-fold I` on a K-fold pack every other fold (read as one) and fold I. `check_shards`
refuses, each by name and with the way on, an empty or missing split, a shard replaced since pack
(identity before keys, so that the real cause is named), images shared by train and val, and a
batch larger than the train split.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cocoshard.config import TrainConfig
from cocoshard.errors import ConfigError, UserError
from cocoshard.loading.tario import BadShard, shard_keys
from cocoshard.prepare.manifest import (
    fold_splits,
    is_url,
    read_manifest,
    shard_urls,
    split_shards,
    split_size,
)
from cocoshard.shard_cache import Remote, remote_of


@dataclass(frozen=True)
class RunSplits:
    """The splits a run trains and validates on: each a split name, or several joined by `+`."""

    train: str
    val: str


def run_splits(cfg: TrainConfig, manifest: dict[str, Any]) -> RunSplits:
    """train and val; or on a K-fold pack with `--val-fold I`, every other fold (read as one) and
    fold I. A K-fold pack without `--val-fold`, or folds asked of a train/val pack, is refused."""
    folds = fold_splits(manifest)
    if not folds:
        if cfg.val_fold is not None:
            raise ConfigError(
                f"--val-fold {cfg.val_fold}: {cfg.shards} holds a train/val split, not folds; pack with "
                f"--folds K to train on folds, or drop --val-fold"
            )
        return RunSplits("train", "val")
    if cfg.val_fold is None or cfg.val_fold >= len(folds):
        which = "" if cfg.val_fold is None else f", not {cfg.val_fold}"
        raise ConfigError(
            f"{cfg.shards} holds {len(folds)} folds (pack --folds {len(folds)}): give --val-fold 0 to "
            f"{len(folds) - 1}{which}, the fold this run validates on (the other folds train it)"
        )
    val = folds[cfg.val_fold]
    return RunSplits("+".join(fold for fold in folds if fold != val), val)


def check_shards(cfg: TrainConfig, world_size: int) -> dict[str, Any]:
    """The manifest, after checking that both splits exist, have files, share no image, and fit the batch.

    Shards at URLs are read whole for the check (their keys are in their tar headers), each checked
    against its sha256: through the `--cache`, where training then finds them, or downloaded once
    more without one."""
    remote = remote_of(cfg)
    manifest = read_manifest(cfg.shards, remote.network)
    splits = run_splits(cfg, manifest)
    for split in (splits.train, splits.val):
        if not split_size(manifest, split):
            raise UserError(
                f"{cfg.shards}: the {split} split is empty; re-pack with more images "
                f"(or a larger --val-fraction, or fewer --folds) before training"
            )
        if not is_url(cfg.shards):
            missing = [url for url in shard_urls(cfg.shards, manifest, split) if not Path(url).is_file()]
            if missing:
                raise UserError(
                    f"shard {missing[0]} listed in the manifest is missing ({len(missing)} missing "
                    f"in all): re-pack into {cfg.shards}"
                )
    shared = _keys_in_both_splits(cfg, manifest, remote, splits)
    if shared:
        which = f" ({splits.train} and {splits.val})" if splits.val != "val" else ""
        raise UserError(
            f"{cfg.shards}: {len(shared)} images are in both the train and the val split{which} (e.g. "
            f"{', '.join(shared[:3])}): validation would score images the model learns from; re-pack"
        )
    train_samples = split_size(manifest, splits.train)
    if cfg.batch_size * world_size > train_samples:
        raise ConfigError(
            f"--batch-size {cfg.batch_size} x {world_size} process(es) is larger than the train split "
            f"({train_samples} images): use --batch-size {max(1, train_samples // world_size)} or less"
        )
    return manifest


def _keys_in_both_splits(
    cfg: TrainConfig, manifest: dict[str, Any], remote: Remote, splits: RunSplits
) -> list[str]:
    """Keys of a train shard that a val shard holds too, once each shard is known to be the one
    packed: identity before keys, so that a shard replaced since pack is named as such, never
    blamed on the split (a size differs at a stat; a sha256 is read only when keys are shared)."""
    roles = {"train": splits.train, "val": splits.val}
    entries = {role: {e["name"]: e for e in split_shards(manifest, split)} for role, split in roles.items()}
    keys = {
        role: {
            url: _keys(url, entries[role][Path(url).name], cfg, remote)
            for url in shard_urls(cfg.shards, manifest, split)
        }
        for role, split in roles.items()
    }
    shared = set(_shared_keys(keys))
    if shared:  # rare: hash each shard holding them before blaming the split
        for role, found in keys.items():
            for url in [url for url, its in found.items() if shared.intersection(its)]:
                found[url] = _keys(url, entries[role][Path(url).name], cfg, remote, full=True)
    return _shared_keys(keys)


def _shared_keys(keys: dict[str, dict[str, list[str]]]) -> list[str]:
    """Keys found in a train shard and in a val shard, sorted."""
    train = {key for found in keys["train"].values() for key in found}
    return sorted(train & {key for found in keys["val"].values() for key in found})


def _identity_problem(url: str, entry: dict[str, Any], full: bool = False) -> str | None:
    """How a local shard differs from its manifest entry: its size (a stat), or with `full` its sha256."""
    size = Path(url).stat().st_size
    if size != entry["bytes"]:
        return f"it is {size:,} bytes, the manifest says {entry['bytes']:,}"
    if full:
        digest = hashlib.sha256()
        with open(url, "rb") as handle:
            while chunk := handle.read(1 << 22):
                digest.update(chunk)
        if digest.hexdigest() != entry["sha256"]:
            return f"its sha256 is {digest.hexdigest()[:16]}..., the manifest says {entry['sha256'][:16]}..."
    return None


def _keys(url: str, entry: dict[str, Any], cfg: TrainConfig, remote: Remote, full: bool = False) -> list[str]:
    """A shard's keys once it is the shard packed; a replaced or damaged shard is named here, or
    with --skip-bad-samples left to the loader (which skips it whole). A shard at a URL is read
    whole and checked against its sha256 (through the cache); a network failure is never skipped:
    it stops the run, naming the URL."""
    try:
        if not is_url(url):
            problem = _identity_problem(url, entry, full)
            if problem:
                raise BadShard(
                    f"shard {url} is not the one its manifest lists ({problem}): replaced or re-packed "
                    f"since? Re-pack into {cfg.shards} (or pass --skip-bad-samples to train without it)"
                )
        return shard_keys(url, entry["sha256"], remote)
    except BadShard:
        if cfg.skip_bad_samples:
            return []
        raise
