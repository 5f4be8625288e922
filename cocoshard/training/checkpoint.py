"""Checkpoints: what they hold, written atomically, read safely and checked.

A checkpoint is a dict of tensors, numbers, strings, lists and dicts only, so that the safe
unpickler loads all of it. `last.pt` holds what resuming needs, `best.pt` what predict needs:

    model                     last.pt: the raw weights; best.pt: the weights its epoch selected
    ema                       last.pt: the EMA's weights (None without --ema); not in best.pt
    weights                   which weights the epoch selected ("ema" or "model"): predict uses those
    optimizer, scaler,        last.pt only: the optimiser, schedule and AMP scaler state, the
    scheduler, rng,           generators, EMA updates and the best epoch so far
    ema_updates, best
    epoch, step               epochs completed, optimizer steps taken
    config                    the run's TrainConfig as a plain dict, automatic settings resolved
    shards, shards_split,     the identity of the train and val shards it was trained on, how their
    class_counts              split was drawn (pack's seed, val share), train images per class
    classes, thresholds       80 names, 80 thresholds tuned for the selected weights
    metrics, versions         the epoch's validation figures, the libraries' versions
    world_size                last.pt: the processes that trained it (a resume needs as many)
    partial                   last.pt: None at an epoch's end; inside an epoch (`--checkpoint-every`)
                              the position in it and each rank's partial figures and generators
                              (`cocoshard.training.midepoch`)

The trainer says what its state is (`Trainer.state_dict`); `checkpoint_state` adds the epoch's
figures (last.pt) and `prediction_state` keeps of that only what predict needs (best.pt: the
selected weights, a third of last.pt's size with AdamW). Checkpoints written before `weights`
existed carry both weight sets in both files; predict reads them as before (the EMA when present).
A file that asks the unpickler for anything else (a class, a function: the way a malicious
pickle runs code) is refused with a `UserError`; there is no fallback to `weights_only=False`.
Whatever a reader uses is checked before it is used (`check_checkpoint`): a NaN threshold or a
size of 0 is refused naming the file and the field, never turned into a wrong submission. A
writer killed mid-save leaves only a `.tmp-` file beside the last complete checkpoint. A
checkpoint saved inside an epoch holds weights half-way through it and the thresholds of the
epoch before: only `--resume` reads it (`load_checkpoint(..., mid_epoch=True)`); every other
reader refuses it by name (`MidEpochCheckpoint`).

Resuming from a checkpoint: `cocoshard.training.resume`.
"""

from __future__ import annotations

import math
import os
import pickle
import platform
import re
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from cocoshard import NUM_CLASSES
from cocoshard.atomic import atomic_open
from cocoshard.config import TrainConfig
from cocoshard.errors import ConfigError, UserError
from cocoshard.settings import from_dict

LAST = "last.pt"
BEST = "best.pt"
RAW, EMA = "model", "ema"
REQUIRED_KEYS = ("model", "epoch", "step", "config", "classes", "thresholds")
RESUME_KEYS = ("optimizer", "scheduler", "rng")  # what last.pt holds beyond what predict needs
# what best.pt keeps of an epoch's state: predict's needs, and what says where they came from
PREDICTION_KEYS = (
    *REQUIRED_KEYS,
    "weights",
    "shards",
    "shards_split",
    "class_counts",
    "metrics",
    "versions",
)
_GLOBAL_RE = re.compile(r"GLOBAL\s+([\w.]+)")


class BadCheckpoint(UserError):
    """A checkpoint that cannot be used: the message names the file and what is wrong."""


class MidEpochCheckpoint(UserError):
    """A last.pt saved inside an epoch, given to a reader that needs an epoch's end (predict)."""


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
        ("weights", lambda v: v in (RAW, EMA)),
        ("world_size", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1),
        ("partial", lambda v: v is None or _is_partial(v)),
    ]
    for name, valid in checks:
        if name in state and not valid(state[name]):
            return name
    return None


def _is_partial(value: Any) -> bool:
    """The shape `midepoch.partial_state` writes: where in which epoch, and one entry per rank."""
    return (
        isinstance(value, dict)
        and all(isinstance(value.get(k), int) and value[k] >= 0 for k in ("epoch", "batch", "steps"))
        and 0 < value["batch"] < value["steps"]
        and isinstance(value.get("ranks"), list)
        and all(isinstance(r, dict) and {"meter", "rng"} <= r.keys() for r in value["ranks"])
    )


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
    path: str | os.PathLike,
    map_location: Any = "cpu",
    required: Iterable[str] = REQUIRED_KEYS,
    mid_epoch: bool = False,
) -> dict[str, Any]:
    """A checkpoint written by `cocoshard train`, loaded safely and checked (`check_checkpoint`).

    One saved inside an epoch is refused unless `mid_epoch` (resuming is its only use)."""
    state = check_checkpoint(safe_load(path, "checkpoint", map_location), path, required)
    partial = state.get("partial")
    if partial and not mid_epoch:
        file = Path(path)
        raise MidEpochCheckpoint(
            f"checkpoint {file} was saved inside epoch {partial['epoch'] + 1} (after {partial['batch']} of "
            f"its {partial['steps']} steps): its weights are half-way through an epoch and its thresholds "
            f"were tuned for others. Use {file.parent / BEST}, or finish the run first: cocoshard train "
            f"--out {file.parent} --resume"
        )
    return state


def checkpoint_config(state: dict[str, Any], path: str | os.PathLike) -> TrainConfig:
    """The TrainConfig a checked checkpoint was trained with."""
    return from_dict(TrainConfig, state["config"], source=f"checkpoint {path}: config")


def checkpoint_state(
    training: dict[str, Any],
    *,
    epoch: int,
    thresholds: Sequence[float],
    figures: dict[str, float],
    weights: str,
    partial: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """What last.pt holds: the trainer's state (`Trainer.state_dict`) with the epoch it completed,
    which weights that epoch selected (`weights`: EMA or RAW), the thresholds tuned for them, their
    validation figures and the versions; `partial`: where inside the next epoch it was saved (None
    at an epoch's end)."""
    if weights not in (RAW, EMA):
        raise ValueError(f"weights must be {RAW!r} or {EMA!r}, not {weights!r}")
    return {
        **training,
        "epoch": epoch,
        "weights": weights,
        "thresholds": [float(t) for t in thresholds],
        "metrics": dict(figures),
        "versions": versions(),
        "partial": partial,
    }


def prediction_state(state: dict[str, Any]) -> dict[str, Any]:
    """What best.pt holds of a `checkpoint_state`: the weights the epoch selected (as `model`) and
    what predict needs with them; no optimiser, schedule, generators or the other weights."""
    kept = {key: state[key] for key in PREDICTION_KEYS if key in state}
    kept["model"] = state[state["weights"]]
    return kept


def predicted_weights(state: dict[str, Any]) -> tuple[str, str]:
    """(the field holding the weights predict uses, which weights they are: EMA or RAW) of a checked
    checkpoint: the set its epoch selected (under `model` in a best.pt, which holds no other); in a
    checkpoint from before `weights` existed, the EMA whenever it has one."""
    has_ema = isinstance(state.get("ema"), dict) and bool(state["ema"])
    selected = state.get("weights")
    if selected is None:
        return (EMA, EMA) if has_ema else (RAW, RAW)
    if "ema" not in state:
        return RAW, selected
    return (EMA, EMA) if selected == EMA and has_ema else (RAW, RAW)
