"""K folds of the labelled images: iterative multi-label stratification, then balancing (pure, no I/O).

    fold = stratified_folds(multi_hot_rows, folds=5, seed=0)    # fold[i] in 0..4 for every image

The K-fold counterpart of `cocoshard.pure.split`: Sechidis et al.'s iterative stratification deals
labels rarest first, each image to the fold that still wants that label most (ties to the fold that
wants more images, then to chance), so the rare classes that carry the leaderboard's F1 are spread
evenly before anything else. A balancing pass then moves single images between folds while a move
lowers the imbalance of the classes,

    sum over classes c and folds k of (n_kc - n_c / K)^2      (n_kc: images of class c in fold k)

or leaves it as it is and evens out the fold sizes (the same sum over n_k, the labelled images in
fold k). Moving image i from fold a to b changes the first by 2 * (sum over i's classes d of
(n_bd - n_ad + 1)), an integer, and the second by 2 * (n_b - n_a + 1): each move lowers the pair
in order, so the pass ends, where no single move helps. A class of spread two or more (its largest
fold count minus its smallest) is left so only when every move that would narrow it costs the other
classes its image carries as much. Images without labels then fill the smallest folds. On the
challenge's label shape every class ends within one image across the folds; 65,000 images x 80
classes into 5 folds take 2-4 s on a 2-core CPU.
"""

from __future__ import annotations

import numpy as np

from cocoshard.seeds import numpy_rng

FOLD_METHOD = "iterative-stratification"


def stratified_folds(labels: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """The fold (0..folds-1, int64) of each image of `labels`, a bool/0-1 array (N, C).

    Seeded and deterministic. Every class is spread over the folds as evenly as single moves of
    images allow (see the module doc); fold sizes too, images without labels filling the smallest.
    """
    y = np.asarray(labels).astype(bool)
    if y.ndim != 2:
        raise ValueError(f"labels must be a 2-D (images, classes) array, got shape {y.shape}")
    if folds < 2:
        raise ValueError(f"folds must be 2 or more, got {folds}")
    rng = numpy_rng(seed)
    fold = _deal_rarest_first(y, folds, rng)
    _balance(y, fold, folds)
    _fill_unlabelled(y, fold, folds, rng)
    return fold


def _deal_rarest_first(y: np.ndarray, folds: int, rng: np.random.Generator) -> np.ndarray:
    """The core of iterative stratification; images without labels keep -1 here."""
    fold = np.full(len(y), -1, dtype=np.int64)
    unassigned = np.array(y.any(axis=1), dtype=bool)
    by_class = np.ascontiguousarray(y.T)
    remaining = y.sum(axis=0).astype(np.int64)
    # wanted[k, c]: how many more images of class c fold k should receive; wanted_images[k]: in all
    wanted = np.tile(remaining / folds, (folds, 1))
    wanted_images = np.full(folds, unassigned.sum() / folds)
    image_ids, class_ids = np.nonzero(y)
    rows = np.split(class_ids, np.cumsum(y.sum(axis=1))[:-1]) if len(y) else []  # each image's classes
    while remaining.any():
        fewest = np.where(remaining > 0, remaining, np.iinfo(np.int64).max)
        tied = np.flatnonzero(fewest == fewest.min())
        label = int(tied[rng.integers(len(tied))])
        members = np.flatnonzero(by_class[label] & unassigned)
        rng.shuffle(members)
        for image in members.tolist():
            chosen = _choose_fold(wanted[:, label], wanted_images, rng)
            classes = rows[image]
            wanted[chosen, classes] -= 1.0
            remaining[classes] -= 1
            wanted_images[chosen] -= 1.0
            fold[image] = chosen
        unassigned[members] = False
    return fold


def _choose_fold(want_label: np.ndarray, want_images: np.ndarray, rng: np.random.Generator) -> int:
    """The fold that wants this label most; ties to the fold that wants more images, then to chance."""
    tied = np.flatnonzero(want_label == want_label.max())
    if len(tied) > 1:
        tied = tied[want_images[tied] == want_images[tied].max()]
    return int(tied[rng.integers(len(tied))]) if len(tied) > 1 else int(tied[0])


def move_gains(y: np.ndarray, fold: np.ndarray, folds: int) -> np.ndarray:
    """(N, folds): what moving image i to fold k changes, as (N + 1) * (the change of the classes'
    imbalance) / 2 + (the change of the fold sizes' imbalance) / 2, both integers: negative when the
    move helps the classes, or leaves them as they are and evens out the sizes. 0 for the image's
    own fold and for images without labels (which the balancing leaves to the filling)."""
    labelled = y.any(axis=1)
    yf = y.astype(np.float64)
    counts, sizes = _fold_counts(yf, fold, folds)
    scale = len(y) + 1.0
    per_image = scale * (yf @ counts.T) + sizes  # (N, folds)
    own = np.clip(fold, 0, None)
    gains = per_image - per_image[np.arange(len(y)), own][:, None] + scale * yf.sum(axis=1, keepdims=True) + 1
    gains[np.arange(len(y)), own] = 0.0
    gains[~labelled] = 0.0
    return gains


def _fold_counts(yf: np.ndarray, fold: np.ndarray, folds: int) -> tuple[np.ndarray, np.ndarray]:
    """(images of each class in each fold (folds, C), labelled images in each fold (folds,))."""
    onehot = np.zeros((len(yf), folds))
    labelled = yf.any(axis=1)
    onehot[labelled, fold[labelled]] = 1.0
    return onehot.T @ yf, onehot.sum(axis=0)


def _balance(y: np.ndarray, fold: np.ndarray, folds: int) -> None:
    """Move the single image whose move helps most (`move_gains`), until none helps.

    Every sum is of integers far below 2**53, so exact in float64. A move from fold a to fold b
    changes every image's sums for a and b by what it shares with the moved image (its classes in
    common, and the one image): only those two columns change, and every row of an image in a or b."""
    labelled = y.any(axis=1)
    if not labelled.any():
        return
    yf = y.astype(np.float64)
    by_class = np.ascontiguousarray(yf.T)  # a class's images in one row: what a move shares, fast
    counts, sizes = _fold_counts(yf, fold, folds)
    scale = len(y) + 1.0
    gains = move_gains(y, fold, folds)
    while True:
        image, target = divmod(int(np.argmin(gains)), folds)
        if gains[image, target] >= 0:
            return
        source = int(fold[image])
        fold[image] = target
        counts[source] -= yf[image]
        counts[target] += yf[image]
        sizes[source] -= 1.0
        sizes[target] += 1.0
        shared = scale * by_class[y[image]].sum(axis=0) + labelled
        gains[:, target] += shared
        gains[:, source] -= shared
        in_target, in_source = fold == target, fold == source
        # an image's gains are relative to its own fold's sums: those grew in b and shrank in a
        gains -= np.where(in_target, shared, np.where(in_source, -shared, 0.0))[:, None]
        gains[in_target, target] = 0.0
        gains[in_source, source] = 0.0
        per_fold = scale * (counts @ yf[image]) + sizes  # the moved image: relative to its new fold
        gains[image] = per_fold - per_fold[target] + scale * yf[image].sum() + 1
        gains[image, target] = 0.0


def _fill_unlabelled(y: np.ndarray, fold: np.ndarray, folds: int, rng: np.random.Generator) -> None:
    """Images without labels, in a seeded order, each to the smallest fold (ties: the lowest fold)."""
    sizes = np.bincount(fold[fold >= 0], minlength=folds)
    for image in rng.permutation(np.flatnonzero(~y.any(axis=1))).tolist():
        smallest = int(np.argmin(sizes))
        fold[image] = smallest
        sizes[smallest] += 1
