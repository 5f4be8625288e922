"""Checkpoints inside an epoch: when one is due, what it holds, and where a resumed epoch starts.

    $ cocoshard train --shards shards --out runs/x --checkpoint-every 10   # last.pt every ~10 minutes
    $ cocoshard train --out runs/x --resume                                 # after a kill: from that step

An epoch is long on a slow device, and a kill (a preempted node, a lost peer) used to lose all of
it. With `--checkpoint-every MINUTES` the trainer writes `last.pt` inside an epoch too, holding
everything the rest of the epoch depends on, so that the resumed run ends bit-identical to the
uninterrupted one (`tests/training/test_midepoch.py`):

- the position: the epoch and the batches of it done (`Loader.set_epoch(epoch, start)` then yields
  the rest exactly as the uninterrupted epoch would);
- each rank's partial training figures (`OnlineMetrics`: loss sum, predictions and labels so far)
  and its generators (dropout draws from torch's global generator, seeded per epoch and rank), and
  the time the epoch had taken;
- the weights, EMA, optimiser, schedule and scaler, as at an epoch's end (`Trainer.state_dict`).

When: rank 0's clock decides at the steps where the loop already waits for the device (every
`--log-every` steps), and its decision is broadcast, so every rank takes part in the same save
(the per-rank state is gathered to rank 0, which writes). The step never waits for the device
for it. A mid-epoch `last.pt` keeps the previous epoch's thresholds and figures and says where it
was saved (`partial`): predict and the best-epoch logic never take it for an epoch's end.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from cocoshard.training.checkpoint import LAST, checkpoint_state, save_checkpoint
from cocoshard.training.runtime import broadcast_flag, gather_to_main, rng_state
from cocoshard.training.trainer import Trainer


@dataclass(frozen=True)
class Position:
    """Where a resumed epoch starts, and what its first part left behind on this rank."""

    batch: int  # batches of the epoch already trained
    time_s: float  # seconds the epoch had taken
    data_wait_s: float  # of which waiting for the loader
    meter: dict[str, Any]  # this rank's `OnlineMetrics.state()`
    rng: dict[str, Any]  # this rank's generators (`runtime.rng_state`)


def take_position(tr: Trainer, epoch: int) -> Position | None:
    """The saved position inside `epoch` for this rank, once (None: the epoch starts at its beginning)."""
    partial, tr.partial = tr.partial, None
    if not partial or partial["epoch"] != epoch:
        return None
    mine = partial["ranks"][tr.runtime.rank]
    return Position(
        partial["batch"], float(partial["time_s"]), float(partial["data_wait_s"]), mine["meter"], mine["rng"]
    )


def save_due(tr: Trainer) -> bool:
    """Whether a mid-epoch save is due now: rank 0's clock decides, every rank follows (collective
    in a torchrun job; call at the log cadence only, where the loop already waits for the device)."""
    every = tr.cfg.checkpoint_every * 60
    if every <= 0:
        return False
    return broadcast_flag(time.monotonic() - tr.last_save >= every, tr.runtime.device)


def save_mid_epoch(
    tr: Trainer, epoch: int, batch: int, meter: dict[str, Any], time_s: float, data_wait_s: float
) -> None:
    """Write last.pt at batch `batch` of `epoch` (collective: every rank sends its part to rank 0)."""
    ranks = gather_to_main({"meter": meter, "rng": rng_state()})
    if ranks is not None:
        partial = {
            "epoch": epoch,
            "batch": batch,
            "steps": tr.steps_per_epoch,
            "time_s": time_s,
            "data_wait_s": data_wait_s,
            "ranks": ranks,
        }
        state = checkpoint_state(
            tr.state_dict(),
            epoch=tr.epoch,
            thresholds=tr.last_thresholds,
            figures=tr.last_figures,
            weights=tr.last_weights,
            partial=partial,
        )
        with tr.saving():
            save_checkpoint(tr.out / LAST, state)
    tr.saved = (tr.epoch, batch)
    tr.last_save = time.monotonic()
