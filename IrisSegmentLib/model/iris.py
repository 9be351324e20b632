"""The IRIS network: shared encoder, task encoder, query-based decoder."""
from __future__ import annotations

import torch
from torch import nn

from ..config import ModelConfig
from .decoder import Decoder
from .encoder import Encoder
from .task_encoder import TaskEncoder


class IrisModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.encoder = Encoder(cfg.in_channels, cfg.widths, cfg.blocks_per_stage)
        self.task_encoder = TaskEncoder(cfg)
        self.decoder = Decoder(cfg)

    def encode_task(self, ref_image: torch.Tensor, ref_masks: torch.Tensor) -> torch.Tensor:
        """(B, 1, D, H, W) reference, (B, K, D, H, W) masks -> task tokens (B, K, m+1, C)."""
        return self.task_encoder(self.encoder(ref_image)[-1], ref_masks)

    def segment(
        self, image: torch.Tensor, tokens: torch.Tensor, class_valid: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(B, 1, D, H, W) query, tokens (B or 1, K, m+1, C) -> logits (B, K, D, H, W), all K at once."""
        feats = self.encoder(image)
        if tokens.shape[0] != image.shape[0]:
            tokens = tokens.expand(image.shape[0], -1, -1, -1)
        return self.decoder(feats, tokens, class_valid)

    def forward(self, query, ref_image, ref_masks, class_valid=None) -> torch.Tensor:
        return self.segment(query, self.encode_task(ref_image, ref_masks), class_valid)
