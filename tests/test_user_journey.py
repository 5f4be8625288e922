"""The tool as its users meet it, through the CLI in a subprocess: what they see and what is kept.

Install honesty (`info` probes the PIL really imported), resume that remembers the run, resolved
settings and a closing summary, Ctrl-C and SIGTERM saying how to go on, flag habits, CPU threads,
a predict that names every bad image and can still write a complete submission, an evaluate that
misses no image, scores that carry what made them, re-thresholding, and a report that says what it
evaluated. Numbers refer to the points of the UX round (see `docs/reliability.md` for the faults).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from cocoshard import cli
from cocoshard.training.runlog import CONFIG_FILE, RUN_FILE
from conftest import FROM_SCRATCH, TINY, cocoshard, ok, records, refused

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run(sample_shards_jpeg: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A finished 2-epoch run on coco-sample, and what it printed."""
    out = tmp_path_factory.mktemp("journey") / "run"
    text = ok(
        cocoshard(
            "train", "--shards", sample_shards_jpeg, "--out", out, "--epochs", "2", *TINY, *FROM_SCRATCH
        )
    )
    return out, text


@pytest.fixture(scope="module")
def val_scores(run, sample_shards_jpeg, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("scores")
    ok(
        cocoshard(
            "predict",
            "--checkpoint",
            run[0] / "best.pt",
            "--shards",
            sample_shards_jpeg,
            "--split",
            "val",
            "--out",
            folder / "val.json",
            "--scores",
            folder / "val-scores.npz",
            "--device",
            "cpu",
        )
    )
    return folder


# ------------------------------------------------------------------------------------- 1. install


def test_1_info_reports_the_pil_really_imported():
    text = ok(cocoshard("info"))
    probe = subprocess.run(
        [sys.executable, "-c", "import PIL; print(PIL.__version__)"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert f"PIL {probe}" in text or probe in text
    assert ("SIMD resize" in text) or ("stock" in text.lower()) or ("pillow-simd" in text), text


# ------------------------------------------------------------------------------------- 4-6. runs


def test_5_the_printed_and_saved_settings_are_the_resolved_ones(run):
    out, text = run
    config = json.loads((out / CONFIG_FILE).read_text())
    facts = json.loads((out / RUN_FILE).read_text())
    assert config["device"] == "cpu" and isinstance(config["workers"], int)
    # AMP resolved: a dtype, or auto left to the next machine where this CPU computes no bf16
    assert config["amp_dtype"] == {"bfloat16": "bf16", "float16": "fp16"}.get(facts["amp"], "auto")
    assert {"device_name", "world_size", "loader", "amp", "command", "versions"} <= set(facts), facts
    assert {"cocoshard", "torch", "torchvision", "PIL"} <= set(facts["versions"]), facts["versions"]
    assert "cpu_threads" in facts and "cpu_threads" in text  # 8: the thread choice is printed
    assert "lr" in text  # the learning rate shown as training runs
    assert "best epoch" in text and "cocoshard predict --checkpoint" in text and str(out / "best.pt") in text


def test_4_resume_takes_the_run_from_its_folder(run, sample_shards_jpeg, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run[0], copy)
    text = ok(cocoshard("train", "--out", copy, "--resume", "--epochs", "3"))  # no --model, --shards, ...
    assert "cocoshard_tiny" in text and "maxvit" not in text
    epochs = [json.loads(line)["epoch"] for line in (copy / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2, 3]
    refused(cocoshard("train", "--resume", copy / "last.pt", "--lr", "0.5"), "--lr")
    refused(cocoshard("train", "--resume", copy / "last.pt", "--model", "resnet18"), "--model")


def test_6_sigterm_says_which_epoch_is_kept_and_how_to_resume(sample_shards_jpeg, tmp_path):
    out = tmp_path / "run"
    train = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "cocoshard",
            "train",
            "--shards",
            str(sample_shards_jpeg),
            "--out",
            str(out),
            "--epochs",
            "40",
            *TINY,
            *FROM_SCRATCH,
        ],
        cwd=REPO,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "COLUMNS": "1000"},
    )
    deadline = time.monotonic() + 120
    while not (out / "last.pt").exists():
        assert train.poll() is None and time.monotonic() < deadline
        time.sleep(0.2)
    train.send_signal(signal.SIGTERM)
    stdout, stderr = train.communicate(timeout=60)
    text = " ".join((stdout + stderr).split())
    assert train.returncode == 128 + signal.SIGTERM, text[-2000:]
    assert "Traceback" not in text
    assert f"{out / 'last.pt'} holds epoch" in text and f"cocoshard train --out {out} --resume" in text


# ------------------------------------------------------------------------------------- 7. flags


def test_7_flag_habits(sample_shards_jpeg, coco_sample, tmp_path):
    unknown = cocoshard("train", "--shards", sample_shards_jpeg, "--no-such-flag")
    refused(unknown, "usage: cocoshard train", "--no-such-flag")
    refused(
        cocoshard(
            "train",
            "--shards",
            sample_shards_jpeg,
            "--out",
            tmp_path / "r",
            "--ep",
            "1",
            *TINY,
            *FROM_SCRATCH,
        ),
        "--ep",
    )
    images = coco_sample / "images" / "train-resized" / "train-resized"
    hint = cocoshard("train", "--shards", images, "--out", tmp_path / "r2", *TINY, *FROM_SCRATCH)
    refused(hint, "cocoshard pack")
    assert f"--out {images}" not in hint.text  # never suggests packing into the image folder


# ------------------------------------------------------------------------------------- 9. predict


def test_9_predict_names_every_bad_image_then_writes_a_complete_submission_on_request(
    run, coco_sample, tmp_path
):
    images = tmp_path / "images"
    shutil.copytree(coco_sample / "images" / "test-resized" / "test-resized", images)
    (images / "garbage.jpg").write_bytes(b"this is not an image")
    (images / "empty.jpg").write_bytes(b"")
    out = tmp_path / "predictions.json"
    done = cocoshard(
        "predict", "--checkpoint", run[0] / "best.pt", "--images", images, "--out", out, "--device", "cpu"
    )
    refused(done, "garbage.jpg", "empty.jpg", "--unreadable prior")
    assert "BytesIO" not in done.text and not out.exists()
    ok(
        cocoshard(
            "predict",
            "--checkpoint",
            run[0] / "best.pt",
            "--images",
            images,
            "--out",
            out,
            "--device",
            "cpu",
            "--unreadable",
            "prior",
        )
    )
    submission = json.loads(out.read_text())
    assert (
        len(submission) == len(list(images.glob("*.jpg"))) and submission["garbage"] and submission["empty"]
    )


# ------------------------------------------------------------------------------------- 10-12. evaluate


def test_10_evaluate_misses_no_image(val_scores, sample_shards_jpeg, tmp_path):
    predictions = json.loads((val_scores / "val.json").read_text())
    dropped = sorted(predictions)[0]
    del predictions[dropped]
    partial = tmp_path / "partial.json"
    partial.write_text(json.dumps(predictions))
    refused(cocoshard("evaluate", "--predictions", partial, "--labels", sample_shards_jpeg), dropped)
    text = ok(cocoshard("evaluate", "--predictions", partial, "--labels", sample_shards_jpeg, "--subset"))
    assert "subset" in text
    format_only = ok(cocoshard("evaluate", "--predictions", partial))
    assert "which images it must cover is not known without --images DIR" in format_only


def test_11_scores_from_another_split_and_bad_options_are_refused(
    val_scores, run, sample_shards_jpeg, tmp_path
):
    test_predictions = tmp_path / "test.json"
    ok(
        cocoshard(
            "predict",
            "--checkpoint",
            run[0] / "best.pt",
            "--shards",
            sample_shards_jpeg,
            "--split",
            "test",
            "--out",
            test_predictions,
            "--scores",
            tmp_path / "test-scores.npz",
            "--device",
            "cpu",
        )
    )
    refused(
        cocoshard(
            "evaluate",
            "--predictions",
            val_scores / "val.json",
            "--labels",
            sample_shards_jpeg,
            "--scores",
            tmp_path / "test-scores.npz",
        ),
        "test-scores.npz",
    )
    refused(
        cocoshard(
            "evaluate",
            "--predictions",
            val_scores / "val.json",
            "--labels",
            sample_shards_jpeg,
            "--report",
            tmp_path / "report",
            "--run",
            tmp_path / "nowhere",
        ),
        "nowhere",
    )
    refused(
        cocoshard(
            "predict",
            "--checkpoint",
            run[0] / "best.pt",
            "--shards",
            sample_shards_jpeg,
            "--out",
            tmp_path / "p.json",
            "--min-labels",
            "81",
        ),
        "--min-labels",
    )


def test_12_thresholds_retuned_from_saved_scores_feed_predict(val_scores, run, sample_shards_jpeg, tmp_path):
    thresholds = tmp_path / "thresholds.json"
    text = ok(
        cocoshard(
            "thresholds",
            "--scores",
            val_scores / "val-scores.npz",
            "--labels",
            sample_shards_jpeg,
            "--out",
            thresholds,
        )
    )
    saved = json.loads(thresholds.read_text())
    values = np.asarray(saved["thresholds"], dtype=float)
    assert values.shape == (80,) and np.all((values >= 0) & (values <= 1))
    assert "default" in text  # which classes keep the default threshold, and why
    out = tmp_path / "p.json"
    ok(
        cocoshard(
            "predict",
            "--checkpoint",
            run[0] / "best.pt",
            "--shards",
            sample_shards_jpeg,
            "--split",
            "val",
            "--out",
            out,
            "--thresholds",
            thresholds,
            "--device",
            "cpu",
        )
    )
    assert len(json.loads(out.read_text())) == len(json.loads((val_scores / "val.json").read_text()))


# ------------------------------------------------------------------------------------- 13. report


def test_13_the_report_says_what_was_evaluated(val_scores, run, sample_shards_jpeg, tmp_path):
    report = tmp_path / "report"
    ok(
        cocoshard(
            "evaluate",
            "--predictions",
            val_scores / "val.json",
            "--labels",
            sample_shards_jpeg,
            "--scores",
            val_scores / "val-scores.npz",
            "--per-class",
            "--report",
            report,
            "--run",
            run[0],
        )
    )
    summary = (report / "summary.md").read_text()
    assert "cocoshard_tiny" in summary and "best.pt" in summary and "epoch" in summary
    assert {p.name for p in report.glob("*.png")} >= {"curves.png", "per_class_f1.png"}


# ------------------------------------------------------------------------------------- the student's path

ANSI = re.compile(r"\x1b\[[0-9;?]*[a-zA-Z]")
BOX_ONLY = re.compile(r"^[\s━─┏┓┗┛┃┡┩┳┻╇│└┘┴┼╸╺-]+$")


def _at_80_columns(capsys: pytest.CaptureFixture, *args: object) -> tuple[int, list[str], str]:
    """`cocoshard ARGS` in this process on an 80-column terminal: (exit code, the screen's lines
    with redraws split and styles removed, stdout and stderr as one folded text)."""
    code = cli.main([str(arg) for arg in args])
    captured = capsys.readouterr()
    screen = ANSI.sub("", captured.err)
    lines = [line for chunk in screen.split("\n") for line in chunk.split("\r")]
    return code, lines, " ".join((ANSI.sub("", captured.out) + screen).split())


def test_a_new_users_path_at_80_columns_meets_no_trap(coco_sample, tmp_path, monkeypatch, capsys):
    """Pack, train, resume, predict, evaluate, thresholds, report, TensorBoard, re-pack, as a new user
    on the real photos at 80 columns (issue 20's traps: each one a check here)."""
    monkeypatch.chdir(tmp_path)  # relative paths, as typed
    monkeypatch.setenv("COLUMNS", "80")
    monkeypatch.setenv("FORCE_COLOR", "1")  # a terminal, as rich sees it
    pack = ["pack", "--root", coco_sample, "--out", "shards", "--shard-samples", "16", "--workers", "2"]
    assert _at_80_columns(capsys, *pack)[0] == 0
    tiny = [*TINY, *FROM_SCRATCH, "--threads", "1"]
    code, lines, text = _at_80_columns(
        capsys, "train", "--shards", "shards", "--out", "runs/r", "--epochs", "2", *tiny
    )
    assert code == 0 and "…" not in text
    assert all(len(line) <= 80 for line in lines), max(lines, key=len)
    assert not [line for line in lines if line.strip() and BOX_ONLY.match(line)]  # no line of dashes
    assert sum(1 for line in lines if line.split()[:1] == ["loader"]) == 1 and "'bfloat16'" not in text
    assert text.count("leaving out 8 images") == 1 and "epoch 2/2 val server F1" in text
    assert "metrics runs/r/metrics.jsonl" in text and "tensorboard --logdir runs/r/tensorboard" in text
    assert "cocoshard predict --checkpoint runs/r/best.pt \\ --shards shards" in text or (
        "cocoshard predict --checkpoint runs/r/best.pt --shards shards" in text
    )
    code, _, text = _at_80_columns(capsys, "train", "--out", "runs/r", "--resume", "--epochs", "3")
    assert code == 0 and "trained 1 epoch (epoch 3 of 3)" in text and "resumed after epoch 2" in text
    best = max(records(Path("runs/r")), key=lambda r: (r["best"], r["epoch"]) if r["best"] else (0, 0))
    reported = best["val"][best["selected"]]["server_f1_tuned"]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    curves = EventAccumulator("runs/r/tensorboard")
    curves.Reload()
    assert len(curves.Scalars("train/step_loss")) == 9 and "epoch" not in curves.Tags()["scalars"]

    predict = ["predict", "--checkpoint", "runs/r/best.pt", "--shards", "shards", "--device", "cpu"]
    val = [*predict, "--split", "val", "--out", "val.json", "--scores", "val.npz", "--batch-size", "16"]
    code, _, text = _at_80_columns(capsys, *val)
    assert (
        code == 0
        and f"best.pt: epoch {best['epoch']} of " in text
        and f"val server F1 {reported:.4f}" in text
    )
    evaluate = ["evaluate", "--predictions", "val.json", "--labels", "shards", "--scores", "val.npz"]
    assert (
        _at_80_columns(capsys, *evaluate, "--out", "m.json", "--report", "report", "--run", "runs/r")[0] == 0
    )
    scored = json.loads(Path("m.json").read_text())["server_f1"]
    assert scored == pytest.approx(reported, abs=1e-9)  # one number: the run's is the file's
    assert "cocoshard_tiny" in Path("report/summary.md").read_text()
    code, _, text = _at_80_columns(capsys, "thresholds", "--scores", "val.npz", "--labels", "shards")
    assert code == 0 and f"with the scores' own thresholds {reported:.4f}" in text

    assert _at_80_columns(capsys, *predict, "--out", "test.json")[0] == 0  # forgot --split val
    code, _, text = _at_80_columns(capsys, "evaluate", "--predictions", "test.json", "--labels", "shards")
    assert code == 2 and "holds the test split's images" in text and "--split val" in text
    assert _at_80_columns(capsys, *pack, "--seed", "1")[0] == 0  # re-packed over the same folder
    code, _, text = _at_80_columns(capsys, *val)
    assert code == 2 and "split seed changed (packed with --seed 0 then, --seed 1 now)" in text
