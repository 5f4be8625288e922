"""What a training run writes and shows, on rank 0 only; other ranks get a silent `RunLog`.

    OUT/config.json       the TrainConfig the run uses, automatic settings resolved (what
                          `--config OUT/config.json` runs again)
    OUT/run.json          what else it resolved: device name, world size, versions, command line
    OUT/metrics.jsonl     one JSON object per epoch (train and validation figures)
    OUT/thresholds.json   the best epoch's per-class thresholds, with the scores they gave
    OUT/val-scores.npz    the best epoch's validation scores, with keys, in the format of
                          `predict --scores` (what `cocoshard ensemble` and `thresholds` read)
    OUT/tensorboard/      the same figures as TensorBoard scalars, when tensorboard is installed

On screen: a rich progress bar per epoch (steps, loss, learning rate, images/s, elapsed, the time
left in the epoch and in the whole run), a rich table per epoch comparing the raw weights with
their EMA, and a summary at the end: time, best epoch and its scores, files written, next command.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from cocoshard.atomic import atomic_write_bytes, atomic_write_text

CONFIG_FILE = "config.json"
RUN_FILE = "run.json"
METRICS_LOG = "metrics.jsonl"
THRESHOLDS_FILE = "thresholds.json"
VAL_SCORES_FILE = "val-scores.npz"
TENSORBOARD_DIR = "tensorboard"
# rows of the epoch table: (record key, label)
TABLE_ROWS = (
    ("loss", "loss"),
    ("server_f1", "server F1 @0.5"),
    ("server_f1_tuned", "server F1 tuned"),
    ("heldout_gain", "tuning gain (held-out)"),
    ("macro_f1", "macro F1"),
    ("micro_f1", "micro F1"),
    ("map", "mAP"),
)


def _flat_numbers(record: dict[str, Any], prefix: str = "") -> dict[str, float]:
    out: dict[str, float] = {}
    for key, value in record.items():
        if isinstance(value, dict):
            out.update(_flat_numbers(value, f"{prefix}{key}/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[f"{prefix}{key}"] = float(value)
    return out


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return (
        f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
        if seconds >= 3600
        else f"{seconds // 60}:{seconds % 60:02d}"
    )


class EpochProgress:
    """A progress bar for one epoch; `update` is called only at log steps (it follows a host sync).

    `run_left(seconds_per_step)` says how long the steps after this epoch will take (the epochs to
    come, validation included), so the bar can show the time left in the whole run."""

    def __init__(
        self,
        console: Console | None,
        description: str,
        steps: int,
        batch_images: int,
        run_left: Any = None,
    ) -> None:
        self.batch_images, self.steps = batch_images, steps
        self.run_left = run_left or (lambda per_step: 0.0)
        self.started = time.perf_counter()
        self.progress: Progress | None = None
        if console is not None:
            self.progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]}"),
                TextColumn("lr {task.fields[lr]}"),
                TextColumn("{task.fields[rate]} img/s"),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                TextColumn("run {task.fields[run]} left"),
                console=console,
            )
            self.task = self.progress.add_task(description, total=steps, loss="-", lr="-", rate="-", run="-")
            self.progress.start()

    def update(self, step: int, loss: float, lr: float) -> None:
        """Show `step` steps done in this epoch at a mean loss of `loss`, the head's learning rate `lr`."""
        if self.progress is None:
            return
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        per_step = elapsed / max(step, 1)
        left = (self.steps - step) * per_step + self.run_left(per_step)
        self.progress.update(
            self.task,
            completed=step,
            loss=f"{loss:.4f}",
            lr=f"{lr:.2e}",
            rate=f"{step * self.batch_images / elapsed:,.0f}",
            run=_duration(left),
        )

    def close(self) -> None:
        """Stop redrawing the bar (it stays on screen)."""
        if self.progress is not None:
            self.progress.stop()


class RunLog:
    """Files and screen output of a run; every method is a no-op when `enabled` is False."""

    def __init__(self, out: str | os.PathLike, enabled: bool, console: Console | None = None) -> None:
        self.out = Path(out)
        self.enabled = enabled
        self.console = (console or Console(stderr=True)) if enabled else None
        self._tensorboard: Any = None

    def _scalars(self) -> Any:
        """The TensorBoard writer, opened at the first epoch (None when tensorboard is not installed)."""
        if self._tensorboard is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                self._tensorboard = False
            else:
                self._tensorboard = SummaryWriter(str(self.out / TENSORBOARD_DIR))
        return self._tensorboard or None

    def note(self, message: str) -> None:
        """One line for the user."""
        if self.console is not None:
            self.console.print(message, highlight=False)

    def save_config(self, settings: dict[str, Any], facts: dict[str, Any]) -> None:
        """The settings the run uses (config.json) and what else it resolved (run.json)."""
        if self.enabled:
            atomic_write_text(self.out / CONFIG_FILE, json.dumps(settings, indent=2, sort_keys=True) + "\n")
            atomic_write_text(self.out / RUN_FILE, json.dumps(facts, indent=2, sort_keys=True) + "\n")

    def epoch_progress(
        self, description: str, steps: int, batch_images: int, run_left: Any = None
    ) -> EpochProgress:
        """A progress bar for one epoch (silent off rank 0)."""
        return EpochProgress(self.console, description, steps, batch_images, run_left)

    def keep_epochs_up_to(self, epoch: int) -> None:
        """Drop log lines of epochs after `epoch`: on resume they are run again (0: a fresh run)."""
        path = self.out / METRICS_LOG
        if not self.enabled or not path.is_file():
            return
        kept = []
        for line in path.read_text(errors="replace").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue  # a line cut short by a killed run
            if isinstance(record, dict) and record.get("epoch", 0) <= epoch:
                kept.append(line)
        atomic_write_text(path, "".join(line + "\n" for line in kept))

    def record_epoch(self, record: dict[str, Any], columns: Sequence[str]) -> None:
        """Append one line to metrics.jsonl, log the scalars, print the epoch table."""
        if not self.enabled:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        with open(self.out / METRICS_LOG, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record, sort_keys=True) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        writer = self._scalars()
        if writer is not None:
            for key, value in _flat_numbers(record).items():
                writer.add_scalar(key, value, record["epoch"])
            writer.flush()
        self._print_table(record, columns)

    def _print_table(self, record: dict[str, Any], columns: Sequence[str]) -> None:
        title = (
            f"epoch {record['epoch']}/{record['epochs']} · {record['images_per_s']:,.0f} img/s · "
            f"{record['time_s']:.1f} s"
        )
        if "data_wait_s" in record and record["time_s"] > 0:
            title += f" · {record['data_wait_s'] / record['time_s']:.0%} waiting for data"
        table = Table(title=title, title_justify="left")
        table.add_column("")
        table.add_column("train", justify="right")
        for column in columns:
            table.add_column(f"val {column}{' ★' if column == record['selected'] else ''}", justify="right")
        for key, label in TABLE_ROWS:
            train = record["train"].get(key)
            cells = [
                f"{record['val'][column][key]:.4f}" if key in record["val"][column] else ""
                for column in columns
            ]
            table.add_row(label, "" if train is None else f"{train:.4f}", *cells)
        self.console.print(table)

    def save_thresholds(self, payload: dict[str, Any]) -> None:
        """The best epoch's per-class thresholds (and the scores they gave) as JSON."""
        if self.enabled:
            atomic_write_text(self.out / THRESHOLDS_FILE, json.dumps(payload, indent=2) + "\n")

    def save_val_scores(
        self,
        keys: Sequence[str],
        scores: np.ndarray,
        thresholds: np.ndarray,
        classes: Sequence[str],
        checkpoint: Path,
        source: str,
        split: str,
    ) -> None:
        """The best epoch's validation scores with their keys, tied to `checkpoint` by its sha256.

        The arrays are those of `cocoshard.scoring.scores.save_scores` (`predict --scores`), the
        format `thresholds`, `evaluate --scores` and `ensemble` read (the scoring layer is above
        this one: `tests/scoring/test_scores.py` holds the two writers to one format)."""
        if not self.enabled:
            return
        digest = hashlib.sha256()
        with open(checkpoint, "rb") as handle:
            while chunk := handle.read(1 << 22):
                digest.update(chunk)
        arrays = {
            "keys": np.asarray(list(keys), dtype=str),
            "scores": np.asarray(scores, dtype=np.float32),
            "thresholds": np.asarray(thresholds, dtype=np.float64),
            "classes": np.asarray(list(classes), dtype=str),
            "min_labels": np.asarray(1),
            "tta": np.asarray(False),
            "checkpoint": np.asarray(str(checkpoint)),
            "checkpoint_sha256": np.asarray(digest.hexdigest()),
            "source": np.asarray(source),
            "split": np.asarray(split),
            "unreadable": np.asarray([], dtype=str),
        }
        buffer = io.BytesIO()
        np.savez_compressed(buffer, **arrays)
        atomic_write_bytes(self.out / VAL_SCORES_FILE, buffer.getvalue())

    def close(self) -> None:
        """Flush and close the TensorBoard writer."""
        if self._tensorboard:
            self._tensorboard.close()
