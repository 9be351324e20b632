"""Convolutional building blocks shared by the encoder and the decoder."""
from __future__ import annotations

import torch
from torch import nn


def norm(channels: int) -> nn.Module:
    """Instance norm: batch-size independent, the usual choice for 3D medical UNets."""
    return nn.InstanceNorm3d(channels, affine=True)


class ResBlock(nn.Module):
    """Pre-activation-free residual block: conv-norm-act-conv-norm + shortcut, then act."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv3d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.norm1 = norm(cout)
        self.conv2 = nn.Conv3d(cout, cout, 3, padding=1, bias=False)
        self.norm2 = norm(cout)
        self.act = nn.LeakyReLU(0.01, inplace=True)
        self.skip = (
            nn.Identity()
            if stride == 1 and cin == cout
            else nn.Sequential(nn.Conv3d(cin, cout, 1, stride=stride, bias=False), norm(cout))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.norm1(self.conv1(x)))
        y = self.norm2(self.conv2(y))
        return self.act(y + self.skip(x))
