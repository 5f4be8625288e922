"""Multi-label metrics on arrays, above all the leaderboard's "server F1" (pure: no I/O, no logging).

Every function takes `(N, C)` arrays: N images, C classes. Predictions are booleans (or 0/1);
scores are probabilities; an image counts as predicted for a class when `score > threshold`, the
strict comparison of the statement's `validation_loop`. Scores or thresholds holding NaN or
infinity are refused with a ValueError naming them (`check_finite`), never scored.

Server F1, as the statement's `validation_loop(multi_task=True, one_hot=True)` computes it:

    p_c = tp_c / (tp_c + fp_c),  r_c = tp_c / n_c     (both 0 when tp_c = 0)
    w_c = (1 / n_c) / sum_k (1 / n_k)                 (n_c: images labelled with class c)
    P = sum_c w_c p_c,  R = sum_c w_c r_c,  F1 = 2 P R / (P + R)   (0 when P + R = 0)

A class absent from the labels (n_c = 0) is left out of the weights; the statement's code would
divide by zero there. Because rare classes weigh the most, per-class thresholds tuned for this
score (`cocoshard.pure.threshold_tuning`) are worth more than any global one.

P and R are averaged over classes separately, before the one harmonic mean: a class predicted
almost everywhere (r_c near 1, p_c near its prevalence) and another predicted only when certain
(p_c near 1, r_c small) together score far better than their per-class F1 suggests. Tuning for
the server F1 finds such mixes (bimodal thresholds) whenever they score more; the leaderboard
scores them the same way, but the figure on the images used for tuning is optimistic, which is
why `threshold_tuning.holdout_threshold_gain` measures the gain on images the tuning did not see.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike

DEFAULT_THRESHOLD = 0.5

Thresholds = float | np.ndarray


# ----------------------------------------------------------------------------------- inputs


def _as_matrix(name: str, array: np.ndarray) -> np.ndarray:
    array = np.asarray(array)
    if array.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (images, classes) array, got shape {array.shape}")
    return array


def check_finite(name: str, array: np.ndarray) -> np.ndarray:
    """`array`, unless it holds NaN or infinity: then ValueError naming it and the first such entry.

    A NaN compares false with every threshold, so it would pass silently as "not predicted" and
    break the sorting that AP and threshold tuning rely on (a diverged model gives such scores)."""
    array = np.asarray(array)
    if array.dtype.kind in "fc" and not np.isfinite(array).all():
        where = np.argwhere(~np.isfinite(array))
        raise ValueError(
            f"{name} hold {len(where)} NaN or infinite value(s), the first at index "
            f"{tuple(int(i) for i in where[0])}: a model that diverged gives such scores"
        )
    return array


def check_pair(first: np.ndarray, labels: np.ndarray, first_name: str) -> tuple[np.ndarray, np.ndarray]:
    """(`first`, labels as booleans), both checked to be (images, classes) arrays of one shape, and
    `first` (scores or predictions) free of NaN and infinity."""
    first = check_finite(first_name, _as_matrix(first_name, first))
    labels = _as_matrix("labels", labels)
    if first.shape != labels.shape:
        raise ValueError(f"{first_name} {first.shape} and labels {labels.shape} differ in shape")
    return first, labels.astype(bool)


def predictions_from_scores(scores: np.ndarray, thresholds: Thresholds = DEFAULT_THRESHOLD) -> np.ndarray:
    """Boolean predictions `score > threshold`, one threshold for all classes or one per class.

    Compared in float64 so that a threshold tuned as the midpoint of two float32 scores is not
    rounded onto one of them.
    """
    scores = check_finite("scores", _as_matrix("scores", scores)).astype(np.float64, copy=False)
    thresholds = check_finite("thresholds", np.asarray(thresholds, dtype=np.float64))
    if thresholds.ndim == 1 and thresholds.shape[0] != scores.shape[1]:
        raise ValueError(f"{thresholds.shape[0]} thresholds for {scores.shape[1]} classes")
    return scores > thresholds


# ----------------------------------------------------------------------------------- server F1


@dataclass(frozen=True)
class ServerF1:
    """The leaderboard's figures and the per-class arrays behind them."""

    f1: float
    precision: float
    recall: float
    class_precision: np.ndarray  # (C,) p_c, 0 where tp_c = 0
    class_recall: np.ndarray  # (C,) r_c, 0 where tp_c = 0
    class_f1: np.ndarray  # (C,) 2 p r / (p + r), 0 where p = r = 0
    class_weights: np.ndarray  # (C,) w_c, 0 for classes absent from the labels
    class_counts: np.ndarray  # (C,) n_c, positives per class in the labels
    true_positives: np.ndarray  # (C,)
    false_positives: np.ndarray  # (C,)


def confusion_counts(pred: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-class (true positives, false positives, positives in the labels) as float64 arrays."""
    pred, labels = check_pair(pred, labels, "pred")
    pred = pred.astype(bool)
    tp = np.count_nonzero(pred & labels, axis=0).astype(np.float64)
    fp = np.count_nonzero(pred & ~labels, axis=0).astype(np.float64)
    positives = np.count_nonzero(labels, axis=0).astype(np.float64)
    return tp, fp, positives


def safe_ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """numerator / denominator, 0 where the numerator is 0 (the statement's convention)."""
    out = np.zeros_like(numerator, dtype=np.float64)
    np.divide(numerator, denominator, out=out, where=numerator > 0)
    return out


def harmonic_mean(precision: ArrayLike, recall: ArrayLike) -> np.ndarray:
    """2 p r / (p + r) elementwise, 0 where p + r = 0."""
    precision, recall = np.asarray(precision, np.float64), np.asarray(recall, np.float64)
    total = precision + recall
    out = np.zeros(np.broadcast(precision, recall).shape, dtype=np.float64)
    np.divide(2.0 * precision * recall, total, out=out, where=total > 0)
    return out


def class_weights(positives: np.ndarray) -> np.ndarray:
    """w_c = (1/n_c) / sum(1/n_k) over the classes present in the labels; 0 for absent ones."""
    positives = np.asarray(positives, dtype=np.float64)
    inverse = safe_ratio(np.where(positives > 0, 1.0, 0.0), positives)
    total = inverse.sum()
    return inverse / total if total > 0 else inverse


def server_f1(pred: np.ndarray, labels: np.ndarray) -> ServerF1:
    """The statement's F1 (`validation_loop`, multi_task=True, one_hot=True) for boolean predictions."""
    tp, fp, positives = confusion_counts(pred, labels)
    class_precision = safe_ratio(tp, tp + fp)
    class_recall = safe_ratio(tp, positives)
    weights = class_weights(positives)
    # the weights sum to 1 only up to rounding: keep a perfect score at exactly 1.0, not 1 + 2e-16
    precision = min(float(weights @ class_precision), 1.0)
    recall = min(float(weights @ class_recall), 1.0)
    return ServerF1(
        f1=float(harmonic_mean(precision, recall)),
        precision=precision,
        recall=recall,
        class_precision=class_precision,
        class_recall=class_recall,
        class_f1=harmonic_mean(class_precision, class_recall),
        class_weights=weights,
        class_counts=positives,
        true_positives=tp,
        false_positives=fp,
    )


# ----------------------------------------------------------------------------------- other metrics


def macro_micro(pred: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Macro and micro precision, recall and F1.

    Macro averages run over the classes that appear in the labels or in the predictions: a class
    predicted but never present scores 0 (its false positives count), a class neither present nor
    predicted carries no information and is left out (rather than scored 0 or 1).
    """
    tp, fp, positives = confusion_counts(pred, labels)
    seen = (positives > 0) | (tp + fp > 0)
    precision, recall = safe_ratio(tp, tp + fp), safe_ratio(tp, positives)
    f1 = harmonic_mean(precision, recall)
    micro_p = float(safe_ratio(tp.sum(), tp.sum() + fp.sum()))
    micro_r = float(safe_ratio(tp.sum(), positives.sum()))

    def mean(values: np.ndarray) -> float:
        return float(values[seen].mean()) if seen.any() else 0.0

    return {
        "macro_precision": mean(precision),
        "macro_recall": mean(recall),
        "macro_f1": mean(f1),
        "micro_precision": micro_p,
        "micro_recall": micro_r,
        "micro_f1": float(harmonic_mean(micro_p, micro_r)),
    }


def average_precision(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per-class average precision (area under the step precision-recall curve); NaN without positives.

    AP = sum_k (R_k - R_{k-1}) P_k over the distinct score values, highest first, with tied scores
    taken as one step (the definition scikit-learn's `average_precision_score` uses).
    """
    scores, labels = check_pair(scores, labels, "scores")
    result = np.full(scores.shape[1], np.nan)
    for c in range(scores.shape[1]):
        positives = labels[:, c].sum()
        if positives == 0:
            continue
        tp, predicted = cumulative_counts(scores[:, c].astype(np.float64), labels[:, c])
        precision = tp / predicted
        recall_steps = np.diff(tp, prepend=0.0) / positives
        result[c] = float((recall_steps * precision).sum())
    return result


def cumulative_counts(column: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """True positives and predicted counts when cutting after each distinct score (highest first)."""
    order = np.argsort(-column, kind="stable")
    ordered, hits = column[order], truth[order].astype(np.float64)
    last_of_tie = np.r_[ordered[1:] != ordered[:-1], True]
    tp = np.cumsum(hits)[last_of_tie]
    predicted = (np.flatnonzero(last_of_tie) + 1).astype(np.float64)
    return tp, predicted


def mean_average_precision(scores: np.ndarray, labels: np.ndarray) -> float:
    """Mean of the per-class AP over classes with at least one positive (0 when there are none)."""
    ap = average_precision(scores, labels)
    return float(np.nanmean(ap)) if np.isfinite(ap).any() else 0.0


def metrics_from_predictions(pred: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Every headline figure for boolean predictions, as plain floats (JSON-ready)."""
    server = server_f1(pred, labels)
    pred_bool = np.asarray(pred).astype(bool)
    return {
        "server_f1": server.f1,
        "server_precision": server.precision,
        "server_recall": server.recall,
        **macro_micro(pred_bool, labels),
        "labels_per_image": float(pred_bool.sum(axis=1).mean()) if len(pred_bool) else 0.0,
        "images": len(pred_bool),  # a count, shown and saved as one
    }


def metrics_from_scores(
    scores: np.ndarray, labels: np.ndarray, thresholds: Thresholds = DEFAULT_THRESHOLD
) -> dict[str, float]:
    """`metrics_from_predictions` at the given thresholds, plus mAP (`map`) from the scores."""
    scores, _ = check_pair(scores, labels, "scores")
    result = metrics_from_predictions(predictions_from_scores(scores, thresholds), labels)
    result["map"] = mean_average_precision(scores, labels)
    return result
