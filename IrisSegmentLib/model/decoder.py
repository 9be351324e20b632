"""Query-based mask decoder: two-way attention between the query image and all classes' tokens."""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .attention import MLP, Attention, AttentionResidual, Residual
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
        self.attn = AttentionResidual(dim, Attention(dim, heads), dim)
        self.mlp = Residual(dim, MLP(dim, mlp_ratio))
        self.proj_out = nn.Linear(dim, channels)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def forward(self, x: torch.Tensor, tokens: torch.Tensor, token_mask: torch.Tensor | None) -> torch.Tensor:
        b, c, d, h, w = x.shape
        img = x.flatten(2).transpose(1, 2)
        y = self.mlp(self.attn(self.proj_in(img), tokens, token_mask))
        return x + self.proj_out(y).transpose(1, 2).reshape(b, c, d, h, w)


class PriorFusion(nn.Module):
    """Refines each class's mask logit with its localisation prior (issue 17): per class,
    [appearance (the shared per-voxel embedding, projected), logit, prior] at half resolution -> dilated
    3x3x3 convolutions (reach +-21 mm at the 1.5 mm working spacing: registration's errors) -> a logit
    correction, upsampled and added. The output layer starts at zero, so a network given this part behaves
    exactly as without it until it is trained; every class goes through the same weights, all K in one pass."""

    def __init__(self, embedding_channels: int, channels: int):
        super().__init__()
        self.appearance = nn.Conv3d(embedding_channels, channels, 1)
        act = nn.LeakyReLU(0.01)
        self.refine = nn.Sequential(
            nn.Conv3d(channels + 2, channels, 3, padding=1), act,
            nn.Conv3d(channels, channels, 3, padding=2, dilation=2), act,
            nn.Conv3d(channels, channels, 3, padding=4, dilation=4), act,
            nn.Conv3d(channels, 1, 1),
        )
        nn.init.zeros_(self.refine[-1].weight)
        nn.init.zeros_(self.refine[-1].bias)

    def forward(self, emb: torch.Tensor, logits: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
        """emb (B, E, D, H, W), logits and prior (B, K, D, H, W), prior in [0, 1], D, H, W even -> refined logits."""
        b, k = logits.shape[:2]
        look = F.avg_pool3d(self.appearance(emb), 2).repeat_interleave(k, 0)
        per_class = torch.stack([logits.clamp(-10.0, 10.0) / 5.0, 2.0 * prior.to(logits.dtype) - 1.0], 2)
        x = torch.cat([look, F.avg_pool3d(per_class.flatten(0, 1).to(look.dtype), 2)], 1)
        delta = F.interpolate(self.refine(x), scale_factor=2, mode="trilinear", align_corners=False)
        return logits + delta.view_as(logits)


class Decoder(nn.Module):
    """Two-way fusion of the query image with every class's tokens at the coarsest scale (`fusion_depth` blocks from
    `fusion_block()`, each mapping (image, tokens, token mask) to (image, tokens)), the UNet decoder with one more
    image <- tokens fusion at the next finer scale (`second_fusion`), per-class dynamic kernels on a per-voxel
    embedding, and the prior fusion (`prior_channels` wide; 0: no prior input)."""

    def __init__(self, *, widths: Sequence[int], heads: int, mlp_ratio: int, fusion_depth: int,
                 fusion_block: Callable[[], nn.Module], second_fusion: bool, head_channels: int, prior_channels: int):
        super().__init__()
        w, c = tuple(widths), widths[-1]
        self.fusion = nn.ModuleList(fusion_block() for _ in range(fusion_depth))
        self.img_norm = nn.LayerNorm(c)
        self.ups = nn.ModuleList(UpBlock(w[i], w[i - 1]) for i in range(len(w) - 1, 0, -1))
        self.second_fusion = (
            ImageFromTokens(w[-2], c, heads, mlp_ratio) if second_fusion else None
        )
        hc = head_channels
        self.head = nn.Sequential(
            nn.Conv3d(w[0], hc, 1, bias=False), norm(hc), nn.LeakyReLU(0.01), nn.Conv3d(hc, hc, 1)
        )
        self.kernel = nn.Sequential(nn.Linear(2 * c, c), nn.GELU(), nn.Linear(c, hc + 1))
        self.scale = hc**-0.5
        self.prior_fusion = PriorFusion(hc, prior_channels) if prior_channels else None

    def forward(
        self, feats: list[torch.Tensor], tokens: torch.Tensor, class_valid: torch.Tensor | None = None,
        prior: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """feats finest-first; tokens (B, K, T, C); class_valid (B, K) bool; prior (B, K, D, H, W) in [0, 1]
        or None (no localisation, or a network without prior input: then it is not used) -> logits (B, K, D, H, W)."""
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
        logits = logits + kern[..., -1, None, None, None]
        if prior is None or self.prior_fusion is None:
            return logits
        return self.prior_fusion(emb, logits, prior)
