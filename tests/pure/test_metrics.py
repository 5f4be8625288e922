"""The metrics against the statement's `validation_loop`, brute-force definitions and properties."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from cocoshard.pure import metrics
from conftest import random_problem, statement_validation_loop

# ----------------------------------------------------------------------------------- reference


def reference_on_present_classes(outputs: np.ndarray, labels: np.ndarray, threshold: float = 0.5) -> dict:
    """The reference restricted to the classes present in the labels (where it does not divide by 0)."""
    present = labels.sum(axis=0) > 0
    return statement_validation_loop(outputs[:, present], labels[:, present], threshold)


def brute_force_ap(column: np.ndarray, truth: np.ndarray) -> float:
    """AP by definition: over distinct thresholds, highest first, sum (R_k - R_{k-1}) P_k."""
    ap, previous_recall = 0.0, 0.0
    for t in sorted(set(column.tolist()), reverse=True):
        chosen = column >= t
        tp = (chosen & truth).sum()
        recall = tp / truth.sum()
        ap += (recall - previous_recall) * tp / chosen.sum()
        previous_recall = recall
    return ap


# ----------------------------------------------------------------------------------- server F1


@pytest.mark.parametrize("seed", range(5))
def test_server_f1_equals_statement_on_random_inputs(seed: int) -> None:
    scores, labels = random_problem(seed)
    for threshold in (0.3, 0.5, 0.8):
        ours = metrics.server_f1(scores > threshold, labels)
        ref = reference_on_present_classes(scores, labels, threshold)
        assert ours.f1 == pytest.approx(ref["f1"], abs=1e-6)
        assert ours.precision == pytest.approx(ref["precision"], abs=1e-6)
        assert ours.recall == pytest.approx(ref["recall"], abs=1e-6)
        present = labels.sum(axis=0) > 0
        np.testing.assert_allclose(ours.class_f1[present], ref["class_f1"], atol=1e-6)


def test_class_never_predicted() -> None:
    scores, labels = random_problem(1, images=100, classes=10)
    scores[:, 3] = 0.0
    ours = metrics.server_f1(scores > 0.5, labels)
    assert ours.class_precision[3] == ours.class_recall[3] == ours.class_f1[3] == 0.0
    assert ours.f1 == pytest.approx(statement_validation_loop(scores, labels)["f1"], abs=1e-6)


def test_class_absent_from_labels_is_left_out_of_the_weights() -> None:
    scores, labels = random_problem(2, images=100, classes=10)
    labels[:, 4] = False
    scores[:, 4] = 0.9  # predicted everywhere: its false positives must not move the score
    ours = metrics.server_f1(scores > 0.5, labels)
    assert ours.class_weights[4] == 0.0
    assert ours.class_weights.sum() == pytest.approx(1.0)
    assert ours.f1 == pytest.approx(reference_on_present_classes(scores, labels)["f1"], abs=1e-6)
    with np.errstate(all="ignore"):
        assert np.isnan(statement_validation_loop(scores, labels)["f1"])  # why the class is left out


def test_all_empty_predictions_score_zero() -> None:
    _, labels = random_problem(3, images=50, classes=8)
    empty = np.zeros_like(labels)
    ours = metrics.server_f1(empty, labels)
    assert ours.f1 == ours.precision == ours.recall == 0.0
    assert statement_validation_loop(empty.astype(float), labels)["f1"] == 0.0


def test_perfect_predictions_score_one_and_rare_classes_weigh_most() -> None:
    _, labels = random_problem(4, images=300, classes=20)
    assert metrics.server_f1(labels, labels).f1 == pytest.approx(1.0)
    weights = metrics.server_f1(labels, labels).class_weights
    counts = labels.sum(axis=0)
    assert weights[np.argmin(counts)] == weights.max()


def test_no_labels_at_all_scores_zero_without_warnings() -> None:
    with np.errstate(all="raise"):
        result = metrics.server_f1(np.ones((5, 3), bool), np.zeros((5, 3), bool))
    assert result.f1 == 0.0


def test_shape_mismatch_is_an_error() -> None:
    with pytest.raises(ValueError, match="differ in shape"):
        metrics.server_f1(np.zeros((4, 80), bool), np.zeros((4, 79), bool))
    with pytest.raises(ValueError, match="2-D"):
        metrics.server_f1(np.zeros(80, bool), np.zeros(80, bool))


matrices = st.integers(1, 30).flatmap(
    lambda n: st.integers(1, 12).flatmap(
        lambda c: st.tuples(
            arrays(np.bool_, (n, c)), arrays(np.bool_, (n, c)), st.randoms(use_true_random=False)
        )
    )
)


@settings(max_examples=150, deadline=None)
@given(matrices)
def test_server_f1_properties(case: tuple) -> None:
    pred, labels, rnd = case
    result = metrics.server_f1(pred, labels)
    assert 0.0 <= result.f1 <= 1.0
    assert 0.0 <= result.precision <= 1.0 and 0.0 <= result.recall <= 1.0
    order = list(range(len(pred)))
    rnd.shuffle(order)
    assert metrics.server_f1(pred[order], labels[order]).f1 == pytest.approx(result.f1, abs=1e-12)
    if labels.any():
        ref = reference_on_present_classes(pred.astype(float), labels)
        assert result.f1 == pytest.approx(ref["f1"], abs=1e-6)


# ----------------------------------------------------------------------------------- other metrics


def test_macro_micro_on_a_hand_computed_case() -> None:
    labels = np.array([[1, 0, 0], [1, 1, 0], [0, 1, 0]], bool)
    pred = np.array([[1, 0, 1], [0, 1, 0], [0, 1, 0]], bool)
    # class 0: tp 1 fp 0 n 2 -> p 1, r .5, f1 2/3; class 1: p 1 r 1 f1 1; class 2: fp only -> 0
    result = metrics.macro_micro(pred, labels)
    assert result["macro_f1"] == pytest.approx((2 / 3 + 1 + 0) / 3)
    assert result["micro_precision"] == pytest.approx(3 / 4)
    assert result["micro_recall"] == pytest.approx(3 / 4)
    assert result["micro_f1"] == pytest.approx(3 / 4)


def test_average_precision_known_value_and_brute_force() -> None:
    ap = metrics.average_precision(np.array([[0.1], [0.4], [0.35], [0.8]]), np.array([[0], [0], [1], [1]]))
    assert ap[0] == pytest.approx(0.8333333, abs=1e-6)
    rng = np.random.default_rng(0)
    scores = np.round(rng.random((60, 6)), 1)  # rounded: many ties
    labels = rng.random((60, 6)) < 0.3
    labels[:, 5] = False
    ap = metrics.average_precision(scores, labels)
    for c in range(5):
        assert ap[c] == pytest.approx(brute_force_ap(scores[:, c], labels[:, c]), abs=1e-12)
    assert np.isnan(ap[5])
    assert metrics.mean_average_precision(scores, labels) == pytest.approx(np.mean(ap[:5]))


def test_metrics_from_scores_has_every_headline_figure() -> None:
    scores, labels = random_problem(5)
    result = metrics.metrics_from_scores(scores, labels, 0.5)
    for key in ("server_f1", "server_precision", "server_recall", "macro_f1", "micro_f1", "map"):
        assert isinstance(result[key], float) and 0.0 <= result[key] <= 1.0
    assert result["server_f1"] == pytest.approx(reference_on_present_classes(scores, labels)["f1"], abs=1e-6)


def test_threshold_comparison_is_strict_and_float64() -> None:
    score = np.float32(0.3)
    just_below = float(score) - 1e-10  # rounds onto the score itself in float32
    pred = metrics.predictions_from_scores(
        np.array([[0.5, score]], dtype=np.float32), np.array([0.5, just_below])
    )
    assert pred.tolist() == [[False, True]]
