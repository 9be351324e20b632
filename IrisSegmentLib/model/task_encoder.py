"""Task encoding: a reference's features and masks -> (m+1) tokens per class."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .attention import JointTaskBlock, TaskBlock
from .foreground_pooling import downsampled_pool, foreground_pool, upsample_then_pool
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
        self.pooling, self.context = cfg.foreground_pooling, cfg.context_tokens
        if self.context == "pixel-shuffle":
            self.expand = nn.Conv3d(c, s * r**3, 1)
            self.merge = nn.Sequential(nn.Conv3d(s + 1, s, 3, padding=1), nn.LeakyReLU(0.01))
            self.project = nn.Conv3d(s * r**3, c, 1)
        else:  # ablation "pool": the mask area-pooled to the coarse grid, merged by a 1x1x1 conv
            self.pool_merge = nn.Conv3d(c + 1, c, 1)
        self.queries = nn.Parameter(torch.randn(cfg.num_queries, c) * 0.02)
        block = JointTaskBlock if cfg.task_attention == "joint" else TaskBlock
        self.blocks = nn.ModuleList(block(c, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.task_attention_depth))
        self.norm = nn.LayerNorm(c)
        if self.pooling == "none":  # ablation: no foreground pooling; the slot is one more learnt query
            self.fg_token = nn.Parameter(torch.randn(c) * 0.02)

    def forward(self, feats: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """(B, C, d, h, w) coarsest features, (B, K, D, H, W) masks in [0, 1] -> (B, K, m+1, C)."""
        b, k = masks.shape[:2]
        c = feats.shape[1]
        fg = self._foreground(feats, masks)  # (B, K, C)
        if self.context == "pixel-shuffle":
            shuffled = pixel_shuffle_3d(self.expand(feats), self.r)  # (B, s, D, H, W)
            shuffled = shuffled.repeat_interleave(k, dim=0)
            merged = self.merge(torch.cat([shuffled, masks.reshape(b * k, 1, *masks.shape[2:]).to(feats.dtype)], 1))
            ctx = self.project(pixel_unshuffle_3d(merged, self.r)) + feats.repeat_interleave(k, dim=0)
        else:
            low = F.adaptive_avg_pool3d(masks.reshape(b * k, 1, *masks.shape[2:]).to(feats.dtype), feats.shape[2:])
            rep = feats.repeat_interleave(k, dim=0)
            ctx = self.pool_merge(torch.cat([rep, low], 1)) + rep
        ctx = ctx.flatten(2).transpose(1, 2)  # (B*K, N, C)
        tokens = torch.cat([fg.reshape(b * k, 1, c), self.queries.expand(b * k, -1, -1)], 1)
        for block in self.blocks:
            tokens = block(tokens, ctx)
            if isinstance(tokens, tuple):  # joint blocks update the features too
                tokens, ctx = tokens
        return self.norm(tokens).view(b, k, -1, c)

    def _foreground(self, feats: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        if self.pooling == "adjoint":
            return foreground_pool(feats, masks)
        if self.pooling == "upsample-then-pool":
            return upsample_then_pool(feats, masks)
        if self.pooling == "downsample":
            return downsampled_pool(feats, masks)
        return self.fg_token.to(feats.dtype).expand(*masks.shape[:2], -1)
