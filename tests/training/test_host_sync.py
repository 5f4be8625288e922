"""No host synchronisation in a training step: the known patterns, caught on a CPU.

On CUDA, `tools/device-check` runs the step under `torch.cuda.set_sync_debug_mode("error")`. On a
CPU nothing waits, so these tests count the calls that would make the host wait for a GPU when
cocoshard's own code makes them inside the step: reading a tensor's value (`.item()`, `.tolist()`,
`.cpu()`, `.numpy()`, `bool()`/`int()`/`float()` of a tensor, `nonzero`) and building a tensor from
Python values (`torch.tensor`, `torch.as_tensor`: a blocking host-to-device copy on a GPU). PyTorch's
own code is left to the device check (its AdamW reads its CPU step counters, which is no sync).
"""

from __future__ import annotations

import contextlib
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import cocoshard
from cocoshard import config
from cocoshard.loading.augment import EvalTransform, TrainTransform
from cocoshard.loading.loader import build_loader
from cocoshard.loading.spec import LoaderSpec
from cocoshard.settings import resolve
from cocoshard.training.optim import lerp_all
from cocoshard.training.runlog import RunLog
from cocoshard.training.runtime import setup
from cocoshard.training.train import OnlineMetrics, train_step
from cocoshard.training.trainer import build_trainer, enter_phase

PACKAGE = str(Path(cocoshard.__file__).parent)
TENSOR_READS = ("item", "tolist", "cpu", "numpy", "nonzero", "__bool__", "__int__", "__float__")
TENSOR_MAKERS = ("tensor", "as_tensor", "nonzero")


@contextlib.contextmanager
def host_syncs() -> Iterator[Counter]:
    """Count, by 'file:line name', the calls above that cocoshard's own code makes."""
    found: Counter = Counter()
    patches = [(torch.Tensor, name, getattr(torch.Tensor, name)) for name in TENSOR_READS]
    patches += [(torch, name, getattr(torch, name)) for name in TENSOR_MAKERS]

    def counting(name, original):
        def wrapper(*args, **kwargs):
            caller = sys._getframe(1)
            if caller.f_code.co_filename.startswith(PACKAGE):
                found[f"{Path(caller.f_code.co_filename).name}:{caller.f_lineno} {name}"] += 1
            return original(*args, **kwargs)

        return wrapper

    for owner, name, original in patches:
        setattr(owner, name, counting(name, original))
    try:
        yield found
    finally:
        for owner, name, original in patches:
            setattr(owner, name, original)


def _trainer(shards: Path, out: Path, **settings):
    cfg = resolve(
        config.TrainConfig,
        {
            "shards": str(shards),
            "out": str(out),
            "model": "cocoshard_tiny",
            "weights": "none",
            "device": "cpu",
            "size": 64,
            "batch_size": 8,
            "workers": 0,
            "amp": True,
            "ema": True,
            **settings,
        },
    )
    tr = build_trainer(cfg, setup("cpu", amp=True), RunLog(out, enabled=False))
    enter_phase(tr, 0)
    return tr


def test_the_counter_catches_what_it_is_for(sample_shards_jpeg, tmp_path):
    tr = _trainer(sample_shards_jpeg, tmp_path / "run")
    meter = OnlineMetrics(torch.device("cpu"))
    batch = next(iter(tr.train_loader))
    train_step(tr, batch, meter)
    with host_syncs() as found:
        meter.mean_loss()  # reads the loss: a sync, on purpose, at the logging cadence only
        cocoshard.loading.resample._constants.clear()
        TrainTransform(out_size=32, method="grid").apply(
            batch.images if batch.images is not None else torch.zeros((2, 64, 64, 3), dtype=torch.uint8),
            torch.full((2, 2), 64),
            generator=torch.Generator(),
        )
    tr.train_loader.close()
    assert any(key.endswith(" item") and key.startswith("train.py") for key in found), found
    assert any(key.startswith("resample.py") and key.endswith(" tensor") for key in found), found


@pytest.mark.parametrize("ema", [True, False])
def test_steady_state_training_steps_never_wait_for_the_device(sample_shards_jpeg, tmp_path, ema):
    tr = _trainer(sample_shards_jpeg, tmp_path / "run", ema=ema)
    meter = OnlineMetrics(torch.device("cpu"))
    batches = iter(tr.train_loader)
    first = next(batches)
    train_step(tr, first, meter)  # warm-up: constants are made once per device
    steady = [next(batches) for _ in range(3)]
    with host_syncs() as found:
        for batch in steady:
            train_step(tr, batch, meter)
    tr.train_loader.close()
    assert tr.step == 4
    assert not found, f"host syncs in a training step: {dict(found)}"


@pytest.mark.parametrize(
    "transform",
    [
        TrainTransform(out_size=48, dtype=torch.bfloat16, method="grid"),
        EvalTransform(out_size=48, dtype=torch.bfloat16, method="grid"),
    ],
)
def test_the_device_transform_never_waits_for_the_device(sample_shards_jpeg, transform):
    """The "grid" resampler is what runs on CUDA: crops, flips and constants stay on the device."""
    loader = build_loader(sample_shards_jpeg, "train", LoaderSpec(batch_size=8, device="cpu", train=True))
    batches = iter(loader)
    first = next(batches)
    generator = torch.Generator().manual_seed(0)
    transform.apply(first.images, first.sizes, generator=generator)  # warm-up
    steady = [next(batches) for _ in range(2)]
    with host_syncs() as found:
        for batch in steady:
            out = transform.apply(batch.images, batch.sizes, generator=generator)
    loader.close()
    assert out.shape == (8, 3, 48, 48)
    assert not found, f"host syncs in the device transform: {dict(found)}"


def test_lerp_all_without_the_private_foreach_op_gives_the_same_average(monkeypatch):
    starts = [torch.zeros(3), torch.ones(2, 2)]
    ends = [torch.full((3,), 4.0), torch.full((2, 2), 3.0)]
    fused = [t.clone() for t in starts]
    lerp_all(fused, ends, 0.25)
    monkeypatch.delattr(torch, "_foreach_lerp_")
    looped = [t.clone() for t in starts]
    lerp_all(looped, ends, 0.25)
    for a, b in zip(fused, looped):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(looped[0], torch.full((3,), 1.0))
