"""Score a submission JSON the way the leaderboard does, after checking its format strictly.

    $ cocoshard evaluate --predictions predictions.json --labels shards --per-class
    $ cocoshard evaluate --predictions predictions.json --labels ms-coco/labels/train/train --json
    $ cocoshard evaluate --predictions val.json --labels shards --scores val.npz --report report --run runs/train
    $ cocoshard evaluate --predictions predictions.json --images ms-coco/images/test-resized/test-resized

The format check comes first and names every offending entry (see `cocoshard.submission`). With
`--images` the file must cover exactly those images; with `--labels` (a folder of `.cls` files, or
a shards folder whose val split is used) every key must be a labelled image, and the images the
file predicts are the ones evaluated: the labels may cover more. The server F1 is the statement's
`validation_loop` F1 with weights from the labels of the evaluated images (`cocoshard.metrics`).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
from rich.console import Console
from rich.table import Table

from cocoshard import CLASSES, NUM_CLASSES
from cocoshard.atomic import atomic_write_text
from cocoshard.config import EvaluateConfig, print_config
from cocoshard.scoring import metrics
from cocoshard.scoring.ground_truth import class_names_of, image_keys, load_labels
from cocoshard.scoring.scores import load_scores
from cocoshard.scoring.submission import (
    Submission,
    read_submission_json,
    to_matrix,
    unsorted_entries,
    validate_submission,
)


@dataclass(frozen=True)
class Evaluation:
    """Everything `evaluate` reports: headline metrics, per-class arrays and the images scored."""

    keys: list[str]
    metrics: dict[str, float]
    server: metrics.ServerF1
    average_precision: Optional[np.ndarray]  # (C,) per-class AP, NaN without positives; None without scores
    names: tuple[str, ...] = CLASSES  # the class names to report with


def score_submission(
    submission: Submission,
    labels: dict[str, np.ndarray],
    scores: Optional[np.ndarray] = None,
    names: tuple[str, ...] = CLASSES,
) -> Evaluation:
    """Metrics of the predicted images (in sorted key order; `scores` rows follow that order)."""
    keys = sorted(submission)
    truth = np.stack([labels[key] for key in keys]) if keys else np.zeros((0, NUM_CLASSES), bool)
    pred = to_matrix(submission, keys)
    result = metrics.metrics_from_predictions(pred, truth)
    ap = None
    if scores is not None:
        ap = metrics.average_precision(scores, truth)
        result["map"] = metrics.mean_average_precision(scores, truth)
    return Evaluation(keys, result, metrics.server_f1(pred, truth), ap, names)


def per_class_rows(evaluation: Evaluation) -> list[dict[str, Any]]:
    """One JSON-able row per class: positives, weight, tp, fp, precision, recall, F1 (and AP)."""
    server, rows = evaluation.server, []
    for c in range(len(server.class_f1)):
        row = {
            "id": c,
            "name": evaluation.names[c],
            "positives": int(server.class_counts[c]),
            "weight": float(server.class_weights[c]),
            "tp": int(server.true_positives[c]),
            "fp": int(server.false_positives[c]),
            "precision": float(server.class_precision[c]),
            "recall": float(server.class_recall[c]),
            "f1": float(server.class_f1[c]),
        }
        if evaluation.average_precision is not None:
            value = evaluation.average_precision[c]
            row["ap"] = None if np.isnan(value) else float(value)
        rows.append(row)
    return rows


def _summary_table(evaluation: Evaluation, source: str) -> Table:
    table = Table(title=f"{source}: {len(evaluation.keys)} images", show_header=False, box=None)
    m = evaluation.metrics
    table.add_row("[bold]server F1[/]", f"[bold]{m['server_f1']:.4f}[/]", f"P {m['server_precision']:.4f}  R {m['server_recall']:.4f}")
    table.add_row("macro F1", f"{m['macro_f1']:.4f}", f"P {m['macro_precision']:.4f}  R {m['macro_recall']:.4f}")
    table.add_row("micro F1", f"{m['micro_f1']:.4f}", f"P {m['micro_precision']:.4f}  R {m['micro_recall']:.4f}")
    if "map" in m:
        table.add_row("mAP", f"{m['map']:.4f}", "")
    table.add_row("labels per image", f"{m['labels_per_image']:.2f}", "")
    return table


def _per_class_table(rows: list[dict[str, Any]]) -> Table:
    table = Table(title="per class (sorted by positives; weight: share of the server F1)")
    for column in ("id", "class", "positives", "weight", "tp", "fp", "precision", "recall", "F1"):
        table.add_column(column, justify="left" if column == "class" else "right")
    with_ap = "ap" in rows[0] if rows else False
    if with_ap:
        table.add_column("AP", justify="right")
    for row in sorted(rows, key=lambda r: -r["positives"]):
        cells = [str(row["id"]), row["name"], str(row["positives"]), f"{row['weight']:.3f}", str(row["tp"]), str(row["fp"]),
                 f"{row['precision']:.3f}", f"{row['recall']:.3f}", f"{row['f1']:.3f}"]
        if with_ap:
            cells.append("-" if row["ap"] is None else f"{row['ap']:.3f}")
        table.add_row(*cells, style="dim" if row["positives"] == 0 else None)
    return table


def check_file(cfg: EvaluateConfig, labels: Optional[dict[str, np.ndarray]]) -> tuple[Submission, list[str]]:
    """Parse and check `cfg.predictions`; returns the submission and the keys of unsorted lists."""
    raw = read_submission_json(cfg.predictions)
    expected = image_keys(cfg.images) if cfg.images else None
    allowed = labels.keys() if labels is not None else None
    submission = validate_submission(raw, expected=expected, allowed=allowed, source=cfg.predictions)
    return submission, unsorted_entries(raw)


@dataclass(frozen=True)
class Assessment:
    """What `evaluate` found: the checked file, notes on it, and its scores when labels were given."""

    submission: Submission
    notes: list[str]
    evaluation: Optional[Evaluation]
    report: list[Path]


def assess(cfg: EvaluateConfig) -> Assessment:
    """Check the file strictly, then score it and write the report when labels are given."""
    labels = load_labels(cfg.labels) if cfg.labels else None
    submission, unsorted = check_file(cfg, labels)
    notes = [f"{len(unsorted)} list(s) were not sorted (accepted; e.g. {unsorted[0]!r})"] if unsorted else []
    empty = sum(1 for ids in submission.values() if not ids)
    if empty:
        notes.append(f"{empty} image(s) have no class at all (every COCO image has one: see predict --min-labels)")
    if labels is None:
        return Assessment(submission, notes, None, [])
    scores = load_scores(cfg.scores, sorted(submission)) if cfg.scores else None
    evaluation = score_submission(submission, labels, scores, class_names_of(cfg.labels))
    return Assessment(submission, notes, evaluation, _write_report(cfg, evaluation) if cfg.report else [])


def show(cfg: EvaluateConfig, found: Assessment) -> None:
    """Print the assessment for people, or as one JSON object on stdout with `--json`."""
    if found.evaluation is None:
        _show_format_only(cfg, found)
        return
    rows = per_class_rows(found.evaluation)
    if cfg.json:
        sys.stdout.write(json.dumps(metrics_payload(cfg, found)) + "\n")
        return
    console = Console()
    console.print(f"[green]format OK[/]: {cfg.predictions} ({len(found.submission)} images)", soft_wrap=True)
    for note in found.notes:
        console.print(f"[yellow]note[/]: {note}")
    console.print(_summary_table(found.evaluation, cfg.predictions))
    if cfg.per_class:
        console.print(_per_class_table(rows))
    if found.report:
        console.print(f"report: {found.report[0]}", soft_wrap=True)


def metrics_payload(cfg: EvaluateConfig, found: Assessment) -> dict[str, Any]:
    """The scores as one JSON-able object (what --json prints and --out writes)."""
    assert found.evaluation is not None
    payload: dict[str, Any] = {**found.evaluation.metrics, "format_ok": True, "notes": found.notes}
    if cfg.per_class:
        payload["per_class"] = per_class_rows(found.evaluation)
    if found.report:
        payload["report"] = [str(p) for p in found.report]
    return payload


def run(cfg: EvaluateConfig) -> int:
    """`cocoshard evaluate`: assess the file, show the result, and write it with --out."""
    print_config(cfg)
    found = assess(cfg)
    show(cfg, found)
    if cfg.out and found.evaluation is not None:
        atomic_write_text(cfg.out, json.dumps(metrics_payload(cfg, found), indent=1) + "\n")
    return 0


def _show_format_only(cfg: EvaluateConfig, found: Assessment) -> None:
    if cfg.json:
        sys.stdout.write(json.dumps({"format_ok": True, "images": len(found.submission), "notes": found.notes}) + "\n")
        return
    count = len(found.submission)
    scope = f"covers exactly the {count} images of {cfg.images}" if cfg.images else f"{count} images"
    console = Console()
    console.print(f"[green]format OK[/]: {cfg.predictions} ({scope}); give --labels to score it", soft_wrap=True)
    for note in found.notes:
        console.print(f"[yellow]note[/]: {note}")


def _write_report(cfg: EvaluateConfig, evaluation: Evaluation) -> list[Path]:
    from cocoshard.scoring.report import write_report

    return write_report(
        cfg.report, evaluation.metrics, evaluation.server, average_precision=evaluation.average_precision,
        run_dir=cfg.run, title=f"Evaluation of {Path(cfg.predictions).name}", names=evaluation.names,
    )
