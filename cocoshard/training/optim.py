"""The optimiser side of fine-tuning: parameter groups, the learning-rate schedule, the weight EMA.

- AdamW with four groups: {head, backbone} x {decayed, not decayed}. Norm weights, biases and other
  1-d parameters get no weight decay (decaying them only fights the normalisation).
- The head trains at `lr`; the backbone at `lr * backbone_lr_mult` (pretrained features need
  smaller steps). While the backbone is frozen (head-only warm-up) its groups sit at zero and its
  own linear warm-up starts when it is released.
- "cosine": linear warm-up, then cosine decay to `min_lr_ratio` of the peak. "onecycle": PyTorch's
  OneCycleLR (cosine up from peak/25, cosine down to peak/25e4, Adam beta1 cycled 0.95 ↔ 0.85).
- `ModelEma`: an exponential moving average of every floating-point weight and buffer, updated after
  each step with one fused `torch._foreach_lerp_` (a private PyTorch op, present since 1.13: where
  it is missing, a loop of `lerp_` does the same); its decay ramps up over the first steps so that a short
  run is not averaged with its random initialisation.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR, LRScheduler, OneCycleLR

from cocoshard.training.model import head_prefix, is_head_parameter

HEAD = "head"
BACKBONE = "backbone"


def param_groups(
    model: nn.Module, lr: float, backbone_lr_mult: float, weight_decay: float
) -> list[dict[str, Any]]:
    """AdamW groups named `head`/`backbone` (+ `_no_decay`), each with its own lr and decay."""
    prefix = head_prefix(model)
    groups: dict[str, dict[str, Any]] = {}
    for name, param in model.named_parameters():
        part = HEAD if is_head_parameter(name, prefix) else BACKBONE
        decay = param.ndim > 1
        key = part if decay else f"{part}_no_decay"
        if key not in groups:
            groups[key] = {
                "name": key,
                "part": part,
                "params": [],
                "lr": lr if part == HEAD else lr * backbone_lr_mult,
                "weight_decay": weight_decay if decay else 0.0,
            }
        groups[key]["params"].append(param)
    return [groups[k] for k in sorted(groups)]


def build_optimizer(
    model: nn.Module, lr: float, backbone_lr_mult: float, weight_decay: float
) -> torch.optim.AdamW:
    """AdamW over `param_groups` (fused kernels on CUDA)."""
    groups = param_groups(model, lr, backbone_lr_mult, weight_decay)
    on_cuda = next(model.parameters()).is_cuda
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), fused=on_cuda or None)


def warmup_cosine_factor(step: int, start: int, warmup: int, total: int, min_ratio: float) -> float:
    """LR multiplier: 0 before `start`, linear warm-up for `warmup` steps, cosine decay to
    `min_ratio` at `total`."""
    if step < start:
        return 0.0
    since = step - start
    if since < warmup:
        return (since + 1) / warmup
    span = max(1, total - start - warmup)
    progress = min(1.0, (since - warmup) / span)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    schedule: str,
    total_steps: int,
    warmup_steps: int,
    freeze_steps: int = 0,
    min_lr_ratio: float = 0.01,
) -> LRScheduler:
    """A per-step scheduler; `freeze_steps` delays the backbone groups' warm-up (cosine only)."""
    total_steps = max(1, total_steps)
    if schedule == "onecycle":
        peaks = [group["lr"] for group in optimizer.param_groups]
        pct = min(0.5, max(1.0 / total_steps, warmup_steps / total_steps))
        return OneCycleLR(
            optimizer, max_lr=peaks, total_steps=total_steps, pct_start=pct, anneal_strategy="cos"
        )
    if schedule != "cosine":
        raise ValueError(f"unknown schedule {schedule!r}; expected cosine or onecycle")

    def factor_for(start: int) -> Callable[[int], float]:
        def factor(step: int) -> float:
            return warmup_cosine_factor(step, start, warmup_steps, total_steps, min_lr_ratio)

        return factor

    # Plain functions (not objects) so the scheduler's state dict holds numbers only and the
    # schedule itself always comes from the current configuration.
    lambdas = [
        factor_for(freeze_steps if group.get("part") == BACKBONE else 0) for group in optimizer.param_groups
    ]
    return LambdaLR(optimizer, lr_lambda=lambdas)


def lerp_all(starts: list[torch.Tensor], ends: list[torch.Tensor], weight: float) -> None:
    """starts[i] += weight * (ends[i] - starts[i]) for every i, in place: one fused kernel launch per
    device and dtype where PyTorch has `_foreach_lerp_` (private, so not relied on), else a loop."""
    fused = getattr(torch, "_foreach_lerp_", None)
    if fused is not None:
        fused(starts, ends, weight)
        return
    for start, end in zip(starts, ends, strict=True):
        start.lerp_(end, weight)


class ModelEma:
    """Exponential moving average of a model's floating-point state (weights and norm statistics)."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.updates = 0
        self.module = copy.deepcopy(model).eval()
        for param in self.module.parameters():
            param.requires_grad_(False)
        self._pair(model)

    def _pair(self, model: nn.Module) -> None:
        # state_dict() tensors share storage with the live parameters, so these lists stay current.
        ours, theirs = self.module.state_dict(), model.state_dict()
        self._float = (
            [ours[k] for k in ours if ours[k].is_floating_point()],
            [theirs[k] for k in ours if ours[k].is_floating_point()],
        )
        self._other = (
            [ours[k] for k in ours if not ours[k].is_floating_point()],
            [theirs[k] for k in ours if not ours[k].is_floating_point()],
        )

    def current_decay(self) -> float:
        """The decay used by the next update: ramps as (1 + n) / (10 + n) up to `decay`."""
        return min(self.decay, (1.0 + self.updates) / (10.0 + self.updates))

    @torch.no_grad()
    def update(self) -> None:
        """Move the average towards the model's current state (call after each optimizer step)."""
        weight = 1.0 - self.current_decay()
        self.updates += 1
        lerp_all(*self._float, weight)
        for mine, theirs in zip(*self._other, strict=True):
            mine.copy_(theirs)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The averaged model's state dict (load it into the same architecture to predict)."""
        return self.module.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor], updates: int) -> None:
        """Restore the average and how many updates it has seen."""
        self.module.load_state_dict(state)
        self.updates = updates
