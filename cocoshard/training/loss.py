"""Multi-label losses on logits: binary cross-entropy and the asymmetric loss (ASL).

ASL (Ridnik et al., "Asymmetric Loss For Multi-Label Classification", ICCV 2021) down-weights the
many easy negatives of a multi-label image (most of the 80 classes are absent) with a focusing term
(1 - p)^gamma_neg, and shifts negative probabilities down by a margin `clip` so that very easy
negatives, and possibly mislabelled ones, contribute nothing.

Reduction: both losses are summed over the 80 classes and averaged over the images of the batch.
The paper sums over the batch as well, which ties the loss scale to the batch size; averaging over
images keeps gradients comparable across batch sizes and between BCE and ASL. (With AdamW the step
size does not depend on a constant scale of the loss anyway; the choice matters for the numbers
logged and for fp16 gradient scaling.) Both compute in float32 whatever the autocast dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class AsymmetricLoss(nn.Module):
    """ASL with focusing exponents gamma_neg, gamma_pos and the negative probability margin `clip`."""

    def __init__(
        self, gamma_neg: float = 4.0, gamma_pos: float = 0.0, clip: float = 0.05, eps: float = 1e-8
    ) -> None:
        super().__init__()
        self.gamma_neg, self.gamma_pos, self.clip, self.eps = gamma_neg, gamma_pos, clip, eps

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits, targets = logits.float(), targets.float()
        p = torch.sigmoid(logits)
        log_p = F.logsigmoid(logits)  # stabler than log(sigmoid(x)) for large negative logits
        if self.clip > 0:
            p_neg = (1.0 - p + self.clip).clamp(max=1.0)
            log_p_neg = torch.log(p_neg.clamp(min=self.eps))
        else:
            p_neg = 1.0 - p
            log_p_neg = F.logsigmoid(-logits)
        loss = targets * log_p + (1.0 - targets) * log_p_neg
        if self.gamma_neg > 0 or self.gamma_pos > 0:
            p_true = p * targets + p_neg * (1.0 - targets)
            gamma = self.gamma_pos * targets + self.gamma_neg * (1.0 - targets)
            loss = loss * torch.pow(1.0 - p_true, gamma)
        return -loss.sum(dim=1).mean()


class MultiLabelBCE(nn.Module):
    """Binary cross-entropy on logits, summed over classes and averaged over images (see above)."""

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        loss = F.binary_cross_entropy_with_logits(logits.float(), targets.float(), reduction="none")
        return loss.sum(dim=1).mean()


def build_loss(name: str, gamma_neg: float = 4.0, gamma_pos: float = 0.0, clip: float = 0.05) -> nn.Module:
    """ "asl" or "bce" (as in `--loss`)."""
    if name == "asl":
        return AsymmetricLoss(gamma_neg=gamma_neg, gamma_pos=gamma_pos, clip=clip)
    if name == "bce":
        return MultiLabelBCE()
    raise ValueError(f"unknown loss {name!r}; expected asl or bce")
