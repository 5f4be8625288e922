"""`cocoshard ensemble`: several runs as one submission, with thresholds tuned on all their validation scores.

    $ cocoshard ensemble runs/fold0 runs/fold1 runs/fold2 runs/fold3 runs/fold4 --out ensemble
    $ cocoshard ensemble runs/seed0 runs/seed1 runs/seed2 --out ensemble --tta
    $ cocoshard ensemble runs/fold0 runs/fold1 --test-scores fold0-test.npz fold1-test.npz --out ensemble

The K-fold recipe (docs/kfold.md): `pack --folds K`, one `train --val-fold i` per fold, then this.
Each run's best epoch left its validation scores (`val-scores.npz`); for the runs of a K-fold
set they are out-of-fold scores, together every labelled image scored once by a model that never
trained on it, so the 80 thresholds are tuned on K times the images a validation split offers
(runs on one split: on the average of their scores). Tuning is `cocoshard thresholds`'s
(`--min-positives`, `--default`), with the gain on a held-out half reported. The test images are
scored by each run's best.pt through `cocoshard predict` (`--tta` averages with the flipped
image, and then the validation scores are made the same way), or taken from saved
`--test-scores`; the runs' probabilities are averaged, then thresholded. Writes, under `--out`:

    predictions.json       the submission (strict JSON, read back and checked)
    test-scores.npz        the averaged test scores and the thresholds (`predict --scores` format)
    thresholds.json        the tuned thresholds (`predict --thresholds`)
    val-predictions.json   the validation (out-of-fold) predictions, and val-scores.npz: for
                           `evaluate --labels SHARDS --scores ... --report DIR`
    ensemble.json          the runs, what was tuned on, the figures
    members/               each run's own predictions and scores, when they were computed here
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from rich.table import Table

from cocoshard.atomic import atomic_write_text
from cocoshard.commands import run_command
from cocoshard.config_scoring import EnsembleConfig, PredictConfig
from cocoshard.console import literal, stdout_console
from cocoshard.errors import UserError
from cocoshard.folder_lock import folder_lock
from cocoshard.prepare.manifest import manifest_class_names, read_manifest, shards_identity
from cocoshard.pure import metrics, threshold_tuning
from cocoshard.scoring.ground_truth import labels_split, load_labels
from cocoshard.scoring.members import (
    Member,
    ScoreSet,
    average_scores,
    check_members,
    read_member,
    validation_set,
)
from cocoshard.scoring.scores import Scores, read_scores, save_scores
from cocoshard.scoring.submission import build_submission, load_submission, to_matrix, write_submission
from cocoshard.scoring.threshold_files import write_thresholds_file
from cocoshard.settings import print_config

TEST_JSON, TEST_SCORES, THRESHOLDS = "predictions.json", "test-scores.npz", "thresholds.json"
VAL_JSON, VAL_SCORES, SUMMARY, MEMBERS = "val-predictions.json", "val-scores.npz", "ensemble.json", "members"


# ----------------------------------------------------------------------------------- scores of the runs


def predict_member(cfg: EnsembleConfig, member: Member, index: int, split: str, shards: str) -> Scores:
    """One run's scores of a split (or of `--images`), made by `cocoshard predict` with its best.pt."""
    folder = Path(cfg.out) / MEMBERS
    folder.mkdir(parents=True, exist_ok=True)
    stem = f"{index}-{member.run.name}-{split}"
    images = cfg.images if split == "test" else None
    predict = PredictConfig(
        checkpoint=str(member.checkpoint),
        shards=None if images else shards,
        split=split,
        images=images,
        out=str(folder / f"{stem}-predictions.json"),
        scores=str(folder / f"{stem}-scores.npz"),
        tta=cfg.tta,
        min_labels=cfg.min_labels,
        unreadable=cfg.unreadable,
        batch_size=cfg.batch_size,
        workers=cfg.workers,
        amp=cfg.amp,
        device=cfg.device,
    )
    if run_command("predict", predict) != 0:
        raise UserError(f"predicting {split} with {member.checkpoint} failed")
    return read_scores(predict.scores or "")


def saved_test_scores(cfg: EnsembleConfig, member: Member, path: str) -> Scores:
    """A run's test scores given with --test-scores, checked to come from its best.pt, made as asked."""
    found = read_scores(path)
    if found.checkpoint_sha256 != member.sha256:
        raise UserError(
            f"--test-scores {path} were not made by {member.checkpoint} (another checkpoint's scores)"
        )
    if found.split not in ("test", "images"):
        raise UserError(f"--test-scores {path} score the {found.split!r} split, not the test images")
    if found.tta != cfg.tta:
        raise UserError(
            f"--test-scores {path} were made {'with' if found.tta else 'without'} --tta: give the same to "
            f"ensemble, so that the validation scores are made the same way"
        )
    return found


def test_set(cfg: EnsembleConfig, members: list[Member], shards: str) -> tuple[ScoreSet, list[str]]:
    """The averaged test scores, and the images the runs could not read (--unreadable prior)."""
    if cfg.test_scores:
        sets = [saved_test_scores(cfg, m, path) for m, path in zip(members, cfg.test_scores, strict=True)]
    else:
        sets = [predict_member(cfg, m, index, "test", shards) for index, m in enumerate(members)]
    unreadable = sorted({key for found in sets for key in found.unreadable})
    return average_scores(sets, "test"), unreadable


def validation_scores(cfg: EnsembleConfig, members: list[Member], shards: str) -> ScoreSet:
    """Out-of-fold (or averaged) validation scores: saved by training, or made with --tta."""
    if not cfg.tta:
        return validation_set(members, [member.val for member in members])
    made = [
        predict_member(cfg, member, index, member.val_split, shards) for index, member in enumerate(members)
    ]
    return validation_set(members, made)


# ----------------------------------------------------------------------------------- tuning


def submitted_f1(found: ScoreSet, thresholds: np.ndarray, truth: np.ndarray, min_labels: int) -> float:
    """The server F1 of what a submission of these scores holds (thresholds, then --min-labels)."""
    predicted = metrics.predictions_from_scores(found.scores, thresholds)
    submission = build_submission(found.keys, predicted, found.scores, min_labels=min_labels)
    return metrics.server_f1(to_matrix(submission, found.keys), truth).f1


def tune(cfg: EnsembleConfig, found: ScoreSet, truth: np.ndarray) -> tuple[np.ndarray, dict[str, float]]:
    """The 80 thresholds, as `cocoshard thresholds` tunes them, and what they give."""
    scores = found.scores.astype(np.float64)
    tuned = threshold_tuning.tune_thresholds(
        scores, truth, default=cfg.default, min_positives=cfg.min_positives
    )
    holdout = threshold_tuning.holdout_threshold_gain(
        scores, truth, default=cfg.default, min_positives=cfg.min_positives, min_labels=cfg.min_labels
    )
    default = np.full(len(tuned), cfg.default)
    return tuned, {
        "server_f1_tuned": submitted_f1(found, tuned, truth, cfg.min_labels),
        "server_f1_at_default": submitted_f1(found, default, truth, cfg.min_labels),
        "heldout_gain": holdout["gain"],
    }


def member_figures(cfg: EnsembleConfig, member: Member, labels: dict[str, np.ndarray]) -> dict[str, Any]:
    """A run on its own: its validation images and its server F1 there with its own thresholds."""
    own = ScoreSet(member.val.keys, member.val.scores.astype(np.float32), member.val_split, member.val.source)
    truth = np.stack([labels[key] for key in own.keys])
    return {
        "run": str(member.run),
        "checkpoint_sha256": member.sha256,
        "val_split": member.val_split,
        "val_images": len(own.keys),
        "val_server_f1": submitted_f1(own, member.val.thresholds, truth, cfg.min_labels),
        "model": member.settings.model,
        "seed": member.settings.seed,
    }


# ----------------------------------------------------------------------------------- outputs


def write_outputs(
    cfg: EnsembleConfig,
    members: list[Member],
    test: ScoreSet,
    val: ScoreSet,
    thresholds: np.ndarray,
    about: dict,
) -> None:
    """The submission and its scores, the validation predictions and scores, the thresholds, the summary."""
    out = Path(cfg.out)
    made_by = f"ensemble of {len(members)} runs: " + ", ".join(str(m.checkpoint) for m in members)
    digest = hashlib.sha256("".join(m.sha256 for m in members).encode()).hexdigest()
    for found, json_name, scores_name in ((test, TEST_JSON, TEST_SCORES), (val, VAL_JSON, VAL_SCORES)):
        scores = Scores(
            found.keys,
            found.scores,
            thresholds,
            cfg.min_labels,
            cfg.tta,
            made_by,
            digest,
            found.source,
            found.split,
            about["unreadable"] if found is test else [],
        )
        write_submission(out / json_name, scores.submission())
        load_submission(out / json_name, expected=found.keys)  # what was written is what was checked
        save_scores(out / scores_name, scores)
    write_thresholds_file(
        out / THRESHOLDS,
        thresholds,
        classes=list(about["classes"]),
        tuned_on=f"{about['kind']} validation scores of {len(members)} runs ({val.split})",
        labels=about["shards"],
        images=len(val.keys),
        min_positives=cfg.min_positives,
        default=cfg.default,
        server_f1_tuned=about["figures"]["server_f1_tuned"],
        heldout_gain=about["figures"]["heldout_gain"],
    )
    summary = {key: value for key, value in about.items() if key != "classes"}
    atomic_write_text(out / SUMMARY, json.dumps(summary, indent=1) + "\n")


def check_out(out: Path, members: list[Member]) -> None:
    """The output folder is not one of the runs (their files would be replaced)."""
    for member in members:
        if out.resolve() == member.run.resolve():
            raise UserError(f"--out {out} is the run folder {member.run}: choose a folder of its own")


def show(cfg: EnsembleConfig, about: dict[str, Any], val_split: str) -> None:
    """The runs, what tuning on all their validation scores gave, the files, the next commands."""
    console = stdout_console()
    table = Table(title=f"ensemble of {len(about['runs'])} runs ({about['kind']})", title_justify="left")
    for column in ("run", "validated on", "images", "server F1 (own thresholds)"):
        table.add_column(column, justify="left" if column in ("run", "validated on") else "right")
    for row in about["runs"]:
        table.add_row(
            literal(row["run"]), row["val_split"], str(row["val_images"]), f"{row['val_server_f1']:.4f}"
        )
    console.print(table)
    figures, out = about["figures"], Path(cfg.out)
    console.print(
        f"thresholds tuned on {about['val_images']} validation images ({val_split}): server F1 "
        f"{figures['server_f1_tuned']:.4f} (on those same images; {figures['server_f1_at_default']:.4f} "
        f"at {cfg.default}), gain on a held-out half {figures['heldout_gain']:+.4f}"
    )
    console.print(
        f"[green]wrote[/] {literal(out / TEST_JSON)}: {about['test_images']} test images, the average of "
        f"{len(about['runs'])} runs' scores{' with TTA' if cfg.tta else ''}; {literal(out / THRESHOLDS)}, "
        f"{literal(out / TEST_SCORES)}, {literal(out / VAL_JSON)}, {literal(out / VAL_SCORES)}"
    )
    split = "" if about["default_split"] else f" --split {val_split}"
    console.print("next: check the submission, and look at the validation predictions:")
    console.print(
        literal(
            f"  cocoshard evaluate --predictions {out / TEST_JSON} --images {cfg.images or about['shards']}"
        )
    )
    console.print(
        literal(
            f"  cocoshard evaluate --predictions {out / VAL_JSON} --labels {about['shards']}{split} "
            f"--scores {out / VAL_SCORES} --per-class --report {out / 'report'}"
        )
    )


def run(cfg: EnsembleConfig) -> int:
    """Read and check the runs, tune on their validation scores, average their test scores, write."""
    print_config(cfg)
    members = [read_member(run) for run in cfg.runs]
    shards = cfg.shards or members[0].settings.shards
    manifest = read_manifest(shards)
    check_members(members, manifest, shards)
    out = Path(cfg.out)
    check_out(out, members)
    with folder_lock(out, "cocoshard ensemble"):
        val = validation_scores(cfg, members, shards)
        labels = load_labels(shards, val.split)
        if set(labels) != set(val.keys):
            raise UserError(
                f"the runs' validation scores cover {len(val.keys)} images, the {val.split} split of "
                f"{shards} {len(labels)}: the runs were not trained on these shards"
            )
        truth = np.stack([labels[key] for key in val.keys])
        thresholds, figures = tune(cfg, val, truth)
        test, unreadable = test_set(cfg, members, shards)
        about = {
            "kind": "out-of-fold" if val.split != "val" else "averaged",
            "shards": str(shards),
            "identity": shards_identity(manifest),
            "classes": manifest_class_names(manifest),
            "val_split": val.split,
            "default_split": val.split == labels_split(shards),
            "val_images": len(val.keys),
            "tta": cfg.tta,
            "figures": figures,
            "runs": [member_figures(cfg, member, labels) for member in members],
            "test_images": len(test.keys),
            "test_source": test.source,
            "unreadable": unreadable,
            "settings": {key: value for key, value in asdict(cfg).items()},
        }
        write_outputs(cfg, members, test, val, thresholds, about)
    show(cfg, about, val.split)
    return 0
