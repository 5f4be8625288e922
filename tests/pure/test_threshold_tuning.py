"""Threshold tuning for the server F1: never worse on its own data, exact on one class, guarded on
rare ones, fast on a real validation set, and honest about what it buys on unseen images."""

from __future__ import annotations

import numpy as np
import pytest

from cocoshard.pure import metrics, threshold_tuning
from conftest import random_problem


def test_tuning_never_lowers_the_server_f1_on_its_own_data() -> None:
    scores, labels = random_problem(6, images=400)
    tuned = threshold_tuning.tune_thresholds(scores, labels, min_positives=1)
    before = metrics.server_f1(scores > 0.5, labels).f1
    after = metrics.server_f1(metrics.predictions_from_scores(scores, tuned), labels).f1
    assert after > before + 0.01


def test_tuning_one_class_finds_the_exact_optimum() -> None:
    rng = np.random.default_rng(7)
    labels = rng.random((300, 1)) < 0.2
    scores = np.clip(rng.normal(0.4, 0.2, (300, 1)) + 0.25 * labels, 0, 1)
    tuned = threshold_tuning.tune_thresholds(scores, labels, min_positives=1)
    best = max(metrics.server_f1(scores >= t, labels).f1 for t in np.unique(scores))
    assert metrics.server_f1(metrics.predictions_from_scores(scores, tuned), labels).f1 == pytest.approx(best)
    assert tuned[0] not in set(scores[:, 0].tolist())  # a midpoint, not a seen score


def test_rare_classes_keep_the_default_and_shrink_pulls_towards_it() -> None:
    scores, labels = random_problem(8, images=300, classes=10)
    labels[:, 9] = False
    labels[:4, 9] = True
    tuned = threshold_tuning.tune_thresholds(scores, labels, min_positives=5, default=0.4)
    assert tuned[9] == 0.4
    shrunk = threshold_tuning.tune_thresholds(scores, labels, min_positives=5, default=0.4, shrink=1e6)
    np.testing.assert_allclose(shrunk, 0.4, atol=1e-3)


def test_tuning_a_validation_set_of_the_challenges_size_improves_it() -> None:
    scores, labels = random_problem(9, images=10_000, classes=80)
    tuned = threshold_tuning.tune_thresholds(scores, labels)
    assert tuned.shape == (80,) and np.isfinite(tuned).all() and ((tuned >= 0) & (tuned <= 1)).all()
    before = metrics.server_f1(scores > 0.5, labels).f1
    assert metrics.server_f1(metrics.predictions_from_scores(scores, tuned), labels).f1 > before


def test_holdout_gain_is_measured_on_unseen_images() -> None:
    scores, labels = random_problem(10, images=2000)
    result = threshold_tuning.holdout_threshold_gain(scores, labels, seed=3)
    assert set(result) == {"server_f1_default", "server_f1_tuned", "gain"}
    assert result["gain"] == pytest.approx(result["server_f1_tuned"] - result["server_f1_default"])
    assert result == threshold_tuning.holdout_threshold_gain(scores, labels, seed=3)
    assert result["gain"] > 0.0  # the scores are miscalibrated for 0.5: tuning must help
