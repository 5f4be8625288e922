"""Figures people would rather look at than read: per-class F1, precision and recall, training curves.

    $ cocoshard evaluate --predictions val.json --labels shards --report report --run runs/train

writes into `report/`:

    per_class_f1.png       F1 of every class, most frequent class on top, with its share of the score
    precision_recall.png   precision and recall of every class side by side, same order
    curves.png             loss and F1 per epoch from the run's metrics.jsonl (when --run is given)
    summary.md             the headline figures, the weakest heavy classes, links to the figures

Rendering uses matplotlib's Agg backend (no display needed); every file is written atomically.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from cocoshard import CLASSES
from cocoshard.atomic import atomic_write_bytes, atomic_write_text
from cocoshard.scoring.metrics import ServerF1
from cocoshard.training.runlog import METRICS_LOG

SUMMARY = "summary.md"
F1_FIGURE = "per_class_f1.png"
PR_FIGURE = "precision_recall.png"
CURVES_FIGURE = "curves.png"
EPOCH_KEYS = ("epoch", "epochs")
SCORE_LEAVES = ("server_f1", "server_f1_tuned", "map")
ABSENT_COLOUR, F1_COLOUR, PRECISION_COLOUR, RECALL_COLOUR = "#bbbbbb", "#3b75af", "#e07b39", "#519e3e"


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(figure: Any, path: Path) -> Path:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    _pyplot().close(figure)
    atomic_write_bytes(path, buffer.getvalue())
    return path


# ----------------------------------------------------------------------------------- per class


def frequency_order(counts: np.ndarray) -> np.ndarray:
    """Class indices from the most to the least frequent (ties by class id)."""
    return np.lexsort((np.arange(len(counts)), -np.asarray(counts)))


def _class_axis(ax: Any, order: np.ndarray, counts: np.ndarray, names: Sequence[str]) -> None:
    ax.set_yticks(range(len(order)))
    ax.set_yticklabels([f"{names[c]} ({int(counts[c])})" for c in order], fontsize=7)
    ax.set_ylim(len(order) - 0.5, -0.5)  # most frequent at the top
    ax.set_xlim(0, 1.03)  # room for a dot at exactly 1
    ax.grid(axis="x", alpha=0.3)
    ax.set_axisbelow(True)


def plot_class_f1(server: ServerF1, path: Path, title: str, average_precision: Optional[np.ndarray] = None,
                  names: Sequence[str] = CLASSES) -> Path:
    """Horizontal F1 bars, classes sorted by frequency; each bar says the class's weight in the score.
    With `average_precision`, each class's AP is drawn as a dot on its bar."""
    plt = _pyplot()
    order = frequency_order(server.class_counts)
    present = server.class_counts[order] > 0
    figure, ax = plt.subplots(figsize=(8.5, 0.19 * len(order) + 1.6))
    colours = [F1_COLOUR if p else ABSENT_COLOUR for p in present]
    ax.barh(range(len(order)), server.class_f1[order], color=colours, height=0.75, label="F1")
    if average_precision is not None:
        ax.plot(average_precision[order], range(len(order)), "o", color="black", markersize=2.5, label="AP")
        ax.legend(loc="lower right", fontsize=7)
    # label only the classes that move the score: at least twice an even share of the weight
    heavy = max(0.01, 2.0 / max(int(present.sum()), 1))
    for row, c in enumerate(order):
        if server.class_weights[c] >= heavy:
            ax.text(min(server.class_f1[c] + 0.01, 0.86), row, f"w {server.class_weights[c]:.0%}", va="center", fontsize=6)
    _class_axis(ax, order, server.class_counts, names)
    ax.set_xlabel("F1 per class (bars in grey: class absent from the labels)")
    ax.set_title(f"{title}\nserver F1 {server.f1:.3f}; classes by frequency (positives), w = weight in the server F1",
                 fontsize=9)
    return _save(figure, path)


def plot_precision_recall(server: ServerF1, path: Path, title: str, names: Sequence[str] = CLASSES) -> Path:
    """Precision and recall of each class in two panels sharing the class axis."""
    plt = _pyplot()
    order = frequency_order(server.class_counts)
    height = 0.19 * len(order) + 1.6
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, height), sharey=True)
    for ax, values, colour, name in (
        (left, server.class_precision, PRECISION_COLOUR, "precision"),
        (right, server.class_recall, RECALL_COLOUR, "recall"),
    ):
        ax.barh(range(len(order)), values[order], color=colour, height=0.75)
        _class_axis(ax, order, server.class_counts, names)
        ax.set_xlabel(f"{name} per class")
    right.tick_params(labelleft=False)
    figure.suptitle(f"{title}\nweighted precision {server.precision:.3f}, weighted recall {server.recall:.3f} "
                    f"(weights of the server F1); classes by frequency (positives)", fontsize=9)
    figure.tight_layout(rect=(0, 0, 1, 0.985))
    return _save(figure, path)


# ----------------------------------------------------------------------------------- curves


def _flatten(record: dict[str, Any], prefix: str = "") -> dict[str, float]:
    flat: dict[str, float] = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, name + "/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and np.isfinite(value):
            flat[name] = float(value)
    return flat


def read_metrics_log(run_dir: str | os.PathLike) -> list[dict[str, float]]:
    """The numeric fields of each epoch record in `run_dir/metrics.jsonl`, nested keys joined by '/'.

    Read defensively: lines that are not JSON objects (a record cut short by a killed run) are
    skipped; whatever numeric keys the trainer wrote are kept.
    """
    path = Path(run_dir) / METRICS_LOG
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(_flatten(record))
    return records


def _series(records: list[dict[str, float]], keep: Any) -> dict[str, tuple[list[float], list[float]]]:
    """Every key whose last part (after the last '/') passes `keep`, as (epochs, values)."""
    series: dict[str, tuple[list[float], list[float]]] = {}
    for index, record in enumerate(records):
        epoch = next((record[k] for k in EPOCH_KEYS if k in record), float(index + 1))
        for key, value in record.items():
            if key not in EPOCH_KEYS and keep(key.rsplit("/", 1)[-1].lower()):
                xs, ys = series.setdefault(key, ([], []))
                xs.append(epoch)
                ys.append(value)
    return series


def _is_loss(leaf: str) -> bool:
    return leaf == "loss" or leaf.endswith("_loss")


def _is_headline_score(leaf: str) -> bool:
    return leaf in SCORE_LEAVES


def curve_series(records: list[dict[str, float]]) -> tuple[dict, dict]:
    """(losses, scores) to draw, each {key: (epochs, values)}: every loss, and the headline scores
    when the log has them (a trainer logs many F1 variants), else every F1."""
    scores = _series(records, _is_headline_score) or _series(records, lambda leaf: "f1" in leaf)
    return _series(records, _is_loss), scores


def plot_curves(records: list[dict[str, float]], path: Path, title: str) -> Optional[Path]:
    """Loss and F1 (and mAP) per epoch in two panels; None when the log has neither."""
    losses, scores = curve_series(records)
    if not losses and not scores:
        return None
    plt = _pyplot()
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for ax, series, label in ((left, losses, "loss"), (right, scores, "score")):
        for key, (xs, ys) in sorted(series.items()):
            ax.plot(xs, ys, marker="o", markersize=3, label=key, linewidth=2.2 if "server" in key else 1.2,
                    linestyle="--" if key.endswith("map") else "-")
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if series:
            ax.legend(fontsize=7)
    right.set_ylim(0, 1)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    return _save(figure, path)


# ----------------------------------------------------------------------------------- summary


def _summary_text(metrics: dict[str, float], server: ServerF1, figures: list[Path], title: str,
                  names: Sequence[str]) -> str:
    lines = [f"# {title}", "", "| metric | value |", "|---|---|"]
    for key in ("server_f1", "server_precision", "server_recall", "macro_f1", "micro_f1", "map", "labels_per_image"):
        if key in metrics:
            lines.append(f"| {key} | {metrics[key]:.4f} |")
    lines.append(f"| images | {int(metrics.get('images', 0))} |")
    heavy = [c for c in np.argsort(-server.class_weights) if server.class_weights[c] > 0][:10]
    weakest = sorted(heavy, key=lambda c: server.class_f1[c])[:5]
    if weakest:
        lines += ["", "Where the server F1 is lost: the weakest of the ten heaviest classes", "",
                  "| class | positives | weight | precision | recall | F1 |", "|---|---|---|---|---|---|"]
        for c in weakest:
            lines.append(f"| {names[c]} | {int(server.class_counts[c])} | {server.class_weights[c]:.1%} | "
                         f"{server.class_precision[c]:.3f} | {server.class_recall[c]:.3f} | {server.class_f1[c]:.3f} |")
    lines.append("")
    lines += [f"![{figure.stem}]({figure.name})" for figure in figures]
    return "\n".join(lines) + "\n"


def write_report(
    folder: str | os.PathLike,
    metrics: dict[str, float],
    server: ServerF1,
    *,
    average_precision: Optional[np.ndarray] = None,
    run_dir: Optional[str | os.PathLike] = None,
    title: str = "Evaluation",
    names: Sequence[str] = CLASSES,
) -> list[Path]:
    """Write the figures and `summary.md` into `folder`; returns their paths, the summary first.
    `names`: the class names to show (the challenge's by default)."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    figures = [
        plot_class_f1(server, out / F1_FIGURE, title, average_precision, names),
        plot_precision_recall(server, out / PR_FIGURE, title, names),
    ]
    if run_dir is not None:
        curves = plot_curves(read_metrics_log(run_dir), out / CURVES_FIGURE, f"training run {run_dir}")
        if curves is not None:
            figures.append(curves)
    summary = out / SUMMARY
    atomic_write_text(summary, _summary_text(metrics, server, figures, title, names))
    return [summary, *figures]
