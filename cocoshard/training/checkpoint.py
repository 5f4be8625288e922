"""Checkpoints: what they hold, written atomically, read safely and checked, and resuming from one.

A checkpoint (`last.pt`, `best.pt`) is a dict of tensors, numbers, strings, lists and dicts only:

    model, ema, optimizer, scaler, scheduler   state dicts (ema may be None)
    epoch, step, ema_updates                   epochs completed, optimizer steps taken
    rng                                        generator states as tensors and lists (`runtime.rng_state`)
    config                                     the run's TrainConfig as a plain dict, automatic
                                               settings resolved
    shards, class_counts                       the identity of the train and val shards it was trained on,
                                               and how many train images hold each class
    classes, thresholds                        80 names, 80 tuned thresholds
    metrics, best, versions                    the epoch's validation figures, the best epoch so
                                               far, the libraries' versions

so that the safe unpickler loads all of it (`checkpoint_state` is the one place that decides it).
A file that asks the unpickler for anything else (a class, a function: the way a malicious
pickle runs code) is refused with a `UserError`; there is no fallback to `weights_only=False`.
Whatever a reader uses is checked before it is used (`check_checkpoint`): a NaN threshold or a
size of 0 is refused naming the file and the field, never turned into a wrong submission. A
writer killed mid-save leaves only a `.tmp-` file beside the last complete checkpoint.

Resuming (`resume_settings`, `restore`): the run continues with its own settings, taken from the
checkpoint; only what cannot change what is trained may be given again (`RESUMABLE`), anything
else is refused by name, and so are shards other than the ones the run trained on.
"""

from __future__ import annotations

import math
import os
import pickle
import platform
import re
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import torch

from cocoshard import NUM_CLASSES
from cocoshard.atomic import atomic_open, remove_stale_temporaries
from cocoshard.config import RESUME_LAST, TrainConfig
from cocoshard.settings import from_dict, to_dict
from cocoshard.errors import ConfigError, UserError
from cocoshard.training.runtime import rng_state, set_rng_state, unwrap

if TYPE_CHECKING:  # for annotations only: state.py builds a Trainer and calls restore() here
    from cocoshard.training.state import Trainer

LAST = "last.pt"
BEST = "best.pt"
RAW, EMA = "model", "ema"
REQUIRED_KEYS = ("model", "epoch", "step", "config", "classes", "thresholds")
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
)
# Chosen from the machine when not given: a resumed run chooses them again on its own machine.
MACHINE_SETTINGS = ("workers", "threads")
_GLOBAL_RE = re.compile(r"GLOBAL\s+([\w.]+)")


class BadCheckpoint(UserError):
    """A checkpoint that cannot be used: the message names the file and what is wrong."""


def versions() -> dict[str, str]:
    """Versions of the libraries that wrote a checkpoint (for the record, not checked on load)."""
    import PIL
    import torchvision

    from cocoshard import __version__

    # str(): torch.__version__ is a TorchVersion, a class the safe unpickler refuses.
    return {
        "cocoshard": __version__,
        "torch": str(torch.__version__),
        "torchvision": str(torchvision.__version__),
        "PIL": str(PIL.__version__),
        "python": platform.python_version(),
    }


# ----------------------------------------------------------------------------------- writing and reading


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> None:
    """Write `state` to `path` atomically: a reader sees the previous file or the complete new one."""
    with atomic_open(path, "wb") as handle:
        torch.save(state, handle)


def _why_refused(exc: Exception) -> str:
    text = str(exc)
    found = _GLOBAL_RE.search(text)
    if found or "Unsupported global" in text:
        name = found.group(1) if found else "a Python object"
        return (
            f"it asks to import {name}, which a checkpoint of tensors never does (a pickle that "
            f"imports code can run it). Refused: cocoshard loads only with weights_only=True"
        )
    return "it is not a PyTorch checkpoint or it is corrupted (not a valid zip/pickle)"


def safe_load(path: str | os.PathLike, what: str = "checkpoint", map_location: Any = "cpu") -> Any:
    """`torch.load(path, weights_only=True)`; any failure becomes a UserError naming the file and why."""
    file = Path(path)
    if not file.is_file():
        raise BadCheckpoint(f"{what} {file} does not exist")
    try:
        with warnings.catch_warnings():
            # garbage read as a pickle warns about its "protocol" before failing: the error says enough
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(file, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise BadCheckpoint(f"cannot load {what} {file}: {_why_refused(exc)}") from exc
    except Exception as exc:  # random bytes break the unpickler in any way (IndexError, KeyError, ...)
        detail = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise BadCheckpoint(
            f"cannot load {what} {file}: it is not a PyTorch checkpoint or it is truncated or "
            f"corrupted ({type(exc).__name__}: {detail})"
        ) from exc


def _field_problem(state: dict[str, Any]) -> str | None:
    """The first field a reader would trip on, or None when everything used is usable."""
    checks: list[tuple[str, Any]] = [
        (
            "model",
            lambda v: isinstance(v, dict) and v and all(isinstance(t, torch.Tensor) for t in v.values()),
        ),
        (
            "ema",
            lambda v: (
                v is None or (isinstance(v, dict) and all(isinstance(t, torch.Tensor) for t in v.values()))
            ),
        ),
        ("epoch", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0),
        ("step", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0),
        (
            "classes",
            lambda v: isinstance(v, list) and len(v) == NUM_CLASSES and all(isinstance(n, str) for n in v),
        ),
        (
            "thresholds",
            lambda v: (
                isinstance(v, list)
                and len(v) == NUM_CLASSES
                and all(
                    isinstance(t, (int, float))
                    and not isinstance(t, bool)
                    and math.isfinite(t)
                    and 0.0 <= t <= 1.0
                    for t in v
                )
            ),
        ),
        ("config", lambda v: isinstance(v, dict)),
    ]
    for name, valid in checks:
        if name in state and not valid(state[name]):
            return name
    return None


def check_checkpoint(
    state: Any, path: str | os.PathLike, required: Iterable[str] = REQUIRED_KEYS
) -> dict[str, Any]:
    """`state` if it holds everything a cocoshard reader uses, each of the right type and range."""
    if not isinstance(state, dict):
        raise BadCheckpoint(
            f"checkpoint {path} holds a {type(state).__name__}, not a cocoshard checkpoint dict"
        )
    missing = [key for key in required if key not in state]
    if missing:
        raise BadCheckpoint(
            f"checkpoint {path} lacks {', '.join(missing)}: it was not written by cocoshard train"
        )
    problem = _field_problem(state)
    if problem == "thresholds":
        raise BadCheckpoint(
            f"checkpoint {path}: its field 'thresholds' must be {NUM_CLASSES} finite numbers in "
            f"[0, 1]; it holds {str(state['thresholds'])[:80]}"
        )
    if problem:
        raise BadCheckpoint(
            f"checkpoint {path}: its field {problem!r} is not what cocoshard train writes "
            f"({type(state[problem]).__name__})"
        )
    try:
        from_dict(TrainConfig, state["config"], source=f"checkpoint {path}: config")
    except ConfigError as exc:
        raise BadCheckpoint(f"checkpoint {path}: its config cannot be used: {exc}") from None
    if not isinstance(state["config"].get("model"), str):
        raise BadCheckpoint(f"checkpoint {path}: its config does not name the model")
    return state


def load_checkpoint(
    path: str | os.PathLike, map_location: Any = "cpu", required: Iterable[str] = REQUIRED_KEYS
) -> dict[str, Any]:
    """A checkpoint written by `cocoshard train`, loaded safely and checked (`check_checkpoint`)."""
    return check_checkpoint(safe_load(path, "checkpoint", map_location), path, required)


def checkpoint_config(state: dict[str, Any], path: str | os.PathLike) -> TrainConfig:
    """The TrainConfig a checked checkpoint was trained with."""
    return from_dict(TrainConfig, state["config"], source=f"checkpoint {path}: config")


# ----------------------------------------------------------------------------------- what a checkpoint holds


def checkpoint_state(
    tr: Trainer, epoch: int, thresholds: Sequence[float], figures: dict[str, float], keep_ema: bool
) -> dict[str, Any]:
    """What last.pt/best.pt hold; tensors, numbers, strings and containers only (weights_only=True).

    `keep_ema=False` (best.pt when the raw weights scored better) stores no EMA, so that a reader
    that prefers the EMA uses the weights the thresholds were tuned for."""
    return {
        "model": unwrap(tr.model).state_dict(),
        "ema": tr.ema.state_dict() if tr.ema is not None and keep_ema else None,
        "ema_updates": tr.ema.updates if tr.ema is not None else 0,
        "optimizer": tr.optimizer.state_dict(),
        "scheduler": tr.scheduler.state_dict(),
        "scaler": tr.scaler.state_dict(),
        "epoch": epoch,
        "step": tr.step,
        "rng": rng_state(),
        "config": to_dict(tr.cfg),
        "shards": tr.shards_identity,
        "class_counts": list(tr.class_counts),
        "classes": list(tr.classes),
        "thresholds": [float(t) for t in thresholds],
        "metrics": dict(figures),
        "best": {"epoch": tr.best_epoch, "server_f1_tuned": tr.best_score},
        "versions": versions(),
    }


# ----------------------------------------------------------------------------------- resuming


def resume_path(cfg: TrainConfig) -> Path:
    """The last.pt a `--resume` means: OUT/last.pt, or the file given (`--resume PATH/last.pt`)."""
    if cfg.resume == RESUME_LAST:
        return Path(cfg.out) / LAST
    path = Path(cfg.resume)
    return path / LAST if path.is_dir() else path


def resume_settings(cfg: TrainConfig, state: dict[str, Any], path: Path) -> TrainConfig:
    """The run's own settings (from its checkpoint), with only what a resumed run may change taken
    from `cfg`; a given setting that would change what is trained is refused by name."""
    if "out" in cfg.given and cfg.resume != RESUME_LAST and Path(cfg.out).resolve() != path.parent.resolve():
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


def restore(tr: Trainer, state: dict[str, Any], path: Path) -> None:
    """Continue from a checked checkpoint: weights, EMA, optimiser, schedule, scaler, counters, RNG."""
    if tr.runtime.is_main:
        remove_stale_temporaries(path.parent)  # left by a writer killed mid-save
    tr.model.load_state_dict(state["model"])
    if tr.ema is not None:
        tr.ema.load_state_dict(state["ema"] or state["model"], int(state.get("ema_updates", 0)))
    tr.optimizer.load_state_dict(state["optimizer"])
    tr.scheduler.load_state_dict(state["scheduler"])
    if state.get("scaler"):
        tr.scaler.load_state_dict(state["scaler"])
    tr.epoch, tr.step = int(state["epoch"]), int(state["step"])
    best = state.get("best") or {}
    tr.best_score, tr.best_epoch = float(best.get("server_f1_tuned", -1.0)), int(best.get("epoch", 0))
    set_rng_state(state["rng"])
    tr.log.keep_epochs_up_to(tr.epoch)
    tr.log.note(f"resumed from {path}: {tr.epoch} epoch(s), {tr.step} steps done")
