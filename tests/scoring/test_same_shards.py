"""Scores only on the shards the model was trained on: a re-pack is refused by name, or recorded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cocoshard import CLASSES, cli, config
from cocoshard.prepare.manifest import read_manifest, shards_identity, split_record
from cocoshard.scoring.same_shards import OtherShards, Trained, check_trained_on, what_changed
from cocoshard.scoring.scores import read_scores
from cocoshard.settings import resolve, to_dict
from cocoshard.training.checkpoint import save_checkpoint
from cocoshard.training.model import build_model


def test_what_changed_is_named() -> None:
    assert "split seed changed (packed with --seed 0 then, --seed 1 now)" in what_changed(
        {"seed": 0, "val_fraction": 0.2}, {"seed": 1, "val_fraction": 0.2}
    )
    assert "val share changed" in what_changed(
        {"seed": 0, "val_fraction": 0.2}, {"seed": 0, "val_fraction": 0.3}
    )
    assert "re-pack detected" in what_changed(
        {"seed": 0, "val_fraction": 0.2}, {"seed": 0, "val_fraction": 0.2}
    )
    assert "re-pack detected" in what_changed({}, {"seed": 1})  # a checkpoint that recorded no split


def test_the_same_shards_or_no_record_pass_and_others_are_refused_or_noted(sample_shards_jpeg) -> None:
    manifest = read_manifest(sample_shards_jpeg)
    same = Trained(shards_identity(manifest), split_record(manifest))
    assert check_trained_on(same, "s", manifest, what="m", allow=False) is None
    assert check_trained_on(Trained(None), "s", manifest, what="m", allow=False) is None
    other = Trained("0" * 64, {"seed": 3, "val_fraction": 0.2})
    with pytest.raises(
        OtherShards, match="--seed 3 then, --seed 0 now.*re-pack with --seed 3.*--allow-other"
    ):
        check_trained_on(other, "s", manifest, what="m", allow=False)
    assert "--allow-other-shards" in check_trained_on(other, "s", manifest, what="m", allow=True)


@pytest.fixture(scope="module")
def repacked(coco_sample, pack_dir, sample_shards_jpeg, tmp_path_factory) -> tuple[Path, Path]:
    """(a checkpoint trained on sample_shards_jpeg, the same photos packed again with --seed 1)."""
    folder = tmp_path_factory.mktemp("repacked")
    manifest = read_manifest(sample_shards_jpeg)
    train_cfg = resolve(config.TrainConfig, {"model": "cocoshard_tiny", "size": 64, "weights": "none"})
    state = {
        "model": build_model("cocoshard_tiny").state_dict(),
        "weights": "model",
        "epoch": 1,
        "step": 5,
        "config": to_dict(train_cfg),
        "classes": list(CLASSES),
        "thresholds": [0.5] * 80,
        "metrics": {"server_f1_tuned": 0.1},
        "shards": shards_identity(manifest),
        "shards_split": split_record(manifest),
    }
    save_checkpoint(folder / "best.pt", state)
    return folder / "best.pt", pack_dir(coco_sample, folder / "shards", shard_samples=16, seed=1)


@pytest.mark.slow
def test_predict_evaluate_and_thresholds_refuse_a_repack_by_name_or_record_the_override(
    repacked, tmp_path, capsys
) -> None:
    checkpoint, shards = repacked
    val, scores = str(tmp_path / "val.json"), str(tmp_path / "val.npz")
    predict = ["predict", "--checkpoint", str(checkpoint), "--shards", str(shards), "--split", "val"]
    predict += ["--out", val, "--scores", scores, "--device", "cpu", "--workers", "0"]
    assert cli.main(predict) == 2
    said = " ".join(capsys.readouterr().err.split())
    assert (
        "split seed changed (packed with --seed 0 then, --seed 1 now)" in said
        and "--allow-other-shards" in said
    )
    assert not Path(val).exists()
    assert cli.main([*predict, "--allow-other-shards"]) == 0
    assert "may be inflated" in capsys.readouterr().err and "split seed" in read_scores(scores).other_shards
    evaluate = ["evaluate", "--predictions", val, "--labels", str(shards), "--scores", scores]
    thresholds = [
        "thresholds",
        "--scores",
        scores,
        "--labels",
        str(shards),
        "--out",
        str(tmp_path / "t.json"),
    ]
    for command in (evaluate, thresholds):
        assert cli.main(command) == 2
        assert "split seed changed" in " ".join(capsys.readouterr().err.split())
    assert cli.main([*evaluate, "--allow-other-shards", "--out", str(tmp_path / "m.json")]) == 0
    assert any(
        "split seed changed" in note for note in json.loads((tmp_path / "m.json").read_text())["notes"]
    )
    assert cli.main([*thresholds, "--allow-other-shards"]) == 0
    assert "split seed changed" in json.loads((tmp_path / "t.json").read_text())["other_shards"]
    test = [*predict[:5], "--split", "test", "--out", str(tmp_path / "test.json"), "--device", "cpu"]
    assert cli.main(test) == 0  # test images were never trained on, whatever the split: no refusal
