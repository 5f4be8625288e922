"""The runs an ensemble is made of: each run's best model and validation scores, checked to belong together.

    members = [read_member(run) for run in ("runs/fold0", "runs/fold1", "runs/fold2")]
    check_members(members, manifest, "shards-3fold")       # one pack, one run per fold, same classes
    validation = validation_set(members, [m.val for m in members])

A member is a run folder written by `cocoshard train`: its `best.pt` (the model and settings of
the best epoch) and its `val-scores.npz` (that epoch's validation scores, tied to that `best.pt`
by its sha256). The members of an ensemble are the runs of one K-fold set (`train --val-fold i`,
one run per fold) or several runs on the same train/val split (other models, other seeds); in
both cases trained on one pack of shards with the same class names. `validation_set` joins their
validation scores: out-of-fold scores for a K-fold set (every labelled image of the folds scored
once, by the model that never trained on it), the average of the models' scores for one split.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cocoshard.config import TrainConfig
from cocoshard.errors import UserError
from cocoshard.prepare.manifest import fold_splits, manifest_class_names, shards_identity
from cocoshard.pure.format import FOLD_PREFIX, fold_split
from cocoshard.scoring.scores import Scores, file_sha256, read_scores
from cocoshard.training.checkpoint import BEST, checkpoint_config, load_checkpoint
from cocoshard.training.runlog import VAL_SCORES_FILE


@dataclass(frozen=True)
class Member:
    """One run of an ensemble, as its folder holds it."""

    run: Path
    checkpoint: Path  # RUN/best.pt
    sha256: str  # of best.pt
    settings: TrainConfig
    classes: tuple[str, ...]
    identity: str  # the shards it was trained on (`manifest.shards_identity`)
    val_split: str  # "val", or the fold it validated on ("fold2")
    val: Scores  # its best epoch's validation scores


@dataclass(frozen=True)
class ScoreSet:
    """Scores of a set of images, one row per key, as an ensemble tunes or submits them."""

    keys: list[str]
    scores: np.ndarray  # (N, 80) float32: the values written, the values tuned on
    split: str  # "val", the folds joined by + ("fold0+fold1+fold2"), "test" or "images"
    source: str  # "shards <identity>" or "images <folder>", as `predict --scores` records it


def read_member(run: str) -> Member:
    """A run folder (or its best.pt) with its best model's settings and validation scores, checked."""
    given = Path(run)
    folder = given.parent if given.is_file() else given
    checkpoint = folder / BEST
    if not checkpoint.is_file():
        raise UserError(
            f"{run}: no {BEST} there; give the folder of a cocoshard train run that finished an epoch"
        )
    state = load_checkpoint(checkpoint)
    settings = checkpoint_config(state, checkpoint)
    scores_path = folder / VAL_SCORES_FILE
    if not scores_path.is_file():
        raise UserError(
            f"{run}: no {VAL_SCORES_FILE} beside {BEST} (it was trained by a cocoshard that did not keep "
            f"its validation scores): train it again"
        )
    val = read_scores(scores_path)
    sha256 = file_sha256(checkpoint)
    if val.checkpoint_sha256 != sha256:
        raise UserError(
            f"{scores_path} holds the validation scores of another {BEST} than the one beside it (the run "
            f"stopped between writing the two, or one was replaced): train it again, or resume it until a "
            f"later epoch is best"
        )
    val_split = "val" if settings.val_fold is None else fold_split(settings.val_fold)
    if val.split != val_split:
        raise UserError(f"{scores_path} scores the {val.split!r} split; the run validated on {val_split!r}")
    return Member(
        folder,
        checkpoint,
        sha256,
        settings,
        tuple(str(name) for name in state["classes"]),
        str(state.get("shards") or ""),
        val_split,
        val,
    )


def check_members(members: list[Member], manifest: dict[str, Any], shards: str) -> None:
    """Refuse members of other shards, with other class names, named twice, or sharing a fold."""
    identity, names = shards_identity(manifest), manifest_class_names(manifest)
    seen: dict[Path, Member] = {}
    for member in members:
        if member.run.resolve() in seen:
            raise UserError(f"{member.run} is named twice: each run takes part once")
        seen[member.run.resolve()] = member
        if member.identity != identity:
            raise UserError(
                f"{member.run} was trained on other shards than {shards} (another pack, or one re-packed "
                f"since): the runs of an ensemble are trained on one pack"
            )
        if member.classes != names:
            differ = next(
                c for c in range(len(names)) if c >= len(member.classes) or member.classes[c] != names[c]
            )
            theirs = member.classes[differ] if differ < len(member.classes) else "missing"
            raise UserError(
                f"{member.run} names class {differ} {theirs!r}, {shards} names it {names[differ]!r}: the "
                f"runs of an ensemble must predict the same classes"
            )
    if fold_splits(manifest):
        by_fold: dict[str, Member] = {}
        for member in members:
            if member.val_split in by_fold:
                raise UserError(
                    f"{by_fold[member.val_split].run} and {member.run} both validated on {member.val_split}: "
                    f"a K-fold ensemble takes one run per fold (train --val-fold 0 to "
                    f"{len(fold_splits(manifest)) - 1})"
                )
            by_fold[member.val_split] = member


def average_scores(sets: list[Scores], what: str) -> ScoreSet:
    """The mean of several runs' scores of the same images (rows matched by key, in the first one's
    order), as float32; refused when the runs scored different images."""
    keys = sets[0].keys
    for found in sets[1:]:
        if set(found.keys) != set(keys) or len(found.keys) != len(keys):
            raise UserError(
                f"the {what} scores of the runs cover different images ({len(keys)} and {len(found.keys)}, "
                f"{len(set(keys) ^ set(found.keys))} not in both): the runs must score the same images"
            )
    rows = [found.scores[_order(found.keys, keys)] for found in sets]
    mean = np.mean(np.stack(rows).astype(np.float64), axis=0)
    return ScoreSet(list(keys), mean.astype(np.float32), sets[0].split, sets[0].source)


def _order(keys: list[str], wanted: list[str]) -> np.ndarray:
    index = {key: row for row, key in enumerate(keys)}
    return np.asarray([index[key] for key in wanted], dtype=np.int64)


def validation_set(members: list[Member], scores: list[Scores]) -> ScoreSet:
    """Out-of-fold scores of a K-fold set (each member's fold, in fold order), or for runs of one
    split the average of their scores."""
    if members[0].val_split == "val":
        return average_scores(scores, "validation")
    ordered = sorted(zip(members, scores, strict=True), key=lambda pair: _fold_number(pair[0].val_split))
    keys = [key for _, found in ordered for key in found.keys]
    if len(set(keys)) != len(keys):
        raise UserError("the runs' validation folds share images: they are not folds of one pack")
    return ScoreSet(
        keys,
        np.concatenate([found.scores for _, found in ordered]).astype(np.float32),
        "+".join(member.val_split for member, _ in ordered),
        scores[0].source,
    )


def _fold_number(split: str) -> int:
    return int(split.removeprefix(FOLD_PREFIX))
