"""Checkpoints: everything in them loads with weights_only=True; bad files are refused by name."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from cocoshard import CLASSES
from cocoshard.atomic import TMP_PREFIX
from cocoshard.errors import UserError
from cocoshard.training.checkpoint import (
    load_checkpoint,
    safe_load,
    save_checkpoint,
    versions,
)
from cocoshard.training.model import build_model
from cocoshard.training.optim import ModelEma, build_optimizer, build_scheduler
from cocoshard.training.runtime import rng_state


def _full_state() -> dict:
    model = build_model("cocoshard_tiny")
    optimizer = build_optimizer(model, 1e-3, 0.1, 0.05)
    scheduler = build_scheduler(optimizer, "onecycle", total_steps=10, warmup_steps=2)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    optimizer.step()
    scheduler.step()
    return {
        "model": model.state_dict(),
        "ema": ModelEma(model, 0.9).state_dict(),
        "ema_updates": 0,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": torch.amp.GradScaler("cpu", enabled=False).state_dict(),
        "epoch": 1,
        "step": 1,
        "rng": rng_state(),
        "config": {"model": "cocoshard_tiny", "lr": 1e-3},
        "classes": list(CLASSES),
        "thresholds": [0.5] * len(CLASSES),
        "metrics": {"server_f1": 0.25},
        "versions": versions(),
    }


def test_round_trip_through_plain_weights_only_load(tmp_path: Path) -> None:
    state = _full_state()
    path = tmp_path / "last.pt"
    save_checkpoint(path, state)
    raw = torch.load(path, weights_only=True)  # the plain safe loader, without our wrapper
    assert set(raw) == set(state)
    loaded = load_checkpoint(path)
    assert torch.equal(loaded["model"]["fc.weight"], state["model"]["fc.weight"])
    assert loaded["optimizer"]["state"].keys() == state["optimizer"]["state"].keys()
    assert loaded["classes"] == list(CLASSES) and loaded["epoch"] == 1
    assert not list(tmp_path.glob(TMP_PREFIX + "*"))


def test_a_pickle_that_would_run_code_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.pt"
    torch.save({"model": Payload(), "epoch": 0}, path)
    with pytest.raises(UserError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert str(path) in message and "weights_only=True" in message and "system" in message
    assert not marker.exists()


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_damaged_files_are_named(tmp_path: Path, damage: str) -> None:
    path = tmp_path / "last.pt"
    save_checkpoint(path, _full_state())
    data = path.read_bytes()
    path.write_bytes(
        {"truncate": data[: len(data) // 2], "garbage": b"\x80not a checkpoint" * 50, "empty": b""}[damage]
    )
    with pytest.raises(UserError, match=str(path)):
        load_checkpoint(path)


def test_missing_file_and_foreign_dicts_are_refused(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        safe_load(tmp_path / "nope.pt")
    path = tmp_path / "weights.pt"
    torch.save({"fc.weight": torch.zeros(2)}, path)
    with pytest.raises(UserError, match="lacks model"):
        load_checkpoint(path)


def test_a_save_that_dies_midway_keeps_the_previous_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "last.pt"
    save_checkpoint(path, _full_state())
    before = path.read_bytes()

    def dies(obj: object, handle) -> None:
        handle.write(b"PK\x03\x04 half a zip")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", dies)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, {"epoch": 2})
    assert path.read_bytes() == before
    assert not list(tmp_path.glob(TMP_PREFIX + "*"))
    monkeypatch.undo()
    assert load_checkpoint(path)["epoch"] == 1
