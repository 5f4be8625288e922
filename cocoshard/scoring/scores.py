"""The scores file (`predict --scores`): every image's 80 probabilities, and what made them.

A compressed `.npz` of plain arrays, read with `allow_pickle=False`:

    keys, scores        N image keys, (N, 80) float32 probabilities
    thresholds          the 80 thresholds the submission was made with; min_labels, tta
    classes             the 80 class names
    checkpoint          the checkpoint's path and its sha256 (checkpoint_sha256)
    source, split       "shards" (with the shards' identity) or "images" (the folder), and which split
    unreadable          keys of images that could not be read (predicted with the prior:
                        predict --unreadable prior)

so that `evaluate --scores` can refuse scores of another model, another split or other images
instead of printing their mAP beside a submission they did not make (`check_scores_match`), and
`cocoshard thresholds` can re-tune from them.
"""

from __future__ import annotations

import hashlib
import io
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cocoshard import CLASSES, NUM_CLASSES
from cocoshard.atomic import atomic_write_bytes
from cocoshard.errors import UserError
from cocoshard.pure.metrics import predictions_from_scores
from cocoshard.scoring.submission import Submission, build_submission

FIELDS = ("keys", "scores", "thresholds", "classes")


def file_sha256(path: str | os.PathLike) -> str:
    """The sha256 of a file (a checkpoint), read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass
class Scores:
    """What a scores file holds."""

    keys: list[str]
    scores: np.ndarray  # (N, 80) float
    thresholds: np.ndarray  # (80,)
    min_labels: int = 1
    tta: bool = False
    checkpoint: str = ""
    checkpoint_sha256: str = ""
    source: str = ""  # "shards <identity>" or "images <folder>"
    split: str = ""
    unreadable: list[str] = field(default_factory=list)

    def submission(self) -> Submission:
        """The submission these scores give with their own thresholds and --min-labels."""
        predicted = predictions_from_scores(self.scores, self.thresholds)
        return build_submission(self.keys, predicted, self.scores, min_labels=self.min_labels)


def save_scores(path: str | os.PathLike, found: Scores) -> None:
    """Write a scores file atomically (no pickles)."""
    arrays: dict[str, Any] = {
        "keys": np.asarray(found.keys, dtype=str),
        "scores": np.asarray(found.scores, dtype=np.float32),
        "thresholds": np.asarray(found.thresholds, dtype=np.float64),
        "classes": np.asarray(CLASSES, dtype=str),
        "min_labels": np.asarray(found.min_labels),
        "tta": np.asarray(found.tta),
        "checkpoint": np.asarray(found.checkpoint),
        "checkpoint_sha256": np.asarray(found.checkpoint_sha256),
        "source": np.asarray(found.source),
        "split": np.asarray(found.split),
        "unreadable": np.asarray(found.unreadable, dtype=str),
    }
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    atomic_write_bytes(path, buffer.getvalue())


def read_scores(path: str | os.PathLike) -> Scores:
    """A scores file written by `save_scores` (loaded without pickles); UserError naming it otherwise."""
    try:
        with np.load(path, allow_pickle=False) as data:
            names = set(data.files)
            missing = [name for name in FIELDS if name not in names]
            if missing:
                raise KeyError(f"it has no {', '.join(missing)}")
            text = {
                name: str(data[name])
                for name in ("checkpoint", "checkpoint_sha256", "source", "split")
                if name in names
            }
            found = Scores(
                keys=[str(k) for k in data["keys"]],
                scores=np.asarray(data["scores"], np.float64),
                thresholds=np.asarray(data["thresholds"], np.float64),
                min_labels=int(data["min_labels"]) if "min_labels" in names else 1,
                tta=bool(data["tta"]) if "tta" in names else False,
                unreadable=[str(k) for k in data["unreadable"]] if "unreadable" in names else [],
                **text,
            )
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{path}: not a scores file written by cocoshard predict --scores ({exc})") from None
    if found.scores.shape != (len(found.keys), NUM_CLASSES) or found.thresholds.shape != (NUM_CLASSES,):
        raise UserError(f"{path}: scores of shape {found.scores.shape} for {len(found.keys)} keys")
    if not np.isfinite(found.scores).all():
        raise UserError(f"{path}: the scores hold NaN or infinite values")
    return found


def check_scores_match(
    found: Scores,
    path: str,
    submission: Submission,
    source: str,
    labels_identity: str | None = None,
    labels_split: str = "val",
) -> None:
    """Refuse scores that did not make `submission`: other images, other thresholds or model,
    another split than `labels_split` of the shards the labels come from."""
    keys, wanted = set(found.keys), set(submission)
    if keys != wanted:
        raise UserError(
            f"{path} holds scores of other images than {source} ({len(wanted - keys)} of its images "
            f"have none, {len(keys - wanted)} scored images are not in it): the scores come from "
            f"another run or split"
        )
    remade = found.submission()
    differ = sorted(key for key in wanted if key not in found.unreadable and remade[key] != submission[key])
    if differ:
        raise UserError(
            f"the classes in {source} do not follow from the scores in {path} with their own thresholds "
            f"({len(differ)} images differ, e.g. {differ[0]!r}): the two files come from different "
            f"models, runs or thresholds"
        )
    if (
        labels_identity is not None
        and found.source.startswith("shards ")
        and (found.source.split(" ", 1)[1] != labels_identity or found.split != labels_split)
    ):
        raise UserError(
            f"{path} scores the {found.split!r} split of other shards than the labels given "
            f"({labels_split!r}): evaluate scores against the split of the shards they were predicted "
            f"from (--split)"
        )


def load_scores(path: str | os.PathLike, keys: list[str]) -> np.ndarray:
    """Rows of a `predict --scores` file in the order of `keys` (every key must be there)."""
    found = read_scores(path)
    row = {key: index for index, key in enumerate(found.keys)}
    missing = [key for key in keys if key not in row]
    if missing:
        raise UserError(f"{path}: no scores for {len(missing)} evaluated image(s), e.g. {missing[0]!r}")
    return found.scores[[row[key] for key in keys]]
