"""Parameter groups, the schedules (incl. the delayed backbone warm-up) and the weight EMA."""

from __future__ import annotations

import io

import pytest
import torch

from cocoshard.training.model import build_model
from cocoshard.training.optim import (
    ModelEma,
    build_optimizer,
    build_scheduler,
    param_groups,
    warmup_cosine_factor,
)


def test_groups_split_head_from_backbone_and_spare_norms_and_biases_from_decay() -> None:
    model = build_model("resnet18")
    groups = {g["name"]: g for g in param_groups(model, lr=1e-3, backbone_lr_mult=0.1, weight_decay=0.05)}
    assert set(groups) == {"head", "head_no_decay", "backbone", "backbone_no_decay"}
    assert groups["head"]["lr"] == 1e-3 and groups["backbone"]["lr"] == pytest.approx(1e-4)
    assert groups["backbone"]["weight_decay"] == 0.05 and groups["backbone_no_decay"]["weight_decay"] == 0.0
    assert all(p.ndim == 1 for p in groups["backbone_no_decay"]["params"])  # BN weights/biases
    assert groups["head"]["params"] == [model.fc.weight] and groups["head_no_decay"]["params"] == [
        model.fc.bias
    ]
    assert sum(len(g["params"]) for g in groups.values()) == len(list(model.parameters()))


def test_cosine_factor_shape() -> None:
    factors = [warmup_cosine_factor(s, start=0, warmup=10, total=110, min_ratio=0.01) for s in range(111)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == 1.0
    assert all(a >= b for a, b in zip(factors[9:], factors[10:]))
    assert factors[-1] == pytest.approx(0.01)
    assert warmup_cosine_factor(5, start=20, warmup=10, total=110, min_ratio=0.01) == 0.0


def test_backbone_waits_for_the_end_of_the_freeze() -> None:
    model = build_model("cocoshard_tiny")
    optimizer = build_optimizer(model, 1e-3, 0.1, 0.05)
    scheduler = build_scheduler(optimizer, "cosine", total_steps=100, warmup_steps=10, freeze_steps=20)
    seen = []
    for _ in range(40):
        seen.append({g["name"]: g["lr"] for g in optimizer.param_groups})
        optimizer.step()
        scheduler.step()
    assert seen[0]["head"] == pytest.approx(1e-4) and seen[0]["backbone"] == 0.0
    assert seen[19]["backbone"] == 0.0 and seen[20]["backbone"] == pytest.approx(1e-5)
    assert seen[29]["backbone"] == pytest.approx(1e-4, rel=0.05)


@pytest.mark.parametrize("schedule", ["cosine", "onecycle"])
def test_scheduler_state_is_weights_only_loadable_and_resumes(schedule: str) -> None:
    def fresh():
        model = build_model("cocoshard_tiny")
        optimizer = build_optimizer(model, 1e-3, 0.1, 0.05)
        return optimizer, build_scheduler(optimizer, schedule, total_steps=50, warmup_steps=5, freeze_steps=5)

    optimizer, scheduler = fresh()
    for _ in range(12):
        optimizer.step()
        scheduler.step()
    buffer = io.BytesIO()
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    optimizer2, scheduler2 = fresh()
    optimizer2.load_state_dict(saved["optimizer"])
    scheduler2.load_state_dict(saved["scheduler"])
    optimizer.step()
    scheduler.step()
    optimizer2.step()
    scheduler2.step()  # noqa: E702
    assert [g["lr"] for g in optimizer.param_groups] == [g["lr"] for g in optimizer2.param_groups]


def test_ema_ramps_and_tracks_the_model() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    ema = ModelEma(model, decay=0.99)
    assert ema.current_decay() == pytest.approx(0.1)  # (1 + 0) / (10 + 0)
    start = ema.module[0].weight.clone()
    with torch.no_grad():
        model[0].weight.add_(1.0)
    model(torch.randn(4, 2))  # moves the BN statistics and its integer counter
    ema.update()
    assert torch.allclose(ema.module[0].weight, start + 0.9)
    assert ema.module[1].num_batches_tracked.item() == 1
    assert not any(p.requires_grad for p in ema.module.parameters())
    for _ in range(1000):
        ema.update()
    assert ema.current_decay() == 0.99
    assert torch.allclose(ema.module[0].weight, model[0].weight, atol=1e-4)
    other = ModelEma(model, decay=0.99)
    other.load_state_dict(ema.state_dict(), ema.updates)
    assert other.updates == ema.updates and torch.equal(other.module[0].weight, ema.module[0].weight)
