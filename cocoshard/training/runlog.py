"""What a training run writes and shows, on rank 0 only; other ranks get a silent `RunLog`.

    OUT/config.json       the TrainConfig the run uses, automatic settings resolved (what
                          `--config OUT/config.json` runs again)
    OUT/run.json          what else it resolved: device name, world size, versions, command line
    OUT/train.log         what the screen showed, and each epoch's full table (raw weights and EMA)
    OUT/metrics.jsonl     one JSON object per epoch (train and validation figures)
    OUT/thresholds.json   the best epoch's per-class thresholds, with the scores they gave
    OUT/val-scores.npz    the best epoch's validation scores, with keys, in the format of
                          `predict --scores` (what `cocoshard ensemble` and `thresholds` read)
    OUT/tensorboard/      per-step loss and learning rate, per-epoch figures and tables, when
                          tensorboard is installed (`tensorboard --logdir OUT/tensorboard`)

On screen, made to fit the terminal (80 columns included) and degrading as it narrows: the
settings once, a progress bar per epoch (steps, loss, images/s, the time left in the whole run,
the learning rate and the epoch's time where they fit), one line per epoch (its val server F1 and
which weights gave it, the loss, speed and time), and at the end a summary: what this invocation
trained, the best epoch, the files written and the next command, broken with ` \\` so that it
copies as one. Nothing on screen is cut with "…": parts are left out whole.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np
from rich.console import Console
from rich.text import Text

from cocoshard.atomic import WriteFailed, atomic_write_bytes, atomic_write_text
from cocoshard.config import MIN_LABELS
from cocoshard.folder_lock import LOCK_FILE
from cocoshard.input_files import parse_json
from cocoshard.settings import print_config, to_dict
from cocoshard.training.checkpoint import BEST, LAST
from cocoshard.training.screen import EpochProgress, command_lines, epoch_line, epoch_table, markdown_table

CONFIG_FILE = "config.json"
RUN_FILE = "run.json"
LOG_FILE = "train.log"
METRICS_LOG = "metrics.jsonl"
THRESHOLDS_FILE = "thresholds.json"
VAL_SCORES_FILE = "val-scores.npz"
TENSORBOARD_DIR = "tensorboard"
# every file and folder a run writes in its folder (what a failed start removes again)
RUN_OUTPUTS = (CONFIG_FILE, RUN_FILE, LOG_FILE, METRICS_LOG, THRESHOLDS_FILE, TENSORBOARD_DIR)
LOG_WIDTH = 100  # columns of train.log
# the files a finished run names, in this order
SUMMARY_FILES = (
    ("best checkpoint", BEST),
    ("last checkpoint", LAST),
    ("thresholds", THRESHOLDS_FILE),
    ("val scores", VAL_SCORES_FILE),
    ("metrics", METRICS_LOG),
    ("log", LOG_FILE),
    ("tensorboard", TENSORBOARD_DIR),
    ("settings", CONFIG_FILE),
)
# numbers of an epoch record that are bookkeeping, not curves: counters, settings, sizes
NOT_CURVES = frozenset({"epoch", "epochs", "step", "best_epoch", "images", "min_labels", "skipped_samples"})
# run facts shown elsewhere on screen: as settings (loader; amp and amp_dtype) or not at all
FACTS_NOT_SHOWN = frozenset({"loader", "amp", "versions"})


def remove_failed_start(out: Path, before: set[str] | None) -> None:
    """After a run that completed no epoch, remove what it created in its folder (settings, log,
    curves, lock; `before`: the folder's entries before it started, None when it did not exist) and
    the folder itself when it made it. Never touches a checkpoint: a folder holding one is left."""
    if (out / LAST).exists() or (out / BEST).exists() or not out.is_dir():
        return
    for name in (*RUN_OUTPUTS, LOCK_FILE):
        path = out / name
        if before is not None and name in before:
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        elif path.exists() or path.is_symlink():
            path.unlink()
    if before is None and not any(out.iterdir()):
        out.rmdir()


def _curves(record: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """The numbers of an epoch record worth a curve, nested keys joined by '/'."""
    out: dict[str, float] = {}
    for key, value in record.items():
        if isinstance(value, dict):
            out.update(_curves(value, f"{prefix}{key}/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and key not in NOT_CURVES:
            out[f"{prefix}{key}"] = float(value)
    return out


def _append_only(path: Path) -> Any:
    """`path` opened to append, never through a symbolic link (WriteFailed names it otherwise)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        reason = "it is a symbolic link" if exc.errno == errno.ELOOP else exc.strerror or str(exc)
        raise WriteFailed(f"cannot write {path}: {reason}") from None
    return os.fdopen(fd, "a", encoding="utf-8")


class RunLog:
    """Files and screen output of a run; every method is a no-op when `enabled` is False."""

    def __init__(self, out: str | os.PathLike, enabled: bool, console: Console | None = None) -> None:
        self.out = Path(out)
        self.enabled = enabled
        self.console = (console or Console(stderr=True)) if enabled else None
        self._tensorboard: Any = None
        self._file: IO[str] | None = None
        self._file_console: Console | None = None

    def _scalars(self) -> Any:
        """The TensorBoard writer, opened at first use (None when tensorboard is not installed)."""
        if self._tensorboard is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                self._tensorboard = False
            else:  # a link planted in the run folder would have the events written elsewhere
                folder = self.out / TENSORBOARD_DIR
                self._tensorboard = False if folder.is_symlink() else SummaryWriter(str(folder))
        return self._tensorboard or None

    def _show(self, renderable: Any, screen: bool = True, soft_wrap: bool = False) -> None:
        """On screen (unless `screen` is False) and in train.log once it is open."""
        if screen and self.console is not None:
            self.console.print(renderable, highlight=False, soft_wrap=soft_wrap)
        if self._file_console is not None:
            self._file_console.print(renderable, highlight=False, soft_wrap=soft_wrap)

    def note(self, message: str) -> None:
        """A message for the user, as it is (no markup), wrapped between words to fit the screen."""
        if self.enabled:
            self._show(Text(message))

    def line(self, text: str) -> None:
        """A line to copy (a path, a command): never broken by rich; one longer than the terminal
        wraps where the terminal wraps, and copies as one."""
        if self.enabled:
            self._show(Text(text), soft_wrap=True)

    def command(self, words: Sequence[str]) -> None:
        """A command to copy, broken into lines that fit the screen with ` \\` continuations."""
        if self.enabled:
            width = self.console.width if self.console is not None else 80
            for line in command_lines(words, width):
                self.line(line)

    def start(self, settings: Any, facts: dict[str, Any]) -> None:
        """Once every check passed: open train.log, show the settings once (and what else the run
        resolved, each once), save config.json and run.json."""
        if not self.enabled:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        self._file = _append_only(self.out / LOG_FILE)  # closed by close(); never through a link
        self._file_console = Console(
            file=self._file, width=LOG_WIDTH, force_terminal=False, color_system=None, highlight=False
        )
        shown = {key: value for key, value in facts.items() if key not in FACTS_NOT_SHOWN}
        print_config(settings, self.console, extra=shown)
        print_config(settings, self._file_console, extra=shown)
        atomic_write_text(
            self.out / CONFIG_FILE, json.dumps(to_dict(settings), indent=2, sort_keys=True) + "\n"
        )
        atomic_write_text(self.out / RUN_FILE, json.dumps(facts, indent=2, sort_keys=True) + "\n")

    def epoch_progress(
        self,
        description: str,
        steps: int,
        batch_images: int,
        run_left: Callable[[float], float] | None = None,
        start: int = 0,
    ) -> EpochProgress:
        """A progress bar for one epoch from its step `start` (silent off rank 0 and off a terminal)."""
        return EpochProgress(self.console, description, steps, batch_images, run_left, start)

    def log_step(self, step: int, loss: float, lr: float) -> None:
        """Per-step curves for TensorBoard: the loss since the last log step and the head's learning
        rate, at the log steps only (where the loop has already waited for the device)."""
        writer = self._scalars() if self.enabled else None
        if writer is not None:
            writer.add_scalar("train/step_loss", loss, step)
            writer.add_scalar("train/step_lr_head", lr, step)

    def keep_epochs_up_to(self, epoch: int) -> None:
        """Drop log lines of epochs after `epoch`: on resume they are run again (0: a fresh run)."""
        path = self.out / METRICS_LOG
        if not self.enabled or not path.is_file():
            return
        kept = []
        for line in path.read_text(errors="replace").splitlines():
            try:
                record = parse_json(line)
            except ValueError:  # InputError (too deep) included
                continue  # a line cut short by a killed run
            if isinstance(record, dict) and record.get("epoch", 0) <= epoch:
                kept.append(line)
        atomic_write_text(path, "".join(line + "\n" for line in kept))

    def record_epoch(self, record: dict[str, Any], columns: Sequence[str]) -> None:
        """Append one line to metrics.jsonl, log the curves and the table to TensorBoard, show the
        epoch's line on screen and its full table in train.log."""
        if not self.enabled:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        with _append_only(self.out / METRICS_LOG) as handle:
            handle.write(json.dumps(record, sort_keys=True) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        writer = self._scalars()
        if writer is not None:
            for key, value in _curves(record).items():
                writer.add_scalar(key, value, record["epoch"])
            writer.add_text("epochs", markdown_table(record, columns), record["epoch"])
            writer.flush()
        width = self.console.width if self.console is not None else LOG_WIDTH
        self._show(Text(epoch_line(record, width)))
        self._show(epoch_table(record, columns), screen=False)

    def summary(
        self,
        first_epoch: int,
        epoch: int,
        epochs: int,
        seconds: float,
        best_epoch: int,
        best_score: float,
        shards: str,
    ) -> None:
        """What a finished run says: what this invocation trained (epochs `first_epoch` + 1 to `epoch`)
        and in how long, the best epoch and its score, the files written, the commands to run next."""
        done = epoch - first_epoch
        which = f"epochs {first_epoch + 1}-{epoch}" if done > 1 else f"epoch {epoch}"
        resumed = f", resumed after epoch {first_epoch}" if first_epoch else ""
        plural = "s" * (done != 1)
        self.note(f"trained {done} epoch{plural} ({which} of {epochs}) in {seconds / 60:.1f} min{resumed}")
        self.note(
            f"best epoch {best_epoch}: val server F1 {best_score:.4f}, thresholds tuned on those same images"
        )
        for name, file in SUMMARY_FILES:
            if (self.out / file).exists():
                self.line(f"  {name:<17} {self.out / file}")
        if (self.out / TENSORBOARD_DIR).is_dir():
            self.note("curves and epoch tables:")
            self.command(["tensorboard", "--logdir", str(self.out / TENSORBOARD_DIR)])
        self.note("next: predict the test images and check the submission:")
        self.command(
            [
                "cocoshard",
                "predict",
                "--checkpoint",
                str(self.out / BEST),
                "--shards",
                shards,
                "--out",
                "predictions.json",
            ]
        )
        self.command(["cocoshard", "evaluate", "--predictions", "predictions.json", "--images", shards])

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
        trained_on: str = "",
        trained_split: dict[str, Any] | None = None,
    ) -> None:
        """The best epoch's validation scores with their keys, tied to `checkpoint` by its sha256;
        `trained_on`/`trained_split`: the identity of the shards the model trained on and how their
        split was drawn (what evaluate and thresholds compare with the labels' shards).

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
            "min_labels": np.asarray(MIN_LABELS),  # predict's default: what the figures were made with
            "tta": np.asarray(False),
            "checkpoint": np.asarray(str(checkpoint)),
            "checkpoint_sha256": np.asarray(digest.hexdigest()),
            "source": np.asarray(source),
            "split": np.asarray(split),
            "unreadable": np.asarray([], dtype=str),
            "trained_on": np.asarray(trained_on),
            "trained_split": np.asarray(json.dumps(trained_split or {})),
            "other_shards": np.asarray(""),
        }
        buffer = io.BytesIO()
        np.savez_compressed(buffer, allow_pickle=False, **arrays)
        atomic_write_bytes(self.out / VAL_SCORES_FILE, buffer.getvalue())

    def close(self) -> None:
        """Flush and close the TensorBoard writer and train.log."""
        if self._tensorboard:
            self._tensorboard.close()
        self._tensorboard = None
        if self._file is not None:
            self._file.close()
        self._file, self._file_console = None, None
