"""The trainer: a run's state between steps (`Trainer`) and how it is built, every check first.

`build_trainer` takes the settings the run uses (`cocoshard.training.resume.settings_to_run` decided
them: a new run's own, or a resumed run's) and does every check that can fail before any work
(unknown model, missing shards, images shared by train and val, a batch larger than the split, a
run folder that already holds a run), resolves every automatic setting to what the run really
uses (device, AMP dtype, loader workers, CPU threads), prints and saves it, and only then builds
the model, loaders, optimiser, schedule and EMA, restored from the checkpoint when resuming.
Which splits are train and val is `run_splits`'s one decision: the shards' train and val, or with
`--val-fold I` on a K-fold pack every other fold (read as one) and fold I.
`enter_phase` freezes or releases the backbone per epoch.
"""

from __future__ import annotations

import dataclasses
import platform
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cocoshard import NUM_CLASSES
from cocoshard.atomic import remove_stale_temporaries
from cocoshard.config import TrainConfig
from cocoshard.errors import ConfigError, UserError
from cocoshard.loading.augment import EvalTransform, TrainTransform
from cocoshard.loading.loader import build_loader
from cocoshard.loading.tario import BadShard, shard_keys
from cocoshard.machine import busy_cores, cores_per_process
from cocoshard.prepare.manifest import (
    fold_splits,
    is_url,
    manifest_class_names,
    read_manifest,
    shard_urls,
    shards_identity,
    split_names,
    split_size,
)
from cocoshard.settings import print_config, to_dict
from cocoshard.training.checkpoint import BEST, LAST, versions
from cocoshard.training.loss import build_loss
from cocoshard.training.model import (
    build_model,
    check_input_size,
    check_model_name,
    set_backbone_trainable,
)
from cocoshard.training.optim import ModelEma, build_optimizer, build_scheduler
from cocoshard.training.resume import check_same_shards, restore
from cocoshard.training.runlog import RunLog
from cocoshard.training.runtime import Runtime, rng_state, seed_everything, set_rng_state, unwrap, wrap_ddp


@dataclass
class Trainer:
    """Everything a run needs between steps; `net` is the model as the step calls it (DDP, compiled)."""

    cfg: TrainConfig
    runtime: Runtime
    log: RunLog
    model: nn.Module
    ema: ModelEma | None
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler
    criterion: nn.Module
    train_loader: Any
    val_loader: Any
    steps_per_epoch: int
    classes: Sequence[str]
    input_dtype: torch.dtype
    shards_identity: str = ""  # which labelled shards the run trains on (`manifest.shards_identity`)
    class_counts: Sequence[int] = ()  # train images holding each class
    val_split: str = "val"  # the split it validates on (`fold2` with --val-fold 2)
    num_classes: int = NUM_CLASSES
    net: nn.Module | None = None
    frozen: bool | None = None
    epoch: int = 0  # epochs completed
    step: int = 0  # optimizer steps taken
    best_score: float = -1.0
    best_epoch: int = 0

    @property
    def out(self) -> Path:
        """The run folder."""
        return Path(self.cfg.out)

    def state_dict(self, keep_ema: bool = True) -> dict[str, Any]:
        """What resuming needs of this trainer, as tensors, numbers, strings and containers only
        (a checkpoint loads with weights_only=True). `keep_ema=False` leaves the EMA out, so that a
        reader preferring the EMA uses the raw weights an epoch selected."""
        return {
            "model": unwrap(self.model).state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None and keep_ema else None,
            "ema_updates": self.ema.updates if self.ema is not None else 0,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "step": self.step,
            "rng": rng_state(),
            "config": to_dict(self.cfg),
            "shards": self.shards_identity,
            "class_counts": list(self.class_counts),
            "classes": list(self.classes),
            "best": {"epoch": self.best_epoch, "server_f1_tuned": self.best_score},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a checked checkpoint: weights, EMA, optimiser, schedule, scaler, counters, RNG."""
        self.model.load_state_dict(state["model"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"] or state["model"], int(state.get("ema_updates", 0)))
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
        best = state.get("best") or {}
        self.best_score, self.best_epoch = float(best.get("server_f1_tuned", -1.0)), int(best.get("epoch", 0))
        set_rng_state(state["rng"])
        self.log.keep_epochs_up_to(self.epoch)

    def skipped_samples(self) -> int:
        """Samples this rank's loaders skipped as undecodable (with --skip-bad-samples)."""
        return sum(
            int(getattr(loader, "skipped_samples", 0)) for loader in (self.train_loader, self.val_loader)
        )


# ----------------------------------------------------------------------------------- settings


def loader_workers(cfg: TrainConfig, runtime: Runtime) -> int:
    """Loader processes: as given, else one per core of this process on a GPU and none on a CPU
    (training on a CPU already uses every core; loader processes beside it stall the compute
    threads, as each parallel region waits for its slowest thread)."""
    if cfg.workers is not None:
        return cfg.workers
    return 0 if runtime.device.type == "cpu" else cores_per_process()


def compute_threads(cfg: TrainConfig, workers: int, busy: float) -> int:
    """CPU threads of the training process: as given, else this process's cores less its loader
    workers (each takes a core when it augments on a CPU) and less the cores other processes kept
    busy when the run started, at least one.

    Measured (cocoshard_tiny, 96 px, 2-core x86 CPU): idle, 2 threads train at 494 img/s and 1 at
    338; with one core busy elsewhere, 2 threads fall to 158 img/s while 1 keeps 336 (each
    parallel region waits for its thread on the busy core)."""
    if cfg.threads is not None:
        return cfg.threads
    return max(1, cores_per_process() - workers - int(round(busy)))


def resolved_settings(cfg: TrainConfig, runtime: Runtime, workers: int, threads: int) -> TrainConfig:
    """The settings with every automatic one replaced by what the run really uses."""
    amp = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(runtime.amp_dtype, cfg.amp_dtype)
    return dataclasses.replace(
        cfg.resolved(), device=runtime.device.type, amp_dtype=amp, workers=workers, threads=threads
    )


def run_facts(cfg: TrainConfig, runtime: Runtime, identity: str, busy: float) -> dict[str, Any]:
    """What else a run resolved at start: shown with the settings and saved as OUT/run.json."""
    if runtime.device.type == "cuda":
        name = torch.cuda.get_device_name(runtime.device)
    else:
        name = f"CPU, {torch.get_num_threads()} threads of {cores_per_process()} cores ({platform.machine()})"
    how = (
        "given"
        if "threads" in cfg.given
        else (
            f"{cores_per_process()} cores, {cfg.workers} loader workers, {busy:.1f} busy elsewhere at start"
        )
    )
    return {
        "device_name": name,
        "world_size": runtime.world_size,
        "loader": cfg.loader,
        "cpu_threads": f"{cfg.threads} ({how})",
        "amp": str(runtime.amp_dtype).removeprefix("torch.") if runtime.amp_dtype else "off",
        "shards_identity": identity[:16],
        "command": " ".join(sys.argv),
        "versions": versions(),
    }


# ----------------------------------------------------------------------------------- checks


@dataclass(frozen=True)
class RunSplits:
    """The splits a run trains and validates on: each a split name, or several joined by `+`."""

    train: str
    val: str


def run_splits(cfg: TrainConfig, manifest: dict[str, Any]) -> RunSplits:
    """train and val; or on a K-fold pack with `--val-fold I`, every other fold (read as one) and
    fold I. A K-fold pack without `--val-fold`, or folds asked of a train/val pack, is refused."""
    folds = fold_splits(manifest)
    if not folds:
        if cfg.val_fold is not None:
            raise ConfigError(
                f"--val-fold {cfg.val_fold}: {cfg.shards} holds a train/val split, not folds; pack with "
                f"--folds K to train on folds, or drop --val-fold"
            )
        return RunSplits("train", "val")
    if cfg.val_fold is None or cfg.val_fold >= len(folds):
        which = "" if cfg.val_fold is None else f", not {cfg.val_fold}"
        raise ConfigError(
            f"{cfg.shards} holds {len(folds)} folds (pack --folds {len(folds)}): give --val-fold 0 to "
            f"{len(folds) - 1}{which}, the fold this run validates on (the other folds train it)"
        )
    val = folds[cfg.val_fold]
    return RunSplits("+".join(fold for fold in folds if fold != val), val)


def check_shards(cfg: TrainConfig, world_size: int) -> dict[str, Any]:
    """The manifest, after checking that both splits exist, have files, share no image, and fit the batch."""
    manifest = read_manifest(cfg.shards)
    splits = run_splits(cfg, manifest)
    for split in (splits.train, splits.val):
        if not split_size(manifest, split):
            raise UserError(
                f"{cfg.shards}: the {split} split is empty; re-pack with more images "
                f"(or a larger --val-fraction, or fewer --folds) before training"
            )
        if not is_url(cfg.shards):
            missing = [url for url in shard_urls(cfg.shards, manifest, split) if not Path(url).is_file()]
            if missing:
                raise UserError(
                    f"shard {missing[0]} listed in the manifest is missing ({len(missing)} missing "
                    f"in all): re-pack into {cfg.shards}"
                )
    if not is_url(cfg.shards):  # (over a URL every shard would be downloaded just to list its keys)
        train, val = (
            {key for url in shard_urls(cfg.shards, manifest, split) for key in _keys(url, cfg)}
            for split in (splits.train, splits.val)
        )
        shared = sorted(train & val)
        if shared:
            which = f" ({splits.train} and {splits.val})" if splits.val != "val" else ""
            raise UserError(
                f"{cfg.shards}: {len(shared)} images are in both the train and the val split{which} (e.g. "
                f"{', '.join(shared[:3])}): validation would score images the model learns from; re-pack"
            )
    train_samples = split_size(manifest, splits.train)
    if cfg.batch_size * world_size > train_samples:
        raise ConfigError(
            f"--batch-size {cfg.batch_size} x {world_size} process(es) is larger than the train split "
            f"({train_samples} images): use --batch-size {max(1, train_samples // world_size)} or less"
        )
    return manifest


def _keys(url: str, cfg: TrainConfig) -> list[str]:
    """A shard's keys; a damaged shard is named here, or with --skip-bad-samples left to the loader."""
    try:
        return shard_keys(url)
    except BadShard:
        if cfg.skip_bad_samples:
            return []
        raise


def check_run_folder(out: Path) -> None:
    """A new run never overwrites an old one, finished or not."""
    if (out / LAST).is_file():
        raise ConfigError(
            f"{out} already holds a run ({LAST}): add --resume to continue it, or choose another --out"
        )
    if (out / BEST).is_file():
        raise ConfigError(
            f"{out} holds a finished run's {BEST}: choose another --out (or move {out / BEST} away)"
        )


def train_class_counts(manifest: dict[str, Any], split: str) -> list[int]:
    """Images holding each class in the train split (or in the folds it names), from the manifest."""
    names = split_names(split)
    return [
        sum(int(manifest["splits"][name]["class_counts"][c]) for name in names) for c in range(NUM_CLASSES)
    ]


def class_prior(manifest: dict[str, Any], split: str = "train") -> list[float] | None:
    """Each class's share of the train images, from the manifest's counts."""
    samples = split_size(manifest, split)
    return [count / samples for count in train_class_counts(manifest, split)]


# ----------------------------------------------------------------------------------- building


def train_transform(cfg: TrainConfig, dtype: torch.dtype) -> TrainTransform:
    """The random resized crop and flip of training, normalised into the model's input dtype."""
    return TrainTransform(
        out_size=cfg.size, scale=(cfg.crop_scale_min, 1.0), dtype=dtype, channels_last=cfg.channels_last
    )


def validation_transform(cfg: TrainConfig, dtype: torch.dtype) -> EvalTransform:
    """The whole image resized to the training resolution, normalised into the model's input dtype."""
    return EvalTransform(out_size=cfg.size, dtype=dtype, channels_last=cfg.channels_last)


def build_loaders(cfg: TrainConfig, runtime: Runtime, splits: RunSplits) -> tuple[Any, Any]:
    """The train loader (shuffled, equal steps on every rank) and the validation loader, both
    delivering model-ready inputs."""
    dtype = runtime.amp_dtype or torch.float32
    common = dict(
        batch_size=cfg.batch_size,
        device=runtime.device,
        mode=cfg.loader,
        seed=cfg.seed,
        rank=runtime.rank,
        world_size=runtime.world_size,
        workers=cfg.workers,
        threads=cfg.threads,
        skip_bad_samples=cfg.skip_bad_samples,
        decode=cfg.decode,
    )
    return (
        build_loader(cfg.shards, splits.train, train=True, transform=train_transform(cfg, dtype), **common),
        build_loader(
            cfg.shards, splits.val, train=False, transform=validation_transform(cfg, dtype), **common
        ),
    )


def agreed_steps(loader: Any, runtime: Runtime) -> int:
    """Steps per epoch: the smallest share over ranks, so that no rank waits for a step that never comes."""
    steps = torch.tensor(len(loader), device=runtime.device)
    if runtime.distributed:
        torch.distributed.all_reduce(steps, op=torch.distributed.ReduceOp.MIN)
    if int(steps) == 0:
        raise ConfigError("--batch-size is larger than a process's share of the train split: lower it")
    return int(steps)


def build_trainer(
    cfg: TrainConfig,
    runtime: Runtime,
    log: RunLog,
    resumed: dict[str, Any] | None = None,
    resumed_from: Path | None = None,
    lock: Callable[[], Any] | None = None,
) -> Trainer:
    """Check everything that can be checked, then build the state (restored from `resumed`).

    `lock()` takes the run folder's write lock once the checks pass (nothing is created before)."""
    check_model_name(cfg.model)
    out = Path(cfg.out)
    if resumed is None:
        check_run_folder(out)
    manifest = check_shards(cfg, runtime.world_size)
    splits = run_splits(cfg, manifest)
    identity = shards_identity(manifest)
    if resumed is not None:
        check_same_shards(resumed, identity, cfg.shards, resumed_from)
    if lock is not None:
        lock()
        if resumed is None:
            check_run_folder(out)  # again, under the lock: another run may have started meanwhile
    workers = loader_workers(cfg, runtime)
    busy = busy_cores() if cfg.threads is None else 0.0
    threads = compute_threads(cfg, workers, busy)
    torch.set_num_threads(threads)
    cfg = resolved_settings(cfg, runtime, workers, threads)
    if runtime.is_main:
        facts = run_facts(cfg, runtime, identity, busy)
        facts["splits"] = f"train {splits.train}, val {splits.val}"
        print_config(cfg, log.console, extra={k: v for k, v in facts.items() if k != "versions"})
        log.save_config(to_dict(cfg), facts)
    seed_everything(cfg.seed)
    model = build_model(cfg.model, cfg.weights, class_prior=class_prior(manifest, splits.train))
    check_input_size(model, cfg.size, cfg.model)
    fmt = torch.channels_last if cfg.channels_last else torch.preserve_format
    model = model.to(runtime.device, memory_format=fmt)
    train_loader, val_loader = build_loaders(cfg, runtime, splits)
    steps = agreed_steps(train_loader, runtime)
    optimizer = build_optimizer(model, cfg.lr, cfg.backbone_lr_mult, cfg.weight_decay)
    scheduler = build_scheduler(
        optimizer,
        cfg.schedule,
        total_steps=cfg.epochs * steps,
        warmup_steps=round(cfg.warmup_epochs * steps),
        freeze_steps=cfg.freeze_epochs * steps,
    )
    tr = Trainer(
        cfg=cfg,
        runtime=runtime,
        log=log,
        model=model,
        ema=ModelEma(model, cfg.ema_decay) if cfg.ema else None,
        optimizer=optimizer,
        scheduler=scheduler,
        scaler=runtime.grad_scaler(),
        criterion=build_loss(cfg.loss, cfg.asl_gamma_neg, cfg.asl_gamma_pos, cfg.asl_clip),
        train_loader=train_loader,
        val_loader=val_loader,
        steps_per_epoch=steps,
        classes=manifest_class_names(manifest),
        input_dtype=runtime.amp_dtype or torch.float32,
        shards_identity=identity,
        class_counts=train_class_counts(manifest, splits.train),
        val_split=splits.val,
    )
    if resumed is not None and resumed_from is not None:
        restore(tr, resumed, resumed_from, is_main=runtime.is_main)
        log.note(f"resumed from {resumed_from}: {tr.epoch} epoch(s), {tr.step} steps done")
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
        tr.log.note(
            "backbone frozen: training the head only"
            if frozen
            else "backbone released: fine-tuning all layers"
        )
    tr.frozen = frozen
