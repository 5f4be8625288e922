"""`cocoshard train`: fine-tune a classifier on packed shards for the leaderboard's F1, fast.

    $ cocoshard train --shards shards --out runs/maxvit                     # defaults: the best recipe
    $ cocoshard train --shards shards --out runs/maxvit --resume            # after a crash or kill -9
    $ torchrun --nproc_per_node=4 -m cocoshard train --shards shards --out runs/ddp --resume auto
    $ cocoshard train --shards demo/shards --model cocoshard_tiny --weights none --size 96 --device cpu
    $ cocoshard train --shards shards-5fold --val-fold 2 --out runs/fold2    # K-fold: fold2 validates

The shape of torchvision's classification reference: `run` decides the settings
(`resume.settings_to_run`) and builds the trainer (`trainer.build_trainer`), then each epoch is
`train_one_epoch` followed by `validate` of the raw weights and of their EMA, threshold tuning on
the validation split for the server F1, one line in metrics.jsonl and atomic `last.pt` /
`best.pt` (with the best epoch's validation scores, `val-scores.npz`: with `--val-fold` on a
K-fold pack, the out-of-fold scores `cocoshard ensemble` tunes on), and `last.pt` inside an epoch
too, every `--checkpoint-every` minutes (`midepoch`). Batches arrive training-ready from the loader
(`batch.inputs`: cropped, resized and normalised where that was cheapest, see `cocoshard.loading`).
The step never waits for the device except every `--log-every` steps, to show progress.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from cocoshard import NUM_CLASSES
from cocoshard.config import MIN_LABELS, TrainConfig
from cocoshard.folder_lock import folder_lock
from cocoshard.loading.batch import Batch
from cocoshard.output_paths import check_output_folder
from cocoshard.pure import metrics
from cocoshard.seeds import Stream, derive_seed
from cocoshard.training.checkpoint import (
    BEST,
    EMA,
    LAST,
    checkpoint_state,
    prediction_state,
    save_checkpoint,
)
from cocoshard.training.divergence import check_losses, check_weights
from cocoshard.training.midepoch import Position, save_due, save_mid_epoch, take_position
from cocoshard.training.model import set_train_mode
from cocoshard.training.optim import BACKBONE, HEAD
from cocoshard.training.resume import check_ranks_agree, settings_to_run
from cocoshard.training.runlog import remove_failed_start
from cocoshard.training.runtime import (
    all_reduce_sum,
    barrier,
    gather_objects,
    gather_rows,
    set_rng_state,
)
from cocoshard.training.stopping import GuardedRun, guarded_run
from cocoshard.training.trainer import Trainer, build_trainer, enter_phase
from cocoshard.training.validation import Scored, validate

# ----------------------------------------------------------------------------------- training


class OnlineMetrics:
    """Training figures accumulated on the device as the epoch runs: no second pass, no per-step sync.

    Predictions at 0.5 (logit > 0) and labels are kept as uint8 rows (80 bytes per image), so the
    epoch's server F1 comes from the batches the model actually trained on.
    """

    def __init__(self, device: torch.device) -> None:
        self.loss_sum = torch.zeros((), device=device, dtype=torch.float64)
        self.nonfinite = torch.zeros((), device=device, dtype=torch.int64)  # steps with a NaN/inf loss
        self.images = 0
        self.batches = 0
        self.predicted: list[torch.Tensor] = []
        self.labels: list[torch.Tensor] = []
        self._read = (0.0, 0)  # loss sum and images at the last `read_losses`

    def add(self, loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> None:
        """Count one batch (device operations only): a non-finite loss is counted, not summed."""
        loss = loss.detach().double()
        finite = torch.isfinite(loss)
        self.nonfinite += (~finite).to(torch.int64)
        self.loss_sum += torch.where(finite, loss, torch.zeros_like(loss)) * labels.shape[0]
        self.images += labels.shape[0]
        self.batches += 1
        self.predicted.append((logits.detach() > 0).to(torch.uint8))
        self.labels.append(labels.to(torch.uint8))

    def state(self) -> dict[str, Any]:
        """The epoch's counts so far, on the CPU, for a mid-epoch checkpoint (waits for the device)."""
        none = torch.zeros((0, NUM_CLASSES), dtype=torch.uint8)
        return {
            "loss_sum": self.loss_sum.cpu(),
            "images": self.images,
            "batches": self.batches,
            "predicted": torch.cat(self.predicted).cpu() if self.predicted else none,
            "labels": torch.cat(self.labels).cpu() if self.labels else none,
            "nonfinite": self.nonfinite.cpu(),
        }

    def restore(self, state: dict[str, Any]) -> None:
        """Continue from `state()`: the figures come out as if the epoch had not been interrupted."""
        device = self.loss_sum.device
        self.loss_sum = state["loss_sum"].to(device=device, dtype=torch.float64)
        self.images, self.batches = int(state["images"]), int(state["batches"])
        self.predicted = [state["predicted"].to(device)]
        self.labels = [state["labels"].to(device)]
        self.nonfinite = state.get("nonfinite", torch.zeros((), dtype=torch.int64)).to(device)
        self._read = (float(self.loss_sum), self.images)  # per-step losses count from here

    def mean_loss(self) -> float:
        """This rank's mean loss so far (waits for the device)."""
        return self.loss_sum.item() / max(self.images, 1)

    def read_losses(self) -> tuple[float, float]:
        """(this rank's mean loss so far, its mean loss since the last call): one wait for the device."""
        total, (before, images_before) = self.loss_sum.item(), self._read
        self._read = (total, self.images)
        return total / max(self.images, 1), (total - before) / max(self.images - images_before, 1)

    def nonfinite_steps(self) -> int:
        """Steps of this epoch with a NaN or infinite loss, over every rank (collective: call on all)."""
        return int(all_reduce_sum(self.nonfinite.clone()).item())

    def summary(self, is_main: bool) -> dict[str, float]:
        """Loss and headline metrics over every rank (collective: call on all ranks)."""
        totals = all_reduce_sum(torch.stack([self.loss_sum, self.loss_sum.new_tensor(float(self.images))]))
        none = torch.zeros((0, NUM_CLASSES), dtype=torch.uint8, device=self.loss_sum.device)
        predicted = gather_rows(torch.cat(self.predicted) if self.predicted else none)
        labels = gather_rows(torch.cat(self.labels) if self.labels else none)
        if not is_main or len(labels) == 0:
            return {}
        result = metrics.metrics_from_predictions(predicted.cpu().numpy(), labels.cpu().numpy())
        return {
            "loss": float(totals[0] / totals[1].clamp(min=1)),
            "server_f1": result["server_f1"],
            "macro_f1": result["macro_f1"],
            "micro_f1": result["micro_f1"],
        }


def train_step(tr: Trainer, batch: Batch, meter: OnlineMetrics) -> None:
    """Forward under autocast, backward, step on a training-ready batch; no host synchronisation.

    The loader made the batch ready where it was cheapest (`state.train_transform`): in its
    worker processes on a CPU, on the device after the copy on CUDA."""
    assert tr.net is not None and batch.labels is not None, "set_train_mode first; a labelled split"
    with tr.runtime.autocast():
        logits = tr.net(batch.inputs)
    loss = tr.criterion(logits, batch.labels)
    tr.scaler.scale(loss).backward()
    tr.scaler.step(tr.optimizer)
    tr.scaler.update()
    tr.optimizer.zero_grad(set_to_none=True)
    tr.scheduler.step()
    if tr.ema is not None:
        tr.ema.update()
    tr.step += 1
    meter.add(loss, logits, batch.labels)


def head_lr(tr: Trainer) -> float:
    """The learning rate of the head now (the backbone's is a fixed fraction of it once released)."""
    return next(group["lr"] for group in tr.optimizer.param_groups if group.get("part") == HEAD)


def start_epoch(tr: Trainer, epoch: int) -> tuple[OnlineMetrics, Position | None]:
    """The loader, the generators and the figures where `epoch` starts, or where a mid-epoch
    checkpoint left it (then also that position)."""
    position = take_position(tr, epoch)
    tr.train_loader.set_epoch(epoch, position.batch if position else 0)
    torch.manual_seed(
        derive_seed(tr.cfg.seed, epoch, tr.runtime.rank, Stream.TORCH_GLOBAL)
    )  # dropout, stochastic depth
    set_train_mode(tr.model, backbone_frozen=bool(tr.frozen))
    meter = OnlineMetrics(tr.runtime.device)
    if position is not None:  # the figures and generators as the interrupted epoch left them
        meter.restore(position.meter)
        set_rng_state(position.rng)
    return meter, position


def train_one_epoch(tr: Trainer, epoch: int) -> dict[str, Any]:
    """One pass over this rank's share of the train split (from a mid-epoch checkpoint's position
    when the run resumed there); returns the epoch's train figures."""
    cfg, runtime = tr.cfg, tr.runtime
    meter, position = start_epoch(tr, epoch)
    start = position.batch if position else 0
    steps = tr.steps_per_epoch
    if cfg.max_steps:
        steps = max(start, min(steps, cfg.max_steps - tr.step + start))
    progress = tr.log.epoch_progress(
        f"epoch {epoch + 1}/{cfg.epochs}",
        steps,
        cfg.batch_size * runtime.world_size,
        run_left_estimate(tr, epoch, steps),
        start=start,
    )
    before, waited = (position.time_s, position.data_wait_s) if position else (0.0, 0.0)
    started = time.perf_counter()  # waited: time spent waiting for the loader (data-starved when large)
    nonfinite, checked = meter.nonfinite_steps(), start  # steps with a non-finite loss, read at step
    try:
        batches, index = iter(tr.train_loader), start
        while True:
            asked = time.perf_counter()
            batch = next(batches, None)  # to the end, so that the loader finishes its epoch cleanly
            waited += time.perf_counter() - asked
            if batch is None or index == steps:
                break  # the epoch's end, or --max-steps reached
            train_step(tr, batch, meter)
            index += 1
            if index % cfg.log_every == 0 or index == steps:  # the device is waited for here only
                mean, recent = meter.read_losses()
                progress.update(index, mean, head_lr(tr))
                tr.log.log_step(tr.step, recent, head_lr(tr))
                seen = meter.nonfinite_steps()
                check_losses(tr, epoch, seen, seen - nonfinite, index - checked)
                nonfinite, checked = seen, index
                if index < steps and save_due(tr):
                    elapsed = before + time.perf_counter() - started
                    save_mid_epoch(tr, epoch, index, meter.state(), elapsed, waited)
    finally:
        progress.close()
    if runtime.device.type == "cuda":
        torch.cuda.synchronize(runtime.device)
    elapsed = time.perf_counter() - started
    trained = torch.tensor(float(meter.images - (position.meter["images"] if position else 0)))
    images = int(all_reduce_sum(trained.to(runtime.device)).item())
    steps_per_rank = gather_objects(meter.batches)
    return {
        "train": meter.summary(runtime.is_main),
        "nonfinite_steps": nonfinite,
        "time_s": before + elapsed,
        "images_per_s": images / max(elapsed, 1e-9),
        "data_wait_s": waited,
        "steps_per_rank": steps_per_rank,
    }


def run_left_estimate(tr: Trainer, epoch: int, steps: int) -> Callable[[float], float]:
    """Seconds the run has left after this epoch, given the seconds a step takes: the epochs to come
    and every validation (inference: ~1/3 of a step's work, on the val split, twice)."""
    epochs_after = tr.cfg.epochs - epoch - 1
    val_share = tr.val_loader.num_samples / max(tr.train_loader.num_samples, 1) / 2

    def run_left(per_step: float) -> float:
        validations = (epochs_after + 1) * val_share * tr.steps_per_epoch
        return (epochs_after * steps + validations) * per_step

    return run_left


# ----------------------------------------------------------------------------------- epochs


def finish_epoch(
    tr: Trainer, epoch: int, train: dict[str, Any], figures: dict, thresholds: dict, scored: Scored
) -> None:
    """Rank 0: choose the better weights, log the epoch, write last.pt, and best.pt (with its
    validation scores) when it improved."""
    selected = max(figures, key=lambda name: (figures[name]["server_f1_tuned"], name == EMA))
    score = figures[selected]["server_f1_tuned"]
    improved = score > tr.best_score
    if improved:
        tr.best_score, tr.best_epoch = score, epoch + 1
    lrs = {group["part"]: group["lr"] for group in tr.optimizer.param_groups}
    record = {
        "epoch": epoch + 1,
        "epochs": tr.cfg.epochs,
        "step": tr.step,
        "lr_head": lrs.get(HEAD, 0.0),
        "lr_backbone": lrs.get(BACKBONE, 0.0),
        "frozen_backbone": tr.frozen,
        "selected": selected,
        "best": improved,
        "best_epoch": tr.best_epoch,
        "val": figures,
        **train,
    }
    tr.log.record_epoch(record, list(figures))
    state = checkpoint_state(
        tr.state_dict(),
        epoch=epoch + 1,
        thresholds=thresholds[selected],
        figures=figures[selected],
        weights=selected,
    )
    if improved:
        with tr.saving():
            save_checkpoint(tr.out / BEST, prediction_state(state))
        keys, scores = scored[selected]
        tr.log.save_val_scores(
            keys,
            scores,
            thresholds[selected],
            tr.classes,
            tr.out / BEST,
            f"shards {tr.shards_identity}",
            tr.val_split,
            trained_on=tr.shards_identity,
            trained_split=tr.shards_split,
        )
        tr.log.save_thresholds(
            {
                "epoch": epoch + 1,
                "weights": selected,
                "classes": list(tr.classes),
                "thresholds": [float(t) for t in thresholds[selected]],
                "server_f1_tuned": score,
                "server_f1_at_0.5": figures[selected]["server_f1"],
                "heldout_gain": figures[selected]["heldout_gain"],
                "min_labels": MIN_LABELS,
            }
        )
    # best.pt and thresholds.json before last.pt: resume trusts last.pt's best score, so a kill in
    # between must leave the best files already written, never named by the log but missing.
    tr.last_thresholds = [float(t) for t in thresholds[selected]]
    tr.last_figures, tr.last_weights = figures[selected], selected
    with tr.saving():
        save_checkpoint(tr.out / LAST, state)


def fit(tr: Trainer) -> None:
    """Epochs from where the state stands to `--epochs` (or `--max-steps`)."""
    for epoch in range(tr.epoch, tr.cfg.epochs):
        enter_phase(tr, epoch)
        train = train_one_epoch(tr, epoch)
        check_weights(tr, epoch)  # a non-finite model is never validated, let alone kept as best
        started = time.perf_counter()
        figures, thresholds, scored = validate(tr)
        train["val_time_s"] = time.perf_counter() - started
        skipped = all_reduce_sum(torch.tensor(float(tr.skipped_samples()), device=tr.runtime.device))
        train["skipped_samples"] = int(skipped.item())
        tr.epoch = epoch + 1
        if tr.runtime.is_main:
            finish_epoch(tr, epoch, train, figures, thresholds, scored)
        barrier()
        tr.saved, tr.last_save = (tr.epoch, 0), time.monotonic()
        if tr.cfg.max_steps and tr.step >= tr.cfg.max_steps:
            tr.log.note(f"stopping after --max-steps {tr.cfg.max_steps} ({tr.step} steps)")
            break


def batches_note(tr: Trainer) -> str | None:
    """What an epoch leaves out: the images of the last partial batch (said once, at the start)."""
    per_step = tr.cfg.batch_size * tr.runtime.world_size
    images = tr.train_loader.split_samples
    left = images - tr.steps_per_epoch * per_step
    if left <= 0:
        return None
    return (
        f"{images} train images in batches of {per_step}: {tr.steps_per_epoch} steps per epoch, each "
        f"leaving out {left} images (the last partial batch; the shuffle picks other ones every epoch)"
    )


def summarise(tr: Trainer, first_epoch: int, seconds: float) -> None:
    """What a finished run says (`RunLog.summary`): this invocation's epochs and time, the best
    epoch, the files written, the commands to run next."""
    tr.log.summary(first_epoch, tr.epoch, tr.cfg.epochs, seconds, tr.best_epoch, tr.best_score, tr.cfg.shards)
    if tr.val_split != "val":  # one fold of a K-fold set: the set's runs become one submission
        tr.log.note(
            f"this run is fold {tr.cfg.val_fold} of a K-fold set: with a run for every fold (--val-fold), "
            "cocoshard ensemble RUN... --out ensemble makes them one submission (docs/kfold.md)"
        )


def nothing_left(tr: Trainer) -> str | None:
    """Why a resumed run has nothing to train (its epochs or its --max-steps done), or None."""
    if tr.epoch >= tr.cfg.epochs:
        return (
            f"{tr.out / LAST} already completed {tr.epoch} of {tr.cfg.epochs} epochs: nothing to do "
            f"(give --epochs more than {tr.epoch} with --resume to train on)"
        )
    if tr.cfg.max_steps and tr.step >= tr.cfg.max_steps:
        return (
            f"{tr.out / LAST} already took {tr.step} steps, --max-steps is {tr.cfg.max_steps}: nothing to "
            f"do (give --max-steps more than {tr.step}, or 0 for no limit, with --resume to train on)"
        )
    return None


def run(cfg: TrainConfig) -> int:
    """Entry point of `cocoshard train` (and of each torchrun process)."""
    cfg, resumed, resumed_from = settings_to_run(cfg)
    check_output_folder(cfg.out, "--out")
    with guarded_run(cfg, resumed_from) as run:
        check_ranks_agree(run.runtime, resumed, cfg.out)
        return train_run(cfg, run, resumed, resumed_from)


def train_run(
    cfg: TrainConfig, run: GuardedRun, resumed: dict[str, Any] | None, resumed_from: Path | None
) -> int:
    """Build the trainer (and show it to the guard, for what a stopped run says), then train it; a
    start that fails before anything is saved removes what it created in the run folder."""
    runtime, log, out = run.runtime, run.log, Path(cfg.out)
    completed = False
    before: list[set[str] | None] = []  # the folder's entries when this run took its lock
    started = time.perf_counter()
    with contextlib.ExitStack() as stack:

        def lock() -> None:  # one writer per run folder: a second train into it is refused at once
            listing = set(os.listdir(out)) if out.is_dir() else None  # what is not this run's
            stack.enter_context(folder_lock(cfg.out, "cocoshard train"))
            before.append(listing)  # locked: from here on, a failed start cleans up after itself

        try:
            tr = build_trainer(
                cfg, runtime, log, resumed, resumed_from, lock=lock if runtime.is_main else None
            )
            run.adopt(tr)
            done = nothing_left(tr)
            if done:
                log.note(done)
                completed = True
                return 0
            first_epoch = tr.epoch
            note = batches_note(tr)
            if note:
                log.note(note)
            fit(tr)
            summarise(tr, first_epoch, time.perf_counter() - started)
            completed = True
            return 0
        finally:
            if not completed and resumed is None and runtime.is_main and before:
                log.close()  # TensorBoard's writer thread must not write into what is removed next
                remove_failed_start(out, before[0])  # a run that saved nothing leaves nothing
