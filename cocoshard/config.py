"""One typed configuration per command: every knob declared once, with its default and its help.

The CLI builds its flags from these dataclasses; a `--config FILE` (TOML or JSON) overrides the
defaults and command-line flags override the file. `resolve()` validates once; `to_dict()` is what
gets printed at start and saved beside every checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

from cocoshard.errors import ConfigError


def opt(default: Any, help: str, **extra: Any) -> Any:
    """A config field: its default and the one line of help the CLI shows."""
    return field(default=default, metadata={"help": help, **extra})


def _positive(cfg: Any, *names: str) -> None:
    for name in names:
        if getattr(cfg, name) <= 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be > 0 (got {getattr(cfg, name)})")


def _non_negative(cfg: Any, *names: str) -> None:
    for name in names:
        if getattr(cfg, name) < 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 0 (got {getattr(cfg, name)})")


# ----------------------------------------------------------------------------------- commands


@dataclass
class SynthConfig:
    """Write a learnable synthetic multi-label data set in the challenge's folder layout."""

    out: str = opt("synthetic", "output folder (challenge layout: images/..., labels/...)")
    train: int = opt(4000, "number of labelled train images")
    test: int = opt(500, "number of unlabelled test images")
    seed: int = opt(0, "random seed: the same seed gives the same files")
    size: int = opt(224, "long side of every image in pixels")
    quality: int = opt(90, "JPEG quality")
    workers: int = opt(0, "processes drawing images (0: one per core)")
    min_scale: float = opt(0.125, "smallest object as a fraction of the long side")
    max_scale: float = opt(1 / 3, "largest object as a fraction of the long side")
    clutter: float = opt(1.0, "background noise and distractor strokes (0: clean gradient)")
    tail: float = opt(0.8, "class frequency ~ (id + 1) ** -tail (0: balanced classes)")
    rotation: float = opt(180.0, "objects turn by up to this many degrees either way (0: upright)")

    def validate(self) -> None:
        _positive(self, "train", "size", "quality", "min_scale", "max_scale")
        _non_negative(self, "test", "workers", "clutter", "tail", "rotation")
        if self.min_scale > self.max_scale or self.max_scale > 1:
            raise ConfigError(f"need --min-scale <= --max-scale <= 1 (got {self.min_scale}, {self.max_scale})")
        if self.quality > 100:
            raise ConfigError(f"--quality must be at most 100 (got {self.quality})")


@dataclass
class PackConfig:
    """Pack the challenge folder, once, into WebDataset tar shards plus a manifest."""

    root: str = opt("ms-coco", "challenge folder (either layout: images/train-resized/train-resized or images/train)")
    out: str = opt("shards", "output folder for {train,val,test}-NNNNNN.tar and manifest.json")
    train_images: Optional[str] = opt(None, "folder of train JPEGs (overrides the one found under --root)")
    train_labels: Optional[str] = opt(None, "folder of train .cls files (overrides --root)")
    test_images: Optional[str] = opt(None, "folder of test JPEGs (overrides --root)")
    val_fraction: float = opt(0.2, "share of labelled images held out for validation (stratified)")
    seed: int = opt(0, "seed of the train/val split")
    format: Literal["jpeg", "raw"] = opt("jpeg", "pixels as source JPEG bytes (small) or decoded raw uint8 (no decode at train time)")
    size: int = opt(224, "largest side stored; raw shards hold size x size canvases")
    shard_samples: int = opt(800, "samples per shard (65k train images give >= 64 shards)")
    workers: int = opt(0, "processes reading and checking images (0: one per core)")
    strict: bool = opt(False, "exit non-zero when any input is rejected")

    def validate(self) -> None:
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(f"--val-fraction must be between 0 and 1 (got {self.val_fraction})")
        _positive(self, "size", "shard_samples")
        _non_negative(self, "workers")


@dataclass
class InspectConfig:
    """Summarise packed shards; --verify re-hashes and decodes every sample."""

    shards: str = opt("shards", "folder holding manifest.json and the shards")
    verify: bool = opt(False, "re-hash every shard against the manifest and decode every sample")
    workers: int = opt(0, "processes verifying shards (0: one per core)")

    def validate(self) -> None:
        _non_negative(self, "workers")


@dataclass
class TrainConfig:
    """Train a classifier on packed shards: AMP, channels_last, tuned thresholds, resume, DDP."""

    shards: str = opt("shards", "folder (or URL prefix) holding manifest.json and the shards")
    out: str = opt("runs/train", "run folder: config, metrics.jsonl, last.pt, best.pt, thresholds.json")
    model: str = opt("maxvit_t", "torchvision classification model name (resnet18, resnet50, efficientnet_b0, convnext_tiny, maxvit_t, ...) or cocoshard_tiny")
    weights: str = opt("imagenet", "imagenet (torchvision's cache), none, or PATH to a local state dict")
    epochs: int = opt(12, "epochs in total, head-only warm-up included")
    batch_size: int = opt(128, "images per step on each process")
    lr: float = opt(1e-3, "peak learning rate of the head; the backbone gets lr * --backbone-lr-mult")
    backbone_lr_mult: Optional[float] = opt(None, "backbone learning rate as a fraction of --lr (default: 0.1 with pretrained weights, 1 from scratch)")
    weight_decay: float = opt(0.05, "AdamW weight decay (never on norms and biases)")
    freeze_epochs: Optional[int] = opt(None, "epochs with the backbone frozen, head-only warm-up (default: 1 with pretrained weights, 0 from scratch)")
    warmup_epochs: float = opt(1.0, "linear learning-rate warm-up (the backbone's starts when it is unfrozen)")
    schedule: Literal["cosine", "onecycle"] = opt("cosine", "learning-rate schedule: warm-up + cosine, or one-cycle")
    loss: Literal["asl", "bce"] = opt("asl", "asymmetric loss (multi-label, long tail) or plain BCE")
    asl_gamma_neg: float = opt(4.0, "ASL focusing on negatives")
    asl_gamma_pos: float = opt(0.0, "ASL focusing on positives")
    asl_clip: float = opt(0.05, "ASL probability margin for negatives")
    ema: bool = opt(True, "keep an exponential moving average of the weights and evaluate it too")
    ema_decay: float = opt(0.999, "EMA decay per step")
    size: int = opt(224, "training resolution (square)")
    crop_scale_min: float = opt(0.35, "smallest crop area of the random resized crop (a fraction of the image)")
    amp: bool = opt(True, "mixed precision (bf16 where supported, else fp16 + GradScaler; bf16 on a CPU)")
    amp_dtype: Literal["auto", "bf16", "fp16"] = opt("auto", "AMP dtype")
    channels_last: bool = opt(True, "channels_last memory format for model and inputs")
    compile: bool = opt(False, "torch.compile the model")
    loader: Literal["stream", "resident"] = opt("stream", "stream shards with workers, or hold the split in memory")
    workers: Optional[int] = opt(None, "loader processes per rank (default: cores / ranks on a GPU, 0 on a CPU; 0: read in the training process)")
    device: Literal["auto", "cpu", "cuda"] = opt("auto", "where to train")
    seed: int = opt(0, "seed of initialisation, shuffling and augmentation")
    resume: bool = opt(False, "continue from OUT/last.pt")
    skip_bad_samples: bool = opt(False, "skip (and count) samples that fail to decode instead of stopping")
    max_steps: int = opt(0, "stop after this many optimizer steps in total (0: no limit; for smoke tests)")
    log_every: int = opt(20, "steps between progress updates that sync the device")

    def validate(self) -> None:
        _positive(self, "epochs", "batch_size", "lr", "size", "log_every")
        _non_negative(self, "warmup_epochs", "max_steps", "weight_decay", "asl_gamma_neg", "asl_gamma_pos", "asl_clip")
        if self.workers is not None and self.workers < 0:
            raise ConfigError(f"--workers must be >= 0 (got {self.workers})")
        if self.freeze_epochs is not None and not 0 <= self.freeze_epochs < self.epochs:
            raise ConfigError(f"--freeze-epochs must be in [0, --epochs) (got {self.freeze_epochs} of {self.epochs})")
        if self.backbone_lr_mult is not None and not 0.0 < self.backbone_lr_mult <= 10.0:
            raise ConfigError(f"--backbone-lr-mult must be in (0, 10] (got {self.backbone_lr_mult})")
        if not 0.0 < self.crop_scale_min <= 1.0:
            raise ConfigError(f"--crop-scale-min must be in (0, 1] (got {self.crop_scale_min})")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"--ema-decay must be in [0, 1) (got {self.ema_decay})")
        if self.size < 32:
            raise ConfigError(f"--size must be at least 32 pixels (got {self.size})")

    @property
    def pretrained(self) -> bool:
        """True when the backbone starts from trained weights (ImageNet or a local file)."""
        return self.weights != "none"

    def resolved(self) -> "TrainConfig":
        """A copy with the automatic settings (freeze epochs, backbone LR) filled in."""
        return dataclasses.replace(
            self,
            freeze_epochs=self.freeze_epochs if self.freeze_epochs is not None else (1 if self.pretrained else 0),
            backbone_lr_mult=self.backbone_lr_mult if self.backbone_lr_mult is not None else (0.1 if self.pretrained else 1.0),
        )


@dataclass
class PredictConfig:
    """Predict classes for every test image and write the strict submission JSON."""

    checkpoint: str = opt("runs/train/best.pt", "checkpoint written by `cocoshard train`")
    shards: Optional[str] = opt(None, "read the images from these shards (with --split)")
    split: Literal["test", "val", "train"] = opt("test", "which split of --shards")
    images: Optional[str] = opt(None, "read a folder of JPEGs instead (e.g. the zip's test folder)")
    out: str = opt("predictions.json", "submission JSON to write")
    threshold: Optional[float] = opt(None, "one threshold for every class instead of the checkpoint's tuned ones")
    min_labels: int = opt(1, "keep the top classes of an image until it has at least this many")
    tta: bool = opt(False, "average with the horizontally flipped image")
    scores: Optional[str] = opt(None, "also save raw probabilities with keys (.npz) for re-thresholding")
    batch_size: int = opt(256, "images per forward pass")
    workers: int = opt(0, "loader processes (0: one per core)")
    amp: bool = opt(True, "mixed precision on the device")
    device: Literal["auto", "cpu", "cuda"] = opt("auto", "where to run")

    def validate(self) -> None:
        if (self.shards is None) == (self.images is None):
            raise ConfigError("give exactly one of --shards (with --split) or --images DIR")
        if self.threshold is not None and not 0.0 <= self.threshold <= 1.0:
            raise ConfigError(f"--threshold must be a probability in [0, 1] (got {self.threshold})")
        _positive(self, "batch_size")
        _non_negative(self, "min_labels", "workers")


@dataclass
class EvaluateConfig:
    """Score a submission JSON against .cls labels: the leaderboard's F1 and friends."""

    predictions: str = opt("predictions.json", "submission JSON to check and score")
    labels: Optional[str] = opt(None, "folder of .cls files, or shards folder (its val split); omit to only check the format")
    images: Optional[str] = opt(None, "folder of images (or shards folder: its test split) the file must cover exactly, each once")
    scores: Optional[str] = opt(None, "raw probabilities (.npz from predict --scores) for mAP")
    per_class: bool = opt(False, "print a per-class table")
    report: Optional[str] = opt(None, "write PNG figures and a markdown summary to this folder")
    run: Optional[str] = opt(None, "run folder whose metrics.jsonl gives loss and F1 curves for --report")
    json: bool = opt(False, "print the metrics as one JSON object on stdout")
    out: Optional[str] = opt(None, "also write the metrics (and, with --per-class, the per-class rows) to this JSON file")

    def validate(self) -> None:
        if self.labels is None:
            for name in ("scores", "report", "out"):
                if getattr(self, name) is not None:
                    raise ConfigError(f"--{name} needs --labels: there is nothing to score without them")
            if self.per_class:
                raise ConfigError("--per-class needs --labels: there is nothing to score without them")
        if self.run is not None and self.report is None:
            raise ConfigError("--run gives the curves of --report DIR: give --report too")


@dataclass
class DemoConfig:
    """The whole job on synthetic data: synth, pack, train, predict, evaluate, report."""

    out: str = opt("demo", "folder for every output of the demo (a re-run replaces the demo's own outputs)")
    train: int = opt(8000, "synthetic labelled images (train + val)")
    test: int = opt(300, "synthetic test images")
    image_size: int = opt(96, "long side of the generated images, and the shards' canvas")
    epochs: int = opt(14, "training epochs")
    size: int = opt(96, "training resolution")
    model: str = opt("cocoshard_tiny", "model trained from scratch")
    batch_size: int = opt(64, "images per training step")
    lr: float = opt(1e-2, "peak learning rate")
    crop_scale_min: float = opt(1.0, "smallest crop area of the random resized crop (1: flips only; crops cut small objects out)")
    loss: Literal["asl", "bce"] = opt("bce", "training loss (BCE learns faster from scratch here)")
    amp: bool = opt(False, "mixed precision (off by default: bf16 on a CPU is slower for a model this small)")
    device: Literal["auto", "cpu", "cuda"] = opt("auto", "where to train and predict")
    workers: int = opt(0, "processes for synth, pack and predict (0: one per core)")
    seed: int = opt(0, "seed of every stage")

    def validate(self) -> None:
        _positive(self, "train", "test", "epochs", "size", "image_size", "batch_size", "lr")
        _non_negative(self, "workers")
        if not 0.0 < self.crop_scale_min <= 1.0:
            raise ConfigError(f"--crop-scale-min must be in (0, 1] (got {self.crop_scale_min})")


@dataclass
class InfoConfig:
    """Versions, the PIL actually imported (pillow-simd or stock Pillow, probed) and the devices."""

    brief: bool = opt(False, "one line: the versions and the PIL in use (what --version prints)")

    def validate(self) -> None:
        pass


# ----------------------------------------------------------------------------------- machinery


def fields_of(cls: type) -> list[tuple[dataclasses.Field, Any]]:
    """Each field of a config class with its resolved type."""
    hints = typing.get_type_hints(cls)
    return [(f, hints[f.name]) for f in dataclasses.fields(cls)]


def _coerce(name: str, value: Any, kind: Any) -> Any:
    """Check a value read from a config file against the field's type."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin is typing.Union and type(None) in args:
        if value is None:
            return None
        kind = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{name}: {value!r} is not one of {', '.join(map(str, args))}")
        return value
    if kind is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{name}: expected true or false, got {value!r}")
        return value
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise ConfigError(f"{name}: expected {kind.__name__}, got {value!r}")
    return value


def read_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """Read a TOML or JSON file of overrides (keys may use - or _)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist")
    try:
        if p.suffix == ".json":
            data = json.loads(p.read_text())
        else:
            try:
                import tomllib
            except ModuleNotFoundError:  # Python 3.10
                import tomli as tomllib
            data = tomllib.loads(p.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {p} cannot be parsed: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p} must hold a table/object of settings")
    return {k.replace("-", "_"): v for k, v in data.items()}


def resolve(cls: type, overrides: dict[str, Any] | None = None, file: str | None = None) -> Any:
    """Defaults, then the config file, then explicit overrides; validated once."""
    known = {f.name: kind for f, kind in fields_of(cls)}
    values: dict[str, Any] = {}
    for source, data in (("config file", read_config_file(file) if file else {}), ("override", overrides or {})):
        for key, value in data.items():
            if key not in known:
                raise ConfigError(f"unknown setting {key!r} in {source} for {cls.__name__}; known: {', '.join(known)}")
            values[key] = _coerce(key, value, known[key])
    cfg = cls(**values)
    cfg.validate()
    return cfg


def to_dict(cfg: Any) -> dict[str, Any]:
    """The resolved configuration as plain JSON-able values."""
    return dataclasses.asdict(cfg)


def from_dict(cls: type, data: dict[str, Any]) -> Any:
    """Rebuild a config saved by `to_dict` (unknown keys from other versions are ignored)."""
    known = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in data.items() if k in known})


def print_config(cfg: Any, console: Any = None) -> None:
    """Print the resolved configuration once, as a compact table."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{type(cfg).__name__}", show_header=False, box=None, pad_edge=False)
    for key, value in to_dict(cfg).items():
        table.add_row(f"[cyan]{key}[/]", repr(value))
    (console or Console(stderr=True)).print(table)
