"""Predict the classes of every test image and write the leaderboard's JSON, strictly.

    $ cocoshard predict --checkpoint runs/train/best.pt --images ms-coco/images/test-resized/test-resized
    $ cocoshard predict --checkpoint runs/train/best.pt --shards shards --split test --tta --scores test.npz
    $ cocoshard predict --checkpoint runs/train/best.pt --shards shards --split val --out val.json
    $ cocoshard predict --checkpoint runs/train/best.pt --images DIR --thresholds thresholds.json

The checkpoint gives the model (its EMA weights when it has them), the resolution it was trained
at and the per-class thresholds tuned on validation for the server F1 (`--threshold X` or
`--thresholds FILE` override them). Images come from shards through the loader, or from a folder
of image files, every one of which is checked first: every file that cannot be read is named, with
its reason, in one message, and nothing is written; `--unreadable prior` writes a complete
submission anyway, giving such images the most frequent training class (said on screen and in the
scores file). Evaluation sees each whole image, resized, never cropped; forward passes run under
AMP on the device; `--tta` averages with the horizontally flipped image. `--min-labels 1` (the
default) gives an image with no class above its threshold its top class: every COCO image has at
least one label. The JSON is written atomically, then read back and checked against the images
predicted before success is reported.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from cocoshard import NUM_CLASSES
from cocoshard.config_scoring import PredictConfig
from cocoshard.console import literal, stderr_console
from cocoshard.errors import UserError
from cocoshard.input_files import shown_path
from cocoshard.loading.augment import EvalTransform, eval_transform
from cocoshard.loading.image_files import check_image_folder, folder_batches, folder_listing, skipped_note
from cocoshard.loading.loader import build_loader
from cocoshard.loading.spec import LoaderSpec
from cocoshard.machine import ThreadPlan, thread_plan
from cocoshard.output_paths import check_apart, check_output_file
from cocoshard.prepare.manifest import MANIFEST, load_manifest, read_manifest, shards_identity
from cocoshard.pure.decision import decide_labels
from cocoshard.pure.metrics import predictions_from_scores
from cocoshard.scoring.ground_truth import is_shard_folder
from cocoshard.scoring.same_shards import Trained, check_trained_on
from cocoshard.scoring.scores import Scores, file_sha256, save_scores
from cocoshard.scoring.submission import (
    build_submission,
    load_submission,
    write_submission,
)
from cocoshard.scoring.threshold_files import read_thresholds_file
from cocoshard.settings import print_config
from cocoshard.shard_cache import remote_of
from cocoshard.training.checkpoint import checkpoint_config, load_checkpoint, predicted_weights
from cocoshard.training.model import build_model, strip_wrapper_prefixes
from cocoshard.training.runtime import resolve_amp_dtype, resolve_device

DEFAULT_CANVAS = 224  # the challenge's images have a long side of 224 px: a folder is decoded to this canvas
SHOWN_BAD = 20
Batches = Iterator[tuple[torch.Tensor, list[str]]]


# ----------------------------------------------------------------------------------- the model


@dataclass
class Predictor:
    """A model ready for inference and what it needs to know about its inputs."""

    model: nn.Module
    size: int  # square input resolution it was trained at
    thresholds: np.ndarray  # (C,) tuned per class, from the checkpoint
    channels_last: bool
    weights: str  # "ema" or "model": which weights were loaded
    prior_class: int  # the most frequent training class (for --unreadable prior)
    epoch: int = 0  # the epoch whose weights these are, of `epochs`
    epochs: int = 0
    val_server_f1: float | None = None  # that epoch's tuned server F1 on the val split
    trained_on: str | None = None  # the identity of the shards it was trained on (`shards_identity`)
    trained_split: dict[str, Any] = field(default_factory=dict)  # how their split was drawn

    def describe(self, path: str | os.PathLike) -> str:
        """One line: which epoch and weights the checkpoint holds, and the val score they had."""
        which = "EMA" if self.weights == "ema" else "raw (not EMA)"
        score = (
            f", val server F1 {self.val_server_f1:.4f} (tuned on that split)"
            if self.val_server_f1 is not None
            else ""
        )
        return f"checkpoint {path}: epoch {self.epoch} of {self.epochs}, {which} weights{score}"


def _inference_state(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], str]:
    """The weights the checkpoint's epoch selected (`checkpoint.predicted_weights`) and which they
    are ("ema" or "model"), wrapper prefixes stripped."""
    field, which = predicted_weights(state)
    return strip_wrapper_prefixes(state[field]), which


def load_predictor(path: str | os.PathLike, device: torch.device) -> Predictor:
    """Build the checkpoint's model on `device` in eval mode, with its tuned thresholds."""
    state = load_checkpoint(path)
    train_cfg = checkpoint_config(state, path)
    model = build_model(train_cfg.model, weights="none")
    weights, source = _inference_state(state)
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as exc:
        raise UserError(
            f"checkpoint {path}: its {source} weights do not fit {train_cfg.model}: "
            f"{str(exc).splitlines()[0]}"
        ) from exc
    fmt = torch.channels_last if train_cfg.channels_last else torch.contiguous_format
    model = model.to(device, memory_format=fmt).eval()
    counts = state.get("class_counts")
    prior = int(np.argmax(counts)) if isinstance(counts, list) and len(counts) == NUM_CLASSES else 0
    score = (state.get("metrics") or {}).get("server_f1_tuned")
    return Predictor(
        model,
        train_cfg.size,
        np.asarray(state["thresholds"], dtype=np.float64),
        train_cfg.channels_last,
        source,
        prior,
        epoch=int(state["epoch"]),
        epochs=train_cfg.epochs,
        val_server_f1=float(score) if isinstance(score, (int, float)) else None,
        trained_on=state["shards"] if isinstance(state.get("shards"), str) else None,
        trained_split=state["shards_split"] if isinstance(state.get("shards_split"), dict) else {},
    )


# ----------------------------------------------------------------------------------- image sources


def shard_batches(
    cfg: PredictConfig, predictor: Predictor, plan: ThreadPlan, device: torch.device, dtype: torch.dtype
) -> tuple[int, Batches]:
    """(number of samples, model-ready batches with their keys) of one split of packed shards, in order."""
    spec = LoaderSpec(
        batch_size=cfg.batch_size,
        device=device,
        train=False,
        workers=plan.workers,
        threads=plan.loader,
        transform=EvalTransform(predictor.size, dtype, predictor.channels_last),
    )
    assert cfg.shards is not None
    loader = build_loader(load_manifest(cfg.shards, remote_of(cfg)), cfg.split, spec)

    def batches() -> Batches:
        try:
            for batch in loader:
                yield batch.inputs, list(batch.keys)
        finally:
            loader.close()  # stop the worker processes now, not when the loader is collected

    return loader.num_samples, batches()


def image_batches(
    files: list[Path],
    predictor: Predictor,
    cfg: PredictConfig,
    workers: int,
    device: torch.device,
    dtype: torch.dtype,
) -> Batches:
    """Model-ready batches of checked image files, with their keys."""
    canvas = max(DEFAULT_CANVAS, predictor.size)
    for images, sizes, keys in folder_batches(files, canvas, cfg.batch_size, workers, device):
        yield (
            eval_transform(
                images, sizes, out_size=predictor.size, dtype=dtype, channels_last=predictor.channels_last
            ),
            keys,
        )


def bad_files_message(folder: str, bad: dict[Path, str]) -> str:
    """Every unreadable file of the folder with its reason, and the ways on."""
    shown = "\n  ".join(f"{shown_path(path)}: {why}" for path, why in list(bad.items())[:SHOWN_BAD])
    more = f"\n  ... and {len(bad) - SHOWN_BAD} more" if len(bad) > SHOWN_BAD else ""
    return (
        f"{len(bad)} image file(s) in {folder} cannot be read; nothing was written:\n  {shown}{more}\n"
        f"Replace them, or write a complete submission anyway with --unreadable prior (they get the most "
        f"frequent training class)"
    )


# ----------------------------------------------------------------------------------- inference


@torch.no_grad()
def predict_scores(
    predictor: Predictor,
    batches: Batches,
    *,
    total: int,
    amp_dtype: torch.dtype | None,
    tta: bool = False,
    progress: bool = True,
) -> tuple[list[str], np.ndarray]:
    """Sigmoid probabilities (N, C) float32 for every image, with the keys in the order seen."""
    from tqdm import tqdm

    keys: list[str] = []
    chunks: list[torch.Tensor] = []
    device = next(predictor.model.parameters()).device
    autocast = (
        torch.autocast(device.type, dtype=amp_dtype)
        if amp_dtype
        else torch.autocast(device.type, enabled=False)
    )
    with tqdm(total=total, unit="img", desc="predict", disable=not progress, leave=False) as bar:
        for inputs, batch_keys in batches:
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
        raise UserError(
            f"{source}: the image {repeated[0]!r} was read more than once; each key must be unique"
        )
    if len(keys) != expected:
        raise UserError(f"{source}: read {len(keys)} images but expected {expected}")


def _check_outputs(cfg: PredictConfig) -> None:
    """The outputs must be files that can be written and not an input: the JSON would replace the
    checkpoint or the scores."""
    check_output_file(cfg.out, "--out")
    if cfg.scores:
        check_output_file(cfg.scores, "--scores")
    check_apart(
        [("--out", cfg.out), ("--scores", cfg.scores)],
        [("--checkpoint", cfg.checkpoint), ("--thresholds", cfg.thresholds)],
    )


def _thresholds(cfg: PredictConfig, predictor: Predictor) -> tuple[np.ndarray, str]:
    if cfg.threshold is not None:
        return np.full(NUM_CLASSES, cfg.threshold), f"--threshold {cfg.threshold}"
    if cfg.thresholds is not None:
        return read_thresholds_file(cfg.thresholds), f"thresholds from {cfg.thresholds}"
    return predictor.thresholds, "the checkpoint's tuned thresholds"


@dataclass
class Inputs:
    """The images a predict run reads: where from, how many, in batches, and those it cannot read."""

    source: str  # for messages: the folder, or the shards and split
    origin: str  # for the scores file: "images <folder>" or "shards <identity>"
    split: str
    total: int
    batches: Batches
    unreadable: list[str]


def _inputs(
    cfg: PredictConfig, predictor: Predictor, plan: ThreadPlan, device: torch.device, dtype: torch.dtype
) -> Inputs:
    """The images of `--images DIR` (every file checked first) or of one split of `--shards`."""
    if cfg.images:
        if is_shard_folder(cfg.images):
            raise UserError(
                f"--images {cfg.images} is a shards folder (it holds {MANIFEST}): read it with "
                f"--shards {cfg.images} --split test (or --split val)"
            )
        skipped = skipped_note(cfg.images, folder_listing(cfg.images)[1])
        if skipped:
            stderr_console().print(f"[yellow]note[/]: {literal(skipped)}")
        files, bad = check_image_folder(cfg.images, plan.workers)
        if bad and cfg.unreadable == "fail":
            raise UserError(bad_files_message(cfg.images, bad))
        good = [f for f in files if f not in bad]
        origin = f"images {Path(cfg.images).resolve()}"
        batches = image_batches(good, predictor, cfg, plan.workers, device, dtype)
        return Inputs(cfg.images, origin, "images", len(good), batches, [f.stem for f in bad])
    assert cfg.shards is not None  # the config holds exactly one of --images and --shards
    origin = f"shards {shards_identity(read_manifest(cfg.shards, remote_of(cfg).network))}"
    total, batches = shard_batches(cfg, predictor, plan, device, dtype)
    return Inputs(f"{cfg.shards} ({cfg.split} split)", origin, cfg.split, total, batches, [])


def _other_shards(cfg: PredictConfig, predictor: Predictor) -> str:
    """Refuse a labelled split of shards the model was not trained on (a re-pack: its val images may
    have been trained on), unless --allow-other-shards; the warning to record then, else ""."""
    if cfg.shards is None or cfg.split == "test":
        return ""  # test images were never trained on, whatever the train/val split
    trained = Trained(predictor.trained_on, predictor.trained_split)
    note = check_trained_on(
        trained,
        cfg.shards,
        read_manifest(cfg.shards, remote_of(cfg).network),
        what=str(cfg.checkpoint),
        allow=cfg.allow_other_shards,
    )
    return note or ""


def run(cfg: PredictConfig) -> int:
    """Check the inputs, predict, threshold, write the JSON atomically, read it back and check it."""
    print_config(cfg)
    console = stderr_console()
    _check_outputs(cfg)
    device = resolve_device(cfg.device)
    amp_dtype = resolve_amp_dtype(cfg.amp, "auto", device)
    dtype = amp_dtype or torch.float32
    predictor = load_predictor(cfg.checkpoint, device)
    console.print(literal(predictor.describe(cfg.checkpoint)))
    other_shards = _other_shards(cfg, predictor)
    if other_shards:
        console.print(f"[bold yellow]warning:[/] {literal(other_shards)}")
    thresholds, threshold_source = _thresholds(cfg, predictor)
    plan = thread_plan(
        "predict", device_type=device.type, workers=cfg.workers, threads=None, measure_busy=False
    )
    plan.apply()
    inputs = _inputs(cfg, predictor, plan, device, dtype)
    unreadable = inputs.unreadable
    start = time.perf_counter()
    keys, scores = predict_scores(
        predictor, inputs.batches, total=inputs.total, amp_dtype=amp_dtype, tta=cfg.tta
    )
    elapsed = time.perf_counter() - start
    _check_keys(keys, inputs.total, inputs.source)
    if unreadable:  # the prior: the most frequent training class, and nothing else, for each
        prior = np.full((len(unreadable), NUM_CLASSES), 0.0, np.float32)
        prior[:, predictor.prior_class] = 1.0
        keys, scores = keys + unreadable, np.concatenate([scores, prior])
    predicted = decide_labels(scores, thresholds, cfg.min_labels)  # the rule every reported score uses
    submission = build_submission(keys, predicted)
    write_submission(cfg.out, submission)
    load_submission(cfg.out, expected=keys)  # read back from disk: what was written is what we checked
    if cfg.scores:
        save_scores(
            cfg.scores,
            Scores(
                keys,
                scores,
                thresholds,
                cfg.min_labels,
                cfg.tta,
                str(cfg.checkpoint),
                file_sha256(cfg.checkpoint),
                inputs.origin,
                inputs.split,
                unreadable,
                trained_on=predictor.trained_on or "",
                trained_split=predictor.trained_split,
                other_shards=other_shards,
            ),
        )
    filled = int((predictions_from_scores(scores, thresholds).sum(axis=1) < cfg.min_labels).sum())
    labels = sum(len(ids) for ids in submission.values())
    console.print(
        f"[green]wrote[/] {literal(cfg.out)}: {len(keys)} images, {labels / max(len(keys), 1):.2f} classes "
        "per image "
        f"({filled} topped up to --min-labels {cfg.min_labels}); {predictor.weights} weights, "
        f"{literal(threshold_source)}{', TTA' if cfg.tta else ''}; "
        f"{inputs.total / max(elapsed, 1e-9):.0f} images/s on {device}"
    )
    if unreadable:
        console.print(
            f"[bold yellow]warning:[/] {len(unreadable)} unreadable image(s) were given the most frequent "
            f"training class {predictor.prior_class} (--unreadable prior): "
            f"{literal(', '.join(unreadable[:10]))}"
        )
    if cfg.scores:
        console.print(f"scores: {literal(cfg.scores)}")
    return 0
