"""`cocoshard evaluate` on the real sample's labels: the leaderboard's F1, strict format, outputs."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cocoshard import cli, config_scoring
from cocoshard.errors import UserError
from cocoshard.pure import metrics
from cocoshard.scoring import evaluate
from cocoshard.scoring.ground_truth import (
    class_names_of,
    load_labels,
    read_label_folder,
)
from cocoshard.scoring.scores import Scores, save_scores
from cocoshard.scoring.submission import serialise
from cocoshard.settings import resolve
from conftest import statement_validation_loop

LABELS = Path("labels/train/train")
TEST_IMAGES = Path("images/test-resized/test-resized")


@pytest.fixture(scope="module")
def sample_labels(coco_sample: Path) -> dict[str, np.ndarray]:
    return read_label_folder(coco_sample / LABELS)


def noisy_submission(
    labels: dict[str, np.ndarray], seed: int, keys: list[str] | None = None
) -> tuple[dict, np.ndarray]:
    """A plausible submission: true labels with misses and false alarms, and matching scores."""
    rng = np.random.default_rng(seed)
    keys = sorted(labels) if keys is None else keys
    truth = np.stack([labels[k] for k in keys])
    scores = np.clip(0.55 * truth + rng.random(truth.shape) * 0.6, 0, 1)
    pred = scores > 0.5
    return {k: np.flatnonzero(row).tolist() for k, row in zip(keys, pred)}, scores


def write(path: Path, submission: dict) -> Path:
    path.write_text(serialise(submission))
    return path


def evaluate_json(capsys: pytest.CaptureFixture, **settings) -> dict:
    assert evaluate.run(resolve(config_scoring.EvaluateConfig, {"json": True, **settings})) == 0
    return json.loads(capsys.readouterr().out)


def test_server_f1_equals_the_statement_on_real_labels(tmp_path, coco_sample, sample_labels, capsys) -> None:
    submission, _ = noisy_submission(sample_labels, seed=0)
    path = write(tmp_path / "p.json", submission)
    result = evaluate_json(capsys, predictions=str(path), labels=str(coco_sample / LABELS))
    keys = sorted(submission)
    truth = np.stack([sample_labels[k] for k in keys])
    pred = np.stack([np.isin(np.arange(80), submission[k]) for k in keys])
    present = truth.sum(axis=0) > 0  # the sample lacks some classes: the statement would divide by 0
    reference = statement_validation_loop(pred[:, present].astype(float), truth[:, present])
    assert result["server_f1"] == pytest.approx(reference["f1"], abs=1e-6)
    assert result["server_precision"] == pytest.approx(reference["precision"], abs=1e-6)
    assert result["images"] == len(sample_labels) == 126
    assert result["format_ok"] is True


def test_only_the_predicted_images_are_evaluated(tmp_path, coco_sample, sample_labels, capsys) -> None:
    keys = sorted(sample_labels)[:40]
    submission, _ = noisy_submission(sample_labels, seed=1, keys=keys)
    result = evaluate_json(
        capsys,
        predictions=str(write(tmp_path / "p.json", submission)),
        labels=str(coco_sample / LABELS),
        subset=True,
    )  # 40 of the 126 labelled images, on purpose
    truth = np.stack([sample_labels[k] for k in keys])
    pred = np.stack([np.isin(np.arange(80), submission[k]) for k in keys])
    assert result["images"] == 40
    assert result["server_f1"] == pytest.approx(metrics.server_f1(pred, truth).f1, abs=1e-12)


def test_scores_give_map_and_per_class_rows(tmp_path, coco_sample, sample_labels, capsys) -> None:
    submission, scores = noisy_submission(sample_labels, seed=2)
    keys = sorted(submission)
    order = np.random.default_rng(0).permutation(len(keys))  # the .npz need not follow the JSON's order
    save_scores(
        tmp_path / "s.npz",
        Scores([keys[i] for i in order], scores[order].astype(np.float32), np.full(80, 0.5), min_labels=0),
    )
    result = evaluate_json(
        capsys,
        predictions=str(write(tmp_path / "p.json", submission)),
        labels=str(coco_sample / LABELS),
        scores=str(tmp_path / "s.npz"),
        per_class=True,
    )
    truth = np.stack([sample_labels[k] for k in keys])
    assert result["map"] == pytest.approx(
        metrics.mean_average_precision(scores.astype(np.float32), truth), abs=1e-6
    )
    rows = result["per_class"]
    assert [row["id"] for row in rows] == list(range(80)) and rows[0]["name"] == "person"
    assert sum(row["weight"] for row in rows) == pytest.approx(1.0)
    absent = [row for row in rows if row["positives"] == 0]
    assert absent and all(row["weight"] == 0.0 and row["ap"] is None for row in absent)


def test_a_key_without_labels_is_rejected_by_name(tmp_path, coco_sample, sample_labels) -> None:
    submission, _ = noisy_submission(sample_labels, seed=3)
    submission["000000999999"] = [1]
    path = write(tmp_path / "p.json", submission)
    with pytest.raises(UserError, match="'000000999999': unknown image"):
        evaluate.run(
            resolve(
                config_scoring.EvaluateConfig, {"predictions": str(path), "labels": str(coco_sample / LABELS)}
            )
        )


def test_images_folder_requires_every_test_image_exactly_once(tmp_path, coco_sample, capsys) -> None:
    stems = sorted(p.stem for p in (coco_sample / TEST_IMAGES).glob("*.jpg"))
    assert len(stems) == 32
    complete = write(tmp_path / "ok.json", {k: [0] for k in stems})
    result = evaluate_json(capsys, predictions=str(complete), images=str(coco_sample / TEST_IMAGES))
    assert result == {"format_ok": True, "images": 32, "notes": []}
    incomplete = write(tmp_path / "bad.json", {k: [0] for k in stems[1:]})
    code = cli.main(
        ["evaluate", "--predictions", str(incomplete), "--images", str(coco_sample / TEST_IMAGES)]
    )
    assert code == 2
    assert f"'{stems[0]}': missing image" in capsys.readouterr().err


def test_notes_for_unsorted_and_empty_lists(tmp_path, coco_sample, sample_labels, capsys) -> None:
    keys = sorted(sample_labels)[:3]
    path = tmp_path / "p.json"
    path.write_text(json.dumps({keys[0]: [5, 0], keys[1]: [], keys[2]: [0]}))
    result = evaluate_json(capsys, predictions=str(path), labels=str(coco_sample / LABELS), subset=True)
    assert any("not sorted" in note for note in result["notes"])
    assert any("no class at all" in note for note in result["notes"])


def test_human_output_has_the_headline_and_per_class_table(
    tmp_path, coco_sample, sample_labels, capsys
) -> None:
    submission, _ = noisy_submission(sample_labels, seed=4)
    path = write(tmp_path / "p.json", submission)
    assert (
        cli.main(
            ["evaluate", "--predictions", str(path), "--labels", str(coco_sample / LABELS), "--per-class"]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "format OK" in out and "server F1" in out and "hair drier" in out


def test_report_folder_gets_figures_and_summary(tmp_path, coco_sample, sample_labels, capsys) -> None:
    submission, _ = noisy_submission(sample_labels, seed=5)
    path = write(tmp_path / "p.json", submission)
    result = evaluate_json(
        capsys, predictions=str(path), labels=str(coco_sample / LABELS), report=str(tmp_path / "r")
    )
    names = {Path(p).name for p in result["report"]}
    assert names == {"summary.md", "per_class_f1.png", "precision_recall.png"}
    assert f"{result['server_f1']:.4f}" in (tmp_path / "r" / "summary.md").read_text()


def test_a_corrupt_cls_file_is_named(tmp_path, coco_sample) -> None:
    folder = tmp_path / "labels"
    shutil.copytree(coco_sample / LABELS, folder)
    bad = sorted(folder.glob("*.cls"))[3]
    bad.write_text("12\nseven\n")
    with pytest.raises(UserError, match=f"{bad.name}: line 2"):
        read_label_folder(folder)


def test_labels_from_the_val_split_of_shards(sample_shards_jpeg, sample_labels, tmp_path, capsys) -> None:
    shard_labels = load_labels(sample_shards_jpeg)
    assert 0 < len(shard_labels) < len(sample_labels)
    for key, vector in shard_labels.items():
        np.testing.assert_array_equal(vector, sample_labels[key])
    submission, _ = noisy_submission(shard_labels, seed=6)
    result = evaluate_json(
        capsys, predictions=str(write(tmp_path / "p.json", submission)), labels=str(sample_shards_jpeg)
    )
    assert result["images"] == len(shard_labels)
    test_keys = evaluate.image_keys(sample_shards_jpeg)
    assert len(test_keys) == 32


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**32 - 1))
def test_scores_do_not_depend_on_key_or_list_order(sample_labels, seed: int) -> None:
    rnd = random.Random(seed)
    submission, _ = noisy_submission(sample_labels, seed=7)
    items = [(key, rnd.sample(ids, len(ids))) for key, ids in submission.items()]
    rnd.shuffle(items)
    shuffled = evaluate.validate_submission(dict(items), allowed=sample_labels.keys())
    reference = evaluate.score_submission(submission, sample_labels).metrics
    assert evaluate.score_submission(shuffled, sample_labels).metrics == reference


def test_class_names_come_from_the_shards_manifest(synth_shards_jpeg, coco_sample, tmp_path, capsys) -> None:
    from cocoshard import CLASSES
    from cocoshard.prepare.synth import generated_class_names as synth_names

    assert class_names_of(synth_shards_jpeg) == tuple(synth_names())
    assert class_names_of(coco_sample / LABELS) == CLASSES
    labels = load_labels(synth_shards_jpeg)
    submission, _ = noisy_submission(labels, seed=8)
    result = evaluate_json(
        capsys,
        predictions=str(write(tmp_path / "p.json", submission)),
        labels=str(synth_shards_jpeg),
        per_class=True,
        report=str(tmp_path / "r"),
    )
    assert [row["name"] for row in result["per_class"]] == synth_names()
    summary = (tmp_path / "r" / "summary.md").read_text()
    assert any(f"| {name} |" in summary for name in synth_names())
    assert not any(f"| {name} |" in summary for name in CLASSES)


def test_predictions_of_the_test_split_scored_on_val_say_to_predict_with_split_val(
    sample_shards_jpeg, tmp_path, capsys
) -> None:
    from cocoshard.scoring.ground_truth import image_keys

    test_keys = image_keys(sample_shards_jpeg, "test")
    path = write(tmp_path / "predictions.json", {key: [0] for key in test_keys})
    assert cli.main(["evaluate", "--predictions", str(path), "--labels", str(sample_shards_jpeg)]) == 2
    said = " ".join(capsys.readouterr().err.split())
    assert f"holds the test split's images ({len(test_keys)} of them)" in said
    assert f"--shards {sample_shards_jpeg} --split val" in said


def test_labels_of_a_fold_pack_are_every_fold_or_the_split_given(
    sample_folds_jpeg, sample_labels, coco_sample, tmp_path, capsys
) -> None:
    from cocoshard.prepare.manifest import read_manifest, shards_identity

    every = load_labels(sample_folds_jpeg)  # the default: every fold, each labelled image once
    assert sorted(every) == sorted(sample_labels)
    fold1 = load_labels(sample_folds_jpeg, "fold1")
    assert len(fold1) == 42 and set(fold1) < set(every)
    assert set(load_labels(sample_folds_jpeg, "fold0+fold1")) == set(fold1) | set(
        load_labels(sample_folds_jpeg, "fold0")
    )
    submission, scores = noisy_submission(fold1, seed=9)
    predictions = write(tmp_path / "p.json", submission)
    assert (
        evaluate_json(capsys, predictions=str(predictions), labels=str(sample_folds_jpeg), split="fold1")[
            "images"
        ]
        == 42
    )
    # scores of fold1 are scores of fold1 only: against every fold they are refused by split
    identity = shards_identity(read_manifest(sample_folds_jpeg))
    keys = sorted(submission)
    found = Scores(keys, scores, np.full(80, 0.5), source=f"shards {identity}", split="fold1")
    save_scores(tmp_path / "s.npz", found)
    settings = {
        "predictions": str(predictions),
        "labels": str(sample_folds_jpeg),
        "scores": str(tmp_path / "s.npz"),
    }
    assert evaluate_json(capsys, **settings, split="fold1")["images"] == 42
    with pytest.raises(UserError, match="scores the 'fold1' split of other shards than the labels given"):
        evaluate.run(resolve(config_scoring.EvaluateConfig, {**settings, "subset": True}))
    with pytest.raises(UserError, match="names a split of shards"):
        load_labels(coco_sample / LABELS, "fold1")


def test_thresholds_tune_on_the_fold_given(sample_folds_jpeg, tmp_path, capsys) -> None:
    fold2 = load_labels(sample_folds_jpeg, "fold2")
    _, scores = noisy_submission(fold2, seed=10)
    save_scores(tmp_path / "s.npz", Scores(sorted(fold2), scores, np.full(80, 0.5)))
    out = tmp_path / "t.json"
    args = [
        "thresholds",
        "--scores",
        str(tmp_path / "s.npz"),
        "--labels",
        str(sample_folds_jpeg),
        "--out",
        str(out),
    ]
    assert cli.main([*args, "--split", "fold2"]) == 0
    assert json.loads(out.read_text())["images"] == 42
    assert cli.main([*args, "--split", "fold1"]) == 2  # its images have no labels in fold1
    assert "scored images have no labels" in " ".join(capsys.readouterr().err.split())
