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

from cocoshard.config_scoring import ThresholdsConfig
from cocoshard.console import literal, stdout_console
from cocoshard.errors import UserError
from cocoshard.output_paths import check_apart, check_output_file
from cocoshard.prepare.manifest import read_manifest
from cocoshard.pure import decision, metrics, threshold_tuning
from cocoshard.scoring.ground_truth import class_names_of, is_label_input, is_shard_folder, load_labels
from cocoshard.scoring.same_shards import Trained, check_trained_on
from cocoshard.scoring.scores import Scores, read_scores
from cocoshard.scoring.threshold_files import write_thresholds_file
from cocoshard.settings import print_config


def _other_shards(cfg: ThresholdsConfig, found: Scores) -> str:
    """Refuse to tune on the val split of shards the model was not trained on (a re-pack: images it
    learned from would pull the thresholds), unless --allow-other-shards; the warning then, else ""."""
    if not is_shard_folder(cfg.labels):
        return ""
    trained = Trained(found.trained_on, found.trained_split)
    what = f"the model that made {cfg.scores}"
    manifest = read_manifest(cfg.labels)
    return check_trained_on(trained, cfg.labels, manifest, what=what, allow=cfg.allow_other_shards) or ""


def run(cfg: ThresholdsConfig) -> int:
    """Tune, report what the tuning buys (and on which classes it could not), write the file."""
    print_config(cfg)
    check_output_file(cfg.out, "--out")
    labels = [("--labels", cfg.out)] if is_label_input(cfg.labels, cfg.out) else []
    check_apart([("--out", cfg.out)], [("--scores", cfg.scores), *labels])
    found = read_scores(cfg.scores)
    labels = load_labels(cfg.labels, cfg.split)
    unlabelled = [key for key in found.keys if key not in labels]
    if unlabelled:
        raise UserError(
            f"{cfg.scores}: {len(unlabelled)} scored images have no labels in {cfg.labels} (e.g. "
            f"{unlabelled[0]!r}): tune on the scores of the split the labels describe (predict --split val)"
        )
    other_shards = _other_shards(cfg, found)
    truth = np.stack([labels[key] for key in found.keys])
    tuned = threshold_tuning.tune_thresholds(
        found.scores, truth, default=cfg.default, min_positives=cfg.min_positives
    )
    counts = truth.sum(axis=0)
    kept = [c for c in range(len(counts)) if counts[c] < cfg.min_positives]
    written = found.min_labels  # the --min-labels predict wrote with: every figure is of what it writes

    def server(thresholds: float | np.ndarray) -> float:
        return metrics.server_f1(decision.decide_labels(found.scores, thresholds, written), truth).f1

    figures = {
        "with the scores' own thresholds": server(found.thresholds),
        f"at {cfg.default} for every class": server(cfg.default),
        "tuned (on these same images)": server(tuned),
    }
    holdout = threshold_tuning.holdout_threshold_gain(
        found.scores, truth, default=cfg.default, min_positives=cfg.min_positives, min_labels=written
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
        min_labels=written,
        kept_default=kept,
        server_f1_tuned=figures["tuned (on these same images)"],
        heldout_gain=holdout["gain"],
        **({"other_shards": other_shards} if other_shards else {}),
    )
    console = stdout_console()
    table = Table(
        title=f"server F1 of {len(found.keys)} images, as predict writes them (--min-labels {written})",
        show_header=False,
        box=None,
    )
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
    if other_shards:
        console.print(f"[bold yellow]warning:[/] {literal(other_shards)}")
    console.print(
        f"[green]wrote[/] {literal(cfg.out)}: use it with cocoshard predict --thresholds {literal(cfg.out)}"
    )
    return 0
