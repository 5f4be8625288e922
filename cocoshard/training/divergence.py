"""A run whose loss or weights stop being finite numbers stops, with one line saying so and what to change.

    check_losses(tr, epoch, nonfinite, since_last, window)   # where the loop reads the loss anyway
    check_weights(tr, epoch)                                 # at the epoch's end, before validation
    check_scores(tr, epoch, "ema", scores)                   # before thresholds are tuned on them

A diverging run (a learning rate far too high, fp16 activations overflowing) soon has a NaN loss,
then NaN weights; left alone it would validate NaN scores, tune thresholds on them and keep the
result as its best epoch. Nothing here reads the device inside a step (`train_step` stays free of
host syncs, `tests/training/test_host_sync.py`): the step only counts non-finite losses on the
device, and the count is read with the loss, every `--log-every` steps and at the epoch's end.

Without a GradScaler a non-finite loss has already reached the weights through the optimizer: the
run stops at the next read. With one (fp16), the scaler skips such a step and leaves the weights
as they were: each is counted, logged as `nonfinite_steps` and said on screen; the run stops only
when every step since the last read was skipped, or the weights are no longer finite.
"""

from __future__ import annotations

import torch
from torch import nn

from cocoshard.errors import UserError
from cocoshard.training.checkpoint import LAST
from cocoshard.training.trainer import Trainer


class Diverged(UserError):
    """The loss, the weights or the validation scores are no longer finite numbers."""


def advice(tr: Trainer) -> str:
    """What to change, from the settings the run used."""
    cfg = tr.cfg
    ways = [f"lower --lr (it is {cfg.lr:g}; try {cfg.lr / 10:g})"]
    if cfg.warmup_epochs < 1:
        ways.append("warm up longer (--warmup-epochs 1 or more)")
    if tr.runtime.amp_dtype == torch.float16:
        ways.append("use --amp-dtype bf16 where the device has it, or --no-amp (fp16 overflows at 65504)")
    elif tr.runtime.amp_dtype is not None:
        ways.append("or train without mixed precision (--no-amp)")
    return "; ".join(ways)


def _kept(tr: Trainer, epoch: int) -> str:
    """What is kept, and where to go on: a resumed run keeps its --lr, so a run that has a
    checkpoint starts again in another folder."""
    if epoch > 0 and (tr.out / LAST).is_file():
        return (
            f"nothing of epoch {epoch + 1} is kept ({tr.out / LAST} holds epoch {epoch}, its last good "
            f"one). Start a new run in another --out and"
        )
    return "no epoch was complete, so nothing was saved. Start again and"


def _stop(tr: Trainer, epoch: int, what: str) -> Diverged:
    return Diverged(
        f"training diverged in epoch {epoch + 1} (step {tr.step}): {what}; {_kept(tr, epoch)} {advice(tr)}"
    )


def check_losses(tr: Trainer, epoch: int, nonfinite: int, since_last: int, window: int) -> None:
    """Stop on non-finite losses: at once without a GradScaler; with one (the steps were skipped)
    when every step of the last `window` was, or the weights themselves are no longer finite."""
    if since_last == 0:
        return
    if not tr.scaler.is_enabled():
        raise _stop(tr, epoch, f"the loss became NaN or infinite ({since_last} of the last {window} steps)")
    if since_last >= window:
        raise _stop(tr, epoch, f"all of the last {window} steps had a NaN or infinite loss (each skipped)")
    check_weights(tr, epoch)
    tr.log.note(
        f"epoch {epoch + 1}: {nonfinite} step(s) skipped so far: NaN or infinite loss (fp16 overflow)"
    )


def finite_weights(module: nn.Module) -> bool:
    """True when every floating-point parameter and buffer of `module` is finite (one device sync)."""
    flags = [torch.isfinite(t).all() for t in module.state_dict().values() if t.is_floating_point()]
    return bool(torch.stack(flags).all()) if flags else True


def check_weights(tr: Trainer, epoch: int) -> None:
    """Stop when the weights (or their EMA) hold NaN or infinity: no such model may be validated,
    let alone kept as the best."""
    if not finite_weights(tr.model):
        raise _stop(tr, epoch, "the weights hold NaN or infinite values")
    if tr.ema is not None and not finite_weights(tr.ema.module):
        raise _stop(tr, epoch, "the averaged (EMA) weights hold NaN or infinite values")


def check_scores(tr: Trainer, epoch: int, weights: str, scores: torch.Tensor) -> None:
    """Stop when validation gave non-finite scores (fp16 activations can overflow with finite
    weights); `scores` are every rank's, so every rank stops together."""
    bad = int((~torch.isfinite(scores)).sum())
    if bad:
        raise _stop(tr, epoch, f"validation of the {weights} weights gave {bad} NaN or infinite scores")
