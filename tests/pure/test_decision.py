"""What predict writes: each class above its threshold, each image topped up to --min-labels."""

from __future__ import annotations

import numpy as np

from cocoshard.pure import metrics
from cocoshard.pure.decision import decide_labels, top_up
from conftest import random_problem


def test_top_up_adds_the_best_other_classes_only_where_short() -> None:
    scores = np.array([[0.2, 0.9, 0.1], [0.6, 0.7, 0.8], [0.1, 0.2, 0.3]])
    over = np.array([[True, False, False], [True, True, True], [False, False, False]])
    assert top_up(over, scores, 2).tolist() == [[True, True, False], [True, True, True], [False, True, True]]
    assert top_up(over, scores, 0).tolist() == over.tolist()


def test_decide_labels_is_the_threshold_then_the_top_up() -> None:
    scores, _ = random_problem(3, images=120)
    thresholds = np.full(80, 0.97)  # high enough that many images get nothing over threshold
    over = metrics.predictions_from_scores(scores, thresholds)
    decided = decide_labels(scores, thresholds, 1)
    assert (over.sum(axis=1) == 0).any() and (decided.sum(axis=1) >= 1).all()
    assert (decided >= over).all() and np.array_equal(decided, top_up(over, scores, 1))
