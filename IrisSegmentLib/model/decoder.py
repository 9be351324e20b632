"""Query-based mask decoder: two-way attention between the query image and all classes' tokens."""
from __future__ import annotations

import torch
from torch import nn

from ..config import ModelConfig
from .attention import MLP, Attention, Residual, TwoWayBlock
from .blocks import ResBlock, norm


class UpBlock(nn.Module):
    """Transposed-conv upsampling, concatenation with the encoder skip, residual block."""

    def __init__(self, cin: int, cskip: int):
        super().__init__()
        self.up = nn.ConvTranspose3d(cin, cskip, 2, stride=2)
        self.block = ResBlock(2 * cskip, cskip)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.block(torch.cat([self.up(x), skip], 1))


class ImageFromTokens(nn.Module):
    """Finer-scale fusion: image voxels attend to the tokens (residual, zero-initialised output)."""

    def __init__(self, channels: int, dim: int, heads: int, mlp_ratio: int):
        super().__init__()
        self.proj_in = nn.Linear(channels, dim)
        self.attn = Residual(dim, Attention(dim, heads), dim)
        self.mlp = Residual(dim, MLP(dim, mlp_ratio))
        self.proj_out = nn.Linear(dim, channels)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def forward(self, x: torch.Tensor, tokens: torch.Tensor, token_mask: torch.Tensor | None) -> torch.Tensor:
        b, c, d, h, w = x.shape
        img = x.flatten(2).transpose(1, 2)
        y = self.mlp(self.attn(self.proj_in(img), tokens, token_mask))
        return x + self.proj_out(y).transpose(1, 2).reshape(b, c, d, h, w)


class Decoder(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        w, c = cfg.widths, cfg.token_dim
        self.fusion = nn.ModuleList(
            TwoWayBlock(c, cfg.heads, cfg.mlp_ratio, cfg.decoder_attention == "one-way")
            for _ in range(cfg.bottleneck_fusion_depth)
        )
        self.independent = cfg.class_interaction == "independent"
        self.img_norm = nn.LayerNorm(c)
        self.ups = nn.ModuleList(UpBlock(w[i], w[i - 1]) for i in range(len(w) - 1, 0, -1))
        self.second_fusion = (
            ImageFromTokens(w[-2], c, cfg.heads, cfg.mlp_ratio) if cfg.second_fusion else None
        )
        hc = cfg.head_channels
        self.head = nn.Sequential(
            nn.Conv3d(w[0], hc, 1, bias=False), norm(hc), nn.LeakyReLU(0.01), nn.Conv3d(hc, hc, 1)
        )
        self.kernel = nn.Sequential(nn.Linear(2 * c, c), nn.GELU(), nn.Linear(c, hc + 1))
        self.scale = hc**-0.5

    def forward(
        self, feats: list[torch.Tensor], tokens: torch.Tensor, class_valid: torch.Tensor | None = None
    ) -> torch.Tensor:
        """feats finest-first; tokens (B, K, T, C); class_valid (B, K) bool -> logits (B, K, D, H, W)."""
        if self.independent and tokens.shape[1] > 1:  # ablation: one pass per class, classes never meet
            b, k = tokens.shape[:2]
            feats = [f.repeat_interleave(k, 0) for f in feats]
            # no key mask: a pass sees one class's tokens only, so a padded slot can reach nothing but its own
            # (loss-masked) output, and masking its only keys would turn that output into NaN
            return self._forward(feats, tokens.reshape(b * k, 1, *tokens.shape[2:]), None).view(b, k, *feats[0].shape[2:])
        return self._forward(feats, tokens, class_valid)

    def _forward(self, feats: list[torch.Tensor], tokens: torch.Tensor, class_valid: torch.Tensor | None) -> torch.Tensor:
        b, k, t, c = tokens.shape
        tok = tokens.reshape(b, k * t, c)
        tmask = None if class_valid is None else class_valid.repeat_interleave(t, dim=1)
        x = feats[-1]
        _, _, d, h, w = x.shape
        img = x.flatten(2).transpose(1, 2)
        for block in self.fusion:
            img, tok = block(img, tok, tmask)
        x = self.img_norm(img).transpose(1, 2).reshape(b, c, d, h, w)
        for i, up in enumerate(self.ups):
            x = up(x, feats[-2 - i])
            if i == 0 and self.second_fusion is not None:
                x = self.second_fusion(x, tok, tmask)
        emb = self.head(x)
        tk = tok.view(b, k, t, c)
        kern = self.kernel(torch.cat([tk[:, :, 0], tk[:, :, 1:].mean(2)], -1))
        logits = torch.einsum("bkc,bcdhw->bkdhw", kern[..., :-1], emb) * self.scale
        return logits + kern[..., -1, None, None, None]
