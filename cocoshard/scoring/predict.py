"""Predict the classes of every test image and write the leaderboard's JSON, strictly.

    $ cocoshard predict --checkpoint runs/train/best.pt --images ms-coco/images/test-resized/test-resized
    $ cocoshard predict --checkpoint runs/train/best.pt --shards shards --split test --tta --scores test.npz
    $ cocoshard predict --checkpoint runs/train/best.pt --shards shards --split val --out val.json

The checkpoint gives the model (its EMA weights when it has them), the resolution it was trained
at and the per-class thresholds tuned on validation for the server F1 (`--threshold X` overrides
them). Images are read from shards through the loader, or from a folder of JPEGs decoded by
workers into the same top-left canvases; evaluation sees each whole image, resized, never cropped.
Forward passes run under AMP on the device; `--tta` averages with the horizontally flipped image.
`--min-labels 1` (the default) gives an image with no class above its threshold its top class:
every COCO image has at least one label. The JSON is written atomically, then read back and
checked against the images predicted before success is reported.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import numpy as np
import torch
from rich.console import Console
from torch import nn

from cocoshard import NUM_CLASSES
from cocoshard.config import PredictConfig, print_config
from cocoshard.errors import UserError
from cocoshard.loading.image_files import folder_batches
from cocoshard.machine import usable_cores
from cocoshard.scoring.metrics import predictions_from_scores
from cocoshard.scoring.scores import save_scores
from cocoshard.scoring.submission import (
    build_submission,
    load_submission,
    write_submission,
)
from cocoshard.training.checkpoint import load_checkpoint
from cocoshard.training.model import build_model, strip_wrapper_prefixes
from cocoshard.training.runtime import resolve_amp_dtype, resolve_device

DEFAULT_CANVAS = 224  # the challenge's images have a long side of 224 px: a folder is packed to this canvas


@dataclass
class Predictor:
    """A model ready for inference and what it needs to know about its inputs."""

    model: nn.Module
    size: int  # square input resolution it was trained at
    thresholds: np.ndarray  # (C,) tuned per class, from the checkpoint
    channels_last: bool
    weights: str  # "ema" or "model": which weights were loaded


def _inference_state(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], str]:
    """The EMA weights when the checkpoint has them, else the raw ones; wrapper prefixes stripped."""
    source = "ema" if isinstance(state.get("ema"), dict) and state["ema"] else "model"
    return strip_wrapper_prefixes(state[source]), source


def load_predictor(path: str | os.PathLike, device: torch.device) -> Predictor:
    """Build the checkpoint's model on `device` in eval mode, with its tuned thresholds."""
    state = load_checkpoint(path)
    train_cfg = state["config"] if isinstance(state["config"], dict) else {}
    if "model" not in train_cfg:
        raise UserError(f"checkpoint {path}: its config does not name the model")
    if len(state["classes"]) != NUM_CLASSES or len(state["thresholds"]) != NUM_CLASSES:
        raise UserError(f"checkpoint {path}: expected {NUM_CLASSES} classes and thresholds")
    model = build_model(train_cfg["model"], weights="none")
    weights, source = _inference_state(state)
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as exc:
        raise UserError(f"checkpoint {path}: its {source} weights do not fit {train_cfg['model']}: "
                        f"{str(exc).splitlines()[0]}") from exc
    channels_last = bool(train_cfg.get("channels_last", True))
    model = model.to(device, memory_format=torch.channels_last if channels_last else torch.contiguous_format).eval()
    thresholds = np.asarray([float(t) for t in state["thresholds"]], dtype=np.float64)
    return Predictor(model, int(train_cfg.get("size", DEFAULT_CANVAS)), thresholds, channels_last, source)


def shard_batches(
    location: str, split: str, batch_size: int, workers: int, device: torch.device
) -> tuple[int, Iterator[tuple[torch.Tensor, torch.Tensor, list[str]]]]:
    """(number of samples, iterator of batches) over one split of packed shards, in order."""
    from cocoshard.loading.loader import build_loader

    loader = build_loader(location, split, batch_size=batch_size, device=device, mode="stream", train=False,
                          seed=0, rank=0, world_size=1, workers=workers, skip_bad_samples=False)

    def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor, list[str]]]:
        try:
            for batch in loader:
                yield batch.images, batch.sizes, list(batch.keys)
        finally:
            loader.close()  # stop the worker processes now, not when the loader is collected

    return loader.num_samples, batches()


@torch.no_grad()
def predict_scores(
    predictor: Predictor,
    batches: Iterator[tuple[torch.Tensor, torch.Tensor, list[str]]],
    *,
    total: int,
    amp_dtype: Optional[torch.dtype],
    tta: bool = False,
    progress: bool = True,
) -> tuple[list[str], np.ndarray]:
    """Sigmoid probabilities (N, C) float32 for every image, with the keys in the order seen."""
    from tqdm import tqdm

    from cocoshard.loading.augment import eval_transform

    keys: list[str] = []
    chunks: list[torch.Tensor] = []
    device = next(predictor.model.parameters()).device
    autocast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else torch.autocast(device.type, enabled=False)
    with tqdm(total=total, unit="img", desc="predict", disable=not progress, leave=False) as bar:
        for images, sizes, batch_keys in batches:
            inputs = eval_transform(images, sizes, out_size=predictor.size, dtype=amp_dtype or torch.float32,
                                    channels_last=predictor.channels_last)
            with autocast:
                probs = torch.sigmoid(predictor.model(inputs).float())
                if tta:
                    flipped = torch.sigmoid(predictor.model(torch.flip(inputs, dims=[3])).float())
                    probs = (probs + flipped) / 2
            chunks.append(probs.cpu())
            keys.extend(batch_keys)
            bar.update(len(batch_keys))
    scores = torch.cat(chunks).numpy() if chunks else np.zeros((0, NUM_CLASSES), np.float32)
    return keys, scores.astype(np.float32)


def _check_keys(keys: list[str], expected: int, source: str) -> None:
    repeated = [key for key, count in Counter(keys).items() if count > 1]
    if repeated:
        raise UserError(f"{source}: the image {repeated[0]!r} was read more than once; each key must be unique")
    if len(keys) != expected:
        raise UserError(f"{source}: read {len(keys)} images but expected {expected}")


def run(cfg: PredictConfig) -> int:
    """Load, predict, threshold, write the JSON atomically, read it back and check it."""
    print_config(cfg)
    console = Console(stderr=True)
    device = resolve_device(cfg.device)
    amp_dtype = resolve_amp_dtype(cfg.amp, "auto", device)
    predictor = load_predictor(cfg.checkpoint, device)
    workers = usable_cores() if cfg.workers is None else cfg.workers
    if cfg.images:
        source = cfg.images
        total, batches = folder_batches(cfg.images, max(DEFAULT_CANVAS, predictor.size), cfg.batch_size, workers, device)
    else:
        source = f"{cfg.shards} ({cfg.split} split)"
        total, batches = shard_batches(cfg.shards, cfg.split, cfg.batch_size, workers, device)
    start = time.perf_counter()
    keys, scores = predict_scores(predictor, batches, total=total, amp_dtype=amp_dtype, tta=cfg.tta)
    elapsed = time.perf_counter() - start
    _check_keys(keys, total, source)
    thresholds = np.full(NUM_CLASSES, cfg.threshold) if cfg.threshold is not None else predictor.thresholds
    predicted = predictions_from_scores(scores, thresholds)
    submission = build_submission(keys, predicted, scores, min_labels=cfg.min_labels)
    write_submission(cfg.out, submission)
    load_submission(cfg.out, expected=keys)  # read back from disk: what was written is what we checked
    if cfg.scores:
        save_scores(cfg.scores, keys, scores, thresholds)
    filled = int((predicted.sum(axis=1) < cfg.min_labels).sum())
    labels = sum(len(ids) for ids in submission.values())
    console.print(
        f"[green]wrote[/] {cfg.out}: {len(keys)} images, {labels / max(len(keys), 1):.2f} classes per image "
        f"({filled} topped up to --min-labels {cfg.min_labels}); {predictor.weights} weights, "
        f"{'--threshold ' + str(cfg.threshold) if cfg.threshold is not None else 'tuned thresholds'}"
        f"{', TTA' if cfg.tta else ''}; {len(keys) / max(elapsed, 1e-9):.0f} images/s on {device}",
        soft_wrap=True, highlight=False,
    )
    if cfg.scores:
        console.print(f"scores: {cfg.scores}", soft_wrap=True, highlight=False)
    return 0
