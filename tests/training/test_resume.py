"""Resuming a run: the settings it may change, the checkpoint it means (`--resume`, `--resume
auto`), the processes it needs, and kills at any moment that end, after `--resume`, exactly as the
uninterrupted run (inside an epoch too: `test_midepoch.py`; under torchrun's restarts too)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from cocoshard import cli
from cocoshard.config import RESUME_AUTO, RESUME_LAST, TrainConfig
from cocoshard.errors import ConfigError
from cocoshard.settings import resolve, to_dict
from cocoshard.training.checkpoint import LAST, load_checkpoint
from cocoshard.training.resume import (
    RESUMABLE,
    check_ranks_agree,
    check_same_shards,
    check_same_world,
    checkpoint_identity,
    resume_path,
    resume_settings,
    settings_to_run,
)
from cocoshard.training.runlog import METRICS_LOG
from cocoshard.training.runtime import Runtime
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


# ----------------------------------------------------------------------------------- --resume auto


def _checkpoint_in(run: Path, **fields: Any) -> Path:
    """A minimal checkpoint resume accepts (its config is the only setting it is read for here)."""
    from cocoshard import CLASSES
    from cocoshard.training.runtime import rng_state

    run.mkdir(parents=True, exist_ok=True)
    cfg = TrainConfig(shards="shards", out=str(run), model="cocoshard_tiny", weights="none")
    state = {
        "model": {"w": torch.zeros(1)},
        "epoch": 1,
        "step": 7,
        "config": to_dict(cfg.resolved()),
        "classes": list(CLASSES),
        "thresholds": [0.5] * 80,
        "rng": rng_state(),
        "optimizer": {},  # what a last.pt holds beyond what predict needs (`checkpoint.RESUME_KEYS`)
        "scheduler": {},
        **fields,
    }
    torch.save(state, run / LAST)
    return run / LAST


def test_resume_alone_requires_last_pt_and_resume_auto_starts_afresh_without_one(tmp_path: Path) -> None:
    assert cli.build_parser().parse_args(["train", "--resume"]).resume == RESUME_LAST
    assert cli.build_parser().parse_args(["train", "--resume", "auto"]).resume == RESUME_AUTO
    run = tmp_path / "run"
    cfg, state, path = settings_to_run(resolve(TrainConfig, {"out": str(run), "resume": RESUME_AUTO}))
    assert state is None and path is None and cfg.resume == RESUME_AUTO and not run.exists()
    with pytest.raises(ConfigError, match="there is no"):
        settings_to_run(resolve(TrainConfig, {"out": str(run), "resume": RESUME_LAST}))
    saved = _checkpoint_in(run)
    for resume in (RESUME_AUTO, RESUME_LAST):
        cfg, state, path = settings_to_run(resolve(TrainConfig, {"out": str(run), "resume": resume}))
        assert path == saved and state is not None and state["step"] == 7 and cfg.model == "cocoshard_tiny"


def test_another_number_of_processes_is_refused_by_name(tmp_path: Path) -> None:
    path = _checkpoint_in(tmp_path / "run", world_size=2)
    state = load_checkpoint(path)
    check_same_world(state, 2, path)
    check_same_world({k: v for k, v in state.items() if k != "world_size"}, 3, path)  # before it was kept
    with pytest.raises(ConfigError, match=r"trained by 2 process\(es\) of --batch-size 128; this run has 1"):
        check_same_world(state, 1, path)


def test_every_rank_must_resume_the_same_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An --out that is not shared: rank 1's node sees no last.pt while rank 0 resumes one."""
    import cocoshard.training.resume as resume

    state = load_checkpoint(_checkpoint_in(tmp_path / "run"))
    two = Runtime(torch.device("cpu"), rank=0, world_size=2)
    monkeypatch.setattr(
        resume, "gather_objects", lambda mine: [mine, (checkpoint_identity(state), "b pid 2")]
    )
    check_ranks_agree(two, state, str(tmp_path / "run"))
    monkeypatch.setattr(resume, "gather_objects", lambda mine: [mine, ("", "nodeb pid 2")])
    with pytest.raises(ConfigError, match=r"rank 1 \(nodeb pid 2\): no last.pt.*every node shares"):
        check_ranks_agree(two, state, str(tmp_path / "run"))


@pytest.mark.slow
def test_torchrun_restarts_a_killed_worker_and_ends_like_an_uninterrupted_run(
    synth_shards_raw: Path, tmp_path: Path
) -> None:
    """`torchrun --max-restarts 1 ... --resume auto`, two gloo processes, the resident loader: a
    worker killed inside the first epoch (after a mid-epoch save) is restarted with the other, and
    the run ends bit-identical to one nothing interrupted."""
    args = (
        "--shards", synth_shards_raw, "--loader", "resident", "--model", "cocoshard_tiny", "--weights",
        "none", "--device", "cpu", "--size", "32", "--batch-size", "8", "--workers", "0", "--threads", "1",
        "--no-amp", "--epochs", "1", "--log-every", "2", "--seed", "4", "--dist-timeout", "30",
    )  # fmt: skip

    def torchrun(run: Path, launcher: tuple[str, ...] = (), more: tuple[str, ...] = ()) -> subprocess.Popen:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
        command += [*launcher, "-m", "cocoshard", "train", "--out", str(run), *map(str, args), *more]
        with open(f"{run}.log", "w") as log:  # (a pipe left unread could fill and stall the run)
            return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)

    reference, restarted = tmp_path / "reference", tmp_path / "restarted"
    process = torchrun(reference)
    assert process.wait(timeout=300) == 0, Path(f"{reference}.log").read_text()[-3000:]
    process = torchrun(
        restarted, ("--max-restarts", "1"), ("--resume", "auto", "--checkpoint-every", "0.0001")
    )
    deadline = time.monotonic() + 180
    while not (restarted / LAST).is_file():  # rank 0 saved inside the first epoch
        assert process.poll() is None and time.monotonic() < deadline, Path(f"{restarted}.log").read_text()[
            -3000:
        ]
        time.sleep(0.01)
    workers = _children(process.pid)
    assert len(workers) == 2
    os.kill(workers[1], signal.SIGKILL)
    assert process.wait(timeout=300) == 0, Path(f"{restarted}.log").read_text()[-3000:]
    text = " ".join(Path(f"{restarted}.log").read_text().split())
    assert "--resume auto: " in text and "resumed from" in text and "steps of epoch 1" in text
    assert _final_figures(restarted) == _final_figures(reference)
    mine, theirs = load_checkpoint(restarted / LAST), load_checkpoint(reference / LAST)
    assert all(torch.equal(mine["model"][name], theirs["model"][name]) for name in theirs["model"])


def _children(pid: int) -> list[int]:
    """The processes whose parent is `pid`, oldest first."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return sorted(found)


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
