"""Resuming a run: which checkpoint, which settings, which shards, and the state put back.

    $ cocoshard train --out runs/r18 --resume                 # continues runs/r18/last.pt
    $ cocoshard train --resume runs/r18/last.pt --epochs 20   # timm's habit; more epochs than planned
    $ torchrun --max-restarts 3 ... -m cocoshard train --out runs/r18 --resume auto   # fresh or continued

A resumed run continues with its own settings, read from its checkpoint (`settings_to_run`): only
what cannot change what is trained may be given again (`RESUMABLE`), anything else is refused by
name; the machine-dependent choices (loader workers, CPU threads) are made again on the machine
it resumes on. The shards must be the ones it trained on (`check_same_shards`: a re-pack moves
images between train and val), and so must the number of processes (`check_same_world`: the
epoch's split over ranks, the steps per epoch and the schedule all follow from it). Every rank
must resume the same checkpoint (`check_ranks_agree`: a node that cannot see OUT/last.pt would
start afresh beside ranks that resume). `restore` then puts the trainer's state back
(`Trainer.load_state_dict`): weights, EMA, optimiser, schedule, scaler, counters and generators,
so that the resumed run ends as the uninterrupted one would have.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Protocol

from cocoshard.atomic import remove_stale_temporaries
from cocoshard.config import RESUME_AUTO, RESUME_LAST, TrainConfig
from cocoshard.errors import ConfigError
from cocoshard.settings import to_dict
from cocoshard.training.checkpoint import LAST, RESUME_KEYS, checkpoint_config, load_checkpoint
from cocoshard.training.runtime import Runtime, gather_objects
from cocoshard.training.watchdog import this_process

# Settings a resumed run may be given again with other values: none changes what is trained.
RESUMABLE = (
    "resume",
    "out",
    "shards",
    "epochs",
    "max_steps",
    "workers",
    "threads",
    "log_every",
    "device",
    "compile",
    "decode",
    "cache",
    "cache_size",
    "connect_timeout",
    "stall_timeout",
    "retries",
    "checkpoint_every",
    "dist_timeout",
)
# Chosen from the machine when not given: a resumed run chooses them again on its own machine.
MACHINE_SETTINGS = ("workers", "threads")


def resume_path(cfg: TrainConfig) -> Path:
    """The last.pt a `--resume` means: OUT/last.pt, or the file given (`--resume PATH/last.pt`)."""
    if cfg.resume in (RESUME_LAST, RESUME_AUTO):
        return Path(cfg.out) / LAST
    path = Path(cfg.resume or "")
    return path / LAST if path.is_dir() else path


def resume_settings(cfg: TrainConfig, state: dict[str, Any], path: Path) -> TrainConfig:
    """The run's own settings (from its checkpoint), with only what a resumed run may change taken
    from `cfg`; a given setting that would change what is trained is refused by name."""
    named_file = cfg.resume not in (RESUME_LAST, RESUME_AUTO)
    if "out" in cfg.given and named_file and Path(cfg.out).resolve() != path.parent.resolve():
        raise ConfigError(
            f"--out {cfg.out} and --resume {path} name two runs: a run resumes in its own folder "
            f"(drop --out, or give --out {path.parent} --resume)"
        )
    saved = checkpoint_config(state, path)
    saved_values, given_values = to_dict(saved), to_dict(cfg)
    # `auto` (or unset) given again matches whatever the run resolved it to
    refused = sorted(
        name
        for name in cfg.given - set(RESUMABLE)
        if given_values[name] not in (None, "auto") and given_values[name] != saved_values[name]
    )
    if refused:
        changes = ", ".join(
            f"--{n.replace('_', '-')} {given_values[n]!r} (the run has {saved_values[n]!r})" for n in refused
        )
        raise ConfigError(
            f"--resume continues {path} with the settings it was trained with; these would change it: "
            f"{changes}. A resumed run may change only "
            f"{', '.join('--' + n.replace('_', '-') for n in RESUMABLE[2:])}; "
            f"start a new run in another --out to train differently"
        )
    values = {**saved_values, **{name: None for name in MACHINE_SETTINGS}}
    values.update({name: given_values[name] for name in cfg.given if name in RESUMABLE})
    values["out"], values["resume"] = str(path.parent), str(path)
    return TrainConfig(**values, given=cfg.given)


def settings_to_run(cfg: TrainConfig) -> tuple[TrainConfig, dict[str, Any] | None, Path | None]:
    """(the settings the run uses, the checkpoint it resumes or None, its path): decided before
    anything starts, so that a refused resume leaves the run folder as it was. `--resume auto`
    without OUT/last.pt is a new run (which still refuses a folder holding another run's files)."""
    if not cfg.resume:
        return cfg.resolved(), None, None
    path = resume_path(cfg)
    if cfg.resume == RESUME_AUTO and not path.is_file():
        return cfg.resolved(), None, None
    if not path.is_file():
        raise ConfigError(f"--resume: there is no {path} to continue; drop --resume to start a new run")
    state = load_checkpoint(path, mid_epoch=True)
    missing = [key for key in RESUME_KEYS if key not in state]
    if missing:
        raise ConfigError(
            f"--resume {path}: it holds what predict needs (the selected weights), not what a resumed "
            f"run needs ({', '.join(missing)}): resume from the run's {LAST} (--resume {path.parent / LAST})"
        )
    return resume_settings(cfg, state, path).resolved(), state, path


def check_same_shards(state: dict[str, Any], identity: str, shards: str, path: Path) -> None:
    """Refuse to resume on shards other than the ones the run trained on (a re-pack moves images
    between train and val: validation would then score images the model has learned)."""
    trained_on = state.get("shards")
    if trained_on is not None and trained_on != identity:
        raise ConfigError(
            f"{path} was trained on other shards than the ones in {shards} now (their train/val "
            f"shards or checksums differ: re-packed?). Resume with the shards it was trained on, or "
            f"start a new run in another --out"
        )


def check_same_world(state: dict[str, Any], world_size: int, path: Path) -> None:
    """Refuse to resume with another number of processes than the run was trained with.

    The epoch's split over ranks, the steps per epoch, the schedule (in steps) and the images per
    step all follow from it: resumed with another count, the run would train another schedule than
    the one it started (a checkpoint from before world sizes were recorded is taken as it is)."""
    trained_with = state.get("world_size")
    if trained_with is None or trained_with == world_size:
        return
    batch = state.get("config", {}).get("batch_size", "?")
    raise ConfigError(
        f"{path} was trained by {trained_with} process(es) of --batch-size {batch}; this run has "
        f"{world_size}. Resume it with {trained_with} process(es) in all (torchrun's --nnodes times "
        f"--nproc_per_node), or start a new run in another --out (docs/scale-out.md: the learning rate "
        f"when the process count changes)"
    )


def checkpoint_identity(state: dict[str, Any] | None) -> str:
    """A short fingerprint of the position a checkpoint holds ('' for a new run)."""
    if state is None:
        return ""
    partial = state.get("partial") or {}
    digest = hashlib.sha256(state["rng"]["torch"].numpy().tobytes()).hexdigest()[:12]
    return f"epoch {state['epoch']} step {state['step']} batch {partial.get('batch', 0)} rng {digest}"


def check_ranks_agree(runtime: Runtime, state: dict[str, Any] | None, out: str) -> None:
    """Every rank resumes the same checkpoint, or every rank starts afresh (collective).

    A node that cannot see OUT/last.pt (an --out that is not shared) would start a new run beside
    ranks that resume one: refused, naming the ranks and hosts that differ."""
    if not runtime.distributed:
        return
    mine = (checkpoint_identity(state), this_process())
    every = gather_objects(mine)
    if len({identity for identity, _ in every}) == 1:
        return
    seen = "; ".join(
        f"rank {rank} ({who}): {identity or 'no ' + LAST}" for rank, (identity, who) in enumerate(every)
    )
    raise ConfigError(
        f"the processes of this run do not see the same {Path(out) / LAST} ({seen}). --out must be one "
        f"folder every node shares (a network file system), so that every rank resumes the same checkpoint"
    )


class Resumable(Protocol):
    """What a resumed run puts its state back into (`cocoshard.training.trainer.Trainer`)."""

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def restore(trainer: Resumable, state: dict[str, Any], path: Path, *, is_main: bool) -> None:
    """Continue from a checked checkpoint: the trainer's state back, stale temporaries removed."""
    if is_main:
        remove_stale_temporaries(path.parent)  # left by a writer killed mid-save
    trainer.load_state_dict(state)
