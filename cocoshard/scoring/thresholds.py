"""`cocoshard thresholds`: tune the 80 per-class thresholds for the server F1 from saved scores.

    $ cocoshard predict --checkpoint runs/train/best.pt --shards shards --split val \
          --out val.json --scores val.npz
    $ cocoshard thresholds --scores val.npz --labels shards --out thresholds.json
    $ cocoshard thresholds --scores runs/fold2/val-scores.npz --labels shards-5fold --split fold2
    $ cocoshard predict --checkpoint runs/train/best.pt --images ms-coco/images/test-resized/test-resized \\
          --thresholds thresholds.json --out predictions.json

Training already tunes thresholds on the validation split at every epoch; this re-tunes them from
a scores file without touching the model: after `--tta` changed the scores, with another
`--min-positives`, or on labels of your own. The tuning is `threshold_tuning.tune_thresholds` (coordinate
ascent on the server F1 itself); a class with fewer than `--min-positives` positive images keeps
`--default` (tuning a threshold on a handful of images fits noise: with the challenge's long tail
that is ~2 of the 80 classes at 10, more on a small validation split). What tuning buys is also
measured on a held-out half of the images, so a gain that only fits noise shows up.
"""

from __future__ import annotations

import numpy as np
from rich.table import Table
from rich.text import Text

from cocoshard.config import ThresholdsConfig
from cocoshard.console import literal, stdout_console
from cocoshard.errors import UserError
from cocoshard.pure import metrics, threshold_tuning
from cocoshard.scoring.ground_truth import class_names_of, load_labels
from cocoshard.scoring.scores import read_scores
from cocoshard.scoring.threshold_files import write_thresholds_file
from cocoshard.settings import print_config


def run(cfg: ThresholdsConfig) -> int:
    """Tune, report what the tuning buys (and on which classes it could not), write the file."""
    print_config(cfg)
    found = read_scores(cfg.scores)
    labels = load_labels(cfg.labels, cfg.split)
    unlabelled = [key for key in found.keys if key not in labels]
    if unlabelled:
        raise UserError(
            f"{cfg.scores}: {len(unlabelled)} scored images have no labels in {cfg.labels} (e.g. "
            f"{unlabelled[0]!r}): tune on the scores of the split the labels describe (predict --split val)"
        )
    truth = np.stack([labels[key] for key in found.keys])
    tuned = threshold_tuning.tune_thresholds(
        found.scores, truth, default=cfg.default, min_positives=cfg.min_positives
    )
    counts = truth.sum(axis=0)
    kept = [c for c in range(len(counts)) if counts[c] < cfg.min_positives]
    figures = {
        "with the scores' own thresholds": metrics.server_f1(
            metrics.predictions_from_scores(found.scores, found.thresholds), truth
        ).f1,
        f"at {cfg.default} for every class": metrics.server_f1(
            metrics.predictions_from_scores(found.scores, cfg.default), truth
        ).f1,
        "tuned (on these same images)": metrics.server_f1(
            metrics.predictions_from_scores(found.scores, tuned), truth
        ).f1,
    }
    holdout = threshold_tuning.holdout_threshold_gain(
        found.scores, truth, default=cfg.default, min_positives=cfg.min_positives
    )
    names = class_names_of(cfg.labels)
    write_thresholds_file(
        cfg.out,
        tuned,
        classes=list(names),
        tuned_on=str(cfg.scores),
        labels=str(cfg.labels),
        images=len(found.keys),
        min_positives=cfg.min_positives,
        default=cfg.default,
        kept_default=kept,
        server_f1_tuned=figures["tuned (on these same images)"],
        heldout_gain=holdout["gain"],
    )
    console = stdout_console()
    table = Table(title=f"server F1 of {len(found.keys)} images", show_header=False, box=None)
    for label, value in figures.items():
        table.add_row(label, f"{value:.4f}")
    table.add_row("gain of tuning on a held-out half", f"{holdout['gain']:+.4f}")
    console.print(table)
    if kept:
        shown = ", ".join(f"{names[c]} ({int(counts[c])})" for c in kept[:12])
        console.print(
            Text(
                f"{len(kept)} classes keep {cfg.default}: fewer than {cfg.min_positives} positive images "
                f"here: {shown}{' ...' if len(kept) > 12 else ''}"
            )
        )
    console.print(
        f"[green]wrote[/] {literal(cfg.out)}: use it with cocoshard predict --thresholds {literal(cfg.out)}"
    )
    return 0
