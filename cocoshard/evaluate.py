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
import os
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
from rich.console import Console
from rich.table import Table

from cocoshard import CLASSES, NUM_CLASSES, metrics
from cocoshard.config import EvaluateConfig
from cocoshard.errors import UserError
from cocoshard.labels import LabelError, parse_cls
from cocoshard.shards import EXT_LABELS, MANIFEST, decode_labels, read_manifest, shard_urls, split_member_name
from cocoshard.submission import Submission, read_submission_json, to_matrix, unsorted_entries, validate_submission

LABEL_SUFFIX = ".cls"


# ----------------------------------------------------------------------------------- inputs


def is_shard_folder(location: str | os.PathLike) -> bool:
    return (Path(location) / MANIFEST).is_file()


def read_label_folder(folder: str | os.PathLike) -> dict[str, np.ndarray]:
    """Multi-hot labels from a folder of `.cls` files, keyed by file stem."""
    files = sorted(Path(folder).glob("*" + LABEL_SUFFIX))
    if not files:
        raise UserError(f"{folder}: no {LABEL_SUFFIX} files here (give the labels folder or a shards folder)")
    labels = {}
    for file in files:
        try:
            ids = parse_cls(file.read_bytes()).ids
        except LabelError as exc:
            raise UserError(f"{file}: {exc}") from exc
        vector = np.zeros(NUM_CLASSES, dtype=bool)
        vector[list(ids)] = True
        labels[file.stem] = vector
    return labels


def _split_members(location: str | os.PathLike, split: str) -> dict[str, dict[str, bytes]]:
    """For each key of a split: its members (field -> bytes) that are labels; images are skipped.

    Tar members are read, never extracted, so names inside a shard never touch the filesystem.
    """
    samples: dict[str, dict[str, bytes]] = {}
    for url in shard_urls(location, read_manifest(location), split):
        try:
            with tarfile.open(url, mode="r:") as tar:
                for member in tar:
                    key, field = split_member_name(member.name)
                    fields = samples.setdefault(key, {})
                    if field == EXT_LABELS and member.isfile():
                        fields[field] = tar.extractfile(member).read()
        except (OSError, tarfile.TarError) as exc:
            raise UserError(f"{url}: cannot read this shard ({exc}); check it with cocoshard inspect --verify") from exc
    return samples


def read_shard_labels(location: str | os.PathLike, split: str = "val") -> dict[str, np.ndarray]:
    """Multi-hot labels of one split of a shards folder, keyed by sample key."""
    labels = {}
    for key, fields in _split_members(location, split).items():
        if EXT_LABELS not in fields:
            raise UserError(f"{location}: sample {key!r} of the {split} split has no labels")
        try:
            labels[key] = decode_labels(fields[EXT_LABELS]).astype(bool)
        except ValueError as exc:
            raise UserError(f"{location}: sample {key!r}: {exc}") from exc
    return labels


def class_names(location: Optional[str | os.PathLike]) -> tuple[str, ...]:
    """The names of the classes: a shards folder's manifest says them (a generated set has its
    own), anything else uses the challenge's."""
    if location is not None and is_shard_folder(location):
        names = read_manifest(location).get("classes")
        if isinstance(names, list) and len(names) == NUM_CLASSES:
            return tuple(str(name) for name in names)
    return CLASSES


def load_labels(location: str | os.PathLike) -> dict[str, np.ndarray]:
    """Labels from a shards folder (its val split) or from a folder of `.cls` files."""
    if not Path(location).is_dir():
        raise UserError(f"--labels {location}: no such folder")
    return read_shard_labels(location, "val") if is_shard_folder(location) else read_label_folder(location)


def image_keys(location: str | os.PathLike, split: str = "test") -> list[str]:
    """The keys a submission for `location` must hold: stems of a folder's images, or a split's keys."""
    if is_shard_folder(location):
        return sorted(_split_members(location, split))
    from cocoshard.predict import list_images

    return [file.stem for file in list_images(location)]


def load_scores(path: str | os.PathLike, keys: list[str]) -> np.ndarray:
    """Rows of a `predict --scores` file in the order of `keys` (every key must be there)."""
    from cocoshard.predict import read_scores

    stored_keys, scores = read_scores(path)
    row = {key: index for index, key in enumerate(stored_keys)}
    missing = [key for key in keys if key not in row]
    if missing:
        raise UserError(f"{path}: no scores for {len(missing)} evaluated image(s), e.g. {missing[0]!r}")
    return scores[[row[key] for key in keys]]


# ----------------------------------------------------------------------------------- scoring


@dataclass(frozen=True)
class Evaluation:
    """Everything `evaluate` reports: headline metrics, per-class arrays and the images scored."""

    keys: list[str]
    metrics: dict[str, float]
    server: metrics.ServerF1
    average_precision: Optional[np.ndarray]  # (C,) per-class AP, NaN without positives; None without scores
    class_names: tuple[str, ...] = CLASSES


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
            "name": evaluation.class_names[c],
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


# ----------------------------------------------------------------------------------- output


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
    evaluation = score_submission(submission, labels, scores, class_names(cfg.labels))
    return Assessment(submission, notes, evaluation, _write_report(cfg, evaluation) if cfg.report else [])


def show(cfg: EvaluateConfig, found: Assessment) -> None:
    """Print the assessment for people, or as one JSON object on stdout with `--json`."""
    if found.evaluation is None:
        _show_format_only(cfg, found)
        return
    rows = per_class_rows(found.evaluation)
    if cfg.json:
        payload: dict[str, Any] = {**found.evaluation.metrics, "format_ok": True, "notes": found.notes}
        if cfg.per_class:
            payload["per_class"] = rows
        if found.report:
            payload["report"] = [str(p) for p in found.report]
        sys.stdout.write(json.dumps(payload) + "\n")
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


def run(cfg: EvaluateConfig) -> int:
    """`cocoshard evaluate`: assess the file and show the result."""
    show(cfg, assess(cfg))
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
    from cocoshard.report import write_report

    return write_report(
        cfg.report, evaluation.metrics, evaluation.server, average_precision=evaluation.average_precision,
        run_dir=cfg.run, title=f"Evaluation of {Path(cfg.predictions).name}", names=evaluation.class_names,
    )
