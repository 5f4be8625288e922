"""Settings: defaults, then a --config file (TOML, JSON or YAML, with command sections), then flags;
every value checked once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cocoshard import config, config_scoring
from cocoshard.commands import COMMANDS
from cocoshard.errors import ConfigError
from cocoshard.settings import CONFIG_LIMIT, read_config_file, resolve


def test_a_file_sets_what_flags_do_not(tmp_path: Path) -> None:
    toml = tmp_path / "train.toml"
    toml.write_text('model = "resnet18"\nepochs = 5\nbatch-size = 32\nlr = 1\n')
    cfg = resolve(config.TrainConfig, {"epochs": 3}, str(toml))
    assert (cfg.model, cfg.epochs, cfg.batch_size, cfg.lr) == ("resnet18", 3, 32, 1.0)
    assert isinstance(cfg.lr, float)
    as_json = tmp_path / "train.json"
    as_json.write_text(json.dumps({"model": "resnet18", "epochs": 5}))
    assert resolve(config.TrainConfig, {}, str(as_json)).epochs == 5


@pytest.mark.parametrize(
    "text, message",
    [
        (
            "epoch = 5\n",
            "unknown setting 'epoch' in config file .* for cocoshard train: did you mean 'epochs'",
        ),
        ('epochs = "5"\n', "epochs: expected int, got '5'"),
        ("epochs = true\n", "epochs: expected int, got True"),
        ('loss = "focal"\n', "loss: 'focal' is not one of"),
        ("amp = 1\n", "amp: expected true or false, got 1"),
        ("epochs = \n", "cannot be parsed"),
    ],
)
def test_bad_settings_in_a_file_are_named(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "train.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        resolve(config.TrainConfig, {}, str(path))


def test_a_list_of_runs_comes_from_the_command_line_or_a_file(tmp_path: Path, capsys) -> None:
    from cocoshard.cli import build_parser

    ns = build_parser().parse_args(["ensemble", "runs/f0", "runs/f1", "--test-scores", "a.npz", "b.npz"])
    assert (ns.runs, ns.test_scores) == (["runs/f0", "runs/f1"], ["a.npz", "b.npz"])
    cfg = resolve(config_scoring.EnsembleConfig, {"runs": ns.runs, "test_scores": ns.test_scores})
    assert cfg.runs == ("runs/f0", "runs/f1") and cfg.test_scores == ("a.npz", "b.npz")
    toml = tmp_path / "ensemble.toml"
    toml.write_text('runs = ["runs/f0", "runs/f1"]\ntta = true\n')
    assert resolve(config_scoring.EnsembleConfig, {}, str(toml)).runs == ("runs/f0", "runs/f1")
    toml.write_text('runs = "runs/f0"\n')
    with pytest.raises(ConfigError, match="runs: expected a list of str"):
        resolve(config_scoring.EnsembleConfig, {}, str(toml))
    with pytest.raises(ConfigError, match="name the runs to ensemble"):
        resolve(config_scoring.EnsembleConfig, {})


def test_a_file_that_is_not_a_settings_file_is_named(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.toml"
    os.mkfifo(fifo)  # never written: reading it would block forever
    (tmp_path / "list.json").write_text("[1, 2]")
    huge = tmp_path / "huge.toml"
    with open(huge, "wb") as handle:
        handle.truncate(CONFIG_LIMIT + 1)  # sparse: no disk used
    cases = {
        tmp_path / "absent.toml": "does not exist",
        tmp_path: ": not a regular file",
        fifo: ": not a regular file",
        huge: ": .* bytes, more than the",
        tmp_path / "list.json": "must hold a table/object of settings",
    }
    for path, message in cases.items():
        with pytest.raises(ConfigError, match=f"config file {path} ?{message}"):
            read_config_file(path)


def test_the_cli_reports_a_bad_config_file_in_one_line(tmp_path: Path) -> None:
    path = tmp_path / "synth.toml"
    path.write_text("train = -3\n")
    done = subprocess.run(
        [sys.executable, "-m", "cocoshard", "synth", "--config", str(path), "--out", str(tmp_path / "s")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == ["error: --train must be > 0 (got -3)"], done.stderr
    assert not (tmp_path / "s").exists()


def test_yaml_is_read_where_pyyaml_is_installed_and_otherwise_the_formats_are_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    yaml_file = tmp_path / "train.yaml"
    yaml_file.write_text("model: resnet18\nepochs: 3\nlr: 1e-3\nema: no\n")
    cfg = resolve(config.TrainConfig, {}, str(yaml_file))
    assert (cfg.model, cfg.epochs, cfg.lr, cfg.ema) == ("resnet18", 3, 0.001, False)
    misnamed = tmp_path / "train.cfg"  # YAML under a name read as TOML
    misnamed.write_text(yaml_file.read_text())
    with pytest.raises(
        ConfigError, match=r"cannot be parsed as TOML .*: --config takes TOML \(.toml\) or JSON"
    ):
        resolve(config.TrainConfig, {}, str(misnamed))
    monkeypatch.setitem(sys.modules, "yaml", None)  # PyYAML not installed
    with pytest.raises(ConfigError, match="needs PyYAML .*; or write it as TOML or JSON"):
        resolve(config.TrainConfig, {}, str(yaml_file))


def test_a_file_holds_a_section_per_command_and_shares_its_top_level_settings(tmp_path: Path) -> None:
    path = tmp_path / "job.toml"
    path.write_text(
        'shards = "packed"\n[train]\nepochs = 3\nbatch-size = 8\n[predict]\nbatch_size = 64\n'
        'checkpoint = "runs/a/best.pt"\n'
    )
    every = {name: cls for name, (cls, _) in COMMANDS.items()}
    train = resolve(config.TrainConfig, {"lr": 0.5}, str(path), command="train", commands=every)
    assert (train.shards, train.epochs, train.batch_size, train.lr) == ("packed", 3, 8, 0.5)
    predict = resolve(config_scoring.PredictConfig, {}, str(path), command="predict", commands=every)
    assert (predict.shards, predict.batch_size, predict.checkpoint) == ("packed", 64, "runs/a/best.pt")
    thresholds = resolve(config_scoring.ThresholdsConfig, {}, str(path), command="thresholds", commands=every)
    assert thresholds.out == "thresholds.json"  # no `shards` setting there: the shared one is not its
    path.write_text("[trian]\nepochs = 3\n")
    with pytest.raises(ConfigError, match=r"\[trian\] is not a command: did you mean \[train\]"):
        resolve(config.TrainConfig, {}, str(path), command="train", commands=every)
    path.write_text("shard = 1\n[train]\nepochs = 3\n")
    with pytest.raises(
        ConfigError, match="unknown setting 'shard' .* for any command: did you mean 'shards'"
    ):
        resolve(config.TrainConfig, {}, str(path), command="train", commands=every)


def test_one_epoch_on_pretrained_weights_names_the_freeze_epochs_default() -> None:
    cfg = resolve(config.TrainConfig, {"weights": "some.pt", "epochs": 1})
    with pytest.raises(
        ConfigError, match="--freeze-epochs defaults to 1.*--epochs 2 or more, or --freeze-epochs 0"
    ):
        cfg.resolved()
    assert resolve(config.TrainConfig, {"weights": "x.pt", "epochs": 1, "freeze_epochs": 0}).resolved()
