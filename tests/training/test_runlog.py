"""What a run shows: it fits 80 columns (parts left out whole, never cut with "…"), says each
setting once, one line per epoch on screen, and a closing summary of this invocation's work."""

from __future__ import annotations

import io
import re
from pathlib import Path

from rich.console import Console

from cocoshard import config
from cocoshard.settings import resolve
from cocoshard.training.runlog import RunLog
from cocoshard.training.screen import EpochProgress, command_lines, epoch_line, fit_parts

ANSI = re.compile(r"\x1b\[[0-9;?]*[a-zA-Z]")


def terminal(width: int = 80) -> tuple[Console, io.StringIO]:
    """A console that behaves as a terminal of `width` columns, recording what it writes."""
    out = io.StringIO()
    return Console(file=out, width=width, force_terminal=True, color_system="standard"), out


def shown_lines(out: io.StringIO) -> list[str]:
    """What reached the screen, line by line (redraws split at carriage returns), styles removed."""
    text = ANSI.sub("", out.getvalue())
    return [line for chunk in text.split("\n") for line in chunk.split("\r")]


def record(**changes) -> dict:
    val = {"loss": 0.07, "server_f1": 0.31, "server_f1_tuned": 0.4321, "heldout_gain": 0.01, "macro_f1": 0.2}
    return {
        "epoch": 12,
        "epochs": 12,
        "selected": "ema",
        "best": True,
        "val": {"model": dict(val), "ema": dict(val)},
        "train": {"loss": 0.0712, "server_f1": 0.3},
        "images_per_s": 12345.6,
        "time_s": 123.4,
        "data_wait_s": 4.9,
        **changes,
    }


def test_parts_and_commands_fit_whole() -> None:
    assert fit_parts(["epoch 1/2", "loss 0.1", "a long part that does not fit"], 20) == "epoch 1/2  loss 0.1"
    words = ["cocoshard", "predict", "--checkpoint", "runs/a-long-run-name/best.pt", "--shards", "shards"]
    words += ["--split", "test", "--out", "predictions.json"]
    lines = command_lines(words, width=60)
    assert all(len(line) <= 60 for line in lines) and len(lines) > 1
    assert all(line.endswith(" \\") for line in lines[:-1])
    assert " ".join(line.rstrip("\\").strip() for line in lines).split() == words  # runs as one command


def test_the_epoch_line_and_the_progress_bar_fit_80_columns() -> None:
    line = epoch_line(record(), 80)
    assert len(line) < 80 and line.startswith("epoch 12/12  val server F1 0.4321 (EMA) ★ best  loss 0.0712")
    console, out = terminal(80)
    progress = EpochProgress(console, "epoch 12/12", 4000, 256, run_left=lambda per_step: 3 * 3600.0)
    for step in (20, 2000, 4000):
        progress.update(step, 0.07123, 1e-3)
    progress.close()
    shown = shown_lines(out)
    assert all(len(line) <= 80 for line in shown) and "…" not in out.getvalue()
    assert any("4000/4000  loss 0.0712  run 3:00:" in line for line in shown), shown


def test_settings_are_shown_once_each_at_80_columns(tmp_path: Path) -> None:
    console, out = terminal(80)
    log = RunLog(tmp_path / "run", enabled=True, console=console)
    cfg = resolve(
        config.TrainConfig, {"shards": "/data/a-folder-with-a-long-name/shards", "amp_dtype": "bf16"}
    )
    log.start(cfg, {"device_name": "CPU", "loader": "stream", "amp": "bfloat16", "command": "x " * 60})
    log.close()
    shown = shown_lines(out)
    assert all(len(line) <= 80 for line in shown)
    names = [line.split()[0] for line in shown if line.strip()]
    assert names.count("loader") == 1 and names.count("amp") == 1 and "bfloat16" not in out.getvalue()
    assert (tmp_path / "run" / "train.log").read_text().count("loader") == 1


def test_the_summary_counts_this_invocation_and_names_every_file(tmp_path: Path) -> None:
    console, out = terminal(80)
    run = tmp_path / "run"
    for name in ("best.pt", "metrics.jsonl", "train.log"):
        (run / name).parent.mkdir(exist_ok=True)
        (run / name).write_text("")
    (run / "tensorboard").mkdir()
    log = RunLog(run, enabled=True, console=console)
    log.summary(8, 10, 10, 12.0, best_epoch=9, best_score=0.5, shards="shards")
    text = ANSI.sub("", out.getvalue()).replace(" \\\n      ", " ")  # commands joined as a shell reads them
    assert "trained 2 epochs (epochs 9-10 of 10) in 0.2 min, resumed after epoch 8" in text
    assert f"  metrics           {run / 'metrics.jsonl'}" in text  # the name and the path apart
    assert f"tensorboard --logdir {run / 'tensorboard'}" in text
