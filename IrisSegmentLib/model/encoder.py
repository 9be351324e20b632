"""Residual 3D UNet encoder shared by reference and query images."""
from __future__ import annotations

import torch
from torch import nn

from .blocks import ResBlock


class Encoder(nn.Module):
    """Returns one feature map per stage, finest first; stage i is at 1/2**i resolution."""

    def __init__(self, in_channels: int, widths: tuple[int, ...], blocks_per_stage: int):
        super().__init__()
        self.stages = nn.ModuleList()
        cin = in_channels
        for i, w in enumerate(widths):
            blocks = [ResBlock(cin, w, stride=1 if i == 0 else 2)]
            blocks += [ResBlock(w, w) for _ in range(blocks_per_stage - 1)]
            self.stages.append(nn.Sequential(*blocks))
            cin = w

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = []
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        return feats
