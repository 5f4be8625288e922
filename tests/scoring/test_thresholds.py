"""`cocoshard thresholds`: the figures it reports are those of what predict writes with the file."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cocoshard import cli
from cocoshard.pure import metrics
from cocoshard.pure.decision import decide_labels
from cocoshard.scoring.scores import Scores, save_scores
from conftest import random_problem


@pytest.fixture
def scored(tmp_path: Path) -> tuple[Path, Path, np.ndarray, np.ndarray]:
    """A scores file as predict writes it (--min-labels 1) and a folder of the .cls labels it scores."""
    scores, labels = random_problem(11, images=160)
    scores[:40] *= 0.05  # images with no class over 0.5: predict tops them up
    keys = [f"{index:012d}" for index in range(len(scores))]
    folder = tmp_path / "labels"
    folder.mkdir()
    for key, row in zip(keys, labels):
        (folder / f"{key}.cls").write_text("".join(f"{c}\n" for c in np.flatnonzero(row)))
    path = tmp_path / "val-scores.npz"
    save_scores(path, Scores(keys, scores.astype(np.float32), np.full(80, 0.5), min_labels=1, split="val"))
    return path, folder, scores.astype(np.float32).astype(np.float64), labels


def test_the_tuned_f1_is_that_of_what_predict_writes(scored, tmp_path, capsys) -> None:
    path, folder, scores, labels = scored
    out = tmp_path / "thresholds.json"
    assert cli.main(["thresholds", "--scores", str(path), "--labels", str(folder), "--out", str(out)]) == 0
    saved = json.loads(out.read_text())
    tuned = np.asarray(saved["thresholds"])
    assert saved["server_f1_tuned"] == metrics.server_f1(decide_labels(scores, tuned, 1), labels).f1
    at_own = metrics.server_f1(decide_labels(scores, 0.5, 1), labels).f1  # the scores' own thresholds
    assert at_own != metrics.server_f1(scores > 0.5, labels).f1  # the top-up matters here
    shown = " ".join(capsys.readouterr().out.split())
    assert f"with the scores' own thresholds {at_own:.4f}" in shown and "--min-labels 1" in shown
    assert saved["min_labels"] == 1
