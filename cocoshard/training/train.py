"""`cocoshard train`: fine-tune a classifier on packed shards for the leaderboard's F1, fast.

    $ cocoshard train --shards shards --out runs/maxvit                     # defaults: the best recipe
    $ cocoshard train --shards shards --out runs/maxvit --resume            # after a crash or kill -9
    $ torchrun --nproc_per_node=4 -m cocoshard train --shards shards --out runs/ddp
    $ cocoshard train --shards demo/shards --model cocoshard_tiny --weights none --size 96 --device cpu
    $ cocoshard train --shards shards-5fold --val-fold 2 --out runs/fold2    # K-fold: fold2 validates

The shape of torchvision's classification reference: `run` decides the settings
(`resume.settings_to_run`) and builds the trainer (`trainer.build_trainer`), then each epoch is
`train_one_epoch` followed by `validate` of the raw weights and of their EMA, threshold tuning on
the validation split for the server F1, one line in metrics.jsonl and atomic `last.pt` /
`best.pt` (with the best epoch's validation scores, `val-scores.npz`: with `--val-fold` on a
K-fold pack, the out-of-fold scores `cocoshard ensemble` tunes on). Batches arrive training-ready
from the loader (`batch.inputs`: cropped, resized and normalised where that was cheapest, see
`cocoshard.loading`). The step never waits for the device except every `--log-every` steps, to
show progress.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

import numpy as np
import torch

from cocoshard import NUM_CLASSES
from cocoshard.config import TrainConfig
from cocoshard.errors import UserError
from cocoshard.folder_lock import folder_lock
from cocoshard.loading.batch import Batch
from cocoshard.pure import metrics, threshold_tuning
from cocoshard.seeds import Stream, derive_seed
from cocoshard.training.checkpoint import (
    BEST,
    EMA,
    LAST,
    RAW,
    checkpoint_state,
    save_checkpoint,
)
from cocoshard.training.model import set_train_mode
from cocoshard.training.optim import BACKBONE, HEAD
from cocoshard.training.resume import settings_to_run
from cocoshard.training.runlog import CONFIG_FILE, METRICS_LOG, THRESHOLDS_FILE, VAL_SCORES_FILE, RunLog
from cocoshard.training.runtime import (
    all_reduce_sum,
    barrier,
    cleanup,
    gather_objects,
    gather_rows,
    setup,
)
from cocoshard.training.trainer import Trainer, build_trainer, enter_phase

# ----------------------------------------------------------------------------------- training


class OnlineMetrics:
    """Training figures accumulated on the device as the epoch runs: no second pass, no per-step sync.

    Predictions at 0.5 (logit > 0) and labels are kept as uint8 rows (80 bytes per image), so the
    epoch's server F1 comes from the batches the model actually trained on.
    """

    def __init__(self, device: torch.device) -> None:
        self.loss_sum = torch.zeros((), device=device, dtype=torch.float64)
        self.images = 0
        self.predicted: list[torch.Tensor] = []
        self.labels: list[torch.Tensor] = []

    def add(self, loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> None:
        """Count one batch (device operations only)."""
        self.loss_sum += loss.detach().double() * labels.shape[0]
        self.images += labels.shape[0]
        self.predicted.append((logits.detach() > 0).to(torch.uint8))
        self.labels.append(labels.to(torch.uint8))

    def mean_loss(self) -> float:
        """This rank's mean loss so far (waits for the device)."""
        return self.loss_sum.item() / max(self.images, 1)

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


def train_one_epoch(tr: Trainer, epoch: int) -> dict[str, Any]:
    """One pass over this rank's share of the train split; returns the epoch's train figures."""
    cfg, runtime = tr.cfg, tr.runtime
    tr.train_loader.set_epoch(epoch)
    torch.manual_seed(
        derive_seed(cfg.seed, epoch, runtime.rank, Stream.TORCH_GLOBAL)
    )  # dropout, stochastic depth
    set_train_mode(tr.model, backbone_frozen=tr.frozen)
    meter = OnlineMetrics(runtime.device)
    steps = tr.steps_per_epoch
    if cfg.max_steps:
        steps = min(steps, cfg.max_steps - tr.step)
    epochs_after = cfg.epochs - epoch - 1
    val_share = (
        tr.val_loader.num_samples / max(tr.train_loader.num_samples, 1) / 2
    )  # inference: ~1/3 of a step's work, twice

    def run_left(per_step: float) -> float:
        return (
            epochs_after * steps * per_step + (epochs_after + 1) * val_share * tr.steps_per_epoch * per_step
        )

    progress = tr.log.epoch_progress(
        f"epoch {epoch + 1}/{cfg.epochs}", steps, cfg.batch_size * runtime.world_size, run_left
    )
    started = time.perf_counter()
    waited = 0.0  # time this process spent waiting for the loader: data-starved when large
    try:
        batches, index = iter(tr.train_loader), 0
        while True:
            asked = time.perf_counter()
            batch = next(batches, None)  # to the end, so that the loader finishes its epoch cleanly
            waited += time.perf_counter() - asked
            if batch is None or index == steps:
                break  # the epoch's end, or --max-steps reached
            train_step(tr, batch, meter)
            index += 1
            if index % cfg.log_every == 0 or index == steps:
                progress.update(index, meter.mean_loss(), head_lr(tr))
    finally:
        progress.close()
    if runtime.device.type == "cuda":
        torch.cuda.synchronize(runtime.device)
    elapsed = time.perf_counter() - started
    images = int(all_reduce_sum(torch.tensor(float(meter.images), device=runtime.device)).item())
    steps_per_rank = gather_objects(len(meter.predicted))
    return {
        "train": meter.summary(runtime.is_main),
        "time_s": elapsed,
        "images_per_s": images / max(elapsed, 1e-9),
        "data_wait_s": waited,
        "steps_per_rank": steps_per_rank,
    }


# ----------------------------------------------------------------------------------- validation


class NothingToValidate(UserError):
    """Every validation sample was bad: no epoch can be scored, so none may be called best."""


@torch.no_grad()
def validation_scores(
    tr: Trainer, model: torch.nn.Module
) -> tuple[np.ndarray | None, np.ndarray | None, float, list[str]]:
    """Scores and labels of the whole validation split (gathered on rank 0), its mean loss and the
    images' keys.

    Raises NothingToValidate on every rank when no rank read a single validation image."""
    runtime = tr.runtime
    model.eval()
    scores, labels, keys = [], [], []
    loss_sum = torch.zeros((), device=runtime.device, dtype=torch.float64)
    for batch in tr.val_loader:
        inputs = batch.inputs
        with runtime.autocast():
            logits = model(inputs).float()
        loss_sum += tr.criterion(logits, batch.labels).double() * batch.labels.shape[0]
        scores.append(torch.sigmoid(logits))
        labels.append(batch.labels.to(torch.uint8))
        keys.extend(batch.keys)
    empty = torch.zeros((0, tr.num_classes), device=runtime.device)
    all_scores = gather_rows(torch.cat(scores) if scores else empty)
    all_labels = gather_rows(torch.cat(labels) if labels else empty.to(torch.uint8))
    all_keys = [key for part in gather_objects(keys) for key in part]
    loss_sum = all_reduce_sum(loss_sum)
    if not all_keys:
        raise NothingToValidate(
            f"validation read no image: all {tr.val_loader.split_samples} samples of the val split were bad "
            "and "
            "skipped (--skip-bad-samples); no epoch can be scored, so no best.pt was written. Check the val "
            "shards "
            f"with cocoshard inspect --shards {tr.cfg.shards} --verify and re-pack"
        )
    if not runtime.is_main:
        return None, None, 0.0, []
    # A loader may repeat a sample to even out ranks: count every image once.
    _, first = np.unique(np.asarray(all_keys), return_index=True)
    first.sort()
    return (
        all_scores.cpu().numpy()[first],
        all_labels.cpu().numpy()[first],
        float(loss_sum) / max(len(all_keys), 1),
        [all_keys[i] for i in first],
    )


def score_validation(
    scores: np.ndarray, labels: np.ndarray, loss: float, seed: int
) -> tuple[dict[str, float], np.ndarray]:
    """Headline metrics at 0.5 and at thresholds tuned for the server F1, and those thresholds."""
    at_half = metrics.metrics_from_scores(scores, labels)
    thresholds = threshold_tuning.tune_thresholds(scores, labels)
    tuned = metrics.metrics_from_scores(scores, labels, thresholds)
    holdout = threshold_tuning.holdout_threshold_gain(scores, labels, seed=seed)
    figures = {
        "loss": loss,
        "server_f1": at_half["server_f1"],
        "server_f1_tuned": tuned["server_f1"],
        "server_precision_tuned": tuned["server_precision"],
        "server_recall_tuned": tuned["server_recall"],
        "heldout_gain": holdout["gain"],
        "macro_f1": at_half["macro_f1"],
        "micro_f1": at_half["micro_f1"],
        "macro_f1_tuned": tuned["macro_f1"],
        "map": at_half["map"],
        "images": at_half["images"],
    }
    return figures, thresholds


Scored = dict[str, tuple[list[str], np.ndarray]]  # weights -> (keys, validation scores)


def validate(tr: Trainer) -> tuple[dict[str, dict[str, float]], dict[str, np.ndarray], Scored]:
    """Evaluate the raw weights and the EMA; on rank 0, their figures, tuned thresholds and scores."""
    candidates = {RAW: tr.model}
    if tr.ema is not None:
        candidates[EMA] = tr.ema.module
    figures, thresholds, scored = {}, {}, {}
    for name, model in candidates.items():
        scores, labels, loss, keys = validation_scores(tr, model)
        if tr.runtime.is_main:
            figures[name], thresholds[name] = score_validation(scores, labels, loss, tr.cfg.seed)
            scored[name] = (keys, scores)
    return figures, thresholds, scored


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
    if improved:
        state = tr.state_dict(keep_ema=selected == EMA)
        save_checkpoint(
            tr.out / BEST,
            checkpoint_state(
                state, epoch=epoch + 1, thresholds=thresholds[selected], figures=figures[selected]
            ),
        )
        keys, scores = scored[selected]
        tr.log.save_val_scores(
            keys,
            scores,
            thresholds[selected],
            tr.classes,
            tr.out / BEST,
            f"shards {tr.shards_identity}",
            tr.val_split,
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
            }
        )
    # best.pt and thresholds.json before last.pt: resume trusts last.pt's best score, so a kill in
    # between must leave the best files already written, never named by the log but missing.
    # predict uses the EMA whenever a checkpoint has one: last.pt carries the EMA's thresholds.
    kept = EMA if EMA in figures else RAW
    state = tr.state_dict(keep_ema=True)
    save_checkpoint(
        tr.out / LAST,
        checkpoint_state(state, epoch=epoch + 1, thresholds=thresholds[kept], figures=figures[kept]),
    )


def fit(tr: Trainer) -> None:
    """Epochs from where the state stands to `--epochs` (or `--max-steps`)."""
    for epoch in range(tr.epoch, tr.cfg.epochs):
        enter_phase(tr, epoch)
        train = train_one_epoch(tr, epoch)
        started = time.perf_counter()
        figures, thresholds, scored = validate(tr)
        train["val_time_s"] = time.perf_counter() - started
        skipped = all_reduce_sum(torch.tensor(float(tr.skipped_samples()), device=tr.runtime.device))
        train["skipped_samples"] = int(skipped.item())
        tr.epoch = epoch + 1
        if tr.runtime.is_main:
            finish_epoch(tr, epoch, train, figures, thresholds, scored)
        barrier()
        if tr.cfg.max_steps and tr.step >= tr.cfg.max_steps:
            tr.log.note(f"stopping after --max-steps {tr.cfg.max_steps} ({tr.step} steps)")
            break


def summary_lines(tr: Trainer, seconds: float) -> list[str]:
    """What a finished run says: time, the best epoch and its scores, the files written, the next command."""
    best = tr.out / BEST
    lines = [
        f"trained {tr.epoch} epoch(s) in {seconds / 60:.1f} min; best epoch {tr.best_epoch}: server F1 "
        f"{tr.best_score:.4f} with tuned thresholds (on the val split they were tuned on)"
    ]
    lines += [
        f"  {name:<16}{tr.out / file}"
        for name, file in (
            ("best checkpoint", BEST),
            ("last checkpoint", LAST),
            ("thresholds", THRESHOLDS_FILE),
            ("val scores", VAL_SCORES_FILE),
            ("metrics per epoch", METRICS_LOG),
            ("settings", CONFIG_FILE),
        )
    ]
    if tr.val_split != "val":  # one fold of a K-fold set: the set's runs become one submission
        lines.append(
            f"this run is fold {tr.cfg.val_fold} of a K-fold set: with a run for every fold (--val-fold), "
            "cocoshard ensemble RUN... --out ensemble makes them one submission (docs/kfold.md)"
        )
    lines.append("next: predict the test images and check the submission:")
    lines.append(
        f"  cocoshard predict --checkpoint {best} --shards {tr.cfg.shards} --split test --out "
        "predictions.json"
    )
    lines.append(f"  cocoshard evaluate --predictions predictions.json --images {tr.cfg.shards}")
    return lines


def interrupted_lines(tr: Trainer) -> list[str]:
    """What a run stopped by Ctrl-C or SIGTERM says: what is kept and how to go on."""
    if tr.epoch == 0 or not (tr.out / LAST).is_file():
        return [
            f"stopped during epoch {tr.epoch + 1}: no epoch was complete, nothing to resume; start again "
            "with "
            f"the same command"
        ]
    return [
        f"stopped during epoch {tr.epoch + 1}: {tr.out / LAST} holds epoch {tr.epoch} of {tr.cfg.epochs}",
        f"  resume with: cocoshard train --out {tr.out} --resume",
    ]


def run(cfg: TrainConfig) -> int:
    """Entry point of `cocoshard train` (and of each torchrun process)."""
    cfg, resumed, resumed_from = settings_to_run(cfg)
    runtime = setup(cfg.device, cfg.amp, cfg.amp_dtype)
    log = RunLog(cfg.out, enabled=runtime.is_main)
    tr = None
    started = time.perf_counter()
    with contextlib.ExitStack() as stack:
        try:
            # one writer per run folder: a second train into it is refused at once
            lock = (
                (lambda: stack.enter_context(folder_lock(cfg.out, "cocoshard train")))
                if runtime.is_main
                else None
            )
            tr = build_trainer(cfg, runtime, log, resumed, resumed_from, lock=lock)
            if tr.epoch >= tr.cfg.epochs:
                log.note(
                    f"{tr.out / LAST} already completed {tr.epoch} of {tr.cfg.epochs} epochs: nothing to do "
                    f"(give --epochs more than {tr.epoch} with --resume to train on)"
                )
                return 0
            fit(tr)
            for line in summary_lines(tr, time.perf_counter() - started):
                log.note(line)
            return 0
        except KeyboardInterrupt:
            if tr is not None:
                for line in interrupted_lines(tr):
                    log.note(line)
            raise
        finally:
            if tr is not None:
                for loader in (tr.train_loader, tr.val_loader):
                    loader.close()  # stop worker processes now rather than at garbage collection
            log.close()
            cleanup()
