"""Which splits a run trains and validates on (`run_splits`), and the checks before any work: a
K-fold pack's `--val-fold` run end to end, its refusals, and the same run under torchrun with the
resident loader."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cocoshard import cli
from cocoshard.config import TrainConfig
from cocoshard.errors import ConfigError
from cocoshard.prepare.manifest import MANIFEST, read_manifest
from cocoshard.scoring.ground_truth import read_shard_labels
from cocoshard.scoring.scores import file_sha256, read_scores
from cocoshard.training.checkpoint import BEST, LAST, load_checkpoint
from cocoshard.training.run_shards import RunSplits, run_splits
from cocoshard.training.runlog import RUN_FILE, VAL_SCORES_FILE
from conftest import FROM_SCRATCH, TINY, records


@pytest.fixture(autouse=True)
def wide_console(monkeypatch: pytest.MonkeyPatch) -> None:
    """rich wraps at 80 columns off a terminal, even inside a path: give messages one line."""
    monkeypatch.setenv("COLUMNS", "1000")


def train(*args: object) -> int:
    return cli.main(["train", *map(str, args)])


def error_text(capsys: pytest.CaptureFixture) -> str:
    return " ".join(capsys.readouterr().err.split())


# ----------------------------------------------------------------------------------- run_splits


def test_run_splits_of_a_train_val_pack_and_of_folds(sample_shards_jpeg: Path, sample_folds_jpeg: Path):
    plain, folds = read_manifest(sample_shards_jpeg), read_manifest(sample_folds_jpeg)
    assert run_splits(TrainConfig(), plain) == RunSplits("train", "val")
    assert run_splits(TrainConfig(val_fold=0), folds) == RunSplits("fold1+fold2", "fold0")
    assert run_splits(TrainConfig(val_fold=2), folds) == RunSplits("fold0+fold1", "fold2")
    with pytest.raises(ConfigError, match="give --val-fold 0 to 2, the fold this run validates on"):
        run_splits(TrainConfig(), folds)
    with pytest.raises(ConfigError, match="give --val-fold 0 to 2, not 3"):
        run_splits(TrainConfig(val_fold=3), folds)
    with pytest.raises(ConfigError, match="holds a train/val split, not folds"):
        run_splits(TrainConfig(val_fold=1), plain)
    with pytest.raises(ConfigError, match="--val-fold must be >= 0"):
        TrainConfig(val_fold=-1)


# ----------------------------------------------------------------------------------- a fold run


@pytest.fixture(scope="module")
def fold1_run(sample_folds_jpeg: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One short epoch validating on fold1 of coco-sample's three folds."""
    run = tmp_path_factory.mktemp("fold1") / "run"
    args = ["--shards", sample_folds_jpeg, "--out", run, "--val-fold", "1", "--epochs", "1", "--threads", "1"]
    assert train(*args, *TINY, *FROM_SCRATCH) == 0
    return run


def test_a_val_fold_run_trains_on_the_other_folds_and_validates_on_its_own(
    fold1_run: Path, sample_folds_jpeg: Path
):
    manifest = read_manifest(sample_folds_jpeg)
    folds = manifest["splits"]
    (first,) = records(fold1_run)
    assert first["val"]["model"]["images"] == folds["fold1"]["samples"]
    assert first["step"] == (folds["fold0"]["samples"] + folds["fold2"]["samples"]) // 16  # full batches
    best = load_checkpoint(fold1_run / BEST)
    assert best["config"]["val_fold"] == 1
    assert (
        best["class_counts"]
        == (np.array(folds["fold0"]["class_counts"]) + np.array(folds["fold2"]["class_counts"])).tolist()
    )
    assert json.loads((fold1_run / RUN_FILE).read_text())["splits"] == "train fold0+fold2, val fold1"


def test_the_best_epochs_out_of_fold_scores_are_saved_with_their_keys(
    fold1_run: Path, sample_folds_jpeg: Path
):
    saved = read_scores(fold1_run / VAL_SCORES_FILE)
    best = load_checkpoint(fold1_run / BEST)
    assert sorted(saved.keys) == sorted(read_shard_labels(sample_folds_jpeg, "fold1"))
    assert saved.split == "fold1" and saved.checkpoint_sha256 == file_sha256(fold1_run / BEST)
    assert np.array_equal(saved.thresholds, np.asarray(best["thresholds"]))
    chosen = records(fold1_run)[best["epoch"] - 1]
    assert chosen["best"] and chosen["val"][chosen["selected"]]["images"] == len(saved.keys)
    # the scores the tuned figure was computed on: re-tuning them gives the checkpoint's thresholds
    from cocoshard.pure.threshold_tuning import tune_thresholds

    labels = read_shard_labels(sample_folds_jpeg, "fold1")
    truth = np.stack([labels[key] for key in saved.keys])
    assert np.array_equal(tune_thresholds(saved.scores.astype(np.float32), truth), saved.thresholds)


# ----------------------------------------------------------------------------------- refusals


def test_a_fold_pack_without_val_fold_is_refused_before_any_work(
    sample_folds_jpeg: Path, tmp_path: Path, capsys: pytest.CaptureFixture
):
    run = tmp_path / "run"
    assert train("--shards", sample_folds_jpeg, "--out", run, *TINY, *FROM_SCRATCH) == 2
    assert "holds 3 folds (pack --folds 3): give --val-fold 0 to 2" in error_text(capsys)
    assert not run.exists()


def test_val_fold_training_refuses_images_shared_by_train_and_val_folds(
    sample_folds_jpeg: Path, tmp_path: Path, capsys: pytest.CaptureFixture
):
    shards, run = tmp_path / "shards", tmp_path / "run"
    shutil.copytree(sample_folds_jpeg, shards)
    manifest = json.loads((shards / MANIFEST).read_text())
    copied = dict(manifest["splits"]["fold0"]["shards"][0], name="fold2-000099.tar")
    shutil.copy(shards / manifest["splits"]["fold0"]["shards"][0]["name"], shards / copied["name"])
    manifest["splits"]["fold2"]["shards"].append(copied)
    manifest["splits"]["fold2"]["samples"] += copied["samples"]
    (shards / MANIFEST).write_text(json.dumps(manifest))
    assert train("--shards", shards, "--out", run, "--val-fold", "2", *TINY, *FROM_SCRATCH) == 2
    text = error_text(capsys)
    assert "16 images are in both the train and the val split (fold0+fold1 and fold2)" in text
    assert not run.exists()
    # validating on fold0 instead puts the copy on the training side too: refused the same way
    assert train("--shards", shards, "--out", run, "--val-fold", "0", *TINY, *FROM_SCRATCH) == 2
    assert "(fold1+fold2 and fold0)" in error_text(capsys)


# ----------------------------------------------------------------------------------- torchrun


@pytest.mark.slow
def test_torchrun_with_the_resident_loader_validates_on_the_whole_fold(synth_folds_raw: Path, tmp_path: Path):
    run = tmp_path / "run"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        "-m", "cocoshard", "train", "--shards", str(synth_folds_raw), "--out", str(run),
        "--val-fold", "2", "--loader", "resident", *TINY, "--batch-size", "32", *FROM_SCRATCH,
        "--epochs", "1", "--threads", "1",
    ]  # fmt: skip
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=300, env={**os.environ, "COLUMNS": "200"}
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (record,) = records(run)
    folds = read_manifest(synth_folds_raw)["splits"]
    assert len(record["steps_per_rank"]) == 2 and len(set(record["steps_per_rank"])) == 1
    assert record["step"] == (folds["fold0"]["samples"] + folds["fold1"]["samples"]) // 64
    assert record["val"]["model"]["images"] == folds["fold2"]["samples"]  # every rank's share gathered
    saved = read_scores(run / VAL_SCORES_FILE)
    assert sorted(saved.keys) == sorted(read_shard_labels(synth_folds_raw, "fold2"))
    assert load_checkpoint(run / LAST)["config"]["val_fold"] == 2
