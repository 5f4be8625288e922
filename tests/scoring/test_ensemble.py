"""`cocoshard ensemble`: what it writes equals averaging the runs' saved scores by hand and tuning
them with `cocoshard thresholds`; its submission passes evaluate's strict check; runs that cannot
be ensembled are refused by name."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cocoshard import cli
from cocoshard.errors import UserError
from cocoshard.prepare.manifest import read_manifest
from cocoshard.pure.metrics import predictions_from_scores
from cocoshard.scoring.members import check_members, read_member
from cocoshard.scoring.scores import Scores, read_scores, save_scores
from cocoshard.scoring.submission import build_submission
from cocoshard.training.runlog import VAL_SCORES_FILE
from conftest import FROM_SCRATCH, TINY, Done, ok, refused

STEPS = ("--epochs", "1", "--max-steps", "3", "--threads", "1")


def train(shards: Path, run: Path, *extra: str) -> Path:
    assert (
        cli.main(["train", "--shards", str(shards), "--out", str(run), *TINY, *FROM_SCRATCH, *STEPS, *extra])
        == 0
    )
    return run


@pytest.fixture(autouse=True)
def wide_console(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "1000")


@pytest.fixture
def cocoshard(capsys: pytest.CaptureFixture) -> Any:
    """`cocoshard ARGS` in this process (torch is imported once, not per command), as `conftest.cocoshard`."""

    def command(*args: object) -> Done:
        code = cli.main([str(arg) for arg in args])
        captured = capsys.readouterr()
        return Done(code, " ".join((captured.out + captured.err).split()))

    return command


@pytest.fixture(scope="module")
def fold_runs(synth_folds_raw: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """One short run per fold of the generated set's three folds, given in another order than the folds'."""
    runs = tmp_path_factory.mktemp("fold-runs")
    return [train(synth_folds_raw, runs / f"fold{i}", "--val-fold", str(i)) for i in (2, 0, 1)]


@pytest.fixture(scope="module")
def ensembled(fold_runs: list[Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ensemble") / "out"
    assert cli.main(["ensemble", *map(str, fold_runs), "--out", str(out), "--workers", "0"]) == 0
    return out


def test_the_ensemble_equals_averaging_the_runs_scores_and_tuning_them_by_hand(
    cocoshard: Any, fold_runs: list[Path], ensembled: Path, synth_folds_raw: Path, tmp_path: Path
):
    # validation: each run's saved out-of-fold scores, in fold order, tuned by `cocoshard thresholds`
    saved = sorted((read_scores(run / VAL_SCORES_FILE) for run in fold_runs), key=lambda s: s.split)
    by_hand = tmp_path / "oof.npz"
    save_scores(
        by_hand,
        Scores(
            [k for s in saved for k in s.keys], np.concatenate([s.scores for s in saved]), np.full(80, 0.5)
        ),
    )
    ok(
        cocoshard(
            "thresholds", "--scores", by_hand, "--labels", synth_folds_raw, "--out", tmp_path / "t.json"
        )
    )
    tuned = json.loads((tmp_path / "t.json").read_text())
    written = json.loads((ensembled / "thresholds.json").read_text())
    assert written["thresholds"] == tuned["thresholds"]
    assert written["heldout_gain"] == tuned["heldout_gain"] and written["images"] == tuned["images"] == 300
    oof = read_scores(ensembled / "val-scores.npz")
    assert oof.split == "fold0+fold1+fold2" and oof.keys == [k for s in saved for k in s.keys]
    assert np.array_equal(oof.scores, np.concatenate([s.scores for s in saved]))
    # test: the mean of the runs' test scores (each run's best.pt through predict), thresholded
    members = [read_scores(next((ensembled / "members").glob(f"{i}-*-test-scores.npz"))) for i in range(3)]
    keys = members[0].keys
    rows = [m.scores[[m.keys.index(k) for k in keys]] for m in members]
    mean = np.mean(np.stack(rows), axis=0).astype(np.float32)
    test = read_scores(ensembled / "test-scores.npz")
    assert test.keys == keys and np.array_equal(test.scores, mean.astype(np.float64))
    assert np.array_equal(test.thresholds, np.asarray(tuned["thresholds"]))
    expected = build_submission(keys, predictions_from_scores(mean, test.thresholds), mean, min_labels=1)
    assert json.loads((ensembled / "predictions.json").read_text()) == expected
    summary = json.loads((ensembled / "ensemble.json").read_text())
    assert [r["val_split"] for r in summary["runs"]] == ["fold2", "fold0", "fold1"]
    assert summary["kind"] == "out-of-fold" and summary["val_images"] == 300 and summary["test_images"] == 40


def test_its_submission_passes_evaluates_strict_check_and_its_report(
    cocoshard: Any, ensembled: Path, synth_folds_raw: Path, synth_root: Path, tmp_path: Path
):
    text = ok(
        cocoshard("evaluate", "--predictions", ensembled / "predictions.json", "--images", synth_folds_raw)
    )
    assert "format OK" in text and "covers exactly the 40 images" in text
    # scored against the answers the generated set keeps, and the out-of-fold predictions reported
    ok(
        cocoshard(
            "evaluate",
            "--predictions",
            ensembled / "predictions.json",
            "--labels",
            synth_root / "labels/test/test",
        )
    )
    report = tmp_path / "report"
    ok(cocoshard(
        "evaluate", "--predictions", ensembled / "val-predictions.json", "--labels", synth_folds_raw,
        "--scores", ensembled / "val-scores.npz", "--report", report, "--out", tmp_path / "metrics.json",
    ))  # fmt: skip
    figures = json.loads((tmp_path / "metrics.json").read_text())
    assert figures["server_f1"] == pytest.approx(
        json.loads((ensembled / "thresholds.json").read_text())["server_f1_tuned"]
    )
    assert (report / "summary.md").is_file() and (report / "per_class_f1.png").is_file()


@pytest.mark.slow
def test_saved_test_scores_give_the_same_ensemble(
    cocoshard: Any, fold_runs: list[Path], ensembled: Path, tmp_path: Path
):
    saved = [next((ensembled / "members").glob(f"{i}-*-test-scores.npz")) for i in range(3)]
    out = tmp_path / "again"
    ok(cocoshard("ensemble", *fold_runs, "--out", out, "--test-scores", *saved))
    for name in ("predictions.json", "thresholds.json", "val-predictions.json"):
        assert (out / name).read_bytes() == (ensembled / name).read_bytes(), name
    assert not (out / "members").exists()  # nothing was predicted again
    refused(
        cocoshard("ensemble", *fold_runs, "--out", tmp_path / "x", "--test-scores", *saved[::-1]),
        "were not made by",
    )
    refused(
        cocoshard("ensemble", *fold_runs, "--out", tmp_path / "x", "--test-scores", *saved, "--tta"),
        "were made without --tta",
    )


# ----------------------------------------------------------------------------------- refusals


def test_a_fold_given_twice_is_refused(cocoshard: Any, fold_runs: list[Path], tmp_path: Path):
    twin = Path(shutil.copytree(fold_runs[0], tmp_path / "fold2-again"))
    refused(cocoshard("ensemble", *fold_runs, twin, "--out", tmp_path / "out"), "both validated on fold2")
    assert not (tmp_path / "out").exists()


def test_runs_of_other_shards_are_refused(
    cocoshard: Any, fold_runs: list[Path], synth_shards_raw: Path, tmp_path: Path
):
    refused(
        cocoshard("ensemble", *fold_runs, "--shards", synth_shards_raw, "--out", tmp_path / "out"),
        "was trained on other shards than",
    )


def test_runs_naming_their_classes_otherwise_are_refused(fold_runs: list[Path], synth_folds_raw: Path):
    manifest = read_manifest(synth_folds_raw)
    members = [read_member(str(run)) for run in fold_runs]
    check_members(members, manifest, str(synth_folds_raw))
    renamed = list(members[1].classes)
    renamed[7] = "not the same"
    members[1] = dataclasses.replace(members[1], classes=tuple(renamed))
    with pytest.raises(UserError, match="names class 7 'not the same'"):
        check_members(members, manifest, str(synth_folds_raw))


def test_validation_scores_of_another_checkpoint_are_refused(
    cocoshard: Any, fold_runs: list[Path], tmp_path: Path
):
    run = Path(shutil.copytree(fold_runs[1], tmp_path / "run"))
    shutil.copy(fold_runs[2] / VAL_SCORES_FILE, run / VAL_SCORES_FILE)
    refused(cocoshard("ensemble", run, "--out", tmp_path / "out"), "another best.pt than the one beside it")
    (run / VAL_SCORES_FILE).unlink()
    refused(cocoshard("ensemble", run, "--out", tmp_path / "out"), "no val-scores.npz")


# ----------------------------------------------------------------------------------- one split


@pytest.mark.slow
def test_models_on_one_split_average_their_validation_scores(
    cocoshard: Any, synth_shards_raw: Path, tmp_path: Path
):
    runs = [train(synth_shards_raw, tmp_path / f"seed{seed}", "--seed", str(seed)) for seed in (0, 1)]
    out = tmp_path / "out"
    ok(cocoshard("ensemble", *runs, "--out", out, "--workers", "0", "--tta"))
    val = read_scores(out / "val-scores.npz")
    made = [read_scores(next((out / "members").glob(f"{i}-*-val-scores.npz"))) for i in range(2)]
    assert val.split == "val" and val.tta and all(m.tta for m in made)  # validation made as the test was
    rows = [m.scores[[m.keys.index(k) for k in val.keys]] for m in made]
    assert np.array_equal(val.scores, np.mean(np.stack(rows), axis=0).astype(np.float32).astype(np.float64))
    summary: dict[str, Any] = json.loads((out / "ensemble.json").read_text())
    assert summary["kind"] == "averaged" and [r["val_split"] for r in summary["runs"]] == ["val", "val"]
    ok(cocoshard("evaluate", "--predictions", out / "val-predictions.json", "--labels", synth_shards_raw,
                 "--scores", out / "val-scores.npz"))  # fmt: skip
