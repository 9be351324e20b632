"""The ablation variants of issue 11 (`ModelConfig` switches off their default; docs/DESIGN.md section 2,
benchmarks/ablations.py): factories for the parts that differ from the design, used only by `build.build_iris`.

Each keeps the state-dict names and the initialisation order of the network it ablates, so weights trained with a
switch load into the part again, and a seed gives the same initial weights it always gave.

- task_attention "joint": the seed's self-attention encoder layer over [tokens; features] (`JointTaskBlock`);
- foreground_pooling "upsample-then-pool" / "downsample": other pooling functions; "none": a learnt token;
- context_tokens "pool": the mask area-pooled to the coarse grid, merged by a 1x1x1 conv (no shuffle path);
- decoder_attention "one-way": image <- tokens only, the tokens pass unchanged (`OneWayBlock`);
- class_interaction "independent": one decoder pass per class, classes never meet (`IndependentClassesDecoder`).
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .attention import MLP, Attention, AttentionResidual, Residual
from .build import Parts
from .decoder import Decoder
from .foreground_pooling import downsampled_pool, upsample_then_pool
from .task_encoder import TaskEncoder

POOLS = {"upsample-then-pool": upsample_then_pool, "downsample": downsampled_pool}


class JointTaskBlock(nn.Module):
    """task_attention "joint": the seed's self-attention encoder layer (pre-norm, + FFN), run over [tokens; features]
    together so that the tokens can read the reference at all; the features are updated too."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int):
        super().__init__()
        self.attn = AttentionResidual(dim, Attention(dim, heads))
        self.mlp = Residual(dim, MLP(dim, mlp_ratio))

    def forward(self, tokens: torch.Tensor, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.mlp(self.attn(torch.cat([tokens, feats], 1)))
        return x[:, : tokens.shape[1]], x[:, tokens.shape[1] :]


class OneWayBlock(nn.Module):
    """decoder_attention "one-way": image <- tokens (+ FFN) only; the tokens pass unchanged."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int):
        super().__init__()
        self.img_from_tok = AttentionResidual(dim, Attention(dim, heads), dim)
        self.img_mlp = Residual(dim, MLP(dim, mlp_ratio))

    def forward(self, img: torch.Tensor, tokens: torch.Tensor, token_mask: torch.Tensor | None):
        return self.img_mlp(self.img_from_tok(img, tokens, token_mask)), tokens


class PoolContext(TaskEncoder):
    """context_tokens "pool": the context is the features plus a 1x1x1 merge of [features, mask area-pooled to the
    coarse grid], in place of the pixel-shuffle path."""

    def _context_layers(self, c: int, r: int, s: int) -> None:
        self.pool_merge = nn.Conv3d(c + 1, c, 1)

    def _context(self, feats: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        b, k = masks.shape[:2]
        low = F.adaptive_avg_pool3d(masks.reshape(b * k, 1, *masks.shape[2:]).to(feats.dtype), feats.shape[2:])
        rep = feats.repeat_interleave(k, dim=0)
        return self.pool_merge(torch.cat([rep, low], 1)) + rep


class LearntForeground(TaskEncoder):
    """foreground_pooling "none": no foreground pooling; the slot is one more learnt query (the mask reaches the
    tokens only through the context path)."""

    def __init__(self, *, dim: int, **kwargs):
        super().__init__(dim=dim, **kwargs)
        self.fg_token = nn.Parameter(torch.randn(dim) * 0.02)

    def _foreground(self, feats: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        return self.fg_token.to(feats.dtype).expand(*masks.shape[:2], -1)


class IndependentClassesDecoder(Decoder):
    """class_interaction "independent": one decoder pass per class, classes never meet."""

    def forward(self, feats: list[torch.Tensor], tokens: torch.Tensor, class_valid: torch.Tensor | None = None,
                prior: torch.Tensor | None = None) -> torch.Tensor:
        if tokens.shape[1] == 1:
            return super().forward(feats, tokens, class_valid, prior)
        b, k = tokens.shape[:2]
        feats = [f.repeat_interleave(k, 0) for f in feats]
        # no key mask: a pass sees one class's tokens only, so a padded slot can reach nothing but its own
        # (loss-masked) output, and masking its only keys would turn that output into NaN
        one = None if prior is None else prior.reshape(b * k, 1, *prior.shape[2:])
        return super().forward(feats, tokens.reshape(b * k, 1, *tokens.shape[2:]), None, one).view(b, k, *feats[0].shape[2:])


def parts(cfg: ModelConfig) -> Parts:
    """The parts of `cfg`: the design's, with each switch that is off its default replaced by its variant."""
    out = Parts()
    if cfg.task_attention == "joint":
        out = dataclasses.replace(out, task_block=JointTaskBlock)
    if cfg.foreground_pooling in POOLS:
        out = dataclasses.replace(out, pool=POOLS[cfg.foreground_pooling])
    encoders = [cls for cls, on in ((PoolContext, cfg.context_tokens == "pool"),
                                    (LearntForeground, cfg.foreground_pooling == "none")) if on]
    if encoders:  # one class with every switched part of the task encoder
        out = dataclasses.replace(out, task_encoder=encoders[0] if len(encoders) == 1 else
                                  type("TaskEncoderVariant", tuple(encoders), {}))
    if cfg.decoder_attention == "one-way":
        out = dataclasses.replace(out, fusion_block=OneWayBlock)
    if cfg.class_interaction == "independent":
        out = dataclasses.replace(out, decoder=IndependentClassesDecoder)
    return out
