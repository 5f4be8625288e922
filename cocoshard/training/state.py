"""A run's state between steps (`Trainer`) and how it is built: every check first, then the objects.

`build_trainer` does every check that can fail before any work (unknown model, missing shards, a
batch larger than the split, a run folder that already holds a run) and only then builds the
model, loaders, optimiser, schedule and EMA; with `--resume` it restores them from `OUT/last.pt`
(`cocoshard.training.checkpoint`). `enter_phase` freezes or releases the backbone per epoch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from torch import nn

from cocoshard import CLASSES, NUM_CLASSES
from cocoshard.atomic import remove_stale_temporaries
from cocoshard.config import TrainConfig, print_config, to_dict
from cocoshard.errors import ConfigError, UserError
from cocoshard.loading.augment import EvalTransform, TrainTransform
from cocoshard.loading.loader import build_loader
from cocoshard.machine import cores_per_process
from cocoshard.prepare.manifest import is_url, read_manifest, shard_urls
from cocoshard.training.checkpoint import LAST, restore
from cocoshard.training.loss import build_loss
from cocoshard.training.model import (
    build_model,
    check_input_size,
    check_model_name,
    set_backbone_trainable,
)
from cocoshard.training.optim import ModelEma, build_optimizer, build_scheduler
from cocoshard.training.runlog import RunLog
from cocoshard.training.runtime import Runtime, seed_everything, wrap_ddp


@dataclass
class Trainer:
    """Everything a run needs between steps; `net` is the model as the step calls it (DDP, compiled)."""

    cfg: TrainConfig
    runtime: Runtime
    log: RunLog
    model: nn.Module
    ema: Optional[ModelEma]
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler
    criterion: nn.Module
    train_loader: Any
    val_loader: Any
    steps_per_epoch: int
    classes: Sequence[str]
    input_dtype: torch.dtype
    num_classes: int = NUM_CLASSES
    net: Optional[nn.Module] = None
    frozen: Optional[bool] = None
    epoch: int = 0  # epochs completed
    step: int = 0  # optimizer steps taken
    best_score: float = -1.0
    best_epoch: int = 0

    @property
    def out(self) -> Path:
        """The run folder."""
        return Path(self.cfg.out)

    def skipped_samples(self) -> int:
        """Samples this rank's loaders skipped as undecodable (with --skip-bad-samples)."""
        return sum(int(getattr(loader, "skipped_samples", 0)) for loader in (self.train_loader, self.val_loader))


def check_shards(cfg: TrainConfig, world_size: int) -> dict[str, Any]:
    """The manifest, after checking that both splits exist, have files, and fit the batch size."""
    manifest = read_manifest(cfg.shards)
    for split in ("train", "val"):
        entry = manifest.get("splits", {}).get(split) or {}
        if not entry.get("samples") or not entry.get("shards"):
            raise UserError(f"{cfg.shards}: the {split} split is empty; re-pack with more images "
                            f"(or a larger --val-fraction) before training")
        if not is_url(cfg.shards):
            missing = [url for url in shard_urls(cfg.shards, manifest, split) if not Path(url).is_file()]
            if missing:
                raise UserError(f"shard {missing[0]} listed in the manifest is missing ({len(missing)} missing "
                                f"in all): re-pack into {cfg.shards}")
    train_samples = manifest["splits"]["train"]["samples"]
    if cfg.batch_size * world_size > train_samples:
        raise ConfigError(f"--batch-size {cfg.batch_size} x {world_size} process(es) is larger than the train split "
                          f"({train_samples} images): use --batch-size {max(1, train_samples // world_size)} or less")
    return manifest


def check_run_folder(out: Path, resume: bool) -> None:
    """A new run never overwrites an old one; --resume needs one to continue."""
    if resume and not (out / LAST).is_file():
        raise ConfigError(f"--resume: there is no {out / LAST} to continue; drop --resume to start a new run")
    if not resume and (out / LAST).is_file():
        raise ConfigError(f"{out} already holds a run ({LAST}): add --resume to continue it, or choose another --out")


def class_prior(manifest: dict[str, Any]) -> Optional[list[float]]:
    """Each class's share of the train images, from the manifest's counts."""
    train = manifest["splits"]["train"]
    counts = train.get("class_counts")
    if not counts or len(counts) != NUM_CLASSES:
        return None
    return [count / train["samples"] for count in counts]


def _loader_workers(cfg: TrainConfig, runtime: Runtime) -> int:
    if cfg.workers is not None:
        return cfg.workers
    if runtime.device.type == "cpu":
        # Training on the CPU already uses every core; loader processes beside it stall the
        # compute threads (each parallel region waits for its slowest thread) more than they save.
        return 0
    return cores_per_process()


def train_transform(cfg: TrainConfig, dtype: torch.dtype) -> TrainTransform:
    """The random resized crop and flip of training, normalised into the model's input dtype."""
    return TrainTransform(out_size=cfg.size, scale=(cfg.crop_scale_min, 1.0), dtype=dtype,
                          channels_last=cfg.channels_last)


def validation_transform(cfg: TrainConfig, dtype: torch.dtype) -> EvalTransform:
    """The whole image resized to the training resolution, normalised into the model's input dtype."""
    return EvalTransform(out_size=cfg.size, dtype=dtype, channels_last=cfg.channels_last)


def build_loaders(cfg: TrainConfig, runtime: Runtime) -> tuple[Any, Any]:
    """The train loader (shuffled, equal steps on every rank) and the validation loader, both
    delivering model-ready inputs."""
    dtype = runtime.amp_dtype or torch.float32
    common = dict(batch_size=cfg.batch_size, device=runtime.device, mode=cfg.loader, seed=cfg.seed,
                  rank=runtime.rank, world_size=runtime.world_size, workers=_loader_workers(cfg, runtime),
                  skip_bad_samples=cfg.skip_bad_samples)
    return (build_loader(cfg.shards, "train", train=True, transform=train_transform(cfg, dtype), **common),
            build_loader(cfg.shards, "val", train=False, transform=validation_transform(cfg, dtype), **common))


def agreed_steps(loader: Any, runtime: Runtime) -> int:
    """Steps per epoch: the smallest share over ranks, so that no rank waits for a step that never comes."""
    steps = torch.tensor(len(loader), device=runtime.device)
    if runtime.distributed:
        torch.distributed.all_reduce(steps, op=torch.distributed.ReduceOp.MIN)
    if int(steps) == 0:
        raise ConfigError("--batch-size is larger than a process's share of the train split: lower it")
    return int(steps)


def build_trainer(cfg: TrainConfig, runtime: Runtime, log: RunLog) -> Trainer:
    """Check everything that can be checked, then build the state (restored with --resume)."""
    cfg = cfg.resolved()
    check_model_name(cfg.model)
    out = Path(cfg.out)
    check_run_folder(out, cfg.resume)
    manifest = check_shards(cfg, runtime.world_size)
    if runtime.is_main:
        print_config(cfg, log.console)
        log.save_config(to_dict(cfg))
    seed_everything(cfg.seed)
    model = build_model(cfg.model, cfg.weights, class_prior=class_prior(manifest))
    check_input_size(model, cfg.size, cfg.model)
    fmt = torch.channels_last if cfg.channels_last else torch.preserve_format
    model = model.to(runtime.device, memory_format=fmt)
    train_loader, val_loader = build_loaders(cfg, runtime)
    steps = agreed_steps(train_loader, runtime)
    optimizer = build_optimizer(model, cfg.lr, cfg.backbone_lr_mult, cfg.weight_decay)
    scheduler = build_scheduler(optimizer, cfg.schedule, total_steps=cfg.epochs * steps,
                                warmup_steps=round(cfg.warmup_epochs * steps), freeze_steps=cfg.freeze_epochs * steps)
    tr = Trainer(
        cfg=cfg, runtime=runtime, log=log, model=model, ema=ModelEma(model, cfg.ema_decay) if cfg.ema else None,
        optimizer=optimizer, scheduler=scheduler, scaler=runtime.grad_scaler(),
        criterion=build_loss(cfg.loss, cfg.asl_gamma_neg, cfg.asl_gamma_pos, cfg.asl_clip),
        train_loader=train_loader, val_loader=val_loader, steps_per_epoch=steps,
        classes=tuple(manifest.get("classes") or CLASSES), input_dtype=runtime.amp_dtype or torch.float32,
    )
    if cfg.resume:
        restore(tr, out / LAST)
    else:
        log.keep_epochs_up_to(0)  # a run killed before its first checkpoint may have logged an epoch
        if runtime.is_main and out.is_dir():
            remove_stale_temporaries(out)  # and may have left a half-written checkpoint
    return tr


def enter_phase(tr: Trainer, epoch: int) -> None:
    """Freeze or release the backbone for `epoch`; (re)wrap the model for DDP and torch.compile.

    DDP only reduces gradients of parameters that required them when it was built, so a change
    of phase builds a new wrapper around the same module."""
    frozen = epoch < tr.cfg.freeze_epochs
    if tr.net is not None and frozen == tr.frozen:
        return
    set_backbone_trainable(tr.model, not frozen)
    tr.net = None
    net = wrap_ddp(tr.model, tr.runtime)
    tr.net = torch.compile(net) if tr.cfg.compile else net
    if tr.frozen is not None or frozen:
        tr.log.note("backbone frozen: training the head only" if frozen else "backbone released: fine-tuning all layers")
    tr.frozen = frozen
