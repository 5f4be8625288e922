"""The GPU tier of training: a steady-state step that never waits for the host, bf16 autocast with
channels_last and torch.compile, and DDP over NCCL (world size 1), each on the real photos.

Runs with `pytest -m cuda` on a machine with CUDA; elsewhere each test is skipped with the reason.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cocoshard import config
from cocoshard.settings import resolve
from cocoshard.training.runlog import RunLog
from cocoshard.training.runtime import setup
from cocoshard.training.train import OnlineMetrics, train_step
from cocoshard.training.trainer import Trainer, build_trainer, enter_phase
from conftest import records

pytestmark = pytest.mark.cuda


def _trainer(shards: Path, out: Path, **settings: object) -> Trainer:
    cfg = resolve(
        config.TrainConfig,
        {
            "shards": str(shards),
            "out": str(out),
            "model": "resnet18",
            "weights": "none",
            "device": "cuda",
            "size": 64,
            "batch_size": 16,
            "amp": True,
            **settings,
        },
    )
    trainer = build_trainer(cfg, setup("cuda", amp=True), RunLog(out, enabled=False))
    enter_phase(trainer, 0)
    return trainer


@pytest.mark.parametrize("loader", ["stream", "resident"])
def test_a_steady_state_step_never_waits_for_the_host(
    sample_shards_jpeg: Path, tmp_path: Path, loader
) -> None:
    tr = _trainer(sample_shards_jpeg, tmp_path / "run", loader=loader, workers=2 if loader == "stream" else 0)
    meter = OnlineMetrics(tr.runtime.device)
    batches = iter(tr.train_loader)
    train_step(tr, next(batches), meter)  # warm-up: cuDNN's choice, constants, the EMA's buffers
    steady = [next(batches) for _ in range(3)]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any host synchronisation raises
    try:
        for batch in steady:
            train_step(tr, batch, meter)
    finally:
        torch.cuda.set_sync_debug_mode("default")
        tr.train_loader.close()
        tr.val_loader.close()
    assert tr.step == 4 and torch.isfinite(meter.loss_sum)


def test_bf16_autocast_channels_last_and_compile_train(sample_shards_jpeg: Path, tmp_path: Path) -> None:
    tr = _trainer(sample_shards_jpeg, tmp_path / "run", compile=True, channels_last=True, workers=2)
    assert tr.runtime.amp_dtype == torch.bfloat16 and tr.input_dtype == torch.bfloat16
    meter = OnlineMetrics(tr.runtime.device)
    before = [p.detach().clone() for p in tr.model.parameters()]
    batches = iter(tr.train_loader)
    for _ in range(3):
        batch = next(batches)
        assert batch.inputs.dtype == torch.bfloat16
        assert batch.inputs.is_contiguous(memory_format=torch.channels_last)
        train_step(tr, batch, meter)
    tr.train_loader.close()
    tr.val_loader.close()
    assert torch.isfinite(meter.loss_sum)
    assert any(not torch.equal(a, b) for a, b in zip(before, tr.model.parameters(), strict=True))


@pytest.mark.slow
def test_ddp_with_nccl_at_world_size_one(sample_shards_jpeg: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
        "-m", "cocoshard", "train", "--shards", str(sample_shards_jpeg), "--out", str(run),
        "--model", "resnet18", "--weights", "none", "--device", "cuda", "--size", "64",
        "--batch-size", "16", "--epochs", "1", "--max-steps", "3",
    ]  # fmt: skip
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=600, env={**os.environ, "COLUMNS": "200"}
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (record,) = records(run)
    assert record["step"] == 3 and record["steps_per_rank"] == [3]
