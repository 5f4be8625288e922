"""The ceiling the loader must stay above: training steps/s of a model fed from a device tensor.

    $ pytest bench/ --benchmark --bench-model resnet50

A torchvision model (80-way head, random weights) takes SGD steps on a synthetic batch that
already sits on the device: fp32 NCHW against AMP (bf16, or fp16 + GradScaler without bf16
support) with channels_last. On a CPU a small batch and few steps keep the whole run short.
"""

from __future__ import annotations

import time

import torch
import torchvision
from pipelines import training_dtype

from conftest import BenchReport, bench_device

CPU_BATCH, CPU_STEPS, GPU_STEPS, WARMUP_STEPS = 16, 6, 30, 3


def steps_per_second(
    model_name: str, batch: int, size: int, steps: int, device: torch.device, amp: bool
) -> float:
    torch.manual_seed(0)
    model = torchvision.models.get_model(model_name, weights=None, num_classes=80).to(device)
    images = torch.randn(batch, 3, size, size, device=device)
    targets = (torch.rand(batch, 80, device=device) < 0.04).float()
    if amp:
        model = model.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    dtype = training_dtype(device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp and dtype == torch.float16)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    loss_fn = torch.nn.BCEWithLogitsLoss()

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=amp):
            loss = loss_fn(model(images).float(), targets)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    for _ in range(WARMUP_STEPS):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return steps / (time.perf_counter() - start)


def test_training_step_ceiling(report: BenchReport, request) -> None:
    opts = request.config.option
    device = bench_device()
    on_gpu = device.type == "cuda"
    batch = opts.bench_batch_size if on_gpu else CPU_BATCH
    steps = GPU_STEPS if on_gpu else CPU_STEPS
    report.train_step.update(model=opts.bench_model, batch_size=batch, size=opts.bench_size, steps=steps)
    for name, amp in (
        ("fp32 NCHW", False),
        (f"AMP {str(training_dtype(device)).split('.')[-1]} channels_last", True),
    ):
        rate = steps_per_second(opts.bench_model, batch, opts.bench_size, steps, device, amp) * batch
        report.train_step[name] = {"images_per_s": round(rate, 1)}
        assert rate > 0
