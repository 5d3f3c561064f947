"""Training losses on logits ``(N, 1, I, J, K)`` and float targets of the same shape."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """1 - soft Dice over the whole batch (one foreground class)."""
    prob = torch.sigmoid(logits.float())
    target = target.float()
    intersection = (prob * target).sum()
    return 1.0 - (2.0 * intersection + eps) / (prob.sum() + target.sum() + eps)


class SegmentationLoss(nn.Module):
    """``bce`` (the seed's BCEWithLogitsLoss) or ``dice_bce`` (their sum)."""

    def __init__(self, name: str = "dice_bce") -> None:
        super().__init__()
        if name not in ("bce", "dice_bce"):
            raise ValueError(f"unknown loss {name!r}; expected bce or dice_bce")
        self.name = name

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        bce = F.binary_cross_entropy_with_logits(logits.float(), target.float())
        if self.name == "bce":
            return bce
        return bce + soft_dice_loss(logits, target)
