"""One typed configuration per command: every knob declared once, with its type, default and help.

The scoring commands' (predict, evaluate, thresholds, ensemble) are in `cocoshard.config_scoring`.

The CLI builds its flags from these dataclasses; a `--config FILE` (TOML or JSON) overrides the
defaults and command-line flags override the file (`cocoshard.settings.resolve`). Every config
validates itself when it is made, so a value that cannot work is refused before any work starts,
wherever the config comes from. `settings.to_dict` is what gets printed at start
(`settings.print_config`) and saved beside every checkpoint; `settings.from_dict` reads it back.

`workers` means the same for every command: unset chooses automatically, 0 does the work in this
process, N uses N worker processes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from cocoshard.errors import ConfigError
from cocoshard.settings import (
    Validated,
    finite,
    fraction,
    in_range,
    inherit,
    non_negative,
    opt,
    positive,
)

WORKERS_HELP = "worker processes (unset: automatic; 0: in this process)"
# Shards at URLs (s3://, gs://, http(s)://, pipe:): the same flags wherever shards are read.
CACHE_HELP = (
    "keep shards read from URLs in this local folder, checked, downloaded once per node (shared by its "
    "ranks and loader workers)"
)
CACHE_SIZE_HELP = (
    "GB the --cache folder may hold, least recently used shards removed first (unset: its free disk)"
)
CONNECT_HELP = "seconds to connect to the server of a URL"
STALL_HELP = "seconds a read from a URL may receive nothing before it fails (a stalled server)"
RETRIES_HELP = "further tries of a URL read that failed in a way that may pass (waiting 1, 2, 4, ... s)"
SPLIT_OF_LABELS_HELP = (
    "the split of --labels SHARDS to read (unset: val, or every fold of a K-fold pack; a fold: fold2; "
    "several: fold0+fold1)"
)
MAX_FOLDS = 100  # `pack --folds`: the names have one or two digits (fold0 ... fold99)
RESUME_LAST = "last"  # `--resume` without a path: OUT/last.pt, which must exist
RESUME_AUTO = "auto"  # `--resume auto`: OUT/last.pt when it exists, else a new run (torchrun restarts)
# the help groups of `cocoshard train --help`, in the order they are shown
DATA, MODEL, OPTIMISATION, LOSS = "data and outputs", "model", "optimisation", "loss"
AVERAGING, INPUT, SPEED = "weight average", "input and augmentation", "speed"
LOADING, RUN = "loading and device", "run control"
# predict's --min-labels default: the top-up every score training reports is computed with too
MIN_LABELS = 1
# The ranges the readers accept, so that a value no reader takes is refused before anything is written.
MAX_SEED = 2**32 - 1  # NumPy's legacy seeding and every generator cocoshard makes take 32 bits
MAX_IMAGE_SIDE = 8192  # an image side (synth, pack's canvas, the training resolution): 8192^2 px is the
# most an input image may have (prepare.sources.MAX_IMAGE_PIXELS)
MAX_WORKERS = 512
MAX_THREADS = 1024
MAX_BATCH = 65536
MAX_COUNT = 10**9  # epochs, steps and the like: far beyond any run, well inside every integer type


def check_remote_settings(cfg: Any) -> None:
    """The checks of the settings every command reading shards from URLs has."""
    positive(cfg, "connect_timeout", "stall_timeout")
    non_negative(cfg, "retries")
    if cfg.cache_size is not None:
        positive(cfg, "cache_size")


def check_seed(cfg: Any) -> None:
    """A seed every random generator of the package accepts: 0 to 2^32 - 1."""
    in_range(cfg, "seed", 0, MAX_SEED)


def check_workers(cfg: Any) -> None:
    """`workers` unset, or 0 to MAX_WORKERS processes."""
    in_range(cfg, "workers", 0, MAX_WORKERS)


# ----------------------------------------------------------------------------------- commands


@dataclass
class SynthConfig(Validated):
    """Write a learnable synthetic multi-label data set in the challenge's folder layout."""

    out: str = opt("synthetic", "output folder (challenge layout: images/..., labels/...)")
    train: int = opt(4000, "number of labelled train images")
    test: int = opt(500, "number of unlabelled test images")
    seed: int = opt(0, "random seed: the same seed gives the same files")
    size: int = opt(224, "long side of every image in pixels")
    quality: int = opt(90, "JPEG quality")
    workers: int | None = opt(None, WORKERS_HELP)
    min_scale: float = opt(0.125, "smallest object as a fraction of the long side")
    max_scale: float = opt(1 / 3, "largest object as a fraction of the long side")
    clutter: float = opt(1.0, "background noise and distractor strokes (0: clean gradient)")
    tail: float = opt(0.8, "class frequency ~ (id + 1) ** -tail (0: balanced classes)")
    rotation: float = opt(180.0, "objects turn by up to this many degrees either way (0: upright)")

    MAX_IMAGES = 999_999_999  # keys are 12 digits and test keys start at 1,000,000,000

    def validate(self) -> None:
        positive(self, "train")
        non_negative(self, "test", "clutter", "tail")
        check_workers(self)
        check_seed(self)
        in_range(self, "size", 16, MAX_IMAGE_SIDE)
        finite(self, "min_scale", "max_scale", "rotation")
        if not 1 <= self.quality <= 100:
            raise ConfigError(f"--quality must be in 1-100 (got {self.quality})")
        if not 0.0 < self.min_scale <= self.max_scale <= 1.0:
            raise ConfigError(
                f"need 0 < --min-scale <= --max-scale <= 1 (got {self.min_scale}, {self.max_scale})"
            )
        if not 0.0 <= self.rotation <= 180.0:
            raise ConfigError(f"--rotation must be in [0, 180] degrees (got {self.rotation})")
        if max(self.train, self.test) > self.MAX_IMAGES:
            raise ConfigError(f"at most {self.MAX_IMAGES:,} images per split")


@dataclass
class PackConfig(Validated):
    """Pack the challenge folder, once, into WebDataset tar shards plus a manifest."""

    root: str = opt(
        "ms-coco", "challenge folder (either layout: images/train-resized/train-resized or images/train)"
    )
    out: str = opt("shards", "output folder for {train,val,test}-NNNNNN.tar and manifest.json")
    train_images: str | None = opt(None, "folder of train JPEGs (overrides the one found under --root)")
    train_labels: str | None = opt(None, "folder of train .cls files (overrides --root)")
    test_images: str | None = opt(None, "folder of test JPEGs (overrides --root)")
    val_fraction: float = opt(0.2, "share of labelled images held out for validation (stratified)")
    folds: int = opt(
        0,
        "K >= 2: deal the labelled images into K stratified folds, fold0..fold{K-1} (for train --val-fold) "
        "instead of a train/val split (default: 0, the train/val split)",
    )
    seed: int = opt(0, "seed of the train/val split (or of the folds)")
    format: Literal["jpeg", "raw"] = opt(
        "jpeg", "pixels as source JPEG bytes (small) or decoded raw uint8 (no decode at train time)"
    )
    size: int = opt(
        224, "largest side stored: larger images are shrunk to it (and it is the loaders' canvas)"
    )
    shard_samples: int = opt(800, "samples per shard (65k train images give >= 64 shards)")
    workers: int | None = opt(None, WORKERS_HELP)
    strict: bool = opt(False, "exit non-zero when any input is rejected")

    def validate(self) -> None:
        finite(self, "val_fraction")
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(f"--val-fraction must be between 0 and 1 (got {self.val_fraction})")
        if self.folds and not 2 <= self.folds <= MAX_FOLDS:
            raise ConfigError(f"--folds must be 0 (a train/val split) or 2-{MAX_FOLDS} (got {self.folds})")
        check_seed(self)
        in_range(self, "size", 16, MAX_IMAGE_SIDE)  # the loaders' canvas: every reader takes these
        in_range(self, "shard_samples", 1, 1_000_000)
        check_workers(self)


@dataclass
class InspectConfig(Validated):
    """Summarise packed shards; --verify re-hashes and decodes every sample."""

    shards: str = opt("shards", "folder (or URL prefix) holding manifest.json and the shards")
    verify: bool = opt(False, "re-hash every shard against the manifest and decode every sample")
    workers: int | None = opt(None, WORKERS_HELP)
    cache: str | None = opt(None, CACHE_HELP + "; --verify fills it with the shards that pass")
    cache_size: float | None = opt(None, CACHE_SIZE_HELP)
    connect_timeout: float = opt(10.0, CONNECT_HELP)
    stall_timeout: float = opt(60.0, STALL_HELP)
    retries: int = opt(3, RETRIES_HELP)

    def validate(self) -> None:
        check_workers(self)
        check_remote_settings(self)


@dataclass
class TrainConfig(Validated):
    """Train a classifier on packed shards: AMP, channels_last, tuned thresholds, resume, DDP."""

    shards: str = opt("shards", "folder (or URL prefix) holding manifest.json and the shards", group=DATA)
    cache: str | None = opt(None, CACHE_HELP, group=DATA)
    cache_size: float | None = opt(None, CACHE_SIZE_HELP, group=DATA)
    connect_timeout: float = opt(10.0, CONNECT_HELP, group=DATA)
    stall_timeout: float = opt(60.0, STALL_HELP, group=DATA)
    retries: int = opt(3, RETRIES_HELP, group=DATA)
    out: str = opt(
        "runs/train", "run folder: config, metrics.jsonl, last.pt, best.pt, thresholds.json", group=DATA
    )
    val_fold: int | None = opt(
        None,
        "shards packed with --folds K: validate on fold I (0 to K-1) and train on the other folds "
        "(unset: the shards' train and val splits)",
        group=DATA,
    )
    model: str = opt(
        "maxvit_t",
        "torchvision classification model name (resnet18, resnet50, efficientnet_b0, convnext_tiny, "
        "maxvit_t, ...) or cocoshard_tiny",
        group=MODEL,
    )
    weights: str = opt(
        "imagenet", "imagenet (torchvision's cache), none, or PATH to a local state dict", group=MODEL
    )
    epochs: int = opt(12, "epochs in total, head-only warm-up included", group=OPTIMISATION)
    batch_size: int = opt(128, "images per step on each process", group=OPTIMISATION)
    lr: float = opt(
        1e-3, "peak learning rate of the head; the backbone gets lr * --backbone-lr-mult", group=OPTIMISATION
    )
    backbone_lr_mult: float | None = opt(
        None,
        "backbone learning rate as a fraction of --lr (default: 0.1 with pretrained weights, 1 from scratch)",
        group=OPTIMISATION,
    )
    weight_decay: float = opt(0.05, "AdamW weight decay (never on norms and biases)", group=OPTIMISATION)
    freeze_epochs: int | None = opt(
        None,
        "epochs with the backbone frozen, head-only warm-up (default: 1 with pretrained weights, 0 from "
        "scratch)",
        group=OPTIMISATION,
    )
    warmup_epochs: float = opt(
        1.0,
        "linear learning-rate warm-up (the backbone's starts when it is unfrozen)",
        group=OPTIMISATION,
    )
    schedule: Literal["cosine", "onecycle"] = opt(
        "cosine",
        "learning-rate schedule: warm-up + cosine, or one-cycle",
        group=OPTIMISATION,
    )
    loss: Literal["asl", "bce"] = opt(
        "asl", "asymmetric loss (multi-label, long tail) or plain BCE", group=LOSS
    )
    asl_gamma_neg: float = opt(4.0, "ASL focusing on negatives", group=LOSS)
    asl_gamma_pos: float = opt(0.0, "ASL focusing on positives", group=LOSS)
    asl_clip: float = opt(0.05, "ASL probability margin for negatives", group=LOSS)
    ema: bool = opt(
        True, "keep an exponential moving average of the weights and evaluate it too", group=AVERAGING
    )
    ema_decay: float = opt(0.999, "EMA decay per step", group=AVERAGING)
    size: int = opt(224, "training resolution (square)", group=INPUT)
    crop_scale_min: float = opt(
        0.35,
        "smallest crop area of the random resized crop (a fraction of the image)",
        group=INPUT,
    )
    amp: bool = opt(
        True, "mixed precision (bf16 where supported, else fp16 + GradScaler; bf16 on a CPU)", group=SPEED
    )
    amp_dtype: Literal["auto", "bf16", "fp16"] = opt("auto", "AMP dtype", group=SPEED)
    channels_last: bool = opt(True, "channels_last memory format for model and inputs", group=SPEED)
    compile: bool = opt(False, "torch.compile the model", group=SPEED)
    loader: Literal["stream", "resident"] = opt(
        "stream",
        "stream shards with workers, or hold the split in memory",
        group=LOADING,
    )
    decode: Literal["host", "device"] = opt(
        "host",
        "JPEG shards: decode in the loader (host) or send the bytes and decode each batch on the device "
        "(nvJPEG on a GPU)",
        group=LOADING,
    )
    workers: int | None = opt(
        None,
        "loader processes per rank (unset: automatic, cores / ranks on a GPU, 0 on a CPU; 0: in the training "
        "process)",
        group=LOADING,
    )
    threads: int | None = opt(
        None,
        "CPU threads of the training process (unset: automatic, from the cores this process may use and its "
        "loader workers)",
        group=LOADING,
    )
    device: Literal["auto", "cpu", "cuda"] = opt("auto", "where to train", group=LOADING)
    seed: int = opt(0, "seed of initialisation, shuffling and augmentation", group=RUN)
    resume: str | None = opt(
        None,
        "continue a run with its own settings: --resume alone continues OUT/last.pt (refused when there is "
        "none), --resume auto continues it when it exists and starts a new run when it does not (one command "
        "line for torchrun --max-restarts and preemptible jobs), --resume PATH/last.pt that file",
        const=RESUME_LAST,
        group=RUN,
    )
    checkpoint_every: float = opt(
        10.0,
        "minutes between saves of last.pt inside an epoch, with the loader's position, so that a kill loses "
        "at most this much (0: at epoch ends only); decided every --log-every steps",
        group=RUN,
    )
    dist_timeout: float = opt(
        300.0,
        "seconds a process of a torchrun job waits for the others: a peer silent for half of it is named as "
        "lost and every other process stops; keep it above rank 0's own work at an epoch's end",
        group=RUN,
    )
    skip_bad_samples: bool = opt(
        False, "skip (and count) samples that fail to decode instead of stopping", group=RUN
    )
    max_steps: int = opt(
        0, "stop after this many optimizer steps in total (0: no limit; for smoke tests)", group=RUN
    )
    log_every: int = opt(20, "steps between progress updates that sync the device", group=RUN)
    # The settings given on the command line or in --config (not defaults): --resume keeps the
    # run's own settings and lets only these change it.
    given: frozenset = field(default=frozenset(), repr=False, compare=False, metadata={"internal": True})

    def validate(self) -> None:
        positive(self, "lr", "dist_timeout")
        non_negative(
            self,
            "warmup_epochs",
            "weight_decay",
            "asl_gamma_neg",
            "asl_gamma_pos",
            "checkpoint_every",
            "val_fold",
        )
        in_range(self, "epochs", 1, MAX_COUNT)
        in_range(self, "max_steps", 0, MAX_COUNT)
        in_range(self, "log_every", 1, MAX_COUNT)
        in_range(self, "batch_size", 1, MAX_BATCH)
        in_range(self, "threads", 1, MAX_THREADS)
        check_workers(self)
        check_seed(self)
        finite(self, "asl_clip", "ema_decay", "crop_scale_min", "backbone_lr_mult")
        if not 0.0 <= self.asl_clip < 1.0:
            raise ConfigError(f"--asl-clip must be in [0, 1) (got {self.asl_clip})")
        if self.freeze_epochs is not None and not 0 <= self.freeze_epochs < self.epochs:
            raise ConfigError(
                f"--freeze-epochs must be in [0, --epochs) (got {self.freeze_epochs} of {self.epochs})"
            )
        if self.backbone_lr_mult is not None and not 0.0 < self.backbone_lr_mult <= 10.0:
            raise ConfigError(f"--backbone-lr-mult must be in (0, 10] (got {self.backbone_lr_mult})")
        fraction(self, "crop_scale_min")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"--ema-decay must be in [0, 1) (got {self.ema_decay})")
        in_range(self, "size", 32, MAX_IMAGE_SIDE)
        check_remote_settings(self)

    @property
    def pretrained(self) -> bool:
        """True when the backbone starts from trained weights (ImageNet or a local file)."""
        return self.weights != "none"

    def resolved(self) -> TrainConfig:
        """A copy with the automatic settings that depend only on other settings filled in."""
        if self.freeze_epochs is None and self.pretrained and self.epochs < 2:
            raise ConfigError(
                f"--epochs {self.epochs} leaves no epoch to fine-tune: with pretrained weights (--weights "
                f"{self.weights}) --freeze-epochs defaults to 1, a head-only warm-up epoch first. Give "
                f"--epochs 2 or more, or --freeze-epochs 0 to fine-tune every layer from the first epoch"
            )
        return dataclasses.replace(
            self,
            freeze_epochs=self.freeze_epochs
            if self.freeze_epochs is not None
            else (1 if self.pretrained else 0),
            backbone_lr_mult=self.backbone_lr_mult
            if self.backbone_lr_mult is not None
            else (0.1 if self.pretrained else 1.0),
        )


@dataclass
class DemoConfig(Validated):
    """The whole job on synthetic data: synth, pack, train, predict, evaluate, report."""

    out: str = opt("demo", "folder for every output of the demo (a re-run replaces the demo's own outputs)")
    train: int = opt(8000, "synthetic labelled images (train + val)")
    test: int = opt(300, "synthetic test images")
    image_size: int = opt(96, "long side of the generated images, and the shards' canvas")
    # What the demo trains with: TrainConfig's own settings, with the demo's defaults (a small
    # model from scratch on a CPU: BCE, no crop, no AMP, bf16 being slower for a model this small).
    epochs: int = inherit(TrainConfig, "epochs", 14)
    size: int = inherit(TrainConfig, "size", 96)
    model: str = inherit(TrainConfig, "model", "cocoshard_tiny")
    batch_size: int = inherit(TrainConfig, "batch_size", 64)
    lr: float = inherit(TrainConfig, "lr", 1e-2)
    crop_scale_min: float = inherit(TrainConfig, "crop_scale_min", 1.0)
    loss: Literal["asl", "bce"] = inherit(TrainConfig, "loss", "bce")
    amp: bool = inherit(TrainConfig, "amp", False)
    device: Literal["auto", "cpu", "cuda"] = inherit(TrainConfig, "device", "auto")
    workers: int | None = inherit(TrainConfig, "workers", None)
    threads: int | None = inherit(TrainConfig, "threads", None)
    seed: int = inherit(TrainConfig, "seed", 0)

    def validate(self) -> None:
        in_range(self, "train", 1, SynthConfig.MAX_IMAGES)
        in_range(self, "test", 1, SynthConfig.MAX_IMAGES)
        in_range(self, "image_size", 16, MAX_IMAGE_SIDE)  # what synth draws and pack takes as its canvas
        # the training settings are checked by TrainConfig itself, with the same rules
        TrainConfig(**self.train_settings())

    def train_settings(self) -> dict[str, Any]:
        """The TrainConfig settings this demo sets."""
        return {
            f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.metadata.get("inherited")
        }


@dataclass
class InfoConfig(Validated):
    """Versions, the PIL actually imported (pillow-simd or stock Pillow, probed) and the devices."""

    brief: bool = opt(False, "one line: the versions and the PIL in use (what --version prints)")
