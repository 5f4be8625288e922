"""Which classes an image is given: the one rule predict writes and every reported score is computed on.

    predicted = decide_labels(scores, thresholds, min_labels=1)   # (N, C) bool, what predict writes

A class is predicted when its score is above its threshold (`metrics.predictions_from_scores`);
then an image with fewer than `min_labels` classes gets its best-scoring other classes until it
has that many (`top_up`: every COCO image holds at least one label, so an empty list only ever
costs recall). `cocoshard predict` writes exactly this, training reports the tuned F1 of exactly
this on the validation split, and `cocoshard thresholds` too: the score a run shows is the score of
the file it submits.
"""

from __future__ import annotations

import numpy as np

from cocoshard.pure.metrics import Thresholds, predictions_from_scores


def top_up(predicted: np.ndarray, scores: np.ndarray, min_labels: int) -> np.ndarray:
    """Add each short image's best-scoring unpredicted classes until it has `min_labels` of them."""
    predicted = np.asarray(predicted).astype(bool)
    scores = np.asarray(scores)
    if scores.shape != predicted.shape:
        raise ValueError(f"scores {scores.shape} and predictions {predicted.shape} differ in shape")
    result = predicted.copy()
    if min_labels <= 0 or result.size == 0:
        return result
    short = np.flatnonzero(result.sum(axis=1) < min_labels)
    if short.size == 0:
        return result
    # already-predicted classes rank first so that the top `min_labels` always includes them
    ranking = np.where(result[short], np.inf, scores[short].astype(np.float64))
    top = np.argsort(-ranking, axis=1, kind="stable")[:, : min(min_labels, scores.shape[1])]
    result[short[:, None], top] = True
    return result


def decide_labels(scores: np.ndarray, thresholds: Thresholds, min_labels: int) -> np.ndarray:
    """(N, C) booleans: each class above its threshold, each image topped up to `min_labels` classes."""
    return top_up(predictions_from_scores(scores, thresholds), scores, min_labels)
