"""Checkpoints: written atomically, read with `torch.load(weights_only=True)` and nothing else.

A checkpoint (`last.pt`, `best.pt`) is a dict of tensors, numbers, strings, lists and dicts only:

    model, ema, optimizer, scaler, scheduler   state dicts (ema/scaler may be None)
    epoch, step                                epochs completed, optimizer steps taken
    rng                                        generator states as tensors and lists (`runtime.rng_state`)
    config                                     the TrainConfig as a plain dict
    classes, thresholds                        80 names, 80 tuned thresholds
    metrics, versions                          the epoch's validation metrics, library versions

so that the safe unpickler loads all of it. A file that asks the unpickler for anything else (a
class, a function: the way a malicious pickle runs code) is refused with a `UserError`; there is no
fallback to `weights_only=False`. A writer killed mid-save leaves only a `.tmp-` file beside the
last complete checkpoint, which stays loadable.
"""

from __future__ import annotations

import os
import pickle
import platform
import re
import warnings
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import torch

from cocoshard.atomic import atomic_open, remove_stale_temporaries
from cocoshard.config import to_dict
from cocoshard.errors import UserError
from cocoshard.training.runtime import rng_state, set_rng_state, unwrap

if TYPE_CHECKING:  # for annotations only: state.py builds a Trainer and calls restore() here
    from cocoshard.training.state import Trainer

LAST = "last.pt"
BEST = "best.pt"
REQUIRED_KEYS = ("model", "epoch", "step", "config", "classes", "thresholds")
_GLOBAL_RE = re.compile(r"GLOBAL\s+([\w.]+)")


def versions() -> dict[str, str]:
    """Versions of the libraries that wrote a checkpoint (for the record, not checked on load)."""
    import torchvision

    from cocoshard import __version__

    # str(): torch.__version__ is a TorchVersion, a class the safe unpickler refuses.
    return {"cocoshard": __version__, "torch": str(torch.__version__), "torchvision": str(torchvision.__version__),
            "python": platform.python_version()}


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> None:
    """Write `state` to `path` atomically: a reader sees the previous file or the complete new one."""
    with atomic_open(path, "wb") as handle:
        torch.save(state, handle)


def _why_refused(exc: Exception) -> str:
    text = str(exc)
    found = _GLOBAL_RE.search(text)
    if found or "Unsupported global" in text:
        name = found.group(1) if found else "a Python object"
        return (f"it asks to import {name}, which a checkpoint of tensors never does (a pickle that "
                f"imports code can run it). Refused: cocoshard loads only with weights_only=True")
    return "it is not a PyTorch checkpoint or it is corrupted (not a valid zip/pickle)"


def safe_load(path: str | os.PathLike, what: str = "checkpoint", map_location: Any = "cpu") -> Any:
    """`torch.load(path, weights_only=True)`; any failure becomes a UserError naming the file and why."""
    file = Path(path)
    if not file.is_file():
        raise UserError(f"{what} {file} does not exist")
    try:
        with warnings.catch_warnings():
            # garbage read as a pickle warns about its "protocol" before failing: the error says enough
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(file, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise UserError(f"cannot load {what} {file}: {_why_refused(exc)}") from exc
    except (RuntimeError, EOFError, ValueError, zipfile.BadZipFile, OSError) as exc:
        detail = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(f"cannot load {what} {file}: it is truncated or corrupted ({detail})") from exc


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu",
                    required: Iterable[str] = REQUIRED_KEYS) -> dict[str, Any]:
    """A checkpoint written by `cocoshard train`, checked to hold the keys a reader relies on."""
    state = safe_load(path, "checkpoint", map_location)
    if not isinstance(state, dict):
        raise UserError(f"checkpoint {path} holds a {type(state).__name__}, not a cocoshard checkpoint dict")
    missing = [key for key in required if key not in state]
    if missing:
        raise UserError(f"checkpoint {path} lacks {', '.join(missing)}: it was not written by cocoshard train")
    return state



RAW, EMA = "model", "ema"


# Settings that may change between a run and its --resume without changing what is being trained.
RESUMABLE_CHANGES = {"resume", "epochs", "max_steps", "log_every", "workers", "device", "out", "shards",
                     "skip_bad_samples", "compile"}


def checkpoint_state(tr: Trainer, epoch: int, thresholds: Sequence[float], figures: dict[str, float],
                     keep_ema: bool) -> dict[str, Any]:
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
        "classes": list(tr.classes),
        "thresholds": [float(t) for t in thresholds],
        "metrics": dict(figures),
        "best": {"epoch": tr.best_epoch, "server_f1_tuned": tr.best_score},
        "versions": versions(),
    }


def restore(tr: Trainer, path: Path) -> None:
    """Continue from a checkpoint: weights, EMA, optimiser, schedule, scaler, counters, RNG."""
    if tr.runtime.is_main:
        remove_stale_temporaries(path.parent)  # left by a writer killed mid-save
    state = load_checkpoint(path)
    saved = state["config"] if isinstance(state["config"], dict) else {}
    if saved.get("model") != tr.cfg.model:
        raise UserError(f"{path} was trained as {saved.get('model')!r}, not {tr.cfg.model!r}: "
                        f"resume with --model {saved.get('model')} or start a new run in another --out")
    changed = sorted(k for k, v in to_dict(tr.cfg).items() if k not in RESUMABLE_CHANGES and saved.get(k, v) != v)
    if changed:
        tr.log.note(f"resuming with changed settings: {', '.join(f'{k} {saved.get(k)!r} → {getattr(tr.cfg, k)!r}' for k in changed)}")
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
