"""Device and AMP resolution, RNG state capture, and the padded gather over uneven ranks (gloo)."""

from __future__ import annotations

import io
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from cocoshard.errors import ConfigError
from cocoshard.training import runtime as runtime_module
from cocoshard.training.runtime import (
    Runtime,
    gather_objects,
    gather_rows,
    resolve_amp_dtype,
    resolve_device,
    rng_state,
    set_rng_state,
    setup,
)

CPU = torch.device("cpu")


def test_device_resolution() -> None:
    assert resolve_device("cpu") == CPU
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="--device cpu"):
            resolve_device("cuda")


@pytest.mark.parametrize("native", [True, False])
def test_amp_dtype_on_cpu_is_bf16_where_native_and_fp16_is_refused(monkeypatch, native) -> None:
    """Emulated bf16 made a CPU step ~10x slower than float32: auto uses it only where it is native."""
    monkeypatch.setattr(runtime_module, "cpu_bf16_is_native", lambda: native)
    assert resolve_amp_dtype(False, "auto", CPU) is None
    assert resolve_amp_dtype(True, "auto", CPU) is (torch.bfloat16 if native else None)
    assert resolve_amp_dtype(True, "bf16", CPU) is torch.bfloat16
    with pytest.raises(ConfigError, match="--amp-dtype bf16"):
        resolve_amp_dtype(True, "fp16", CPU)


def test_autocast_and_scaler_follow_the_dtype() -> None:
    conv = torch.nn.Conv2d(3, 4, 3)
    x = torch.randn(1, 3, 8, 8)
    with Runtime(CPU, amp_dtype=torch.bfloat16).autocast():
        assert conv(x).dtype == torch.bfloat16
    with Runtime(CPU).autocast():
        assert conv(x).dtype == torch.float32
    assert not Runtime(CPU, amp_dtype=torch.bfloat16).grad_scaler().is_enabled()


def test_setup_without_torchrun_is_a_single_process(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    runtime = setup("cpu", amp=True, amp_dtype="bf16")
    assert (runtime.rank, runtime.world_size, runtime.is_main, runtime.distributed) == (0, 1, True, False)
    assert runtime.amp_dtype is torch.bfloat16


def test_rng_state_restores_every_generator_and_survives_a_safe_load() -> None:
    state = rng_state()
    first = (torch.rand(3), np.random.rand(3), random.random())
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    set_rng_state(torch.load(buffer, weights_only=True))
    second = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(first[0], second[0]) and np.array_equal(first[1], second[1]) and first[2] == second[2]


def _gather_worker(rank: int, world: int, init_file: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        rows = torch.full((3 + 2 * rank, 2), float(rank))  # uneven shares: 3 rows and 5 rows
        gathered = gather_rows(rows)
        objects = gather_objects([f"key{rank}"])
        if rank == 0:
            torch.save({"rows": gathered, "objects": objects}, out)
    finally:
        dist.destroy_process_group()


def test_gather_rows_over_uneven_ranks(tmp_path: Path) -> None:
    out = tmp_path / "gathered.pt"
    mp.spawn(_gather_worker, args=(2, str(tmp_path / "init"), str(out)), nprocs=2, join=True)
    result = torch.load(out, weights_only=True)
    assert result["rows"].shape == (8, 2)
    assert result["rows"][:3].eq(0).all() and result["rows"][3:].eq(1).all()
    assert result["objects"] == [["key0"], ["key1"]]


def test_gather_in_one_process_is_the_identity() -> None:
    rows = torch.arange(6).reshape(3, 2)
    assert gather_rows(rows) is rows and gather_objects(1) == [1]
