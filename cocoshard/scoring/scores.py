"""The scores file (`predict --scores`): every image's 80 probabilities, and what made them.

A compressed `.npz` of plain arrays, read with `allow_pickle=False`:

    keys, scores        N image keys, (N, 80) float32 probabilities
    thresholds          the 80 thresholds the submission was made with; min_labels, tta
    classes             the 80 class names
    checkpoint          the checkpoint's path and its sha256 (checkpoint_sha256)
    source, split       "shards" (with the shards' identity) or "images" (the folder), and which split
    unreadable          keys of images that could not be read (predicted with the prior:
                        predict --unreadable prior)
    trained_on          the identity of the shards the model was trained on and how their split
    trained_split       was drawn (JSON): evaluate and thresholds compare them with the labels'
                        shards (`cocoshard.scoring.same_shards`)
    other_shards        the warning predict gave when told --allow-other-shards ("" otherwise)

so that `evaluate --scores` can refuse scores of another model, another split or other images
instead of printing their mAP beside a submission they did not make (`check_scores_match`), and
`cocoshard thresholds` can re-tune from them. A file is read as any input a user names (regular,
size-bounded, also what it unpacks to), and every field is checked before use: at least one image,
each key once and an image key, probabilities and thresholds finite and in [0, 1].
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import zipfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cocoshard import CLASSES, NUM_CLASSES
from cocoshard.atomic import atomic_write_bytes
from cocoshard.errors import UserError
from cocoshard.input_files import InputError, parse_json, read_input
from cocoshard.pure.decision import decide_labels
from cocoshard.pure.format import key_problem
from cocoshard.scoring.submission import Submission, build_submission

FIELDS = ("keys", "scores", "thresholds", "classes")
# 65,000 images scores are ~21 MB as float32; a file (or what it unpacks to) far larger is not one.
SCORES_LIMIT = 512 * 2**20


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
    trained_on: str = ""  # shards identity of the model's training data (checkpoint's `shards`)
    trained_split: dict[str, Any] = field(default_factory=dict)  # how that split was drawn
    other_shards: str = ""  # predict's warning under --allow-other-shards

    def submission(self) -> Submission:
        """The submission these scores give with their own thresholds and --min-labels."""
        return build_submission(self.keys, decide_labels(self.scores, self.thresholds, self.min_labels))


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
        "trained_on": np.asarray(found.trained_on),
        "trained_split": np.asarray(json.dumps(found.trained_split)),
        "other_shards": np.asarray(found.other_shards),
    }
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    atomic_write_bytes(path, buffer.getvalue())


def _array(data: Any, name: str, kind: str, ndim: int) -> np.ndarray:
    """Member `name` of an opened scores file, checked for its dtype kind and dimensions before use."""
    value = data[name]
    if value.dtype.kind not in kind or value.ndim != ndim:
        raise ValueError(f"its {name!r} is a {value.ndim}-D {value.dtype} array, not what predict writes")
    return value


def _text(data: Any, name: str) -> str:
    if name not in data.files:
        return ""
    value = data[name]
    if value.dtype.kind != "U" or value.ndim != 0:
        raise ValueError(f"its {name!r} is not one string")
    return str(value)


def _open_checked(path: str | os.PathLike) -> Scores:
    """The fields of a scores file, each checked for its type and shape (raises ValueError)."""
    try:
        data = read_input(Path(path), SCORES_LIMIT)
    except InputError as exc:
        raise ValueError(str(exc)) from None
    with np.load(io.BytesIO(data), allow_pickle=False) as opened:
        unpacked = sum(info.file_size for info in opened.zip.infolist())  # declared, before inflating
        if unpacked > SCORES_LIMIT:
            raise ValueError(f"it would unpack to {unpacked:,} bytes, more than the {SCORES_LIMIT:,} allowed")
        missing = [name for name in FIELDS if name not in opened.files]
        if missing:
            raise ValueError(f"it has no {', '.join(missing)}")
        if len(_array(opened, "classes", "U", 1)) != NUM_CLASSES:
            raise ValueError(f"its 'classes' are not {NUM_CLASSES} class names")
        min_labels = _array(opened, "min_labels", "iu", 0) if "min_labels" in opened.files else 1
        return Scores(
            keys=[str(k) for k in _array(opened, "keys", "U", 1)],
            scores=np.asarray(_array(opened, "scores", "f", 2), np.float64),
            thresholds=np.asarray(_array(opened, "thresholds", "f", 1), np.float64),
            min_labels=int(min_labels),
            tta=bool(_array(opened, "tta", "b", 0)) if "tta" in opened.files else False,
            unreadable=[str(k) for k in _array(opened, "unreadable", "U", 1)]
            if "unreadable" in opened.files
            else [],
            checkpoint=_text(opened, "checkpoint"),
            checkpoint_sha256=_text(opened, "checkpoint_sha256"),
            source=_text(opened, "source"),
            split=_text(opened, "split"),
            trained_on=_text(opened, "trained_on"),
            trained_split=_json_dict(_text(opened, "trained_split") or "{}"),
            other_shards=_text(opened, "other_shards"),
        )


def _content_problem(found: Scores) -> str | None:
    """What is wrong with well-typed fields: no image, a key twice or not a key, scores or
    thresholds that are not probabilities, unreadable images that were not scored."""
    if not found.keys:
        return "it scores no image"
    if found.scores.shape != (len(found.keys), NUM_CLASSES) or found.thresholds.shape != (NUM_CLASSES,):
        return f"scores of shape {found.scores.shape} for {len(found.keys)} keys"
    repeated = [key for key, count in Counter(found.keys).items() if count > 1]
    if repeated:
        return (
            f"{len(repeated)} key(s) appear more than once, e.g. {repeated[0]!r}: each image is scored once"
        )
    bad_key = next((key for key in found.keys if key_problem(key)), None)
    if bad_key is not None:
        return f"{bad_key!r} is not an image key: {key_problem(bad_key)}"
    if not np.isfinite(found.scores).all():
        return "the scores hold NaN or infinite values"
    if found.scores.min() < 0.0 or found.scores.max() > 1.0:
        return "the scores are not probabilities in [0, 1]"
    if not (
        np.isfinite(found.thresholds).all()
        and (0.0 <= found.thresholds).all()
        and (found.thresholds <= 1.0).all()
    ):
        return f"'thresholds' must be {NUM_CLASSES} finite numbers in [0, 1]"
    if not 0 <= found.min_labels <= NUM_CLASSES:
        return f"'min_labels' is {found.min_labels}, not in 0-{NUM_CLASSES}"
    if len(set(found.unreadable)) != len(found.unreadable) or not set(found.unreadable) <= set(found.keys):
        return "'unreadable' must name scored images, each once"
    return None


def read_scores(path: str | os.PathLike) -> Scores:
    """A scores file written by `save_scores` (a regular file of bounded size, loaded without
    pickles, every field checked); UserError naming it and the field otherwise."""
    try:
        found = _open_checked(path)
    except (OSError, ValueError, KeyError, TypeError, zipfile.BadZipFile) as exc:
        raise UserError(f"{path}: not a scores file written by cocoshard predict --scores ({exc})") from None
    problem = _content_problem(found)
    if problem:
        raise UserError(f"{path}: {problem}")
    return found


def _json_dict(text: str) -> dict[str, Any]:
    try:
        value = parse_json(text)  # bounded, like every JSON a user gives
    except InputError as exc:
        raise ValueError(f"its trained_split is not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ValueError("its trained_split is not a JSON object")
    return value


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
