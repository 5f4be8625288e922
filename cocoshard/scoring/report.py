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
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cocoshard import CLASSES
from cocoshard.atomic import atomic_write_bytes, atomic_write_text
from cocoshard.input_files import parse_json, read_input
from cocoshard.pure.metrics import ServerF1
from cocoshard.training.runlog import CONFIG_FILE, METRICS_LOG

SUMMARY = "summary.md"
F1_FIGURE = "per_class_f1.png"
PR_FIGURE = "precision_recall.png"
CURVES_FIGURE = "curves.png"
REPORT_FILES = (SUMMARY, F1_FIGURE, PR_FIGURE, CURVES_FIGURE)  # every file a report may write
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


HEAVIEST_LABELLED = 10


def plot_class_f1(
    server: ServerF1,
    path: Path,
    title: str,
    average_precision: np.ndarray | None = None,
    names: Sequence[str] = CLASSES,
) -> Path:
    """Horizontal F1 bars, classes sorted by frequency; the heaviest classes say their weight in the
    score; classes absent from the labels are marked as such. With `average_precision`, each
    class's AP is drawn as a dot on its bar."""
    plt = _pyplot()
    order = frequency_order(server.class_counts)
    present = server.class_counts[order] > 0
    figure, ax = plt.subplots(figsize=(8.5, 0.19 * len(order) + 1.6))
    ax.barh(
        range(len(order)),
        np.where(present, server.class_f1[order], 0.0),
        color=F1_COLOUR,
        height=0.75,
        label="F1",
    )
    absent_rows = np.flatnonzero(~present)
    if len(absent_rows):  # a background band says "absent" where an F1 of 0 would say "missed"
        ax.barh(
            absent_rows,
            np.full(len(absent_rows), 1.0),
            color=ABSENT_COLOUR,
            alpha=0.35,
            height=0.75,
            label="absent from the labels",
        )
        for row in absent_rows:
            ax.text(0.01, row, "absent: no weight", va="center", fontsize=6, color="#555555")
    if average_precision is not None:
        ap = np.where(present, average_precision[order], np.nan)
        ax.plot(ap, range(len(order)), "o", color="black", markersize=2.5, label="AP")
    heaviest = set(np.argsort(-server.class_weights)[:HEAVIEST_LABELLED].tolist())
    for row, c in enumerate(order):  # in the margin right of the bars, clear of bars and dots
        if c in heaviest and server.class_weights[c] > 0:
            ax.text(
                1.045,
                row,
                f"w {server.class_weights[c]:.1%}",
                va="center",
                fontsize=6,
                color="#b22222",
                clip_on=False,
            )
    ax.legend(loc="lower right", fontsize=7, framealpha=0.9)
    _class_axis(ax, order, server.class_counts, names)
    ax.set_xlabel("F1 per class")
    ax.set_title(
        f"{title}: server F1 {server.f1:.3f}\nclasses from the most to the least frequent (positives in "
        f"brackets)\nw (right): a class's share of the server F1, for the {HEAVIEST_LABELLED} heaviest",
        fontsize=9,
    )
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
    figure.suptitle(
        f"{title}\nweighted precision {server.precision:.3f}, weighted recall {server.recall:.3f} "
        f"(weights of the server F1); classes by frequency (positives)",
        fontsize=9,
    )
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


CHOSEN = "val/chosen/"  # the validation figures of the weights each epoch chose (raw or EMA)


def read_metrics_log(run_dir: str | os.PathLike) -> list[dict[str, float]]:
    """The numeric fields of each epoch record in `run_dir/metrics.jsonl`, nested keys joined by '/'.

    Read defensively: lines that are not JSON objects (a record cut short by a killed run) are
    skipped; whatever numeric keys the trainer wrote are kept. When a record says which weights
    it chose (`selected`), their validation figures are also under `val/chosen/`.
    """
    path = Path(run_dir) / METRICS_LOG
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = parse_json(line)  # bounded nesting: an InputError is a ValueError
        except ValueError:
            continue
        if isinstance(record, dict):
            flat = _flatten(record)
            chosen = record.get("selected")
            if (
                isinstance(chosen, str)
                and isinstance(record.get("val"), dict)
                and isinstance(record["val"].get(chosen), dict)
            ):
                flat.update(_flatten(record["val"][chosen], CHOSEN))
            records.append(flat)
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
    """(losses, scores) to draw, each {key: (epochs, values)}. From a cocoshard run: the train loss,
    and the loss, tuned and 0.5 server F1 and mAP of the weights each epoch chose. From another
    log: every loss, and the headline scores when it has them, else every F1."""
    if any(key.startswith(CHOSEN) for record in records for key in record):
        losses = _series(records, lambda leaf: leaf == "loss")
        losses = {k: v for k, v in losses.items() if k in ("train/loss", CHOSEN + "loss")}
        scores = {k: v for k, v in _series(records, _is_headline_score).items() if k.startswith(CHOSEN)}
        return losses, scores
    scores = _series(records, _is_headline_score) or _series(records, lambda leaf: "f1" in leaf)
    return _series(records, _is_loss), scores


CURVE_LABELS = {
    "train/loss": "train loss",
    CHOSEN + "loss": "validation loss",
    CHOSEN + "server_f1_tuned": "server F1, tuned thresholds",
    CHOSEN + "server_f1": "server F1 at 0.5",
    CHOSEN + "map": "mAP",
}


def _score_limits(series: dict) -> tuple[float, float]:
    """The y range the scores need, with a margin: scores of 0.03 are not drawn flat on the floor of 0-1."""
    values = [v for _, ys in series.values() for v in ys]
    low, high = min(values), max(values)
    margin = max(0.02, 0.1 * (high - low))
    return max(0.0, low - margin), min(1.0, high + margin) if high <= 1 else high + margin


def plot_curves(records: list[dict[str, float]], path: Path, title: str) -> Path | None:
    """Loss and scores per epoch in two panels, the best epoch marked; None when the log has neither."""
    losses, scores = curve_series(records)
    if not losses and not scores:
        return None
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    best = next((r["best_epoch"] for r in reversed(records) if r.get("best_epoch")), None)
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for ax, series, label in ((left, losses, "loss"), (right, scores, "score")):
        for key, (xs, ys) in sorted(series.items()):
            tuned = key.endswith("server_f1_tuned")
            ax.plot(
                xs,
                ys,
                marker="o",
                markersize=3,
                label=CURVE_LABELS.get(key, key),
                linewidth=2.4 if tuned or key == "train/loss" else 1.2,
                linestyle="--" if key.endswith("map") else "-",
            )
            if tuned and best in xs:
                ax.plot(
                    [best],
                    [ys[xs.index(best)]],
                    marker="*",
                    markersize=14,
                    color="#d62728",
                    zorder=5,
                    label=f"best epoch ({int(best)})",
                )
        if best is not None:
            ax.axvline(best, color="#d62728", alpha=0.25, linewidth=1)
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if series:
            ax.legend(fontsize=7)
    if scores:
        right.set_ylim(*_score_limits(scores))
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    return _save(figure, path)


# ----------------------------------------------------------------------------------- summary


def _summary_text(
    metrics: dict[str, float],
    server: ServerF1,
    figures: list[Path],
    title: str,
    names: Sequence[str],
    about: dict[str, Any],
) -> str:
    lines = [f"# {title}", ""]
    if about:
        lines += ["| what was evaluated | |", "|---|---|"] + [
            f"| {key} | {value} |" for key, value in about.items()
        ]
        lines.append("")
    lines += ["| metric | value |", "|---|---|"]
    for key in (
        "server_f1",
        "server_precision",
        "server_recall",
        "macro_f1",
        "micro_f1",
        "map",
        "labels_per_image",
    ):
        if key in metrics:
            lines.append(f"| {key} | {metrics[key]:.4f} |")
    lines.append(f"| images | {int(metrics.get('images', 0))} |")
    heavy = [c for c in np.argsort(-server.class_weights) if server.class_weights[c] > 0][:10]
    weakest = sorted(heavy, key=lambda c: server.class_f1[c])[:5]
    if weakest:
        lines += [
            "",
            "Where the server F1 is lost: the weakest of the ten heaviest classes",
            "",
            "| class | positives | weight | precision | recall | F1 |",
            "|---|---|---|---|---|---|",
        ]
        for c in weakest:
            lines.append(
                f"| {names[c]} | {int(server.class_counts[c])} | {server.class_weights[c]:.1%} | "
                f"{server.class_precision[c]:.3f} | {server.class_recall[c]:.3f} | {server.class_f1[c]:.3f} |"
            )
    lines.append("")
    lines += [f"![{figure.stem}]({figure.name})" for figure in figures]
    return "\n".join(lines) + "\n"


def run_description(run_dir: str | os.PathLike | None) -> dict[str, Any]:
    """What a summary says of the run behind the predictions: model, its best epoch, key settings."""
    if run_dir is None:
        return {}
    settings_file, about = Path(run_dir) / CONFIG_FILE, {}
    try:
        settings = parse_json(read_input(settings_file, 2**20).decode())
    except (ValueError, UnicodeDecodeError):  # InputError included
        settings = {}
    if isinstance(settings, dict) and settings:
        start = (
            "trained from scratch"
            if settings.get("weights") == "none"
            else f"from {settings.get('weights')} weights"
        )
        about["model"] = f"{settings.get('model')}, {start}"
        amp = settings.get("amp_dtype") if settings.get("amp") else "off"
        about["settings"] = ", ".join(
            [
                f"{key} {settings.get(key)}"
                for key in ("epochs", "size", "batch_size", "lr", "loss", "loader")
                if key in settings
            ]
            + [f"amp {amp}"]
        )
    records = read_metrics_log(run_dir)
    best = next((r["best_epoch"] for r in reversed(records) if r.get("best_epoch")), None)
    if best is not None:
        about["best epoch"] = f"{int(best)} of {len(records)}"
    return about


def write_report(
    folder: str | os.PathLike,
    metrics: dict[str, float],
    server: ServerF1,
    *,
    average_precision: np.ndarray | None = None,
    run_dir: str | os.PathLike | None = None,
    title: str = "Evaluation",
    names: Sequence[str] = CLASSES,
    about: dict[str, Any] | None = None,
) -> list[Path]:
    """Write the figures and `summary.md` into `folder`; returns their paths, the summary first.
    `names`: the class names to show (the challenge's by default); `about`: what was evaluated
    (predictions, labels, checkpoint), said at the top of the summary with the run's model,
    best epoch and settings."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    figures = [
        plot_class_f1(server, out / F1_FIGURE, title, average_precision, names),
        plot_precision_recall(server, out / PR_FIGURE, title, names),
    ]
    if run_dir is not None:
        curves = plot_curves(
            read_metrics_log(run_dir),
            out / CURVES_FIGURE,
            f"training run {run_dir}: validation figures of the weights each epoch chose (raw or EMA)",
        )
        if curves is not None:
            figures.append(curves)
    summary = out / SUMMARY
    described = {**(about or {}), **run_description(run_dir)}
    atomic_write_text(summary, _summary_text(metrics, server, figures, title, names, described))
    return [summary, *figures]
