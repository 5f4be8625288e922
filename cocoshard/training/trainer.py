"""The trainer: a run's state between steps (`Trainer`) and how it is built, every check first.

`build_trainer` takes the settings the run uses (`cocoshard.training.resume.settings_to_run` decided
them: a new run's own, or a resumed run's) and does every check that can fail before any work
(unknown model, missing shards, images shared by train and val, a batch larger than the split, a
run folder that already holds a run), resolves every automatic setting to what the run really
uses (device, AMP dtype, loader workers, CPU threads), prints and saves it, and only then builds
the model, loaders, optimiser, schedule and EMA, restored from the checkpoint when resuming.
Which splits are train and val, and the checks of the shards, are `cocoshard.training.run_shards`'s.
`enter_phase` freezes or releases the backbone per epoch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import platform
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

import torch
from torch import nn

from cocoshard import NUM_CLASSES
from cocoshard.atomic import remove_stale_temporaries
from cocoshard.config import RESUME_AUTO, TrainConfig
from cocoshard.errors import ConfigError
from cocoshard.loading.augment import EvalTransform, TrainTransform
from cocoshard.loading.loader import build_loader
from cocoshard.loading.spec import Loader, LoaderSpec
from cocoshard.machine import ThreadPlan, cores_per_process, thread_plan
from cocoshard.prepare.manifest import (
    load_manifest,
    manifest_class_names,
    shards_identity,
    split_names,
    split_record,
    split_size,
)
from cocoshard.settings import to_dict
from cocoshard.shard_cache import remote_of
from cocoshard.training.checkpoint import BEST, LAST, RAW, versions
from cocoshard.training.loss import build_loss
from cocoshard.training.model import (
    build_model,
    check_input_size,
    check_model_name,
    set_backbone_trainable,
)
from cocoshard.training.optim import ModelEma, build_optimizer, build_scheduler
from cocoshard.training.resume import check_same_shards, check_same_world, restore
from cocoshard.training.run_shards import RunSplits, check_shards, run_splits
from cocoshard.training.runlog import RunLog
from cocoshard.training.runtime import (
    Runtime,
    gather_objects,
    rng_state,
    seed_everything,
    set_rng_state,
    unwrap,
    wrap_ddp,
)


@dataclass
class Trainer:
    """Everything a run needs between steps; `net` is the model as the step calls it (DDP, compiled)."""

    cfg: TrainConfig
    runtime: Runtime
    log: RunLog
    model: nn.Module
    ema: ModelEma | None
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    criterion: nn.Module
    train_loader: Loader
    val_loader: Loader
    steps_per_epoch: int
    classes: Sequence[str]
    input_dtype: torch.dtype
    shards_identity: str = ""  # which labelled shards the run trains on (`manifest.shards_identity`)
    shards_split: dict[str, Any] = dataclasses.field(default_factory=dict)  # their split's seed, val share
    class_counts: Sequence[int] = ()  # train images holding each class
    val_split: str = "val"  # the split it validates on (`fold2` with --val-fold 2)
    num_classes: int = NUM_CLASSES
    net: nn.Module | None = None
    frozen: bool | None = None
    epoch: int = 0  # epochs completed
    step: int = 0  # optimizer steps taken
    best_score: float = -1.0
    best_epoch: int = 0
    # what last.pt holds: (epochs completed, batches of the next one), None before the first save
    saved: tuple[int, int] | None = None
    partial: dict[str, Any] | None = None  # a resumed mid-epoch position, until its epoch takes it
    last_thresholds: Sequence[float] = (0.5,) * NUM_CLASSES  # of the latest epoch's kept weights
    last_figures: dict[str, float] = field(default_factory=dict)
    last_weights: str = RAW  # which weights the latest epoch selected (`checkpoint.EMA` or `RAW`)
    last_save: float = field(default_factory=time.monotonic)  # when last.pt was written (or the start)
    saving: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext  # guards a write

    @property
    def out(self) -> Path:
        """The run folder."""
        return Path(self.cfg.out)

    def state_dict(self) -> dict[str, Any]:
        """What resuming needs of this trainer, as tensors, numbers, strings and containers only
        (a checkpoint loads with weights_only=True); `checkpoint.checkpoint_state` adds the epoch's
        figures, and `checkpoint.prediction_state` keeps of it only what predict needs (best.pt)."""
        return {
            "model": unwrap(self.model).state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "ema_updates": self.ema.updates if self.ema is not None else 0,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "step": self.step,
            "world_size": self.runtime.world_size,
            "rng": rng_state(),
            "config": to_dict(self.cfg),
            "shards": self.shards_identity,
            "shards_split": dict(self.shards_split),
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
        self.partial = state.get("partial")
        self.saved = (self.epoch, self.partial["batch"] if self.partial else 0)
        self.last_thresholds = list(state["thresholds"])
        self.last_figures = dict(state.get("metrics") or {})
        self.last_weights = state.get("weights", RAW)
        self.log.keep_epochs_up_to(self.epoch)

    def skipped_samples(self) -> int:
        """Samples this rank's loaders skipped as undecodable (with --skip-bad-samples)."""
        return sum(loader.skipped_samples for loader in (self.train_loader, self.val_loader))


# ----------------------------------------------------------------------------------- settings


def resolved_settings(cfg: TrainConfig, runtime: Runtime, plan: ThreadPlan) -> TrainConfig:
    """The settings with every automatic one replaced by what the run really uses."""
    amp: Literal["auto", "bf16", "fp16"] = cfg.amp_dtype
    if runtime.amp_dtype is not None:
        amp = "bf16" if runtime.amp_dtype == torch.bfloat16 else "fp16"
    device: Literal["cpu", "cuda"] = "cuda" if runtime.device.type == "cuda" else "cpu"
    return dataclasses.replace(
        cfg.resolved(), device=device, amp_dtype=amp, workers=plan.workers, threads=plan.compute
    )


def amp_fact(cfg: TrainConfig, runtime: Runtime) -> str:
    """The autocast dtype the run uses, and why none where --amp asked for one."""
    if runtime.amp_dtype is not None:
        return str(runtime.amp_dtype).removeprefix("torch.")
    if cfg.amp and runtime.device.type == "cpu":
        return "off (no native bf16 on this CPU)"
    return "off"


def run_facts(
    cfg: TrainConfig, runtime: Runtime, identity: str, plan: ThreadPlan, hosts: list[str]
) -> dict[str, Any]:
    """What else a run resolved at start: shown with the settings and saved as OUT/run.json."""
    if runtime.device.type == "cuda":
        name = torch.cuda.get_device_name(runtime.device)
    else:
        name = f"CPU, {torch.get_num_threads()} threads of {cores_per_process()} cores ({platform.machine()})"
    return {
        "device_name": name,
        "world_size": runtime.world_size,
        "ranks": ", ".join(f"{rank}: {host}" for rank, host in enumerate(hosts)),  # rank 0 writes
        "loader": cfg.loader,
        "cpu_threads": f"{plan.compute} ({plan.why})",
        "amp": amp_fact(cfg, runtime),
        "shards_identity": identity[:16],
        "command": " ".join(sys.argv),
        "versions": versions(),
    }


# ----------------------------------------------------------------------------------- checks


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


def build_loaders(cfg: TrainConfig, runtime: Runtime, splits: RunSplits) -> tuple[Loader, Loader]:
    """The train loader (shuffled, equal steps on every rank) and the validation loader, both
    delivering model-ready inputs; `cfg` holds the workers and threads the thread plan chose."""
    dtype = runtime.amp_dtype or torch.float32
    assert cfg.workers is not None and cfg.threads is not None, "resolved settings only"
    common = LoaderSpec(
        batch_size=cfg.batch_size,
        device=runtime.device,
        train=True,
        seed=cfg.seed,
        rank=runtime.rank,
        world_size=runtime.world_size,
        mode=cfg.loader,
        workers=cfg.workers,
        threads=cfg.threads,
        skip_bad_samples=cfg.skip_bad_samples,
        decode=cfg.decode,
        transform=train_transform(cfg, dtype),
    )
    validation = dataclasses.replace(common, train=False, transform=validation_transform(cfg, dtype))
    shards = load_manifest(cfg.shards, remote_of(cfg))  # read once; shards at URLs read as --cache etc. say
    return build_loader(shards, splits.train, common), build_loader(shards, splits.val, validation)


def agreed_steps(loader: Loader, runtime: Runtime) -> int:
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
    if resumed is not None and resumed_from is not None:
        check_same_shards(resumed, identity, cfg.shards, resumed_from)
        check_same_world(resumed, runtime.world_size, resumed_from)
    if lock is not None:
        lock()
        if resumed is None:
            check_run_folder(out)  # again, under the lock: another run may have started meanwhile
    plan = thread_plan(
        "train",
        device_type=runtime.device.type,
        workers=cfg.workers,
        threads=cfg.threads,
        loader_mode=cfg.loader,
    )
    plan.apply()
    cfg = resolved_settings(cfg, runtime, plan)
    hosts = gather_objects(platform.node())
    if runtime.is_main:
        facts = run_facts(cfg, runtime, identity, plan, hosts)
        facts["splits"] = f"train {splits.train}, val {splits.val}"
        log.start(cfg, facts)  # train.log, the settings once, config.json
    seed_everything(cfg.seed)
    model = build_model(cfg.model, cfg.weights, class_prior=class_prior(manifest, splits.train))
    check_input_size(model, cfg.size, cfg.model)
    fmt = torch.channels_last if cfg.channels_last else torch.preserve_format
    model = model.to(runtime.device).to(memory_format=fmt)
    train_loader, val_loader = build_loaders(cfg, runtime, splits)
    steps = agreed_steps(train_loader, runtime)
    freeze_epochs, backbone_lr_mult = cfg.freeze_epochs, cfg.backbone_lr_mult
    assert freeze_epochs is not None and backbone_lr_mult is not None, "resolved settings only"
    optimizer = build_optimizer(model, cfg.lr, backbone_lr_mult, cfg.weight_decay)
    scheduler = build_scheduler(
        optimizer,
        cfg.schedule,
        total_steps=cfg.epochs * steps,
        warmup_steps=round(cfg.warmup_epochs * steps),
        freeze_steps=freeze_epochs * steps,
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
        shards_split=split_record(manifest),
        class_counts=train_class_counts(manifest, splits.train),
        val_split=splits.val,
    )
    if resumed is not None and resumed_from is not None:
        restore(tr, resumed, resumed_from, is_main=runtime.is_main)
        inside = f" and {tr.partial['batch']} steps of epoch {tr.epoch + 1}" if tr.partial else ""
        log.note(f"resumed from {resumed_from}: {tr.epoch} epoch(s){inside}, {tr.step} steps done")
    else:
        if cfg.resume == RESUME_AUTO:
            log.note(f"--resume auto: {out / LAST} does not exist yet, so this is a new run")
        log.keep_epochs_up_to(0)  # a run killed before its first checkpoint may have logged an epoch
        if runtime.is_main and out.is_dir():
            remove_stale_temporaries(out)  # and may have left a half-written checkpoint
    return tr


def enter_phase(tr: Trainer, epoch: int) -> None:
    """Freeze or release the backbone for `epoch`; (re)wrap the model for DDP and torch.compile.

    DDP only reduces gradients of parameters that required them when it was built, so a change
    of phase builds a new wrapper around the same module."""
    frozen = epoch < (tr.cfg.freeze_epochs or 0)
    if tr.net is not None and frozen == tr.frozen:
        return
    set_backbone_trainable(tr.model, not frozen)
    tr.net = None
    net = wrap_ddp(tr.model, tr.runtime)
    tr.net = cast(nn.Module, torch.compile(net)) if tr.cfg.compile else net
    if tr.frozen is not None or frozen:
        tr.log.note(
            "backbone frozen: training the head only"
            if frozen
            else "backbone released: fine-tuning all layers"
        )
    tr.frozen = frozen
