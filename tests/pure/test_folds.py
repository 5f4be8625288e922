"""K stratified folds: a partition of the labelled images, every class spread evenly, seeded."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from cocoshard.pure.folds import stratified_folds
from conftest import coco_like_labels


def fold_counts(labels: np.ndarray, fold: np.ndarray, folds: int) -> np.ndarray:
    """(folds, C): images of each class in each fold, counted directly."""
    return np.stack([labels[fold == k].sum(axis=0) for k in range(folds)])


def imbalance(labels: np.ndarray, fold: np.ndarray, folds: int) -> tuple[float, float]:
    """What the balancing lowers, in this order: sum over classes and folds of (n_kc - n_c / K)^2,
    then over folds of (n_k - n / K)^2 (n_k: labelled images in fold k)."""
    labelled = labels.any(axis=1)
    counts = fold_counts(labels, fold, folds)
    sizes = np.bincount(fold[labelled], minlength=folds)
    classes = float(((counts - labels.sum(axis=0) / folds) ** 2).sum())
    return round(classes, 6), round(float(((sizes - labelled.sum() / folds) ** 2).sum()), 6)


@pytest.fixture(scope="module")
def coco_like() -> np.ndarray:
    return coco_like_labels(np.random.default_rng(2011))


@pytest.mark.parametrize("folds", [3, 5])
def test_folds_of_the_challenge_shaped_labels_spread_every_class_within_one_image(coco_like, folds):
    fold = stratified_folds(coco_like, folds, seed=0)
    assert fold.shape == (len(coco_like),) and set(np.unique(fold)) == set(range(folds))
    counts = fold_counts(coco_like, fold, folds)
    assert (counts.sum(axis=0) == coco_like.sum(axis=0)).all()  # each image counted in one fold
    # every class, person to the rarest (~100 images), within one image across the folds
    assert (counts.max(axis=0) - counts.min(axis=0) <= 1).all()
    sizes = np.bincount(fold, minlength=folds)
    assert sizes.max() - sizes.min() <= 0.03 * len(coco_like) / folds, sizes


def test_folds_beat_random_folds_on_rare_classes(coco_like):
    subset = coco_like[:8000]
    total = subset.sum(axis=0)
    stratified = fold_counts(subset, stratified_folds(subset, 5, seed=1), 5)
    random = fold_counts(subset, np.random.default_rng(1).integers(0, 5, len(subset)), 5)
    assert np.abs(stratified - total / 5).max() < 1.0 < np.abs(random - total / 5).max() / 3


def test_folds_are_seeded(coco_like):
    subset = coco_like[:3000]
    first = stratified_folds(subset, 4, seed=3)
    assert np.array_equal(first, stratified_folds(subset, 4, seed=3))
    assert not np.array_equal(first, stratified_folds(subset, 4, seed=4))


def test_a_class_spread_badly_by_dealing_is_repaired():
    # class 1 rides on images of class 0, dealt first; the balancing moves images between folds
    # until no single move lowers the imbalance, which here means both classes within one image
    labels = np.zeros((12, 2), dtype=bool)
    labels[:8, 0] = True
    labels[:6, 1] = True
    for seed in range(10):
        counts = fold_counts(labels, stratified_folds(labels, 2, seed), 2)
        assert (counts.max(axis=0) - counts.min(axis=0) <= 1).all(), (seed, counts)


def test_images_without_labels_fill_the_smallest_folds():
    labels = np.zeros((20, 3), dtype=bool)
    labels[:5, 0] = True  # five labelled images over four folds: one fold gets two
    fold = stratified_folds(labels, 4, seed=0)
    assert sorted(np.bincount(fold, minlength=4)) == [5, 5, 5, 5]
    assert np.bincount(fold[:5], minlength=4).max() == 2


def test_edge_cases():
    assert stratified_folds(np.zeros((0, 80), bool), 5, 0).shape == (0,)
    assert sorted(stratified_folds(np.zeros((3, 80), bool), 5, 0).tolist()) == [0, 1, 2]
    with pytest.raises(ValueError):
        stratified_folds(np.zeros(80, bool), 5, 0)
    for folds in (0, 1):
        with pytest.raises(ValueError):
            stratified_folds(np.zeros((4, 80), bool), folds, 0)


@settings(max_examples=150, deadline=None)
@given(
    labels=arrays(bool, st.tuples(st.integers(0, 50), st.integers(1, 7)), elements=st.booleans()),
    folds=st.integers(2, 6),
    seed=st.integers(0, 2**32 - 1),
)
def test_fold_properties_on_any_labels(labels, folds, seed):
    fold = stratified_folds(labels, folds, seed)
    # a partition: every image in exactly one fold
    assert fold.shape == (len(labels),) and fold.dtype == np.int64
    assert ((fold >= 0) & (fold < folds)).all()
    assert np.array_equal(fold, stratified_folds(labels.astype(np.uint8), folds, seed))
    # balanced where possible: no single move of a labelled image to another fold lowers the
    # classes' imbalance, nor the sizes' without raising the classes' (checked by recounting, not
    # with the module's own bookkeeping)
    before = imbalance(labels, fold, folds)
    for image in np.flatnonzero(labels.any(axis=1)):
        for target in range(folds):
            moved = fold.copy()
            moved[image] = target
            assert imbalance(labels, moved, folds) >= before, (image, target)
    # images without labels went to the smallest folds: the sizes end within one image of each
    # other whenever there were enough of them to even the folds out
    empty = ~labels.any(axis=1)
    labelled_sizes = np.bincount(fold[~empty], minlength=folds)
    sizes = np.bincount(fold, minlength=folds)
    if empty.sum() >= (labelled_sizes.max() - labelled_sizes).sum():
        assert sizes.max() - sizes.min() <= 1


@settings(max_examples=100, deadline=None)
@given(
    classes=st.lists(st.integers(-1, 5), min_size=0, max_size=60),
    folds=st.integers(2, 6),
    seed=st.integers(0, 2**32 - 1),
)
def test_single_label_images_are_spread_within_one_per_class_and_per_fold(classes, folds, seed):
    labels = np.zeros((len(classes), 6), dtype=bool)
    for image, cls in enumerate(classes):
        if cls >= 0:  # -1: an image without labels
            labels[image, cls] = True
    fold = stratified_folds(labels, folds, seed)
    counts = fold_counts(labels, fold, folds)
    assert (counts.max(axis=0) - counts.min(axis=0) <= 1).all()
    sizes = np.bincount(fold, minlength=folds)
    assert sizes.max() - sizes.min() <= 1
