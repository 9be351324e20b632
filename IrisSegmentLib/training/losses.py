"""Per-class Dice + binary cross-entropy, with padded class slots masked out."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def dice_bce(logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """logits, target (B, K, D, H, W); valid (B, K) bool. Mean over valid (sample, class) slots."""
    p = torch.sigmoid(logits.float())
    t = target.float()
    inter = (p * t).flatten(2).sum(-1)
    denom = (p + t).flatten(2).sum(-1)
    dice = 1 - (2 * inter + eps) / (denom + eps)
    bce = F.binary_cross_entropy_with_logits(logits.float(), t, reduction="none").flatten(2).mean(-1)
    per = dice + bce
    v = valid.float()
    return (per * v).sum() / v.sum().clamp_min(1)


def dice_score(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Hard Dice per (B, K); 1 when both are empty."""
    p, t = pred.bool().flatten(2), target.bool().flatten(2)
    inter = (p & t).sum(-1).float()
    tot = (p.sum(-1) + t.sum(-1)).float()
    return torch.where(tot > 0, 2 * inter / tot.clamp_min(1), torch.ones_like(tot))
