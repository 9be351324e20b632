"""Pre-norm attention blocks: task-encoding blocks and two-way (bidirectional) blocks."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Attention(nn.Module):
    """Multi-head attention with optional key mask (True = attend)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, ctx: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        b, n, c = x.shape
        h = self.heads
        q = self.q(x).view(b, n, h, c // h).transpose(1, 2)
        k, v = self.kv(ctx).view(b, ctx.shape[1], 2, h, c // h).permute(2, 0, 3, 1, 4)
        mask = None if key_mask is None else key_mask[:, None, None, :]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out(y.transpose(1, 2).reshape(b, n, c))


class MLP(nn.Sequential):
    def __init__(self, dim: int, ratio: int):
        super().__init__(nn.Linear(dim, dim * ratio), nn.GELU(), nn.Linear(dim * ratio, dim))


class Residual(nn.Module):
    """x + f(norm(x)): a pre-norm feed-forward sub-layer."""

    def __init__(self, dim: int, fn: nn.Module):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fn(self.norm(x))


class AttentionResidual(nn.Module):
    """x + attention(norm(x), context): a pre-norm attention sub-layer; the context is ctx_norm(ctx) (cross-attention,
    `ctx_dim` given) or norm(x) itself (self-attention)."""

    def __init__(self, dim: int, attention: Attention, ctx_dim: int | None = None):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.ctx_norm = nn.LayerNorm(ctx_dim) if ctx_dim else None
        self.fn = attention

    def forward(self, x: torch.Tensor, ctx: torch.Tensor | None = None, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        y = self.norm(x)
        return x + self.fn(y, y if ctx is None else self.ctx_norm(ctx), key_mask)


class TaskBlock(nn.Module):
    """[self-attn + FFN, cross-attn(tokens <- features) + FFN, self-attn + FFN] on one class's tokens. A task-encoding
    block maps (tokens, features) to (tokens, features); this one leaves the features as they are."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int):
        super().__init__()
        self.layers = nn.ModuleList()
        for cross in (False, True, False):
            self.layers.append(AttentionResidual(dim, Attention(dim, heads), dim if cross else None))
            self.layers.append(Residual(dim, MLP(dim, mlp_ratio)))

    def forward(self, tokens: torch.Tensor, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        for i, layer in enumerate(self.layers):
            tokens = layer(tokens, feats) if i == 2 else layer(tokens)
        return tokens, feats


class TwoWayBlock(nn.Module):
    """tokens <- image, image <- tokens, token self-attention; each with an FFN, pre-norm, no positions."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int):
        super().__init__()
        self.tok_from_img = AttentionResidual(dim, Attention(dim, heads), dim)
        self.tok_mlp = Residual(dim, MLP(dim, mlp_ratio))
        self.img_from_tok = AttentionResidual(dim, Attention(dim, heads), dim)
        self.img_mlp = Residual(dim, MLP(dim, mlp_ratio))
        self.tok_self = AttentionResidual(dim, Attention(dim, heads))
        self.tok_self_mlp = Residual(dim, MLP(dim, mlp_ratio))

    def forward(self, img: torch.Tensor, tokens: torch.Tensor, token_mask: torch.Tensor | None):
        tokens = self.tok_mlp(self.tok_from_img(tokens, img))
        img = self.img_mlp(self.img_from_tok(img, tokens, token_mask))
        tokens = self.tok_self_mlp(self.tok_self(tokens, None, token_mask))
        return img, tokens
