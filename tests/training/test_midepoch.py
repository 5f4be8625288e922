"""Checkpoints inside an epoch: a run killed after one (or while writing one) and resumed ends
bit-identical to the run nothing interrupted, on the stream and the resident loader; the
per-rank figures survive; no reader but resume takes a mid-epoch last.pt for an epoch's end.

The two-process case (torchrun, a worker killed inside an epoch, `--resume auto`) is
`test_resume.py::test_torchrun_restarts_a_killed_worker_and_ends_like_an_uninterrupted_run`."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from cocoshard import cli
from cocoshard.atomic import TMP_PREFIX
from cocoshard.training import midepoch
from cocoshard.training.checkpoint import LAST, MidEpochCheckpoint, load_checkpoint
from cocoshard.training.train import OnlineMetrics
from conftest import REPO, records

# A tiny model, fixed threads, no AMP (bf16 on this CPU is slower), 14 steps an epoch on the
# generated raw shards, a save due at every log step (every 2 steps).
ARGS = (
    "--weights", "none", "--device", "cpu", "--size", "32", "--batch-size", "16", "--workers", "0",
    "--threads", "1", "--no-amp", "--epochs", "2", "--log-every", "2", "--seed", "5",
)  # fmt: skip
SAVE_OFTEN = ("--checkpoint-every", "0.0001")  # minutes: every log step
# the stream run with the tiny CNN; the resident one with a model whose dropout draws from torch's
# global generator, so that a resumed epoch must put that generator back too
RUNS = {"stream": "cocoshard_tiny", "resident": "mobilenet_v3_small"}


def train(*args: object) -> int:
    return cli.main(["train", *map(str, args)])


def outcome(run: Path) -> dict[str, Any]:
    """What must be bit-identical: the last epoch's figures and every saved tensor."""
    last = records(run)[-1]
    state = load_checkpoint(run / LAST)
    return {
        "epoch": last["epoch"],
        "step": last["step"],
        "steps_per_rank": last["steps_per_rank"],
        "train": last["train"],
        "val": last["val"],
        "model": state["model"],
        "ema": state["ema"],
    }


def assert_identical(a: dict[str, Any], b: dict[str, Any]) -> None:
    for key in ("epoch", "step", "steps_per_rank", "train", "val"):
        assert a[key] == b[key], key
    for key in ("model", "ema"):
        assert a[key].keys() == b[key].keys()
        assert all(torch.equal(a[key][name], b[key][name]) for name in a[key]), key


@pytest.fixture(scope="module")
def reference(synth_shards_raw: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    """Each loader's uninterrupted run (without mid-epoch saves: saving must change nothing)."""
    out = {}
    for loader, model in RUNS.items():
        run = tmp_path_factory.mktemp("reference") / loader
        assert (
            train("--shards", synth_shards_raw, "--out", run, "--loader", loader, "--model", model, *ARGS)
            == 0
        )
        out[loader] = outcome(run)
    return out


@pytest.mark.slow
def test_a_kill_while_a_mid_epoch_save_is_written_then_resume_is_bit_identical(
    synth_shards_raw: Path, tmp_path: Path, reference: dict[str, dict[str, Any]]
) -> None:
    """Stream loader, one rank: kill -9 during the write of a mid-epoch last.pt, then --resume."""
    run = tmp_path / "run"
    command = [
        sys.executable,
        "-m",
        "cocoshard",
        "train",
        "--shards",
        str(synth_shards_raw),
        "--out",
        str(run),
    ]
    process = subprocess.Popen(
        [*command, "--model", RUNS["stream"], *ARGS, *SAVE_OFTEN],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 180
    while not ((run / LAST).is_file() and any(run.glob(TMP_PREFIX + LAST + "*"))):  # a save under way
        assert process.poll() is None, process.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline, "no mid-epoch save was seen"
        time.sleep(0.001)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    process.stderr.close()
    saved = load_checkpoint(run / LAST, mid_epoch=True)
    assert saved["partial"] is not None and 0 < saved["partial"]["batch"] < saved["partial"]["steps"]
    assert train("--out", run, "--resume", "--threads", "1", "--workers", "0") == 0  # not chosen again
    assert_identical(outcome(run), reference["stream"])
    assert not list(run.glob(TMP_PREFIX + "*"))


@pytest.mark.slow
def test_the_resident_loader_resumes_inside_an_epoch_bit_identical(
    synth_shards_raw: Path,
    tmp_path: Path,
    reference: dict[str, dict[str, Any]],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:
    """Resident loader, one rank: stopped right after the second mid-epoch save of the second epoch,
    resumed in a fresh trainer."""
    run = tmp_path / "run"
    steps = reference["resident"]["steps_per_rank"][0]
    saves: list[int] = []
    original = midepoch.save_mid_epoch

    def save_then_stop(*args: Any) -> None:
        original(*args)
        saves.append(args[2])  # the batch it was saved at
        if len(saves) == (steps - 1) // 2 + 2:  # the first epoch saves at steps 2, 4, ... (not its last)
            raise KeyboardInterrupt

    monkeypatch.setattr("cocoshard.training.train.save_mid_epoch", save_then_stop)
    command = (
        "--shards",
        synth_shards_raw,
        "--out",
        run,
        "--loader",
        "resident",
        "--model",
        RUNS["resident"],
    )
    command += ARGS
    assert train(*command, *SAVE_OFTEN) == 128 + signal.SIGINT
    said = " ".join(capsys.readouterr().err.split())
    assert saves[-1] == 4 and f"{run / LAST} holds epoch 1 of 2 and 4 of the {steps} steps of epoch 2" in said
    assert f"cocoshard train --out {run} --resume" in said
    monkeypatch.undo()
    assert [r["epoch"] for r in records(run)] == [1]
    assert train("--out", run, "--resume", "--threads", "1", "--workers", "0") == 0
    assert [r["epoch"] for r in records(run)] == [1, 2]
    assert_identical(outcome(run), reference["resident"])


def test_only_resume_reads_a_mid_epoch_last_pt(
    synth_shards_raw: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """predict (and every other reader) refuses it by name; an epoch cut short by --max-steps is
    an epoch's end (validated, best.pt written), not a mid-epoch save."""
    run = tmp_path / "run"
    once = ("--max-steps", "3", "--epochs", "1", "--log-every", "1")
    assert (
        train(
            "--shards", synth_shards_raw, "--out", run, "--model", "cocoshard_tiny", *ARGS, *SAVE_OFTEN, *once
        )
        == 0
    )
    state = load_checkpoint(run / LAST)
    assert state["partial"] is None and state["world_size"] == 1 and (run / "best.pt").is_file()
    state["partial"] = {"epoch": 1, "batch": 2, "steps": 14, "time_s": 1.0, "data_wait_s": 0.0, "ranks": []}
    torch.save(state, run / LAST)
    with pytest.raises(MidEpochCheckpoint, match=r"inside epoch 2 \(after 2 of its 14 steps\).*best.pt"):
        load_checkpoint(run / LAST)
    assert load_checkpoint(run / LAST, mid_epoch=True)["partial"]["batch"] == 2
    capsys.readouterr()
    predicted = tmp_path / "p.json"
    command = ["predict", "--checkpoint", run / LAST, "--shards", synth_shards_raw, "--out", predicted]
    assert cli.main(list(map(str, command))) == 2
    assert "inside epoch 2" in " ".join(capsys.readouterr().err.split()) and not predicted.exists()


def test_the_partial_figures_of_an_epoch_survive_a_round_trip() -> None:
    """Two batches counted, saved, restored into a new meter, then a third: the same figures and
    the same loss bits as three batches counted in one go."""
    generator = torch.Generator().manual_seed(0)
    batches = [
        (
            torch.rand((), generator=generator),
            torch.randn(4, 80, generator=generator),
            (torch.rand(4, 80) > 0.9),
        )
        for _ in range(3)
    ]
    whole, first = OnlineMetrics(torch.device("cpu")), OnlineMetrics(torch.device("cpu"))
    for loss, logits, labels in batches:
        whole.add(loss, logits, labels.float())
    for loss, logits, labels in batches[:2]:
        first.add(loss, logits, labels.float())
    resumed = OnlineMetrics(torch.device("cpu"))
    resumed.restore(first.state())
    resumed.add(batches[2][0], batches[2][1], batches[2][2].float())
    assert resumed.summary(is_main=True) == whole.summary(is_main=True)
    assert torch.equal(resumed.loss_sum, whole.loss_sum) and resumed.batches == whole.batches == 3
