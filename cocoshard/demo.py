"""The whole job on a fresh machine with no data: synth, pack, train, predict, evaluate, report.

    $ cocoshard demo                      # 3-4.5 minutes on a 2-core x86 CPU
    $ cocoshard demo --out demo --train 6000 --epochs 12

Measured with the defaults (8,000 generated images, 14 epochs at 96 px) on a 2-core AMD EPYC x86
CPU, no GPU: 193-260 s end to end (182-245 s of training; the machine's speed drifts from run to
run); server F1 0.73 on validation (thresholds tuned there) and 0.68 for the test submission
against the generated set's answers.

Every stage is the real command, called in-process with its resolved configuration, so what the
demo prints is what each command prints. A small ResNet (`cocoshard_tiny`) trains from scratch on
a generated data set in the challenge's exact layout (`cocoshard synth`); the data set also keeps
the test answers the challenge hides, so the demo scores its own submission too. Outputs, all
under `--out`:

    data/                      the generated challenge folder (images/..., labels/...)
    shards/                    its WebDataset shards and manifest.json
    run/                       the training run: config, metrics.jsonl, last.pt, best.pt, thresholds.json
    predictions.json           the submission for the test images, checked strictly
    val_predictions.json       predictions for the validation split (+ val_scores.npz)
    report/                    per-class figures, training curves and summary.md

A re-run replaces the demo's own outputs; a folder the demo did not write is refused.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.rule import Rule

from cocoshard import config, config_scoring
from cocoshard.atomic import atomic_write_text
from cocoshard.commands import run_command
from cocoshard.config import DemoConfig
from cocoshard.errors import UserError
from cocoshard.folder_lock import LOCK_FILE, folder_lock
from cocoshard.output_paths import check_output_folder
from cocoshard.settings import print_config, resolve, to_dict

MARKER = "demo.json"
DATA, SHARDS, RUN, REPORT = "data", "shards", "run", "report"
TEST_JSON, VAL_JSON, VAL_SCORES = "predictions.json", "val_predictions.json", "val_scores.npz"
VAL_METRICS, TEST_METRICS = "val_metrics.json", "test_metrics.json"
SYNTH_TEST_LABELS = Path("labels/test/test")  # answers the generated set keeps (the challenge hides its own)
TARGET_F1 = 0.5
STAGES = 6
# The generated set's difficulty for the demo: every class equally frequent, no clutter, objects a
# quarter to a half of the long side. At cocoshard synth's defaults (clutter, small objects, long
# tail) a small network trained from scratch needs far more than a CPU's few minutes.
DEMO_DIFFICULTY = {"tail": 0.0, "clutter": 0.0, "min_scale": 0.25, "max_scale": 0.5, "rotation": 0.0}


@dataclass
class Timings:
    """Seconds spent in each stage, in order."""

    stages: dict[str, float] = field(default_factory=dict)

    def run(self, console: Console, name: str, title: str, stage: Callable[[], Any]) -> Any:
        console.print(Rule(f"[bold]{len(self.stages) + 1}/{STAGES} {name}[/]: {title}"))
        start = time.perf_counter()
        result = stage()
        self.stages[name] = time.perf_counter() - start
        return result


def refuse_foreign(out: Path) -> None:
    """Refuse a non-empty folder the demo did not write (nothing in it is touched)."""
    check_output_folder(out, "--out")
    if (
        out.is_dir()
        and any(entry.name != LOCK_FILE for entry in out.iterdir())
        and not (out / MARKER).is_file()
    ):
        raise UserError(
            f"--out {out} is not empty and holds no {MARKER}: the demo only replaces its own outputs; "
            f"choose an empty or new folder"
        )


def prepare_folder(out: Path) -> None:
    """Clear the outputs of an earlier demo in `out`; refuse a non-empty folder the demo did not write."""
    refuse_foreign(out)
    for name in (RUN, REPORT, SHARDS):
        if (out / name).is_symlink():  # only the link goes: the demo never writes through one
            (out / name).unlink()
        shutil.rmtree(out / name, ignore_errors=True)
    for name in (TEST_JSON, VAL_JSON, VAL_SCORES, VAL_METRICS, TEST_METRICS):
        (out / name).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)


def _check(code: int, stage: str) -> None:
    if code != 0:
        raise UserError(f"the demo stopped: {stage} exited with code {code}")


# ----------------------------------------------------------------------------------- stage configs


def synth_config(cfg: DemoConfig, out: Path) -> config.SynthConfig:
    return resolve(
        config.SynthConfig,
        {
            "out": str(out / DATA),
            "train": cfg.train,
            "test": cfg.test,
            "seed": cfg.seed,
            "size": cfg.image_size,
            "workers": cfg.workers,
            **DEMO_DIFFICULTY,
        },
    )


def pack_config(cfg: DemoConfig, out: Path) -> config.PackConfig:
    # raw pixels: decoded once here, so training on a CPU spends nothing on JPEG decoding
    return resolve(
        config.PackConfig,
        {
            "root": str(out / DATA),
            "out": str(out / SHARDS),
            "format": "raw",
            "size": cfg.image_size,
            "seed": cfg.seed,
            "workers": cfg.workers,
        },
    )


def train_config(cfg: DemoConfig, out: Path) -> config.TrainConfig:
    return resolve(
        config.TrainConfig,
        {
            "shards": str(out / SHARDS),
            "out": str(out / RUN),
            "model": cfg.model,
            "weights": "none",
            "epochs": cfg.epochs,
            "batch_size": cfg.batch_size,
            "lr": cfg.lr,
            "size": cfg.size,
            "amp": cfg.amp,
            "loader": "resident",
            "device": cfg.device,
            "seed": cfg.seed,
            "workers": cfg.workers,
            "crop_scale_min": cfg.crop_scale_min,
            "loss": cfg.loss,
            "log_every": 10,
        },
    )


def predict_config(
    cfg: DemoConfig, out: Path, split: str, target: str, scores: str | None = None
) -> config_scoring.PredictConfig:
    return resolve(
        config_scoring.PredictConfig,
        {
            "checkpoint": str(out / RUN / "best.pt"),
            "shards": str(out / SHARDS),
            "split": split,
            "out": str(out / target),
            "scores": str(out / scores) if scores else None,
            "amp": cfg.amp,
            "device": cfg.device,
            "workers": cfg.workers,
            "batch_size": 2 * cfg.batch_size,
        },
    )


def evaluate_config(
    out: Path, predictions: str, labels: Path, metrics: str, report: bool
) -> config_scoring.EvaluateConfig:
    settings: dict[str, Any] = {
        "predictions": str(out / predictions),
        "labels": str(labels),
        "out": str(out / metrics),
    }
    if report:
        settings.update(scores=str(out / VAL_SCORES), report=str(out / REPORT), run=str(out / RUN))
    return resolve(config_scoring.EvaluateConfig, settings)


# ----------------------------------------------------------------------------------- the run


def run_stages(cfg: DemoConfig, out: Path, console: Console, timings: Timings) -> tuple[float, float | None]:
    """Every stage in order; returns the server F1 on validation and on the generated test answers."""
    stages = [
        ("synth", "a generated data set in the challenge layout", "synth", synth_config(cfg, out)),
        ("pack", "raw WebDataset shards", "pack", pack_config(cfg, out)),
        ("train", f"{cfg.model} from scratch", "train", train_config(cfg, out)),
        ("predict test", "the submission", "predict", predict_config(cfg, out, "test", TEST_JSON)),
        (
            "predict val",
            "scores for the evaluation",
            "predict",
            predict_config(cfg, out, "val", VAL_JSON, VAL_SCORES),
        ),
    ]
    for name, title, command, stage_cfg in stages:
        timings.run(
            console,
            name,
            title,
            lambda command=command, stage_cfg=stage_cfg: _check(run_command(command, stage_cfg), command),
        )

    def score() -> tuple[float, float | None]:
        _check(
            run_command("evaluate", evaluate_config(out, VAL_JSON, out / SHARDS, VAL_METRICS, report=True)),
            "evaluate",
        )
        val_f1 = json.loads((out / VAL_METRICS).read_text())["server_f1"]
        test_labels = out / DATA / SYNTH_TEST_LABELS
        if not test_labels.is_dir():
            return val_f1, None
        _check(
            run_command("evaluate", evaluate_config(out, TEST_JSON, test_labels, TEST_METRICS, report=False)),
            "evaluate",
        )
        return val_f1, json.loads((out / TEST_METRICS).read_text())["server_f1"]

    return timings.run(console, "evaluate", "validation split, report, and the generated test answers", score)


def _summary(out: Path, val_f1: float, test_f1: float | None, timings: Timings) -> list[str]:
    """The closing lines: the scores reached and where each output is (paths never wrapped)."""
    verdict = "[green]reached[/]" if val_f1 >= TARGET_F1 else "[yellow]below[/]"
    lines = [
        "[bold]cocoshard demo: done[/]",
        f"  val server F1   [bold]{val_f1:.4f}[/] ({verdict} the demo's target {TARGET_F1}; thresholds tuned "
        "on "
        f"these same images)",
    ]
    if test_f1 is not None:
        lines.append(
            f"  test server F1  {test_f1:.4f} (the submission scored against the answers the generated set "
            "keeps)"
        )
    for name, path in (
        ("submission", out / TEST_JSON),
        ("report", out / REPORT / "summary.md"),
        ("checkpoint", out / RUN / "best.pt"),
        ("training log", out / RUN / "metrics.jsonl"),
        ("shards", out / SHARDS),
    ):
        lines.append(f"  {name:<15} {path}")
    spent = ", ".join(f"{name} {seconds:.0f}s" for name, seconds in timings.stages.items())
    lines.append(f"  {'time':<15} {sum(timings.stages.values()):.0f}s ({spent})")
    return lines


def run(cfg: DemoConfig) -> int:
    """`cocoshard demo`: run every stage, then say where each output is and the score reached."""
    print_config(cfg)
    console = Console(stderr=True)
    out = Path(cfg.out)
    refuse_foreign(out)  # before the lock: a folder refused is left as it was
    with folder_lock(out, "cocoshard demo"):  # a second demo into the same folder is refused at once
        prepare_folder(out)
        atomic_write_text(out / MARKER, json.dumps({"status": "running", **to_dict(cfg)}, indent=1))
        timings = Timings()
        val_f1, test_f1 = run_stages(cfg, out, console, timings)
        atomic_write_text(
            out / MARKER,
            json.dumps(
                {
                    "status": "complete",
                    **to_dict(cfg),
                    "val_server_f1": val_f1,
                    "test_server_f1": test_f1,
                    "seconds": timings.stages,
                },
                indent=1,
            ),
        )
    console = Console()
    for line in _summary(out, val_f1, test_f1, timings):
        console.print(line, soft_wrap=True, highlight=False)
    return 0
