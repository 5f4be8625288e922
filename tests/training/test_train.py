"""`cocoshard train` end to end on real and generated shards: outputs, AMP paths, config errors,
corrupted shards, untrusted checkpoints, learning, kill -9 and resume, and torchrun DDP."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from cocoshard import NUM_CLASSES, cli, config
from cocoshard.folder_lock import folder_lock
from cocoshard.settings import resolve
from cocoshard.training.checkpoint import BEST, LAST, load_checkpoint
from cocoshard.training.model import build_model
from cocoshard.training.runlog import (
    CONFIG_FILE,
    TENSORBOARD_DIR,
    THRESHOLDS_FILE,
    RunLog,
)
from cocoshard.training.runtime import setup
from conftest import TINY, records

CHECKPOINT_KEYS = {
    "model",
    "ema",
    "optimizer",
    "scaler",
    "scheduler",
    "epoch",
    "step",
    "rng",
    "config",
    "classes",
    "thresholds",
    "metrics",
    "versions",
}


def train(*args: str) -> int:
    return cli.main(["train", *args])


@pytest.fixture(autouse=True)
def wide_console(monkeypatch: pytest.MonkeyPatch) -> None:
    """rich wraps at 80 columns off a terminal, even inside a path: give messages one line."""
    monkeypatch.setenv("COLUMNS", "1000")


def error_text(capsys: pytest.CaptureFixture) -> str:
    """What the CLI printed on stderr, on one line."""
    return " ".join(capsys.readouterr().err.split())


# ----------------------------------------------------------------------------------- a few steps


def test_a_few_steps_from_scratch_on_coco_sample(sample_shards_jpeg: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert (
        train(
            "--shards",
            str(sample_shards_jpeg),
            "--out",
            str(run),
            "--weights",
            "none",
            "--epochs",
            "2",
            "--max-steps",
            "3",
            *TINY,
        )
        == 0
    )
    (record,) = records(run)  # --max-steps 3 ends the run inside its first epoch
    assert record["step"] == 3 and record["epoch"] == 1
    assert 0 < record["data_wait_s"] < record["time_s"]  # the loader's share of the epoch (in-process here)
    assert (
        record["val"]["model"]["images"]
        == json.loads((sample_shards_jpeg / "manifest.json").read_text())["splits"]["val"]["samples"]
    )
    raw = torch.load(run / LAST, weights_only=True)  # the plain safe loader, nothing else
    assert CHECKPOINT_KEYS <= set(raw)
    assert raw["step"] == 3 and len(raw["thresholds"]) == NUM_CLASSES and len(raw["classes"]) == NUM_CLASSES
    assert raw["config"] == json.loads((run / CONFIG_FILE).read_text())
    assert raw["config"]["freeze_epochs"] == 0 and raw["config"]["backbone_lr_mult"] == 1.0  # from scratch
    assert load_checkpoint(run / BEST)["epoch"] == 1
    saved = json.loads((run / THRESHOLDS_FILE).read_text())
    assert len(saved["thresholds"]) == NUM_CLASSES and saved["weights"] in ("model", "ema")
    assert list((run / TENSORBOARD_DIR).glob("events.out.tfevents.*"))


def test_best_pt_holds_what_predict_needs_and_last_pt_what_resume_needs(
    sample_shards_jpeg: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    run = tmp_path / "run"
    assert (
        train(
            "--shards",
            str(sample_shards_jpeg),
            "--out",
            str(run),
            "--epochs",
            "1",
            "--weights",
            "none",
            *TINY,
        )
        == 0
    )
    best, last = (torch.load(run / name, weights_only=True) for name in (BEST, LAST))
    (record,) = records(run)
    selected = record["selected"]
    assert (
        best["weights"]
        == last["weights"]
        == selected
        == json.loads((run / THRESHOLDS_FILE).read_text())["weights"]
    )
    assert not {"optimizer", "scheduler", "scaler", "rng", "ema", "ema_updates"} & set(best)
    assert {"model", "thresholds", "config", "shards", "shards_split", "classes", "metrics"} <= set(best)
    assert CHECKPOINT_KEYS | {"weights", "shards"} <= set(last)
    assert all(torch.equal(best["model"][k], v) for k, v in last[selected].items())  # the selected weights
    assert best["thresholds"] == last["thresholds"] and best["shards_split"] == {
        "seed": 0,
        "val_fraction": 0.2,
    }
    assert (run / BEST).stat().st_size < (run / LAST).stat().st_size / 2
    said = " ".join(capsys.readouterr().err.split())
    assert said.count("leaving out 8 images (the last partial batch") == 1  # 88 images, batches of 16
    assert f"tensorboard --logdir {run / TENSORBOARD_DIR}" in said and "epoch 1/1 val server F1" in said
    assert "val model" in (run / "train.log").read_text()  # the full table is in the log, not on screen
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / TENSORBOARD_DIR))
    events.Reload()
    assert [e.step for e in events.Scalars("train/step_loss")] == [2, 4, 5]  # at --log-every 2 only
    assert not {"epoch", "epochs", "step", "best_epoch", "val/model/images"} & set(events.Tags()["scalars"])
    assert train("--resume", str(run / BEST), "--epochs", "2") == 2
    assert f"--resume {run / LAST}" in error_text(capsys)


def test_a_failed_start_leaves_no_run_folder(sample_shards_jpeg: Path, tmp_path: Path, capsys) -> None:
    """Refused after its folder was locked and its settings written: nothing of it is left."""
    weights = tmp_path / "tiny.pt"
    torch.save(build_model("cocoshard_tiny").state_dict(), weights)
    run = tmp_path / "run"
    flags = ["--shards", str(sample_shards_jpeg), "--epochs", "2", *TINY, "--model", "resnet18"]
    assert train(*flags, "--out", str(run), "--weights", str(weights)) == 2
    assert "weights of another architecture" in error_text(capsys) and not run.exists()
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "notes.txt").write_text("mine")
    assert train(*flags, "--out", str(kept), "--weights", str(weights)) == 2
    assert [p.name for p in kept.iterdir()] == ["notes.txt"]
    busy = tmp_path / "busy"  # another run holds it: refused, and its files are not this run's to clean
    with folder_lock(busy, "cocoshard train"):
        (busy / "config.json").write_text("{}")
        assert train(*flags, "--out", str(busy), "--weights", "none") == 2
        assert "is being written by another cocoshard command" in error_text(capsys)
        assert sorted(p.name for p in busy.iterdir()) == [".cocoshard.lock", "config.json"]


def test_local_weights_file_with_an_imagenet_head(sample_shards_jpeg: Path, tmp_path: Path) -> None:
    import torchvision

    weights = tmp_path / "resnet18-local.pth"
    torch.save(torchvision.models.resnet18(num_classes=1000).state_dict(), weights)
    run = tmp_path / "run"
    args = [
        *TINY,
        "--model",
        "resnet18",
        "--weights",
        str(weights),
        "--epochs",
        "2",
        "--no-ema",
        "--size",
        "32",
    ]
    assert train("--shards", str(sample_shards_jpeg), "--out", str(run), *args) == 0
    first, second = records(run)
    assert first["frozen_backbone"] and not second["frozen_backbone"]  # pretrained: one head-only epoch
    saved = load_checkpoint(run / LAST)
    assert saved["config"]["freeze_epochs"] == 1 and saved["config"]["backbone_lr_mult"] == 0.1
    assert saved["ema"] is None and saved["model"]["fc.weight"].shape == (NUM_CLASSES, 512)


@pytest.mark.parametrize("amp, channels_last", [(True, True), (False, False)])
def test_bf16_autocast_and_channels_last_reach_the_model(
    sample_shards_jpeg: Path, tmp_path: Path, amp: bool, channels_last: bool
) -> None:
    from cocoshard.training.train import OnlineMetrics, train_step
    from cocoshard.training.trainer import build_trainer, enter_phase

    cfg = resolve(
        config.TrainConfig,
        {
            "shards": str(sample_shards_jpeg),
            "out": str(tmp_path / "run"),
            "model": "cocoshard_tiny",
            "weights": "none",
            "device": "cpu",
            "size": 64,
            "batch_size": 8,
            "workers": 0,
            "amp": amp,
            "amp_dtype": "bf16",  # auto is float32 on a CPU without native bf16
            "channels_last": channels_last,
        },
    )
    tr = build_trainer(cfg, setup("cpu", amp=amp, amp_dtype="bf16"), RunLog(tmp_path / "run", enabled=False))
    enter_phase(tr, 0)
    seen: dict[str, Any] = {}

    def spy(module: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        seen.update(input_cl=inputs[0].is_contiguous(memory_format=torch.channels_last), output=output.dtype)

    tr.model.stem[0].register_forward_hook(spy)
    meter = OnlineMetrics(torch.device("cpu"))
    train_step(tr, next(iter(tr.train_loader)), meter)
    tr.train_loader.close()
    assert seen["output"] == (torch.bfloat16 if amp else torch.float32)
    assert seen["input_cl"] == channels_last
    assert all(p.dtype == torch.float32 for p in tr.model.parameters())  # master weights stay fp32
    assert tr.step == 1 and torch.isfinite(torch.tensor(meter.mean_loss()))


# ----------------------------------------------------------------------------------- refusals


def _missing_shard(shards: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "shards-missing"
    shutil.copytree(shards, copy)
    (copy / "train-000001.tar").unlink()
    return copy


@pytest.mark.parametrize(
    "case, expected",
    [
        ("unknown model", "unknown --model 'resnet81'"),
        ("no manifest", "pack the data first"),
        ("batch larger than split", "larger than the train split"),
        ("resume without a run", "--resume: there is no"),
        ("missing shard", "train-000001.tar"),
    ],
)
def test_config_errors_stop_before_any_work(
    sample_shards_jpeg: Path, tmp_path: Path, capsys: pytest.CaptureFixture, case: str, expected: str
) -> None:
    run = tmp_path / "run"
    shards = {
        "no manifest": str(tmp_path),
        "missing shard": str(_missing_shard(sample_shards_jpeg, tmp_path)),
    }
    extra = {
        "unknown model": ["--model", "resnet81"],
        "batch larger than split": ["--batch-size", "5000"],
        "resume without a run": ["--resume"],
    }
    args = [
        *TINY,
        "--weights",
        "none",
        "--shards",
        shards.get(case, str(sample_shards_jpeg)),
        "--out",
        str(run),
    ]
    assert train(*args, *extra.get(case, [])) == 2
    assert expected in error_text(capsys)
    assert not run.exists()  # nothing was written


def test_a_finished_run_is_not_overwritten(
    sample_shards_jpeg: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    run = tmp_path / "run"
    args = [
        "--shards",
        str(sample_shards_jpeg),
        "--out",
        str(run),
        "--weights",
        "none",
        "--max-steps",
        "1",
        *TINY,
    ]
    assert train(*args) == 0
    before = (run / LAST).read_bytes()
    assert train(*args) == 2
    assert "--resume" in error_text(capsys)
    assert (run / LAST).read_bytes() == before


def test_a_last_pt_that_would_run_code_is_refused(
    sample_shards_jpeg: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    run = tmp_path / "run"
    run.mkdir()
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"model": Payload(), "epoch": 1}, run / LAST)
    args = ["--shards", str(sample_shards_jpeg), "--out", str(run), "--weights", "none", "--resume", *TINY]
    assert train(*args) == 2
    err = error_text(capsys)
    assert "weights_only=True" in err and "system" in err and LAST in err
    assert not marker.exists()


def _flip_a_byte(shards: Path, tmp_path: Path) -> tuple[Path, str]:
    copy = tmp_path / "shards-damaged"
    shutil.copytree(shards, copy)
    victim = copy / "train-000002.tar"
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    return copy, victim.name


def test_a_damaged_shard_stops_training_with_its_name(
    sample_shards_jpeg: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    shards, name = _flip_a_byte(sample_shards_jpeg, tmp_path)
    args = [
        "--shards",
        str(shards),
        "--out",
        str(tmp_path / "run"),
        "--weights",
        "none",
        "--epochs",
        "1",
        *TINY,
    ]
    assert train(*args) == 2
    assert name in error_text(capsys)


def test_skip_bad_samples_skips_and_counts_them(sample_shards_jpeg: Path, tmp_path: Path) -> None:
    shards, _ = _flip_a_byte(sample_shards_jpeg, tmp_path)
    run = tmp_path / "run"
    args = [
        "--shards",
        str(shards),
        "--out",
        str(run),
        "--weights",
        "none",
        "--epochs",
        "1",
        "--skip-bad-samples",
        *TINY,
    ]
    assert train(*args) == 0
    (record,) = records(run)
    assert record["skipped_samples"] > 0


# ----------------------------------------------------------------------------------- learning


LEARN_IMAGES, LEARN_SIZE = 1500, 64


@pytest.fixture(scope="module")
def learnable_shards(tmp_path_factory: pytest.TempPathFactory, pack_dir: Any) -> Path:
    """A generated set big enough to learn from in a minute: 1,200 train and 300 val images at 64 px,
    balanced classes on plain backgrounds (the shapes and colours still have to be told apart)."""
    from cocoshard.config import SynthConfig
    from cocoshard.prepare.synth import write_synthetic

    root = tmp_path_factory.mktemp("learnable")
    write_synthetic(
        SynthConfig(
            out=str(root / "data"),
            train=LEARN_IMAGES,
            test=0,
            seed=1,
            size=LEARN_SIZE,
            workers=2,
            clutter=0.0,
            tail=0.0,
            min_scale=0.25,
        )
    )
    return pack_dir(root / "data", root / "shards", format="raw", size=LEARN_SIZE, shard_samples=256)


@pytest.mark.slow
def test_a_short_synthetic_run_learns(learnable_shards: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    args = [
        "--shards",
        str(learnable_shards),
        "--out",
        str(run),
        "--model",
        "cocoshard_tiny",
        "--weights",
        "none",
        "--device",
        "cpu",
        "--size",
        str(LEARN_SIZE),
        "--epochs",
        "10",
        "--batch-size",
        "64",
        "--lr",
        "3e-3",
        "--crop-scale-min",
        "0.6",
        "--workers",
        "0",
        "--log-every",
        "10",
        # from scratch on little data BCE learns faster than ASL, whose margin and focusing leave
        # the many easy negatives without gradient while the features are still random
        "--loss",
        "bce",
    ]
    assert train(*args) == 0
    history = records(run)
    best = next(r for r in history if r["epoch"] == history[-1]["best_epoch"])
    figures = best["val"][best["selected"]]
    manifest = json.loads((learnable_shards / "manifest.json").read_text())
    val = manifest["splits"]["val"]
    chance_map = sum(val["class_counts"]) / (NUM_CLASSES * val["samples"])  # AP of random scores ~ prevalence
    assert figures["map"] > 3 * chance_map
    assert figures["server_f1_tuned"] > 0.15  # predicting every class scores ~0.03-0.07
    assert figures["server_f1_tuned"] > figures["server_f1"]
    assert history[-1]["train"]["loss"] < history[0]["train"]["loss"]
    saved = json.loads((run / THRESHOLDS_FILE).read_text())
    assert saved["epoch"] == best["epoch"] and saved["server_f1_tuned"] == figures["server_f1_tuned"]


# ----------------------------------------------------------------------------------- torchrun


@pytest.mark.slow
def test_torchrun_two_gloo_processes_run_equal_steps(sample_shards_jpeg: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "cocoshard",
        "train",
        "--shards",
        str(sample_shards_jpeg),
        "--out",
        str(run),
        *TINY,
        "--batch-size",
        "8",
        "--weights",
        "none",
        "--epochs",
        "2",
        "--freeze-epochs",
        "1",
    ]
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=300, env={**os.environ, "COLUMNS": "200"}
    )
    assert done.returncode == 0, done.stderr[-3000:]
    manifest = json.loads((sample_shards_jpeg / "manifest.json").read_text())
    first, second = records(run)
    for record in (first, second):
        assert len(record["steps_per_rank"]) == 2 and len(set(record["steps_per_rank"])) == 1
        assert (
            record["val"]["model"]["images"] == manifest["splits"]["val"]["samples"]
        )  # every rank's share gathered
    assert second["step"] == 2 * first["step"] == 2 * first["steps_per_rank"][0]
    assert load_checkpoint(run / LAST)["epoch"] == 2


# ----------------------------------------------------------------------------------- one number


def test_the_tuned_f1_a_run_reports_is_that_of_what_predict_writes() -> None:
    """The epoch's tuned server F1 is computed on predict's output, --min-labels top-up included."""
    from cocoshard.pure import metrics
    from cocoshard.pure.decision import decide_labels
    from cocoshard.training.validation import score_validation
    from conftest import random_problem

    scores, labels = random_problem(5, images=150)
    scores[:30] *= 0.05  # images with no class over any tuned threshold: predict tops them up
    figures, thresholds = score_validation(scores, labels, loss=0.1, seed=0)
    written = metrics.server_f1(decide_labels(scores, thresholds, 1), labels).f1
    bare = metrics.server_f1(metrics.predictions_from_scores(scores, thresholds), labels).f1
    assert written != bare  # the case the issue met: the two differ
    assert figures["server_f1_tuned"] == written and figures["min_labels"] == 1
    assert figures["images"] == 150 and isinstance(figures["images"], int)
