"""The scores file (`predict --scores`): every image's 80 probabilities, for mAP and re-thresholding.

A compressed `.npz` of plain arrays, read with `allow_pickle=False`: `keys` (N strings),
`scores` (N x 80 float32), `thresholds` (the 80 used for the JSON), `classes` (80 names).
"""

from __future__ import annotations

import io
import os

import numpy as np

from cocoshard import CLASSES, NUM_CLASSES
from cocoshard.atomic import atomic_write_bytes
from cocoshard.errors import UserError

SCORES_KEYS = "keys"
SCORES_PROBS = "scores"
SCORES_THRESHOLDS = "thresholds"
SCORES_CLASSES = "classes"


def save_scores(path: str | os.PathLike, keys: list[str], scores: np.ndarray, thresholds: np.ndarray) -> None:
    """Keys, probabilities and the thresholds used, as a compressed .npz (no pickles), atomically."""
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **{SCORES_KEYS: np.asarray(keys, dtype=str), SCORES_PROBS: scores,
                                   SCORES_THRESHOLDS: thresholds, SCORES_CLASSES: np.asarray(CLASSES, dtype=str)})
    atomic_write_bytes(path, buffer.getvalue())


def read_scores(path: str | os.PathLike) -> tuple[list[str], np.ndarray]:
    """Keys and (N, C) probabilities of a file written by `save_scores` (loaded without pickles)."""
    try:
        with np.load(path, allow_pickle=False) as data:
            keys, scores = [str(k) for k in data[SCORES_KEYS]], np.asarray(data[SCORES_PROBS], np.float64)
    except (OSError, ValueError, KeyError) as exc:
        raise UserError(f"{path}: not a scores file written by cocoshard predict --scores ({exc})") from exc
    if scores.shape != (len(keys), NUM_CLASSES):
        raise UserError(f"{path}: scores of shape {scores.shape} for {len(keys)} keys")
    return keys, scores


def load_scores(path: str | os.PathLike, keys: list[str]) -> np.ndarray:
    """Rows of a `predict --scores` file in the order of `keys` (every key must be there)."""
    stored_keys, scores = read_scores(path)
    row = {key: index for index, key in enumerate(stored_keys)}
    missing = [key for key in keys if key not in row]
    if missing:
        raise UserError(f"{path}: no scores for {len(missing)} evaluated image(s), e.g. {missing[0]!r}")
    return scores[[row[key] for key in keys]]
