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
    """x + f(norm(x)[, ctx]): a pre-norm sub-layer."""

    def __init__(self, dim: int, fn: nn.Module, ctx_dim: int | None = None):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.ctx_norm = nn.LayerNorm(ctx_dim) if ctx_dim else None
        self.fn = fn

    def forward(self, x, ctx=None, key_mask=None):
        y = self.norm(x)
        if isinstance(self.fn, Attention):
            c = y if ctx is None else self.ctx_norm(ctx)
            return x + self.fn(y, c, key_mask)
        return x + self.fn(y)


class TaskBlock(nn.Module):
    """[self-attn + FFN, cross-attn(tokens <- features) + FFN, self-attn + FFN] on one class's tokens."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int):
        super().__init__()
        self.layers = nn.ModuleList()
        for cross in (False, True, False):
            self.layers.append(Residual(dim, Attention(dim, heads), dim if cross else None))
            self.layers.append(Residual(dim, MLP(dim, mlp_ratio)))

    def forward(self, tokens: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            tokens = layer(tokens, feats) if i == 2 else layer(tokens)
        return tokens


class JointTaskBlock(nn.Module):
    """Ablation (task_attention "joint"): the seed's self-attention encoder layer (pre-norm, + FFN),
    run over [tokens; features] together so that the tokens can read the reference at all."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int):
        super().__init__()
        self.attn = Residual(dim, Attention(dim, heads))
        self.mlp = Residual(dim, MLP(dim, mlp_ratio))

    def forward(self, tokens: torch.Tensor, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.mlp(self.attn(torch.cat([tokens, feats], 1)))
        return x[:, : tokens.shape[1]], x[:, tokens.shape[1] :]


class TwoWayBlock(nn.Module):
    """tokens <- image, image <- tokens, token self-attention; each with an FFN, pre-norm, no positions.
    `one_way` (ablation, decoder_attention "one-way"): image <- tokens only, the tokens pass unchanged."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int, one_way: bool = False):
        super().__init__()
        self.one_way = one_way
        if not one_way:
            self.tok_from_img = Residual(dim, Attention(dim, heads), dim)
            self.tok_mlp = Residual(dim, MLP(dim, mlp_ratio))
        self.img_from_tok = Residual(dim, Attention(dim, heads), dim)
        self.img_mlp = Residual(dim, MLP(dim, mlp_ratio))
        if not one_way:
            self.tok_self = Residual(dim, Attention(dim, heads))
            self.tok_self_mlp = Residual(dim, MLP(dim, mlp_ratio))

    def forward(self, img: torch.Tensor, tokens: torch.Tensor, token_mask: torch.Tensor | None):
        if self.one_way:
            return self.img_mlp(self.img_from_tok(img, tokens, token_mask)), tokens
        tokens = self.tok_mlp(self.tok_from_img(tokens, img))
        img = self.img_mlp(self.img_from_tok(img, tokens, token_mask))
        tokens = self.tok_self_mlp(self.tok_self(tokens, None, token_mask))
        return img, tokens
