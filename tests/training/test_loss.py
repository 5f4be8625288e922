"""ASL against its defining formula, its special case BCE, and its numerical behaviour."""

from __future__ import annotations

import pytest
import torch

from cocoshard.training.loss import AsymmetricLoss, MultiLabelBCE, build_loss


def _reference_asl(
    logits: torch.Tensor, targets: torch.Tensor, gamma_neg: float, gamma_pos: float, clip: float
) -> torch.Tensor:
    """The paper's formula written out term by term in float64."""
    p = torch.sigmoid(logits.double())
    p_m = (p - clip).clamp(min=0) if clip > 0 else p  # shifted probability of the negatives
    positive = targets * (1 - p) ** gamma_pos * torch.log(p)
    negative = (1 - targets) * p_m**gamma_neg * torch.log((1 - p_m).clamp(min=1e-8))
    return -(positive + negative).sum(dim=1).mean()


@pytest.mark.parametrize("gammas", [(4.0, 0.0, 0.05), (2.0, 1.0, 0.0), (0.0, 0.0, 0.1)])
def test_asl_matches_the_paper(gammas: tuple[float, float, float]) -> None:
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(16, 80, generator=generator) * 3
    targets = (torch.rand(16, 80, generator=generator) < 0.1).float()
    ours = AsymmetricLoss(*gammas)(logits, targets)
    assert torch.allclose(ours.double(), _reference_asl(logits, targets, *gammas), rtol=1e-4)


def test_asl_without_focusing_or_margin_is_bce() -> None:
    logits = torch.randn(8, 80)
    targets = (torch.rand(8, 80) < 0.2).float()
    assert torch.allclose(
        AsymmetricLoss(0.0, 0.0, 0.0)(logits, targets), MultiLabelBCE()(logits, targets), rtol=1e-5
    )


def test_asl_ignores_easy_negatives_and_keeps_positives() -> None:
    targets = torch.zeros(1, 80)
    easy_negatives = torch.full((1, 80), -4.0)  # p = 0.018 < clip: no loss at all
    assert AsymmetricLoss()(easy_negatives, targets).item() == 0.0
    assert MultiLabelBCE()(easy_negatives, targets).item() > 1.0
    targets[0, 0] = 1
    assert AsymmetricLoss()(easy_negatives, targets).item() == pytest.approx(4.018, abs=1e-3)


def test_extreme_bf16_logits_give_finite_loss_and_gradients() -> None:
    logits = torch.tensor([[-80.0, 80.0, 0.0] * 26 + [30.0, -30.0]], dtype=torch.bfloat16, requires_grad=True)
    targets = torch.tensor([[1.0, 0.0, 1.0] * 26 + [0.0, 1.0]])
    for name in ("asl", "bce"):
        loss = build_loss(name)(logits, targets)
        assert loss.dtype == torch.float32 and torch.isfinite(loss)
        (grad,) = torch.autograd.grad(loss, logits)
        assert torch.isfinite(grad.float()).all()


def test_reduction_is_per_image_so_batch_size_does_not_scale_the_loss() -> None:
    logits, targets = torch.randn(4, 80), (torch.rand(4, 80) < 0.1).float()
    double = build_loss("asl")(logits.repeat(2, 1), targets.repeat(2, 1))
    assert torch.allclose(double, build_loss("asl")(logits, targets))
    with pytest.raises(ValueError):
        build_loss("focal")
