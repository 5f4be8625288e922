"""Resuming a run: the settings it may change, the checkpoint it means, and kills at any moment
that end, after `--resume`, exactly as the uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from cocoshard import cli
from cocoshard.config import RESUME_LAST, TrainConfig
from cocoshard.errors import ConfigError
from cocoshard.settings import resolve, to_dict
from cocoshard.training.checkpoint import LAST, load_checkpoint
from cocoshard.training.resume import (
    RESUMABLE,
    check_same_shards,
    resume_path,
    resume_settings,
    settings_to_run,
)
from cocoshard.training.runlog import METRICS_LOG
from conftest import records


def train(*args: str) -> int:
    return cli.main(["train", *args])


# ----------------------------------------------------------------------------------- settings


def _saved_run(tmp_path: Path, **settings: Any) -> tuple[dict[str, Any], Path]:
    """A checkpoint's state as resume reads it (only its config matters here) and its path."""
    run = tmp_path / "run"
    run.mkdir()
    cfg = TrainConfig(
        shards="shards", out=str(run), model="resnet18", lr=3e-3, workers=4, threads=2, **settings
    )
    return {"config": to_dict(cfg.resolved())}, run / LAST


def test_resume_path_is_the_runs_last_pt_or_the_file_given(tmp_path: Path) -> None:
    (tmp_path / "run").mkdir()
    assert resume_path(TrainConfig(out=str(tmp_path / "run"), resume=RESUME_LAST)) == tmp_path / "run" / LAST
    assert resume_path(TrainConfig(resume=str(tmp_path / "run"))) == tmp_path / "run" / LAST
    assert resume_path(TrainConfig(resume=str(tmp_path / "x.pt"))) == tmp_path / "x.pt"


def test_a_resumed_run_keeps_its_own_settings_and_chooses_the_machine_ones_again(tmp_path: Path) -> None:
    state, path = _saved_run(tmp_path)
    given = resolve(TrainConfig, {"resume": str(path), "epochs": 20, "log_every": 5})
    cfg = resume_settings(given, state, path)
    assert (cfg.model, cfg.lr, cfg.epochs, cfg.log_every) == ("resnet18", 3e-3, 20, 5)
    assert cfg.workers is None and cfg.threads is None  # chosen again where it resumes
    assert cfg.out == str(path.parent)


@pytest.mark.parametrize(
    "name, value", [("lr", 0.5), ("model", "resnet50"), ("batch_size", 8), ("seed", 1), ("val_fold", 1)]
)
def test_a_setting_that_changes_what_is_trained_is_refused_by_name(
    tmp_path: Path, name: str, value: Any
) -> None:
    assert name not in RESUMABLE
    state, path = _saved_run(tmp_path)
    given = resolve(TrainConfig, {"resume": str(path), name: value})
    with pytest.raises(ConfigError, match="--" + name.replace("_", "-")):
        resume_settings(given, state, path)


def test_out_and_resume_naming_two_runs_are_refused(tmp_path: Path) -> None:
    state, path = _saved_run(tmp_path)
    given = resolve(TrainConfig, {"resume": str(path), "out": str(tmp_path / "other")})
    with pytest.raises(ConfigError, match="name two runs"):
        resume_settings(given, state, path)


def test_resume_without_a_checkpoint_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    run = tmp_path / "run"
    with pytest.raises(ConfigError, match="there is no"):
        settings_to_run(resolve(TrainConfig, {"out": str(run), "resume": RESUME_LAST}))
    assert not run.exists()


def test_other_shards_are_refused(tmp_path: Path) -> None:
    check_same_shards({"shards": "abc"}, "abc", "shards", tmp_path / LAST)
    with pytest.raises(ConfigError, match="re-packed"):
        check_same_shards({"shards": "abc"}, "abd", "shards", tmp_path / LAST)


# ----------------------------------------------------------------------------------- kill -9, resume


RESUME_ARGS = [
    "--threads",  # fixed: a count chosen from a busy machine would change the order of float sums
    "1",
    "--model",
    "cocoshard_tiny",
    "--device",
    "cpu",
    "--size",
    "64",
    "--batch-size",
    "32",
    "--workers",
    "0",
    "--weights",
    "none",
    "--epochs",
    "3",
    "--log-every",
    "1",
    "--seed",
    "3",
]


def _start(shards: Path, run: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "cocoshard",
            "train",
            "--shards",
            str(shards),
            "--out",
            str(run),
            *RESUME_ARGS,
            *extra,
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def _wait_for(condition: Any, process: subprocess.Popen, timeout: float = 120.0, poll: float = 0.002) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            raise AssertionError(
                f"training ended (rc {process.returncode}) before the moment to kill it: "
                f"{process.stderr.read().decode()[-2000:]}"
            )
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError("timed out waiting for the moment to kill training")
        time.sleep(poll)


def _kill(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    process.stderr.close()


def _epochs_logged(run: Path) -> int:
    """Complete lines in metrics.jsonl (a line being written does not count yet)."""
    path = run / METRICS_LOG
    return path.read_bytes().count(b"\n") if path.is_file() else 0


def _final_figures(run: Path) -> dict[str, Any]:
    last = records(run)[-1]
    return {"epoch": last["epoch"], "step": last["step"], "train": last["train"], "val": last["val"]}


@pytest.fixture(scope="module")
def uninterrupted(synth_shards_raw: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The final figures of a run that nothing interrupted (the reference for resumed runs)."""
    run = tmp_path_factory.mktemp("uninterrupted") / "run"
    assert train("--shards", str(synth_shards_raw), "--out", str(run), *RESUME_ARGS) == 0
    return _final_figures(run)


@pytest.mark.slow
def test_kill_mid_epoch_then_resume_ends_like_an_uninterrupted_run(
    synth_shards_raw: Path, tmp_path: Path, uninterrupted: dict[str, Any]
) -> None:
    run = tmp_path / "run"
    process = _start(synth_shards_raw, run)
    _wait_for(lambda: (run / LAST).is_file(), process)  # epoch 1 is saved; epoch 2 is under way
    time.sleep(0.3)
    _kill(process)
    assert load_checkpoint(run / LAST)["epoch"] in (1, 2)
    assert train("--shards", str(synth_shards_raw), "--out", str(run), *RESUME_ARGS, "--resume") == 0
    assert [r["epoch"] for r in records(run)] == [1, 2, 3]
    assert _final_figures(run) == uninterrupted


@pytest.mark.slow
def test_kill_during_a_checkpoint_write_leaves_a_loadable_last_pt(
    synth_shards_raw: Path, tmp_path: Path, uninterrupted: dict[str, Any]
) -> None:
    from cocoshard.atomic import TMP_PREFIX

    run = tmp_path / "run"
    process = _start(synth_shards_raw, run)
    _wait_for(lambda: _epochs_logged(run) >= 2, process)
    # epoch 2 is logged and its last.pt is being written (or just was): kill on the temporary file
    _wait_for(
        lambda: any(run.glob(TMP_PREFIX + LAST + "*")) or load_checkpoint(run / LAST)["epoch"] == 2, process
    )
    _kill(process)
    assert load_checkpoint(run / LAST)["epoch"] in (1, 2)
    assert train("--shards", str(synth_shards_raw), "--out", str(run), *RESUME_ARGS, "--resume") == 0
    assert not list(run.glob(TMP_PREFIX + "*"))
    assert [r["epoch"] for r in records(run)] == [1, 2, 3]
    assert _final_figures(run) == uninterrupted


# ----------------------------------------------------------------------------------- a K-fold run


@pytest.fixture(scope="module")
def uninterrupted_fold(synth_folds_raw: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The final figures of a --val-fold run that nothing interrupted."""
    run = tmp_path_factory.mktemp("uninterrupted-fold") / "run"
    args = ["--shards", str(synth_folds_raw), "--out", str(run), *RESUME_ARGS, "--val-fold", "1"]
    assert train(*args) == 0
    return _final_figures(run)


@pytest.mark.slow
def test_a_val_fold_run_killed_mid_epoch_resumes_exactly_on_its_fold(
    synth_folds_raw: Path, tmp_path: Path, uninterrupted_fold: dict[str, Any]
) -> None:
    run = tmp_path / "run"
    process = _start(synth_folds_raw, run, "--val-fold", "1")
    _wait_for(lambda: (run / LAST).is_file(), process)  # epoch 1 is saved; epoch 2 is under way
    time.sleep(0.3)
    _kill(process)
    # the fold is part of the run: another one is refused by name, none given means its own
    assert train("--shards", str(synth_folds_raw), "--out", str(run), "--resume", "--val-fold", "2") == 2
    assert train("--shards", str(synth_folds_raw), "--out", str(run), *RESUME_ARGS, "--resume") == 0
    assert [r["epoch"] for r in records(run)] == [1, 2, 3]
    assert _final_figures(run) == uninterrupted_fold
    assert load_checkpoint(run / LAST)["config"]["val_fold"] == 1
