"""Validation each epoch: the raw weights and their EMA scored on the whole validation split.

`validate` scores both on every rank (rank 0's weights, broadcast: its batch-norm statistics are
the ones saved), gathers the scores on rank 0 with each image once, and tunes per-class thresholds
for the server F1 there (`score_validation`). Every figure is that of what `cocoshard predict`
would write with those thresholds, its default `--min-labels` top-up included.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from cocoshard.config import MIN_LABELS
from cocoshard.errors import UserError
from cocoshard.pure import decision, metrics, threshold_tuning
from cocoshard.training.checkpoint import EMA, RAW
from cocoshard.training.divergence import check_scores
from cocoshard.training.runtime import all_reduce_sum, broadcast_state, gather_objects, gather_rows
from cocoshard.training.trainer import Trainer


class NothingToValidate(UserError):
    """Every validation sample was bad: no epoch can be scored, so none may be called best."""


@torch.no_grad()
def validation_scores(
    tr: Trainer, model: torch.nn.Module
) -> tuple[np.ndarray | None, np.ndarray | None, float, list[str]]:
    """Scores and labels of the whole validation split (gathered on rank 0), its mean loss and the
    images' keys.

    Raises NothingToValidate on every rank when no rank read a single validation image."""
    runtime = tr.runtime
    model.eval()
    scores, labels, keys = [], [], []
    loss_sum = torch.zeros((), device=runtime.device, dtype=torch.float64)
    for batch in tr.val_loader:
        inputs = batch.inputs
        assert batch.labels is not None, "the validation split is labelled"
        with runtime.autocast():
            logits = model(inputs).float()
        loss_sum += tr.criterion(logits, batch.labels).double() * batch.labels.shape[0]
        scores.append(torch.sigmoid(logits))
        labels.append(batch.labels.to(torch.uint8))
        keys.extend(batch.keys)
    empty = torch.zeros((0, tr.num_classes), device=runtime.device)
    all_scores = gather_rows(torch.cat(scores) if scores else empty)
    all_labels = gather_rows(torch.cat(labels) if labels else empty.to(torch.uint8))
    all_keys = [key for part in gather_objects(keys) for key in part]
    loss_sum = all_reduce_sum(loss_sum)
    check_scores(tr, tr.epoch, "EMA" if model is not tr.model else "raw", all_scores)
    if not all_keys:
        raise NothingToValidate(
            f"validation read no image: all {tr.val_loader.split_samples} samples of the val split were bad "
            "and "
            "skipped (--skip-bad-samples); no epoch can be scored, so no best.pt was written. Check the val "
            "shards "
            f"with cocoshard inspect --shards {tr.cfg.shards} --verify and re-pack"
        )
    if not runtime.is_main:
        return None, None, 0.0, []
    # A loader may repeat a sample to even out ranks: count every image once.
    _, first = np.unique(np.asarray(all_keys), return_index=True)
    first.sort()
    return (
        all_scores.cpu().numpy()[first],
        all_labels.cpu().numpy()[first],
        float(loss_sum) / max(len(all_keys), 1),
        [all_keys[i] for i in first],
    )


def score_validation(
    scores: np.ndarray, labels: np.ndarray, loss: float, seed: int
) -> tuple[dict[str, float], np.ndarray]:
    """Headline metrics at 0.5 and at thresholds tuned for the server F1, and those thresholds.

    Every figure is that of what `cocoshard predict` would write with those thresholds (its default
    `--min-labels` top-up included: `decision.decide_labels`), so the score a run reports is the
    score of the file it submits."""
    at_half = _written_metrics(scores, labels, metrics.DEFAULT_THRESHOLD)
    thresholds = threshold_tuning.tune_thresholds(scores, labels)
    tuned = _written_metrics(scores, labels, thresholds)
    holdout = threshold_tuning.holdout_threshold_gain(scores, labels, seed=seed, min_labels=MIN_LABELS)
    figures = {
        "loss": loss,
        "server_f1": at_half["server_f1"],
        "server_f1_tuned": tuned["server_f1"],
        "server_precision_tuned": tuned["server_precision"],
        "server_recall_tuned": tuned["server_recall"],
        "heldout_gain": holdout["gain"],
        "macro_f1": at_half["macro_f1"],
        "micro_f1": at_half["micro_f1"],
        "macro_f1_tuned": tuned["macro_f1"],
        "map": metrics.mean_average_precision(scores, labels),
        "images": at_half["images"],
        "min_labels": MIN_LABELS,
    }
    return figures, thresholds


def _written_metrics(scores: np.ndarray, labels: np.ndarray, thresholds: Any) -> dict[str, float]:
    """The headline metrics of the classes predict writes at `thresholds` (default --min-labels)."""
    return metrics.metrics_from_predictions(decision.decide_labels(scores, thresholds, MIN_LABELS), labels)


Scored = dict[str, tuple[list[str], np.ndarray]]  # weights -> (keys, validation scores)


def validate(tr: Trainer) -> tuple[dict[str, dict[str, float]], dict[str, np.ndarray], Scored]:
    """Evaluate the raw weights and the EMA; on rank 0, their figures, tuned thresholds and scores."""
    candidates = {RAW: tr.model}
    if tr.ema is not None:
        candidates[EMA] = tr.ema.module
    figures, thresholds, scored = {}, {}, {}
    for name, model in candidates.items():
        # every rank scores the weights rank 0 saves: a rank's own batch-norm statistics (and its
        # EMA of them) differ from rank 0's, and a resumed rank has rank 0's
        broadcast_state(model)
        scores, labels, loss, keys = validation_scores(tr, model)
        if tr.runtime.is_main:
            assert scores is not None and labels is not None, "gathered on rank 0"
            figures[name], thresholds[name] = score_validation(scores, labels, loss, tr.cfg.seed)
            scored[name] = (keys, scores)
    return figures, thresholds, scored
