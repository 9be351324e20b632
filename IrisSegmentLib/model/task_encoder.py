"""Task encoding: a reference's features and masks -> (m+1) tokens per class."""
from __future__ import annotations

import torch
from torch import nn

from ..config import ModelConfig
from .attention import TaskBlock
from .foreground_pooling import foreground_pool
from .pixel_shuffle import pixel_shuffle_3d, pixel_unshuffle_3d


class TaskEncoder(nn.Module):
    """T = [T_f; T_c]: an exact high-resolution foreground token and m context tokens.

    Context path: the coarse features are expanded to s*r^3 channels (1x1x1 conv), pixel-shuffled
    to full resolution, merged with the mask by a 3x3x3 conv, unshuffled, projected back to C and
    added to the features; m learnable queries (with the foreground token) read them by attention.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        c, r, s = cfg.token_dim, cfg.downsampling, cfg.shuffle_channels
        self.r = r
        self.expand = nn.Conv3d(c, s * r**3, 1)
        self.merge = nn.Sequential(nn.Conv3d(s + 1, s, 3, padding=1), nn.LeakyReLU(0.01))
        self.project = nn.Conv3d(s * r**3, c, 1)
        self.queries = nn.Parameter(torch.randn(cfg.num_queries, c) * 0.02)
        self.blocks = nn.ModuleList(
            TaskBlock(c, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.task_attention_depth)
        )
        self.norm = nn.LayerNorm(c)

    def forward(self, feats: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """(B, C, d, h, w) coarsest features, (B, K, D, H, W) masks in [0, 1] -> (B, K, m+1, C)."""
        b, k = masks.shape[:2]
        c = feats.shape[1]
        fg = foreground_pool(feats, masks)  # (B, K, C)
        shuffled = pixel_shuffle_3d(self.expand(feats), self.r)  # (B, s, D, H, W)
        shuffled = shuffled.repeat_interleave(k, dim=0)
        merged = self.merge(torch.cat([shuffled, masks.reshape(b * k, 1, *masks.shape[2:]).to(feats.dtype)], 1))
        ctx = self.project(pixel_unshuffle_3d(merged, self.r)) + feats.repeat_interleave(k, dim=0)
        ctx = ctx.flatten(2).transpose(1, 2)  # (B*K, N, C)
        tokens = torch.cat([fg.reshape(b * k, 1, c), self.queries.expand(b * k, -1, -1)], 1)
        for block in self.blocks:
            tokens = block(tokens, ctx)
        return self.norm(tokens).view(b, k, -1, c)
