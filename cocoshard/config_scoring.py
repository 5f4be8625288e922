"""The typed settings of the scoring commands: predict, evaluate, thresholds and ensemble.

Declared as `cocoshard.config` declares the others (one dataclass per command, every knob once,
validated when made), with the same shared checks and limits; kept apart so that each file holds
one stage's commands.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from cocoshard.config import (
    CACHE_HELP,
    CACHE_SIZE_HELP,
    CONNECT_HELP,
    MAX_BATCH,
    MAX_COUNT,
    MIN_LABELS,
    RETRIES_HELP,
    SPLIT_OF_LABELS_HELP,
    STALL_HELP,
    WORKERS_HELP,
    check_remote_settings,
    check_workers,
)
from cocoshard.errors import ConfigError
from cocoshard.settings import (
    Validated,
    finite,
    flag,
    fraction,
    in_range,
    inherit,
    non_negative,
    opt,
    positive,
)


@dataclass
class PredictConfig(Validated):
    """Predict classes for every test image and write the strict submission JSON."""

    checkpoint: str = opt("runs/train/best.pt", "checkpoint written by `cocoshard train`")
    shards: str | None = opt(None, "read the images from these shards (with --split)")
    split: str = opt(
        "test",
        "which split of --shards: test, val, train, a fold of a K-fold pack (fold2), or several joined "
        "by + (fold0+fold1)",
    )
    cache: str | None = opt(None, CACHE_HELP)
    cache_size: float | None = opt(None, CACHE_SIZE_HELP)
    connect_timeout: float = opt(10.0, CONNECT_HELP)
    stall_timeout: float = opt(60.0, STALL_HELP)
    retries: int = opt(3, RETRIES_HELP)
    images: str | None = opt(None, "read a folder of JPEGs instead (e.g. the zip's test folder)")
    out: str = opt("predictions.json", "submission JSON to write")
    threshold: float | None = opt(
        None, "one threshold for every class instead of the checkpoint's tuned ones"
    )
    thresholds: str | None = opt(
        None, "per-class thresholds from this file (`cocoshard thresholds --out`) instead of the checkpoint's"
    )
    min_labels: int = opt(MIN_LABELS, "keep the top classes of an image until it has at least this many")
    unreadable: Literal["fail", "prior"] = opt(
        "fail",
        "images that cannot be read: fail, naming each; or prior: give them the most frequent training class "
        "(said on screen and in the scores file)",
    )
    tta: bool = opt(False, "average with the horizontally flipped image")
    scores: str | None = opt(None, "also save raw probabilities with keys (.npz) for re-thresholding")
    batch_size: int = opt(256, "images per forward pass")
    workers: int | None = opt(None, WORKERS_HELP)
    amp: bool = opt(True, "mixed precision on the device")
    device: Literal["auto", "cpu", "cuda"] = opt("auto", "where to run")
    allow_other_shards: bool = opt(
        False,
        "go on when the shards are not the ones the model was trained on (a re-pack: its val images "
        "may have been trained on); said on screen and recorded in what it writes",
    )

    def validate(self) -> None:
        if (self.shards is None) == (self.images is None):
            raise ConfigError("give exactly one of --shards (with --split) or --images DIR")
        if self.threshold is not None and self.thresholds is not None:
            raise ConfigError("give one of --threshold (one for every class) or --thresholds FILE, not both")
        finite(self, "threshold")
        if self.threshold is not None and not 0.0 <= self.threshold <= 1.0:
            raise ConfigError(f"--threshold must be a probability in [0, 1] (got {self.threshold})")
        if not 0 <= self.min_labels <= 80:
            raise ConfigError(f"--min-labels must be in 0-80: there are 80 classes (got {self.min_labels})")
        in_range(self, "batch_size", 1, MAX_BATCH)
        check_workers(self)
        check_remote_settings(self)


@dataclass
class EvaluateConfig(Validated):
    """Score a submission JSON against .cls labels: the leaderboard's F1 and friends."""

    predictions: str = opt("predictions.json", "submission JSON to check and score")
    labels: str | None = opt(
        None,
        "folder of .cls files, or shards folder (its val split, every fold of a K-fold pack, or --split); "
        "omit to only check the format",
    )
    split: str | None = opt(None, SPLIT_OF_LABELS_HELP)
    images: str | None = opt(
        None, "folder of images (or shards folder: its test split) the file must cover exactly, each once"
    )
    subset: bool = opt(
        False, "score the images the file predicts even when it leaves out some of the labelled ones"
    )
    scores: str | None = opt(None, "raw probabilities (.npz from predict --scores) for mAP")
    per_class: bool = opt(False, "print a per-class table")
    report: str | None = opt(None, "write PNG figures and a markdown summary to this folder")
    run: str | None = opt(None, "run folder whose metrics.jsonl gives loss and F1 curves for --report")
    json: bool = opt(False, "print the metrics as one JSON object on stdout")
    out: str | None = opt(
        None, "also write the metrics (and, with --per-class, the per-class rows) to this JSON file"
    )
    allow_other_shards: bool = opt(
        False,
        "go on when the shards are not the ones the model was trained on (a re-pack: its val images "
        "may have been trained on); said on screen and recorded in what it writes",
    )

    def validate(self) -> None:
        if self.labels is None:
            for name in ("scores", "report", "out", "split"):
                if getattr(self, name) is not None:
                    raise ConfigError(f"{flag(name)} needs --labels: there is nothing to score without them")
            for name in ("per_class", "subset"):
                if getattr(self, name):
                    raise ConfigError(f"{flag(name)} needs --labels: there is nothing to score without them")
        if self.run is not None and self.report is None:
            raise ConfigError("--run gives the curves of --report DIR: give --report too")


@dataclass
class ThresholdsConfig(Validated):
    """Tune per-class thresholds for the server F1 from saved scores; write a file predict takes."""

    scores: str = opt(
        "val-scores.npz", "scores of the validation split (`cocoshard predict --split val --scores`)"
    )
    labels: str = opt(
        "shards",
        "shards folder (its val split, every fold of a K-fold pack, or --split) or folder of .cls files "
        "with the true labels",
    )
    split: str | None = opt(None, SPLIT_OF_LABELS_HELP)
    out: str = opt("thresholds.json", "thresholds file to write (`cocoshard predict --thresholds FILE`)")
    min_positives: int = opt(
        10, "classes with fewer positive images keep the default threshold (fewer overfit)"
    )
    default: float = opt(0.5, "the threshold of classes too rare to tune")
    allow_other_shards: bool = opt(
        False,
        "go on when the shards are not the ones the model was trained on (a re-pack: its val images "
        "may have been trained on); said on screen and recorded in what it writes",
    )

    def validate(self) -> None:
        in_range(self, "min_positives", 1, MAX_COUNT)
        fraction(self, "default", low_open=False)


@dataclass
class EnsembleConfig(Validated):
    """Average several runs' models into one submission, with thresholds tuned on all their
    validation scores (out-of-fold for the runs of a K-fold pack)."""

    runs: tuple[str, ...] = opt(
        (),
        "run folders of cocoshard train: one per fold of a K-fold pack (train --val-fold), or several "
        "models on the same split",
        positional=True,
        metavar="RUN",
    )
    out: str = opt(
        "ensemble",
        "output folder: predictions.json, test-scores.npz, thresholds.json, val-predictions.json, "
        "val-scores.npz, ensemble.json",
    )
    shards: str | None = opt(
        None, "the runs' shards: labels and test images (default: the shards the first run trained on)"
    )
    images: str | None = opt(None, "predict a folder of test images instead of the shards' test split")
    test_scores: tuple[str, ...] = opt(
        (),
        "each run's saved test scores (predict --scores with its best.pt), in the order of the runs, "
        "instead of predicting",
        metavar="NPZ",
    )
    tta: bool = inherit(PredictConfig, "tta", False)
    min_positives: int = inherit(ThresholdsConfig, "min_positives", 10)
    default: float = inherit(ThresholdsConfig, "default", 0.5)
    min_labels: int = inherit(PredictConfig, "min_labels", 1)
    unreadable: Literal["fail", "prior"] = inherit(PredictConfig, "unreadable", "fail")
    batch_size: int = inherit(PredictConfig, "batch_size", 256)
    workers: int | None = inherit(PredictConfig, "workers", None)
    amp: bool = inherit(PredictConfig, "amp", True)
    device: Literal["auto", "cpu", "cuda"] = inherit(PredictConfig, "device", "auto")

    def validate(self) -> None:
        if not self.runs:
            raise ConfigError("name the runs to ensemble: cocoshard ensemble RUN [RUN ...] --out DIR")
        if self.test_scores and len(self.test_scores) != len(self.runs):
            raise ConfigError(
                f"--test-scores gives {len(self.test_scores)} files for {len(self.runs)} runs: one per run, "
                f"in the order of the runs"
            )
        if self.test_scores and self.images is not None:
            raise ConfigError("--test-scores are the test scores already: --images has nothing to predict")
        positive(self, "min_positives", "batch_size")
        fraction(self, "default", low_open=False)
        non_negative(self, "workers")
        if not 0 <= self.min_labels <= 80:
            raise ConfigError(f"--min-labels must be in 0-80: there are 80 classes (got {self.min_labels})")
