"""How a run's epochs look: made to fit the terminal (80 columns included), parts left out whole.

    progress = EpochProgress(console, "epoch 3/12", steps, batch_images, run_left)  # the bar
    epoch_line(record, width)         # one line per epoch: val server F1, weights, loss, speed, time
    epoch_table(record, columns)      # the full table for train.log; markdown_table for TensorBoard
    command_lines(words, width)       # a command broken with ` \\` so that it copies as one

`cocoshard.training.runlog` decides what is shown and written; this module only lays it out.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn
from rich.table import Table

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


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return (
        f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
        if seconds >= 3600
        else f"{seconds // 60}:{seconds % 60:02d}"
    )


def fit_parts(parts: Sequence[str], width: int, separator: str = "  ") -> str:
    """The leading parts (most important first) that fit in `width` columns, whole."""
    line = ""
    for part in parts:
        longer = part if not line else line + separator + part
        if len(longer) > width:
            break
        line = longer
    return line


def command_lines(words: Sequence[str], width: int = 80, indent: str = "  ") -> list[str]:
    """A shell command broken between its words with ` \\` continuations so that each line fits in
    `width` where its words do: copied from the screen or a log it runs as one command."""
    lines, line = [], indent + words[0]
    for word in words[1:]:
        if len(line) + 1 + len(word) + 2 > width:
            lines.append(line + " \\")
            line = indent + "    " + word
        else:
            line += " " + word
    return [*lines, line]


class EpochProgress:
    """A progress bar for one epoch; `update` is called only at log steps (it follows a host sync).

    `run_left(seconds_per_step)` says how long the steps after this epoch will take (the epochs to
    come, validation included), so the bar can show the time left in the whole run. What follows
    the bar is chosen to fit the terminal: the less important parts are left out whole."""

    BAR_MIN, BAR_MAX = 10, 30

    def __init__(
        self,
        console: Console | None,
        description: str,
        steps: int,
        batch_images: int,
        run_left: Callable[[float], float] | None = None,
        start: int = 0,
    ) -> None:
        self.batch_images, self.steps, self.description = batch_images, steps, description
        self.start = start  # a resumed epoch starts mid-way: rates count this process's steps only
        self.run_left = run_left or (lambda per_step: 0.0)
        self.started = time.perf_counter()
        self.progress: Progress | None = None
        if console is not None and console.is_terminal:  # a log file gets the epoch's line instead
            self.console = console
            self.bar = BarColumn(bar_width=self.BAR_MAX)
            self.progress = Progress(
                TextColumn("[bold]{task.description}"),
                self.bar,
                TextColumn("{task.fields[info]}"),
                console=console,
            )
            self.task = self.progress.add_task(
                description, total=steps, completed=start, info=self._info(start, None, None)
            )
            self.progress.start()

    def _info(self, step: int, loss: float | None, lr: float | None) -> str:
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        done = step - self.start  # steps taken by this process
        per_step = elapsed / max(done, 1)
        parts = [f"{step}/{self.steps}"]
        if loss is not None and lr is not None:
            left = (self.steps - step) * per_step + self.run_left(per_step)
            parts += [
                f"loss {loss:.4f}",
                f"run {_duration(left)} left",
                f"{done * self.batch_images / elapsed:,.0f} img/s",
                f"lr {lr:.1e}",
                f"epoch {_duration(elapsed)}",
            ]
        room = self.console.width - 1 - len(self.description) - 1 - self.BAR_MIN - 1
        info = fit_parts(parts, room)
        self.bar.bar_width = max(
            self.BAR_MIN, min(self.BAR_MAX, self.console.width - 1 - len(self.description) - len(info) - 2)
        )
        return info

    def update(self, step: int, loss: float, lr: float) -> None:
        """Show `step` steps done in this epoch at a mean loss of `loss`, the head's learning rate `lr`."""
        if self.progress is not None:
            self.progress.update(self.task, completed=step, info=self._info(step, loss, lr), refresh=True)

    def close(self) -> None:
        """Stop the bar and take it off the screen: the epoch's line says how it went."""
        if self.progress is not None:
            self.progress.update(self.task, visible=False)
            self.progress.stop()


def epoch_line(record: dict[str, Any], width: int) -> str:
    """An epoch in one line that fits `width`: its val server F1 (tuned, of the weights it
    selected), whether it is the best so far, the train loss, speed and time."""
    selected = record["selected"]
    val = record["val"][selected]
    weights = "EMA" if selected == "ema" else "raw"
    parts = [
        f"epoch {record['epoch']}/{record['epochs']}",
        f"val server F1 {val['server_f1_tuned']:.4f} ({weights}){' ★ best' if record['best'] else ''}",
    ]
    if "loss" in record["train"]:
        parts.append(f"loss {record['train']['loss']:.4f}")
    parts += [f"{record['images_per_s']:,.0f} img/s", f"{record['time_s']:.0f} s"]
    if record.get("time_s", 0) > 0 and "data_wait_s" in record:
        parts.append(f"{record['data_wait_s'] / record['time_s']:.0%} data wait")
    return fit_parts(parts, width - 1)


def epoch_table(record: dict[str, Any], columns: Sequence[str]) -> Table:
    """The epoch's full table: train figures beside the val figures of each weight set."""
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
            f"{record['val'][column][key]:.4f}" if key in record["val"][column] else "" for column in columns
        ]
        table.add_row(label, "" if train is None else f"{train:.4f}", *cells)
    return table


def markdown_table(record: dict[str, Any], columns: Sequence[str]) -> str:
    """The epoch's table as markdown, for TensorBoard's text tab."""
    rows = [
        "| | train | "
        + " | ".join(f"val {c}{' ★' if c == record['selected'] else ''}" for c in columns)
        + " |",
        "|---|---:|" + "---:|" * len(columns),
    ]
    for key, label in TABLE_ROWS:
        train = record["train"].get(key)
        cells = [f"{record['val'][c][key]:.4f}" if key in record["val"][c] else "" for c in columns]
        rows.append(f"| {label} | {'' if train is None else f'{train:.4f}'} | " + " | ".join(cells) + " |")
    return "\n".join(rows)
