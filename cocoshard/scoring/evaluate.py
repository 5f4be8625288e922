"""Score a submission JSON the way the leaderboard does, after checking its format strictly.

    $ cocoshard evaluate --predictions predictions.json --labels shards --per-class
    $ cocoshard evaluate --predictions predictions.json --labels ms-coco/labels/train/train --json
    $ cocoshard evaluate --predictions val.json --labels shards --scores val.npz \
          --report report --run runs/train
    $ cocoshard evaluate --predictions predictions.json --images ms-coco/images/test-resized/test-resized
    $ cocoshard evaluate --predictions fold2.json --labels shards-5fold --split fold2

The format check comes first and names every offending entry (see `cocoshard.submission`). With
`--images` the file must cover exactly those images; with `--labels` (a folder of `.cls` files, or
a shards folder whose val split is used, every fold of a K-fold pack, or the `--split` given)
every key must be a labelled image, and the images the
file predicts are the ones evaluated: the labels may cover more. The server F1 is the statement's
`validation_loop` F1 with weights from the labels of the evaluated images (`cocoshard.metrics`).
"""

from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from rich.table import Table
from rich.text import Text

from cocoshard import CLASSES, NUM_CLASSES
from cocoshard.atomic import atomic_write_text
from cocoshard.config_scoring import EvaluateConfig
from cocoshard.console import literal, stdout_console
from cocoshard.errors import UserError
from cocoshard.folder_lock import folder_lock
from cocoshard.loading.image_files import folder_listing, skipped_note
from cocoshard.output_paths import check_apart, check_output_file, check_output_folder
from cocoshard.prepare.manifest import read_manifest, shards_identity
from cocoshard.pure import metrics
from cocoshard.scoring.ground_truth import (
    class_names_of,
    image_keys,
    is_label_input,
    is_shard_folder,
    labels_split,
    load_labels,
)
from cocoshard.scoring.report import REPORT_FILES
from cocoshard.scoring.same_shards import OVERRIDE, Trained, check_trained_on
from cocoshard.scoring.scores import check_scores_match, load_scores, read_scores
from cocoshard.scoring.submission import (
    Submission,
    read_submission_json,
    to_matrix,
    unsorted_entries,
    validate_submission,
)
from cocoshard.settings import print_config
from cocoshard.training.runlog import METRICS_LOG


@dataclass(frozen=True)
class Evaluation:
    """Everything `evaluate` reports: headline metrics, per-class arrays and the images scored."""

    keys: list[str]
    metrics: dict[str, float]
    server: metrics.ServerF1
    average_precision: np.ndarray | None  # (C,) per-class AP, NaN without positives; None without scores
    names: tuple[str, ...] = CLASSES  # the class names to report with
    thresholds: np.ndarray | None = None  # (C,) the thresholds the submission was made with (from --scores)


def score_submission(
    submission: Submission,
    labels: dict[str, np.ndarray],
    scores: np.ndarray | None = None,
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
        if evaluation.thresholds is not None:
            row["threshold"] = float(evaluation.thresholds[c])
        rows.append(row)
    return rows


def _summary_table(evaluation: Evaluation, source: str) -> Table:
    table = Table(title=f"{source}: {len(evaluation.keys)} images", show_header=False, box=None)
    m = evaluation.metrics
    table.add_row(
        "[bold]server F1[/]",
        f"[bold]{m['server_f1']:.4f}[/]",
        f"P {m['server_precision']:.4f}  R {m['server_recall']:.4f}",
    )
    table.add_row(
        "macro F1", f"{m['macro_f1']:.4f}", f"P {m['macro_precision']:.4f}  R {m['macro_recall']:.4f}"
    )
    table.add_row(
        "micro F1", f"{m['micro_f1']:.4f}", f"P {m['micro_precision']:.4f}  R {m['micro_recall']:.4f}"
    )
    if "map" in m:
        table.add_row("mAP", f"{m['map']:.4f}", "")
    table.add_row("labels per image", f"{m['labels_per_image']:.2f}", "")
    return table


def _per_class_table(rows: list[dict[str, Any]]) -> Table:
    table = Table(title="per class (sorted by positives; weight: share of the server F1)")
    for column in ("id", "class", "positives", "weight", "tp", "fp", "precision", "recall", "F1"):
        table.add_column(column, justify="left" if column == "class" else "right", no_wrap=column == "class")
    with_ap = "ap" in rows[0] if rows else False
    with_threshold = "threshold" in rows[0] if rows else False
    if with_ap:
        table.add_column("AP", justify="right")
    if with_threshold:
        table.add_column("threshold", justify="right")
    for row in sorted(rows, key=lambda r: -r["positives"]):
        cells = [
            str(row["id"]),
            Text(row["name"]),
            str(row["positives"]),
            f"{row['weight']:.3f}",
            str(row["tp"]),
            str(row["fp"]),
            f"{row['precision']:.3f}",
            f"{row['recall']:.3f}",
            f"{row['f1']:.3f}",
        ]
        if with_ap:
            cells.append("-" if row["ap"] is None else f"{row['ap']:.3f}")
        if with_threshold:
            cells.append(f"{row['threshold']:.3f}")
        table.add_row(*cells, style="dim" if row["positives"] == 0 else None)
    return table


def check_file(cfg: EvaluateConfig, labels: dict[str, np.ndarray] | None) -> tuple[Submission, list[str]]:
    """Parse and check `cfg.predictions`; returns the submission and the keys of unsorted lists.

    With labels, the file must cover every labelled image (or, with --subset, some of them)."""
    raw = read_submission_json(cfg.predictions)
    expected = image_keys(cfg.images) if cfg.images else None
    if expected is None and labels is not None and not cfg.subset:
        expected = labels.keys()
    allowed = labels.keys() if labels is not None else None
    try:
        submission = validate_submission(raw, expected=expected, allowed=allowed, source=cfg.predictions)
    except UserError as exc:
        hint = _wrong_images_hint(cfg, raw, labels)
        if hint:
            raise UserError(f"{hint}\n{exc}") from None
        if labels is not None and not cfg.subset and "missing image" in str(exc):
            raise UserError(
                f"{exc}\n(the labels in {cfg.labels} cover {len(labels)} images and a submission covers "
                f"each; to score only the images the file has, give --subset, or --split to name the "
                f"split of the shards it predicts)"
            ) from None
        raise
    return submission, unsorted_entries(raw)


def _wrong_images_hint(cfg: EvaluateConfig, raw: Any, labels: dict[str, np.ndarray] | None) -> str:
    """When none of the file's images is labelled: whose images they are and how to predict the
    labelled ones (the usual slip is predicting the default --split test and scoring it on val)."""
    if labels is None or not isinstance(raw, dict) or not raw or any(key in labels for key in raw):
        return ""
    keys = set(raw)
    if is_shard_folder(cfg.labels):
        for split in ("test", "train"):
            if keys <= set(image_keys(cfg.labels, split)):
                return (
                    f"{cfg.predictions} holds the {split} split's images ({len(keys)} of them), and "
                    f"--labels {cfg.labels} scores its val split ({len(labels)} images): predict them "
                    f"with cocoshard predict ... --shards {cfg.labels} --split val"
                )
    return (
        f"none of the {len(keys)} images in {cfg.predictions} has labels in {cfg.labels}: predictions "
        f"of the test images cannot be scored; predict the labelled images (predict --split val)"
    )


@dataclass(frozen=True)
class Assessment:
    """What `evaluate` found: the checked file, notes on it, and its scores when labels were given."""

    submission: Submission
    notes: list[str]
    evaluation: Evaluation | None
    report: list[Path]


def assess(cfg: EvaluateConfig) -> Assessment:
    """Check the file strictly, then score it and write the report when labels are given."""
    labels = load_labels(cfg.labels, cfg.split) if cfg.labels else None
    submission, unsorted = check_file(cfg, labels)
    notes = [f"{len(unsorted)} list(s) were not sorted (accepted; e.g. {unsorted[0]!r})"] if unsorted else []
    if cfg.images and not is_shard_folder(cfg.images):
        skipped = skipped_note(cfg.images, folder_listing(cfg.images)[1])
        notes += [skipped] if skipped else []
    empty = sum(1 for ids in submission.values() if not ids)
    if empty:
        notes.append(
            f"{empty} image(s) have no class at all (every COCO image has one: see predict --min-labels)"
        )
    if labels is None:
        return Assessment(submission, notes, None, [])
    if cfg.subset and len(submission) < len(labels):
        notes.append(
            f"--subset: scoring the {len(submission)} images the file has, of the {len(labels)} labelled "
            f"(the server F1 weights come from these images only)"
        )
    scores = thresholds = None
    checkpoint = ""
    if cfg.scores:
        found = read_scores(cfg.scores)
        thresholds = found.thresholds
        checkpoint = f"{found.checkpoint} (sha256 {found.checkpoint_sha256[:12]})" if found.checkpoint else ""
        manifest = read_manifest(cfg.labels) if is_shard_folder(cfg.labels) else None
        identity = shards_identity(manifest) if manifest is not None else None
        split = labels_split(cfg.labels, cfg.split) if identity is not None else "val"
        check_scores_match(found, cfg.scores, submission, cfg.predictions, identity, split)
        if manifest is not None:
            other = check_trained_on(
                Trained(found.trained_on, found.trained_split),
                str(cfg.labels),
                manifest,
                what=f"the model that made {cfg.scores}",
                allow=cfg.allow_other_shards,
            )
            notes += [other] if other else []
        scores = load_scores(cfg.scores, sorted(submission))
    if cfg.run is not None and not (Path(cfg.run) / METRICS_LOG).is_file():
        raise UserError(
            f"--run {cfg.run}: no {METRICS_LOG} there, so no training curves to draw (give the run "
            f"folder cocoshard train wrote)"
        )
    evaluation = score_submission(submission, labels, scores, class_names_of(cfg.labels))
    evaluation = dataclasses.replace(evaluation, thresholds=thresholds)
    return Assessment(
        submission, notes, evaluation, _write_report(cfg, evaluation, checkpoint) if cfg.report else []
    )


def show(cfg: EvaluateConfig, found: Assessment) -> None:
    """Print the assessment for people, or as one JSON object on stdout with `--json`."""
    if found.evaluation is None:
        _show_format_only(cfg, found)
        return
    rows = per_class_rows(found.evaluation)
    if cfg.json:
        sys.stdout.write(json.dumps(metrics_payload(cfg, found)) + "\n")
        return
    console = stdout_console()
    console.print(f"[green]format OK[/]: {literal(cfg.predictions)} ({len(found.submission)} images)")
    for note in found.notes:
        console.print(f"[yellow]note[/]: {literal(note)}")
    console.print(_summary_table(found.evaluation, cfg.predictions))
    if cfg.per_class:
        console.print(_per_class_table(rows))
    if found.report:
        console.print(f"report: {literal(found.report[0])}")


def metrics_payload(cfg: EvaluateConfig, found: Assessment) -> dict[str, Any]:
    """The scores as one JSON-able object (what --json prints and --out writes)."""
    assert found.evaluation is not None
    payload: dict[str, Any] = {**found.evaluation.metrics, "format_ok": True, "notes": found.notes}
    if cfg.per_class:
        payload["per_class"] = per_class_rows(found.evaluation)
    if found.report:
        payload["report"] = [str(p) for p in found.report]
    return payload


def check_outputs(cfg: EvaluateConfig) -> None:
    """--out a file and --report a folder that can be written, neither an input of this command."""
    if cfg.out is not None:
        check_output_file(cfg.out, "--out")
    report = []
    if cfg.report is not None:
        check_output_folder(cfg.report, "--report")
        report = [("--report", Path(cfg.report) / name) for name in REPORT_FILES]
    outputs = [("--out", cfg.out), *report]
    inputs = [
        ("--predictions", cfg.predictions),
        ("--scores", cfg.scores),
        ("--run", Path(cfg.run) / METRICS_LOG if cfg.run else None),
        *[
            ("--labels", path)
            for _, path in outputs
            if cfg.labels and path and is_label_input(cfg.labels, path)
        ],
    ]
    check_apart(outputs, inputs)


def run(cfg: EvaluateConfig) -> int:
    """`cocoshard evaluate`: assess the file, show the result, and write it with --out."""
    print_config(cfg)
    check_outputs(cfg)
    found = assess(cfg)
    show(cfg, found)
    if cfg.out and found.evaluation is not None:
        atomic_write_text(cfg.out, json.dumps(metrics_payload(cfg, found), indent=1) + "\n")
    return 0


def _show_format_only(cfg: EvaluateConfig, found: Assessment) -> None:
    if cfg.json:
        sys.stdout.write(
            json.dumps({"format_ok": True, "images": len(found.submission), "notes": found.notes}) + "\n"
        )
        return
    count = len(found.submission)
    console = stdout_console()
    if cfg.images:
        console.print(
            f"[green]format OK[/]: {literal(cfg.predictions)} covers exactly the {count} images of "
            f"{literal(cfg.images)}, each once; give --labels to score it"
        )
    else:
        console.print(
            f"[green]format OK[/]: {literal(cfg.predictions)} ({count} images, every entry well formed); "
            f"[yellow]which images it must cover is not known without --images DIR[/] (the test folder): "
            f"give it to check that none is missing or extra"
        )
    for note in found.notes:
        console.print(f"[yellow]note[/]: {note}")


def _write_report(cfg: EvaluateConfig, evaluation: Evaluation, checkpoint: str = "") -> list[Path]:
    """The figures and summary, written under the report folder's lock (one writer at a time)."""
    from cocoshard.scoring.report import write_report

    about = {"predictions": cfg.predictions, "labels": cfg.labels}
    if checkpoint:
        about["checkpoint"] = checkpoint
    if cfg.allow_other_shards:
        about["warning"] = f"{OVERRIDE}: scored on shards other than those the model was trained on"
    with folder_lock(cfg.report, "cocoshard evaluate --report"):
        return write_report(
            cfg.report,
            evaluation.metrics,
            evaluation.server,
            average_precision=evaluation.average_precision,
            run_dir=cfg.run,
            title=f"Evaluation of {Path(cfg.predictions).name}",
            names=evaluation.names,
            about=about,
        )
