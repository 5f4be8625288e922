"""`cocoshard demo`: every stage end to end on a small generated set, and its folder discipline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cocoshard import cli, config, demo
from cocoshard.errors import UserError
from cocoshard.scoring.submission import load_submission
from cocoshard.settings import resolve

SMALL = {
    "train": 240,
    "test": 24,
    "epochs": 2,
    "image_size": 64,
    "size": 64,
    "batch_size": 32,
    "workers": 2,
    "device": "cpu",
}


@pytest.mark.slow
def test_demo_runs_every_stage_and_says_where_everything_is(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "demo"
    assert (
        cli.main(["demo", "--out", str(out), *[f"--{k.replace('_', '-')}={v}" for k, v in SMALL.items()]])
        == 0
    )
    printed = capsys.readouterr().out
    test_stems = sorted(p.stem for p in (out / "data/images/test-resized/test-resized").glob("*.jpg"))
    assert len(test_stems) == SMALL["test"]
    submission = load_submission(out / demo.TEST_JSON, expected=test_stems)  # the strict check
    assert all(submission.values())  # --min-labels 1: no image left without a class
    for name in ("summary.md", "per_class_f1.png", "precision_recall.png", "curves.png"):
        assert (out / demo.REPORT / name).is_file(), name
    assert (out / demo.RUN / "best.pt").is_file() and (out / demo.VAL_SCORES).is_file()
    record = json.loads((out / demo.MARKER).read_text())
    assert record["status"] == "complete"
    assert 0.0 <= record["val_server_f1"] <= 1.0 and 0.0 <= record["test_server_f1"] <= 1.0
    assert set(record["seconds"]) == {"synth", "pack", "train", "predict test", "predict val", "evaluate"}
    assert "val server F1" in printed and str(out / demo.TEST_JSON) in printed.replace("\n", "")
    summary = (out / demo.REPORT / "summary.md").read_text()
    assert f"{record['val_server_f1']:.4f}" in summary

    # a second run in the same folder starts over instead of tripping over the first one's run
    assert demo.run(resolve(config.DemoConfig, {"out": str(out), **SMALL, "epochs": 1})) == 0
    assert json.loads((out / demo.MARKER).read_text())["epochs"] == 1


def test_a_folder_the_demo_did_not_write_is_refused(tmp_path: Path) -> None:
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(UserError, match="not empty"):
        demo.prepare_folder(tmp_path)
    assert (tmp_path / "precious.txt").read_text() == "keep me"


def test_an_earlier_demo_is_cleared_but_its_data_folder_is_left_to_synth(tmp_path: Path) -> None:
    (tmp_path / demo.MARKER).write_text("{}")
    for name in (demo.RUN, demo.REPORT, demo.SHARDS, demo.DATA):
        (tmp_path / name).mkdir()
        (tmp_path / name / "file").write_text("old")
    (tmp_path / demo.TEST_JSON).write_text("{}")
    demo.prepare_folder(tmp_path)
    assert not (tmp_path / demo.RUN).exists() and not (tmp_path / demo.SHARDS).exists()
    assert not (tmp_path / demo.TEST_JSON).exists()
    assert (tmp_path / demo.DATA / "file").exists()  # synth clears its own files, knowing which they are


def test_stage_configs_follow_the_demo_settings(tmp_path: Path) -> None:
    cfg = resolve(config.DemoConfig, {"epochs": 3, "size": 80, "image_size": 112, "seed": 5})
    train = demo.train_config(cfg, tmp_path)
    assert (train.weights, train.model, train.epochs, train.size, train.seed) == (
        "none",
        "cocoshard_tiny",
        3,
        80,
        5,
    )
    assert train.shards == str(tmp_path / demo.SHARDS)
    pack = demo.pack_config(cfg, tmp_path)
    assert (pack.size, pack.format, pack.seed) == (112, "raw", 5)
    predict = demo.predict_config(cfg, tmp_path, "test", demo.TEST_JSON)
    assert predict.checkpoint == str(tmp_path / demo.RUN / "best.pt") and predict.split == "test"


def test_bad_settings_are_refused_before_any_work() -> None:
    with pytest.raises(config.ConfigError, match="crop-scale-min"):
        resolve(config.DemoConfig, {"crop_scale_min": 0.0})
    with pytest.raises(config.ConfigError, match="epochs"):
        resolve(config.DemoConfig, {"epochs": 0})
