"""Task encoding: a reference's features and masks -> (m+1) tokens per class."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .foreground_pooling import foreground_pool
from .pixel_shuffle import pixel_shuffle_3d, pixel_unshuffle_3d

Pool = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (B, C, d, h, w) features, (B, K, D, H, W) masks -> (B, K, C)


class TaskEncoder(nn.Module):
    """T = [T_f; T_c]: an exact high-resolution foreground token and m context tokens.

    Context path: the coarse features are expanded to s*r^3 channels (1x1x1 conv), pixel-shuffled
    to full resolution, merged with the mask by a 3x3x3 conv, unshuffled, projected back to C and
    added to the features; m learnable queries (with the foreground token) read them by attention.
    The `depth` attention blocks come from `block()` (each maps (tokens, features) to (tokens, features));
    `pool` makes the foreground token.
    """

    def __init__(self, *, dim: int, downsampling: int, shuffle_channels: int, num_queries: int, depth: int,
                 block: Callable[[], nn.Module], pool: Pool = foreground_pool):
        super().__init__()
        self.r = downsampling
        self._context_layers(dim, downsampling, shuffle_channels)
        self.queries = nn.Parameter(torch.randn(num_queries, dim) * 0.02)
        self.blocks = nn.ModuleList(block() for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.pool = pool

    def _context_layers(self, c: int, r: int, s: int) -> None:
        self.expand = nn.Conv3d(c, s * r**3, 1)
        self.merge = nn.Sequential(nn.Conv3d(s + 1, s, 3, padding=1), nn.LeakyReLU(0.01))
        self.project = nn.Conv3d(s * r**3, c, 1)

    def forward(self, feats: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """(B, C, d, h, w) coarsest features, (B, K, D, H, W) masks in [0, 1] -> (B, K, m+1, C)."""
        b, k = masks.shape[:2]
        c = feats.shape[1]
        fg = self._foreground(feats, masks)  # (B, K, C)
        ctx = self._context(feats, masks).flatten(2).transpose(1, 2)  # (B*K, N, C)
        tokens = torch.cat([fg.reshape(b * k, 1, c), self.queries.expand(b * k, -1, -1)], 1)
        for block in self.blocks:
            tokens, ctx = block(tokens, ctx)
        return self.norm(tokens).view(b, k, -1, c)

    def _foreground(self, feats: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        return self.pool(feats, masks)

    def _context(self, feats: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """(B*K, C, d, h, w): the features with each class's mask merged in at full resolution."""
        b, k = masks.shape[:2]
        shuffled = pixel_shuffle_3d(self.expand(feats), self.r)  # (B, s, D, H, W)
        shuffled = shuffled.repeat_interleave(k, dim=0)
        merged = self.merge(torch.cat([shuffled, masks.reshape(b * k, 1, *masks.shape[2:]).to(feats.dtype)], 1))
        return self.project(pixel_unshuffle_3d(merged, self.r)) + feats.repeat_interleave(k, dim=0)
