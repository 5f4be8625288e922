"""The scores file: `predict --scores` and training's `val-scores.npz` write one format."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cocoshard import NUM_CLASSES
from cocoshard.scoring.scores import Scores, file_sha256, read_scores, save_scores
from cocoshard.training.runlog import VAL_SCORES_FILE, RunLog


def test_training_writes_its_validation_scores_in_predicts_format(tmp_path: Path):
    rng = np.random.default_rng(0)
    keys = [f"{i:012d}" for i in range(7)]
    scores = rng.random((7, NUM_CLASSES)).astype(np.float32)
    thresholds = rng.random(NUM_CLASSES)
    checkpoint = tmp_path / "best.pt"
    checkpoint.write_bytes(b"weights")
    classes = [f"class {c}" for c in range(NUM_CLASSES)]
    RunLog(tmp_path, enabled=True).save_val_scores(
        keys, scores, thresholds, classes, checkpoint, "shards abc", "fold2"
    )
    predicted = tmp_path / "predicted.npz"
    save_scores(
        predicted,
        Scores(
            keys,
            scores,
            thresholds,
            1,
            False,
            str(checkpoint),
            file_sha256(checkpoint),
            "shards abc",
            "fold2",
        ),
    )
    with np.load(tmp_path / VAL_SCORES_FILE) as trained, np.load(predicted) as written:
        assert sorted(trained.files) == sorted(written.files)
        for name in written.files:
            assert trained[name].dtype.kind == written[name].dtype.kind, name
            assert trained[name].shape == written[name].shape, name
            if name != "classes":  # (predict writes the challenge's names, training the shards' own)
                assert np.array_equal(trained[name], written[name]), name
    trained_back, written_back = read_scores(tmp_path / VAL_SCORES_FILE), read_scores(predicted)
    assert np.array_equal(trained_back.scores, written_back.scores)
    assert vars(trained_back).keys() == vars(written_back).keys()
    for name, value in vars(written_back).items():
        if not isinstance(value, np.ndarray):
            assert getattr(trained_back, name) == value, name
